//! `tidewire echo` and `tidewire connect`, as users run them.

mod common;

use std::process::Stdio;

use common::{run_connect, start_echo, LIMIT};
use tidewire::Message;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn echo_is_a_plain_echo_server_by_default() {
    let (_server, addr) = start_echo(&[]).await;
    let (mut ws, response) = tidewire::ClientBuilder::new(format!("ws://{addr}/"))
        .deflate(Some(Default::default()))
        .connect()
        .await
        .unwrap();
    // Compression is offered.
    assert!(response.headers().contains_key("sec-websocket-extensions"));
    ws.send_text("hi").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("hi"));
    ws.send_binary(vec![1u8, 2, 3]).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );
    ws.close(1000u16, "").await.unwrap();
}

#[tokio::test]
async fn echo_with_welcome_and_prefix_is_the_tutorial_server() {
    let (_server, addr) = start_echo(&[
        "--welcome",
        "Welcome to the WebSocket server!",
        "--prefix",
        "Echo: ",
    ])
    .await;
    let (mut ws, _) = tidewire::connect(&format!("ws://{addr}/")).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::text("Welcome to the WebSocket server!")
    );
    ws.send_text("Hello Server!").await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::text("Echo: Hello Server!")
    );
    // Like the tutorial's `ws.send(`Echo: ${message}`)`: a binary message is
    // answered with the prefix and its bytes as UTF-8, invalid ones as U+FFFD.
    ws.send_binary(b"bytes \xff!".to_vec()).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::text("Echo: bytes \u{FFFD}!")
    );
    ws.close(1000u16, "").await.unwrap();
}

#[tokio::test]
async fn echo_serves_its_page_and_health_over_plain_http() {
    let (_server, addr) = start_echo(&[]).await;
    for (path, status, needle) in [
        ("/", "200 OK", "new WebSocket("),
        ("/health", "200 OK", "ok"),
        ("/nope", "404 Not Found", "not found"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response)
            .await
            .unwrap();
        let response = String::from_utf8(response).unwrap();
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{path}: {response}"
        );
        assert!(response.contains(needle), "{path}: {response}");
    }
}

#[tokio::test]
async fn connect_sends_stdin_lines_and_prints_replies_and_the_close() {
    let (_server, addr) = start_echo(&["--prefix", "Echo: "]).await;
    let url = format!("ws://{addr}/");
    let output = run_connect(&[&url, "-H", "X-Test: 1"], b"first\nsecond line\n").await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("< Echo: first\n< Echo: second line\n"),
        "{stdout}"
    );
    assert!(stderr.contains("Disconnected (code: 1000"), "{stderr}");
}

#[tokio::test]
async fn connect_binary_mode_and_a_refused_connection() {
    let (_server, addr) = start_echo(&[]).await;
    let output = run_connect(&[&format!("ws://{addr}/"), "--binary"], b"AB\n").await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("< [binary, 2 bytes] 4142"), "{stdout}");

    // Nobody listens on port 1: a clear error and a failing exit status.
    let output = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["connect", "ws://127.0.0.1:1/"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("Connection refused"));
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully_with_1001() {
    let (mut server, addr) = start_echo(&[]).await;
    let (mut ws, _) = tidewire::connect(&format!("ws://{addr}/")).await.unwrap();
    ws.send_text("before").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("before"));
    let status = Command::new("kill")
        .args(["-TERM", &server.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let close = tokio::time::timeout(LIMIT, ws.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        close,
        Message::Close(Some(tidewire::CloseFrame::new(
            1001,
            "server shutting down"
        )))
    );
    let exit = tokio::time::timeout(LIMIT, server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let mut server = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["echo", "--port", "0", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(server.stdout.take().unwrap()).lines();
    tokio::time::timeout(LIMIT, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if line.contains("listening on") {
                return;
            }
        }
        panic!("tidewire echo exited before listening");
    })
    .await
    .unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &server.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let output = tokio::time::timeout(LIMIT, server.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // SIGTERM right after the "listening" line: the handler is already there.
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "INFO" && e["fields"]["message"] == "shutdown requested"),
        "{stderr}"
    );
}

/// Starts `tidewire ARGS...` (echo or serve) in an empty folder and returns
/// it with the address of its "listening on SCHEME://ADDR/" line.
async fn start_server(args: &[&str]) -> (tokio::process::Child, String) {
    let dir = std::env::temp_dir();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(args)
        .current_dir(&dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on ").nth(1) {
                let rest = rest.split("://").nth(1).unwrap();
                return rest.split('/').next().unwrap().to_string();
            }
        }
        panic!("{args:?} exited before listening");
    })
    .await
    .unwrap();
    (child, addr)
}

/// `tidewire ARGS...` run to its end.
async fn run(args: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        LIMIT,
        Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap()
}

/// The `[default: X]` shown for `flag` in a help text.
fn shown_default<'a>(help: &'a str, flag: &str) -> &'a str {
    let at = help
        .find(&format!("{flag} <"))
        .unwrap_or_else(|| panic!("{flag} not in\n{help}"));
    let rest = &help[at..];
    let rest = &rest[rest.find("[default: ").unwrap() + 10..];
    &rest[..rest.find(']').unwrap()]
}

#[tokio::test]
async fn help_shows_the_defaults_of_each_command() {
    let serve = run(&["serve", "--help"]).await;
    let echo = run(&["echo", "--help"]).await;
    assert!(serve.status.success() && echo.status.success());
    let (serve, echo) = (
        String::from_utf8(serve.stdout).unwrap(),
        String::from_utf8(echo.stdout).unwrap(),
    );
    for (flag, hub, plain) in [
        ("--listen", "127.0.0.1:8080", "127.0.0.1:9001"),
        ("--slow-consumer", "close", "wait"),
        ("--max-message-size", "65536", "67108864"),
        ("--max-connections", "20000", "10000"),
        ("--send-queue-bytes", "1048576", "4194304"),
    ] {
        assert_eq!(shown_default(&serve, flag), hub, "serve {flag}");
        assert_eq!(shown_default(&echo, flag), plain, "echo {flag}");
    }
    // serve bounds frames by --max-message-size: no flag that it ignores.
    assert!(echo.contains("--max-frame-size") && !serve.contains("--max-frame-size"));
    assert!(serve.contains("docs/configuration.md"));
}

#[tokio::test]
async fn echo_and_serve_take_the_same_address_flags() {
    // echo: --listen HOST:PORT as well as --host/--port (start_echo's --port 0).
    let (_echo, addr) = start_server(&["echo", "--listen", "127.0.0.1:0"]).await;
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let (mut ws, _) = tidewire::connect(&format!("ws://{addr}/")).await.unwrap();
    ws.send_text("hi").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("hi"));
    // serve: --host/--port as well as --listen (tests/serve.rs).
    let (_serve, addr) = start_server(&["serve", "--host", "127.0.0.1", "--port", "0"]).await;
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let url = format!("ws://{addr}/connection/websocket");
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    ws.send_text(r#"{"id":1,"connect":{}}"#).await.unwrap();
    let Message::Text(reply) = ws.recv().await.unwrap().unwrap() else {
        panic!("a text reply expected")
    };
    let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap();
    assert_eq!(reply["id"], 1, "{reply}");
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    // Both refuse a malformed address, and --listen with its parts, as
    // usage errors (exit status 2).
    for command in ["echo", "serve"] {
        for args in [
            &["--listen", "9001"][..],
            &["--listen", "127.0.0.1:1", "--port", "2"],
            &["--port", "65536"],
        ] {
            let argv: Vec<&str> = [command].iter().chain(args).copied().collect();
            let output = run(&argv).await;
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{argv:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{argv:?}: {stderr}");
        }
    }
}

#[tokio::test]
async fn durations_out_of_range_are_usage_errors() {
    for args in [
        &["echo", "--idle-timeout=-1"][..],
        &["echo", "--pong-timeout", "inf"],
        &["serve", "--shutdown-timeout", "1e30"],
        &["token", "--user", "1", "--secret", "s", "--ttl=-5"],
    ] {
        let output = run(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("not a duration"), "{args:?}: {stderr}");
    }
}
