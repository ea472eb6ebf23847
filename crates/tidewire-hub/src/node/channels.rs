//! Channels on this node: their subscribers (live, or parked while they
//! read history), joining and leaving them, and the fan-out of
//! publications and `presence_diff` pushes to their subscribers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::time::Instant;

use super::front::{ClientSink, FrameKind, SendOutcome};
use super::presence_diff::PendingDiff;
use super::registry::Client;
use super::Node;
use crate::engine::{EngineError, EngineEvents};
use crate::protocol::{ClientInfo, Codec, EncodedPush, Frame, Publication, Push, Unsubscribed};
use crate::shards::lock;

#[derive(Default)]
pub(super) struct Channel {
    /// Locked before `subscribers` when both are held.
    pub(super) presence: Mutex<PendingDiff>,
    pub(super) subscribers: Mutex<Subscribers>,
}

type ParkedFrames = Vec<(u64, Frame)>;

/// A subscriber not live yet.
pub(super) struct Parked {
    client: u64,
    /// What the frames it keeps are encoded with.
    codec: &'static dyn Codec,
    state: ParkedState,
}

enum ParkedState {
    /// Reading history: the publications that arrive wait here.
    Reading(ParkedFrames),
    /// Has its reply, with the stream at `after`, but publications up to
    /// `after` are still on their way to this node (stored before the
    /// history read, handed over after it): they are skipped, the first
    /// one past `after` is sent and the subscriber goes live.
    CatchingUp {
        after: u64,
        sink: Arc<dyn ClientSink>,
    },
}

#[derive(Default)]
pub(super) struct Subscribers {
    pub(super) live: Vec<(u64, Arc<dyn ClientSink>)>,
    /// Position of each live subscriber in `live`.
    pub(super) index: HashMap<u64, usize>,
    /// Live subscribers on the event loop: members of the channel's
    /// groups there (one per codec), not in `live`.
    grouped: HashMap<u64, Arc<dyn ClientSink>>,
    groups: Vec<(&'static dyn Codec, tidewire::event_loop::Group)>,
    /// Subscribers not live yet (see [`Parked`]).
    pub(super) parked: Vec<Parked>,
    /// The newest offset handed to this channel's subscribers (offsets
    /// reach a node in order).
    delivered: u64,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.parked.is_empty() && self.grouped.is_empty()
    }

    pub(super) fn members(&self) -> usize {
        self.live.len() + self.parked.len() + self.grouped.len()
    }

    /// The live subscribers' ids, grouped ones included.
    fn live_ids(&self) -> Vec<u64> {
        let live = self.live.iter().map(|(id, _)| *id);
        live.chain(self.grouped.keys().copied()).collect()
    }

    /// A live subscriber's sink.
    fn live_sink(&self, client: u64) -> Option<Arc<dyn ClientSink>> {
        match self.index.get(&client) {
            Some(&at) => Some(self.live[at].1.clone()),
            None => self.grouped.get(&client).cloned(),
        }
    }

    /// The channel's group for `codec` on the event loop (made on first
    /// use, with `limits` for its members' backlogs).
    fn group(
        &mut self,
        codec: &'static dyn Codec,
        limits: tidewire::QueueLimits,
    ) -> &tidewire::event_loop::Group {
        let at = match self
            .groups
            .iter()
            .position(|(c, _)| c.name() == codec.name())
        {
            Some(at) => at,
            None => {
                self.groups
                    .push((codec, tidewire::event_loop::Group::new(limits)));
                self.groups.len() - 1
            }
        };
        &self.groups[at].1
    }

    fn add_live(&mut self, client: u64, sink: Arc<dyn ClientSink>, limits: tidewire::QueueLimits) {
        if self.index.contains_key(&client) || self.grouped.contains_key(&client) {
            return;
        }
        if let Some(remote) = sink.event_loop_remote() {
            self.group(sink.transport().codec, limits).join(remote);
            self.grouped.insert(client, sink);
            return;
        }
        self.index.insert(client, self.live.len());
        self.live.push((client, sink));
    }

    fn take_parked(&mut self, client: u64) -> Option<ParkedState> {
        let at = self.parked.iter().position(|p| p.client == client)?;
        Some(self.parked.swap_remove(at).state)
    }

    fn remove(&mut self, client: u64) -> bool {
        if self.take_parked(client).is_some() {
            return true;
        }
        if let Some(sink) = self.grouped.remove(&client) {
            let codec = sink.transport().codec.name();
            if let (Some(remote), Some((_, group))) = (
                sink.event_loop_remote(),
                self.groups.iter().find(|(c, _)| c.name() == codec),
            ) {
                group.leave(remote);
            }
            if self.grouped.is_empty() {
                self.grouped = HashMap::new();
            }
            return true;
        }
        let Some(at) = self.index.remove(&client) else {
            return false;
        };
        self.live.swap_remove(at);
        if let Some((moved, _)) = self.live.get(at) {
            self.index.insert(*moved, at);
        }
        if self.live.is_empty() {
            // Give the memory of a big channel back when it empties.
            self.live = Vec::new();
            self.index = HashMap::new();
        }
        true
    }
}

impl Node {
    /// Adds a parked subscriber (reading history before it goes live).
    pub(super) fn park(&self, channel: &str, client: u64, codec: &'static dyn Codec) {
        self.add_subscriber(channel, |subs| {
            subs.parked.push(Parked {
                client,
                codec,
                state: ParkedState::Reading(Vec::new()),
            });
        });
    }

    /// Runs `add` on the subscribers of `channel` (created if new) under
    /// its lock, and counts the subscription (and the channel) in the
    /// metrics, as [`leave_channel`](Self::leave_channel) uncounts them.
    fn add_subscriber(&self, channel: &str, add: impl FnOnce(&mut Subscribers)) {
        let mut shard = self.channels.lock(channel);
        let mut created = false;
        let ch = shard.entry(channel.to_owned()).or_insert_with(|| {
            created = true;
            Arc::default()
        });
        add(&mut lock(&ch.subscribers));
        drop(shard);
        self.metrics.subscriptions.inc();
        if created {
            self.metrics.channels.inc();
        }
    }

    /// Sends the subscribe reply and what was parked after `after` (the
    /// stream's offset in the reply), then makes the subscriber live, all
    /// under the channel's lock (so that no publication slips between).
    /// When publications up to `after` have not all reached this node yet
    /// (a publisher stored one before the history read and is still
    /// handing it over), the subscriber catches up first: those are
    /// skipped, so that it sees none twice. When the subscriber was removed
    /// meanwhile (unsubscribed by the server), only the reply goes out.
    pub(super) fn go_live(&self, channel: &str, client: &Client, reply: Frame, after: u64) {
        let Some(ch) = self.channels.lock(channel).get(channel).cloned() else {
            client.sink.send(reply, FrameKind::Control);
            return;
        };
        let mut subs = lock(&ch.subscribers);
        let Some(ParkedState::Reading(parked)) = subs.take_parked(client.id) else {
            client.sink.send(reply, FrameKind::Control);
            return;
        };
        client.sink.send(reply, FrameKind::Control);
        let mut newest = subs.delivered;
        for (offset, frame) in parked {
            if offset > after {
                client.sink.send(frame, FrameKind::Publication);
            }
            newest = newest.max(offset);
        }
        if newest >= after {
            subs.add_live(client.id, client.sink.clone(), self.group_limits());
        } else {
            subs.parked.push(Parked {
                client: client.id,
                codec: client.codec(),
                state: ParkedState::CatchingUp {
                    after,
                    sink: client.sink.clone(),
                },
            });
        }
    }

    /// Removes a subscriber; true when the channel emptied and was removed.
    pub(super) fn detach(&self, channel: &str, client: u64) -> (bool, bool) {
        let mut shard = self.channels.lock(channel);
        let Some(ch) = shard.get(channel) else {
            return (false, false);
        };
        let mut subs = lock(&ch.subscribers);
        let removed = subs.remove(client);
        let empty = subs.is_empty();
        drop(subs);
        if empty {
            shard.remove(channel);
        }
        (removed, empty)
    }

    /// Unsubscribes a client on the server's initiative, with an
    /// `unsubscribe` push; false when it was not subscribed.
    pub(super) async fn server_unsubscribe(
        &self,
        client: &Client,
        channel: &str,
        why: &Unsubscribed,
    ) -> bool {
        let removed = {
            let mut st = lock(&client.state);
            let before = st.subscriptions.len();
            st.subscriptions.retain(|s| s != channel);
            st.expiring.retain(|(s, _)| s != channel);
            st.subscriptions.len() != before
        };
        if removed {
            self.leave_channel(client, channel).await;
            client.push(&Push::Unsubscribe { channel, why });
        }
        removed
    }

    /// Everything that leaving a channel entails (the client's own list
    /// was already updated by the caller).
    pub(super) async fn leave_channel(&self, client: &Client, channel: &str) {
        let (removed, emptied) = self.detach(channel, client.id);
        self.after_leaving(client, channel, removed, emptied).await;
    }

    /// What follows a client's removal from a channel's subscribers.
    async fn after_leaving(&self, client: &Client, channel: &str, removed: bool, emptied: bool) {
        if removed {
            self.metrics.subscriptions.dec();
        }
        if emptied {
            self.metrics.channels.dec();
            if let Err(e) = self.sync_engine_subscription(channel).await {
                tracing::warn!("{e}");
            }
        }
        let (Ok(options), Some(info)) = (self.config.channel_options(channel), client.info())
        else {
            return;
        };
        if options.presence {
            if let Err(e) = self
                .presence_store
                .remove_presence(channel, &info.client)
                .await
            {
                tracing::warn!("{e}");
            }
        }
        if options.join_leave {
            if let Err(e) = self.broker.publish_leave(channel, info).await {
                tracing::warn!("{e}");
            }
        }
    }

    /// Makes the engine's subscription to `channel` match this node's
    /// subscribers: subscribed while the channel has any (live or
    /// parked), unsubscribed after the last one left. Calls for one
    /// channel run one at a time, and each acts on the state it finds, not
    /// on the change that triggered it: a last leave and a first join that
    /// race each other leave the engine subscribed exactly when the
    /// channel has subscribers, whatever order their calls finish in.
    pub(super) async fn sync_engine_subscription(&self, channel: &str) -> Result<(), EngineError> {
        let link = self
            .engine_links
            .lock(channel)
            .entry(channel.to_owned())
            .or_default()
            .clone();
        let result = {
            let mut subscribed = link.lock().await;
            let wanted = self.channels.lock(channel).contains_key(channel);
            match (wanted, *subscribed) {
                (true, false) => {
                    let result = self.broker.subscribe(channel).await;
                    *subscribed = result.is_ok();
                    result
                }
                (false, true) => {
                    // Even when it fails: this node no longer routes the
                    // channel, what the engine still sends is dropped.
                    *subscribed = false;
                    self.broker.unsubscribe(channel).await
                }
                _ => Ok(()),
            }
        };
        // The link of a channel the engine is not subscribed to goes,
        // unless another call holds it (it was cloned under this lock).
        let mut links = self.engine_links.lock(channel);
        if let Some(held) = links.get(channel) {
            let idle = Arc::ptr_eq(held, &link)
                && Arc::strong_count(&link) == 2
                && link.try_lock().is_ok_and(|subscribed| !*subscribed);
            if idle {
                links.remove(channel);
            }
        }
        result
    }

    /// Queues `push` (encoded once per codec) on every live subscriber of
    /// `ch`, and on the parked
    /// ones: for a publication at offset `park`, a subscriber reading
    /// history keeps it for later, one catching up gets it if it is past
    /// its position; either way it goes live once the publication at or
    /// past its position came; other pushes go to those catching up as to
    /// the live.
    pub(super) fn deliver(&self, ch: &Channel, push: &mut EncodedPush<'_>, park: Option<u64>) {
        let mut subs = lock(&ch.subscribers);
        let (mut delivered, mut dropped) = (0u64, 0u64);
        let mut caught_up = Vec::new();
        for parked in subs.parked.iter_mut() {
            match (&mut parked.state, park) {
                (ParkedState::Reading(frames), Some(offset)) => {
                    frames.push((offset, push.frame(parked.codec).clone()));
                }
                (ParkedState::Reading(_), None) => {}
                (ParkedState::CatchingUp { after, .. }, Some(offset)) if offset <= *after => {
                    // In its position already; the one at its position
                    // was the last on its way: live from the next one.
                    if offset == *after {
                        caught_up.push(parked.client);
                    }
                }
                (ParkedState::CatchingUp { sink, .. }, _) => {
                    let frame = push.frame(sink.transport().codec).clone();
                    match sink.send(frame, FrameKind::Publication) {
                        SendOutcome::Queued => delivered += 1,
                        SendOutcome::Dropped => dropped += 1,
                        SendOutcome::Closed => {}
                    }
                    if park.is_some() {
                        caught_up.push(parked.client);
                    }
                }
            }
        }
        if let Some(offset) = park {
            subs.delivered = subs.delivered.max(offset);
        }
        let caught_up: Vec<(u64, Arc<dyn ClientSink>)> = caught_up
            .into_iter()
            .filter_map(|client| match subs.take_parked(client) {
                Some(ParkedState::CatchingUp { sink, .. }) => Some((client, sink)),
                _ => None,
            })
            .collect();
        // Queued on every subscriber first; the ones not already due are
        // woken afterwards by the dispatcher, a wave at a time.
        let mut due = Vec::new();
        for (_, sink) in &subs.live {
            let frame = push.frame(sink.transport().codec).clone();
            let (outcome, wake) = sink.send_deferred(frame, FrameKind::Publication);
            match outcome {
                SendOutcome::Queued => delivered += 1,
                SendOutcome::Dropped => dropped += 1,
                SendOutcome::Closed => {}
            }
            if wake {
                due.push(sink.clone());
            }
        }
        // The event loop's subscribers: one post per loop thread.
        let mut slow = 0;
        for (codec, group) in &subs.groups {
            if group.members() == 0 {
                continue;
            }
            let frame = push.frame(*codec).clone();
            delivered += group.publish(crate::fronts::websocket::message(frame)) as u64;
            dropped += group.take_dropped();
            slow += group.take_closed();
        }
        if slow > 0 {
            self.metrics.slow_consumers.inc_by(slow);
        }
        // Live from the next frame on (they have this one).
        let limits = self.group_limits();
        for (client, sink) in caught_up {
            subs.add_live(client, sink, limits);
        }
        drop(subs);
        if !due.is_empty() {
            // Event-loop subscribers go to their workers at once, all
            // together; the others to the wake dispatcher.
            let mut batch = tidewire::event_loop::Wakes::new();
            due.retain(|sink| !sink.wake_batched(&mut batch));
            batch.flush();
            if !due.is_empty() {
                lock(&self.wakes).extend(due);
                self.wake_signal.notify_one();
            }
        }
        self.metrics.deliveries.inc_by(delivered);
        if dropped > 0 {
            self.metrics.dropped.inc_by(dropped);
        }
    }

    /// The bounds of a subscriber's backlog in a channel's group on the
    /// event loop: the client queue's, with the slow-consumer policy
    /// (`drop` skips the oldest publication, `close` closes).
    fn group_limits(&self) -> tidewire::QueueLimits {
        let client = &self.config.client;
        tidewire::QueueLimits {
            max_messages: client.queue_messages,
            max_bytes: client.queue_bytes,
            policy: match client.slow_consumer {
                tidewire::SlowConsumer::Close(code) => tidewire::SlowConsumer::Close(code),
                _ => tidewire::SlowConsumer::Drop,
            },
        }
    }

    /// A join or leave: gathered into the channel's next `presence_diff`
    /// push. The first one after a quiet interval goes out at once; the
    /// ones that follow within `join_leave_interval` go out together when
    /// it ends (see [`crate::presence_diff`]).
    pub(super) fn presence_event(&self, channel: &str, info: &Arc<ClientInfo>, join: bool) {
        let Some(ch) = self.channels.lock(channel).get(channel).cloned() else {
            return;
        };
        let Ok(options) = self.config.channel_options(channel) else {
            return;
        };
        let max = options.join_leave_max_members;
        let mut pending = lock(&ch.presence);
        let members = lock(&ch.subscribers).members();
        pending.record(info, join, members, max);
        if pending.scheduled {
            return;
        }
        if let Some(sent) = pending.last_sent {
            let due = sent + options.join_leave_interval;
            if Instant::now() < due {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    pending.scheduled = true;
                    runtime.spawn(send_presence_diff_at(
                        due,
                        self.me.clone(),
                        Arc::downgrade(&ch),
                        channel.to_owned(),
                    ));
                    return;
                }
            }
        }
        self.send_presence_diff(channel, &ch, &mut pending, max);
    }

    /// Sends what `pending` (the channel's, locked by the caller) gathered.
    pub(super) fn send_presence_diff(
        &self,
        channel: &str,
        ch: &Channel,
        pending: &mut PendingDiff,
        max_listed: usize,
    ) {
        let members = lock(&ch.subscribers).members();
        if let Some(taken) = pending.take(members, max_listed) {
            pending.last_sent = Some(Instant::now());
            self.deliver(ch, &mut EncodedPush::new(taken.push(channel)), None);
        }
    }
}

/// The timer of a channel's coalesced `presence_diff` push.
pub(super) async fn send_presence_diff_at(
    due: Instant,
    node: Weak<Node>,
    ch: Weak<Channel>,
    channel: String,
) {
    tokio::time::sleep_until(due).await;
    let (Some(node), Some(ch)) = (node.upgrade(), ch.upgrade()) else {
        return;
    };
    let Ok(options) = node.config.channel_options(&channel) else {
        return;
    };
    let mut pending = lock(&ch.presence);
    pending.scheduled = false;
    node.send_presence_diff(&channel, &ch, &mut pending, options.join_leave_max_members);
}

impl EngineEvents for Node {
    fn publication(&self, channel: &str, publication: &Arc<Publication>) {
        self.metrics.publications.inc();
        let Some(ch) = self.channels.lock(channel).get(channel).cloned() else {
            return;
        };
        let mut pending = lock(&ch.presence);
        // Members hear who joined before what the newcomer publishes.
        if pending.has_listed() {
            if let Ok(options) = self.config.channel_options(channel) {
                self.send_presence_diff(channel, &ch, &mut pending, options.join_leave_max_members);
            }
        }
        let mut push = EncodedPush::new(Push::Publication {
            channel,
            publication,
        });
        self.deliver(&ch, &mut push, Some(publication.offset));
    }

    fn join(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.presence_event(channel, info, true);
    }

    fn leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.presence_event(channel, info, false);
    }

    fn gap(&self, channel: &str) {
        let Some(node) = self.me.upgrade() else {
            return;
        };
        let why = Unsubscribed {
            code: 2002,
            reason: "publications were lost on their way: subscribe again to recover".into(),
        };
        // Out of the live list and told under the channel's lock, so that
        // no publication from after the gap reaches them first (they
        // would take its offset for their position).
        let (gone, emptied) = {
            let mut shard = self.channels.lock(channel);
            let Some(ch) = shard.get(channel).cloned() else {
                return;
            };
            let mut subs = lock(&ch.subscribers);
            let ids = subs.live_ids();
            let mut gone = Vec::with_capacity(ids.len());
            let mut notice = EncodedPush::new(Push::Unsubscribe { channel, why: &why });
            for id in ids {
                if let Some(sink) = subs.live_sink(id) {
                    subs.remove(id);
                    sink.send(
                        notice.frame(sink.transport().codec).clone(),
                        FrameKind::Control,
                    );
                    gone.push(id);
                }
            }
            let emptied = subs.is_empty();
            drop(subs);
            if emptied {
                shard.remove(channel);
            }
            (gone, emptied)
        };
        tracing::warn!(
            channel,
            subscribers = gone.len(),
            "publications lost: subscribers told to subscribe again"
        );
        let channel = channel.to_owned();
        tokio::spawn(async move {
            let count = gone.len();
            for (n, id) in gone.into_iter().enumerate() {
                let client = node.clients.lock(&id).get(&id).cloned();
                let Some(client) = client else { continue };
                lock(&client.state).subscriptions.retain(|s| *s != channel);
                // The channel's own bookkeeping once, with the last one.
                let last = n + 1 == count;
                node.after_leaving(&client, &channel, true, emptied && last)
                    .await;
            }
        });
    }

    fn control(&self, message: &[u8]) {
        if let Some(node) = self.me.upgrade() {
            node.on_control(message);
        }
    }
}
