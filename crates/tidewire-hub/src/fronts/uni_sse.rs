//! Unidirectional Server-Sent Events, for pages with no SDK:
//!
//! ```js
//! const feed = new EventSource('/connection/uni_sse?channel=news');
//! feed.onmessage = (e) => show(JSON.parse(e.data));
//! ```
//!
//! The query says what the client would send: `token` (a connection
//! token), `channel` (repeated for several), `subscription_token`
//! (repeated; each names its channel in its `channel` claim). The server
//! connects and subscribes on the client's behalf, then sends each
//! publication as a `message` event whose data is
//! `{"channel","offset","data","info"}`, and whose id holds the position of
//! every subscribed channel with history (`channel=offset.epoch&…`,
//! URL-encoded). A browser that lost the stream reconnects by itself with
//! that id in `Last-Event-ID`: the server recovers each channel from there,
//! so nothing is missed and nothing comes twice.
//!
//! Other events: `presence` (join/leave), `unsubscribe` and `disconnect`
//! (with `code` and `reason`: the stream ends, and the browser reconnects
//! in `retry` ms unless the server answers the next request with an
//! error). A connect or subscribe that fails answers with an HTTP status
//! and `{"error"}` instead of a stream (401, 403, 400, 503), which stops
//! `EventSource` from retrying.
//!
//! The codec here writes records the sink reads (fields apart by `\x1f`,
//! records by `\x1e`: neither can occur in JSON text); the sink keeps the
//! positions of its own subscriptions and writes the events.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::stream_queue::{Pushed, StreamQueue};
use crate::node::{ClientSink, FrameKind, Hub, OpeningRequest, SendOutcome, Transport};
use crate::protocol::json::{text_frame, write_publication, write_serialized};
use crate::protocol::{Batch, Codec, ErrorCode, ErrorReply, Frame, Incoming, Push, Reply, JSON};
use crate::shards::lock;

const FIELD: char = '\x1f';
const RECORD: char = '\x1e';

/// How long a browser waits before it reconnects (the `retry` field).
pub const RETRY_MS: u64 = 2000;

/// The codec of unidirectional SSE: commands as JSON (the server writes
/// them itself), everything else as records for [`UniSink`].
pub struct UniSseCodec;

/// The one instance.
pub static UNI_SSE: UniSseCodec = UniSseCodec;

impl Codec for UniSseCodec {
    fn name(&self) -> &'static str {
        "uni_sse"
    }

    fn decode_batch<'a>(
        &self,
        message: Incoming<'a>,
        max_batch: usize,
    ) -> Result<Batch<'a>, ErrorReply> {
        JSON.decode_batch(message, max_batch)
    }

    fn encode_reply(&self, id: u64, reply: &Reply) -> Frame {
        let mut out = Vec::with_capacity(64);
        match reply {
            Reply::Connect(_) => {
                let _ = write!(out, "C{FIELD}{id}");
            }
            Reply::Subscribe(r) => {
                let _ = write!(
                    out,
                    "S{FIELD}{id}{FIELD}{}{FIELD}{}",
                    r.offset.unwrap_or(0),
                    r.epoch.as_deref().unwrap_or("")
                );
                for p in &r.publications {
                    let _ = write!(out, "{RECORD}R{FIELD}{}{FIELD}", p.offset);
                    write_publication(&mut out, p);
                }
            }
            _ => {}
        }
        text_frame(out)
    }

    fn encode_error(&self, id: u64, error: &ErrorReply) -> Frame {
        let mut out = Vec::with_capacity(32 + error.message.len());
        let _ = write!(out, "E{FIELD}{id}{FIELD}{}{FIELD}", error.code.number());
        write_serialized(&mut out, &error.message);
        text_frame(out)
    }

    fn encode_push(&self, push: &Push<'_>) -> Frame {
        let mut out = Vec::with_capacity(64);
        match *push {
            Push::Publication {
                channel,
                publication,
            } => {
                let _ = write!(out, "P{FIELD}{}{FIELD}{channel}{FIELD}", publication.offset);
                write_publication(&mut out, publication);
            }
            Push::PresenceDiff {
                channel,
                joined,
                left,
                ..
            } => {
                let _ = write!(out, "J{FIELD}");
                write_serialized(
                    &mut out,
                    &serde_json::json!({"channel": channel, "joined": joined, "left": left}),
                );
            }
            Push::Unsubscribe { channel, why } => {
                let _ = write!(out, "U{FIELD}");
                write_serialized(
                    &mut out,
                    &serde_json::json!({"channel": channel, "code": why.code, "reason": why.reason}),
                );
            }
            Push::Disconnect(d) => {
                let _ = write!(out, "D{FIELD}");
                write_serialized(
                    &mut out,
                    &serde_json::json!({"code": d.code, "reason": d.reason, "reconnect": d.reconnect}),
                );
            }
            // A token that expires cannot be refreshed here: the stream
            // ends when the hub disconnects it.
            Push::Refresh { .. } => {}
            Push::Ping => out.push(b'K'),
        }
        text_frame(out)
    }
}

/// The transport of unidirectional SSE.
pub const TRANSPORT: Transport = Transport {
    name: "uni_sse",
    codec: &UNI_SSE,
    unidirectional: true,
};

/// A subscribed channel as the sink knows it.
struct Subscribed {
    /// The channel as a JSON string (for the events' data).
    json: String,
    /// Its position (offset, epoch); no epoch without history.
    offset: u64,
    epoch: String,
}

#[derive(Default)]
struct UniState {
    /// Subscribe command ids → channels.
    pending: BTreeMap<u64, String>,
    channels: BTreeMap<String, Subscribed>,
    /// The first error of the initial commands: (code, message).
    failed: Option<(u16, String)>,
}

/// The hub's side of one unidirectional stream.
pub struct UniSink {
    queue: StreamQueue,
    state: Mutex<UniState>,
}

impl UniSink {
    /// The `id:` of the events: every position held.
    fn event_id(state: &UniState) -> String {
        let mut id = form_urlencoded::Serializer::new(String::new());
        for (channel, s) in &state.channels {
            if !s.epoch.is_empty() {
                id.append_pair(channel, &format!("{}.{}", s.offset, s.epoch));
            }
        }
        id.finish()
    }

    fn event(out: &mut String, id: Option<&str>, kind: Option<&str>, data: &str) {
        if let Some(id) = id {
            out.push_str("id: ");
            out.push_str(id);
            out.push('\n');
        }
        if let Some(kind) = kind {
            out.push_str("event: ");
            out.push_str(kind);
            out.push('\n');
        }
        for line in data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }

    /// A publication of `channel` at `offset` (its JSON without the
    /// channel) as an event, the position moved on.
    fn publication(state: &mut UniState, out: &mut String, channel: &str, offset: u64, json: &str) {
        let Some(s) = state.channels.get_mut(channel) else {
            return;
        };
        if offset != 0 {
            s.offset = offset;
        }
        let data = match json.strip_prefix('{') {
            Some(rest) if rest.starts_with('}') => format!("{{\"channel\":{}}}", s.json),
            Some(rest) => format!("{{\"channel\":{},{rest}", s.json),
            None => return,
        };
        let id = UniSink::event_id(state);
        UniSink::event(out, Some(&id), None, &data);
    }

    /// Records to SSE text; `Err(code, reason)` when the stream must end
    /// after it.
    fn translate(&self, text: &str) -> (String, Option<(u16, String)>) {
        let mut state = lock(&self.state);
        let mut out = String::new();
        let mut end = None;
        let mut current: Option<String> = None;
        for record in text.split(RECORD) {
            let mut fields = record.splitn(4, FIELD);
            match fields.next() {
                Some("S") => {
                    let id: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
                    let offset: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
                    let epoch = fields.next().unwrap_or("").to_owned();
                    if let Some(channel) = state.pending.remove(&id) {
                        let json = serde_json::to_string(&channel).unwrap_or_default();
                        state.channels.insert(
                            channel.clone(),
                            Subscribed {
                                json,
                                offset,
                                epoch,
                            },
                        );
                        current = Some(channel);
                    }
                }
                Some("R") => {
                    let offset: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
                    let json = fields.next().unwrap_or("");
                    if let Some(channel) = &current {
                        let channel = channel.clone();
                        UniSink::publication(&mut state, &mut out, &channel, offset, json);
                    }
                }
                Some("P") => {
                    let offset: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
                    let channel = fields.next().unwrap_or("").to_owned();
                    let json = fields.next().unwrap_or("");
                    UniSink::publication(&mut state, &mut out, &channel, offset, json);
                }
                Some("E") => {
                    let _id = fields.next();
                    let code: u16 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(100);
                    let message: String = fields
                        .next()
                        .and_then(|m| serde_json::from_str(m).ok())
                        .unwrap_or_default();
                    if state.failed.is_none() {
                        state.failed = Some((code, message.clone()));
                    }
                    let data = serde_json::json!({"code": code, "message": message}).to_string();
                    UniSink::event(&mut out, None, Some("error"), &data);
                }
                Some("J") => {
                    UniSink::event(
                        &mut out,
                        None,
                        Some("presence"),
                        fields.next().unwrap_or("{}"),
                    );
                }
                Some("U") => {
                    let data = fields.next().unwrap_or("{}");
                    UniSink::event(&mut out, None, Some("unsubscribe"), data);
                    // Lost publications (2002) or unsubscribed by the
                    // server: the browser reconnects and recovers or
                    // is told what it may no longer have.
                    end = Some((3000, "unsubscribed".to_owned()));
                }
                Some("D") => {
                    let data = fields.next().unwrap_or("{}");
                    UniSink::event(&mut out, None, Some("disconnect"), data);
                }
                Some("K") => out.push_str(": ping\n\n"),
                _ => {}
            }
        }
        (out, end)
    }
}

impl ClientSink for UniSink {
    fn transport(&self) -> Transport {
        TRANSPORT
    }

    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome {
        let Some(text) = frame.as_text() else {
            return SendOutcome::Dropped;
        };
        let (events, end) = self.translate(text);
        let outcome = if events.is_empty() {
            SendOutcome::Queued
        } else {
            match self
                .queue
                .push([Bytes::from(events), Bytes::new(), Bytes::new()], kind)
            {
                Pushed::Outcome(outcome) => outcome,
                Pushed::Overflow(code) => {
                    self.close(code, "send queue full");
                    SendOutcome::Closed
                }
            }
        };
        if let Some((code, reason)) = end {
            self.close(code, &reason);
        }
        outcome
    }

    fn close(&self, _code: u16, _reason: &str) {
        // The disconnect event (when there is one) went before: the
        // stream just ends, and the browser comes back in `retry` ms.
        self.queue.close(Bytes::new());
    }

    fn queued(&self) -> usize {
        self.queue.queued()
    }

    fn is_closing(&self) -> bool {
        self.queue.is_closing()
    }
}

/// What a `GET /connection/uni_sse` asks for.
#[derive(Debug, Default)]
pub struct UniRequest {
    /// The connection token.
    pub token: Option<String>,
    /// Channels, each with its subscription token if any.
    pub channels: Vec<(String, Option<String>)>,
    /// Positions from `Last-Event-ID`, by channel.
    pub positions: BTreeMap<String, (u64, String)>,
}

impl UniRequest {
    /// From the query string and the `Last-Event-ID` header.
    ///
    /// # Errors
    /// No channel, or a subscription token that names none.
    pub fn parse(query: &str, last_event_id: Option<&str>) -> Result<UniRequest, String> {
        let mut request = UniRequest::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "token" => request.token = Some(value.into_owned()),
                "channel" => request.channels.push((value.into_owned(), None)),
                "subscription_token" => {
                    let channel = crate::auth::channel_claim(&value).ok_or_else(|| {
                        "a subscription_token must name its channel (the channel claim)".to_owned()
                    })?;
                    request.channels.push((channel, Some(value.into_owned())));
                }
                _ => {}
            }
        }
        if request.channels.is_empty() {
            return Err(
                "name at least one channel: ?channel=NAME (or ?subscription_token=JWT)".into(),
            );
        }
        if let Some(id) = last_event_id {
            for (channel, position) in form_urlencoded::parse(id.as_bytes()) {
                if let Some((offset, epoch)) = position.split_once('.') {
                    if let Ok(offset) = offset.parse() {
                        request
                            .positions
                            .insert(channel.into_owned(), (offset, epoch.to_owned()));
                    }
                }
            }
        }
        Ok(request)
    }

    /// The commands the server sends for the client, and the subscribe
    /// ids with their channels.
    fn commands(&self) -> (String, BTreeMap<u64, String>) {
        let mut lines = Vec::with_capacity(self.channels.len() + 1);
        let connect = match &self.token {
            Some(token) => serde_json::json!({"id": 1, "connect": {"token": token}}),
            None => serde_json::json!({"id": 1, "connect": {}}),
        };
        lines.push(connect.to_string());
        let mut pending = BTreeMap::new();
        for (n, (channel, token)) in self.channels.iter().enumerate() {
            let id = n as u64 + 2;
            let mut subscribe = serde_json::json!({"channel": channel});
            if let Some(token) = token {
                subscribe["token"] = token.clone().into();
            }
            if let Some((offset, epoch)) = self.positions.get(channel) {
                subscribe["recover"] = true.into();
                subscribe["offset"] = (*offset).into();
                subscribe["epoch"] = epoch.clone().into();
            }
            lines.push(serde_json::json!({"id": id, "subscribe": subscribe}).to_string());
            pending.insert(id, channel.clone());
        }
        (lines.join("\n"), pending)
    }
}

/// Why a unidirectional stream was refused: an HTTP status and message.
#[derive(Debug)]
pub struct Refused {
    /// 400, 401, 403, 503...
    pub status: u16,
    /// The error's message.
    pub message: String,
}

fn status_of(code: u16) -> u16 {
    match ErrorCode::from_number(code) {
        Some(ErrorCode::Unauthorized | ErrorCode::TokenExpired) => 401,
        Some(ErrorCode::PermissionDenied) => 403,
        Some(ErrorCode::Unavailable) => 503,
        _ => 400,
    }
}

/// Connects and subscribes for `request`; the stream of events, or why
/// not. The session ends when the stream is dropped.
///
/// # Errors
/// The first error of the connect and subscribes, as an HTTP status.
pub async fn open(
    hub: &Hub,
    request: &UniRequest,
    opening: Option<Box<OpeningRequest>>,
) -> Result<impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static, Refused> {
    let (commands, pending) = request.commands();
    let sink = Arc::new(UniSink {
        queue: StreamQueue::new(hub, b": keepalive\n\n"),
        state: Mutex::new(UniState {
            pending,
            ..UniState::default()
        }),
    });
    sink.queue
        .push_raw(Bytes::from(format!("retry: {RETRY_MS}\n\n")));
    let session = hub.open_with(sink.clone(), opening);
    session.handle_text(&commands).await;
    let failed = lock(&sink.state).failed.take();
    if let Some((code, message)) = failed {
        session.close().await;
        return Err(Refused {
            status: status_of(code),
            message,
        });
    }
    let gone = tokio_util::sync::CancellationToken::new();
    {
        let gone = gone.clone();
        let sink = sink.clone();
        tokio::spawn(async move {
            while !sink.queue.is_done() {
                tokio::select! {
                    _ = gone.cancelled() => break,
                    _ = sink.queue.done.notified() => {}
                }
            }
            session.close().await;
        });
    }
    let body = (sink, gone.drop_guard());
    Ok(futures_util::stream::unfold(body, |body| async move {
        let chunk = body.0.queue.next_chunk().await?;
        Some((Ok(chunk), body))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_and_last_event_id_make_the_commands() {
        let request = UniRequest::parse(
            "channel=news&channel=chat%3Alobby&token=abc",
            Some("news=5.0f3a9c2b7d1e"),
        )
        .unwrap();
        let (commands, pending) = request.commands();
        let lines: Vec<serde_json::Value> = commands
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["connect"]["token"], "abc");
        assert_eq!(lines[1]["subscribe"]["channel"], "news");
        assert_eq!(lines[1]["subscribe"]["offset"], 5);
        assert_eq!(lines[1]["subscribe"]["epoch"], "0f3a9c2b7d1e");
        assert_eq!(lines[2]["subscribe"]["channel"], "chat:lobby");
        assert!(lines[2]["subscribe"].get("offset").is_none());
        assert_eq!(pending.get(&3).map(String::as_str), Some("chat:lobby"));
        assert!(UniRequest::parse("token=abc", None).is_err());
    }

    #[test]
    fn event_ids_hold_every_position() {
        let mut state = UniState::default();
        for (channel, offset) in [("news", 5), ("chat:lobby", 7)] {
            state.channels.insert(
                channel.into(),
                Subscribed {
                    json: serde_json::to_string(channel).unwrap(),
                    offset,
                    epoch: "e1".into(),
                },
            );
        }
        let id = UniSink::event_id(&state);
        assert_eq!(id, "chat%3Alobby=7.e1&news=5.e1");
        let back = UniRequest::parse("channel=news", Some(&id)).unwrap();
        assert_eq!(back.positions["chat:lobby"], (7, "e1".to_owned()));
        let mut out = String::new();
        UniSink::publication(&mut state, &mut out, "news", 6, "{\"offset\":6,\"data\":1}");
        assert_eq!(
            out,
            "id: chat%3Alobby=7.e1&news=6.e1\ndata: {\"channel\":\"news\",\"offset\":6,\"data\":1}\n\n"
        );
    }
}
