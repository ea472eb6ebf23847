//! A nats-server of a test's own on a free loopback port, stopped by PID
//! when dropped. A missing nats-server is a failure, not a skip
//! (scripts/install-deps installs it). Shared by the hub's engine tests
//! and the CLI's cluster tests (`#[path]`).

use std::time::Duration;

pub struct NatsServer {
    pub port: u16,
    child: std::process::Child,
}

#[allow(dead_code)] // not every test that includes it uses every part
impl NatsServer {
    pub fn start() -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        NatsServer::on(port)
    }

    /// On `port` (again, after [`stop`](Self::stop): a restart).
    pub fn on(port: u16) -> NatsServer {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (scripts/install-deps installs it)");
        let server = NatsServer { port, child };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("nats-server did not listen on {port}");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Killed (SIGKILL).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
