//! `tidewire serve` and `tidewire token` as users run them: embedded
//! defaults in an empty folder, configuration precedence, graceful stop.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::LIMIT;
use serde_json::{json, Value};
use tidewire::Message;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

struct Served {
    child: Child,
    addr: String,
    /// The generated API key, when none was configured.
    key: Option<String>,
    /// The "listening on" line.
    line: String,
}

/// A fresh empty folder under the system temp dir.
fn empty_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tidewire-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn serve(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tidewire"));
    command
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("TIDEWIRE_API_KEY")
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("start tidewire serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (addr, key, line) = tokio::time::timeout(LIMIT, async {
        let mut key = None;
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("api key") {
                key = line.rsplit(' ').next().map(String::from);
            }
            // "tidewire serve listening on http(s)://ADDR/ (WebSocket: ...)"
            if let Some(rest) = line.split("listening on ").nth(1) {
                let rest = rest.split_once("://").unwrap().1;
                return (rest.split('/').next().unwrap().to_string(), key, line);
            }
        }
        panic!("tidewire serve exited before listening");
    })
    .await
    .expect("tidewire serve did not start in time");
    Served {
        child,
        addr,
        key,
        line,
    }
}

async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    tokio::time::timeout(LIMIT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response).to_string();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    })
    .await
    .unwrap()
}

/// `GET path`: the status, the Content-Type and the body.
async fn get(addr: &str, path: &str) -> (u16, String, String) {
    tokio::time::timeout(LIMIT, async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response).to_string();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type:")
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default();
        (head[9..12].parse().unwrap(), content_type, body.to_string())
    })
    .await
    .unwrap()
}

async fn api(addr: &str, key: &str, method: &str, body: Value) -> (u16, Value) {
    let auth = format!("apikey {key}");
    let (status, body) = http(
        addr,
        "POST",
        &format!("/api/{method}"),
        &[("Authorization", &auth)],
        &body.to_string(),
    )
    .await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn next_json(ws: &mut tidewire::WebSocket<tidewire::ClientStream>) -> Value {
    loop {
        match tokio::time::timeout(LIMIT, ws.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn serve_with_no_configuration_in_an_empty_folder() {
    let dir = empty_dir("embedded");
    let mut served = serve(&dir, &["--listen", "127.0.0.1:0"], &[]).await;
    let addr = served.addr.clone();
    let key = served.key.clone().expect("a generated API key is printed");
    assert_eq!(key.len(), 32);
    // Plain ws://: the WebSockets on the event loop.
    assert!(
        served.line.ends_with(", on the event loop)"),
        "{}",
        served.line
    );

    let (status, page) = http(&addr, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("tidewire") && page.contains("/connection/websocket"),
        "{page}"
    );
    // `/` is the demo chat; it, the ticker and the JavaScript client are
    // embedded in the binary.
    assert!(
        page.contains("demo chat") && page.contains("demo/chat.js"),
        "{page}"
    );
    for (path, content_type, marker) in [
        ("/demo/chat.js", "text/javascript", "newSubscription"),
        ("/demo/ticker.js", "text/javascript", "ticker:prices"),
        ("/demo/style.css", "text/css", ".state"),
        ("/ticker.html", "text/html", "demo/ticker.js"),
        ("/about.html", "text/html", "/connection/websocket"),
        (
            "/client/tidewire.js",
            "text/javascript",
            "export class Client",
        ),
        (
            "/client/tidewire.d.ts",
            "text/plain",
            "export declare class Client",
        ),
    ] {
        let (status, ty, body) = get(&addr, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(ty.starts_with(content_type), "{path}: {ty}");
        assert!(body.contains(marker), "{path}: {body}");
    }
    assert_eq!(get(&addr, "/nothing-here.js").await.0, 404);
    assert_eq!(
        http(&addr, "GET", "/health", &[], "").await,
        (200, "ok\n".into())
    );
    let (status, metrics) = http(&addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("tidewire_hub_connections"), "{metrics}");

    // /api is guarded.
    let (status, body) = http(&addr, "POST", "/api/info", &[], "{}").await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"code\":105"), "{body}");
    assert_eq!(api(&addr, "wrong", "info", json!({})).await.0, 401);
    let (status, info) = api(&addr, &key, "info", json!({})).await;
    assert_eq!(status, 200, "{info}");

    // The embedded default namespace: anonymous connect, subscribe, publish.
    let url = format!("ws://{addr}/connection/websocket");
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    ws.send_text(
        "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"chat:lobby\"}}",
    )
    .await
    .unwrap();
    assert!(next_json(&mut ws).await["connect"]["client"].is_string());
    assert_eq!(next_json(&mut ws).await["id"], 2);
    let (status, ack) = api(
        &addr,
        &key,
        "publish",
        json!({"channel": "chat:lobby", "data": {"text": "hello"}}),
    )
    .await;
    assert_eq!((status, ack["offset"].clone()), (200, json!(1)));
    loop {
        let push = next_json(&mut ws).await;
        if let Some(p) = push["push"].get("pub") {
            assert_eq!(p["data"]["text"], "hello");
            break;
        }
    }

    // SIGTERM: disconnect push (reconnect), close 1001, exit 0.
    let pid = served.child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap()
        .success());
    let push = loop {
        let v = next_json(&mut ws).await;
        if v["push"].get("disconnect").is_some() {
            break v;
        }
    };
    assert_eq!(push["push"]["disconnect"]["code"], 3001);
    assert_eq!(push["push"]["disconnect"]["reconnect"], true);
    let close = tokio::time::timeout(LIMIT, ws.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(close, Message::Close(Some(ref f)) if f.code.0 == 1001),
        "{close:?}"
    );
    let exit = tokio::time::timeout(LIMIT, served.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    // Nothing was written to the folder.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn flags_override_environment_which_overrides_the_file() {
    let dir = empty_dir("precedence");
    std::fs::write(
        dir.join("tidewire.toml"),
        "listen = \"127.0.0.1:0\"\n[api]\nkey = \"from-file\"\n[token]\nhmac_secret = \"file-secret\"\n",
    )
    .unwrap();
    let served = serve(&dir, &[], &[]).await;
    assert!(served.key.is_none());
    assert_eq!(
        api(&served.addr, "from-file", "info", json!({})).await.0,
        200
    );
    drop(served);
    let served = serve(&dir, &[], &[("TIDEWIRE_API_KEY", "from-env")]).await;
    assert_eq!(
        api(&served.addr, "from-file", "info", json!({})).await.0,
        401
    );
    assert_eq!(
        api(&served.addr, "from-env", "info", json!({})).await.0,
        200
    );
    drop(served);
    let served = serve(
        &dir,
        &["--api-key", "from-flag"],
        &[("TIDEWIRE_API_KEY", "from-env")],
    )
    .await;
    assert_eq!(
        api(&served.addr, "from-env", "info", json!({})).await.0,
        401
    );
    assert_eq!(
        api(&served.addr, "from-flag", "info", json!({})).await.0,
        200
    );

    // `tidewire token` signs with the same configuration's secret.
    let output = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["token", "--user", "42", "--ttl", "10m"])
        .current_dir(&dir)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap().trim().to_string();
    let url = format!("ws://{}/connection/websocket", served.addr);
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    ws.send_text(json!({"id": 1, "connect": {"token": token}}).to_string())
        .await
        .unwrap();
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["connect"]["user"], "42", "{reply}");
    let expires_in = reply["connect"]["expires_in"].as_u64().unwrap();
    assert!((590..=600).contains(&expires_in), "{expires_in}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn token_without_a_secret_says_how_to_configure_one() {
    let dir = empty_dir("token");
    let output = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["token", "--user", "42"])
        .current_dir(&dir)
        .env_remove("TIDEWIRE_TOKEN_HMAC_SECRET")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("hmac_secret"));
    let output = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args([
            "token",
            "--user",
            "42",
            "--secret",
            "s",
            "--channel",
            "private:x",
            "--ttl",
            "0",
        ])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn serve_refuses_a_bad_configuration_file_clearly() {
    let dir = empty_dir("bad");
    std::fs::write(dir.join("tidewire.toml"), "[client]\nping = 3\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("tidewire.toml") && stderr.contains("ping"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn deflate_without_context_takeover_is_negotiated_when_asked() {
    let dir = empty_dir("deflate");
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits";
    let upgrade = |addr: &str| {
        format!(
            "GET /connection/websocket HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{offer}\r\n\r\n"
        )
    };
    let head = |addr: String| async move {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(upgrade(&addr).as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the response head");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).to_lowercase()
    };
    // Off by default: no extension in the answer.
    let served = serve(&dir, &["--listen", "127.0.0.1:0"], &[]).await;
    let response = tokio::time::timeout(LIMIT, head(served.addr.clone()))
        .await
        .unwrap();
    assert!(response.starts_with("http/1.1 101"), "{response}");
    assert!(!response.contains("permessage-deflate"), "{response}");
    drop(served);
    let served = serve(
        &dir,
        &["--listen", "127.0.0.1:0", "--deflate-no-context-takeover"],
        &[],
    )
    .await;
    let response = tokio::time::timeout(LIMIT, head(served.addr.clone()))
        .await
        .unwrap();
    assert!(response.starts_with("http/1.1 101"), "{response}");
    for parameter in [
        "permessage-deflate",
        "server_no_context_takeover",
        "client_no_context_takeover",
    ] {
        assert!(response.contains(parameter), "{parameter}: {response}");
    }
}

#[tokio::test]
async fn serve_on_the_event_loop_serves_pages_the_api_and_websockets_on_one_port() {
    let dir = empty_dir("event-loop");
    let mut served = serve(
        &dir,
        &["--listen", "127.0.0.1:0", "--event-loop", "--threads", "2"],
        &[],
    )
    .await;
    let addr = served.addr.clone();
    let key = served.key.clone().expect("a generated API key is printed");
    // Handed over to tokio: pages, health, the API.
    let (status, page) = http(&addr, "GET", "/", &[], "").await;
    assert!(
        status == 200 && page.contains("demo chat"),
        "{status} {page}"
    );
    assert_eq!(
        http(&addr, "GET", "/health", &[], "").await,
        (200, "ok\n".into())
    );
    // WebSockets on the loop: subscribers on both threads get the push.
    let url = format!("ws://{addr}/connection/websocket");
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (mut ws, _) = tidewire::connect(&url).await.unwrap();
        ws.send_text(
            "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"chat:lobby\"}}",
        )
        .await
        .unwrap();
        assert!(next_json(&mut ws).await["connect"]["client"].is_string());
        assert_eq!(next_json(&mut ws).await["id"], 2);
        clients.push(ws);
    }
    let (status, ack) = api(
        &addr,
        &key,
        "publish",
        json!({"channel": "chat:lobby", "data": {"text": "hello"}}),
    )
    .await;
    assert_eq!((status, ack["offset"].clone()), (200, json!(1)));
    for ws in &mut clients {
        // Joins of the others (presence diffs) may come first.
        let publication = loop {
            let push = next_json(ws).await;
            if let Some(publication) = push["push"].get("pub") {
                break publication.clone();
            }
        };
        assert_eq!(publication["data"]["text"], "hello", "{publication}");
    }
    // SIGTERM: disconnect push (reconnect), close 1001, exit 0.
    let pid = served.child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap()
        .success());
    for ws in &mut clients {
        let disconnect = loop {
            let push = next_json(ws).await;
            if let Some(disconnect) = push["push"].get("disconnect") {
                break disconnect.clone();
            }
        };
        assert_eq!(disconnect["code"], 3001, "{disconnect}");
        let close = tokio::time::timeout(LIMIT, ws.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(close, Message::Close(Some(ref f)) if f.code.0 == 1001),
            "{close:?}"
        );
    }
    let exit = tokio::time::timeout(LIMIT, served.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn serve_keeps_websockets_on_tokio_with_tls_or_when_asked() {
    let dir = empty_dir("tokio");
    let served = serve(&dir, &["--listen", "127.0.0.1:0", "--tokio"], &[]).await;
    assert!(served.line.ends_with(", on tokio)"), "{}", served.line);
    let url = format!("ws://{}/connection/websocket", served.addr);
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    ws.send_text(r#"{"id":1,"connect":{}}"#).await.unwrap();
    assert!(next_json(&mut ws).await["connect"]["client"].is_string());
    // TLS without a choice: tokio (the event loop serves plain ws://).
    let tls = serve(&dir, &["--listen", "127.0.0.1:0", "--tls-self-signed"], &[]).await;
    assert!(
        tls.line.contains("listening on https://") && tls.line.ends_with(", on tokio)"),
        "{}",
        tls.line
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn serve_refuses_tls_on_the_event_loop() {
    let output = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--event-loop",
            "--tls-self-signed",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("plain ws://"), "{stderr}");
}
