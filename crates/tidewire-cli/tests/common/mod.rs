//! Starting the `tidewire` binary in tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

/// The repository root (where tests/interop lives).
pub fn repo_root() -> PathBuf {
    std::env::var_os("TIDEWIRE_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Where tests leave screenshots and such.
pub fn artifacts() -> PathBuf {
    std::env::var_os("TIDEWIRE_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("test-artifacts"))
}

/// Runs `tidewire connect ARGS...` with `input` on stdin (then EOF).
pub async fn run_connect(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .arg("connect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidewire connect");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin); // EOF: the client closes with 1000
    tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("tidewire connect did not finish")
        .unwrap()
}

/// Runs `tidewire bench ARGS...` (with `--json` among them), checks that it
/// succeeded and returns its report.
pub async fn run_bench(args: &[&str]) -> serde_json::Value {
    let output = tokio::time::timeout(
        LIMIT,
        Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .arg("bench")
            .args(args)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A folder a test makes for itself in the temporary directory
/// (`tidewire-NAME-PID`, emptied first): removed when dropped, unless the
/// test is failing, so that its logs stay to be read.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("tidewire-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch folder");
        ScratchDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A `tidewire serve` started by [`start_serve`].
pub struct Served {
    pub child: Child,
    /// `127.0.0.1:PORT`, read from the line it prints when listening.
    pub addr: String,
    /// Where its stderr (the log) goes.
    pub log: PathBuf,
    /// The folder it runs in, when it is the node's own: removed after
    /// the process (fields drop in order).
    pub scratch: Option<ScratchDir>,
}

/// Starts `tidewire serve ARGS...` in `dir` (an empty folder runs on the
/// embedded defaults) with `env` added and `RUST_LOG=warn`; its log goes to
/// `dir/<log_name>`. The process is killed when the [`Served`] is dropped.
pub async fn start_serve(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    log_name: &str,
) -> Served {
    let log = dir.join(log_name);
    let mut command = Command::new(env!("CARGO_BIN_EXE_tidewire"));
    command
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("TIDEWIRE_API_KEY")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("create the log file"))
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("start tidewire serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // "tidewire serve listening on http://ADDR/ (WebSocket: ...)"
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return rest.split('/').next().unwrap().to_string();
            }
        }
        panic!(
            "tidewire serve exited before listening: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    })
    .await
    .expect("tidewire serve did not start in time");
    Served {
        child,
        addr,
        log,
        scratch: None,
    }
}
