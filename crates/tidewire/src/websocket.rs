//! The [`WebSocket`] handle and its split halves.
//!
//! A thin loop around [`tidewire_proto::Connection`]: read bytes into the
//! connection's buffer, take events out, write its pending output. All state
//! lives in the connection and in [`Inner`], never in a future, so every
//! `.await` here is cancel-safe: dropping a `recv` or `flush` future loses
//! nothing.
//!
//! The closing sequence: once the peer's close frame (or a protocol error)
//! is seen, the reply is flushed; a server (or any side after an error)
//! shuts its write side down first, then everybody reads until the peer's
//! EOF or the close timeout, and only then is the final
//! [`Message::Close`] or error handed to the application.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tidewire_proto::{CloseCode, CloseFrame, Connection, Event, OpCode, Role, State, Utf8Text};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use crate::{Error, Message};

/// Options of the I/O loop (the protocol limits live in
/// [`tidewire_proto::Config`]).
#[derive(Debug, Clone)]
pub struct IoOptions {
    /// How long to wait for the peer's close frame after sending ours, and
    /// for the transport to end after the closing handshake.
    pub close_timeout: Duration,
    /// Bytes requested from the transport per read.
    pub read_chunk: usize,
    /// Queued output beyond which `Sink::poll_ready` flushes first.
    pub write_high_water: usize,
}

impl Default for IoOptions {
    fn default() -> Self {
        IoOptions {
            close_timeout: Duration::from_secs(10),
            read_chunk: 16 * 1024,
            write_high_water: 64 * 1024,
        }
    }
}

enum ReadState {
    Open,
    /// The outcome is known; finishing the transport before reporting it.
    Draining {
        result: Result<Message, Error>,
        shut_down: bool,
    },
    Done,
}

/// Which task polls a write: the reader (flushing pongs and close replies)
/// or the writer. Each keeps its own waker, so a split pair never loses a
/// wake-up when both wait on the same transport.
#[derive(Clone, Copy)]
enum Side {
    Reader = 0,
    Writer = 1,
}

pub(crate) struct Inner<S> {
    io: S,
    conn: Connection,
    options: IoOptions,
    read_state: ReadState,
    deadline: Option<Pin<Box<Sleep>>>,
    write_wakers: [Option<Waker>; 2],
    protocol: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Inner<S> {
    fn poll_write_out(&mut self, cx: &mut Context<'_>, side: Side) -> Poll<Result<(), Error>> {
        let result = self.poll_write_out_inner(cx);
        match &result {
            Poll::Pending => {
                let slot = &mut self.write_wakers[side as usize];
                if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *slot = Some(cx.waker().clone());
                }
            }
            Poll::Ready(_) => {
                for waker in self.write_wakers.iter_mut().filter_map(Option::take) {
                    waker.wake();
                }
            }
        }
        result
    }

    fn poll_write_out_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while self.conn.has_pending_output() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.conn.pending_output()))?;
            if n == 0 {
                return Poll::Ready(Err(
                    std::io::Error::from(std::io::ErrorKind::WriteZero).into()
                ));
            }
            self.conn.consume_output(n);
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    fn arm_deadline(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(self.options.close_timeout)));
        }
    }

    fn deadline_passed(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }

    fn start_draining(&mut self, result: Result<Message, Error>) {
        self.read_state = ReadState::Draining {
            result,
            shut_down: false,
        };
        self.deadline = None;
        self.arm_deadline();
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        loop {
            match &mut self.read_state {
                ReadState::Done => return Poll::Ready(None),
                ReadState::Draining { .. } => return self.poll_drain(cx).map(Some),
                ReadState::Open => {}
            }
            if self.conn.has_pending_output() {
                if let Err(e) = ready!(self.poll_write_out(cx, Side::Reader)) {
                    self.read_state = ReadState::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if self.conn.close_sent() {
                // Our close is out: the peer has close_timeout to answer.
                self.arm_deadline();
                if self.deadline_passed(cx) {
                    self.start_draining(Err(Error::AbnormalClosure));
                    continue;
                }
            }
            match self.conn.next_event() {
                Ok(Some(Event::Close(frame))) => self.start_draining(Ok(Message::Close(frame))),
                Ok(Some(event)) => return Poll::Ready(Some(Ok(event.into()))),
                Err(e) => self.start_draining(Err(e.into())),
                Ok(None) => {
                    let want = self
                        .options
                        .read_chunk
                        .max(self.conn.bytes_wanted().min(1 << 20));
                    let buf = self.conn.input_buffer();
                    buf.reserve(want);
                    match ready!(tokio_util::io::poll_read_buf(
                        Pin::new(&mut self.io),
                        cx,
                        buf
                    )) {
                        Ok(0) => {
                            self.conn.receive_eof();
                            self.read_state = ReadState::Done;
                            return Poll::Ready(Some(Err(Error::AbnormalClosure)));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            self.conn.receive_eof();
                            self.read_state = ReadState::Done;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                }
            }
        }
    }

    /// Flushes the close reply, shuts the transport down in the right order
    /// and waits (bounded) for the peer's EOF, then yields the outcome.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, Error>> {
        let close_first = self.conn.role() == Role::Server || self.conn.failure().is_some();
        let timed_out = self.deadline_passed(cx);
        if !timed_out
            && self.conn.has_pending_output()
            && ready!(self.poll_write_out(cx, Side::Reader)).is_err()
        {
            return self.finish_drain();
        }
        if close_first && !timed_out {
            if let ReadState::Draining {
                shut_down: false, ..
            } = self.read_state
            {
                let _ = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
                if let ReadState::Draining { shut_down, .. } = &mut self.read_state {
                    *shut_down = true;
                }
            }
        }
        if !timed_out {
            let mut scratch = BytesMut::with_capacity(4096);
            loop {
                scratch.clear();
                match ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut self.io),
                    cx,
                    &mut scratch
                )) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        self.finish_drain()
    }

    fn finish_drain(&mut self) -> Poll<Result<Message, Error>> {
        let state = std::mem::replace(&mut self.read_state, ReadState::Done);
        let ReadState::Draining { result, shut_down } = state else {
            unreachable!("finish_drain outside Draining")
        };
        if !shut_down {
            // Best effort, without waiting: the peer is gone or done.
            let waker = Waker::noop();
            let _ = Pin::new(&mut self.io).poll_shutdown(&mut Context::from_waker(waker));
        }
        self.conn.receive_eof();
        self.deadline = None;
        Poll::Ready(result)
    }

    fn start_send(&mut self, message: Message) -> Result<(), Error> {
        match message {
            Message::Text(t) => self.conn.send_text(&t)?,
            Message::Binary(b) => self.conn.send_binary(&b)?,
            Message::Ping(b) => self.conn.send_ping(&b)?,
            Message::Pong(b) => self.conn.send_pong(&b)?,
            Message::Close(frame) => self.conn.send_close(frame)?,
        }
        Ok(())
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>, side: Side) -> Poll<Result<(), Error>> {
        if self.conn.pending_output().len() >= self.options.write_high_water {
            ready!(self.poll_write_out(cx, side))?;
        }
        Poll::Ready(Ok(()))
    }
}

/// A WebSocket connection over any `AsyncRead + AsyncWrite` transport.
///
/// Receive with [`recv`](Self::recv) (or as a `Stream`), send with
/// [`send`](Self::send) (or as a `Sink`), close with
/// [`close`](Self::close), and [`split`](Self::split) into halves for
/// separate tasks.
pub struct WebSocket<S> {
    inner: Inner<S>,
}

impl<S> std::fmt::Debug for WebSocket<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket")
            .field("role", &self.inner.conn.role())
            .field("state", &self.inner.conn.state())
            .field("protocol", &self.inner.protocol)
            .finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocket<S> {
    /// Wraps a transport on which the opening handshake is done. `leftover`
    /// holds bytes read past the handshake (the first frames, if any).
    pub fn from_parts(
        io: S,
        mut conn: Connection,
        leftover: &[u8],
        protocol: Option<String>,
        options: IoOptions,
    ) -> WebSocket<S> {
        conn.receive_data(leftover);
        WebSocket {
            inner: Inner {
                io,
                conn,
                options,
                read_state: ReadState::Open,
                deadline: None,
                write_wakers: [None, None],
                protocol,
            },
        }
    }

    /// Receives the next message. `None` once the connection is over.
    ///
    /// A [`Message::Close`] arrives after the closing handshake completed;
    /// `None` follows. Errors end the connection too (the close frame with
    /// the right code has been sent for protocol errors).
    ///
    /// # Cancel safety
    /// Cancel-safe: no received data is lost if the future is dropped.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        poll_fn(|cx| self.inner.poll_recv(cx)).await
    }

    /// Sends a message and flushes it to the transport.
    ///
    /// # Errors
    /// [`Error::Usage`] after a close was sent; [`Error::Io`] when the
    /// transport fails.
    ///
    /// # Cancel safety
    /// If cancelled, the message may be partly written; the rest stays
    /// queued and goes out with the next send or flush.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        self.inner.start_send(message.into())?;
        self.flush().await
    }

    /// Queues a message without flushing (see [`flush`](Self::flush)).
    pub fn feed(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        self.inner.start_send(message.into())
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), Error> {
        poll_fn(|cx| self.inner.poll_write_out(cx, Side::Writer)).await
    }

    /// Sends a text message.
    pub async fn send_text(&mut self, text: impl Into<Utf8Text>) -> Result<(), Error> {
        self.send(Message::Text(text.into())).await
    }

    /// Sends a binary message.
    pub async fn send_binary(&mut self, data: impl Into<bytes::Bytes>) -> Result<(), Error> {
        self.send(Message::Binary(data.into())).await
    }

    /// Sends one frame of a message sent in pieces (for streaming a message
    /// whose size is not known up front): `opcode` is `Text` or `Binary` for
    /// the first piece and `Continuation` after; `fin` marks the last.
    /// Fragments are never compressed. Text pieces must form valid UTF-8
    /// once joined.
    ///
    /// # Errors
    /// [`Error::Usage`] when fragments are out of order or after close.
    pub async fn send_fragment(
        &mut self,
        opcode: OpCode,
        data: &[u8],
        fin: bool,
    ) -> Result<(), Error> {
        self.inner.conn.send_fragment(opcode, data, fin)?;
        self.flush().await
    }

    /// Sends a ping.
    pub async fn ping(&mut self, data: impl Into<bytes::Bytes>) -> Result<(), Error> {
        self.send(Message::Ping(data.into())).await
    }

    /// Closes the connection: sends a close frame with `code` and `reason`,
    /// discards messages until the peer answers, and ends the transport.
    /// Returns the peer's close frame.
    ///
    /// # Errors
    /// [`Error::AbnormalClosure`] when the peer does not answer within the
    /// close timeout.
    pub async fn close(
        &mut self,
        code: impl Into<CloseCode>,
        reason: impl Into<Utf8Text>,
    ) -> Result<Option<CloseFrame>, Error> {
        if !self.inner.conn.close_sent() && self.inner.conn.state() == State::Open {
            self.inner.start_send(Message::close(code, reason))?;
        }
        while let Some(msg) = self.recv().await {
            if let Message::Close(frame) = msg? {
                return Ok(frame);
            }
        }
        Ok(None)
    }

    /// The subprotocol agreed in the handshake.
    pub fn protocol(&self) -> Option<&str> {
        self.inner.protocol.as_deref()
    }

    /// The protocol state machine (limits, deflate parameters, state).
    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }

    /// The underlying transport.
    pub fn get_ref(&self) -> &S {
        &self.inner.io
    }

    /// Bytes queued for sending and not yet written (like the browser's
    /// `bufferedAmount`).
    pub fn buffered_amount(&self) -> usize {
        self.inner.conn.pending_output().len()
    }

    /// Splits into a reader and a writer usable from separate tasks. The
    /// reader still answers pings and closes by itself.
    pub fn split(self) -> (WebSocketReader<S>, WebSocketWriter<S>) {
        let shared = Arc::new(Mutex::new(self.inner));
        (
            WebSocketReader {
                shared: shared.clone(),
            },
            WebSocketWriter { shared },
        )
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> futures_core::Stream for WebSocket<S> {
    type Item = Result<Message, Error>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().inner.poll_recv(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> futures_sink::Sink<Message> for WebSocket<S> {
    type Error = Error;
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().inner.poll_ready(cx, Side::Writer)
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        self.get_mut().inner.start_send(item)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.get_mut().inner.poll_write_out(cx, Side::Writer)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let inner = &mut self.get_mut().inner;
        if !inner.conn.close_sent() && inner.conn.state() == State::Open {
            inner.start_send(Message::Close(Some(CloseFrame::new(CloseCode::NORMAL, ""))))?;
        }
        inner.poll_write_out(cx, Side::Writer)
    }
}

fn lock<S>(shared: &Mutex<Inner<S>>) -> std::sync::MutexGuard<'_, Inner<S>> {
    // A panic while holding the lock cannot leave Inner half-updated in a
    // way that matters more than the panic itself; keep serving.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// The receiving half of a split [`WebSocket`].
pub struct WebSocketReader<S> {
    shared: Arc<Mutex<Inner<S>>>,
}

/// The sending half of a split [`WebSocket`].
pub struct WebSocketWriter<S> {
    shared: Arc<Mutex<Inner<S>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketReader<S> {
    /// Receives the next message; see [`WebSocket::recv`].
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        poll_fn(|cx| lock(&self.shared).poll_recv(cx)).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketWriter<S> {
    /// Sends a message and flushes it; see [`WebSocket::send`].
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        lock(&self.shared).start_send(message.into())?;
        self.flush().await
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), Error> {
        poll_fn(|cx| lock(&self.shared).poll_write_out(cx, Side::Writer)).await
    }

    /// Sends a close frame. The reader half receives the peer's answer as
    /// [`Message::Close`] and then ends.
    pub async fn close(
        &mut self,
        code: impl Into<CloseCode>,
        reason: impl Into<Utf8Text>,
    ) -> Result<(), Error> {
        self.send(Message::close(code, reason)).await
    }

    /// Bytes queued for sending and not yet written.
    pub fn buffered_amount(&self) -> usize {
        lock(&self.shared).conn.pending_output().len()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> futures_core::Stream for WebSocketReader<S> {
    type Item = Result<Message, Error>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        lock(&self.shared).poll_recv(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> futures_sink::Sink<Message> for WebSocketWriter<S> {
    type Error = Error;
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        lock(&self.shared).poll_ready(cx, Side::Writer)
    }
    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Error> {
        lock(&self.shared).start_send(item)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        lock(&self.shared).poll_write_out(cx, Side::Writer)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut inner = lock(&self.shared);
        if !inner.conn.close_sent() && inner.conn.state() == State::Open {
            inner.start_send(Message::Close(Some(CloseFrame::new(CloseCode::NORMAL, ""))))?;
        }
        inner.poll_write_out(cx, Side::Writer)
    }
}
