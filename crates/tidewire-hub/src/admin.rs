//! The operator's view: admin tokens and what admin pages are sent.
//!
//! An operator opens `/admin` and types the admin secret (`admin.secret`,
//! or the API key when it is unset); `POST /admin/token` trades it for a
//! short-lived admin token (HS256, signed with a key derived from the
//! secret, so that an application token can never pass for one). With
//! it, the page connects over the hub's own WebSocket like any client and
//! subscribes to the reserved channel [`ADMIN_CHANNEL`], which only admin
//! connections may join and only the server publishes to.
//!
//! Every node sends its view of the cluster to its own admin subscribers
//! every [`ADMIN_EVERY`]: itself as it is now, the others as of their last
//! heartbeat (sent every second through the broker), with cumulative
//! publication and delivery counters from which the page draws rates.
//! Nothing of it goes through the engine's streams: an admin page is
//! live only.

use std::time::Duration;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::auth::now_unix;
pub use crate::config::ADMIN_CHANNEL;

/// How often a node sends its view to its admin subscribers.
pub const ADMIN_EVERY: Duration = Duration::from_secs(1);

/// The user id of admin connections.
pub const ADMIN_USER: &str = "$admin";

/// The `aud` of admin tokens.
const AUDIENCE: &str = "tidewire-admin";

/// Issues and verifies admin tokens for one admin secret.
pub struct AdminAuth {
    secret: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminAuth")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct AdminClaims {
    sub: String,
    aud: String,
    exp: u64,
    admin: bool,
}

/// An admin token and when it expires (seconds since the Unix epoch).
#[derive(Debug, Clone)]
pub struct AdminToken {
    /// The JWT.
    pub token: String,
    /// Its `exp`.
    pub expires_at: u64,
}

impl AdminAuth {
    /// For `secret` (`None` when it is empty: no admin access at all),
    /// with tokens good for `ttl`.
    pub fn new(secret: &str, ttl: Duration) -> Option<AdminAuth> {
        if secret.is_empty() {
            return None;
        }
        // The signing key is not the secret itself: an application that
        // signs its connection tokens with the same text (token.hmac_secret
        // = the API key, say) still cannot make admin tokens.
        let key = format!("tidewire admin token key\0{secret}");
        Some(AdminAuth {
            secret: secret.to_owned(),
            encoding: EncodingKey::from_secret(key.as_bytes()),
            decoding: DecodingKey::from_secret(key.as_bytes()),
            ttl: ttl.max(Duration::from_secs(1)),
        })
    }

    /// Whether `given` is the admin secret (in constant time for a given
    /// length).
    pub fn is_secret(&self, given: &str) -> bool {
        given.len() == self.secret.len()
            && given
                .bytes()
                .zip(self.secret.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// A new admin token.
    pub fn issue(&self) -> AdminToken {
        let expires_at = now_unix() + self.ttl.as_secs();
        let claims = AdminClaims {
            sub: ADMIN_USER.to_owned(),
            aud: AUDIENCE.to_owned(),
            exp: expires_at,
            admin: true,
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            // HS256 over a struct of strings and numbers cannot fail.
            .unwrap_or_default();
        AdminToken { token, expires_at }
    }

    /// The expiry of `token` if it is a valid admin token of this secret.
    pub fn verify(&self, token: &str) -> Option<u64> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "aud"]);
        let data = decode::<AdminClaims>(token, &self.decoding, &validation).ok()?;
        data.claims.admin.then_some(data.claims.exp)
    }
}

/// Why `POST /admin/token` gave no token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdminTokenError {
    /// Admin pages are off (`admin.enabled = false`, or no secret nor API
    /// key is set).
    #[error("the admin page is off on this node")]
    Disabled,
    /// The secret is not the admin secret.
    #[error("wrong admin secret (admin.secret, or the API key when it is unset)")]
    WrongSecret,
}

/// One node as an admin page sees it.
#[derive(Debug, Clone, Serialize)]
pub struct AdminNode {
    /// What the registry knows of it.
    #[serde(flatten)]
    pub info: crate::node::NodeInfo,
    /// Whether it is the node that sent this view.
    pub this_node: bool,
    /// Seconds since its last heartbeat arrived (0 for this node).
    pub heard_seconds_ago: u64,
}

/// What a node sends to its admin subscribers every [`ADMIN_EVERY`].
#[derive(Debug, Clone, Serialize)]
pub struct AdminView {
    /// Unix time in milliseconds when it was made.
    pub at_ms: u64,
    /// The node that sent it.
    pub node: String,
    /// The engine's kind (`memory`, `redis`, `nats`) and the broker's.
    pub engine: String,
    /// The nodes that are up, this one first.
    pub nodes: Vec<AdminNode>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_of_the_secret_verifies_and_others_do_not() {
        let auth = AdminAuth::new("s3cret", Duration::from_secs(60)).unwrap();
        let token = auth.issue();
        assert!(token.expires_at >= now_unix() + 59);
        assert_eq!(auth.verify(&token.token), Some(token.expires_at));
        let other = AdminAuth::new("other", Duration::from_secs(60)).unwrap();
        assert_eq!(other.verify(&token.token), None);
        assert_eq!(auth.verify("not a token"), None);
        assert!(auth.is_secret("s3cret"));
        assert!(!auth.is_secret("s3creT"));
        assert!(!auth.is_secret("s3cre"));
        assert!(AdminAuth::new("", Duration::from_secs(60)).is_none());
    }

    #[test]
    fn an_application_token_signed_with_the_secret_is_not_an_admin_token() {
        let auth = AdminAuth::new("shared", Duration::from_secs(60)).unwrap();
        // Signed with the secret itself, claims and all.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &AdminClaims {
                sub: "$admin".into(),
                aud: AUDIENCE.into(),
                exp: now_unix() + 60,
                admin: true,
            },
            &EncodingKey::from_secret(b"shared"),
        )
        .unwrap();
        assert_eq!(auth.verify(&forged), None);
    }

    #[test]
    fn an_expired_admin_token_is_refused() {
        let auth = AdminAuth::new("s", Duration::from_secs(60)).unwrap();
        let expired = encode(
            &Header::new(Algorithm::HS256),
            &AdminClaims {
                sub: "$admin".into(),
                aud: AUDIENCE.into(),
                exp: now_unix() - 1,
                admin: true,
            },
            &auth.encoding,
        )
        .unwrap();
        assert_eq!(auth.verify(&expired), None);
    }
}
