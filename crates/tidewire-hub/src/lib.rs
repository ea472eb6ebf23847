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
//! | [`protocol`] | the JSON wire types and the table of codes |
//! | [`engine`] | offsets, epochs, history, recovery, presence; [`engine::MemoryEngine`] |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod engine;
pub mod protocol;
mod shards;
