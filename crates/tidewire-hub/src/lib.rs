//! # tidewire-hub
//!
//! The real-time hub behind `tidewire serve`: clients connect over
//! WebSocket with a JSON protocol (`docs/protocol.md`), subscribe to
//! channels, publish, see presence and history, and recover what they
//! missed after a reconnect; the application publishes through the HTTP
//! API (`docs/api.md`).
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | defaults, TOML, environment; namespace options |
//! | [`protocol`] | the codec-neutral protocol (commands, replies, pushes, payloads as bytes, the [`protocol::Codec`] trait, the table of codes); [`protocol::json`] JSON v1, the first codec |
//! | `fields` | strict field-by-field reading of commands and API bodies, with errors for people |
//! | [`engine`] | offsets, epochs, history, recovery, presence; [`engine::MemoryEngine`] |
//! | [`node`] | the hub core: the node and its handle [`Hub`], sessions and their commands, channels and fan-out, presence diffs, maintenance, the front contract ([`node::ClientSink`]), the server-side API |
//! | [`admin`] | admin tokens and the view of the cluster admin pages are sent |
//! | [`auth`] | JWT connection and subscription tokens (HS256, RS256, ES256, JWKS) |
//! | [`proxy`] | HTTP callbacks to the application on connect and publish |
//! | [`fronts`] | the fronts, one per transport: [`fronts::websocket`] (a session per WebSocket connection) |
//! | [`metrics`] | Prometheus metrics |
//! | [`http`] | the axum router, its handlers (`/health`, `/metrics`, the WebSocket upgrade), [`http::api`] the HTTP API, the embedded static files, and the accept loop (limits, TLS, shutdown) |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod engine;
mod fields;
pub mod fronts;
mod http_client;
pub mod metrics;
pub mod node;

pub mod http;
pub mod protocol;
pub mod proxy;
mod shards;

pub use config::Config;
pub use engine::{Broker, Engine, MemoryEngine, PresenceStore, RedisEngine};
pub use node::{Hub, HubCounts, HubError, ResumeError, Unhealthy};
