//! Version 1 of the protocol: JSON text, the WebSocket subprotocol
//! `tidewire.v1.json` ([`JsonCodec`], [`JSON`]).
//!
//! A text message holds one command, or several separated by newlines (a
//! batch). Parsing is strict and bounded: each command is a JSON object
//! with an optional numeric `id` and exactly one command key; anything
//! else gets an error reply with a stable code, and a message that names
//! the field at fault and what it must be. Commands past
//! `client.max_batch` are refused one by one ([`parse_batch`]).
//!
//! Encoding: a reply is `{"id":N,"<command>":<result>}`, an error reply
//! `{"id":N,"error":{"code":C,"message":"…"}}` (no `id` when the command's
//! id could not be read), a push `{"push":{…}}`. Payloads are written as
//! the JSON texts they are, never parsed again on the way out.

use std::io::Write as _;
use std::sync::Arc;

use serde::Serialize;

use super::{
    Batch, BatchItem, ChannelRequest, Codec, Command, ConnectRequest, ErrorCode, ErrorReply, Frame,
    HistoryRequest, Incoming, ParseError, Position, Publication, PublishRequest, Push,
    RefreshRequest, Reply, Request, SubscribeRequest, COMMANDS,
};
use crate::fields::{kind_of, quoted, Object};

/// The subprotocol a client may ask for; plain `new WebSocket(url)` (no
/// subprotocol) gets the same protocol.
pub const SUBPROTOCOL: &str = "tidewire.v1.json";

/// The JSON v1 codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

/// The JSON v1 codec, for [`Transport`](crate::node::Transport)s.
pub static JSON: JsonCodec = JsonCodec;

impl Codec for JsonCodec {
    fn name(&self) -> &'static str {
        "json"
    }

    fn decode_batch<'a>(
        &self,
        message: Incoming<'a>,
        max_batch: usize,
    ) -> Result<Batch<'a>, ErrorReply> {
        match message {
            Incoming::Text(text) => Ok(Box::new(parse_batch(text, max_batch))),
            Incoming::Binary(_) => Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "binary messages are not part of the protocol: send JSON text",
            )),
        }
    }

    fn encode_reply(&self, id: u64, reply: &Reply) -> Frame {
        let mut out = Vec::with_capacity(64);
        let _ = write!(out, "{{\"id\":{id},\"{}\":", reply.command());
        match reply {
            Reply::Connect(r) => write_serialized(&mut out, r),
            Reply::Subscribe(r) => {
                out.extend_from_slice(b"{\"recoverable\":");
                out.extend_from_slice(if r.recoverable { b"true" } else { b"false" });
                if let Some(epoch) = &r.epoch {
                    out.extend_from_slice(b",\"epoch\":");
                    write_serialized(&mut out, epoch);
                }
                if let Some(offset) = r.offset {
                    let _ = write!(out, ",\"offset\":{offset}");
                }
                if let Some(recovered) = r.recovered {
                    let _ = write!(out, ",\"recovered\":{recovered}");
                }
                if !r.publications.is_empty() {
                    out.extend_from_slice(b",\"publications\":");
                    write_publications(&mut out, &r.publications);
                }
                out.push(b'}');
            }
            Reply::Unsubscribe | Reply::Ping | Reply::Publish(None) => out.extend_from_slice(b"{}"),
            Reply::Publish(Some(at)) => write_serialized(&mut out, at),
            Reply::Presence(clients) => {
                out.extend_from_slice(b"{\"clients\":");
                write_serialized(&mut out, clients);
                out.push(b'}');
            }
            Reply::PresenceStats { clients, users } => {
                let _ = write!(out, "{{\"clients\":{clients},\"users\":{users}}}");
            }
            Reply::History(r) => {
                out.extend_from_slice(b"{\"publications\":");
                write_publications(&mut out, &r.publications);
                let _ = write!(out, ",\"offset\":{},\"epoch\":", r.offset);
                write_serialized(&mut out, &r.epoch);
                out.push(b'}');
            }
            Reply::Refresh { expires_in } => {
                out.extend_from_slice(b"{\"expires_in\":");
                write_serialized(&mut out, expires_in);
                out.push(b'}');
            }
        }
        out.push(b'}');
        text_frame(out)
    }

    fn encode_error(&self, id: u64, error: &ErrorReply) -> Frame {
        let mut out = Vec::with_capacity(64 + error.message.len());
        if id != 0 {
            let _ = write!(out, "{{\"id\":{id},\"error\":");
        } else {
            out.extend_from_slice(b"{\"error\":");
        }
        write_serialized(&mut out, error);
        out.push(b'}');
        text_frame(out)
    }

    fn encode_push(&self, push: &Push<'_>) -> Frame {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"{\"push\":{");
        match *push {
            Push::Publication {
                channel,
                publication,
            } => {
                out.reserve(channel.len() + publication.data.as_bytes().len() + 64);
                out.extend_from_slice(b"\"channel\":");
                write_serialized(&mut out, channel);
                out.extend_from_slice(b",\"pub\":");
                write_publication(&mut out, publication);
            }
            Push::PresenceDiff {
                channel,
                joins,
                leaves,
                joined,
                left,
                listed,
            } => {
                out.extend_from_slice(b"\"channel\":");
                write_serialized(&mut out, channel);
                let _ = write!(
                    out,
                    ",\"presence_diff\":{{\"joined\":{joined},\"left\":{left}"
                );
                if listed {
                    out.extend_from_slice(b",\"joins\":");
                    write_serialized(&mut out, joins);
                    out.extend_from_slice(b",\"leaves\":");
                    write_serialized(&mut out, leaves);
                }
                out.push(b'}');
            }
            Push::Unsubscribe { channel, why } => {
                out.extend_from_slice(b"\"channel\":");
                write_serialized(&mut out, channel);
                out.extend_from_slice(b",\"unsubscribe\":");
                write_serialized(&mut out, why);
            }
            Push::Disconnect(disconnect) => {
                out.extend_from_slice(b"\"disconnect\":");
                write_serialized(&mut out, disconnect);
            }
            Push::Refresh { grace_secs } => {
                let _ = write!(out, "\"refresh\":{{\"grace\":{grace_secs}}}");
            }
            Push::Ping => out.extend_from_slice(b"\"ping\":{}"),
        }
        out.extend_from_slice(b"}}");
        text_frame(out)
    }
}

/// Serializes what cannot fail to serialize (no maps with non-string keys,
/// no payload that is not JSON: those are written by hand).
pub(crate) fn write_serialized(out: &mut Vec<u8>, value: &(impl Serialize + ?Sized)) {
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// `{"offset":N,"data":…,"info":{…}}`; no offset without history, no
/// info from the HTTP API.
pub(crate) fn write_publication(out: &mut Vec<u8>, publication: &Publication) {
    out.push(b'{');
    if publication.offset != 0 {
        let _ = write!(out, "\"offset\":{},", publication.offset);
    }
    out.extend_from_slice(b"\"data\":");
    let data = publication.data.as_bytes();
    // Every way in checks the payload is JSON; one that is not (from a
    // broker shared with another program, say) must not break the frame.
    if std::str::from_utf8(data).is_ok() {
        out.extend_from_slice(data);
    } else {
        tracing::warn!("a payload that is not UTF-8 JSON was sent as null");
        out.extend_from_slice(b"null");
    }
    if let Some(info) = &publication.info {
        out.extend_from_slice(b",\"info\":");
        write_serialized(out, &**info);
    }
    out.push(b'}');
}

fn write_publications(out: &mut Vec<u8>, publications: &[Arc<Publication>]) {
    out.push(b'[');
    for (n, publication) in publications.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write_publication(out, publication);
    }
    out.push(b']');
}

pub(crate) fn text_frame(out: Vec<u8>) -> Frame {
    // One SIMD pass, no copy: the frame's bytes become the text as they are.
    match tidewire::Utf8Text::try_from(out) {
        Ok(text) => Frame::Text(text),
        // Unreachable: every part written is UTF-8 (payloads are checked).
        Err(_) => Frame::from_static("{\"error\":{\"code\":100,\"message\":\"encoding failed\"}}"),
    }
}

fn bad(id: u64, message: impl Into<String>) -> ParseError {
    ParseError {
        id,
        error: ErrorReply::new(ErrorCode::BadRequest, message),
    }
}

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

impl ConnectRequest {
    pub(crate) fn read(o: &Object) -> Result<Self, String> {
        o.only(&["token", "data"])?;
        Ok(ConnectRequest {
            token: o.string("token")?,
            data: o.value("data"),
        })
    }
}

impl SubscribeRequest {
    pub(crate) fn read(o: &Object) -> Result<Self, String> {
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

impl ChannelRequest {
    pub(crate) fn read(o: &Object) -> Result<Self, String> {
        o.only(&["channel"])?;
        Ok(ChannelRequest {
            channel: o.required_string("channel")?,
        })
    }
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

impl RefreshRequest {
    pub(crate) fn read(o: &Object) -> Result<Self, String> {
        o.only(&["token"])?;
        Ok(RefreshRequest {
            token: o.required_string("token")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{batch_limit_error, ClientInfo, Disconnect, DisconnectCode, Payload};
    use serde_json::value::RawValue;

    fn text(frame: Frame) -> String {
        frame.as_text().unwrap().to_owned()
    }

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
            data: Payload::from_json(RawValue::from_string("{\"text\":\"hi\"}".into()).unwrap()),
            info: Some(Arc::new(ClientInfo {
                client: "c".into(),
                user: "u".into(),
                info: None,
            })),
        };
        assert_eq!(
            text(JSON.encode_push(&Push::Publication {
                channel: "chat:lobby",
                publication: &p
            })),
            r#"{"push":{"channel":"chat:lobby","pub":{"offset":6,"data":{"text":"hi"},"info":{"client":"c","user":"u"}}}}"#
        );
        let p = Publication {
            offset: 0,
            info: None,
            ..p
        };
        assert_eq!(
            text(JSON.encode_push(&Push::Publication {
                channel: "a\"b",
                publication: &p
            })),
            r#"{"push":{"channel":"a\"b","pub":{"data":{"text":"hi"}}}}"#
        );
        assert_eq!(
            text(JSON.encode_error(3, &ErrorReply::new(ErrorCode::PermissionDenied, "no"))),
            r#"{"id":3,"error":{"code":107,"message":"no"}}"#
        );
        assert_eq!(
            text(JSON.encode_error(0, &ErrorReply::new(ErrorCode::BadRequest, "x"))),
            r#"{"error":{"code":101,"message":"x"}}"#
        );
        assert_eq!(
            text(JSON.encode_push(&Push::Disconnect(&Disconnect::new(
                DisconnectCode::Shutdown,
                "bye"
            )))),
            r#"{"push":{"disconnect":{"code":3001,"reason":"bye","reconnect":true}}}"#
        );
        assert_eq!(
            text(JSON.encode_push(&Push::Refresh { grace_secs: 10 })),
            r#"{"push":{"refresh":{"grace":10}}}"#
        );
        assert_eq!(
            text(JSON.encode_reply(4, &Reply::Ping)),
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
}
