//! `wss://`: TLS for servers and clients, with rustls.
//!
//! Server side, [`TlsAcceptor`]: certificates and keys from PEM (files or
//! bytes), extra certificates chosen by SNI host name, ALPN `http/1.1`, and a
//! self-signed development certificate made at start ([`TlsAcceptor::self_signed`]).
//! Client side, [`TlsConnector`]: the platform's root certificates, extra CA
//! files, or (for development only) no verification at all.
//!
//! rustls runs on the `ring` provider, passed explicitly: no process-wide
//! default has to be installed.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Parses every certificate in a PEM document.
pub fn certs_from_pem(pem: &[u8]) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no certificate found in PEM"));
    }
    Ok(certs)
}

fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> io::Result<Arc<CertifiedKey>> {
    let certs = certs_from_pem(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| invalid(format!("bad private key PEM: {e}")))?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(format!("unusable private key: {e}")))?;
    let key = CertifiedKey::new(certs, signing_key);
    key.keys_match()
        .map_err(|e| invalid(format!("certificate and key do not match: {e}")))?;
    Ok(Arc::new(key))
}

/// Picks the certificate for the SNI host name, or the default one.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello
            .server_name()
            .and_then(|name| self.by_name.get(&name.to_ascii_lowercase()));
        Some(by_name.unwrap_or(&self.default).clone())
    }
}

/// Accepts TLS connections for a WebSocket server.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsAcceptor")
    }
}

/// A development certificate made by [`TlsAcceptor::self_signed`].
#[derive(Debug, Clone)]
pub struct SelfSigned {
    /// The certificate in PEM: give it to clients as their CA file.
    pub cert_pem: String,
    /// The private key in PEM.
    pub key_pem: String,
}

/// Builds a [`TlsAcceptor`] with a default certificate and per-host ones.
#[derive(Debug, Default)]
pub struct TlsAcceptorBuilder {
    default: Option<Arc<CertifiedKey>>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl TlsAcceptorBuilder {
    /// The certificate chain and key served when no SNI name matches.
    pub fn default_cert(mut self, cert_pem: &[u8], key_pem: &[u8]) -> io::Result<Self> {
        self.default = Some(certified_key(cert_pem, key_pem)?);
        Ok(self)
    }

    /// A certificate chain and key served to clients asking for `host` (SNI).
    pub fn sni_cert(mut self, host: &str, cert_pem: &[u8], key_pem: &[u8]) -> io::Result<Self> {
        self.by_name
            .insert(host.to_ascii_lowercase(), certified_key(cert_pem, key_pem)?);
        Ok(self)
    }

    /// The acceptor (ALPN `http/1.1`, TLS 1.2 and 1.3).
    pub fn build(self) -> io::Result<TlsAcceptor> {
        let default = self
            .default
            .or_else(|| self.by_name.values().next().cloned())
            .ok_or_else(|| invalid("no certificate configured"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver {
                default,
                by_name: self.by_name,
            }));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from_rustls(Arc::new(config)))
    }
}

impl TlsAcceptor {
    /// A builder for several certificates (SNI).
    pub fn builder() -> TlsAcceptorBuilder {
        TlsAcceptorBuilder::default()
    }

    /// An acceptor serving one certificate chain and key, from PEM bytes.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> io::Result<TlsAcceptor> {
        TlsAcceptor::builder()
            .default_cert(cert_pem, key_pem)?
            .build()
    }

    /// An acceptor serving one certificate chain and key, from PEM files.
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> io::Result<TlsAcceptor> {
        TlsAcceptor::from_pem(&read_file(cert.as_ref())?, &read_file(key.as_ref())?)
    }

    /// A fresh self-signed certificate for `names` (host names or IP
    /// addresses), for development: clients must trust
    /// [`SelfSigned::cert_pem`] explicitly.
    pub fn self_signed(names: &[&str]) -> io::Result<(TlsAcceptor, SelfSigned)> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let generated = rcgen::generate_simple_self_signed(names).map_err(invalid)?;
        let pem = SelfSigned {
            cert_pem: generated.cert.pem(),
            key_pem: generated.signing_key.serialize_pem(),
        };
        let acceptor = TlsAcceptor::from_pem(pem.cert_pem.as_bytes(), pem.key_pem.as_bytes())?;
        Ok((acceptor, pem))
    }

    /// The same acceptor offering HTTP/2 (ALPN `h2`, then `http/1.1`), for
    /// `Server::serve_http` (feature `hyper`): a client that
    /// picks `h2` is served HTTP/2 (many requests and streamed responses on
    /// one connection); WebSocket clients ask for `http/1.1`, or nothing.
    /// Not for [`Server::serve`](crate::Server::serve), which speaks
    /// HTTP/1.1 only.
    pub fn with_http2(&self) -> TlsAcceptor {
        let mut config = (**self.inner.config()).clone();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from_rustls(Arc::new(config))
    }

    /// Whether a handshake done by this acceptor picked HTTP/2.
    #[cfg(feature = "hyper")]
    pub(crate) fn negotiated_h2<S>(stream: &tokio_rustls::server::TlsStream<S>) -> bool {
        stream.get_ref().1.alpn_protocol() == Some(b"h2")
    }

    /// Wraps a rustls configuration you built yourself.
    pub fn from_rustls(config: Arc<rustls::ServerConfig>) -> TlsAcceptor {
        TlsAcceptor {
            inner: tokio_rustls::TlsAcceptor::from(config),
        }
    }

    /// Runs the TLS handshake on an accepted connection.
    pub async fn accept<S>(&self, stream: S) -> io::Result<tokio_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.inner.accept(stream).await
    }
}

/// Connects TLS for a WebSocket client.
#[derive(Clone)]
pub struct TlsConnector {
    inner: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConnector")
    }
}

/// Builds a [`TlsConnector`].
#[derive(Debug, Default)]
pub struct TlsConnectorBuilder {
    extra_ca: Vec<CertificateDer<'static>>,
    skip_platform_roots: bool,
    insecure: bool,
}

impl TlsConnectorBuilder {
    /// Also trusts the CA certificates in this PEM document.
    pub fn add_ca_pem(mut self, pem: &[u8]) -> io::Result<Self> {
        self.extra_ca.extend(certs_from_pem(pem)?);
        Ok(self)
    }

    /// Also trusts the CA certificates in this PEM file.
    pub fn add_ca_file(self, path: impl AsRef<Path>) -> io::Result<Self> {
        let pem = read_file(path.as_ref())?;
        self.add_ca_pem(&pem)
    }

    /// Trusts only the added CAs, not the platform's roots.
    pub fn without_platform_roots(mut self) -> Self {
        self.skip_platform_roots = true;
        self
    }

    /// Accepts any certificate. For development against self-signed servers
    /// only: it makes the connection open to interception.
    pub fn danger_accept_invalid_certs(mut self) -> Self {
        self.insecure = true;
        self
    }

    /// The connector.
    pub fn build(self) -> io::Result<TlsConnector> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid)?;
        let mut config = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(insecure::AcceptAnything(provider())))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            if !self.skip_platform_roots {
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    // Ignore the odd unparsable system certificate, as browsers do.
                    let _ = roots.add(cert);
                }
            }
            for cert in self.extra_ca {
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("bad CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(invalid(
                    "no trusted root certificates (none on the platform, none added)",
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsConnector::from_rustls(Arc::new(config)))
    }
}

impl TlsConnector {
    /// A builder (platform roots by default).
    pub fn builder() -> TlsConnectorBuilder {
        TlsConnectorBuilder::default()
    }

    /// Verifies servers against the platform's root certificates.
    pub fn platform() -> io::Result<TlsConnector> {
        TlsConnector::builder().build()
    }

    /// Wraps a rustls configuration you built yourself.
    pub fn from_rustls(config: Arc<rustls::ClientConfig>) -> TlsConnector {
        TlsConnector {
            inner: tokio_rustls::TlsConnector::from(config),
        }
    }

    /// Runs the TLS handshake with `host` (used for SNI and verification).
    pub async fn connect<S>(
        &self,
        host: &str,
        stream: S,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name =
            ServerName::try_from(host.to_string()).map_err(|e| invalid(format!("{host}: {e}")))?;
        self.inner.connect(name, stream).await
    }
}

mod insecure {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

    /// Accepts every certificate but still checks handshake signatures.
    #[derive(Debug)]
    pub struct AcceptAnything(pub Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
