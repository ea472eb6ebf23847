//! The [`WebSocket`] handle and its split halves.
//!
//! A thin loop around [`tidewire_proto::Connection`]: read bytes into the
//! connection's buffer, take events out, write its pending output. All state
//! lives in the connection and in `Inner`, never in a future, so every
//! `.await` here is cancel-safe: dropping a `recv` or `flush` future loses
//! nothing.
//!
//! Whoever polls `recv` also drives the connection: it writes what
//! [`Sender`] handles queued, sends keepalive pings, enforces the idle
//! timeout, and starts the closing handshake on shutdown.
//!
//! The closing sequence: once the peer's close frame (or a protocol error)
//! is seen, the reply is flushed; a server (or any side after an error)
//! shuts its write side down first, then everybody reads until the peer's
//! EOF or the close timeout, and only then is the final
//! [`Message::Close`] or error handed to the application.

use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tidewire_proto::{CloseCode, CloseFrame, Connection, Event, OpCode, Role, State, Utf8Text};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::outbox::{Outbox, QueueLimits, Sender, SlowConsumer};
use crate::{Error, Message};

thread_local! {
    /// The read buffer shared by the connections a thread drives.
    static READ_SCRATCH: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Options of the I/O loop (the protocol limits live in
/// [`tidewire_proto::Config`]).
#[derive(Debug, Clone)]
pub struct IoOptions {
    /// How long to wait for the peer's close frame after sending ours, and
    /// for the transport to end after the closing handshake.
    pub close_timeout: Duration,
    /// Bytes requested from the transport per read (through a buffer
    /// shared by the connections of a thread, so it costs no memory per
    /// connection). While reads come back full (a stream of large
    /// messages), a connection asks for up to four times as much.
    pub read_chunk: usize,
    /// Encoded output beyond which no more queued messages are encoded
    /// until the transport takes some (and `Sink::poll_ready` flushes).
    /// The reader writes out at this level, or at up to four times it
    /// while large messages stream in (so a read's answers leave in one
    /// write).
    pub write_high_water: usize,
    /// Send a ping after this long without hearing from the peer
    /// (`None`: no keepalive).
    pub ping_interval: Option<Duration>,
    /// After a keepalive ping, how long the peer has to show a sign of life
    /// before the connection is dropped (close 1011 is attempted).
    pub pong_timeout: Duration,
    /// Close the connection (1001) after this long without a data message
    /// from the peer (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Bounds and policy of the send queue fed by [`Sender`] handles.
    pub send_queue: QueueLimits,
}

impl Default for IoOptions {
    fn default() -> Self {
        IoOptions {
            close_timeout: Duration::from_secs(10),
            read_chunk: 64 * 1024,
            write_high_water: 64 * 1024,
            ping_interval: None,
            pong_timeout: Duration::from_secs(10),
            idle_timeout: None,
            send_queue: QueueLimits::default(),
        }
    }
}

/// Message and byte counters, shared by many connections (a server's
/// totals) or kept per connection. Payload sizes, before compression. A
/// connection adds its counts once per batch of input it handles (before it
/// waits for more) and when it is dropped, not once per message.
#[derive(Debug, Default)]
pub struct TrafficCounters {
    /// Data messages received.
    pub messages_in: AtomicU64,
    /// Payload bytes received in data messages.
    pub bytes_in: AtomicU64,
    /// Data messages sent.
    pub messages_out: AtomicU64,
    /// Payload bytes sent in data messages.
    pub bytes_out: AtomicU64,
}

impl TrafficCounters {
    fn count(counter: &AtomicU64, by: usize) {
        counter.fetch_add(by as u64, Ordering::Relaxed);
    }
}

/// A connection's share of a [`TrafficCounters`], added to it once per read
/// batch (and when dropped): an atomic add per message on counters that
/// every connection shares would bounce their cache line between cores.
struct Counting {
    shared: Arc<TrafficCounters>,
    messages_in: u32,
    messages_out: u32,
    bytes_in: u64,
    bytes_out: u64,
}

impl Counting {
    fn sent(&mut self, message: &Message) {
        if message.is_data() {
            self.messages_out += 1;
            self.bytes_out += message.as_bytes().len() as u64;
        }
    }

    fn received(&mut self, event: &Event) {
        let len = match event {
            Event::Text(t) => t.len(),
            Event::Binary(b) => b.len(),
            _ => return,
        };
        self.messages_in += 1;
        self.bytes_in += len as u64;
    }

    fn flush(&mut self) {
        if self.messages_in > 0 {
            TrafficCounters::count(&self.shared.messages_in, self.messages_in as usize);
            TrafficCounters::count(&self.shared.bytes_in, self.bytes_in as usize);
        }
        if self.messages_out > 0 {
            TrafficCounters::count(&self.shared.messages_out, self.messages_out as usize);
            TrafficCounters::count(&self.shared.bytes_out, self.bytes_out as usize);
        }
        (
            self.messages_in,
            self.messages_out,
            self.bytes_in,
            self.bytes_out,
        ) = (0, 0, 0, 0);
    }
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.flush();
    }
}

enum ReadState {
    Open,
    /// The outcome is known; finishing the transport before reporting it.
    /// Boxed: every idle connection would otherwise carry its size.
    Draining(Box<Draining>),
    Done,
}

struct Draining {
    result: Result<Message, Error>,
    shut_down: bool,
    /// Don't wait for the peer (it is unresponsive).
    abort: bool,
}

/// Which task polls a write: the reader (flushing pongs and close replies)
/// or the writer. Each keeps its own waker, so a split pair never loses a
/// wake-up when both wait on the same transport.
#[derive(Clone, Copy)]
enum Side {
    Reader = 0,
    Writer = 1,
}

/// A deadline that is re-armed lazily: activity only records an instant,
/// and the timer is pushed back when it fires early.
struct Timer {
    sleep: Pin<Box<Sleep>>,
}

impl Timer {
    fn new(at: Instant) -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(at)),
        }
    }
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        self.sleep.as_mut().poll(cx).is_ready()
    }
    fn reset(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
    }
}

/// Keepalive state, boxed in `Inner` (a connection without keepalive pays
/// a pointer for it).
struct Keepalive {
    interval: Duration,
    timeout: Duration,
    timer: Timer,
    ping_sent: Option<Instant>,
    /// When the peer last sent anything.
    last_seen: Instant,
}

/// Idle-timeout state, boxed in `Inner` like [`Keepalive`].
struct IdleTimeout {
    timer: Timer,
    /// When the peer last sent a data message.
    last_data: Instant,
}

/// A connection's state. Idle connections are counted in thousands, so
/// what only some connections use (keepalive, idle timeout, the send queue
/// of [`Sender`] handles, the closing sequence) sits behind a pointer, and
/// the options are shared.
pub(crate) struct Inner<S> {
    io: S,
    conn: Connection,
    options: Arc<IoOptions>,
    read_state: ReadState,
    deadline: Option<Pin<Box<Sleep>>>,
    write_wakers: [Option<Waker>; 2],
    protocol: Option<Box<str>>,
    /// Created by the first [`Sender`] handle (or by `split`: a Sender
    /// made from the writer half must be able to wake a reader already
    /// waiting for input; an unsplit WebSocket cannot make one while it
    /// waits, as `recv` borrows it).
    outbox: OnceLock<Arc<Outbox>>,
    keepalive: Option<Box<Keepalive>>,
    idle: Option<Box<IdleTimeout>>,
    /// A data message arrived since the idle timeout's `last_data` was set.
    data_unstamped: bool,
    /// Reads ask for `read_chunk << read_boost` bytes: raised while reads
    /// fill the buffer (a stream of large messages), lowered when they do
    /// not, so small traffic never holds large read buffers.
    read_boost: u8,
    shutdown: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    counters: Option<Counting>,
    /// The output level last published to Senders (`buffered_amount`).
    published_output: usize,
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
        loop {
            while self.conn.has_pending_output() {
                let first = self.conn.pending_output().len();
                let written =
                    if self.io.is_write_vectored() && first < self.conn.pending_output_len() {
                        // Headers and payloads queued by reference go out in
                        // one system call.
                        let mut slices = [IoSlice::new(&[]); 64];
                        let n = self.conn.pending_output_slices(&mut slices);
                        Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n])
                    } else {
                        Pin::new(&mut self.io).poll_write(cx, self.conn.pending_output())
                    };
                let n = match written {
                    Poll::Ready(result) => result?,
                    Poll::Pending => {
                        let output = self.conn.pending_output_len();
                        if output != self.published_output {
                            if let Some(outbox) = self.outbox.get() {
                                outbox.lock().output = output;
                            }
                            self.published_output = output;
                        }
                        return Poll::Pending;
                    }
                };
                if n == 0 {
                    return Poll::Ready(Err(
                        std::io::Error::from(std::io::ErrorKind::WriteZero).into()
                    ));
                }
                self.conn.consume_output(n);
            }
            // Room in the output: take more from the queue, if any.
            if !self.pump_outbox() {
                break;
            }
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    /// Moves queued messages into the protocol output, up to the high-water
    /// mark. Returns whether anything was encoded.
    fn pump_outbox(&mut self) -> bool {
        let output = self.conn.pending_output_len();
        let Some(outbox) = self.outbox.get() else {
            // No Sender was ever made: nothing queued, nobody to tell.
            self.published_output = output;
            return false;
        };
        // Fast path: nothing queued, and the output level did not change in
        // a way a Sender could be waiting on (empty vs not, or by a lot).
        if !outbox.work.load(std::sync::atomic::Ordering::Acquire)
            && (output == 0) == (self.published_output == 0)
            && output.abs_diff(self.published_output) < 16 * 1024
        {
            return false;
        }
        let mut st = outbox.lock();
        let mut moved = false;
        if let Some(code) = st.overflow.take() {
            st.closed = true;
            drop(st);
            if self.conn.state() == State::Open && !self.conn.close_sent() {
                let _ = self
                    .conn
                    .send_close(Some(CloseFrame::new(code, "send queue full")));
            }
            outbox.notify_space();
            return true;
        }
        while self.conn.pending_output_len() < self.options.write_high_water {
            let Some(message) = st.queue.pop_front() else {
                break;
            };
            st.bytes -= message.as_bytes().len();
            // A message queued after our close is dropped, as the browser does.
            let _ = encode_counted(&mut self.conn, &mut self.counters, message);
            moved = true;
        }
        if st.queue.is_empty() {
            outbox
                .work
                .store(false, std::sync::atomic::Ordering::Release);
            // An idle connection holds no queue memory (a busy one keeps a
            // grown queue rather than growing it again every batch).
            if st.queue.capacity() > 0 && st.queue.capacity() <= 16 {
                st.queue = std::collections::VecDeque::new();
            }
        }
        st.output = self.conn.pending_output_len();
        self.published_output = st.output;
        let drained = st.queue.is_empty() && st.output == 0;
        drop(st);
        if moved {
            outbox.notify_space();
        }
        if drained {
            outbox.notify_drained();
        }
        moved
    }

    /// Whether a Sender queued something (or an overflow is pending).
    fn outbox_has_work(&self) -> bool {
        self.outbox
            .get()
            .is_some_and(|o| o.work.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Refuses further messages from Senders and releases their waiters.
    fn shut_outbox(&self) {
        if let Some(outbox) = self.outbox.get() {
            outbox.shut();
        }
    }

    /// The send queue, made on first use (by the first [`Sender`]).
    fn outbox(&self) -> &Arc<Outbox> {
        self.outbox.get_or_init(|| {
            let outbox = Outbox::new(self.options.send_queue);
            {
                let mut st = outbox.lock();
                st.output = self.published_output;
            }
            if !matches!(self.read_state, ReadState::Open) {
                outbox.shut();
            }
            outbox
        })
    }

    /// Payload bytes queued by Senders and not yet encoded.
    fn queued_bytes(&self) -> usize {
        self.outbox.get().map_or(0, |o| o.lock().bytes)
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

    fn start_draining(&mut self, result: Result<Message, Error>, abort: bool) {
        self.read_state = ReadState::Draining(Box::new(Draining {
            result,
            shut_down: false,
            abort,
        }));
        self.shut_outbox();
        self.deadline = None;
        self.arm_deadline();
    }

    /// Starts our closing handshake unless one is under way.
    fn begin_close(&mut self, code: CloseCode, reason: &str) {
        if self.conn.state() == State::Open && !self.conn.close_sent() {
            let _ = self.conn.send_close(Some(CloseFrame::new(code, reason)));
        }
    }

    /// Timers and signals that act on an open connection: shutdown,
    /// keepalive, idle timeout. Returns an outcome when the connection must
    /// end now.
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> Option<Error> {
        if let Some(shutdown) = self.shutdown.as_mut() {
            if shutdown.as_mut().poll(cx).is_ready() {
                self.shutdown = None;
                // Whatever was accepted for sending goes out before the close.
                self.encode_all_queued(true);
                self.begin_close(CloseCode::GOING_AWAY, "server shutting down");
            }
        }
        if self.keepalive.is_none() && self.idle.is_none() {
            return None;
        }
        let now = Instant::now();
        if std::mem::take(&mut self.data_unstamped) {
            if let Some(idle) = self.idle.as_mut() {
                idle.last_data = now;
            }
        }
        if let Some(ka) = self.keepalive.as_mut() {
            while ka.timer.poll(cx) {
                match ka.ping_sent {
                    Some(sent) if ka.last_seen < sent => {
                        // Nothing from the peer since the ping: it is gone.
                        self.keepalive = None;
                        self.begin_close(CloseCode::INTERNAL_ERROR, "keepalive timeout");
                        return Some(Error::KeepaliveTimeout);
                    }
                    _ if ka.last_seen + ka.interval > now => {
                        ka.ping_sent = None;
                        let at = ka.last_seen + ka.interval;
                        ka.timer.reset(at);
                    }
                    _ => {
                        if self.conn.state() == State::Open && !self.conn.close_sent() {
                            let _ = self.conn.send_ping(b"tidewire keepalive");
                        }
                        ka.ping_sent = Some(now);
                        ka.timer.reset(now + ka.timeout);
                    }
                }
            }
        }
        if let (Some(idle), Some(limit)) = (self.idle.as_mut(), self.options.idle_timeout) {
            while idle.timer.poll(cx) {
                if idle.last_data + limit > now {
                    let at = idle.last_data + limit;
                    idle.timer.reset(at);
                } else {
                    self.idle = None;
                    self.begin_close(CloseCode::GOING_AWAY, "idle timeout");
                    break;
                }
            }
        }
        None
    }

    /// Reads from the transport. Small reads go through a per-thread buffer
    /// and only the bytes read are kept, so an idle connection holds no read
    /// buffer at all; the rest of a large frame is read straight into the
    /// connection's buffer, without the extra copy.
    fn poll_read_input(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        /// Reads at least this large are handed to the connection rather
        /// than copied out of the per-thread buffer.
        const HAND_OVER_MIN: usize = 16 * 1024;
        /// Reads grow up to `read_chunk << MAX_READ_BOOST` (256 KiB by
        /// default): a few large frames per system call instead of one.
        /// Not more: a large read's buffer is shared by the messages split
        /// from it, so a message the application keeps keeps the buffer.
        const MAX_READ_BOOST: u8 = 2;
        let chunk = self.boosted(self.options.read_chunk);
        let wanted = self.conn.bytes_wanted();
        let (n, space) = if wanted >= HAND_OVER_MIN.min(self.options.read_chunk) {
            // The rest of a large frame (and the start of the next) goes
            // straight into the connection's buffer.
            let buf = self.conn.input_buffer();
            buf.reserve(wanted.min(1 << 20).max(chunk) + HAND_OVER_MIN);
            let space = buf.capacity() - buf.len();
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.io),
                cx,
                buf
            ))?;
            (n, space)
        } else {
            self.conn.release_idle_buffers();
            ready!(READ_SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.clear();
                // A partial frame already buffered (always short here) goes
                // in front, so that a large read can be handed over whole.
                // (Read without `input_buffer`, which would make the
                // in-flight state that `release_idle_buffers` just gave
                // back.)
                let leftover = self.conn.input_len();
                if scratch.capacity() > 2 * (leftover + chunk) {
                    // Grown for a stream of large messages that has ended.
                    *scratch = BytesMut::new();
                }
                scratch.reserve(leftover + chunk);
                if leftover > 0 {
                    scratch.extend_from_slice(self.conn.input_buffer());
                }
                let space = scratch.capacity() - leftover;
                let n = ready!(tokio_util::io::poll_read_buf(
                    Pin::new(&mut self.io),
                    cx,
                    &mut *scratch
                ))?;
                if n >= HAND_OVER_MIN {
                    // A large read: the connection takes the bytes without
                    // a copy (the thread's buffer gets a new allocation).
                    if leftover > 0 {
                        self.conn.input_buffer().clear();
                    }
                    self.conn.receive_buffer(scratch.split());
                } else {
                    self.conn.receive_data(&scratch[leftover..]);
                }
                Poll::Ready(Ok::<_, std::io::Error>((n, space)))
            }))?
        };
        // A read that filled the buffer left more behind: ask for more next
        // time. One well short of the request: back towards `read_chunk`.
        if n == space && n >= chunk {
            self.read_boost = (self.read_boost + 1).min(MAX_READ_BOOST);
        } else if n < chunk / 2 {
            self.read_boost = self.read_boost.saturating_sub(1);
        }
        Poll::Ready(Ok(n))
    }

    /// A write failed: the connection is over, with that error.
    fn transport_failed(&mut self, e: Error) -> Poll<Option<Result<Message, Error>>> {
        self.read_state = ReadState::Done;
        self.shut_outbox();
        Poll::Ready(Some(Err(e)))
    }

    /// The most output (encoded, not yet written) before the reader stops
    /// decoding input: the send queue's byte limit, and never below what
    /// the reader lets gather before it writes.
    fn output_limit(&self) -> usize {
        self.options
            .send_queue
            .max_bytes
            .max(self.boosted(self.options.write_high_water))
    }

    /// `size` scaled by the current read boost: what a read asks for, and
    /// how much output the reader lets gather before writing.
    fn boosted(&self, size: usize) -> usize {
        size.saturating_mul(1 << self.read_boost)
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        loop {
            match &mut self.read_state {
                ReadState::Done => return Poll::Ready(None),
                ReadState::Draining(_) => return self.poll_drain(cx).map(Some),
                ReadState::Open => {}
            }
            // Output is written when it grows large, or (below) before
            // waiting for input: everything answered from one read goes out
            // in one write. "Large" grows with the reads: while large
            // messages stream in, the answers to one read go out together.
            if self.conn.pending_output_len() >= self.boosted(self.options.write_high_water)
                || self.outbox_has_work()
            {
                if let Poll::Ready(Err(e)) = self.poll_write_out(cx, Side::Reader) {
                    return self.transport_failed(e);
                }
            }
            if self.conn.close_sent() {
                // Our close is out: the peer has close_timeout to answer.
                self.arm_deadline();
                if self.deadline_passed(cx) {
                    self.start_draining(Err(Error::AbnormalClosure), true);
                    continue;
                }
            }
            // Output the transport cannot take is bounded by the send
            // queue's byte limit: past it, no more input is decoded (each
            // message may be answered, a ping always is), so the peer's own
            // sends back up in TCP; or, with the close policy, the
            // connection ends.
            if self.conn.pending_output_len() >= self.output_limit() {
                match self.poll_write_out(cx, Side::Reader) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return self.transport_failed(e),
                    Poll::Pending => {
                        if let SlowConsumer::Close(code) = self.options.send_queue.policy {
                            self.begin_close(code, "send queue full");
                            self.start_draining(Err(Error::SlowConsumer(code)), true);
                            continue;
                        }
                        // Waiting for the transport (its waker is set):
                        // shutdown and keepalive still act meanwhile.
                        if let Some(err) = self.poll_timers(cx) {
                            self.start_draining(Err(err), true);
                            continue;
                        }
                        return Poll::Pending;
                    }
                }
            }
            match self.conn.next_event() {
                Ok(Some(Event::Close(frame))) => {
                    self.start_draining(Ok(Message::Close(frame)), false)
                }
                Ok(Some(event)) => {
                    if let Some(counters) = &mut self.counters {
                        counters.received(&event);
                    }
                    // Stamped once per batch, in poll_timers: reading the
                    // clock per message is measurable.
                    self.data_unstamped |= matches!(event, Event::Text(_) | Event::Binary(_));
                    return Poll::Ready(Some(Ok(event.into())));
                }
                Err(e) => self.start_draining(Err(e.into()), false),
                Ok(None) => {
                    // The batch is handled: counters, timers and shutdown
                    // are updated here, once per read rather than per message.
                    if let Some(counters) = &mut self.counters {
                        counters.flush();
                    }
                    if let Some(err) = self.poll_timers(cx) {
                        self.start_draining(Err(err), true);
                        continue;
                    }
                    // About to wait for input: write what is pending first,
                    // and let Senders wake this task.
                    if let Some(outbox) = self.outbox.get() {
                        let mut st = outbox.lock();
                        if !st.driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                            st.driver = Some(cx.waker().clone());
                        }
                    }
                    if let Poll::Ready(Err(e)) = self.poll_write_out(cx, Side::Reader) {
                        return self.transport_failed(e);
                    }
                    match ready!(self.poll_read_input(cx)) {
                        Ok(0) => {
                            self.conn.receive_eof();
                            self.read_state = ReadState::Done;
                            self.shut_outbox();
                            return Poll::Ready(Some(Err(Error::AbnormalClosure)));
                        }
                        Ok(_) => {
                            if let Some(ka) = self.keepalive.as_mut() {
                                ka.last_seen = Instant::now();
                            }
                        }
                        Err(e) => {
                            self.conn.receive_eof();
                            self.read_state = ReadState::Done;
                            self.shut_outbox();
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
        let ReadState::Draining(ref draining) = self.read_state else {
            unreachable!("poll_drain outside Draining")
        };
        let abort = draining.abort;
        let close_first = self.conn.role() == Role::Server || self.conn.failure().is_some();
        if abort {
            // The peer is unresponsive: one attempt to write what is pending
            // (the close frame), without waiting.
            let waker = Waker::noop();
            let _ = self.poll_write_out_inner(&mut Context::from_waker(waker));
        }
        let timed_out = abort || self.deadline_passed(cx);
        if !timed_out
            && self.conn.has_pending_output()
            && ready!(self.poll_write_out(cx, Side::Reader)).is_err()
        {
            return self.finish_drain();
        }
        if close_first
            && !timed_out
            && matches!(&self.read_state, ReadState::Draining(d) if !d.shut_down)
        {
            let _ = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
            if let ReadState::Draining(d) = &mut self.read_state {
                d.shut_down = true;
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
        let ReadState::Draining(draining) = state else {
            unreachable!("finish_drain outside Draining")
        };
        let Draining {
            result, shut_down, ..
        } = *draining;
        if !shut_down {
            // Best effort, without waiting: the peer is gone or done.
            let waker = Waker::noop();
            let _ = Pin::new(&mut self.io).poll_shutdown(&mut Context::from_waker(waker));
        }
        self.conn.receive_eof();
        self.deadline = None;
        self.keepalive = None;
        self.idle = None;
        Poll::Ready(result)
    }

    /// Encodes everything Sender handles queued, regardless of the
    /// high-water mark; `close` also stops the queue taking more.
    fn encode_all_queued(&mut self, close: bool) {
        let Some(outbox) = self.outbox.get() else {
            return;
        };
        let mut st = outbox.lock();
        let queued: Vec<Message> = st.queue.drain(..).collect();
        st.bytes = 0;
        st.closed |= close;
        if st.overflow.is_none() {
            // An overflow still pending keeps the flag for pump_outbox.
            outbox
                .work
                .store(false, std::sync::atomic::Ordering::Release);
        }
        drop(st);
        for message in queued {
            let _ = encode_counted(&mut self.conn, &mut self.counters, message);
        }
        outbox.notify_space();
    }

    fn start_send(&mut self, message: Message) -> Result<(), Error> {
        // Keep order with messages queued by Sender handles; the atomic
        // flag spares the lock when nobody queued anything.
        if self.outbox_has_work() {
            self.encode_all_queued(false);
        }
        encode_counted(&mut self.conn, &mut self.counters, message)
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>, side: Side) -> Poll<Result<(), Error>> {
        if self.conn.pending_output_len() >= self.options.write_high_water {
            ready!(self.poll_write_out(cx, side))?;
        }
        Poll::Ready(Ok(()))
    }
}

fn encode_counted(
    conn: &mut Connection,
    counters: &mut Option<Counting>,
    message: Message,
) -> Result<(), Error> {
    if let Some(counters) = counters {
        counters.sent(&message);
    }
    encode(conn, message)
}

fn encode(conn: &mut Connection, message: Message) -> Result<(), Error> {
    match message {
        Message::Text(t) => conn.send_text_bytes(t)?,
        Message::Binary(b) => conn.send_binary_bytes(b)?,
        Message::Ping(b) => conn.send_ping(&b)?,
        Message::Pong(b) => conn.send_pong(&b)?,
        Message::Close(frame) => conn.send_close(frame)?,
    }
    Ok(())
}

/// A WebSocket connection over any `AsyncRead + AsyncWrite` transport.
///
/// Receive with [`recv`](Self::recv) (or as a `Stream`), send with
/// [`send`](Self::send) (or as a `Sink`, or from other tasks through a
/// [`Sender`]), close with [`close`](Self::close), and
/// [`split`](Self::split) into halves for separate tasks.
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
        options: impl Into<Arc<IoOptions>>,
    ) -> WebSocket<S> {
        let options = options.into();
        conn.receive_data(leftover);
        let now = Instant::now();
        let keepalive = options.ping_interval.map(|interval| {
            Box::new(Keepalive {
                interval,
                timeout: options.pong_timeout,
                timer: Timer::new(now + interval),
                ping_sent: None,
                last_seen: now,
            })
        });
        let idle = options.idle_timeout.map(|t| {
            Box::new(IdleTimeout {
                timer: Timer::new(now + t),
                last_data: now,
            })
        });
        WebSocket {
            inner: Inner {
                io,
                conn,
                outbox: OnceLock::new(),
                options,
                read_state: ReadState::Open,
                deadline: None,
                write_wakers: [None, None],
                protocol: protocol.map(String::into_boxed_str),
                keepalive,
                idle,
                data_unstamped: false,
                read_boost: 0,
                shutdown: None,
                counters: None,
                published_output: 0,
            },
        }
    }

    /// When `token` is cancelled, the connection flushes what was queued,
    /// sends close 1001 ("server shutting down") and ends after the closing
    /// handshake (or the close timeout).
    pub fn set_shutdown(&mut self, token: CancellationToken) {
        self.inner.shutdown = Some(Box::pin(token.cancelled_owned()));
    }

    /// Counts this connection's messages and bytes into `counters` (which
    /// may be shared by many connections).
    pub fn set_counters(&mut self, counters: Arc<TrafficCounters>) {
        self.inner.counters = Some(Counting {
            shared: counters,
            messages_in: 0,
            messages_out: 0,
            bytes_in: 0,
            bytes_out: 0,
        });
    }

    /// Receives the next message. `None` once the connection is over.
    ///
    /// A [`Message::Close`] arrives after the closing handshake completed;
    /// `None` follows. Errors end the connection too (the close frame with
    /// the right code has been sent for protocol errors).
    ///
    /// While waiting, this also writes what [`Sender`] handles queued and
    /// runs keepalive and the idle timeout, so keep calling it.
    ///
    /// # Backpressure
    /// Output the transport cannot take (answers fed, pongs, what Senders
    /// queued) is bounded by the send queue's byte limit
    /// ([`IoOptions::send_queue`]`.max_bytes`). At that limit `recv`
    /// decodes no more input until the transport takes some: the peer's
    /// own sends then back up in TCP (policies `Wait` and `Drop`), or,
    /// with [`SlowConsumer::Close`], the connection is closed with its
    /// code and `recv` returns [`Error::SlowConsumer`]. So a peer that
    /// sends without reading holds at most that much output, plus its read
    /// buffer, in memory.
    ///
    /// # Cancel safety
    /// Cancel-safe: no received data is lost if the future is dropped.
    pub async fn recv(&mut self) -> Option<Result<Message, Error>> {
        poll_fn(|cx| self.inner.poll_recv(cx)).await
    }

    /// Sends a message and flushes it to the transport: waits while the
    /// transport does not take it (so a peer that does not read holds the
    /// sender, not memory).
    ///
    /// # Errors
    /// [`Error::Usage`] after a close was sent; [`Error::Io`] when the
    /// transport fails.
    ///
    /// # Cancel safety
    /// If cancelled, the message may be partly written; the rest stays
    /// queued and goes out with the next send, flush or recv.
    pub async fn send(&mut self, message: impl Into<Message>) -> Result<(), Error> {
        self.inner.start_send(message.into())?;
        self.flush().await
    }

    /// Queues a message without flushing (see [`flush`](Self::flush)).
    ///
    /// Never waits, so it never bounds memory by itself: a handler that
    /// feeds answers to what it receives is bounded by `recv`, which stops
    /// reading while the output is at the send queue's byte limit (see
    /// [`recv`](Self::recv)); a loop that only feeds must `flush` or
    /// `send` (which waits while the output is above
    /// [`IoOptions::write_high_water`]) now and then.
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

    /// A handle that queues messages from other tasks (bounded, with the
    /// slow-consumer policy of [`IoOptions::send_queue`]).
    pub fn sender(&self) -> Sender {
        Sender {
            outbox: self.inner.outbox().clone(),
        }
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

    /// Gives the transport back (bytes buffered but not yet processed or
    /// written are dropped).
    pub fn into_inner(self) -> S {
        self.inner.shut_outbox();
        self.inner.io
    }

    /// Bytes queued for sending and not yet written (like the browser's
    /// `bufferedAmount`).
    pub fn buffered_amount(&self) -> usize {
        self.inner.conn.pending_output_len() + self.inner.queued_bytes()
    }

    /// Splits into a reader and a writer usable from separate tasks. The
    /// reader still answers pings and closes by itself.
    pub fn split(self) -> (WebSocketReader<S>, WebSocketWriter<S>) {
        // The halves may wait in different tasks: the queue must exist
        // before the reader waits (see `Inner::outbox`).
        self.inner.outbox();
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

    /// A handle that queues messages from other tasks.
    pub fn sender(&self) -> Sender {
        Sender {
            outbox: lock(&self.shared).outbox().clone(),
        }
    }

    /// Bytes queued for sending and not yet written.
    pub fn buffered_amount(&self) -> usize {
        let inner = lock(&self.shared);
        let queued = inner.queued_bytes();
        inner.conn.pending_output_len() + queued
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
