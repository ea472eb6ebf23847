//! A TCP proxy in front of Redis that can stop forwarding what Redis
//! sends to its PUB/SUB connections (those whose client sent a
//! SUBSCRIBE), keeping them open and dropping what would have gone
//! through: alive, delivering nothing. (Other connections are never
//! touched: dropping bytes of a command connection would pair replies
//! with the wrong requests, which no network does.) Shared by the hub's Redis engine
//! tests and the CLI's cluster tests (`#[path]`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct StallingProxy {
    pub port: u16,
    pub stalled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    pub async fn start(redis_port: u16) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let stall = stalled.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let subscriber = Arc::new(AtomicBool::new(false));
                let marks = subscriber.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        // The command itself (a bulk string of its own), not
                        // the word inside a script or a payload.
                        let text = String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase();
                        if text.contains("\r\nSUBSCRIBE\r\n") || text.contains("\r\nSSUBSCRIBE\r\n")
                        {
                            marks.store(true, Ordering::SeqCst);
                        }
                    }
                });
                let stall = stall.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = server_read.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        if stall.load(Ordering::SeqCst) && subscriber.load(Ordering::SeqCst) {
                            continue;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        StallingProxy {
            port,
            stalled,
            task,
        }
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(dead_code)] // not every test that includes it uses every part
impl StallingProxy {
    /// Stops (or resumes) forwarding to the PUB/SUB connections.
    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }
}
