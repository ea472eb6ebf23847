//! `tidewire echo --tls-self-signed` with independent wss:// clients:
//! Python `websockets` (trusting the generated certificate), headless
//! Chromium, and `tidewire connect --ca-file`.

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::{artifacts, repo_root, run_connect, start_echo, LIMIT};
use tokio::process::Command;

/// Where `--tls-self-signed` writes its certificate for a port.
fn cert_path(addr: &str) -> PathBuf {
    let port = addr.rsplit(':').next().unwrap();
    std::env::temp_dir().join(format!("tidewire-self-signed-{port}.pem"))
}

#[tokio::test]
async fn python_websockets_over_wss_trusting_the_generated_certificate() {
    let (_server, addr) = start_echo(&["--tls-self-signed"]).await;
    let python = std::env::var_os("TIDEWIRE_PYTHON")
        .unwrap_or_else(|| repo_root().join(".venv/bin/python").into());
    let output = tokio::time::timeout(
        LIMIT,
        Command::new(python)
            .arg(repo_root().join("tests/interop/py_client.py"))
            .arg(format!(
                "wss://localhost:{}/",
                addr.rsplit(':').next().unwrap()
            ))
            .arg("--require-deflate")
            .arg("--ca-file")
            .arg(cert_path(&addr))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .expect("run .venv/bin/python (scripts/install-deps)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("RESULT: PASS"), "{stdout}");
}

#[tokio::test]
async fn chromium_runs_the_page_over_https_and_wss() {
    let (_server, addr) = start_echo(&["--tls-self-signed", "--prefix", "Echo: "]).await;
    let root = repo_root();
    let artifacts = artifacts();
    let node = std::env::var_os("TIDEWIRE_NODE").unwrap_or_else(|| "node".into());
    let output = tokio::time::timeout(
        LIMIT * 2,
        Command::new(node)
            .arg(root.join("tests/interop/browser_echo.js"))
            .arg(format!("https://{addr}/"))
            .arg("Message from server: Echo: Hello Server!")
            .arg(artifacts.join("echo-page-wss.png"))
            .arg("--ignore-https-errors")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .expect("run node (scripts/install-deps)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("page websocket: wss://"), "{stdout}");
}

#[tokio::test]
async fn tidewire_connect_with_ca_file_and_insecure() {
    let (_server, addr) = start_echo(&["--tls-self-signed", "--prefix", "Echo: "]).await;
    let port = addr.rsplit(':').next().unwrap().to_string();
    for trust in [
        vec![
            "--ca-file".to_string(),
            cert_path(&addr).display().to_string(),
        ],
        vec!["--insecure".to_string()],
    ] {
        let url = format!("wss://localhost:{port}/");
        let mut args = vec![url.as_str()];
        args.extend(trust.iter().map(String::as_str));
        let output = run_connect(&args, b"secure hello\n").await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{trust:?}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("< Echo: secure hello"), "{stdout}");
    }
    // Without trusting it, the certificate is refused.
    let output = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["connect", &format!("wss://localhost:{port}/")])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr)
        .to_lowercase()
        .contains("certificate"));
}
