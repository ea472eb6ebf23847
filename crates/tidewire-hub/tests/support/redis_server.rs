//! A redis-server of a test's own on a free loopback port, stopped by PID
//! when dropped. A missing redis-server is a failure, not a skip
//! (scripts/install-deps installs it). Shared by the hub's Redis engine
//! tests and the CLI's cluster tests (`#[path]`).

use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
}

/// What a redis-server keeps of its data across a restart.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(dead_code)]
pub enum Persistence {
    /// Nothing: a restart starts empty.
    None,
    /// The snapshot a `SAVE` wrote last (what came after is lost).
    Snapshot,
    /// Every write (append-only file, fsync every second).
    AppendOnly,
}

#[allow(dead_code)] // not every test that includes it uses every part
impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RedisServer::on(port)
    }

    /// On `port` (again, after [`stop`](Self::stop): a restart).
    pub fn on(port: u16) -> RedisServer {
        RedisServer::keeping(port, Persistence::None, &std::env::temp_dir())
    }

    /// On `port`, keeping its data in `dir` as `persistence` says (the
    /// same `dir` again after [`stop`](Self::stop): a restart with it).
    pub fn keeping(port: u16, persistence: Persistence, dir: &std::path::Path) -> RedisServer {
        let aof = if persistence == Persistence::AppendOnly {
            "yes"
        } else {
            "no"
        };
        let mut command = std::process::Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", aof, "--protected-mode", "no"]);
        if persistence != Persistence::None {
            command.arg("--dir").arg(dir);
        }
        if persistence == Persistence::AppendOnly {
            // Every write on disk before its reply: with `everysec`, a
            // busy disk makes Redis answer writes it has not written yet
            // (it postpones the write while an fsync is pending), and a
            // SIGKILL then loses acknowledged publications.
            command.args(["--appendfsync", "always"]);
        }
        let child = command
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/install-deps installs it)");
        // Stopped by its drop should it never listen.
        let server = RedisServer { port, child };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("redis-server did not listen on {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A temporary directory of the test's own for [`keeping`](Self::keeping).
    pub fn data_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tidewire-redis-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Killed (SIGKILL): what it did not persist is lost.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
