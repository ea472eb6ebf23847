//! Headless Chromium runs the tutorial's browser page against
//! `tidewire echo` (the page is served by the echo server itself).

mod common;

use common::{artifacts, repo_root, start_echo, LIMIT};
use tokio::process::Command;

#[tokio::test]
async fn chromium_runs_the_tutorial_page_against_tidewire_echo() {
    let (_server, addr) = start_echo(&[
        "--welcome",
        "Welcome to the WebSocket server!",
        "--prefix",
        "Echo: ",
    ])
    .await;
    let root = repo_root();
    let artifacts = artifacts();
    let screenshot = artifacts.join("echo-page.png");
    let node = std::env::var_os("TIDEWIRE_NODE").unwrap_or_else(|| "node".into());
    let output = tokio::time::timeout(
        LIMIT * 2,
        Command::new(node)
            .arg(root.join("tests/interop/browser_echo.js"))
            .arg(format!("http://{addr}/"))
            // The page logs the welcome, then the echo of its greeting.
            .arg("Message from server: Echo: Hello Server!")
            .arg(&screenshot)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("browser test timed out")
    .expect("cannot run node (run scripts/install-deps)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("RESULT: PASS"));
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 1000);
}
