//! wss:// between our client and our server, with a private CA, SNI and the
//! development modes.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tidewire::tls::{TlsAcceptor, TlsConnector};
use tidewire::{accept, ClientBuilder, Error, Message};
use tokio::net::TcpListener;

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tidewire test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names`, signed by the CA: (cert PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A wss echo server for `connections` connections; returns its port.
async fn wss_echo(acceptor: TlsAcceptor, connections: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        for _ in 0..connections {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut ws = accept(tls).await.unwrap();
                while let Some(Ok(msg)) = ws.recv().await {
                    if msg.is_data() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn wss_with_a_private_ca() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf(&["localhost", "127.0.0.1"]);
    let port = wss_echo(
        TlsAcceptor::from_pem(cert.as_bytes(), key.as_bytes()).unwrap(),
        2,
    )
    .await;
    let connector = TlsConnector::builder()
        .add_ca_pem(pki.ca_pem.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    for host in ["localhost", "127.0.0.1"] {
        let (mut ws, _) = ClientBuilder::new(format!("wss://{host}:{port}/"))
            .tls(connector.clone())
            .connect()
            .await
            .unwrap();
        assert!(ws.get_ref().is_tls());
        let big = "secure ".repeat(100_000);
        ws.send_text(big.clone()).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(big));
        ws.close(1000u16, "").await.unwrap();
    }
}

#[tokio::test]
async fn wss_refuses_an_untrusted_certificate() {
    let (acceptor, _) = TlsAcceptor::self_signed(&["localhost"]).unwrap();
    let port = wss_echo(acceptor, 1).await;
    let other_ca = Pki::new();
    let connector = TlsConnector::builder()
        .add_ca_pem(other_ca.ca_pem.as_bytes())
        .unwrap()
        .without_platform_roots()
        .build()
        .unwrap();
    let err = ClientBuilder::new(format!("wss://localhost:{port}/"))
        .tls(connector)
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_err();
    match err {
        Error::Io(e) => assert!(e.to_string().contains("certificate"), "{e}"),
        other => panic!("expected a certificate error, got {other:?}"),
    }
}

#[tokio::test]
async fn self_signed_development_mode_and_insecure_client() {
    let (acceptor, pem) = TlsAcceptor::self_signed(&["localhost", "127.0.0.1"]).unwrap();
    let port = wss_echo(acceptor, 2).await;
    // Trusting the generated certificate itself...
    let connector = TlsConnector::builder()
        .add_ca_pem(pem.cert_pem.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    let (mut ws, _) = ClientBuilder::new(format!("wss://127.0.0.1:{port}/"))
        .tls(connector)
        .connect()
        .await
        .unwrap();
    ws.send_text("a").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("a"));
    // ...or not verifying at all.
    let insecure = TlsConnector::builder()
        .danger_accept_invalid_certs()
        .build()
        .unwrap();
    let (mut ws, _) = ClientBuilder::new(format!("wss://localhost:{port}/"))
        .tls(insecure)
        .connect()
        .await
        .unwrap();
    ws.send_text("b").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("b"));
}

#[tokio::test]
async fn sni_selects_the_certificate_by_host_name() {
    let pki = Pki::new();
    let (a_cert, a_key) = pki.leaf(&["a.test"]);
    let (b_cert, b_key) = pki.leaf(&["b.test"]);
    let acceptor = TlsAcceptor::builder()
        .default_cert(a_cert.as_bytes(), a_key.as_bytes())
        .unwrap()
        .sni_cert("b.test", b_cert.as_bytes(), b_key.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    let port = wss_echo(acceptor, 2).await;
    let connector = TlsConnector::builder()
        .add_ca_pem(pki.ca_pem.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    for host in ["a.test", "b.test"] {
        // The names do not resolve: connect to loopback, verify as `host`.
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let tls = connector.connect(host, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let (mut ws, _) = ClientBuilder::new(format!("wss://{host}/"))
            .connect_on(tls)
            .await
            .unwrap();
        ws.send_text(host).await.unwrap();
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(host));
    }
}

#[test]
fn bad_pem_gets_a_clear_error() {
    let err = TlsAcceptor::from_pem(b"not a certificate", b"nor a key").unwrap_err();
    assert!(err.to_string().contains("no certificate"), "{err}");
    let pki = Pki::new();
    let (cert, _) = pki.leaf(&["x"]);
    let (_, other_key) = pki.leaf(&["y"]);
    let err = TlsAcceptor::from_pem(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("do not match"), "{err}");
    let err =
        TlsAcceptor::from_pem_files("/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
}
