//! The WebSocket connection state machine (RFC 6455 §5-§7, RFC 7692 §6-§7).
//!
//! A [`Connection`] owns no socket. Bytes read from the network go into
//! [`input_buffer`](Connection::input_buffer) (or
//! [`receive_data`](Connection::receive_data)); [`next_event`](Connection::next_event)
//! parses them into [`Event`]s; everything to be written appears in
//! [`pending_output`](Connection::pending_output). Pings and close frames are
//! answered here, so the I/O layer only moves bytes.
//!
//! Payloads are unmasked in place in the read buffer as they arrive, and text
//! is validated as it arrives too: an invalid byte fails the connection at
//! once, even in the middle of a frame. A complete single-frame message is
//! split off the read buffer without copying.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use crate::close::{CloseFrame, MAX_REASON_LEN};
use crate::deflate::{DeflateConfig, DeflateParams, Deflater, Inflater};
use crate::error::{ProtocolError, UsageError};
use crate::frame::{FrameHeader, OpCode};
use crate::mask::apply_mask;
use crate::utf8::{Utf8Text, Utf8Validator};

/// The capacity an empty output buffer starts with.
const OUTPUT_START: usize = 16 * 1024;

/// Which end of the connection this is: it decides the masking direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends masked frames, expects unmasked ones.
    Client,
    /// Sends unmasked frames, expects masked ones.
    Server,
}

/// Limits and options of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Largest frame payload accepted; a longer announced length fails the
    /// connection with 1009 before any of it is buffered.
    pub max_frame_size: usize,
    /// Largest message accepted (after decompression): 1009 beyond it.
    pub max_message_size: usize,
    /// Largest opening handshake accepted (request or response head).
    pub max_handshake_size: usize,
    /// permessage-deflate: `None` to neither offer nor accept it.
    pub deflate: Option<DeflateConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            max_handshake_size: 16 << 10,
            deflate: None,
        }
    }
}

/// What the peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete text message.
    Text(Utf8Text),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping; the pong has already been queued.
    Ping(Bytes),
    /// A pong (solicited or not).
    Pong(Bytes),
    /// The peer's close frame (`None`: no status code). The reply, if one
    /// was due, has been queued; nothing more will be received.
    Close(Option<CloseFrame>),
}

/// An event borrowed from the bytes just read: what
/// [`Connection::receive_in_place`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRef<'a> {
    /// A complete text message.
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping; the pong has already been queued.
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// The peer's close frame (see [`Event::Close`]).
    Close(Option<&'a CloseFrame>),
}

impl Event {
    /// The event, borrowed.
    pub fn as_event_ref(&self) -> EventRef<'_> {
        match self {
            Event::Text(text) => EventRef::Text(text.as_str()),
            Event::Binary(data) => EventRef::Binary(data),
            Event::Ping(data) => EventRef::Ping(data),
            Event::Pong(data) => EventRef::Pong(data),
            Event::Close(frame) => EventRef::Close(frame.as_ref()),
        }
    }
}

/// Where the closing handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// This side sent a close frame and awaits the peer's.
    Closing,
    /// Close frames went both ways, or the connection failed: once the
    /// pending output is written, the transport should be closed (by the
    /// server at once; by a client after the server closes it, or a timeout).
    Closed,
}

#[derive(Debug, Clone, Copy)]
struct IncomingFrame {
    header: FrameHeader,
    /// Payload bytes at the start of the input buffer already unmasked and checked.
    ready: usize,
    /// This frame carries uncompressed text to validate as it arrives.
    validate: bool,
}

#[derive(Debug)]
struct IncomingMessage {
    text: bool,
    compressed: bool,
    /// Assembled (or inflated) payload of the fragments so far.
    buf: Vec<u8>,
    /// Bytes announced so far (uncompressed messages), checked against the limit.
    size: usize,
    utf8: Utf8Validator,
}

/// What a connection holds only while bytes are in flight, boxed in
/// [`Connection`]: an idle connection pays a pointer for it, not its
/// 176 bytes (idle connections are counted in thousands).
#[derive(Debug, Default)]
struct InFlight {
    input: BytesMut,
    /// Output written before `output`: sealed parts of it and large
    /// payloads queued by reference (see `send_binary_bytes`).
    output_chunks: VecDeque<Bytes>,
    /// The output being appended to.
    output: BytesMut,
    frame: Option<IncomingFrame>,
    message: Option<IncomingMessage>,
}

impl InFlight {
    fn is_idle(&self) -> bool {
        self.input.is_empty()
            && self.output.is_empty()
            && self.output_chunks.is_empty()
            && self.frame.is_none()
            && self.message.is_none()
    }
}

/// The in-flight buffers of a connection whose bytes are all parsed and
/// written, taken out with [`Connection::take_idle_buffers`] to be given
/// to another connection (or the same one) with
/// [`Connection::give_buffers`]. A server answering many connections keeps
/// a few of these, so that a message and its answer do not allocate and
/// free a connection's buffers each time (an idle connection still holds
/// none).
#[derive(Debug)]
pub struct IdleBuffers(Box<InFlight>);

/// The largest output buffer [`Connection::take_idle_buffers`] hands out
/// for reuse: one a burst grew beyond it goes back to the allocator.
const REUSE_MAX: usize = 4 * OUTPUT_START;

#[derive(Debug)]
struct Compression {
    threshold: usize,
    deflater: Deflater,
    inflater: Inflater,
    scratch: Vec<u8>,
}

/// A WebSocket connection after the opening handshake.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    config: Config,
    state: State,
    /// Made when bytes come in or go out; given back by
    /// `release_idle_buffers` once all of it is empty.
    flight: Option<Box<InFlight>>,
    /// Whether a fragmented message is being sent, and whether it is text.
    sending_fragmented: bool,
    /// Boxed: a connection without permessage-deflate pays 8 bytes for it,
    /// not the codec's 344 (idle connections are counted in thousands).
    compression: Option<Box<Compression>>,
    deflate_params: Option<DeflateParams>,
    close_received: bool,
    close_sent: bool,
    /// Boxed: rare, and every idle connection would carry its size.
    failure: Option<Box<ProtocolError>>,
}

impl Connection {
    /// A connection in the open state. `deflate` holds the permessage-deflate
    /// parameters agreed in the handshake, if any.
    pub fn new(role: Role, config: Config, deflate: Option<DeflateParams>) -> Connection {
        let compression = deflate.map(|p| {
            let cfg = config.deflate.clone().unwrap_or_default();
            let (our_bits, our_reset, peer_reset) = match role {
                Role::Server => (
                    p.server_max_window_bits,
                    p.server_no_context_takeover,
                    p.client_no_context_takeover,
                ),
                Role::Client => (
                    p.client_max_window_bits,
                    p.client_no_context_takeover,
                    p.server_no_context_takeover,
                ),
            };
            Box::new(Compression {
                threshold: cfg.threshold,
                deflater: Deflater::new(cfg.level, our_bits, our_reset),
                inflater: Inflater::new(peer_reset),
                scratch: Vec::new(),
            })
        });
        Connection {
            role,
            config,
            state: State::Open,
            flight: None,
            sending_fragmented: false,
            compression,
            deflate_params: deflate,
            close_received: false,
            close_sent: false,
            failure: None,
        }
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The closing-handshake state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The limits in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The permessage-deflate parameters agreed in the handshake.
    pub fn deflate_params(&self) -> Option<DeflateParams> {
        self.deflate_params
    }

    /// Whether the peer's close frame has arrived.
    pub fn close_received(&self) -> bool {
        self.close_received
    }

    /// Whether this side has sent (queued) its close frame.
    pub fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// The protocol error that failed the connection, if one did.
    pub fn failure(&self) -> Option<&ProtocolError> {
        self.failure.as_deref()
    }

    // ---- receiving -------------------------------------------------------

    /// The buffer network bytes are read into. Call
    /// [`next_event`](Self::next_event) after adding to it.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.flight().input
    }

    /// Bytes received and not parsed yet.
    pub fn input_len(&self) -> usize {
        self.flight.as_ref().map_or(0, |f| f.input.len())
    }

    /// The in-flight state, made on first use.
    fn flight(&mut self) -> &mut InFlight {
        self.flight.get_or_insert_with(Box::default)
    }

    /// Appends bytes received from the network.
    pub fn receive_data(&mut self, data: &[u8]) {
        if !self.receiving_done() && !data.is_empty() {
            // A large frame on its way: room for its rest (up to 1 MiB at
            // a time) at once, not a buffer doubled piece by piece (its
            // copies, and the allocator's memory they leave behind).
            let wanted = self.bytes_wanted();
            let input = &mut self.flight().input;
            if wanted > data.len() {
                input.reserve(wanted.min(1 << 20));
            }
            input.extend_from_slice(data);
        }
    }

    /// Like [`receive_data`](Connection::receive_data), taking the buffer:
    /// when nothing is buffered it becomes the input as is, so a large read
    /// is parsed (and its messages split off) without a copy.
    pub fn receive_buffer(&mut self, data: BytesMut) {
        if self.receiving_done() {
            return;
        }
        let input = &mut self.flight().input;
        if input.is_empty() {
            *input = data;
        } else {
            input.extend_from_slice(&data);
        }
    }

    /// Parses `data`, just read from the network, handing every event to
    /// `on_event` as it completes. Whole frames of unfragmented,
    /// uncompressed messages and control frames are unmasked in `data`
    /// itself and handed out borrowed from it: nothing is copied or
    /// allocated for them (what an epoll server reading into one buffer
    /// per thread wants). What cannot be done in place (a frame cut off at
    /// the end, a fragmented or compressed message, a close frame, or
    /// anything after bytes already buffered) goes through the
    /// connection's buffer as with [`receive_data`](Self::receive_data)
    /// and [`next_event`](Self::next_event). `on_event` gets the
    /// connection too, to answer.
    ///
    /// # Errors
    /// The protocol error that failed the connection, as `next_event`
    /// returns it (its close frame is queued).
    pub fn receive_in_place(
        &mut self,
        data: &mut [u8],
        mut on_event: impl FnMut(&mut Connection, EventRef<'_>),
    ) -> Result<(), ProtocolError> {
        let used = self.parse_in_place(data, usize::MAX, &mut on_event)?;
        if used < data.len() && !self.receiving_done() {
            self.receive_data(&data[used..]);
            while let Some(event) = self.next_event()? {
                on_event(self, event.as_event_ref());
            }
        }
        Ok(())
    }

    /// The in-place half of [`receive_in_place`](Self::receive_in_place):
    /// parses the frames at the start of `data` that can be handed out
    /// borrowed (payloads up to `max_payload` bytes), and stops at the first
    /// that cannot. Returns the bytes used; the caller hands the rest to
    /// [`receive_data`](Self::receive_data) and takes its events from
    /// [`next_event`](Self::next_event) (owned: a large message can then
    /// be sent on by reference).
    ///
    /// # Errors
    /// As [`receive_in_place`](Self::receive_in_place).
    pub fn parse_in_place(
        &mut self,
        data: &mut [u8],
        max_payload: usize,
        mut on_event: impl FnMut(&mut Connection, EventRef<'_>),
    ) -> Result<usize, ProtocolError> {
        let mut at = 0;
        while at < data.len() && !self.receiving_done() && self.input_idle() {
            let rest = &mut data[at..];
            let (header, len) = match FrameHeader::decode(rest) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break,
                Err(e) => {
                    self.fail(e.clone());
                    return Err(e);
                }
            };
            let Some(total) = usize::try_from(header.payload_len)
                .ok()
                .filter(|&n| n <= max_payload)
                .and_then(|n| n.checked_add(len))
                .filter(|&total| total <= rest.len())
            else {
                break;
            };
            let in_place = match header.opcode {
                OpCode::Text | OpCode::Binary => header.fin && !header.rsv1,
                OpCode::Ping | OpCode::Pong => true,
                OpCode::Continuation | OpCode::Close => false,
            };
            if !in_place {
                break;
            }
            if let Err(e) = self.check_in_place(&header) {
                self.fail(e.clone());
                return Err(e);
            }
            let payload = &mut rest[len..total];
            if let Some(key) = header.mask {
                apply_mask(payload, key, 0);
            }
            at += total;
            match header.opcode {
                OpCode::Text => match simdutf8::basic::from_utf8(payload) {
                    Ok(text) => on_event(self, EventRef::Text(text)),
                    Err(_) => {
                        self.fail(ProtocolError::InvalidUtf8);
                        return Err(ProtocolError::InvalidUtf8);
                    }
                },
                OpCode::Binary => on_event(self, EventRef::Binary(payload)),
                OpCode::Ping => {
                    if !self.close_sent {
                        self.encode_frame(OpCode::Pong, payload, true, false);
                    }
                    on_event(self, EventRef::Ping(payload));
                }
                _ => on_event(self, EventRef::Pong(payload)),
            }
        }
        Ok(at)
    }

    /// No input buffered, no frame or message under way: the next frame
    /// may be parsed in place.
    fn input_idle(&self) -> bool {
        self.flight
            .as_deref()
            .is_none_or(|f| f.input.is_empty() && f.frame.is_none() && f.message.is_none())
    }

    /// What `check_header` checks, for a frame parsed in place: a whole
    /// text, binary, ping or pong frame, no message under way.
    fn check_in_place(&self, h: &FrameHeader) -> Result<(), ProtocolError> {
        if self.check_frame(h)? {
            let limit = self.config.max_message_size;
            if h.payload_len > limit as u64 {
                return Err(ProtocolError::MessageTooBig { limit });
            }
        }
        Ok(())
    }

    /// The checks of a frame on its own (§5.2, §5.4, §5.5): reserved bits,
    /// masking, control frame rules, the frame size limit. Returns whether
    /// it is a data frame (a control frame is done with here).
    fn check_frame(&self, h: &FrameHeader) -> Result<bool, ProtocolError> {
        let rsv1_allowed =
            self.compression.is_some() && matches!(h.opcode, OpCode::Text | OpCode::Binary);
        if (h.rsv1 && !rsv1_allowed) || h.rsv2 || h.rsv3 {
            return Err(ProtocolError::ReservedBits(
                (h.rsv1 as u8) << 2 | (h.rsv2 as u8) << 1 | h.rsv3 as u8,
            ));
        }
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        if h.opcode.is_control() {
            if !h.fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            if h.payload_len > 125 {
                return Err(ProtocolError::ControlFrameTooLong(h.payload_len));
            }
            return Ok(false);
        }
        if h.payload_len > self.config.max_frame_size as u64 {
            return Err(ProtocolError::FrameTooBig {
                size: h.payload_len,
                limit: self.config.max_frame_size,
            });
        }
        Ok(true)
    }

    /// Whether nothing more will be parsed: the peer's close frame arrived,
    /// or the connection failed. Further input is discarded.
    pub fn receiving_done(&self) -> bool {
        self.close_received || self.failure.is_some()
    }

    /// Returns the memory of empty input and output buffers to the
    /// allocator, so an idle connection holds none (call it before waiting
    /// for input). Received messages keep their own bytes.
    pub fn release_idle_buffers(&mut self) {
        let Some(f) = self.flight.as_deref_mut() else {
            return;
        };
        if f.is_idle() && f.output_chunks.capacity() <= 16 {
            self.flight = None;
            return;
        }
        if f.input.is_empty() && f.input.capacity() > 0 {
            f.input = BytesMut::new();
        }
        if f.output.is_empty() && f.output.capacity() > 0 {
            f.output = BytesMut::new();
        }
        if f.output_chunks.is_empty()
            && f.output_chunks.capacity() > 0
            && f.output_chunks.capacity() <= 16
        {
            f.output_chunks = VecDeque::new();
        }
    }

    /// Takes the connection's in-flight buffers out once they are all
    /// empty (nothing to parse, nothing to write, no message under way),
    /// for [`give_buffers`](Self::give_buffers). `None` when something is
    /// in them, or when they grew too large to be worth keeping (then
    /// they are given back to the allocator, as by
    /// [`release_idle_buffers`](Self::release_idle_buffers)).
    pub fn take_idle_buffers(&mut self) -> Option<IdleBuffers> {
        let f = self.flight.as_deref_mut()?;
        if !f.is_idle() {
            return None;
        }
        if f.output.capacity() > REUSE_MAX
            || f.input.capacity() > REUSE_MAX
            || f.output_chunks.capacity() > 16
        {
            self.release_idle_buffers();
            return None;
        }
        let mut f = self.flight.take()?;
        // The written bytes were advanced past: their room is the next
        // burst's (nothing to copy, the buffer is empty).
        let _ = f.output.try_reclaim(OUTPUT_START);
        Some(IdleBuffers(f))
    }

    /// Gives the connection in-flight buffers taken from an idle one, if
    /// it has none of its own; otherwise hands them back.
    pub fn give_buffers(&mut self, buffers: IdleBuffers) -> Option<IdleBuffers> {
        if self.flight.is_some() {
            return Some(buffers);
        }
        self.flight = Some(buffers.0);
        None
    }

    /// Whether the connection holds in-flight buffers.
    pub fn has_buffers(&self) -> bool {
        self.flight.is_some()
    }

    /// How many more bytes the frame being received needs (a hint for read
    /// buffer sizing; 0 when no frame is in progress).
    pub fn bytes_wanted(&self) -> usize {
        self.flight.as_ref().map_or(0, |f| {
            f.frame.map_or(0, |frame| {
                (frame.header.payload_len as usize).saturating_sub(f.input.len())
            })
        })
    }

    /// The transport ended (EOF). The connection is closed; if no close frame
    /// was received, the close was abnormal (1006).
    pub fn receive_eof(&mut self) {
        self.state = State::Closed;
        if let Some(f) = self.flight.as_deref_mut() {
            f.input.clear();
        }
    }

    /// Parses the next event from the buffered input. `Ok(None)`: more bytes
    /// are needed (or nothing more will come). A protocol error fails the
    /// connection: the close frame with the matching code is queued, the
    /// state becomes [`State::Closed`] and the error is returned once.
    pub fn next_event(&mut self) -> Result<Option<Event>, ProtocolError> {
        if self.receiving_done() {
            if let Some(f) = self.flight.as_deref_mut() {
                f.input.clear();
            }
            return Ok(None);
        }
        if self.flight.is_none() {
            return Ok(None);
        }
        match self.parse() {
            Ok(event) => Ok(event),
            Err(err) => {
                self.fail(err.clone());
                Err(err)
            }
        }
    }

    fn parse(&mut self) -> Result<Option<Event>, ProtocolError> {
        loop {
            let mut frame = match self.flight().frame {
                Some(frame) => frame,
                None => {
                    let Some((header, len)) = FrameHeader::decode(&self.flight().input)? else {
                        return Ok(None);
                    };
                    let validate = self.check_header(&header)?;
                    self.flight().input.advance(len);
                    IncomingFrame {
                        header,
                        ready: 0,
                        validate,
                    }
                }
            };
            let len = frame.header.payload_len as usize;
            let f = self.flight();
            let available = f.input.len().min(len);
            if available > frame.ready {
                let fresh = &mut f.input[frame.ready..available];
                if let Some(key) = frame.header.mask {
                    apply_mask(fresh, key, frame.ready);
                }
                if frame.validate {
                    let message = f.message.as_mut().expect("text frame belongs to a message");
                    message
                        .utf8
                        .feed(fresh)
                        .map_err(|_| ProtocolError::InvalidUtf8)?;
                }
                frame.ready = available;
            }
            if available < len {
                f.frame = Some(frame);
                return Ok(None);
            }
            f.frame = None;
            let payload = f.input.split_to(len);
            if let Some(event) = self.complete_frame(frame.header, payload)? {
                return Ok(Some(event));
            }
        }
    }

    /// Checks a header against the connection state and limits (§5.2,
    /// §5.4, §5.5, RFC 7692 §6.1). Starts a message for a new data frame.
    /// Returns whether the payload is uncompressed text to validate.
    fn check_header(&mut self, h: &FrameHeader) -> Result<bool, ProtocolError> {
        if !self.check_frame(h)? {
            return Ok(false);
        }
        let len = h.payload_len as usize;
        let limit = self.config.max_message_size;
        match (h.opcode, &mut self.flight().message) {
            (OpCode::Continuation, None) => Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(m)) => {
                m.size = m.size.saturating_add(len);
                if !m.compressed && m.size > limit {
                    return Err(ProtocolError::MessageTooBig { limit });
                }
                Ok(m.text && !m.compressed)
            }
            (_, Some(_)) => Err(ProtocolError::ExpectedContinuation),
            (opcode, None) => {
                if !h.rsv1 && len > limit {
                    return Err(ProtocolError::MessageTooBig { limit });
                }
                let text = opcode == OpCode::Text;
                self.flight().message = Some(IncomingMessage {
                    text,
                    compressed: h.rsv1,
                    buf: Vec::new(),
                    size: len,
                    utf8: Utf8Validator::new(),
                });
                Ok(text && !h.rsv1)
            }
        }
    }

    fn complete_frame(
        &mut self,
        h: FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Event>, ProtocolError> {
        match h.opcode {
            OpCode::Ping => {
                if !self.close_sent {
                    self.encode_frame(OpCode::Pong, &payload, true, false);
                }
                Ok(Some(Event::Ping(payload.freeze())))
            }
            OpCode::Pong => Ok(Some(Event::Pong(payload.freeze()))),
            OpCode::Close => {
                let frame = CloseFrame::decode(payload.freeze())?;
                self.close_received = true;
                if !self.close_sent {
                    // Echo the code (§5.5.1); the reason is ours to omit.
                    let reply = frame.as_ref().map(|f| CloseFrame::new(f.code, ""));
                    self.queue_close(reply.as_ref());
                }
                self.state = State::Closed;
                self.flight().input.clear();
                Ok(Some(Event::Close(frame)))
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                self.complete_data_frame(h, payload)
            }
        }
    }

    fn complete_data_frame(
        &mut self,
        h: FrameHeader,
        payload: BytesMut,
    ) -> Result<Option<Event>, ProtocolError> {
        let limit = self.config.max_message_size;
        let f = self.flight.as_deref_mut().expect("a frame is in flight");
        let message = f.message.as_mut().expect("checked in check_header");
        if message.compressed {
            let compression = self.compression.as_mut().expect("rsv1 only with deflate");
            let start = message.buf.len();
            compression
                .inflater
                .inflate(&payload, &mut message.buf, limit)?;
            if h.fin {
                compression
                    .inflater
                    .finish_message(&mut message.buf, limit)?;
            }
            if message.text {
                message
                    .utf8
                    .feed(&message.buf[start..])
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
            }
        } else if h.fin && message.buf.is_empty() {
            // The whole message is this frame: hand out the read buffer's bytes.
            let message = f.message.take().expect("present");
            return Ok(Some(finish_message(message, payload.freeze())?));
        } else {
            message.buf.extend_from_slice(&payload);
        }
        if !h.fin {
            return Ok(None);
        }
        let mut message = f.message.take().expect("present");
        let data = Bytes::from(std::mem::take(&mut message.buf));
        Ok(Some(finish_message(message, data)?))
    }

    fn fail(&mut self, err: ProtocolError) {
        if !self.close_sent {
            let mut reason = err.to_string();
            if reason.len() > MAX_REASON_LEN {
                let mut end = MAX_REASON_LEN;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            self.queue_close(Some(&CloseFrame::new(err.close_code(), reason)));
        }
        self.failure = Some(Box::new(err));
        self.state = State::Closed;
        if let Some(f) = self.flight.as_deref_mut() {
            f.input = BytesMut::new();
            f.frame = None;
            f.message = None;
        }
    }

    // ---- sending ---------------------------------------------------------

    /// The next bytes waiting to be written to the network (the first
    /// chunk of the output: write it, then [`consume_output`]; or write
    /// them all at once with [`pending_output_slices`]).
    ///
    /// [`consume_output`]: Connection::consume_output
    /// [`pending_output_slices`]: Connection::pending_output_slices
    pub fn pending_output(&self) -> &[u8] {
        let Some(f) = self.flight.as_deref() else {
            return &[];
        };
        match f.output_chunks.front() {
            Some(chunk) => chunk,
            None => &f.output,
        }
    }

    /// Fills `slices` with the pending output, in order, for a vectored
    /// write; returns how many were filled.
    pub fn pending_output_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let Some(f) = self.flight.as_deref() else {
            return 0;
        };
        if f.output_chunks.is_empty() {
            if f.output.is_empty() || slices.is_empty() {
                return 0;
            }
            slices[0] = IoSlice::new(&f.output);
            return 1;
        }
        let chunks = f.output_chunks.iter().map(|c| &c[..]);
        let all = chunks.chain(std::iter::once(&f.output[..]));
        let mut n = 0;
        for (slot, chunk) in slices.iter_mut().zip(all.filter(|c| !c.is_empty())) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }

    /// How many bytes are waiting to be written.
    pub fn pending_output_len(&self) -> usize {
        self.flight.as_deref().map_or(0, |f| {
            f.output_chunks.iter().map(Bytes::len).sum::<usize>() + f.output.len()
        })
    }

    /// Marks the first `n` pending bytes as written (they may span chunks).
    pub fn consume_output(&mut self, mut n: usize) {
        let Some(f) = self.flight.as_deref_mut() else {
            return;
        };
        while n > 0 {
            let Some(chunk) = f.output_chunks.front_mut() else {
                if n == f.output.len() {
                    // All of it: the buffer's room starts over at its
                    // beginning for the next frames.
                    f.output.clear();
                } else {
                    f.output.advance(n);
                }
                return;
            };
            if n < chunk.len() {
                chunk.advance(n);
                return;
            }
            n -= chunk.len();
            f.output_chunks.pop_front();
        }
    }

    /// Takes all pending output at once.
    pub fn take_output(&mut self) -> BytesMut {
        let len = self.pending_output_len();
        let Some(f) = self.flight.as_deref_mut() else {
            return BytesMut::new();
        };
        if f.output_chunks.is_empty() {
            return f.output.split();
        }
        let mut all = BytesMut::with_capacity(len);
        for chunk in f.output_chunks.drain(..) {
            all.extend_from_slice(&chunk);
        }
        all.extend_from_slice(&f.output.split());
        all
    }

    /// Whether anything is waiting to be written.
    pub fn has_pending_output(&self) -> bool {
        self.flight
            .as_deref()
            .is_some_and(|f| !f.output_chunks.is_empty() || !f.output.is_empty())
    }

    fn check_can_send(&self) -> Result<(), UsageError> {
        if self.close_sent || self.failure.is_some() || self.state == State::Closed {
            Err(UsageError::Closed)
        } else {
            Ok(())
        }
    }

    /// Queues a text message (compressed when negotiated and long enough).
    pub fn send_text(&mut self, text: &str) -> Result<(), UsageError> {
        self.send_message(OpCode::Text, text.as_bytes())
    }

    /// Queues a binary message (compressed when negotiated and long enough).
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), UsageError> {
        self.send_message(OpCode::Binary, data)
    }

    /// Queues a binary message held in `Bytes`: like [`send_binary`], but a
    /// large uncompressed payload from the server side is queued by
    /// reference, not copied (written with a vectored write; a server
    /// echoing or fanning out a message never copies its payload).
    ///
    /// [`send_binary`]: Connection::send_binary
    pub fn send_binary_bytes(&mut self, data: Bytes) -> Result<(), UsageError> {
        self.send_message_bytes(OpCode::Binary, data)
    }

    /// Queues a text message held in [`Utf8Text`], without copying a large
    /// payload (see [`send_binary_bytes`](Connection::send_binary_bytes)).
    pub fn send_text_bytes(&mut self, text: Utf8Text) -> Result<(), UsageError> {
        self.send_message_bytes(OpCode::Text, text.into_bytes())
    }

    fn send_message_bytes(&mut self, opcode: OpCode, data: Bytes) -> Result<(), UsageError> {
        // Below this, copying costs less than a separate chunk.
        const BY_REFERENCE_MIN: usize = 4096;
        let compressed = self
            .compression
            .as_ref()
            .is_some_and(|c| data.len() >= c.threshold);
        if data.len() < BY_REFERENCE_MIN || compressed || self.role == Role::Client {
            return self.send_message(opcode, &data);
        }
        self.check_can_send()?;
        if self.sending_fragmented {
            return Err(UsageError::FragmentOrder(
                "a fragmented message is still being sent",
            ));
        }
        FrameHeader {
            fin: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask: None,
            payload_len: data.len() as u64,
        }
        .encode(&mut self.flight().output);
        // Seal what is buffered (the header included); the rest of the
        // buffer's capacity stays for what follows.
        let f = self.flight();
        let sealed = f.output.split().freeze();
        f.output_chunks.push_back(sealed);
        f.output_chunks.push_back(data);
        Ok(())
    }

    fn send_message(&mut self, opcode: OpCode, data: &[u8]) -> Result<(), UsageError> {
        self.check_can_send()?;
        if self.sending_fragmented {
            return Err(UsageError::FragmentOrder(
                "a fragmented message is still being sent",
            ));
        }
        match &mut self.compression {
            Some(c) if data.len() >= c.threshold => {
                let mut scratch = std::mem::take(&mut c.scratch);
                scratch.clear();
                c.deflater.compress(data, &mut scratch);
                self.encode_frame(opcode, &scratch, true, true);
                let c = self.compression.as_mut().expect("present");
                // Keep a modest scratch buffer for the next message, not a huge one.
                if scratch.capacity() <= 64 << 10 {
                    c.scratch = scratch;
                }
            }
            _ => self.encode_frame(opcode, data, true, false),
        }
        Ok(())
    }

    /// Queues one frame of a message sent in fragments (never compressed).
    /// The first fragment has `opcode` Text or Binary, the following ones
    /// Continuation; `fin` ends the message. The caller keeps text fragments
    /// valid UTF-8 as a whole.
    pub fn send_fragment(
        &mut self,
        opcode: OpCode,
        data: &[u8],
        fin: bool,
    ) -> Result<(), UsageError> {
        self.check_can_send()?;
        match (opcode, self.sending_fragmented) {
            (OpCode::Text | OpCode::Binary, false) | (OpCode::Continuation, true) => {}
            (OpCode::Continuation, false) => {
                return Err(UsageError::FragmentOrder(
                    "continuation without a first fragment",
                ))
            }
            (OpCode::Text | OpCode::Binary, true) => {
                return Err(UsageError::FragmentOrder(
                    "a fragmented message is still being sent",
                ))
            }
            _ => {
                return Err(UsageError::FragmentOrder(
                    "control frames are never fragmented",
                ))
            }
        }
        self.sending_fragmented = !fin;
        self.encode_frame(opcode, data, fin, false);
        Ok(())
    }

    /// Queues a ping (payload at most 125 bytes).
    pub fn send_ping(&mut self, data: &[u8]) -> Result<(), UsageError> {
        self.send_control(OpCode::Ping, data)
    }

    /// Queues an unsolicited pong (payload at most 125 bytes).
    pub fn send_pong(&mut self, data: &[u8]) -> Result<(), UsageError> {
        self.send_control(OpCode::Pong, data)
    }

    fn send_control(&mut self, opcode: OpCode, data: &[u8]) -> Result<(), UsageError> {
        self.check_can_send()?;
        if data.len() > 125 {
            return Err(UsageError::ControlPayloadTooLong(data.len()));
        }
        self.encode_frame(opcode, data, true, false);
        Ok(())
    }

    /// Starts (or completes) the closing handshake with a code and reason;
    /// `None` sends a close frame without a status code.
    pub fn send_close(&mut self, frame: Option<CloseFrame>) -> Result<(), UsageError> {
        self.check_can_send()?;
        if let Some(f) = &frame {
            if !f.code.is_sendable() {
                return Err(UsageError::InvalidCloseCode(f.code.0));
            }
            if f.reason.len() > MAX_REASON_LEN {
                return Err(UsageError::CloseReasonTooLong(f.reason.len()));
            }
        }
        self.queue_close(frame.as_ref());
        Ok(())
    }

    fn queue_close(&mut self, frame: Option<&CloseFrame>) {
        let mut payload = BytesMut::new();
        if let Some(f) = frame {
            f.encode_payload(&mut payload);
        }
        self.encode_frame(OpCode::Close, &payload, true, false);
        self.close_sent = true;
        self.state = if self.close_received {
            State::Closed
        } else {
            State::Closing
        };
    }

    fn encode_frame(&mut self, opcode: OpCode, payload: &[u8], fin: bool, rsv1: bool) {
        let mask = match self.role {
            Role::Client => Some(rand::random::<[u8; 4]>()),
            Role::Server => None,
        };
        let header = FrameHeader {
            fin,
            rsv1,
            rsv2: false,
            rsv3: false,
            opcode,
            mask,
            payload_len: payload.len() as u64,
        };
        if mask.is_none() && payload.len() <= 125 {
            // The usual small message from a server: its two header bytes
            // copied as two, not through the longest header's array.
            let output = &mut self.flight().output;
            reserve_output(output, 2 + payload.len(), opcode.is_control());
            output.extend_from_slice(&[header.first_byte(), payload.len() as u8]);
            output.extend_from_slice(payload);
            return;
        }
        let (head, head_len) = header.to_bytes();
        let output = &mut self.flight().output;
        reserve_output(output, head_len + payload.len(), opcode.is_control());
        output.extend_from_slice(&head[..head_len]);
        let start = output.len();
        output.extend_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut output[start..], key, 0);
        }
    }
}

/// Room in `output` for `needed` more bytes.
fn reserve_output(output: &mut BytesMut, needed: usize, control: bool) {
    if output.capacity() == 0 && !control {
        // The output is given back whenever it is written out (an idle
        // connection holds none): start a burst of messages with room for
        // several rather than growing (and copying) it frame by frame. Not
        // for control frames: a close or a ping sent to thousands of idle
        // connections at once must stay small.
        output.reserve(needed.max(OUTPUT_START));
    } else {
        output.reserve(needed);
    }
}

fn finish_message(mut message: IncomingMessage, data: Bytes) -> Result<Event, ProtocolError> {
    if message.text {
        message
            .utf8
            .finish()
            .map_err(|_| ProtocolError::InvalidUtf8)?;
        Ok(Event::Text(Utf8Text::from_validated(data)))
    } else {
        Ok(Event::Binary(data))
    }
}
