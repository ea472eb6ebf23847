//! The client protocol, apart from any encoding: the commands a client
//! sends, the replies and pushes it gets, and the one table of error and
//! disconnect codes. A [`Codec`] turns messages into commands and replies
//! and pushes into [`Frame`]s; [`json`] is version 1 (JSON text, the
//! WebSocket subprotocol `tidewire.v1.json`), the only codec today.
//! `docs/protocol.md` is the reference; the examples there are checked by
//! the tests of [`json`].
//!
//! Publication payloads are bytes ([`Payload`]): the core and the engines
//! carry them without reading them, so that they can travel through a
//! broker and come back; a codec writes them into its frames as they are.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub mod json;

pub use json::{parse_batch, parse_command, split_batch, JsonCodec, JSON, SUBPROTOCOL};

/// The protocol version, sent in the connect reply.
pub const VERSION: u32 = 1;

/// An encoded message to a client, shared (the same bytes go to every
/// subscriber of a channel that uses the same codec): what a front writes
/// as one message (a WebSocket message, an SSE event...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Text (UTF-8, checked once when encoded).
    Text(tidewire::Utf8Text),
    /// Binary.
    Binary(Bytes),
}

impl Frame {
    /// The text of a text frame.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Frame::Text(text) => Some(text.as_str()),
            Frame::Binary(_) => None,
        }
    }

    /// The bytes, text or not.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Frame::Text(text) => text.as_bytes(),
            Frame::Binary(bytes) => bytes,
        }
    }

    /// A text frame of a static string.
    pub const fn from_static(text: &'static str) -> Frame {
        Frame::Text(tidewire::Utf8Text::from_static(text))
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::Text(text.into())
    }
}

/// A message from a client, as its front read it.
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'a> {
    /// A text message.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

/// The commands of one message, each parsed as the iterator advances.
pub type Batch<'a> = Box<dyn Iterator<Item = BatchItem> + Send + 'a>;

/// One encoding of the protocol: commands in, replies and pushes out. A
/// front names its codec in its [`Transport`](crate::node::Transport);
/// the fan-out encodes a push once per codec among a channel's
/// subscribers, not once per subscriber.
pub trait Codec: Send + Sync + 'static {
    /// Its name (`json`); two codecs with one name are the same codec.
    fn name(&self) -> &'static str;
    /// The commands of a message, at most `max_batch` of them run (the
    /// rest are [`BatchItem::Refused`]); a message the codec cannot take at
    /// all (binary for a text codec) is an error for one error reply.
    ///
    /// # Errors
    /// The reply to send instead of running anything.
    fn decode_batch<'a>(
        &self,
        message: Incoming<'a>,
        max_batch: usize,
    ) -> Result<Batch<'a>, ErrorReply>;
    /// The reply to the command with `id`.
    fn encode_reply(&self, id: u64, reply: &Reply) -> Frame;
    /// An error reply to the command with `id` (0: its id could not be read).
    fn encode_error(&self, id: u64, error: &ErrorReply) -> Frame;
    /// A push.
    fn encode_push(&self, push: &Push<'_>) -> Frame;
}

/// A push encoded at most once per codec: the fan-out asks it for the
/// frame of each subscriber's codec.
pub struct EncodedPush<'a> {
    push: Push<'a>,
    /// Almost always one codec: a short list beats a map.
    frames: Vec<(&'static str, Frame)>,
}

impl<'a> EncodedPush<'a> {
    /// Nothing encoded yet.
    pub fn new(push: Push<'a>) -> EncodedPush<'a> {
        EncodedPush {
            push,
            frames: Vec::with_capacity(1),
        }
    }

    /// The push in `codec`'s encoding (encoded on first use).
    pub fn frame(&mut self, codec: &dyn Codec) -> &Frame {
        let name = codec.name();
        let at = match self.frames.iter().position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                self.frames.push((name, codec.encode_push(&self.push)));
                self.frames.len() - 1
            }
        };
        &self.frames[at].1
    }
}

/// Stable error codes of replies (and of the HTTP API). Never renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 100: a fault of the server.
    Internal,
    /// 101: malformed JSON, a missing or mistyped field.
    BadRequest,
    /// 102: the command (or API method) does not exist.
    UnknownCommand,
    /// 103: the command needs a `connect` first.
    NotConnected,
    /// 104: `connect` was already done on this connection.
    AlreadyConnected,
    /// 105: the token is invalid, or a token is required.
    Unauthorized,
    /// 106: the token has expired.
    TokenExpired,
    /// 107: not allowed by the channel's rules.
    PermissionDenied,
    /// 108: the channel's namespace is not configured.
    UnknownNamespace,
    /// 109: the channel name is empty, too long or has control characters.
    InvalidChannel,
    /// 110: already subscribed to the channel.
    AlreadySubscribed,
    /// 111: not subscribed to the channel.
    NotSubscribed,
    /// 112: the feature (presence, history) is off for the namespace.
    NotAvailable,
    /// 113: a limit was exceeded (subscriptions, batch size).
    LimitExceeded,
    /// 114: the engine or the application backend failed; retry later.
    Unavailable,
    /// 115: a history position from another epoch (the stream was reset).
    StalePosition,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::Internal,
        ErrorCode::BadRequest,
        ErrorCode::UnknownCommand,
        ErrorCode::NotConnected,
        ErrorCode::AlreadyConnected,
        ErrorCode::Unauthorized,
        ErrorCode::TokenExpired,
        ErrorCode::PermissionDenied,
        ErrorCode::UnknownNamespace,
        ErrorCode::InvalidChannel,
        ErrorCode::AlreadySubscribed,
        ErrorCode::NotSubscribed,
        ErrorCode::NotAvailable,
        ErrorCode::LimitExceeded,
        ErrorCode::Unavailable,
        ErrorCode::StalePosition,
    ];

    /// The number on the wire.
    /// The code of a number, if it is one.
    pub fn from_number(number: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.number() == number)
    }

    /// Its number on the wire.
    pub fn number(self) -> u16 {
        match self {
            ErrorCode::Internal => 100,
            ErrorCode::BadRequest => 101,
            ErrorCode::UnknownCommand => 102,
            ErrorCode::NotConnected => 103,
            ErrorCode::AlreadyConnected => 104,
            ErrorCode::Unauthorized => 105,
            ErrorCode::TokenExpired => 106,
            ErrorCode::PermissionDenied => 107,
            ErrorCode::UnknownNamespace => 108,
            ErrorCode::InvalidChannel => 109,
            ErrorCode::AlreadySubscribed => 110,
            ErrorCode::NotSubscribed => 111,
            ErrorCode::NotAvailable => 112,
            ErrorCode::LimitExceeded => 113,
            ErrorCode::Unavailable => 114,
            ErrorCode::StalePosition => 115,
        }
    }

    /// A short name, for metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Internal => "internal",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::NotConnected => "not_connected",
            ErrorCode::AlreadyConnected => "already_connected",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::UnknownNamespace => "unknown_namespace",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::NotAvailable => "not_available",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::StalePosition => "stale_position",
        }
    }

    /// The HTTP status of this error in the HTTP API.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ErrorCode::Internal => S::INTERNAL_SERVER_ERROR,
            ErrorCode::UnknownCommand => S::NOT_FOUND,
            ErrorCode::Unauthorized | ErrorCode::TokenExpired | ErrorCode::NotConnected => {
                S::UNAUTHORIZED
            }
            ErrorCode::PermissionDenied => S::FORBIDDEN,
            ErrorCode::LimitExceeded => S::PAYLOAD_TOO_LARGE,
            ErrorCode::Unavailable => S::SERVICE_UNAVAILABLE,
            _ => S::BAD_REQUEST,
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.number())
    }
}

/// An error reply: a code from the table and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message} (code {code:?})")]
pub struct ErrorReply {
    /// The stable code.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

impl ErrorReply {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            code,
            message: message.into(),
        }
    }
}

/// Codes of the `disconnect` push; the WebSocket close frame that follows
/// carries the same code (except on shutdown, which closes with 1001).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectCode {
    /// 3000: disconnected by the server (HTTP API `disconnect`).
    Server,
    /// 3001: the server is shutting down; reconnect (to another node).
    Shutdown,
    /// 3002: no successful `connect` within the connect timeout.
    ConnectTimeout,
    /// 3003: the connection token expired and was not refreshed.
    TokenExpired,
    /// 3004: refused by the application backend (connect proxy).
    Refused,
    /// 3005: this node cannot reach its engine (for longer than
    /// `server.unhealthy_grace`); reconnect (to another node).
    Unhealthy,
}

impl DisconnectCode {
    /// The number on the wire (also the WebSocket close code).
    pub fn number(self) -> u16 {
        match self {
            DisconnectCode::Server => 3000,
            DisconnectCode::Shutdown => 3001,
            DisconnectCode::ConnectTimeout => 3002,
            DisconnectCode::TokenExpired => 3003,
            DisconnectCode::Refused => 3004,
            DisconnectCode::Unhealthy => 3005,
        }
    }

    /// Whether a client should reconnect after it.
    pub fn reconnect(self) -> bool {
        !matches!(self, DisconnectCode::Server | DisconnectCode::Refused)
    }
}

/// A disconnect: what the push says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disconnect {
    /// The code (3000–4999).
    pub code: u16,
    /// Why, for people.
    pub reason: String,
    /// Whether the client should reconnect.
    pub reconnect: bool,
}

impl Disconnect {
    /// A disconnect with one of the protocol's codes and its reconnect advice.
    pub fn new(code: DisconnectCode, reason: impl Into<String>) -> Disconnect {
        Disconnect {
            code: code.number(),
            reason: reason.into(),
            reconnect: code.reconnect(),
        }
    }
}

/// A position in a channel's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// The offset of the last publication seen.
    pub offset: u64,
    /// The epoch of the stream the offset belongs to.
    pub epoch: String,
}

/// A parsed command.
#[derive(Debug)]
pub struct Command {
    /// The id the reply echoes (0 when the client sent none: no reply
    /// is expected, but errors are still reported).
    pub id: u64,
    /// The command.
    pub request: Request,
}

/// The commands of the protocol.
#[derive(Debug)]
#[non_exhaustive]
pub enum Request {
    /// Authenticate (or connect anonymously).
    Connect(ConnectRequest),
    /// Subscribe to a channel.
    Subscribe(SubscribeRequest),
    /// Unsubscribe from a channel.
    Unsubscribe(ChannelRequest),
    /// Publish to a channel.
    Publish(PublishRequest),
    /// Who is in a channel.
    Presence(ChannelRequest),
    /// How many are in a channel.
    PresenceStats(ChannelRequest),
    /// A channel's history.
    History(HistoryRequest),
    /// A new connection token.
    Refresh(RefreshRequest),
    /// Round trip.
    Ping,
}

impl Request {
    /// The command's name on the wire (also the reply's key).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Connect(_) => "connect",
            Request::Subscribe(_) => "subscribe",
            Request::Unsubscribe(_) => "unsubscribe",
            Request::Publish(_) => "publish",
            Request::Presence(_) => "presence",
            Request::PresenceStats(_) => "presence_stats",
            Request::History(_) => "history",
            Request::Refresh(_) => "refresh",
            Request::Ping => "ping",
        }
    }
}

/// `connect`.
#[derive(Debug, Default)]
pub struct ConnectRequest {
    /// A connection token (JWT); none for anonymous.
    pub token: Option<String>,
    /// Anything, handed to the connect proxy.
    pub data: Option<Box<RawValue>>,
}

/// `subscribe`.
#[derive(Debug)]
pub struct SubscribeRequest {
    /// The channel.
    pub channel: String,
    /// Recover what was missed since `offset` in `epoch`.
    pub recover: bool,
    /// The last offset seen (with `recover`).
    pub offset: Option<u64>,
    /// The epoch of that offset (with `recover`).
    pub epoch: Option<String>,
    /// A subscription token for the channel.
    pub token: Option<String>,
}

/// A command (or API call) that names just a channel.
#[derive(Debug)]
pub struct ChannelRequest {
    /// The channel.
    pub channel: String,
}

/// `publish` (a command, and the HTTP API's `publish`).
#[derive(Debug)]
pub struct PublishRequest {
    /// The channel.
    pub channel: String,
    /// The payload (a JSON value's text).
    pub data: Box<RawValue>,
}

/// `history` (a command, and the HTTP API's `history`).
#[derive(Debug)]
pub struct HistoryRequest {
    /// The channel.
    pub channel: String,
    /// Most publications returned (default and cap: the server's
    /// `max_history_limit`); 0 returns only the current position.
    pub limit: Option<usize>,
    /// Only publications after this position (forward), or before it
    /// (with `reverse`). Without it, `limit` counts from the newest end.
    pub since: Option<Position>,
    /// Newest first.
    pub reverse: bool,
}

/// `refresh`.
#[derive(Debug)]
pub struct RefreshRequest {
    /// The new connection token.
    pub token: String,
}

/// Why a message could not be taken as commands. `id` is the command's id
/// when it could be read, so the error reply can echo it.
#[derive(Debug)]
pub struct ParseError {
    /// The id, if known.
    pub id: u64,
    /// The error reply.
    pub error: ErrorReply,
}

/// The commands, as named on the wire.
pub const COMMANDS: [&str; 9] = [
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "refresh",
    "ping",
];

/// One command line of a message, as the session must take it.
#[derive(Debug)]
pub enum BatchItem {
    /// Within `client.max_batch`: the parsed command, or why it is not one.
    Command(Result<Command, ParseError>),
    /// Past `client.max_batch`: not run. `id` is what a full parse would
    /// echo (0: none); nothing else of the line is kept.
    Refused {
        /// The command's id, 0 when it has none (or it cannot be read).
        id: u64,
        /// The command's place in the message, from 1.
        number: usize,
    },
}

/// The error reply of a command refused for being past `client.max_batch`.
pub fn batch_limit_error(max_batch: usize, number: usize) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::LimitExceeded,
        format!("not run: at most {max_batch} commands in one message, this was command {number}"),
    )
}

/// The one error reply (without id) for all the refused commands of a
/// message that had no id.
pub fn batch_limit_error_without_id(max_batch: usize, count: usize) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::LimitExceeded,
        format!(
            "{count} command(s) without an id not run: at most {max_batch} commands in one message"
        ),
    )
}

/// Who published or joined: the client, its user, and the `info` of its
/// connection token (or of the connect proxy).
#[derive(Debug, Clone, Serialize)]
pub struct ClientInfo {
    /// The client id.
    pub client: String,
    /// The user id ("" for anonymous).
    pub user: String,
    /// Application data about the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
}

/// Equal when the ids are and the connection infos are the same text.
impl PartialEq for ClientInfo {
    fn eq(&self, other: &ClientInfo) -> bool {
        self.client == other.client
            && self.user == other.user
            && self.info.as_ref().map(|i| i.get()) == other.info.as_ref().map(|i| i.get())
    }
}

/// A publication's payload: bytes the core and the engines carry without
/// reading them. From a JSON v1 client or the HTTP API it is a JSON text
/// (checked on the way in), and JSON encoders write it as it is.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(Bytes);

impl Payload {
    /// A JSON value's text.
    pub fn from_json(value: Box<RawValue>) -> Payload {
        let text: Box<str> = value.into();
        Payload(Bytes::from(text.into_boxed_bytes()))
    }

    /// Bytes as stored or carried by an engine (what it was given).
    pub fn from_bytes(bytes: Bytes) -> Payload {
        Payload(bytes)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, shared.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// The payload as a JSON value, when it is one.
    pub fn as_json(&self) -> Option<&RawValue> {
        serde_json::from_slice(&self.0).ok()
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) => write!(f, "Payload({text})"),
            Err(_) => write!(f, "Payload({} bytes)", self.0.len()),
        }
    }
}

/// Written as the JSON value it holds (the HTTP API's history, say); a
/// payload that is not JSON is an error, not a silent substitute.
impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.as_json() {
            Some(value) => value.serialize(s),
            None => Err(serde::ser::Error::custom("the payload is not a JSON text")),
        }
    }
}

/// A publication in a channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Publication {
    /// Its offset in the channel's stream (absent without history).
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// The payload.
    pub data: Payload,
    /// Who published (absent for the HTTP API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Arc<ClientInfo>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why the server unsubscribed a client.
#[derive(Debug, Clone, Serialize)]
pub struct Unsubscribed {
    /// 2000: by the server (HTTP API).
    pub code: u16,
    /// Why, for people.
    pub reason: String,
}

/// A successful reply, by command.
#[derive(Debug)]
#[non_exhaustive]
pub enum Reply {
    /// `connect`.
    Connect(ConnectReply),
    /// `subscribe`.
    Subscribe(SubscribeReply),
    /// `unsubscribe`.
    Unsubscribe,
    /// `publish`: the publication's position (none without history).
    Publish(Option<PublishedAt>),
    /// `presence`: who is present.
    Presence(Vec<Arc<ClientInfo>>),
    /// `presence_stats`.
    PresenceStats {
        /// Clients present.
        clients: usize,
        /// Distinct users among them.
        users: usize,
    },
    /// `history`.
    History(HistoryReply),
    /// `refresh`: seconds until the new token expires (none: never).
    Refresh {
        /// Seconds left.
        expires_in: Option<u64>,
    },
    /// `ping`.
    Ping,
}

impl Reply {
    /// The command it answers, as named on the wire.
    pub fn command(&self) -> &'static str {
        match self {
            Reply::Connect(_) => "connect",
            Reply::Subscribe(_) => "subscribe",
            Reply::Unsubscribe => "unsubscribe",
            Reply::Publish(_) => "publish",
            Reply::Presence(_) => "presence",
            Reply::PresenceStats { .. } => "presence_stats",
            Reply::History(_) => "history",
            Reply::Refresh { .. } => "refresh",
            Reply::Ping => "ping",
        }
    }
}

/// The `connect` reply.
#[derive(Debug, Serialize)]
pub struct ConnectReply {
    /// The client id.
    pub client: String,
    /// The user id ("" for anonymous).
    pub user: String,
    /// The protocol version.
    pub version: u32,
    /// Seconds between the server's application pings (0: none).
    pub ping_interval: u64,
    /// The largest message the server reads, in bytes (a bigger one
    /// closes the connection, 1009): a client can refuse one before
    /// sending it.
    pub max_message_size: usize,
    /// Seconds until the connection token expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
}

/// The `subscribe` reply.
#[derive(Debug, Serialize)]
pub struct SubscribeReply {
    /// Whether the channel keeps a stream a client can recover from.
    pub recoverable: bool,
    /// The stream's epoch (recoverable channels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Arc<str>>,
    /// The stream's offset (recoverable channels).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// With `recover`: whether everything missed is in `publications`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// What was missed, oldest first.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub publications: Vec<Arc<Publication>>,
}

/// Where a publication went in its channel's stream.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedAt {
    /// Its offset.
    pub offset: u64,
    /// The stream's epoch.
    pub epoch: Arc<str>,
}

/// A history reply (a command's, and the HTTP API's).
#[derive(Debug, Serialize)]
pub struct HistoryReply {
    /// The publications.
    pub publications: Vec<Arc<Publication>>,
    /// The stream's current offset.
    pub offset: u64,
    /// The stream's epoch: `""` when the channel has no stream (no
    /// publication and no subscriber yet, or it expired).
    pub epoch: Arc<str>,
}

/// What the server sends on its own.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Push<'a> {
    /// A publication in a subscribed channel.
    Publication {
        /// The channel.
        channel: &'a str,
        /// The publication.
        publication: &'a Publication,
    },
    /// The joins and leaves of one interval in a channel; `joins` and
    /// `leaves` (who) only when `listed`, the counts always.
    PresenceDiff {
        /// The channel.
        channel: &'a str,
        /// Who joined (when listed).
        joins: &'a [Arc<ClientInfo>],
        /// Who left (when listed).
        leaves: &'a [Arc<ClientInfo>],
        /// How many joined.
        joined: u64,
        /// How many left.
        left: u64,
        /// Whether the push names them.
        listed: bool,
    },
    /// The server unsubscribed the client from a channel.
    Unsubscribe {
        /// The channel.
        channel: &'a str,
        /// Why.
        why: &'a Unsubscribed,
    },
    /// The server ends the connection.
    Disconnect(&'a Disconnect),
    /// The connection token expired: send `refresh` within `grace_secs`.
    Refresh {
        /// Seconds left.
        grace_secs: u64,
    },
    /// The application-level ping.
    Ping,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_unique_and_stable() {
        let mut numbers: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.number()).collect();
        numbers.dedup();
        assert_eq!(numbers, (100..116).collect::<Vec<u16>>());
    }

    #[test]
    fn a_payload_is_written_as_its_json_and_refused_when_it_is_not_json() {
        let payload = Payload::from_json(RawValue::from_string("{\"a\": [1, 2]}".into()).unwrap());
        assert_eq!(payload.as_bytes(), b"{\"a\": [1, 2]}");
        assert_eq!(serde_json::to_string(&payload).unwrap(), "{\"a\": [1, 2]}");
        let binary = Payload::from_bytes(Bytes::from_static(b"\xff\x00"));
        assert!(binary.as_json().is_none());
        assert!(serde_json::to_string(&binary).is_err());
    }

    #[test]
    fn a_push_is_encoded_once_per_codec() {
        struct Counting(std::sync::atomic::AtomicUsize);
        impl Codec for Counting {
            fn name(&self) -> &'static str {
                "counting"
            }
            fn decode_batch<'a>(&self, _: Incoming<'a>, _: usize) -> Result<Batch<'a>, ErrorReply> {
                Ok(Box::new(std::iter::empty()))
            }
            fn encode_reply(&self, _: u64, _: &Reply) -> Frame {
                Frame::from_static("r")
            }
            fn encode_error(&self, _: u64, _: &ErrorReply) -> Frame {
                Frame::from_static("e")
            }
            fn encode_push(&self, _: &Push<'_>) -> Frame {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Frame::from_static("p")
            }
        }
        let counting = Counting(Default::default());
        let mut push = EncodedPush::new(Push::Ping);
        for _ in 0..3 {
            assert_eq!(push.frame(&counting), &Frame::from_static("p"));
            assert_eq!(
                push.frame(&JSON).as_text(),
                Some("{\"push\":{\"ping\":{}}}")
            );
        }
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
