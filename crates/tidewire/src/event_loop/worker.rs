//! One event-loop thread: its listener, its poll, its connections.

use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, Request, Response, StatusCode};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tidewire_proto::handshake::{self, HandshakeError, ServerHandshake};
use tidewire_proto::{CloseCode, CloseFrame, Connection, IdleBuffers};

use super::group::{GroupShared, LocalGroup, Member, LEFT};
use super::remote::{Inbox, Post, Posted, Queue, RemoteInner};
use super::sys;
use super::{ConnectionSlot, EventLoopConfig, Handler, Incoming, Shared, Socket};
use crate::Message;

pub(super) const WAKER: Token = Token(usize::MAX - 1);
const LISTENER: Token = Token(usize::MAX - 2);

/// The read buffer of a thread: a few large frames, or many small ones,
/// per system call.
const READ_BUFFER: usize = 256 << 10;
/// Bytes of answers a turn holds for its end (see `Worker::drive`):
/// about what stays in a core's cache meanwhile.
const WRITE_LATER_BYTES: usize = 256 << 10;
/// Connections accepted per turn of the loop before the others get theirs.
const ACCEPTS_PER_TURN: usize = 256;
/// Connections written per turn for their remotes (about 1.5 ms of
/// writes on loopback) before the loop looks for input again.
const REMOTES_PER_TURN: usize = 256;
/// Sets of in-flight buffers kept for the next connections to answer
/// (16 KiB each once a message was framed): enough for a turn's worth of
/// ready connections; given back to the allocator after a second unused.
const SPARE_BUFFERS: usize = 256;

/// `addr` with its port, once a socket without `SO_REUSEPORT` could bind
/// it (and let go of it): `AddrInUse` when another socket listens there,
/// with or without `SO_REUSEPORT`.
pub(super) fn probe_free(addr: SocketAddr) -> io::Result<SocketAddr> {
    let socket = tcp_socket(addr)?;
    socket.bind(&addr.into())?;
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP address"))
}

/// A listener bound with `SO_REUSEPORT`, so that every thread has its own
/// and the kernel spreads new connections among them.
pub(super) fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = tcp_socket(addr)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // As the tokio server: a burst of connects waits in the backlog.
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// A TCP socket for `addr`'s family, to bind as a listener does:
/// connections of an earlier run still in TIME_WAIT do not hold the port.
fn tcp_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// One connection.
struct Entry<S> {
    stream: TcpStream,
    /// Its peer's address, while counted for the per-IP limit.
    counted_ip: Option<std::net::IpAddr>,
    /// Registered for writability too (only while output waits).
    writable: bool,
    phase: Phase<S>,
}

impl<S> Entry<S> {
    /// Asks for writability events only while output waits for the
    /// socket: otherwise every ACK of a connection that keeps up would
    /// wake the poll for nothing.
    fn want_writable(&mut self, registry: &mio::Registry, key: usize, yes: bool) {
        if self.writable != yes {
            let interest = if yes {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            // Re-registering re-arms the edge: writability that came in
            // between is reported at once.
            if registry
                .reregister(&mut self.stream, Token(key), interest)
                .is_ok()
            {
                self.writable = yes;
            }
        }
    }
}

enum Phase<S> {
    /// Reading the request head (kept until it is whole).
    Handshake { head: Vec<u8>, since: u32 },
    /// Writing an HTTP answer; the connection closes after it.
    Answer { out: Vec<u8>, since: u32 },
    /// A WebSocket (boxed: a slab of small entries, each connection's
    /// state in an allocation of its own size).
    Open(Box<Open<S>>),
    /// Our close frame is out after a failure: waiting for the peer's end
    /// of the TCP connection, so that it reads the frame rather than a
    /// reset.
    Draining { since: u32 },
}

struct Open<S> {
    conn: Connection,
    /// `None` once handed to `Handler::closed`.
    state: Option<S>,
    /// The rest of the 101 response, while the socket has not taken all
    /// of it (empty once written).
    head: Vec<u8>,
    /// Clock seconds: the last read, the last data message, the ping
    /// waiting for its pong (0: none), the start of the closing handshake
    /// (0: not started).
    last_seen: u32,
    last_data: u32,
    ping_sent: u32,
    closing_since: u32,
    /// Not read while its output waits for a slow reader.
    paused: bool,
    /// Why it ends, once known.
    code: Option<CloseCode>,
    /// Its [`Remote`](super::Remote)'s side, once one was made.
    remote: Option<Arc<RemoteInner>>,
    /// On the worker's list of connections to write at the end of the
    /// turn.
    write_later: bool,
    /// The groups it is in.
    groups: Vec<Membership>,
}

/// A connection's place in a group on its worker.
#[derive(Clone, Copy)]
struct Membership {
    slot: usize,
    id: u64,
    /// Its position in the group's members.
    at: usize,
}

/// What the worker writes next for other threads.
enum Due {
    /// A remote with messages queued.
    Remote(Arc<RemoteInner>),
    /// A round over a group's members, from `next` on.
    Group { slot: usize, next: usize },
}

impl<S> Open<S> {
    /// Whether the closing handshake started or the connection failed:
    /// [`Worker::finished`] has something to check.
    fn ending(&self) -> bool {
        self.conn.close_sent() || self.conn.receiving_done()
    }

    /// Whether something may wait for it: its remote's queue, or a group.
    fn may_have_work(&self) -> bool {
        !self.groups.is_empty() || self.remote.as_ref().is_some_and(|r| r.has_work())
    }

    /// Moves what waits for the connection (its remote's queue, its
    /// groups' messages, in the order they were sent) into its output, as
    /// far as `max_pending` lets it (the rest waits until the socket
    /// drains). Whether it stopped at a message queued after a
    /// publication this worker has not taken from its inbox yet (then the
    /// worker takes it and pulls again).
    fn pull(
        &mut self,
        key: usize,
        groups: &mut Slab<LocalGroup>,
        applied: u64,
        max_pending: usize,
    ) -> bool {
        if self.conn.pending_output_len() > max_pending {
            return false;
        }
        let remote_work = self.remote.as_ref().is_some_and(|r| r.has_work());
        if !remote_work && self.groups.is_empty() {
            return false;
        }
        let mut puller = Puller {
            conn: &mut self.conn,
            code: &mut self.code,
            memberships: &self.groups,
            key,
            groups,
            applied,
            max_pending,
        };
        match &self.remote {
            // Locked only when something was queued there: a member of a
            // big group is written once per round, mostly with nothing of
            // its own.
            Some(remote) if remote_work => remote.take(|queue| puller.run(Some(queue))),
            _ => puller.run(None),
        }
    }
}

/// One pull: a connection's output and what feeds it.
struct Puller<'a> {
    conn: &'a mut Connection,
    code: &'a mut Option<CloseCode>,
    memberships: &'a [Membership],
    key: usize,
    groups: &'a mut Slab<LocalGroup>,
    applied: u64,
    max_pending: usize,
}

impl Puller<'_> {
    /// The connection's next group message: its membership's index, the
    /// message's number and its place in the group's log.
    fn next_group_message(&self) -> Option<(usize, u64, usize)> {
        let mut best: Option<(usize, u64, usize)> = None;
        for (i, m) in self.memberships.iter().enumerate() {
            let Some(group) = self
                .groups
                .get(m.slot)
                .filter(|g| g.holds(m.id, m.at, self.key))
            else {
                continue;
            };
            let at = group.after(group.members[m.at].cursor);
            if let Some((seq, _)) = group.log.get(at) {
                if best.is_none_or(|(_, b, _)| *seq < b) {
                    best = Some((i, *seq, at));
                }
            }
        }
        best
    }

    fn run(&mut self, mut queue: Option<&mut Queue>) -> bool {
        while self.conn.pending_output_len() <= self.max_pending {
            let direct = queue.as_ref().and_then(|q| q.next_after());
            match (self.next_group_message(), direct) {
                (Some((i, seq, at)), after) if after.is_none_or(|after| seq <= after) => {
                    let m = self.memberships[i];
                    let group = &mut self.groups[m.slot];
                    group.members[m.at].cursor = seq;
                    let message = group.log[at].1.clone();
                    self.send(message);
                }
                (_, Some(after)) => {
                    if after > self.applied {
                        return true;
                    }
                    let Some(queue) = queue.as_deref_mut() else {
                        break;
                    };
                    if let Some(message) = queue.pop() {
                        self.send(message);
                    } else if let Some(frame) = queue.take_close() {
                        self.code.get_or_insert(frame.code);
                        let _ = self.conn.send_close(Some(frame));
                    } else {
                        break;
                    }
                }
                (_, None) => break,
            }
        }
        false
    }

    fn send(&mut self, message: Message) {
        let conn = &mut *self.conn;
        let _ = match message {
            Message::Text(text) => conn.send_text_bytes(text),
            Message::Binary(data) => conn.send_binary_bytes(data),
            Message::Ping(data) => conn.send_ping(&data),
            Message::Pong(data) => conn.send_pong(&data),
            Message::Close(frame) => {
                self.code
                    .get_or_insert(frame.as_ref().map_or(CloseCode::NO_STATUS, |f| f.code));
                conn.send_close(frame)
            }
        };
    }
}

pub(super) struct Worker<H: Handler> {
    poll: Poll,
    listener: Option<TcpListener>,
    config: Arc<EventLoopConfig>,
    shared: Arc<Shared>,
    handler: H,
    slab: Slab<Entry<H::State>>,
    /// Where remotes of this thread's connections say they are due; the
    /// list last taken from it (kept for its capacity); the due remotes
    /// not written yet, in order.
    inbox: Arc<Inbox>,
    taken: Posted,
    due: std::collections::VecDeque<Due>,
    /// This thread's part of every group with members here, by slot, and
    /// the slots by group id; the publications taken from the inbox so
    /// far.
    groups: Slab<LocalGroup>,
    group_slots: std::collections::HashMap<u64, usize>,
    applied: u64,
    /// Connections read this turn whose answers are written at its end,
    /// and the bytes they wait with.
    write_later: Vec<usize>,
    write_later_bytes: usize,
    buffer: Vec<u8>,
    /// In-flight buffers taken from connections whose output was all
    /// written, for the next ones that read or are due (a message and its
    /// answer then allocate nothing); whether any was given out since the
    /// last sweep.
    spare: Vec<IdleBuffers>,
    spare_used: bool,
    /// Seconds since `epoch`, plus one (0 means "never" in the entries).
    epoch: Instant,
    now: u32,
    /// The listener had more to accept at the end of the last turn.
    accept_pending: bool,
    shutting_down: Option<u32>,
    /// Counted out of `Shared::draining` (its WebSockets all closed).
    drained: bool,
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX)
}

impl<H: Handler> Worker<H> {
    pub(super) fn new(
        poll: Poll,
        mut listener: TcpListener,
        config: Arc<EventLoopConfig>,
        shared: Arc<Shared>,
        handler: H,
        inbox: Arc<Inbox>,
    ) -> io::Result<Worker<H>> {
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Worker {
            poll,
            listener: Some(listener),
            config,
            shared,
            handler,
            slab: Slab::new(),
            inbox,
            taken: Posted::default(),
            due: std::collections::VecDeque::new(),
            groups: Slab::new(),
            group_slots: std::collections::HashMap::new(),
            applied: 0,
            write_later: Vec::new(),
            write_later_bytes: 0,
            buffer: vec![0; READ_BUFFER],
            spare: Vec::new(),
            spare_used: false,
            epoch: Instant::now(),
            now: 1,
            accept_pending: false,
            shutting_down: None,
            drained: false,
        })
    }

    fn clock(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs() + 1).unwrap_or(u32::MAX)
    }

    pub(super) fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut swept = self.now;
        loop {
            let timeout = if self.accept_pending || !self.due.is_empty() {
                Duration::ZERO
            } else {
                // To the next whole second of the clock.
                let elapsed = self.epoch.elapsed();
                Duration::from_secs(elapsed.as_secs() + 1) - elapsed
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.now = self.clock();
            if self.accept_pending {
                self.accept();
            }
            let mut woken = false;
            for event in &events {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => woken = true,
                    Token(key) => self.ready(key),
                }
            }
            self.write_answers();
            if woken || !self.due.is_empty() {
                self.serve_remotes(woken);
            }
            if self.shutting_down.is_none() && self.shared.shutdown.load(Ordering::SeqCst) {
                self.begin_shutdown();
            }
            if self.now != swept {
                swept = self.now;
                self.sweep();
            }
            // What the sweep or the shutdown read and answered.
            self.write_answers();
            if let Some(since) = self.shutting_down {
                let deadline = since.saturating_add(secs(self.config.shutdown_timeout));
                // Requests still come (and get 503) while WebSockets close:
                // done once no thread has a connection left, a request head
                // on its way included (it gets its answer, within the
                // handshake timeout).
                let idle = self.slab.is_empty();
                if idle && !self.drained {
                    self.drained = true;
                    self.shared.draining.fetch_sub(1, Ordering::SeqCst);
                }
                let all_drained = self.shared.draining.load(Ordering::SeqCst) == 0;
                if (idle && all_drained) || self.now >= deadline {
                    if let Some(mut listener) = self.listener.take() {
                        let _ = self.poll.registry().deregister(&mut listener);
                    }
                    let keys: Vec<usize> = self.slab.iter().map(|(key, _)| key).collect();
                    for key in keys {
                        self.remove(key, CloseCode::ABNORMAL);
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Writes what the connections read this turn answered.
    fn write_answers(&mut self) {
        let mut keys = std::mem::take(&mut self.write_later);
        for key in keys.drain(..) {
            let Some(open) = self.open(key) else {
                continue;
            };
            open.write_later = false;
            self.write_now(key);
        }
        self.write_later = keys;
        self.write_later_bytes = 0;
    }

    /// Writes a connection's output now (its messages' answers, or what
    /// others queued for it), and ends it if its closing is over. Only
    /// written: reading is for the socket's own events (a read here would
    /// be a system call per connection that mostly finds nothing).
    fn write_now(&mut self, key: usize) {
        if self.flush(key).is_err() {
            self.remove(key, CloseCode::ABNORMAL);
        } else if self.open(key).is_some_and(|open| open.ending()) {
            self.finished(key);
        }
    }

    /// Writes what remotes queued, connection by connection in the order
    /// they became due, a share per turn: between two shares the loop
    /// reads what came meanwhile (a publisher's next message, say), so a
    /// long round of writes to many connections does not keep it waiting.
    fn serve_remotes(&mut self, woken: bool) {
        if woken {
            self.take_inbox();
        }
        let mut budget = REMOTES_PER_TURN;
        while budget > 0 {
            let Some(due) = self.due.pop_front() else {
                break;
            };
            match due {
                Due::Remote(remote) => {
                    budget -= 1;
                    remote.visited();
                    let key = remote.key;
                    let ours = matches!(
                        self.slab.get(key),
                        Some(Entry { phase: Phase::Open(open), .. })
                            if open.remote.as_ref().is_some_and(|r| Arc::ptr_eq(r, &remote))
                    );
                    if ours {
                        self.write_now(key);
                    }
                }
                Due::Group { slot, mut next } => {
                    while budget > 0 {
                        let Some(key) = self
                            .groups
                            .get(slot)
                            .and_then(|g| g.members.get(next))
                            .map(|m| m.key)
                        else {
                            break;
                        };
                        next += 1;
                        if key != LEFT {
                            budget -= 1;
                            self.write_now(key);
                        }
                    }
                    let members = self.groups.get(slot).map_or(0, |g| g.members.len());
                    if next < members {
                        self.due.push_front(Due::Group { slot, next });
                    } else {
                        self.round_done(slot);
                    }
                }
            }
        }
        if self.due.is_empty() && self.due.capacity() > 4 * REMOTES_PER_TURN {
            // Give back the memory of a big fan-out.
            self.due = std::collections::VecDeque::new();
        }
    }

    /// A round over a group's members is over: another follows if
    /// something was published meanwhile; else what all have taken goes.
    fn round_done(&mut self, slot: usize) {
        let Some(group) = self.groups.get_mut(slot) else {
            return;
        };
        group.trim();
        if std::mem::take(&mut group.again) {
            self.due.push_back(Due::Group { slot, next: 0 });
            return;
        }
        group.in_round = false;
        self.compact_group(slot);
    }

    /// Takes out the members that left (no round runs), telling the
    /// connections that moved their new place; forgets a group left
    /// empty here.
    fn compact_group(&mut self, slot: usize) {
        let Some(group) = self.groups.get_mut(slot) else {
            return;
        };
        if group.in_round {
            return;
        }
        if group.left > 0 {
            let id = group.shared.id;
            group.members.retain(|m| m.key != LEFT);
            group.left = 0;
            for (at, member) in group.members.iter().enumerate() {
                if let Some(Entry {
                    phase: Phase::Open(open),
                    ..
                }) = self.slab.get_mut(member.key)
                {
                    if let Some(m) = open
                        .groups
                        .iter_mut()
                        .find(|m| m.slot == slot && m.id == id)
                    {
                        m.at = at;
                    }
                }
            }
            group.trim();
        }
        if group.members.is_empty() {
            let group = self.groups.remove(slot);
            self.group_slots.remove(&group.shared.id);
        }
    }

    /// Takes what other threads posted: due remotes onto the due list,
    /// group changes and messages applied in order.
    fn take_inbox(&mut self) {
        let mut taken = std::mem::take(&mut self.taken);
        self.inbox.take(&mut taken);
        self.due.extend(taken.due.drain(..).map(Due::Remote));
        for post in taken.posts.drain(..) {
            match post {
                Post::Join { group, remote } => self.join_group(group, remote),
                Post::Leave { group, remote } => self.leave_group(group, &remote),
                Post::Publish {
                    group,
                    seq,
                    message,
                } => {
                    self.applied = seq;
                    self.publish(group, seq, message);
                }
            }
        }
        self.taken = taken;
    }

    fn join_group(&mut self, shared: Arc<GroupShared>, remote: Arc<RemoteInner>) {
        let key = remote.key;
        let id = shared.id;
        let Some(Entry {
            phase: Phase::Open(open),
            ..
        }) = self.slab.get_mut(key)
        else {
            return shared.left(&self.inbox, 1);
        };
        let ours = open
            .remote
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &remote));
        if !ours || open.groups.iter().any(|m| m.id == id) {
            // Gone (its key reused), or a member already.
            return shared.left(&self.inbox, 1);
        }
        let slot = match self.group_slots.get(&id) {
            Some(&slot) => slot,
            None => {
                let slot = self.groups.insert(LocalGroup::new(shared));
                self.group_slots.insert(id, slot);
                slot
            }
        };
        let group = &mut self.groups[slot];
        let at = group.members.len();
        group.members.push(Member {
            key,
            remote,
            cursor: self.applied,
        });
        open.groups.push(Membership { slot, id, at });
    }

    fn leave_group(&mut self, id: u64, remote: &Arc<RemoteInner>) {
        let key = remote.key;
        if let Some(Entry {
            phase: Phase::Open(open),
            ..
        }) = self.slab.get_mut(key)
        {
            if open.remote.as_ref().is_some_and(|r| Arc::ptr_eq(r, remote)) {
                if let Some(i) = open.groups.iter().position(|m| m.id == id) {
                    let m = open.groups.swap_remove(i);
                    self.forget_member(m, key);
                }
            }
        }
    }

    /// Marks a member gone from its group (the connection left it or
    /// ended).
    fn forget_member(&mut self, m: Membership, key: usize) {
        let Some(group) = self
            .groups
            .get_mut(m.slot)
            .filter(|g| g.holds(m.id, m.at, key))
        else {
            return;
        };
        group.members[m.at].key = LEFT;
        group.left += 1;
        group.shared.left(&self.inbox, 1);
        if !group.in_round
            && (group.left * 2 > group.members.len() || group.left == group.members.len())
        {
            self.compact_group(m.slot);
        }
    }

    /// A message for a group's members here: into its log, and a round
    /// over them starts (or another follows the one under way).
    fn publish(&mut self, id: u64, seq: u64, message: Message) {
        let Some(&slot) = self.group_slots.get(&id) else {
            return;
        };
        let group = &mut self.groups[slot];
        if group.live_members() == 0 {
            return;
        }
        group.log_bytes += message.as_bytes().len();
        group.log.push_back((seq, message));
        while group.over_limits() {
            // The members that have not taken the oldest fell behind.
            let Some(&(oldest, _)) = group.log.front() else {
                break;
            };
            let policy = group.shared.limits.policy;
            let mut gone = 0;
            for member in group
                .members
                .iter_mut()
                .filter(|m| m.key != LEFT && m.cursor < oldest)
            {
                match policy {
                    crate::SlowConsumer::Close(code) => {
                        // What it has not taken but the newest (which did
                        // not fit), then the close; out of the group.
                        let backlog: Vec<(u64, Message)> = group
                            .log
                            .iter()
                            .filter(|(s, _)| *s > member.cursor && *s < seq)
                            .cloned()
                            .collect();
                        if member.remote.close_behind(code, backlog) {
                            group.shared.count_closed();
                            member.remote.make_due(true);
                        }
                        member.key = LEFT;
                        gone += 1;
                    }
                    crate::SlowConsumer::Drop | crate::SlowConsumer::Wait => {
                        group.shared.count_dropped();
                        member.cursor = oldest;
                    }
                }
            }
            group.left += gone;
            if gone > 0 {
                group.shared.left(&self.inbox, gone);
            }
            if let Some((_, message)) = group.log.pop_front() {
                group.log_bytes -= message.as_bytes().len();
            }
        }
        if group.in_round {
            group.again = true;
        } else {
            group.in_round = true;
            self.due.push_back(Due::Group { slot, next: 0 });
        }
    }

    fn accept(&mut self) {
        self.accept_pending = false;
        let Some(listener) = self.listener.take() else {
            return;
        };
        self.accept_pending = self.accept_from(&listener);
        self.listener = Some(listener);
    }

    /// Accepts what is waiting, up to a turn's share; whether more may be.
    fn accept_from(&mut self, listener: &TcpListener) -> bool {
        for _ in 0..ACCEPTS_PER_TURN {
            let (mut stream, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors, say: the listener stays
                    // readable, and edge-triggered polling would not say so
                    // again. Try again next second.
                    tracing::warn!("accept failed: {e}");
                    return false;
                }
            };
            // Counted even when refused: the refusal is answered (and the
            // request read, so that the client sees the answer rather than
            // a reset) before the socket goes.
            let open = self.shared.connections.fetch_add(1, Ordering::Relaxed);
            let mut refusal = (open >= self.config.max_connections).then_some((
                StatusCode::SERVICE_UNAVAILABLE,
                "Retry-After: 1\r\n",
                "too many connections",
            ));
            let mut counted_ip = None;
            if self.config.max_connections_per_ip > 0 && refusal.is_none() {
                let mut per_ip = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
                let n = per_ip.entry(peer.ip()).or_default();
                *n += 1;
                counted_ip = Some(peer.ip());
                if *n > self.config.max_connections_per_ip {
                    refusal = Some((
                        StatusCode::TOO_MANY_REQUESTS,
                        "",
                        "too many connections from your address",
                    ));
                }
            }
            let _ = stream.set_nodelay(true);
            let slot = self.slab.vacant_entry();
            let token = Token(slot.key());
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
            {
                tracing::warn!("register failed: {e}");
                self.shared.uncount(counted_ip);
                continue;
            }
            let key = slot.key();
            slot.insert(Entry {
                stream,
                counted_ip,
                writable: false,
                phase: Phase::Handshake {
                    head: Vec::new(),
                    since: self.now,
                },
            });
            if let Some((status, headers, text)) = refusal {
                self.answer(key, handshake::http_response(status, headers, text));
            }
        }
        true
    }

    fn ready(&mut self, key: usize) {
        let Some(entry) = self.slab.get_mut(key) else {
            return;
        };
        match &mut entry.phase {
            Phase::Handshake { .. } => self.read_handshake(key),
            Phase::Answer { .. } => self.write_answer(key),
            Phase::Open(_) => self.drive(key),
            Phase::Draining { .. } => self.drain(key),
        }
    }

    /// Reads the request head; answers it once whole.
    fn read_handshake(&mut self, key: usize) {
        let max = self.config.protocol.max_handshake_size;
        let entry = &mut self.slab[key];
        let Phase::Handshake { head, .. } = &mut entry.phase else {
            return;
        };
        let parsed = loop {
            match sys::recv(&entry.stream, &mut self.buffer) {
                Ok(0) => return self.remove(key, CloseCode::ABNORMAL),
                Ok(n) => {
                    head.extend_from_slice(&self.buffer[..n]);
                    match handshake::parse_request(head, max) {
                        Ok(None) => continue,
                        other => break other,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(key, CloseCode::ABNORMAL),
            }
        };
        let mut head = match &mut entry.phase {
            Phase::Handshake { head, .. } => std::mem::take(head),
            _ => unreachable!("checked above"),
        };
        match parsed {
            Ok(Some((request, _))) if self.handler.hand_off(&request) => {
                self.hand_over(key, request, head)
            }
            Ok(Some((request, len))) => self.answer_request(key, request, &mut head[len..]),
            Ok(None) => unreachable!("the loop goes on for a partial head"),
            Err(e) => self.answer(key, e.to_response()),
        }
    }

    /// Gives the connection to the handler: out of the poll and the slab,
    /// with every byte read from it.
    fn hand_over(&mut self, key: usize, request: Request<()>, received: Vec<u8>) {
        let Some(mut entry) = self.slab.try_remove(key) else {
            return;
        };
        let slot = ConnectionSlot {
            shared: self.shared.clone(),
            ip: entry.counted_ip,
        };
        let _ = self.poll.registry().deregister(&mut entry.stream);
        let stream = std::net::TcpStream::from(entry.stream);
        self.handler.handed_off(stream, request, received, slot);
    }

    fn answer_request(&mut self, key: usize, request: Request<()>, rest: &mut [u8]) {
        if self.shutting_down.is_some() {
            // Every request during the drain, health checks and upgrades
            // alike: a load balancer takes the server out.
            return self.answer(
                key,
                handshake::http_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Retry-After: 1\r\n",
                    "shutting down",
                ),
            );
        }
        if !handshake::is_upgrade_request(&request) {
            let response = match self.handler.http(&request) {
                Some(response) => serialize(&response),
                None => HandshakeError::NotWebSocketUpgrade.to_response(),
            };
            return self.answer(key, response);
        }
        if let Some(origins) = &self.config.origins {
            let origin = request
                .headers()
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok());
            if !origins.permits(origin) {
                let reason = format!("origin {} is not allowed", origin.unwrap_or("(none)"));
                return self.answer(
                    key,
                    handshake::http_response(StatusCode::FORBIDDEN, "", &reason),
                );
            }
        }
        let accepted = match ServerHandshake::new(request, self.config.protocol.clone()) {
            Ok(accepted) => accepted,
            Err(e) => return self.answer(key, e.to_response()),
        };
        let protocol = self
            .config
            .protocols
            .iter()
            .find(|ours| accepted.protocols().any(|p| p == ours.as_str()))
            .cloned();
        let request = accepted.request().clone();
        let (response, mut conn) = accepted.accept(protocol.as_deref(), &HeaderMap::new());
        let mut remote = None;
        let state = self.handler.open(
            &mut Socket {
                conn: &mut conn,
                remote: &mut remote,
                key,
                inbox: &self.inbox,
            },
            &request,
        );
        let now = self.now;
        let entry = &mut self.slab[key];
        // Written at once: a fresh socket takes it whole, but not always.
        let head = match sys::send(&entry.stream, &response) {
            Ok(n) => response[n..].to_vec(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => response,
            Err(_) => return self.remove(key, CloseCode::ABNORMAL),
        };
        entry.phase = Phase::Open(Box::new(Open {
            conn,
            state: Some(state),
            head,
            last_seen: now,
            last_data: now,
            ping_sent: 0,
            closing_since: 0,
            paused: false,
            code: None,
            remote,
            write_later: false,
            groups: Vec::new(),
        }));
        // The bytes that came with the head, then whatever is there.
        let Worker {
            slab,
            handler,
            inbox,
            ..
        } = self;
        if let Phase::Open(open) = &mut slab[key].phase {
            deliver(handler, open, rest, now, key, inbox);
        }
        self.drive(key);
    }

    /// Starts writing an HTTP answer; the connection closes after it.
    fn answer(&mut self, key: usize, out: Vec<u8>) {
        let since = self.now;
        self.slab[key].phase = Phase::Answer { out, since };
        self.write_answer(key);
    }

    fn write_answer(&mut self, key: usize) {
        let entry = &mut self.slab[key];
        let Phase::Answer { out, .. } = &mut entry.phase else {
            return;
        };
        while !out.is_empty() {
            match sys::send(&entry.stream, out) {
                Ok(0) => break,
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return entry.want_writable(self.poll.registry(), key, true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Our end closed, the rest of the request read and dropped: the
        // client reads the whole answer rather than a reset.
        let _ = entry.stream.shutdown(std::net::Shutdown::Write);
        let since = self.now;
        entry.phase = Phase::Draining { since };
        self.drain(key);
    }

    /// Reads and drops until the peer closes its end.
    fn drain(&mut self, key: usize) {
        let entry = &mut self.slab[key];
        loop {
            match sys::recv(&entry.stream, &mut self.buffer) {
                Ok(0) => return self.remove(key, CloseCode::ABNORMAL),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.remove(key, CloseCode::ABNORMAL),
            }
        }
    }

    /// Writes what is due, reads what is there (each read's messages
    /// handled at once), writes again: until the socket would block both
    /// ways or the connection ends.
    fn drive(&mut self, key: usize) {
        loop {
            match self.flush(key) {
                Ok(()) => {}
                Err(_) => return self.remove(key, CloseCode::ABNORMAL),
            }
            let max_pending = self.config.max_pending_output;
            let Some(open) = self.open(key) else {
                return;
            };
            if !open.head.is_empty() || open.conn.pending_output_len() > max_pending {
                // Waiting for the socket to take the output first.
                open.paused = true;
                return;
            }
            open.paused = false;
            if open.ending() && self.finished(key) {
                return;
            }
            let Worker {
                slab,
                handler,
                buffer,
                now,
                inbox,
                spare,
                spare_used,
                ..
            } = self;
            let entry = &mut slab[key];
            let Phase::Open(open) = &mut entry.phase else {
                return;
            };
            if open.conn.receiving_done() {
                return;
            }
            match sys::recv(&entry.stream, buffer) {
                Ok(0) => {
                    open.conn.receive_eof();
                    let code = open.code.unwrap_or(CloseCode::ABNORMAL);
                    return self.remove(key, code);
                }
                Ok(n) => {
                    open.last_seen = *now;
                    open.ping_sent = 0;
                    lend_buffers(&mut open.conn, spare, spare_used);
                    deliver(handler, open, &mut buffer[..n], *now, key, inbox);
                    if n < buffer.len() {
                        // The socket is drained; a new edge says when more
                        // comes. What the messages called for is written
                        // once every ready socket of this turn was read:
                        // the peers get their answers together, not one
                        // system call and one wake-up of theirs apart.
                        if open.write_later {
                            return;
                        }
                        let pending = open.conn.pending_output_len();
                        if self.write_later_bytes + pending > WRITE_LATER_BYTES {
                            // Written now, while it is in the cache: a
                            // turn's answers held for its end must stay
                            // small enough to be there too (1 KiB x 16 in
                            // flight from 100 connections is 1.6 MB, and
                            // the kernel then copied it from memory at
                            // half the speed).
                            return self.write_now(key);
                        }
                        self.write_later_bytes += pending;
                        open.write_later = true;
                        self.write_later.push(key);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.remove(key, CloseCode::ABNORMAL),
            }
        }
    }

    fn open(&mut self, key: usize) -> Option<&mut Open<H::State>> {
        match &mut self.slab.get_mut(key)?.phase {
            Phase::Open(open) => Some(open),
            _ => None,
        }
    }

    /// Writes the 101 response's rest and the connection's output.
    fn flush(&mut self, key: usize) -> io::Result<()> {
        loop {
            match self.flush_once(key)? {
                Flushed::Done => return Ok(()),
                // A message queued after a publication still in the inbox.
                Flushed::Stalled => self.take_inbox(),
            }
        }
    }

    fn flush_once(&mut self, key: usize) -> io::Result<Flushed> {
        let Worker {
            slab,
            poll,
            config,
            spare,
            spare_used,
            groups,
            applied,
            ..
        } = self;
        let entry = &mut slab[key];
        let Phase::Open(open) = &mut entry.phase else {
            return Ok(Flushed::Done);
        };
        let work = open.may_have_work();
        if !work && !entry.writable && open.head.is_empty() && !open.conn.has_buffers() {
            // Nothing to write, nothing to give back (a socket read while
            // its connection is idle).
            return Ok(Flushed::Done);
        }
        if work {
            lend_buffers(&mut open.conn, spare, spare_used);
            if open.pull(key, groups, *applied, config.max_pending_output) {
                return Ok(Flushed::Stalled);
            }
        }
        let mut blocked = false;
        while !open.head.is_empty() && !blocked {
            match sys::send(&entry.stream, &open.head) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    open.head.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if open.head.is_empty() && open.head.capacity() > 0 {
            open.head = Vec::new();
        }
        let mut stalled = false;
        loop {
            Self::write_output(&mut entry.stream, &mut open.conn, &mut blocked)?;
            // More than one pull took (the output's bound): on while the
            // socket takes it.
            if blocked || stalled || !open.may_have_work() {
                break;
            }
            let before = open.conn.pending_output_len();
            stalled = open.pull(key, groups, *applied, config.max_pending_output);
            if open.conn.pending_output_len() == before {
                break;
            }
        }
        if !blocked && open.head.is_empty() {
            // All out: the output buffer goes back (16 KiB once a message
            // was framed) rather than wait for the sweep, so that a burst
            // of messages to many connections does not leave each holding
            // one (19,000 x 16 KiB after a reconnect storm); kept for the
            // next connection to answer while there are few spare.
            match open.conn.take_idle_buffers() {
                Some(buffers) if spare.len() < SPARE_BUFFERS => spare.push(buffers),
                Some(_) => {}
                None => open.conn.release_idle_buffers(),
            }
        }
        if entry.writable != blocked {
            entry.want_writable(poll.registry(), key, blocked);
        }
        Ok(if stalled && !blocked {
            Flushed::Stalled
        } else {
            Flushed::Done
        })
    }

    /// Writes the connection's output until it is all out or the socket
    /// would block (`blocked`).
    fn write_output(
        stream: &mut TcpStream,
        conn: &mut Connection,
        blocked: &mut bool,
    ) -> io::Result<()> {
        while !*blocked && conn.has_pending_output() {
            let first = conn.pending_output();
            // One slice (the usual case): `write`, which is send(2), takes
            // a shorter way through the kernel than writev(2).
            let written = if first.len() == conn.pending_output_len() {
                sys::send(stream, first)
            } else {
                let mut slices = [IoSlice::new(&[]); 32];
                let n = conn.pending_output_slices(&mut slices);
                stream.write_vectored(&slices[..n])
            };
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => conn.consume_output(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => *blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Ends the connection if its closing handshake is over (or it failed)
    /// and its output is written; whether it ended.
    fn finished(&mut self, key: usize) -> bool {
        let now = self.now;
        let entry = &mut self.slab[key];
        let Phase::Open(open) = &mut entry.phase else {
            return true;
        };
        if open.conn.close_sent() && open.closing_since == 0 {
            open.closing_since = now;
        }
        if open.conn.has_pending_output() || !open.head.is_empty() {
            return false;
        }
        let code = open.code;
        if open.conn.failure().is_some() {
            // Our close frame is out: the peer gets to read it.
            let code = code.unwrap_or(CloseCode::PROTOCOL_ERROR);
            self.end_open(key, code);
            let entry = &mut self.slab[key];
            let _ = entry.stream.shutdown(std::net::Shutdown::Write);
            entry.phase = Phase::Draining { since: now };
            self.drain(key);
            return true;
        }
        if open.conn.close_received() && open.conn.close_sent() {
            // The handshake is over: the server closes TCP first (§7.1.1).
            self.remove(key, code.unwrap_or(CloseCode::NO_STATUS));
            return true;
        }
        false
    }

    /// Tells the handler the WebSocket ended (once).
    fn end_open(&mut self, key: usize, code: CloseCode) {
        let Worker { slab, handler, .. } = self;
        if let Some(Entry {
            phase: Phase::Open(open),
            ..
        }) = slab.get_mut(key)
        {
            if let Some(remote) = &open.remote {
                remote.end();
            }
            if let Some(state) = open.state.take() {
                handler.closed(state, code);
            }
            let memberships = std::mem::take(&mut open.groups);
            for m in memberships {
                self.forget_member(m, key);
            }
        }
    }

    /// Closes the connection for good.
    fn remove(&mut self, key: usize, code: CloseCode) {
        self.end_open(key, code);
        if let Some(entry) = self.slab.try_remove(key) {
            self.shared.uncount(entry.counted_ip);
        }
    }

    /// Once a second: deadlines, keepalive pings, idle buffers.
    fn sweep(&mut self) {
        if !std::mem::take(&mut self.spare_used) {
            // A quiet second: an idle server holds no buffers.
            self.spare = Vec::new();
        }
        let now = self.now;
        let config = self.config.clone();
        let handshake = secs(config.handshake_timeout);
        let close = secs(config.close_timeout);
        let pong = secs(config.pong_timeout);
        let ping = config.ping_interval.map(secs);
        let idle = config.idle_timeout.map(secs);
        // Connections past a deadline, with the code they end with; and
        // those with something to write (a ping, an idle close).
        let mut expired = Vec::new();
        let mut to_write = Vec::new();
        for (key, entry) in self.slab.iter_mut() {
            match &mut entry.phase {
                Phase::Handshake { since, .. } if now - *since >= handshake => {
                    expired.push((key, CloseCode::ABNORMAL));
                }
                Phase::Answer { since, .. } | Phase::Draining { since }
                    if now - *since >= close =>
                {
                    expired.push((key, CloseCode::ABNORMAL));
                }
                Phase::Open(open) => {
                    if (open.closing_since != 0 && now - open.closing_since >= close)
                        || (open.ping_sent != 0 && now - open.ping_sent >= pong)
                    {
                        expired.push((key, open.code.unwrap_or(CloseCode::ABNORMAL)));
                        continue;
                    }
                    let busy = open.conn.has_pending_output() || open.conn.input_len() > 0;
                    let closing = open.conn.close_sent();
                    if ping.is_some_and(|ping| {
                        open.ping_sent == 0 && !closing && now - open.last_seen >= ping
                    }) {
                        let _ = open.conn.send_ping(b"tidewire keepalive");
                        open.ping_sent = now;
                    }
                    if idle.is_some_and(|idle| !closing && now - open.last_data >= idle) {
                        let _ = open.conn.send_close(Some(CloseFrame::new(
                            CloseCode::GOING_AWAY,
                            "idle timeout",
                        )));
                    }
                    if open.conn.has_pending_output() {
                        to_write.push(key);
                    } else if !busy {
                        open.conn.release_idle_buffers();
                        if let Some(remote) = &open.remote {
                            remote.release_idle();
                        }
                    }
                }
                _ => {}
            }
        }
        for (key, code) in expired {
            self.remove(key, code);
        }
        for key in to_write {
            self.drive(key);
        }
        if self.listener.is_some() {
            // An accept that failed (out of descriptors) is tried again.
            self.accept_pending = true;
        }
    }

    /// Starts every WebSocket's closing handshake; the listener stays
    /// open meanwhile, every new request answered 503 "shutting down" (or
    /// handed off, as before).
    fn begin_shutdown(&mut self) {
        self.shutting_down = Some(self.now);
        let keys: Vec<usize> = self.slab.iter().map(|(key, _)| key).collect();
        // A request head on its way is still read and answered (503), within
        // the handshake timeout: a health check accepted just before the
        // shutdown gets its answer.
        for key in keys {
            if let Phase::Open(open) = &mut self.slab[key].phase {
                if !open.conn.close_sent() {
                    let _ = open.conn.send_close(Some(CloseFrame::new(
                        CloseCode::GOING_AWAY,
                        "server shutting down",
                    )));
                    open.code.get_or_insert(CloseCode::GOING_AWAY);
                }
                self.drive(key);
            }
        }
    }
}

/// What a flush came to.
enum Flushed {
    Done,
    /// It stopped at a message queued after a publication still in the
    /// inbox.
    Stalled,
}

/// Gives `conn` a spare set of in-flight buffers if it has none.
fn lend_buffers(conn: &mut Connection, spare: &mut Vec<IdleBuffers>, used: &mut bool) {
    if !conn.has_buffers() {
        if let Some(buffers) = spare.pop() {
            *used = true;
            let _ = conn.give_buffers(buffers);
        }
    }
}

/// Messages up to this size are parsed in place and handed out borrowed;
/// larger ones go through the connection's buffer and come owned, so that
/// an echo or a fan-out sends them on by reference instead of copying.
const IN_PLACE_MAX: usize = 16 << 10;

/// Hands `data`, just read, to the connection, and its messages to the
/// handler: small ones parsed in place (see
/// `Connection::parse_in_place`), never copied on their way in.
fn deliver<H: Handler>(
    handler: &mut H,
    open: &mut Open<H::State>,
    data: &mut [u8],
    now: u32,
    key: usize,
    inbox: &Arc<Inbox>,
) {
    let Open {
        conn,
        state,
        code,
        last_data,
        remote,
        ..
    } = open;
    let Some(state) = state.as_mut() else {
        return;
    };
    let mut seen = |message: &Incoming<'_>| match message {
        Incoming::Text(_) | Incoming::Binary(_) => *last_data = now,
        Incoming::Close(frame) => *code = Some(frame.map_or(CloseCode::NO_STATUS, |f| f.code)),
        Incoming::Ping(_) | Incoming::Pong(_) => {}
    };
    let parsed = conn.parse_in_place(data, IN_PLACE_MAX, |conn, message| {
        seen(&message);
        let socket = &mut Socket {
            conn,
            remote,
            key,
            inbox,
        };
        handler.message(socket, state, message);
    });
    let result = parsed.and_then(|used| {
        if used < data.len() && !conn.receiving_done() {
            conn.receive_data(&data[used..]);
            while let Some(event) = conn.next_event()? {
                seen(&event.as_event_ref());
                let socket = &mut Socket {
                    conn,
                    remote,
                    key,
                    inbox,
                };
                handler.message_owned(socket, state, Message::from(event));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        // The close frame with the error's code is queued.
        *code = Some(e.close_code());
    }
}

/// An HTTP/1.1 response with its body, then the connection closes.
fn serialize(response: &Response<Bytes>) -> Vec<u8> {
    let mut out = crate::runtime::closing_response_head(
        response.status(),
        response.headers(),
        response.body().len(),
    );
    out.extend_from_slice(response.body());
    out
}
