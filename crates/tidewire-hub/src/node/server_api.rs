//! What the server side (the HTTP API) may do on the hub: publish, read
//! presence and history, list channels, disconnect and unsubscribe users.

use std::sync::Arc;

use super::cluster::{by_the_server, Control};
use super::{error, history_options, unavailable, Hub, Node};
use crate::engine::{HistoryQuery, PresenceStats, StreamPosition};
use crate::protocol::{
    ClientInfo, Disconnect, ErrorCode, ErrorReply, HistoryReply, HistoryRequest, Payload,
    Publication,
};

impl Hub {
    /// Publishes from the server (the HTTP API): no permission check
    /// beyond the channel's validity.
    ///
    /// # Errors
    /// 109 / 108 for the channel, 114 when the engine fails.
    pub async fn publish(
        &self,
        channel: &str,
        data: Payload,
    ) -> Result<Option<StreamPosition>, ErrorReply> {
        let options = self.node.channel_options(channel)?;
        if channel == crate::config::ADMIN_CHANNEL {
            return Err(error(
                ErrorCode::PermissionDenied,
                "the admin channel is the server's own: nothing may be published to it",
            ));
        }
        let publication = Publication {
            offset: 0,
            data,
            info: None,
        };
        self.node
            .broker
            .publish(channel, publication, history_options(options))
            .await
            .map_err(unavailable)
    }

    /// Who is present in a channel.
    ///
    /// # Errors
    /// 108 / 109 for the channel, 112 when presence is off, 114.
    pub async fn presence(&self, channel: &str) -> Result<Vec<Arc<ClientInfo>>, ErrorReply> {
        self.node.presence_is_on(channel)?;
        self.node
            .presence_store
            .presence(channel)
            .await
            .map_err(unavailable)
    }

    /// Presence counts of a channel.
    ///
    /// # Errors
    /// As [`presence`](Self::presence).
    pub async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, ErrorReply> {
        self.node.presence_is_on(channel)?;
        self.node
            .presence_store
            .presence_stats(channel)
            .await
            .map_err(unavailable)
    }

    /// History of a channel.
    ///
    /// # Errors
    /// 108 / 109, 112 when history is off, 115 for a position of another
    /// epoch, 114.
    pub async fn history(&self, request: &HistoryRequest) -> Result<HistoryReply, ErrorReply> {
        self.node.history(request).await
    }

    /// Channels with subscribers on this node, with their subscriber
    /// counts, sorted by name; `prefix` filters.
    pub async fn channels(&self, prefix: &str) -> Vec<(String, usize)> {
        let mut total: std::collections::BTreeMap<String, usize> =
            self.node.local_channels(prefix).into_iter().collect();
        for (channel, n) in self.node.survey_channels(prefix).await {
            *total.entry(channel).or_default() += n;
        }
        total.into_iter().collect()
    }

    /// Disconnects a user's clients (or one of them). Returns how many.
    pub async fn disconnect_user(
        &self,
        user: &str,
        client: Option<&str>,
        disconnect: &Disconnect,
    ) -> usize {
        let clients = self.node.clients_of(user, client);
        for c in &clients {
            c.disconnect(disconnect);
        }
        self.node
            .send_control(&Control::Disconnect {
                from: self.node.id.to_string(),
                user: user.to_owned(),
                client: client.map(str::to_owned),
                code: disconnect.code,
                reason: disconnect.reason.clone(),
                reconnect: disconnect.reconnect,
            })
            .await;
        tracing::info!(
            user,
            client,
            code = disconnect.code,
            count = clients.len(),
            "disconnected by the API"
        );
        clients.len()
    }

    /// Unsubscribes a user's clients (or one of them) from a channel, with
    /// an `unsubscribe` push. Returns how many were subscribed.
    pub async fn unsubscribe_user(&self, user: &str, channel: &str, client: Option<&str>) -> usize {
        let why = by_the_server();
        let mut count = 0;
        for c in self.node.clients_of(user, client) {
            if self.node.server_unsubscribe(&c, channel, &why).await {
                count += 1;
            }
        }
        self.node
            .send_control(&Control::Unsubscribe {
                from: self.node.id.to_string(),
                user: user.to_owned(),
                channel: channel.to_owned(),
                client: client.map(str::to_owned),
            })
            .await;
        count
    }
}

impl Node {
    /// A valid channel whose namespace keeps presence, or the error
    /// (108 / 109 for the channel, 112 when presence is off).
    fn presence_is_on(&self, channel: &str) -> Result<(), ErrorReply> {
        if self.channel_options(channel)?.presence {
            Ok(())
        } else {
            Err(error(
                ErrorCode::NotAvailable,
                "presence is off for this namespace",
            ))
        }
    }

    pub(super) async fn history(
        &self,
        request: &HistoryRequest,
    ) -> Result<HistoryReply, ErrorReply> {
        let options = self.channel_options(&request.channel)?;
        if !options.has_history() {
            return Err(error(
                ErrorCode::NotAvailable,
                "history is off for this namespace",
            ));
        }
        let max = self.config.client.max_history_limit;
        // Without `since`, `limit` counts from the newest end ("the last 50
        // messages"), in the order asked for: read newest first, and turn
        // the page around for oldest first.
        let latest_oldest_first = request.since.is_none() && !request.reverse;
        let mut result = self
            .broker
            .history(
                &request.channel,
                HistoryQuery {
                    since: request.since.as_ref().map(|p| p.offset),
                    limit: request.limit.unwrap_or(max).min(max),
                    reverse: request.reverse || latest_oldest_first,
                    // Reads leave nothing behind: a client's subscribe
                    // started the stream already; an API read of a channel
                    // without one gets {0, ""}.
                    start_stream: false,
                    options: history_options(options),
                },
            )
            .await
            .map_err(unavailable)?;
        if latest_oldest_first {
            result.publications.reverse();
        }
        if let Some(since) = &request.since {
            if *since.epoch != *result.position.epoch {
                return Err(error(
                    ErrorCode::StalePosition,
                    "the position is from another epoch of the stream",
                ));
            }
        }
        Ok(HistoryReply {
            publications: result.publications,
            offset: result.position.offset,
            epoch: result.position.epoch,
        })
    }
}
