//! Errors of the protocol core, split by who is at fault.
//!
//! [`ProtocolError`]: the peer broke RFC 6455/7692 or a configured limit; each
//! variant maps to the close code sent before the connection is failed.
//! [`UsageError`]: the local application misused the API (sending after
//! close, an invalid close code, an oversized control payload).

use crate::close::CloseCode;

/// The peer violated the protocol or a limit. The connection is failed with
/// [`close_code`](Self::close_code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A reserved bit was set that no negotiated extension defines.
    #[error("reserved bits set in frame header: {0:#05b}")]
    ReservedBits(u8),
    /// An opcode reserved for future use (3-7, 0xB-0xF).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A client sent an unmasked frame.
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// A server sent a masked frame.
    #[error("server frame is masked")]
    MaskedFrame,
    /// A control frame had FIN clear.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A control frame carried more than 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlFrameTooLong(u64),
    /// A 64-bit payload length had its most significant bit set.
    #[error("payload length has the most significant bit set")]
    InvalidLength,
    /// A continuation frame arrived with no message in progress.
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A new data frame arrived while a fragmented message was in progress.
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// A close frame payload of exactly one byte.
    #[error("close frame payload of one byte")]
    CloseFrameTooShort,
    /// A close frame with a code that may not be sent on the wire.
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// A text message or close reason that is not UTF-8.
    #[error("invalid UTF-8 in text message or close reason")]
    InvalidUtf8,
    /// A frame longer than the configured frame size limit.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    FrameTooBig {
        /// Announced payload length.
        size: u64,
        /// Configured limit.
        limit: usize,
    },
    /// A message (after decompression) longer than the configured limit.
    #[error("message exceeds the limit of {limit} bytes")]
    MessageTooBig {
        /// Configured limit.
        limit: usize,
    },
    /// The compressed payload of a permessage-deflate message is corrupt.
    #[error("invalid compressed data: {0}")]
    InvalidCompressedData(String),
    /// Bytes arrived after the peer's close frame.
    #[error("data received after the close frame")]
    DataAfterClose,
}

impl ProtocolError {
    /// The close code to send when failing the connection for this error.
    pub fn close_code(&self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            ProtocolError::FrameTooBig { .. } | ProtocolError::MessageTooBig { .. } => {
                CloseCode::MESSAGE_TOO_BIG
            }
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// The local application used the connection in a way the protocol forbids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// A close frame has already been sent; nothing more may be sent.
    #[error("the connection is closing or closed")]
    Closed,
    /// Control frame payloads are limited to 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlPayloadTooLong(usize),
    /// Close reasons are limited to 123 bytes.
    #[error("close reason of {0} bytes exceeds 123")]
    CloseReasonTooLong(usize),
    /// The close code may not be sent (1005, 1006, 1015, unassigned ranges).
    #[error("close code {0} may not be sent")]
    InvalidCloseCode(u16),
    /// A continuation fragment with no fragmented message started, or a new
    /// message while one is still being sent in fragments.
    #[error("fragment out of order: {0}")]
    FragmentOrder(&'static str),
}
