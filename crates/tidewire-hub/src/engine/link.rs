//! How the Redis and NATS engines reach their servers: one Redis, a Redis
//! Cluster, or NATS.
//!
//! - [`Commands`]: a connection manager to one server, or a cluster
//!   connection that routes each command (and each script) to the master
//!   of its first key's slot.
//! - [`Target::subscriber`]: the PUB/SUB side. On one server, classic
//!   SUBSCRIBE on a connection of its own; on a cluster, sharded PUB/SUB
//!   (SSUBSCRIBE over RESP3), each topic subscribed at the master of its
//!   slot, the connections to the masters kept and resubscribed after a
//!   failover by the cluster client.
//! - [`Nats`]: the PUB/SUB side over NATS, for the NATS engine and for
//!   the Redis engine with `--broker nats` (Redis keeps the streams and
//!   presence): one NATS subject per
//!   topic, the topic's name in it base64url-encoded (NATS subjects are
//!   dot-separated tokens; channel names are free).
//! - [`Partitions`]: the hash tags a channel's keys and topic carry. A
//!   channel belongs to one of [`PARTITIONS`] partitions, and each
//!   partition's tag is chosen so that the partitions sit at evenly spaced
//!   slots: with a cluster's slots split into equal ranges per master (as
//!   `redis-cli --cluster create` does), partitions spread evenly over the
//!   masters. Tags such as `{0}`…`{31}` would not: their CRC16 slots
//!   crowd together.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;

use redis::aio::{ConnectionLike, ConnectionManager, PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushKind, RedisFuture, RedisResult, Value};

/// How many partitions channels are spread over. Every node of a cluster
/// must agree, so it is not configurable.
pub(super) const PARTITIONS: usize = 32;

/// The number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The hash slot of `key`: CRC16 of its hash tag (the first non-empty
/// `{...}`), or of the whole key.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// The partitions' hash tags; see the module docs.
pub(super) struct Partitions {
    tags: Vec<String>,
}

impl Partitions {
    pub(super) fn new() -> Partitions {
        let width = u32::from(SLOTS) / PARTITIONS as u32;
        let tags = (0..PARTITIONS as u32)
            .map(|partition| {
                // The first `<partition>.<n>` whose slot falls in the
                // partition's range (a few dozen tries each).
                let range = partition * width..(partition + 1) * width;
                (0u32..)
                    .map(|n| format!("{partition}.{n}"))
                    .find(|tag| range.contains(&u32::from(slot(tag.as_bytes()))))
                    .expect("every slot range is hit by some tag")
            })
            .collect();
        Partitions { tags }
    }

    /// The tag of `channel`'s partition.
    pub(super) fn tag_of(&self, channel: &str) -> &str {
        let hash = crc16::State::<crc16::XMODEM>::calculate(channel.as_bytes());
        &self.tags[usize::from(hash) % self.tags.len()]
    }

    pub(super) fn tags(&self) -> &[String] {
        &self.tags
    }
}

/// Where Redis is.
pub(super) enum Target {
    Single(redis::Client),
    Cluster {
        nodes: Vec<String>,
        timeout: Duration,
    },
}

impl Target {
    /// `url`: one `redis://` URL, or several separated by commas (the
    /// seed nodes of a cluster); `cluster` says a single URL is a cluster
    /// node too.
    pub(super) fn parse(url: &str, cluster: bool, timeout: Duration) -> RedisResult<Target> {
        let nodes: Vec<String> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if cluster || nodes.len() > 1 {
            // Checked here, so that a typo is an error at start.
            for node in &nodes {
                redis::Client::open(node.as_str())?;
            }
            return Ok(Target::Cluster { nodes, timeout });
        }
        Ok(Target::Single(redis::Client::open(url)?))
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster { .. })
    }

    /// The command that publishes to a topic: sharded on a cluster, so
    /// that a message goes to its slot's master and replicas only.
    pub(super) fn publish_command(&self) -> &'static str {
        match self {
            Target::Single(_) => "PUBLISH",
            Target::Cluster { .. } => "SPUBLISH",
        }
    }

    fn cluster_builder(nodes: &[String], timeout: Duration) -> ClusterClientBuilder {
        ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
    }

    pub(super) async fn commands(&self) -> RedisResult<Commands> {
        match self {
            Target::Single(client) => Ok(Commands::Single(client.get_connection_manager().await?)),
            Target::Cluster { nodes, timeout } => {
                let client = Target::cluster_builder(nodes, *timeout).build()?;
                Ok(Commands::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A new PUB/SUB connection (on a cluster: one per master, made as
    /// topics are subscribed), subscribed to nothing yet.
    pub(super) async fn subscriber(&self) -> Result<(Sink, Messages), String> {
        self.redis_subscriber().await.map_err(|e| e.to_string())
    }

    async fn redis_subscriber(&self) -> RedisResult<(Sink, Messages)> {
        match self {
            Target::Single(client) => {
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok((Sink::Single(sink), Messages::Single(stream)))
            }
            Target::Cluster { nodes, timeout } => {
                let (pushes, received) = tokio::sync::mpsc::unbounded_channel();
                let client = Target::cluster_builder(nodes, *timeout)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(pushes)
                    .build()?;
                let connection = client.get_async_connection().await?;
                Ok((Sink::Cluster(connection), Messages::Cluster(received)))
            }
        }
    }
}

/// The command side of either kind of Redis.
#[derive(Clone)]
pub(super) enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Commands::Single(c) => c.req_packed_command(cmd),
            Commands::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Commands::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(c) => c.get_db(),
            Commands::Cluster(c) => c.get_db(),
        }
    }
}

/// NATS as the fan-out between nodes.
pub(super) struct Nats {
    url: String,
    timeout: Duration,
}

impl Nats {
    pub(super) fn new(url: &str, timeout: Duration) -> Nats {
        Nats {
            url: url.to_owned(),
            timeout,
        }
    }

    /// The NATS subject of a topic.
    pub(super) fn subject(topic: &str) -> String {
        format!(
            "tidewire.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(topic)
        )
    }

    /// A connection (it reconnects by itself, and subscribes again).
    pub(super) async fn connect(&self) -> Result<async_nats::Client, String> {
        async_nats::ConnectOptions::new()
            .connection_timeout(self.timeout)
            .request_timeout(Some(self.timeout))
            .connect(self.url.as_str())
            .await
            .map_err(|e| format!("NATS at {}: {e}", self.url))
    }

    pub(super) async fn subscriber(&self) -> Result<(Sink, Messages), String> {
        let client = self.connect().await?;
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        let sink = NatsSink {
            client,
            forwards: HashMap::new(),
            sender,
        };
        Ok((Sink::Nats(sink), Messages::Nats(received)))
    }
}

/// The NATS subscriptions of a node: one task per topic hands its
/// messages to the one queue the reader reads (a topic's order kept).
pub(super) struct NatsSink {
    client: async_nats::Client,
    forwards: HashMap<String, tokio::task::JoinHandle<()>>,
    sender: tokio::sync::mpsc::UnboundedSender<Message>,
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        for (_, forward) in self.forwards.drain() {
            forward.abort();
        }
    }
}

/// Where subscriptions are made.
pub(super) enum Sink {
    Single(PubSubSink),
    Cluster(ClusterConnection),
    Nats(NatsSink),
}

impl Sink {
    pub(super) async fn subscribe(&mut self, topics: &[String]) -> Result<(), String> {
        match self {
            Sink::Single(sink) => sink.subscribe(topics).await.map_err(|e| e.to_string()),
            Sink::Cluster(connection) => ssubscribe(connection, topics).await,
            Sink::Nats(sink) => {
                for topic in topics {
                    if sink.forwards.contains_key(topic) {
                        continue;
                    }
                    let mut subscriber = sink
                        .client
                        .subscribe(Nats::subject(topic))
                        .await
                        .map_err(|e| e.to_string())?;
                    let sender = sink.sender.clone();
                    let name: Arc<str> = topic.as_str().into();
                    let forward = tokio::spawn(async move {
                        while let Some(message) =
                            futures_util::StreamExt::next(&mut subscriber).await
                        {
                            let message = Message::Nats {
                                topic: name.clone(),
                                payload: message.payload,
                            };
                            if sender.send(message).is_err() {
                                return;
                            }
                        }
                    });
                    sink.forwards.insert(topic.clone(), forward);
                }
                // Subscribed at the server before this returns (so that
                // what any node publishes after is heard): a message to an
                // inbox of this connection comes back only after the
                // server took the SUBs sent before it.
                let inbox = sink.client.new_inbox();
                let mut echo = sink
                    .client
                    .subscribe(inbox.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                sink.client
                    .publish(inbox, Bytes::new())
                    .await
                    .map_err(|e| e.to_string())?;
                futures_util::StreamExt::next(&mut echo)
                    .await
                    .map(drop)
                    .ok_or_else(|| "the NATS connection closed".to_owned())
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, topics: &[String]) -> Result<(), String> {
        match self {
            Sink::Single(sink) => sink.unsubscribe(topics).await.map_err(|e| e.to_string()),
            Sink::Cluster(connection) => {
                for group in by_slot(topics) {
                    connection
                        .sunsubscribe(group)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Sink::Nats(sink) => {
                for topic in topics {
                    // Dropping its subscriber unsubscribes.
                    if let Some(forward) = sink.forwards.remove(topic) {
                        forward.abort();
                    }
                }
                Ok(())
            }
        }
    }
}

impl Sink {
    /// On a cluster: a handle on the subscriptions' connection that works
    /// without the sink (to subscribe again without holding its lock).
    pub(super) fn cluster(&self) -> Option<ClusterConnection> {
        match self {
            Sink::Cluster(connection) => Some(connection.clone()),
            Sink::Single(_) | Sink::Nats(_) => None,
        }
    }
}

/// Subscribes `topics` over sharded PUB/SUB: one SSUBSCRIBE per slot (a
/// command's channels share one), each sent to the slot's master.
pub(super) async fn ssubscribe(
    connection: &mut ClusterConnection,
    topics: &[String],
) -> Result<(), String> {
    for group in by_slot(topics) {
        connection
            .ssubscribe(group)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn by_slot(topics: &[String]) -> Vec<Vec<&str>> {
    let mut groups: std::collections::BTreeMap<u16, Vec<&str>> = Default::default();
    for topic in topics {
        groups
            .entry(slot(topic.as_bytes()))
            .or_default()
            .push(topic.as_str());
    }
    groups.into_values().collect()
}

/// What arrives over PUB/SUB.
pub(super) enum Messages {
    Single(PubSubStream),
    Cluster(tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>),
    Nats(tokio::sync::mpsc::UnboundedReceiver<Message>),
}

/// One message of a topic.
pub(super) enum Message {
    Single(redis::Msg),
    Cluster { topic: Vec<u8>, payload: Vec<u8> },
    Nats { topic: Arc<str>, payload: Bytes },
}

impl Message {
    pub(super) fn topic(&self) -> &str {
        match self {
            Message::Single(message) => message.get_channel_name(),
            Message::Cluster { topic, .. } => std::str::from_utf8(topic).unwrap_or(""),
            Message::Nats { topic, .. } => topic,
        }
    }

    pub(super) fn payload(&self) -> &[u8] {
        match self {
            Message::Single(message) => message.get_payload_bytes(),
            Message::Cluster { payload, .. } => payload,
            Message::Nats { payload, .. } => payload,
        }
    }
}

impl Messages {
    /// The next message; `None` once the connection is gone (on a
    /// cluster: never, the client reconnects by itself; a stall is found
    /// by the probes).
    pub(super) async fn next(&mut self) -> Option<Message> {
        match self {
            Messages::Single(stream) => futures_util::StreamExt::next(stream)
                .await
                .map(Message::Single),
            Messages::Nats(received) => received.recv().await,
            Messages::Cluster(received) => loop {
                let push = received.recv().await?;
                if !matches!(push.kind, PushKind::SMessage | PushKind::Message) {
                    // Confirmations, and the client's notes of a lost
                    // connection (it resubscribes by itself).
                    continue;
                }
                let mut data = push.data.into_iter();
                if let (Some(Value::BulkString(topic)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                {
                    return Some(Message::Cluster { topic, payload });
                }
            },
        }
    }
}

/// The delay before a PUB/SUB reader connects again: from 100 ms,
/// doubling up to 2 s, back to 100 ms once a connection stands.
pub(super) struct Backoff(std::time::Duration);

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(2);

    pub(super) fn new() -> Backoff {
        Backoff(Backoff::FIRST)
    }

    /// Sleeps, and doubles the next delay.
    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Backoff::MAX);
    }

    /// A connection stands.
    pub(super) fn reset(&mut self) {
        self.0 = Backoff::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_computes() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"{}x"), slot(b"{}x"));
        assert_eq!(slot(b"a{b}c"), slot(b"b"));
    }

    #[test]
    fn partitions_sit_in_evenly_spaced_slot_ranges_unlike_short_numeric_tags() {
        let partitions = Partitions::new();
        let width = SLOTS / PARTITIONS as u16;
        for (partition, tag) in partitions.tags().iter().enumerate() {
            assert_eq!(
                usize::from(slot(tag.as_bytes()) / width),
                partition,
                "tag {tag}"
            );
        }
        // Over three masters with equal slot ranges, as the cluster tests
        // make them: 10 or 11 partitions each. `{0}`...`{31}` would not.
        let master_of = |s: u16| usize::from(s) * 3 / usize::from(SLOTS);
        let count = |slots: Vec<u16>| {
            let mut per_master = [0usize; 3];
            for s in slots {
                per_master[master_of(s)] += 1;
            }
            per_master
        };
        let ours = count(
            partitions
                .tags()
                .iter()
                .map(|t| slot(t.as_bytes()))
                .collect(),
        );
        assert!(ours.iter().all(|&n| (10..=11).contains(&n)), "{ours:?}");
        let naive = count(
            (0..PARTITIONS)
                .map(|n| slot(n.to_string().as_bytes()))
                .collect(),
        );
        assert!(
            naive.iter().max().unwrap() - naive.iter().min().unwrap() > 2,
            "{naive:?}"
        );
    }

    #[test]
    fn a_channel_always_gets_the_same_partition_and_channels_spread_over_all() {
        let partitions = Partitions::new();
        assert_eq!(partitions.tag_of("room"), partitions.tag_of("room"));
        let used: std::collections::HashSet<&str> = (0..1000)
            .map(|n| partitions.tag_of(&format!("room{n}")))
            .collect();
        assert_eq!(used.len(), PARTITIONS);
    }
}
