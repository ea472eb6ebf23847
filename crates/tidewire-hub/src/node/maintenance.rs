//! The node's periodic work: token expiry, application pings, engine
//! expiry.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::front::FrameKind;
use super::Node;
use crate::auth::now_unix;
use crate::protocol::{ClientInfo, Disconnect, DisconnectCode, EncodedPush, Push, Unsubscribed};
use crate::shards::lock;

/// Token expiry, application pings and engine expiry, about once a second.
pub(super) async fn maintenance(node: Weak<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ping = Instant::now();
    let mut last_presence_refresh = Instant::now();
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        node.broker.maintain();
        node.presence_store.expire_presence();
        node.reap_detached();
        let now = Instant::now();
        let presence_ttl = node.config.client.presence_ttl;
        if now.duration_since(last_presence_refresh) >= presence_ttl / 3 {
            last_presence_refresh = now;
            tokio::spawn(refresh_presence(node.clone()));
        }
        let interval = node.config.client.ping_interval;
        let ping = !interval.is_zero() && now.duration_since(last_ping) >= interval;
        if ping {
            last_ping = now;
        }
        let grace = node.config.client.refresh_grace;
        let unix = now_unix();
        let mut ping_push = EncodedPush::new(Push::Ping);
        for shard in node.clients.each() {
            for client in shard.values() {
                let mut st = lock(&client.state);
                if st.info.is_none() || st.closed {
                    continue;
                }
                if ping {
                    let frame = ping_push.frame(client.codec()).clone();
                    client.sink.send(frame, FrameKind::Publication);
                }
                if st.expiring.iter().any(|(_, exp)| unix >= *exp) {
                    let expired: Vec<String> = st
                        .expiring
                        .iter()
                        .filter(|(_, exp)| unix >= *exp)
                        .map(|(channel, _)| channel.clone())
                        .collect();
                    st.expiring.retain(|(_, exp)| unix < *exp);
                    let (node, client) = (node.clone(), client.clone());
                    tokio::spawn(async move {
                        let why = Unsubscribed {
                            code: 2001,
                            reason: "subscription token expired".into(),
                        };
                        for channel in expired {
                            node.server_unsubscribe(&client, &channel, &why).await;
                        }
                    });
                }
                if st.expires_at.is_some_and(|exp| unix >= exp) {
                    match st.refresh_deadline {
                        None => {
                            st.refresh_deadline = Some(now + grace);
                            client.push(&Push::Refresh {
                                grace_secs: grace.as_secs(),
                            });
                        }
                        Some(deadline) if now >= deadline => {
                            st.expires_at = None;
                            drop(st);
                            tracing::debug!(client = %format!("{:016x}", client.id), "token expired");
                            client.disconnect(&Disconnect::new(
                                DisconnectCode::TokenExpired,
                                "connection token expired",
                            ));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
}

/// Adds again the presence entries of this node's clients, before their
/// TTL runs out (see `client.presence_ttl`).
async fn refresh_presence(node: Arc<Node>) {
    let ttl = node.config.client.presence_ttl;
    let mut entries: Vec<(String, Arc<ClientInfo>)> = Vec::new();
    for shard in node.clients.each() {
        for client in shard.values() {
            let st = lock(&client.state);
            let (Some(info), false) = (&st.info, st.closed) else {
                continue;
            };
            for channel in &st.subscriptions {
                if node
                    .config
                    .channel_options(channel)
                    .is_ok_and(|options| options.presence)
                {
                    entries.push((channel.clone(), info.clone()));
                }
            }
        }
    }
    for (channel, info) in entries {
        if let Err(e) = node.presence_store.add_presence(&channel, info, ttl).await {
            tracing::warn!("refreshing presence: {e}");
        }
    }
}

/// How often [`watch_health`] asks the engine.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Asks the engine whether it works, every [`HEALTH_EVERY`]; once it has
/// not for `server.unhealthy_grace`, tells the clients to reconnect
/// elsewhere (3005), and again after each further grace while it lasts.
pub(super) async fn watch_health(node: Weak<Node>) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            continue;
        }
        let health = match node.broker.health().await {
            Ok(()) => node.presence_store.presence_health().await,
            Err(e) => Err(e),
        };
        *lock(&node.unhealthy) = health.as_ref().err().map(ToString::to_string);
        if health.is_ok() {
            if failing_since.take().is_some() {
                tracing::info!("the engine works again");
            }
            continue;
        }
        let grace = node.config.server.unhealthy_grace;
        if grace.is_zero() {
            continue;
        }
        let since = *failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= grace {
            tracing::warn!(?grace, "the engine has been unreachable for the grace period; telling the clients to reconnect elsewhere");
            let disconnect = Disconnect::new(
                DisconnectCode::Unhealthy,
                "this node cannot reach its engine",
            );
            node.tell_all_to_leave(disconnect, 3005, tokio::runtime::Handle::current());
            failing_since = Some(Instant::now());
        }
    }
}
