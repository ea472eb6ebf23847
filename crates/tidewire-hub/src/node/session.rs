//! A client's session: the commands of one connection, from `connect`
//! to its end.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::front::{FrameKind, SendOutcome};
use super::registry::Client;
use super::resume::ResumableSink;
use super::{error, history_options, personal_users, unavailable, Hub, Node};
use crate::admin::ADMIN_USER;
use crate::auth::{claim_grants, now_unix, ConnectionClaims};
use crate::config::{ChannelOptions, PublishRule, SubscribeRule, ADMIN_CHANNEL};
use crate::engine::{EngineError, HistoryQuery};
use crate::metrics::MethodLabel;
use crate::protocol::{
    self, BatchItem, ClientInfo, Command, ConnectReply, ConnectRequest, Disconnect, DisconnectCode,
    ErrorCode, ErrorReply, HistoryRequest, Incoming, Payload, Position, Publication,
    PublishRequest, PublishedAt, Reply, Request, SubscribeReply, SubscribeRequest,
};
use crate::proxy::{ConnectCall, PublishCall};
use crate::shards::lock;

/// One connection's session with the hub; see the module docs.
pub struct Session {
    pub(super) node: Arc<Node>,
    pub(super) client: Arc<Client>,
    pub(super) closed: bool,
    /// For a session that can be detached: its sink and resume key (boxed:
    /// every idle WebSocket session's task holds a `Session`, and no
    /// WebSocket session can be detached).
    pub(super) resumable: Option<Box<(Arc<ResumableSink>, String)>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client", &format!("{:016x}", self.client.id))
            .finish()
    }
}

type Outcome = Result<Option<Reply>, ErrorReply>;

impl Session {
    /// The client id.
    pub fn client_id(&self) -> String {
        format!("{:016x}", self.client.id)
    }

    /// Whether `connect` succeeded.
    pub fn is_connected(&self) -> bool {
        self.client.info().is_some()
    }

    /// How long a front waits for `connect` before it calls
    /// [`connect_timeout`](Self::connect_timeout).
    pub fn connect_timeout_after(&self) -> std::time::Duration {
        self.node.config.client.connect_timeout
    }

    /// The connect timeout fired: disconnect.
    pub fn connect_timeout(&self) {
        self.client.disconnect(&Disconnect::new(
            DisconnectCode::ConnectTimeout,
            "no connect command in time",
        ));
    }

    /// Handles one text message: a command, or a batch.
    pub async fn handle_text(&self, message: &str) {
        self.handle(Incoming::Text(message)).await;
    }

    /// Handles one binary message (the JSON codec refuses it, 101).
    pub async fn handle_binary(&self, message: &[u8]) {
        self.handle(Incoming::Binary(message)).await;
    }

    /// Handles one message: a command, or a batch, as the codec reads it.
    /// Commands past `client.max_batch` are not run; each gets error 113
    /// with its id, and those without an id one 113 without id together.
    /// Once an error reply finds the connection closing (its queue
    /// overflowed, say), the rest of the message is dropped unread: a
    /// flood of refusals costs at most one send queue.
    pub async fn handle(&self, message: Incoming<'_>) {
        let max = self.node.config.client.max_batch;
        let batch = match self.client.codec().decode_batch(message, max) {
            Ok(batch) => batch,
            Err(e) => {
                self.reply_error(0, &e);
                return;
            }
        };
        let mut refused_without_id = 0;
        for item in batch {
            // A reply that overflowed the queue closed the connection: the
            // rest of the batch must not run (its effects, a publication
            // say, would happen for a client that never hears of them).
            if self.client.sink.is_closing() {
                return;
            }
            let outcome = match item {
                BatchItem::Command(Ok(command)) => {
                    self.dispatch(command).await;
                    continue;
                }
                BatchItem::Command(Err(e)) => self.reply_error(e.id, &e.error),
                BatchItem::Refused { id: 0, .. } => {
                    refused_without_id += 1;
                    continue;
                }
                BatchItem::Refused { id, number } => {
                    self.reply_error(id, &protocol::batch_limit_error(max, number))
                }
            };
            if outcome == SendOutcome::Closed {
                return;
            }
        }
        if refused_without_id > 0 {
            let e = protocol::batch_limit_error_without_id(max, refused_without_id);
            self.reply_error(0, &e);
        }
    }

    fn reply_error(&self, id: u64, e: &ErrorReply) -> SendOutcome {
        self.node.metrics.error(e.code);
        self.client
            .sink
            .send(self.client.codec().encode_error(id, e), FrameKind::Control)
    }

    async fn dispatch(&self, command: Command) {
        let Command { id, request } = command;
        let name = request.name();
        self.node
            .metrics
            .commands
            .get_or_create(&MethodLabel { method: name })
            .inc();
        let connected = self.is_connected();
        let outcome = match request {
            Request::Connect(r) => self.connect(r).await,
            _ if !connected => Err(error(ErrorCode::NotConnected, "send connect first")),
            Request::Subscribe(r) => self.subscribe(id, r).await,
            Request::Unsubscribe(r) => self.unsubscribe(&r.channel).await,
            Request::Publish(r) => self.publish(r).await,
            Request::Presence(r) => self.presence(&r.channel).await,
            Request::PresenceStats(r) => self.presence_stats(&r.channel).await,
            Request::History(r) => self.history(r).await,
            Request::Refresh(r) => self.refresh(&r.token).await,
            Request::Ping => Ok(Some(Reply::Ping)),
        };
        match outcome {
            Ok(Some(reply)) if id != 0 => self.client.reply(id, &reply),
            Ok(_) => {}
            Err(e) => {
                self.reply_error(id, &e);
            }
        }
    }

    async fn connect(&self, request: ConnectRequest) -> Outcome {
        let node = &self.node;
        if self.is_connected() {
            return Err(error(ErrorCode::AlreadyConnected, "already connected"));
        }
        if node.shutting_down.load(Ordering::Relaxed) {
            return Err(error(ErrorCode::Unavailable, "the server is shutting down"));
        }
        let client_id = self.client_id();
        // Cloned, not taken: a connect that fails may be tried again.
        let opening = lock(&self.client.state).opening.clone();
        let mut request = request;
        if request.token.is_none() {
            // A token in the command wins over the cookie's.
            request.token = opening.as_ref().and_then(|o| o.token.clone());
        }
        // An admin page's token (see `crate::admin`): no application
        // token nor proxy is asked about it.
        let admin_expiry = request
            .token
            .as_deref()
            .and_then(|token| node.admin.as_ref()?.verify(token));
        let mut claims = match (&request.token, admin_expiry) {
            (_, Some(expires_at)) => ConnectionClaims {
                user: ADMIN_USER.into(),
                expires_at: Some(expires_at),
                ..ConnectionClaims::default()
            },
            (Some(token), None) => node.verifier.connection(token).await?,
            (None, None) => Default::default(),
        };
        if let Some(proxy) = node.proxy.as_ref().filter(|_| admin_expiry.is_none()) {
            let call = ConnectCall {
                client: &client_id,
                transport: self.client.sink.transport().name,
                user: &claims.user,
                data: request.data.as_deref(),
                headers: opening
                    .as_ref()
                    .map(|o| &o.headers)
                    .filter(|h| !h.is_empty()),
            };
            if let Some(result) = proxy.connect(&call).await? {
                if let Some(user) = result.user {
                    claims.user = user;
                }
                if let Some(info) = result.info {
                    claims.info = Some(info);
                }
                if let Some(exp) = result.expire_at {
                    claims.expires_at = Some(exp);
                }
                if let Some(channels) = result.channels {
                    claims.channels = channels;
                }
            }
        }
        // With anonymous clients off, every connection has a user: from the
        // token's `sub` or from the connect proxy. A signed token without
        // one (or with `sub: ""`) would otherwise connect as anonymous.
        if claims.user.is_empty() && !node.config.client.anonymous {
            return Err(error(
                ErrorCode::Unauthorized,
                if request.token.is_some() {
                    "the token names no user (its sub claim is missing or empty), and \
                     anonymous clients are not allowed"
                } else {
                    "a connection token is required"
                },
            ));
        }
        let info = Arc::new(ClientInfo {
            client: client_id.clone(),
            user: claims.user.clone(),
            info: claims.info,
        });
        {
            let mut st = lock(&self.client.state);
            if st.closed {
                return Err(error(ErrorCode::Unavailable, "the connection is closing"));
            }
            st.info = Some(info);
            st.granted = claims.channels;
            st.expires_at = claims.expires_at;
            st.admin = admin_expiry.is_some();
            st.opening = None;
        }
        if !claims.user.is_empty() {
            let mut users = node.users.lock(claims.user.as_str());
            let ids = users.entry(claims.user.clone()).or_default();
            if ids.is_empty() {
                node.metrics.users.inc();
            }
            ids.push(self.client.id);
        }
        node.metrics.clients.inc();
        tracing::debug!(client = %client_id, user = %claims.user, "connected");
        Ok(Some(Reply::Connect(ConnectReply {
            client: client_id,
            user: claims.user,
            version: protocol::VERSION,
            ping_interval: node.config.client.ping_interval.as_secs(),
            max_message_size: node.config.client.max_message_size,
            expires_in: claims.expires_at.map(|exp| exp.saturating_sub(now_unix())),
        })))
    }

    async fn can_subscribe(
        &self,
        channel: &str,
        options: &ChannelOptions,
        token: Option<&str>,
        info: &ClientInfo,
    ) -> Result<Option<u64>, ErrorReply> {
        let denied = |m: &str| Err(error(ErrorCode::PermissionDenied, m));
        if channel == ADMIN_CHANNEL {
            return if lock(&self.client.state).admin {
                Ok(None)
            } else {
                denied("the admin channel is for admin pages (their token comes from POST /admin/token)")
            };
        }
        if let Some(mut users) = personal_users(channel) {
            return if !info.user.is_empty() && users.any(|u| u == info.user) {
                Ok(None)
            } else {
                denied("this personal channel belongs to another user")
            };
        }
        if let Some(token) = token {
            let claims = self.node.verifier.subscription(token).await?;
            if claims.user.is_empty() && !self.node.config.client.anonymous {
                return Err(error(
                    ErrorCode::Unauthorized,
                    "the subscription token names no user (its sub claim is missing or \
                     empty), and anonymous clients are not allowed",
                ));
            }
            if claims.channel != channel || claims.user != info.user {
                return denied("the subscription token is for another channel or user");
            }
            // The subscription ends when its token expires.
            return Ok(claims.expires_at);
        }
        match options.subscribe {
            SubscribeRule::Anonymous => Ok(None),
            SubscribeRule::Authenticated if !info.user.is_empty() => Ok(None),
            SubscribeRule::Authenticated => denied("this namespace is for authenticated users"),
            SubscribeRule::Token => {
                if claim_grants(&lock(&self.client.state).granted, channel) {
                    Ok(None)
                } else {
                    denied("this channel needs a token that grants it")
                }
            }
        }
    }

    async fn subscribe(&self, id: u64, request: SubscribeRequest) -> Outcome {
        let node = &self.node;
        let channel = request.channel.as_str();
        let options = node.channel_options(channel)?;
        let info = self.client.info().expect("connected");
        let expires_at = self
            .can_subscribe(channel, options, request.token.as_deref(), &info)
            .await?;
        {
            let mut st = lock(&self.client.state);
            if st.subscriptions.iter().any(|s| s == channel) {
                return Err(error(ErrorCode::AlreadySubscribed, "already subscribed"));
            }
            if st.subscriptions.len() >= node.config.client.max_subscriptions {
                return Err(error(
                    ErrorCode::LimitExceeded,
                    format!(
                        "at most {} subscriptions per client",
                        node.config.client.max_subscriptions
                    ),
                ));
            }
            // Most clients hold one or two subscriptions: grow one at a
            // time (a first push would reserve four).
            st.subscriptions.reserve_exact(1);
            st.subscriptions.push(channel.to_owned());
            if let Some(exp) = expires_at {
                st.expiring.push((channel.to_owned(), exp));
            }
        }
        if options.presence {
            let ttl = node.config.client.presence_ttl;
            if let Err(e) = node
                .presence_store
                .add_presence(channel, info.clone(), ttl)
                .await
            {
                lock(&self.client.state)
                    .subscriptions
                    .retain(|s| s != channel);
                return Err(unavailable(e));
            }
        }
        if options.has_history() {
            self.subscribe_positioned(id, &request, options).await?;
        } else {
            let reply = Reply::Subscribe(SubscribeReply {
                recoverable: false,
                epoch: None,
                offset: None,
                recovered: None,
                publications: Vec::new(),
            });
            // The engine first, as with history: a subscription the
            // engine refused is not confirmed (the client would wait for
            // what other nodes publish, and get none of it). Parked
            // meanwhile, the client gets no publication before the reply.
            node.park(channel, self.client.id, self.client.codec());
            if let Err(e) = node.sync_engine_subscription(channel).await {
                return Err(self.abandon_subscribe(channel, e).await);
            }
            let frame = self.client.codec().encode_reply(id, &reply);
            node.go_live(channel, &self.client, frame, 0);
        }
        // Unsubscribed by the server meanwhile: undo, leave nothing behind.
        if !lock(&self.client.state)
            .subscriptions
            .iter()
            .any(|s| s == channel)
        {
            node.leave_channel(&self.client, channel).await;
            return Ok(None);
        }
        if options.join_leave {
            if let Err(e) = node.broker.publish_join(channel, info).await {
                tracing::warn!("{e}");
            }
        }
        Ok(None)
    }

    /// Undoes a subscribe the engine failed: the client is not subscribed,
    /// the channel keeps nothing of it.
    async fn abandon_subscribe(&self, channel: &str, e: EngineError) -> ErrorReply {
        lock(&self.client.state)
            .subscriptions
            .retain(|s| s != channel);
        self.node.leave_channel(&self.client, channel).await;
        unavailable(e)
    }

    /// Subscribes to a channel with history: park, read the position (and
    /// what was missed), starting the stream if there is none, reply, then
    /// go live.
    async fn subscribe_positioned(
        &self,
        id: u64,
        request: &SubscribeRequest,
        options: &ChannelOptions,
    ) -> Result<(), ErrorReply> {
        let node = &self.node;
        let channel = request.channel.as_str();
        let since = (request.recover && options.has_recovery()).then(|| Position {
            offset: request.offset.unwrap_or(0),
            epoch: request.epoch.clone().unwrap_or_default(),
        });
        node.park(channel, self.client.id, self.client.codec());
        // The engine first, the history after: with a broker between
        // nodes, what is published meanwhile then reaches the parking
        // buffer and follows the reply (merged by offset), where reading
        // first would lose it.
        if let Err(e) = node.sync_engine_subscription(channel).await {
            return Err(self.abandon_subscribe(channel, e).await);
        }
        let query = HistoryQuery {
            since: since.as_ref().map(|p| p.offset),
            limit: if since.is_some() {
                options.history_size
            } else {
                0
            },
            reverse: false,
            // The reply's epoch is the one of the publications that follow
            // (pushes carry none): it must be the stream's, even before the
            // first publication.
            start_stream: true,
            options: history_options(options),
        };
        let result = match node.broker.history(channel, query).await {
            Ok(result) => result,
            Err(e) => return Err(self.abandon_subscribe(channel, e).await),
        };
        let recovered = since.as_ref().map(|p| result.recovers(p));
        let offset = result.position.offset;
        let reply = Reply::Subscribe(SubscribeReply {
            recoverable: options.has_recovery(),
            epoch: Some(result.position.epoch),
            offset: Some(offset),
            recovered: request.recover.then_some(recovered == Some(true)),
            publications: if recovered == Some(true) {
                result.publications
            } else {
                Vec::new()
            },
        });
        let frame = self.client.codec().encode_reply(id, &reply);
        node.go_live(channel, &self.client, frame, offset);
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Outcome {
        let removed = {
            let mut st = lock(&self.client.state);
            let before = st.subscriptions.len();
            st.subscriptions.retain(|s| s != channel);
            st.expiring.retain(|(s, _)| s != channel);
            st.subscriptions.len() != before
        };
        if !removed {
            return Err(error(ErrorCode::NotSubscribed, "not subscribed"));
        }
        self.node.leave_channel(&self.client, channel).await;
        Ok(Some(Reply::Unsubscribe))
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        lock(&self.client.state)
            .subscriptions
            .iter()
            .any(|s| s == channel)
    }

    async fn publish(&self, request: PublishRequest) -> Outcome {
        let node = &self.node;
        let channel = request.channel.as_str();
        let options = node.channel_options(channel)?;
        match options.publish {
            PublishRule::Server => {
                return Err(error(
                    ErrorCode::PermissionDenied,
                    "only the server publishes to this namespace",
                ))
            }
            PublishRule::Subscribers if !self.is_subscribed(channel) => {
                return Err(error(
                    ErrorCode::PermissionDenied,
                    format!(
                        "subscribe to {channel:?} before publishing to it: its namespace has \
                         publish = \"subscribers\" (publish = \"clients\" lets any connected \
                         client publish)"
                    ),
                ))
            }
            _ => {}
        }
        let info = self.client.info().expect("connected");
        let mut data = request.data;
        if let Some(proxy) = &node.proxy {
            let call = PublishCall {
                client: &info.client,
                user: &info.user,
                channel,
                data: &data,
            };
            if let Some(result) = proxy.publish(&call).await? {
                if let Some(replacement) = result.data {
                    data = replacement;
                }
            }
        }
        let publication = Publication {
            offset: 0,
            data: Payload::from_json(data),
            info: Some(info),
        };
        let position = node
            .broker
            .publish(channel, publication, history_options(options))
            .await
            .map_err(unavailable)?;
        match position {
            Some(p) => Ok(Some(Reply::Publish(Some(PublishedAt {
                offset: p.offset,
                epoch: p.epoch,
            })))),
            None => Ok(Some(Reply::Publish(None))),
        }
    }

    fn must_be_subscribed(&self, channel: &str) -> Result<(), ErrorReply> {
        if self.is_subscribed(channel) {
            Ok(())
        } else {
            Err(error(
                ErrorCode::PermissionDenied,
                "subscribe to the channel first",
            ))
        }
    }

    async fn presence(&self, channel: &str) -> Outcome {
        let hub = Hub {
            node: self.node.clone(),
        };
        hub.node.channel_options(channel)?;
        self.must_be_subscribed(channel)?;
        let clients = hub.presence(channel).await?;
        Ok(Some(Reply::Presence(clients)))
    }

    async fn presence_stats(&self, channel: &str) -> Outcome {
        let hub = Hub {
            node: self.node.clone(),
        };
        hub.node.channel_options(channel)?;
        self.must_be_subscribed(channel)?;
        let stats = hub.presence_stats(channel).await?;
        Ok(Some(Reply::PresenceStats {
            clients: stats.clients,
            users: stats.users,
        }))
    }

    async fn history(&self, request: HistoryRequest) -> Outcome {
        self.node.channel_options(&request.channel)?;
        self.must_be_subscribed(&request.channel)?;
        Ok(Some(Reply::History(self.node.history(&request).await?)))
    }

    async fn refresh(&self, token: &str) -> Outcome {
        if lock(&self.client.state).admin {
            let expires_at = self
                .node
                .admin
                .as_ref()
                .and_then(|admin| admin.verify(token))
                .ok_or_else(|| error(ErrorCode::Unauthorized, "not a valid admin token"))?;
            let mut st = lock(&self.client.state);
            st.expires_at = Some(expires_at);
            st.refresh_deadline = None;
            return Ok(Some(Reply::Refresh {
                expires_in: Some(expires_at.saturating_sub(now_unix())),
            }));
        }
        let claims = self.node.verifier.connection(token).await?;
        let mut st = lock(&self.client.state);
        let user = st.info.as_ref().map(|i| i.user.clone()).unwrap_or_default();
        if claims.user != user {
            return Err(error(
                ErrorCode::Unauthorized,
                "the new token is for another user",
            ));
        }
        st.expires_at = claims.expires_at;
        st.refresh_deadline = None;
        Ok(Some(Reply::Refresh {
            expires_in: claims.expires_at.map(|exp| exp.saturating_sub(now_unix())),
        }))
    }

    /// The connection ended: leave every channel, forget the client.
    pub async fn close(mut self) {
        self.closed = true;
        Box::pin(cleanup(self.node.clone(), self.client.clone())).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.closed {
            // The front's task was cancelled: clean up anyway.
            let (node, client) = (self.node.clone(), self.client.clone());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(cleanup(node, client));
            }
        }
    }
}

async fn cleanup(node: Arc<Node>, client: Arc<Client>) {
    let (subscriptions, info) = {
        let mut st = lock(&client.state);
        st.closed = true;
        (std::mem::take(&mut st.subscriptions), st.info.clone())
    };
    for channel in &subscriptions {
        node.leave_channel(&client, channel).await;
    }
    node.clients.lock(&client.id).remove(&client.id);
    node.metrics.connections.dec();
    if let Some(info) = info {
        node.metrics.clients.dec();
        if !info.user.is_empty() {
            let mut users = node.users.lock(info.user.as_str());
            if let Some(ids) = users.get_mut(&info.user) {
                ids.retain(|id| *id != client.id);
                if ids.is_empty() {
                    users.remove(&info.user);
                    node.metrics.users.dec();
                }
            }
        }
    }
}
