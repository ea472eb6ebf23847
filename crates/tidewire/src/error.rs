//! The error type of the async layer.

use tidewire_proto::{HandshakeError, ProtocolError, UsageError};

/// Everything that can go wrong on a WebSocket connection.
///
/// A normal close is not an error: it arrives as
/// [`Message::Close`](crate::Message::Close).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The opening handshake failed (on a server, the error response has
    /// already been sent).
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    /// The peer broke the protocol; the connection was failed with the
    /// error's close code.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// This side misused the connection (e.g. sent after closing).
    #[error("{0}")]
    Usage(#[from] UsageError),
    /// The connection ended without a completed closing handshake: the
    /// transport closed first, or the peer did not answer a close in time.
    /// Browsers report this as close code 1006.
    #[error("connection closed abnormally (no closing handshake)")]
    AbnormalClosure,
    /// The peer showed no sign of life within the pong timeout after a
    /// keepalive ping; the connection was dropped.
    #[error("keepalive timeout: no answer to ping")]
    KeepaliveTimeout,
    /// The peer did not read what was sent to it: the output waiting for
    /// the transport reached the send queue's byte limit under the
    /// [`SlowConsumer::Close`](crate::SlowConsumer::Close) policy, and the
    /// connection was closed with this code.
    #[error(
        "slow consumer: output not read by the peer reached the send queue limit; closed with {0}"
    )]
    SlowConsumer(tidewire_proto::CloseCode),
    /// The opening handshake did not complete within its deadline.
    #[error("handshake timed out")]
    HandshakeTimeout,
}

impl Error {
    /// Whether this error means the peer went away rather than a bug or a
    /// protocol violation (useful to keep logs quiet).
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::AbnormalClosure | Error::KeepaliveTimeout => true,
            Error::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}
