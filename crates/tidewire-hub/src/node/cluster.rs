//! The node among its peers: its id, the control messages nodes send each
//! other through the broker, and the registry of the nodes it heard from.
//!
//! Every node sends a heartbeat (its id, uptime, counts, counters and
//! engine health) every [`HEARTBEAT`]; a node not heard from for
//! [`NODE_TIMEOUT`] is dropped from the registry, so `/api/info` lists the
//! nodes that are up and admin pages (`crate::admin`) see every node. The HTTP
//! API's `disconnect` and `unsubscribe` act on this node's clients and ask
//! every other node to act on theirs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Hub, HubCounts, Node};
use crate::admin::{AdminNode, AdminToken, AdminTokenError, AdminView, ADMIN_CHANNEL, ADMIN_EVERY};
use crate::protocol::{Disconnect, EncodedPush, Payload, Publication, Push, Unsubscribed};
use crate::shards::lock;

/// How often a node tells the others it is up (and how it is: admin
/// pages draw its rates from these).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A node not heard from for this long is taken for gone.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// What nodes tell each other, as JSON through the broker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Control {
    /// A node is up, with what it holds.
    Heartbeat {
        #[serde(flatten)]
        info: NodeInfo,
    },
    /// Disconnect a user's clients (or one of them) on every other node.
    Disconnect {
        from: String,
        user: String,
        client: Option<String>,
        code: u16,
        reason: String,
        reconnect: bool,
    },
    /// Unsubscribe a user's clients (or one of them) from a channel on
    /// every other node.
    Unsubscribe {
        from: String,
        user: String,
        channel: String,
        client: Option<String>,
    },
    /// Every other node: answer with your channels that start with
    /// `prefix` and their subscriber counts.
    ChannelsSurvey {
        from: String,
        id: u64,
        prefix: String,
    },
    /// A node's answer to a survey.
    ChannelsAnswer {
        to: String,
        id: u64,
        node: String,
        channels: Vec<(String, usize)>,
    },
    /// For a front on node `to` (an HTTP request that landed on another
    /// node than its session's, say): handed to the handler of `topic`.
    Relay {
        to: String,
        topic: String,
        payload: String,
    },
}

/// What a front registers to receive [`Hub::relay`]ed messages.
pub type RelayHandler = Arc<dyn Fn(&str) + Send + Sync>;

/// The relay handlers of a node, by topic.
#[derive(Default)]
pub(super) struct Relays {
    handlers: std::sync::RwLock<HashMap<String, RelayHandler>>,
}

/// How long a survey waits for the other nodes' answers.
pub const SURVEY_TIMEOUT: Duration = Duration::from_secs(1);

/// Channels with their subscriber counts, as a survey answers them.
type ChannelCounts = Vec<(String, usize)>;

/// Surveys under way: the answers still expected, and where they go.
#[derive(Default)]
pub(super) struct Surveys {
    next: std::sync::atomic::AtomicU64,
    waiting: Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<ChannelCounts>>>,
}

/// A node as the registry knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub node: String,
    /// Seconds since it started.
    pub uptime_seconds: u64,
    /// What it holds.
    pub counts: HubCounts,
    /// Publications routed to its subscribers since it started.
    #[serde(default)]
    pub publications: u64,
    /// Frames queued to its subscribers since it started.
    #[serde(default)]
    pub deliveries: u64,
    /// When it sent this (Unix time in milliseconds): rates are counted
    /// between two of these.
    #[serde(default)]
    pub at_ms: u64,
    /// Why its engine does not work (absent: it works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
}

/// The nodes heard from, by id, with when.
#[derive(Default)]
pub(super) struct Registry {
    nodes: Mutex<HashMap<String, (NodeInfo, Instant)>>,
}

impl Registry {
    fn heard(&self, info: NodeInfo) {
        lock(&self.nodes).insert(info.node.clone(), (info, Instant::now()));
    }

    /// The nodes heard from within [`NODE_TIMEOUT`] (others are
    /// dropped).
    fn live(&self) -> Vec<NodeInfo> {
        self.live_with_age()
            .into_iter()
            .map(|(info, _)| info)
            .collect()
    }

    /// The same, each with how long ago it was heard from.
    fn live_with_age(&self) -> Vec<(NodeInfo, Duration)> {
        let now = Instant::now();
        let mut nodes = lock(&self.nodes);
        nodes.retain(|_, (_, seen)| now.duration_since(*seen) < NODE_TIMEOUT);
        nodes
            .values()
            .map(|(info, seen)| (info.clone(), now.duration_since(*seen)))
            .collect()
    }
}

impl Node {
    /// Sends a control message to every node (this one too; it ignores
    /// its own).
    pub(super) async fn send_control(&self, message: &Control) {
        let bytes = match serde_json::to_vec(message) {
            Ok(bytes) => bytes,
            Err(e) => return tracing::warn!("control message: {e}"),
        };
        if let Err(e) = self.broker.publish_control(&bytes).await {
            tracing::warn!("control message: {e}");
        }
    }

    /// A control message from a node (this one included).
    pub(super) fn on_control(self: &Arc<Node>, bytes: &[u8]) {
        let message: Control = match serde_json::from_slice(bytes) {
            Ok(message) => message,
            Err(e) => return tracing::warn!("unreadable control message: {e}"),
        };
        match message {
            Control::Heartbeat { info } => self.registry.heard(info),
            Control::Disconnect {
                from,
                user,
                client,
                code,
                reason,
                reconnect,
            } if *from != *self.id => {
                let disconnect = Disconnect {
                    code,
                    reason,
                    reconnect,
                };
                for c in self.clients_of(&user, client.as_deref()) {
                    c.disconnect(&disconnect);
                }
            }
            Control::Unsubscribe {
                from,
                user,
                channel,
                client,
            } if *from != *self.id => {
                let node = self.clone();
                tokio::spawn(async move {
                    for c in node.clients_of(&user, client.as_deref()) {
                        node.server_unsubscribe(&c, &channel, &by_the_server())
                            .await;
                    }
                });
            }
            Control::ChannelsSurvey { from, id, prefix } if *from != *self.id => {
                let node = self.clone();
                tokio::spawn(async move {
                    let answer = Control::ChannelsAnswer {
                        to: from,
                        id,
                        node: node.id.to_string(),
                        channels: node.local_channels(&prefix),
                    };
                    node.send_control(&answer).await;
                });
            }
            Control::Relay { to, topic, payload } if *to == *self.id => {
                let handler = self
                    .relays
                    .handlers
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&topic)
                    .cloned();
                match handler {
                    Some(handler) => handler(&payload),
                    None => tracing::debug!(topic, "relayed message for no handler"),
                }
            }
            Control::ChannelsAnswer {
                to, id, channels, ..
            } if *to == *self.id => {
                if let Some(waiting) = lock(&self.surveys.waiting).get(&id) {
                    let _ = waiting.send(channels);
                }
            }
            _ => {}
        }
    }

    /// This node's channels that start with `prefix`, with their
    /// subscriber counts, by name.
    pub(super) fn local_channels(&self, prefix: &str) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for shard in self.channels.each() {
            for (name, channel) in shard.iter().filter(|(n, _)| n.starts_with(prefix)) {
                out.push((name.clone(), lock(&channel.subscribers).members()));
            }
        }
        out.sort();
        out
    }

    /// The other live nodes' channels (answers within [`SURVEY_TIMEOUT`];
    /// a node that does not answer in time is left out). No wait at all
    /// when this node is alone.
    pub(super) async fn survey_channels(&self, prefix: &str) -> Vec<(String, usize)> {
        let others = self
            .registry
            .live()
            .iter()
            .filter(|n| *n.node != *self.id)
            .count();
        if others == 0 {
            return Vec::new();
        }
        let id = self
            .surveys
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (answers, mut incoming) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.surveys.waiting).insert(id, answers);
        self.send_control(&Control::ChannelsSurvey {
            from: self.id.to_string(),
            id,
            prefix: prefix.to_owned(),
        })
        .await;
        let mut all = Vec::new();
        let deadline = Instant::now() + SURVEY_TIMEOUT;
        for _ in 0..others {
            match tokio::time::timeout_at(deadline, incoming.recv()).await {
                Ok(Some(channels)) => all.extend(channels),
                _ => break,
            }
        }
        lock(&self.surveys.waiting).remove(&id);
        all
    }
}

/// Why the HTTP API unsubscribed a client.
pub(super) fn by_the_server() -> Unsubscribed {
    Unsubscribed {
        code: 2000,
        reason: "unsubscribed by the server".into(),
    }
}

impl Hub {
    /// This node's id (random, new at each start).
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// The nodes that are up, this one first, then by id: this node as it
    /// is now, the others as of their last heartbeat.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut others: Vec<NodeInfo> = self
            .node
            .registry
            .live()
            .into_iter()
            .filter(|n| *n.node != *self.node.id)
            .collect();
        others.sort_by(|a, b| a.node.cmp(&b.node));
        let mut nodes = vec![self.own_info()];
        nodes.extend(others);
        nodes
    }

    pub(super) fn own_info(&self) -> NodeInfo {
        NodeInfo {
            node: self.node.id.to_string(),
            uptime_seconds: self.uptime().as_secs(),
            counts: self.counts(),
            publications: self.node.metrics.publications.get(),
            deliveries: self.node.metrics.deliveries.get(),
            at_ms: unix_ms(),
            unhealthy: lock(&self.node.unhealthy).clone(),
        }
    }

    /// Sends `payload` to the handler of `topic` on node `to` (through
    /// the broker; on this node, directly). At most once, like every
    /// control message: the front makes up for a loss.
    pub async fn relay(&self, to: &str, topic: &str, payload: String) {
        if to == &*self.node.id {
            let handler = self
                .node
                .relays
                .handlers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(topic)
                .cloned();
            if let Some(handler) = handler {
                handler(&payload);
            }
            return;
        }
        self.node
            .send_control(&Control::Relay {
                to: to.to_owned(),
                topic: topic.to_owned(),
                payload,
            })
            .await;
    }

    /// Registers the handler of relayed messages of `topic` (replacing
    /// any before it).
    pub fn on_relay(&self, topic: &str, handler: RelayHandler) {
        self.node
            .relays
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(topic.to_owned(), handler);
    }

    /// Whether node `id` is up (this one, or heard from within
    /// [`NODE_TIMEOUT`]).
    pub fn node_is_up(&self, id: &str) -> bool {
        id == &*self.node.id || self.node.registry.live().iter().any(|n| n.node == id)
    }

    /// Trades the admin secret for an admin token (`POST /admin/token`).
    ///
    /// # Errors
    /// Admin pages are off, or the secret is wrong.
    pub fn admin_token(&self, secret: &str) -> Result<AdminToken, AdminTokenError> {
        let admin = self.node.admin.as_ref().ok_or(AdminTokenError::Disabled)?;
        if admin.is_secret(secret) {
            Ok(admin.issue())
        } else {
            Err(AdminTokenError::WrongSecret)
        }
    }

    /// Whether admin pages are on.
    pub fn admin_enabled(&self) -> bool {
        self.node.admin.is_some()
    }

    /// What an admin page is sent: this node now, the others as of their
    /// last heartbeat.
    pub fn admin_view(&self) -> AdminView {
        let mut others: Vec<AdminNode> = self
            .node
            .registry
            .live_with_age()
            .into_iter()
            .filter(|(n, _)| *n.node != *self.node.id)
            .map(|(info, age)| AdminNode {
                info,
                this_node: false,
                heard_seconds_ago: age.as_secs(),
            })
            .collect();
        others.sort_by(|a, b| a.info.node.cmp(&b.info.node));
        let mut nodes = vec![AdminNode {
            info: self.own_info(),
            this_node: true,
            heard_seconds_ago: 0,
        }];
        nodes.extend(others);
        let engine = &self.node.config.engine;
        AdminView {
            at_ms: unix_ms(),
            node: self.node.id.to_string(),
            engine: engine.describe(),
            nodes,
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sends this node's heartbeat every [`HEARTBEAT`] while the node lives.
pub(super) async fn heartbeats(node: std::sync::Weak<Node>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let info = Hub { node: node.clone() }.own_info();
        node.send_control(&Control::Heartbeat { info }).await;
    }
}

/// Sends the node's view of the cluster to its admin subscribers every
/// [`ADMIN_EVERY`], while it has any; only to this node's (each node
/// serves its own pages).
pub(super) async fn admin_feed(node: std::sync::Weak<Node>) {
    let mut tick = tokio::time::interval(ADMIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let Some(ch) = node
            .channels
            .lock(ADMIN_CHANNEL)
            .get(ADMIN_CHANNEL)
            .cloned()
        else {
            continue;
        };
        let view = Hub { node: node.clone() }.admin_view();
        let data = match serde_json::to_vec(&view) {
            Ok(data) => Payload::from_bytes(data.into()),
            Err(e) => {
                tracing::warn!("admin view: {e}");
                continue;
            }
        };
        let publication = Arc::new(Publication {
            offset: 0,
            data,
            info: None,
        });
        let mut push = EncodedPush::new(Push::Publication {
            channel: ADMIN_CHANNEL,
            publication: &publication,
        });
        node.deliver(&ch, &mut push, None);
    }
}
