//! The WebSocket front on tidewire's event loop (`server.event_loop`):
//! the connections live on the loop's threads, as plain state, and the
//! hub's core stays on tokio.
//!
//! Output: each connection's [`Remote`] is its sink. A publication is
//! queued on every subscriber's remote, then all of them go on their
//! workers' due lists together (one wake-up per worker, not the hub's
//! wave dispatcher); each subscriber gets one write per pass with
//! whatever waits for it. No task runs per subscriber.
//!
//! Input: a connection's messages are copied out of the loop's read buffer
//! and run as commands on tokio, in order, by a task that exists only
//! while commands wait (an idle connection has none). Its end runs the
//! session's cleanup there too.
//!
//! The slow-consumer policy is the WebSocket front's (see
//! [`super::websocket`]): the remote drops when full, and the hub closes
//! (1013, default) or drops the publication.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tidewire::event_loop::{Handler, Incoming, Remote, Socket};
use tidewire::http::Request;
use tidewire::{CloseCode, Message, QueueLimits, SendError};

use super::websocket::{message, SlowConsumerPolicy};
use crate::node::{ClientSink, FrameKind, Hub, SendOutcome, Session, Transport};
use crate::protocol::Frame;

/// A connection's sink: its remote.
struct LoopSink {
    remote: Remote,
    slow: SlowConsumerPolicy,
}

impl LoopSink {
    fn outcome(&self, sent: Result<(), SendError>, kind: FrameKind) -> SendOutcome {
        self.slow
            .outcome(sent, kind, |code, reason| self.remote.close(code, reason))
    }
}

impl ClientSink for LoopSink {
    fn transport(&self) -> Transport {
        Transport::WEBSOCKET
    }

    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome {
        self.outcome(self.remote.send(message(frame)), kind)
    }

    fn send_deferred(&self, frame: Frame, kind: FrameKind) -> (SendOutcome, bool) {
        match self.remote.send_deferred(message(frame)) {
            Ok(wake) => (SendOutcome::Queued, wake),
            Err(e) => (self.outcome(Err(e), kind), false),
        }
    }

    fn wake(&self) {
        self.remote.wake();
    }

    fn wake_batched(&self, batch: &mut tidewire::event_loop::Wakes) -> bool {
        batch.add(&self.remote);
        true
    }

    fn close(&self, code: u16, reason: &str) {
        self.slow.set_closing();
        self.remote.close(CloseCode(code), reason);
    }

    fn queued(&self) -> usize {
        self.remote.queued_messages()
    }

    fn is_closing(&self) -> bool {
        self.slow.is_closing()
    }

    fn event_loop_remote(&self) -> Option<&Remote> {
        Some(&self.remote)
    }
}

/// What waits to run on tokio for one connection.
enum Work {
    Text(String),
    Binary(Vec<u8>),
    ConnectTimeout,
    /// The connection ended: the session's cleanup, last.
    Ended,
}

#[derive(Default)]
struct Pending {
    work: VecDeque<Work>,
    /// The session, while no task runs it (`None`: a task has it, or it
    /// has ended).
    session: Option<Session>,
    running: bool,
}

/// One connection's commands, run in order on tokio.
pub struct LoopSession {
    pending: Mutex<Pending>,
    /// Its `connect` succeeded (then the connect timeout has nothing to
    /// do, and no task is started for it).
    connected: AtomicBool,
}

fn lock(pending: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(|p| p.into_inner())
}

impl LoopSession {
    fn push(self: &Arc<Self>, work: Work, runtime: &tokio::runtime::Handle) {
        let mut pending = lock(&self.pending);
        pending.work.push_back(work);
        if pending.running {
            return;
        }
        let Some(session) = pending.session.take() else {
            // Ended: nothing runs any more.
            pending.work.clear();
            return;
        };
        pending.running = true;
        drop(pending);
        runtime.spawn(self.clone().run(session));
    }

    fn note_connected(&self, session: &Session) {
        if !self.connected.load(Ordering::Relaxed) && session.is_connected() {
            self.connected.store(true, Ordering::Relaxed);
        }
    }

    async fn run(self: Arc<Self>, session: Session) {
        loop {
            let work = {
                let mut pending = lock(&self.pending);
                match pending.work.pop_front() {
                    Some(work) => work,
                    None => {
                        pending.session = Some(session);
                        pending.running = false;
                        // Idle from here on: no memory kept for the burst.
                        pending.work = VecDeque::new();
                        return;
                    }
                }
            };
            match work {
                // Boxed: command handling's state is on the heap while it
                // runs (as the tokio front does).
                Work::Text(text) => {
                    Box::pin(session.handle_text(&text)).await;
                    self.note_connected(&session);
                }
                Work::Binary(data) => {
                    Box::pin(session.handle_binary(&data)).await;
                    self.note_connected(&session);
                }
                Work::ConnectTimeout => {
                    if !session.is_connected() {
                        session.connect_timeout();
                    }
                }
                Work::Ended => {
                    tracing::debug!(client = %session.client_id(), "session ended");
                    lock(&self.pending).work.clear();
                    session.close().await;
                    return;
                }
            }
        }
    }
}

/// When a connection must have sent `connect`.
type ConnectDeadline = (tokio::time::Instant, Weak<LoopSession>);

/// Checks the connect deadlines in order (they come in the order the
/// connections opened, with one timeout): a session still not connected
/// at its deadline gets the connect timeout.
async fn connect_timeouts(
    mut deadlines: tokio::sync::mpsc::UnboundedReceiver<ConnectDeadline>,
    runtime: tokio::runtime::Handle,
) {
    while let Some((at, session)) = deadlines.recv().await {
        tokio::time::sleep_until(at).await;
        if let Some(session) = session.upgrade() {
            if !session.connected.load(Ordering::Relaxed) {
                session.push(Work::ConnectTimeout, &runtime);
            }
        }
    }
}

/// The event-loop handler of the hub's WebSocket path (one per loop
/// thread).
#[derive(Clone)]
pub struct LoopFront {
    hub: Hub,
    runtime: tokio::runtime::Handle,
    limits: QueueLimits,
    /// The connections' connect deadlines, in the order they opened, to
    /// one task that checks them (rather than a timer task each, whose
    /// wake-ups would all come during the fan-out after a connect burst).
    connect_deadlines: tokio::sync::mpsc::UnboundedSender<ConnectDeadline>,
    /// Requests the loop does not serve go there (see
    /// [`crate::http::serve_on_event_loop`]).
    hand_off: tokio::sync::mpsc::UnboundedSender<HandedOff>,
}

/// A connection handed over to the tokio side.
pub struct HandedOff {
    /// Its socket (non-blocking).
    pub stream: std::net::TcpStream,
    /// Every byte the loop read from it (the request head and any more).
    pub received: Vec<u8>,
    /// Its place in the loop's connection count (server.max_connections
    /// and the per-IP limit count it until this goes with it).
    pub slot: tidewire::event_loop::ConnectionSlot,
}

impl LoopFront {
    /// A front for `hub`, whose commands run on `runtime`; requests other
    /// than WebSocket upgrades of the hub's path go to `hand_off`.
    pub fn new(
        hub: Hub,
        runtime: tokio::runtime::Handle,
        hand_off: tokio::sync::mpsc::UnboundedSender<HandedOff>,
    ) -> LoopFront {
        let limits = super::websocket::queue_limits(&hub.config().client);
        let (connect_deadlines, deadlines) = tokio::sync::mpsc::unbounded_channel();
        runtime.spawn(connect_timeouts(deadlines, runtime.clone()));
        LoopFront {
            hub,
            runtime,
            limits,
            connect_deadlines,
            hand_off,
        }
    }
}

impl Handler for LoopFront {
    type State = Arc<LoopSession>;

    fn open(&mut self, socket: &mut Socket<'_>, request: &Request<()>) -> Arc<LoopSession> {
        let _runtime = self.runtime.enter();
        let sink = Arc::new(LoopSink {
            remote: socket.remote(self.limits),
            slow: SlowConsumerPolicy::new(self.hub.clone()),
        });
        let opening = self.hub.opening_request(request.headers());
        let session = self.hub.open_with(sink, opening);
        let cell = Arc::new(LoopSession {
            pending: Mutex::new(Pending {
                session: Some(session),
                ..Pending::default()
            }),
            connected: AtomicBool::new(false),
        });
        if self.hub.is_shutting_down() {
            // Upgraded while the hub drains: told at once, as the tokio
            // front's connections are.
            socket.close(CloseCode::GOING_AWAY, "server shutting down");
        }
        // Until `connect`, the connection has connect_timeout.
        let at = tokio::time::Instant::now() + self.hub.config().client.connect_timeout;
        let _ = self.connect_deadlines.send((at, Arc::downgrade(&cell)));
        cell
    }

    fn message(&mut self, _: &mut Socket<'_>, state: &mut Arc<LoopSession>, message: Incoming<'_>) {
        let work = match message {
            Incoming::Text(text) => Work::Text(text.to_owned()),
            Incoming::Binary(data) => Work::Binary(data.to_vec()),
            _ => return,
        };
        state.push(work, &self.runtime);
    }

    fn message_owned(
        &mut self,
        _: &mut Socket<'_>,
        state: &mut Arc<LoopSession>,
        message: Message,
    ) {
        let work = match message {
            Message::Text(text) => Work::Text(text.as_str().to_owned()),
            Message::Binary(data) => Work::Binary(data.to_vec()),
            _ => return,
        };
        state.push(work, &self.runtime);
    }

    fn closed(&mut self, state: Arc<LoopSession>, _: CloseCode) {
        state.push(Work::Ended, &self.runtime);
    }

    fn hand_off(&mut self, request: &Request<()>) -> bool {
        // Upgrades too while the hub drains: the router answers them 503,
        // as on tokio.
        request.uri().path() != crate::http::WEBSOCKET_PATH
            || !tidewire::proto::handshake::is_upgrade_request(request)
            || self.hub.is_shutting_down()
    }

    fn handed_off(
        &mut self,
        stream: std::net::TcpStream,
        _: Request<()>,
        received: Vec<u8>,
        slot: tidewire::event_loop::ConnectionSlot,
    ) {
        let _ = self.hand_off.send(HandedOff {
            stream,
            received,
            slot,
        });
    }
}
