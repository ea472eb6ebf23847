//! Prometheus metrics of a hub: connections, clients, subscriptions,
//! channels, publications, deliveries, drops, queue depth, errors by code,
//! commands and API calls. [`Metrics::encode`] renders the text format
//! served at `/metrics`.
//!
//! Counters on the fan-out path are added once per publication (the number
//! of subscribers reached), never once per subscriber.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The numeric code.
    pub code: u16,
    /// Its name.
    pub name: &'static str,
}

/// Label of the command and API counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// The command or API method.
    pub method: &'static str,
}

/// The hub's metrics.
pub struct Metrics {
    registry: Registry,
    /// Open client transport connections (connected or not).
    pub connections: Gauge,
    /// Clients that completed `connect`.
    pub clients: Gauge,
    /// Distinct users among connected clients.
    pub users: Gauge,
    /// Subscriptions over all channels.
    pub subscriptions: Gauge,
    /// Channels with at least one subscriber on this node.
    pub channels: Gauge,
    /// Publications routed to this node's subscribers.
    pub publications: Counter,
    /// Frames queued to subscribers (publications, join/leave).
    pub deliveries: Counter,
    /// Frames dropped by the slow-consumer policy `drop`.
    pub dropped: Counter,
    /// Connections closed because their send queue was full.
    pub slow_consumers: Counter,
    /// Messages waiting in send queues (sampled at scrape time).
    pub queue_depth: Gauge,
    /// Error replies by code (client protocol and HTTP API).
    pub errors: Family<CodeLabel, Counter>,
    /// Client commands by name.
    pub commands: Family<MethodLabel, Counter>,
    /// HTTP API calls by method.
    pub api_calls: Family<MethodLabel, Counter>,
    /// Engine entries (history streams), sampled at scrape time.
    pub history_streams: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under the `tidewire_hub` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tidewire_hub");
        let m = Metrics {
            registry: Registry::default(),
            connections: Gauge::default(),
            clients: Gauge::default(),
            users: Gauge::default(),
            subscriptions: Gauge::default(),
            channels: Gauge::default(),
            publications: Counter::default(),
            deliveries: Counter::default(),
            dropped: Counter::default(),
            slow_consumers: Counter::default(),
            queue_depth: Gauge::default(),
            errors: Family::default(),
            commands: Family::default(),
            api_calls: Family::default(),
            history_streams: Gauge::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register("clients", "Connected clients", m.clients.clone());
        r.register("users", "Distinct connected users", m.users.clone());
        r.register(
            "subscriptions",
            "Channel subscriptions",
            m.subscriptions.clone(),
        );
        r.register("channels", "Channels with subscribers", m.channels.clone());
        r.register(
            "publications",
            "Publications routed to subscribers",
            m.publications.clone(),
        );
        r.register(
            "deliveries",
            "Frames queued to subscribers",
            m.deliveries.clone(),
        );
        r.register(
            "dropped",
            "Frames dropped for slow consumers",
            m.dropped.clone(),
        );
        r.register(
            "slow_consumers",
            "Connections closed because their send queue was full",
            m.slow_consumers.clone(),
        );
        r.register(
            "queue_depth",
            "Messages waiting in send queues",
            m.queue_depth.clone(),
        );
        r.register("errors", "Error replies by code", m.errors.clone());
        r.register("commands", "Client commands", m.commands.clone());
        r.register("api_calls", "HTTP API calls", m.api_calls.clone());
        r.register(
            "history_streams",
            "Channel streams kept by the engine",
            m.history_streams.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an error reply.
    pub fn error(&self, code: crate::protocol::ErrorCode) {
        self.errors
            .get_or_create(&CodeLabel {
                code: code.number(),
                name: code.name(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_every_metric() {
        let m = Metrics::new();
        m.deliveries.inc_by(3);
        m.error(crate::protocol::ErrorCode::PermissionDenied);
        let text = m.encode();
        for needle in [
            "tidewire_hub_connections 0",
            "tidewire_hub_deliveries_total 3",
            "tidewire_hub_errors_total{code=\"107\",name=\"permission_denied\"} 1",
            "tidewire_hub_queue_depth",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
