//! The node among its peers: its id, the control messages nodes send each
//! other through the broker, and the registry of the nodes it heard from.
//!
//! Every node sends a heartbeat (its id, uptime and counts) every
//! [`HEARTBEAT`]; a node not heard from for three heartbeats is dropped
//! from the registry, so `/api/info` lists the nodes that are up. The HTTP
//! API's `disconnect` and `unsubscribe` act on this node's clients and ask
//! every other node to act on theirs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Hub, HubCounts, Node};
use crate::protocol::{Disconnect, Unsubscribed};
use crate::shards::lock;

/// How often a node tells the others it is up.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// What nodes tell each other, as JSON through the broker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Control {
    /// A node is up, with what it holds.
    Heartbeat {
        node: String,
        uptime_seconds: u64,
        counts: HubCounts,
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
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    /// Its id.
    pub node: String,
    /// Seconds since it started.
    pub uptime_seconds: u64,
    /// What it holds.
    pub counts: HubCounts,
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

    /// The nodes heard from within three heartbeats (others are dropped).
    fn live(&self) -> Vec<NodeInfo> {
        let now = Instant::now();
        let mut nodes = lock(&self.nodes);
        nodes.retain(|_, (_, seen)| now.duration_since(*seen) < 3 * HEARTBEAT);
        nodes.values().map(|(info, _)| info.clone()).collect()
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
            Control::Heartbeat {
                node,
                uptime_seconds,
                counts,
            } => self.registry.heard(NodeInfo {
                node,
                uptime_seconds,
                counts,
            }),
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
        }
    }
}

/// Sends this node's heartbeat every [`HEARTBEAT`] while the node lives.
pub(super) async fn heartbeats(node: std::sync::Weak<Node>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let info = Hub { node: node.clone() }.own_info();
        node.send_control(&Control::Heartbeat {
            node: info.node,
            uptime_seconds: info.uptime_seconds,
            counts: info.counts,
        })
        .await;
    }
}
