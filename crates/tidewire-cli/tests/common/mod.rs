//! Starting the `tidewire` binary in tests.

#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const LIMIT: Duration = Duration::from_secs(60);

/// Starts `tidewire echo --port 0 ARGS...` and returns it with its address
/// (`127.0.0.1:PORT`), read from the line it prints when listening.
pub async fn start_echo(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["echo", "--port", "0"])
        .env("RUST_LOG", "warn")
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidewire echo");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // "tidewire echo listening on ws://ADDR/ ..." (or wss://)
            if let Some(rest) = line
                .split("listening on ")
                .nth(1)
                .and_then(|r| r.split("://").nth(1))
            {
                return rest.split('/').next().unwrap().to_string();
            }
        }
        panic!("tidewire echo exited before listening");
    })
    .await
    .expect("tidewire echo did not start in time");
    (child, addr)
}
