//! A redis-server of a test's own on a free loopback port, stopped by PID
//! when dropped. A missing redis-server is a failure, not a skip
//! (scripts/install-deps installs it). Shared by the hub's Redis engine
//! tests and the CLI's cluster tests (`#[path]`).

use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
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
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
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
