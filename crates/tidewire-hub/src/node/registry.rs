//! The clients of this node, and their state as the core sees it.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::front::{ClientSink, FrameKind};
use super::Node;
use crate::protocol::{ClientInfo, Codec, Disconnect, Frame, Push, Reply};
use crate::shards::lock;

/// A client connection as the core sees it.
pub(crate) struct Client {
    pub(super) id: u64,
    pub(super) sink: Arc<dyn ClientSink>,
    pub(super) state: Mutex<ClientState>,
}

#[derive(Default)]
pub(super) struct ClientState {
    /// Set by a successful `connect`.
    pub(super) info: Option<Arc<ClientInfo>>,
    /// Channels granted by the connection token.
    pub(super) granted: Vec<String>,
    pub(super) subscriptions: Vec<String>,
    /// Subscriptions granted by a subscription token with an expiry.
    pub(super) expiring: Vec<(String, u64)>,
    /// Token expiry (seconds since the Unix epoch).
    pub(super) expires_at: Option<u64>,
    /// After expiry: when the client is disconnected unless it refreshed.
    pub(super) refresh_deadline: Option<Instant>,
    /// The session has ended (no more subscriptions).
    pub(super) closed: bool,
    /// Connected with an admin token: may subscribe to the admin channel.
    pub(super) admin: bool,
    /// What `connect` needs of the opening request; dropped once connected.
    pub(super) opening: Option<Box<super::OpeningRequest>>,
}

impl Client {
    /// The codec of the client's transport (asked of the sink rather than
    /// kept here: every connection holds a `Client`).
    pub(super) fn codec(&self) -> &'static dyn Codec {
        self.sink.transport().codec
    }

    pub(super) fn send(&self, frame: Frame) {
        self.sink.send(frame, FrameKind::Control);
    }

    /// Sends a push, encoded for this client.
    pub(super) fn push(&self, push: &Push<'_>) {
        self.send(self.codec().encode_push(push));
    }

    /// Sends the reply to command `id`.
    pub(super) fn reply(&self, id: u64, reply: &Reply) {
        self.send(self.codec().encode_reply(id, reply));
    }

    pub(super) fn disconnect(&self, disconnect: &Disconnect) {
        self.push(&Push::Disconnect(disconnect));
        self.sink.close(disconnect.code, &disconnect.reason);
    }

    pub(super) fn info(&self) -> Option<Arc<ClientInfo>> {
        lock(&self.state).info.clone()
    }
}

impl Node {
    /// A user's connected clients, or the one with id `client` (which
    /// must belong to `user`; "" finds anonymous clients by id).
    pub(super) fn clients_of(&self, user: &str, client: Option<&str>) -> Vec<Arc<Client>> {
        if let Some(client) = client {
            let Ok(id) = u64::from_str_radix(client, 16) else {
                return Vec::new();
            };
            let found = self.clients.lock(&id).get(&id).cloned();
            return found
                .filter(|c| c.info().is_some_and(|info| info.user == user))
                .into_iter()
                .collect();
        }
        if user.is_empty() {
            return Vec::new();
        }
        let ids: Vec<u64> = self.users.lock(user).get(user).cloned().unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| self.clients.lock(&id).get(&id).cloned())
            .collect()
    }
}
