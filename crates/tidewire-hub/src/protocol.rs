//! The client protocol's JSON wire types (version 1, WebSocket subprotocol
//! `tidewire.v1.json`): commands with an `id`, their replies, the pushes
//! the server sends on its own, and the one table of error and disconnect
//! codes. `docs/protocol.md` is the reference; the examples there are
//! checked by the tests here.
//!
//! A WebSocket text message holds one command, or several separated by
//! newlines (a batch). Parsing is strict and bounded: each command is a
//! JSON object with an optional numeric `id` and exactly one command key;
//! anything else gets an error reply with a stable code, and a message
//! that names the field at fault and what it must be. Commands past
//! `client.max_batch` are refused one by one ([`parse_batch`]).

use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::fields::{kind_of, quoted, Object};

/// The subprotocol a client may ask for; plain `new WebSocket(url)` (no
/// subprotocol) gets the same protocol.
pub const SUBPROTOCOL: &str = "tidewire.v1.json";

/// The protocol version, sent in the connect reply.
pub const VERSION: u32 = 1;

/// An encoded message to a client: one JSON text, shared (the same bytes
/// go to every subscriber of a channel).
pub type Frame = tidewire::Utf8Text;

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

impl ConnectRequest {
    fn read(o: &Object) -> Result<Self, String> {
        o.only(&["token", "data"])?;
        Ok(ConnectRequest {
            token: o.string("token")?,
            data: o.value("data"),
        })
    }
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

impl SubscribeRequest {
    fn read(o: &Object) -> Result<Self, String> {
        o.only(&["channel", "recover", "offset", "epoch", "token"])?;
        Ok(SubscribeRequest {
            channel: o.required_string("channel")?,
            recover: o.bool("recover")?.unwrap_or(false),
            offset: o.u64("offset")?,
            epoch: o.string("epoch")?,
            token: o.string("token")?,
        })
    }
}

/// A command (or API call) that names just a channel.
#[derive(Debug)]
pub struct ChannelRequest {
    /// The channel.
    pub channel: String,
}

impl ChannelRequest {
    pub(crate) fn read(o: &Object) -> Result<Self, String> {
        o.only(&["channel"])?;
        Ok(ChannelRequest {
            channel: o.required_string("channel")?,
        })
    }
}

/// `publish` (a command, and the HTTP API's `publish`).
#[derive(Debug)]
pub struct PublishRequest {
    /// The channel.
    pub channel: String,
    /// Any JSON value.
    pub data: Box<RawValue>,
}

impl PublishRequest {
    pub(crate) fn read(o: &Object) -> Result<Self, String> {
        o.only(&["channel", "data"])?;
        Ok(PublishRequest {
            channel: o.required_string("channel")?,
            data: o.required_value("data")?,
        })
    }
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

impl HistoryRequest {
    pub(crate) fn read(o: &Object) -> Result<Self, String> {
        o.only(&["channel", "limit", "since", "reverse"])?;
        let since = match o.object("since")? {
            Some(p) => {
                p.only(&["offset", "epoch"])?;
                Some(Position {
                    offset: p.required_u64("offset")?,
                    epoch: p.required_string("epoch")?,
                })
            }
            None => None,
        };
        Ok(HistoryRequest {
            channel: o.required_string("channel")?,
            // Beyond usize: more than any cap, so the cap.
            limit: o
                .u64("limit")?
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            since,
            reverse: o.bool("reverse")?.unwrap_or(false),
        })
    }
}

/// `refresh`.
#[derive(Debug)]
pub struct RefreshRequest {
    /// The new connection token.
    pub token: String,
}

impl RefreshRequest {
    fn read(o: &Object) -> Result<Self, String> {
        o.only(&["token"])?;
        Ok(RefreshRequest {
            token: o.required_string("token")?,
        })
    }
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

fn bad(id: u64, message: impl Into<String>) -> ParseError {
    ParseError {
        id,
        error: ErrorReply::new(ErrorCode::BadRequest, message),
    }
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

/// Parses one command (one line of a message).
///
/// # Errors
/// A [`ParseError`] with code 101 (bad request) or 102 (unknown command),
/// and a message that names the field at fault and what it must be.
pub fn parse_command(line: &str) -> Result<Command, ParseError> {
    const EXAMPLE: &str = r#"a command is one JSON object per line, like {"id":1,"ping":{}}"#;
    let object = Object::parse(line).map_err(|e| bad(0, format!("{e}: {EXAMPLE}")))?;
    // The id first: every error after this echoes it.
    let mut ids = object.members().filter(|(key, _)| *key == "id");
    let id = match (ids.next(), ids.next()) {
        (None, _) => 0,
        (Some(_), Some(_)) => return Err(bad(0, "\"id\" is given twice")),
        (Some((_, value)), None) => serde_json::from_str::<u64>(value.get())
            .map_err(|_| bad(0, "\"id\" must be a non-negative integer"))?,
    };
    let mut command = None;
    for (key, value) in object.members().filter(|(key, _)| *key != "id") {
        if let Some((first, _)) = command.replace((key, value)) {
            return Err(bad(
                id,
                format!(
                    "a command has one command key besides \"id\"; got {} and {}",
                    quoted(first),
                    quoted(key)
                ),
            ));
        }
    }
    let Some((name, body)) = command else {
        return Err(bad(
            id,
            format!(
                "no command in the object; commands: {}",
                COMMANDS.join(", ")
            ),
        ));
    };
    if !COMMANDS.contains(&name) {
        return Err(ParseError {
            id,
            error: ErrorReply::new(
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command {}; commands: {}",
                    quoted(name),
                    COMMANDS.join(", ")
                ),
            ),
        });
    }
    let body = Object::parse(body.get()).map_err(|_| {
        bad(
            id,
            format!("{name:?} must be an object (got {})", kind_of(body.get())),
        )
    })?;
    let request = match name {
        "connect" => ConnectRequest::read(&body).map(Request::Connect),
        "subscribe" => SubscribeRequest::read(&body).map(Request::Subscribe),
        "unsubscribe" => ChannelRequest::read(&body).map(Request::Unsubscribe),
        "publish" => PublishRequest::read(&body).map(Request::Publish),
        "presence" => ChannelRequest::read(&body).map(Request::Presence),
        "presence_stats" => ChannelRequest::read(&body).map(Request::PresenceStats),
        "history" => HistoryRequest::read(&body).map(Request::History),
        "refresh" => RefreshRequest::read(&body).map(Request::Refresh),
        "ping" => body.only(&[]).map(|()| Request::Ping),
        _ => unreachable!("COMMANDS lists every command"),
    }
    .map_err(|e| bad(id, format!("{name}: {e}")))?;
    Ok(Command { id, request })
}

/// The lines of a message that hold commands (blank lines are skipped).
pub fn split_batch(message: &str) -> impl Iterator<Item = &str> {
    message
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
}

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

/// The commands of a message, one item per non-blank line, parsed one by
/// one as the iterator advances (so each runs before the next is read).
/// Lines past `max_batch` are refused, each with its id: the client learns
/// the fate of every command it sent. Reading a refused line costs a scan
/// for its id that keeps nothing (a test holds it to under 1 KiB at any
/// time), so the work stays bounded by the message size.
pub fn parse_batch(message: &str, max_batch: usize) -> impl Iterator<Item = BatchItem> + '_ {
    split_batch(message).enumerate().map(move |(n, line)| {
        if n < max_batch {
            BatchItem::Command(parse_command(line))
        } else {
            BatchItem::Refused {
                id: crate::fields::peek_id(line),
                number: n + 1,
            }
        }
    })
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

/// A publication in a channel.
#[derive(Debug, Clone, Serialize)]
pub struct Publication {
    /// Its offset in the channel's stream (absent without history).
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// The payload.
    pub data: Box<RawValue>,
    /// Who published (absent for the HTTP API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Arc<ClientInfo>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A reply: `{"id":N,"<command>":<result>}`.
pub fn encode_reply(id: u64, command: &str, result: &impl Serialize) -> Frame {
    let body = serde_json::to_string(result).unwrap_or_else(|_| "{}".into());
    let mut out = String::with_capacity(body.len() + command.len() + 24);
    let _ = write!(out, "{{\"id\":{id},\"{command}\":{body}}}");
    out.into()
}

/// An error reply: `{"id":N,"error":{"code":C,"message":"…"}}` (no `id`
/// when the command's id could not be read).
pub fn encode_error(id: u64, error: &ErrorReply) -> Frame {
    let body = serde_json::to_string(error).unwrap_or_else(|_| "{}".into());
    if id == 0 {
        format!("{{\"error\":{body}}}").into()
    } else {
        format!("{{\"id\":{id},\"error\":{body}}}").into()
    }
}

#[derive(Serialize)]
struct Push<T: Serialize> {
    push: T,
}

fn push(body: impl Serialize) -> Frame {
    serde_json::to_string(&Push { push: body })
        .unwrap_or_default()
        .into()
}

/// `{"push":{"channel":"…","pub":{…}}}`: encoded once per publication.
pub fn encode_publication(channel: &str, publication: &Publication) -> Frame {
    #[derive(Serialize)]
    struct P<'a> {
        channel: &'a str,
        #[serde(rename = "pub")]
        publication: &'a Publication,
    }
    push(P {
        channel,
        publication,
    })
}

/// `{"push":{"channel":"…","presence_diff":{"joined":J,"left":L,
/// "joins":[…],"leaves":[…]}}}`: the joins and leaves of one interval;
/// `joins` and `leaves` (who) only when `listed`, the counts always.
pub fn encode_presence_diff(
    channel: &str,
    joins: &[Arc<ClientInfo>],
    leaves: &[Arc<ClientInfo>],
    counts: (u64, u64),
    listed: bool,
) -> Frame {
    #[derive(Serialize)]
    struct Diff<'a> {
        joined: u64,
        left: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        joins: Option<&'a [Arc<ClientInfo>]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        leaves: Option<&'a [Arc<ClientInfo>]>,
    }
    #[derive(Serialize)]
    struct P<'a> {
        channel: &'a str,
        presence_diff: Diff<'a>,
    }
    push(P {
        channel,
        presence_diff: Diff {
            joined: counts.0,
            left: counts.1,
            joins: listed.then_some(joins),
            leaves: listed.then_some(leaves),
        },
    })
}

/// Why the server unsubscribed a client.
#[derive(Debug, Clone, Serialize)]
pub struct Unsubscribed {
    /// 2000: by the server (HTTP API).
    pub code: u16,
    /// Why, for people.
    pub reason: String,
}

/// `{"push":{"channel":"…","unsubscribe":{"code":…,"reason":"…"}}}`.
pub fn encode_unsubscribe(channel: &str, why: &Unsubscribed) -> Frame {
    #[derive(Serialize)]
    struct P<'a> {
        channel: &'a str,
        unsubscribe: &'a Unsubscribed,
    }
    push(P {
        channel,
        unsubscribe: why,
    })
}

/// `{"push":{"disconnect":{"code":…,"reason":"…","reconnect":…}}}`.
pub fn encode_disconnect(disconnect: &Disconnect) -> Frame {
    #[derive(Serialize)]
    struct P<'a> {
        disconnect: &'a Disconnect,
    }
    push(P { disconnect })
}

/// `{"push":{"refresh":{"grace":S}}}`: the token expired; send `refresh`
/// within `grace` seconds.
pub fn encode_refresh(grace_secs: u64) -> Frame {
    format!("{{\"push\":{{\"refresh\":{{\"grace\":{grace_secs}}}}}}}").into()
}

/// `{"push":{"ping":{}}}`: the application-level ping.
pub fn ping_frame() -> Frame {
    Frame::from_static("{\"push\":{\"ping\":{}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        let c = parse_command(r#"{"id":1,"connect":{"token":"t","data":{"x":1}}}"#).unwrap();
        assert_eq!(c.id, 1);
        let Request::Connect(r) = c.request else {
            panic!()
        };
        assert_eq!(r.token.as_deref(), Some("t"));
        assert_eq!(r.data.unwrap().get(), r#"{"x":1}"#);
        let c = parse_command(
            r#"{"id":2,"subscribe":{"channel":"chat:lobby","recover":true,"offset":5,"epoch":"e"}}"#,
        )
        .unwrap();
        let Request::Subscribe(s) = c.request else {
            panic!()
        };
        assert!(s.recover && s.offset == Some(5) && s.epoch.as_deref() == Some("e"));
        let c = parse_command(r#"{"history":{"channel":"a","limit":3,"since":{"offset":1,"epoch":"e"},"reverse":true}}"#).unwrap();
        assert_eq!(c.id, 0);
        assert!(matches!(
            c.request,
            Request::History(HistoryRequest {
                reverse: true,
                limit: Some(3),
                ..
            })
        ));
        assert!(matches!(
            parse_command(r#"{"id":9,"ping":{}}"#).unwrap().request,
            Request::Ping
        ));
    }

    fn code_of(line: &str) -> (u64, u16) {
        let e = parse_command(line).unwrap_err();
        (e.id, e.error.code.number())
    }

    #[test]
    fn malformed_commands_get_their_codes_and_keep_the_id_when_readable() {
        assert_eq!(code_of("not json"), (0, 101));
        assert_eq!(code_of("[1,2]"), (0, 101));
        assert_eq!(code_of(r#"{"id":-1,"ping":{}}"#), (0, 101));
        assert_eq!(code_of(r#"{"id":3}"#), (3, 101));
        assert_eq!(code_of(r#"{"id":4,"ping":{},"connect":{}}"#), (4, 101));
        assert_eq!(code_of(r#"{"id":5,"dance":{}}"#), (5, 102));
        assert_eq!(code_of(r#"{"id":6,"subscribe":{}}"#), (6, 101));
        assert_eq!(code_of(r#"{"id":7,"subscribe":{"channel":1}}"#), (7, 101));
        assert_eq!(
            code_of(r#"{"id":8,"publish":{"channel":"a","data":1,"x":2}}"#),
            (8, 101)
        );
        assert_eq!(code_of(r#"{"id":9,"ping":{"a":1}}"#), (9, 101));
    }

    fn message_of(line: &str) -> String {
        parse_command(line).unwrap_err().error.message
    }

    /// What a person reads names the field and what it must be, never the
    /// JSON parser's internals.
    #[test]
    fn error_messages_name_the_field_and_what_it_must_be() {
        let cases = [
            (
                r#"{"id":1,"history":{"channel":"a","limit":"ten"}}"#,
                r#"history: "limit" must be a non-negative integer"#,
            ),
            (
                r#"{"id":1,"history":{"channel":"a","limit":-1}}"#,
                r#"history: "limit" must be a non-negative integer"#,
            ),
            (
                r#"{"id":1,"history":{"channel":"a","since":{"offset":1}}}"#,
                r#"history: "since.epoch" is required (a string)"#,
            ),
            (
                r#"{"id":1,"history":{"channel":"a","since":5}}"#,
                r#"history: "since" must be an object (got a number)"#,
            ),
            (
                r#"{"id":1,"subscribe":{}}"#,
                r#"subscribe: "channel" is required (a string)"#,
            ),
            (
                r#"{"id":1,"subscribe":{"channel":7}}"#,
                r#"subscribe: "channel" must be a string"#,
            ),
            (
                r#"{"id":1,"subscribe":{"chanel":"a"}}"#,
                r#"subscribe: unknown field "chanel"; fields: channel, recover, offset, epoch, token"#,
            ),
            (
                r#"{"id":1,"subscribe":{"channel":"a","recover":"yes"}}"#,
                r#"subscribe: "recover" must be true or false"#,
            ),
            (
                r#"{"id":1,"publish":{"channel":"a"}}"#,
                r#"publish: "data" is required (any JSON value)"#,
            ),
            (
                r#"{"id":1,"publish":"hi"}"#,
                r#""publish" must be an object (got a string)"#,
            ),
            (
                r#"{"id":1,"ping":{"a":1}}"#,
                r#"ping: unknown field "a"; it takes no fields"#,
            ),
            (
                r#"{"id":"one","ping":{}}"#,
                r#""id" must be a non-negative integer"#,
            ),
            (r#"{"id":1,"id":2,"ping":{}}"#, r#""id" is given twice"#),
            (
                r#"{"id":1,"ping":{},"connect":{}}"#,
                r#"a command has one command key besides "id"; got "ping" and "connect""#,
            ),
            (
                r#"{"id":1}"#,
                "no command in the object; commands: connect, subscribe, unsubscribe, publish, \
                 presence, presence_stats, history, refresh, ping",
            ),
            (
                r#"{"id":1,"dance":{}}"#,
                "unknown command \"dance\"; commands: connect, subscribe, unsubscribe, publish, \
                 presence, presence_stats, history, refresh, ping",
            ),
            (
                r#"{"id":1,"ping":{}"#,
                r#"the JSON ends too early (at column 17): a command is one JSON object per line, like {"id":1,"ping":{}}"#,
            ),
            (
                "hello",
                r#"not valid JSON (at column 1): a command is one JSON object per line, like {"id":1,"ping":{}}"#,
            ),
            (
                "[1,2]",
                r#"not a JSON object: got an array: a command is one JSON object per line, like {"id":1,"ping":{}}"#,
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(message_of(line), expected, "for {line}");
        }
    }

    #[test]
    fn optional_fields_may_be_null_and_data_may_be_null() {
        let c = parse_command(r#"{"id":1,"connect":{"token":null,"data":null}}"#).unwrap();
        let Request::Connect(r) = c.request else {
            panic!()
        };
        assert!(r.token.is_none() && r.data.is_none());
        let c = parse_command(r#"{"id":2,"publish":{"channel":"a","data":null}}"#).unwrap();
        let Request::Publish(p) = c.request else {
            panic!()
        };
        assert_eq!(p.data.get(), "null");
        let c = parse_command(r#"{"history":{"channel":"a","limit":99999999999999999999}}"#);
        assert!(c.is_err(), "beyond u64 is not an integer we read");
        let c = parse_command(r#"{"history":{"channel":"a","limit":18446744073709551615}}"#);
        assert!(matches!(
            c.unwrap().request,
            Request::History(HistoryRequest {
                limit: Some(usize::MAX),
                ..
            })
        ));
    }

    #[test]
    fn a_batch_past_its_limit_refuses_each_command_with_its_id() {
        let message = "{\"id\":1,\"ping\":{}}\n{\"ping\":{}}\n\n{\"id\":3,\"x\":1}\n\
                       {\"id\":4,\"dance\":{}}\nnot json\n{\"ping\":{}}\n{\"id\":7,\"ping\":{}}";
        let items: Vec<BatchItem> = parse_batch(message, 2).collect();
        assert_eq!(items.len(), 7, "one item per non-blank line");
        assert!(matches!(&items[0], BatchItem::Command(Ok(c)) if c.id == 1));
        assert!(matches!(&items[1], BatchItem::Command(Ok(c)) if c.id == 0));
        let refused: Vec<(u64, usize)> = items[2..]
            .iter()
            .map(|item| match item {
                BatchItem::Refused { id, number } => (*id, *number),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(refused, [(3, 3), (4, 4), (0, 5), (0, 6), (7, 7)]);
        assert_eq!(
            batch_limit_error(2, 3).message,
            "not run: at most 2 commands in one message, this was command 3"
        );
        assert_eq!(batch_limit_error(2, 3).code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn batches_split_on_newlines() {
        let lines: Vec<_> =
            split_batch("{\"id\":1,\"ping\":{}}\r\n\n{\"id\":2,\"ping\":{}}\n").collect();
        assert_eq!(lines, ["{\"id\":1,\"ping\":{}}", "{\"id\":2,\"ping\":{}}"]);
    }

    #[test]
    fn encodings() {
        let p = Publication {
            offset: 6,
            data: RawValue::from_string("{\"text\":\"hi\"}".into()).unwrap(),
            info: Some(Arc::new(ClientInfo {
                client: "c".into(),
                user: "u".into(),
                info: None,
            })),
        };
        assert_eq!(
            encode_publication("chat:lobby", &p).as_str(),
            r#"{"push":{"channel":"chat:lobby","pub":{"offset":6,"data":{"text":"hi"},"info":{"client":"c","user":"u"}}}}"#
        );
        let p = Publication {
            offset: 0,
            info: None,
            ..p
        };
        assert_eq!(
            encode_publication("a\"b", &p).as_str(),
            r#"{"push":{"channel":"a\"b","pub":{"data":{"text":"hi"}}}}"#
        );
        assert_eq!(
            encode_error(3, &ErrorReply::new(ErrorCode::PermissionDenied, "no")).as_str(),
            r#"{"id":3,"error":{"code":107,"message":"no"}}"#
        );
        assert_eq!(
            encode_error(0, &ErrorReply::new(ErrorCode::BadRequest, "x")).as_str(),
            r#"{"error":{"code":101,"message":"x"}}"#
        );
        assert_eq!(
            encode_disconnect(&Disconnect::new(DisconnectCode::Shutdown, "bye")).as_str(),
            r#"{"push":{"disconnect":{"code":3001,"reason":"bye","reconnect":true}}}"#
        );
        assert_eq!(
            encode_refresh(10).as_str(),
            r#"{"push":{"refresh":{"grace":10}}}"#
        );
        assert_eq!(
            encode_reply(4, "ping", &serde_json::json!({})).as_str(),
            r#"{"id":4,"ping":{}}"#
        );
    }

    proptest::proptest! {
        /// Hostile bytes: parsed or refused with a code, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            for line in split_batch(&text) {
                if let Err(e) = parse_command(line) {
                    proptest::prop_assert!(matches!(e.error.code, ErrorCode::BadRequest | ErrorCode::UnknownCommand));
                }
            }
        }

        /// Objects with known keys and values of any JSON type.
        #[test]
        fn arbitrary_objects_never_panic(
            key in proptest::sample::select(vec!["id", "connect", "subscribe", "publish", "history", "ping", "x"]),
            value in proptest::sample::select(vec!["1", "-1", "\"s\"", "{}", "[]", "null", "{\"channel\":\"a\",\"data\":1}", "1e400"]),
        ) {
            let _ = parse_command(&format!("{{\"{key}\":{value}}}"));
            let _ = parse_command(&format!("{{\"id\":1,\"{key}\":{value}}}"));
        }
    }

    #[test]
    fn error_codes_are_unique_and_stable() {
        let mut numbers: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.number()).collect();
        numbers.dedup();
        assert_eq!(numbers, (100..116).collect::<Vec<u16>>());
    }
}
