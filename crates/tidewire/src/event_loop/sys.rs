//! The event loop's socket reads and writes.
//!
//! On Linux they are the `recv(2)` and `send(2)` system calls themselves
//! (rustix's raw system calls): the C library's wrappers are cancellation
//! points, and switching the thread's cancellation state in and out around
//! each call costs about a tenth of what the loop itself does for a small
//! message (measured with callgrind on a 16-byte echo). Elsewhere they are
//! the standard library's `read` and `write`.

use std::io;

use mio::net::TcpStream;

/// Reads what the socket has, up to `buf.len()` bytes (`Ok(0)`: the peer
/// closed its end).
#[cfg(target_os = "linux")]
pub(super) fn recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let (read, _) = rustix::net::recv(stream, buf, rustix::net::RecvFlags::empty())?;
    Ok(read)
}

/// Writes as much of `buf` as the socket takes; a peer that went away is an
/// error, never a `SIGPIPE`.
#[cfg(target_os = "linux")]
pub(super) fn send(stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        stream,
        buf,
        rustix::net::SendFlags::NOSIGNAL,
    )?)
}

#[cfg(not(target_os = "linux"))]
pub(super) fn recv(mut stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    io::Read::read(&mut stream, buf)
}

#[cfg(not(target_os = "linux"))]
pub(super) fn send(mut stream: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    io::Write::write(&mut stream, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes go through both ways, a closed peer reads as 0, and writing to
    /// it fails with an error (no signal ends the test process).
    #[test]
    fn recv_and_send_on_a_socket_pair() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let client = TcpStream::from_std(client);
        let server = TcpStream::from_std(server);
        assert_eq!(send(&client, b"hello").unwrap(), 5);
        let mut buf = [0u8; 16];
        // Blocking sockets here (from_std keeps the mode): the read waits.
        assert_eq!(recv(&server, &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        drop(client);
        assert_eq!(recv(&server, &mut buf).unwrap(), 0);
        let mut failed = false;
        for _ in 0..100 {
            if send(&server, b"x").is_err() {
                failed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            failed,
            "a send to a closed peer fails (EPIPE or ECONNRESET)"
        );
    }

    #[test]
    fn would_block_is_reported_as_such() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let server = TcpStream::from_std(server);
        let mut buf = [0u8; 16];
        let err = recv(&server, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(client);
    }
}
