//! How `tidewire serve` and `tidewire echo` open their port and size
//! themselves for many connections: a listen backlog that takes a burst of
//! simultaneous connects (every client of a restarted server reconnecting
//! at once), and the open-file limit raised to what the system allows.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tracing::{info, warn};

/// Connections the kernel completes and queues before the server accepts
/// them. The standard library's (and tokio's) 128 overflows when thousands
/// of clients connect at once: the kernel then drops their SYNs and each
/// retries a second later, and again, so a burst takes seconds to get in.
/// The kernel caps the value at `net.core.somaxconn` (4096 on Linux 5.4
/// and later).
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// Listens on `address` (`HOST:PORT`; a name is resolved, and its
/// addresses are tried in order) with [`LISTEN_BACKLOG`].
pub(crate) async fn bind_listener(address: &str) -> anyhow::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("listen address {address:?}"))?
    {
        match listen_on(addr, LISTEN_BACKLOG) {
            Ok(listener) => return Ok(listener),
            Err(e) => {
                last_error = Some(anyhow::Error::new(e).context(format!("listening on {addr}")))
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("listen address {address:?} resolves to nothing")))
}

/// A listener on `addr` with the given backlog.
fn listen_on(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As TcpListener::bind does: a restarted server gets its port back while
    // the previous one's connections linger in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Raises this process's open-file soft limit to its hard limit: every
/// connection is a file, and the usual soft limit (1024) is far below what
/// a server is configured to hold. Returns the limit now in force (`None`
/// where it cannot be read or raised; a warning says why).
pub(crate) fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            info!(limit, "open-file limit");
            Some(limit)
        }
        Err(e) => {
            warn!(error = %e, "could not raise the open-file limit");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A burst of connects against a server that has not accepted any yet
    /// all get in at once. Past a full backlog the kernel drops the SYN and
    /// the client retries only after a second, which this measures.
    #[tokio::test]
    async fn a_burst_of_connects_fits_in_the_backlog() {
        rlimit::increase_nofile_limit(u64::MAX).unwrap();
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(LISTEN_BACKLOG);
        // The kernel holds backlog + 1 completed connections.
        let burst = LISTEN_BACKLOG.min(somaxconn).min(2000) as usize;
        assert!(burst > 128, "net.core.somaxconn is {somaxconn}");
        let listener = bind_listener("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..burst).map(|_| async move {
            let started = Instant::now();
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            (stream, started.elapsed())
        });
        // Nothing is accepted: a connect past the backlog never gets in.
        let results = tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::future::join_all(connects),
        )
        .await
        .unwrap_or_else(|_| panic!("{burst} connects did not fit in the backlog"));
        let slowest = results.iter().map(|(_, took)| *took).max().unwrap();
        // A dropped SYN is retried after 1 s: no connect may have waited.
        assert!(
            slowest < Duration::from_millis(900),
            "the slowest of {burst} connects took {slowest:?}: SYNs were dropped"
        );
        drop(listener);
    }

    #[tokio::test]
    async fn the_port_of_a_stopped_server_can_be_taken_again() {
        let listener = bind_listener("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A connection closed by the server first leaves it in TIME_WAIT.
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        drop(accepted);
        drop(listener);
        drop(client);
        let again = bind_listener(&addr.to_string()).await.unwrap();
        assert_eq!(again.local_addr().unwrap(), addr);
    }
}
