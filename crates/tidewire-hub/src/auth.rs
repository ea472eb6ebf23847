//! JWT verification: connection tokens and subscription tokens.
//!
//! Algorithms: HS256 (shared secret), RS256 and ES256 (public keys in PEM,
//! or from a JWKS URL by `kid`). Claims:
//!
//! | claim | connection token | subscription token |
//! |---|---|---|
//! | `sub` | the user id | the user id it was issued to |
//! | `exp` | enforced (no leeway); optional | enforced; optional |
//! | `channels` | channels (or `ns:*` patterns) the client may subscribe to in `token` namespaces | – |
//! | `channel` | must be absent | the channel it grants |
//! | `info` | any JSON, shown in presence, join/leave and publications | – |
//! | `aud`, `iss` | checked when configured | checked when configured |
//!
//! A subscription token cannot be used to connect, nor a connection token
//! to subscribe: the `channel` claim tells them apart.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{
    decode, decode_header, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::TokenSettings;
use crate::protocol::{ErrorCode, ErrorReply};
use crate::shards::lock;

/// What a connection token grants.
#[derive(Debug, Default)]
pub struct ConnectionClaims {
    /// The user id (`sub`).
    pub user: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// Channels and `ns:*` patterns for `token` namespaces.
    pub channels: Vec<String>,
    /// Connection info.
    pub info: Option<Box<RawValue>>,
}

/// What a subscription token grants.
#[derive(Debug)]
pub struct SubscriptionClaims {
    /// The user it was issued to.
    pub user: String,
    /// The channel.
    pub channel: String,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn unauthorized(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::Unauthorized, message)
}

/// Keys fetched from a JWKS URL, by `kid`.
struct Jwks {
    url: String,
    keys: Mutex<(HashMap<String, DecodingKey>, Option<tokio::time::Instant>)>,
    refresh: tokio::sync::Mutex<()>,
}

/// How often an unknown `kid` may trigger a new fetch.
const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);

/// Verifies tokens with the configured keys.
pub struct Verifier {
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ecdsa: Option<DecodingKey>,
    jwks: Option<Jwks>,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hmac", &self.hmac.is_some())
            .field("rsa", &self.rsa.is_some())
            .field("ecdsa", &self.ecdsa.is_some())
            .field("jwks", &self.jwks.as_ref().map(|j| &j.url))
            .finish()
    }
}

impl Verifier {
    /// Builds the verifier from settings.
    ///
    /// # Errors
    /// A key that is not valid PEM.
    pub fn new(settings: &TokenSettings) -> Result<Verifier, String> {
        let rsa = settings
            .rsa_public_key
            .as_deref()
            .map(|pem| DecodingKey::from_rsa_pem(pem.as_bytes()))
            .transpose()
            .map_err(|e| format!("token.rsa_public_key: {e}"))?;
        let ecdsa = settings
            .ecdsa_public_key
            .as_deref()
            .map(|pem| DecodingKey::from_ec_pem(pem.as_bytes()))
            .transpose()
            .map_err(|e| format!("token.ecdsa_public_key: {e}"))?;
        Ok(Verifier {
            hmac: settings
                .hmac_secret
                .as_deref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            rsa,
            ecdsa,
            jwks: settings.jwks_url.as_ref().map(|url| Jwks {
                url: url.clone(),
                keys: Mutex::new((HashMap::new(), None)),
                refresh: tokio::sync::Mutex::new(()),
            }),
            audience: settings.audience.clone(),
            issuer: settings.issuer.clone(),
        })
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        self.hmac.is_some() || self.rsa.is_some() || self.ecdsa.is_some() || self.jwks.is_some()
    }

    /// Verifies a connection token.
    ///
    /// # Errors
    /// 105 (invalid, wrong kind, no key configured) or 106 (expired).
    pub async fn connection(&self, token: &str) -> Result<ConnectionClaims, ErrorReply> {
        let claims = self.verify(token).await?;
        if claims.channel.is_some() {
            return Err(unauthorized(
                "a subscription token cannot be used to connect",
            ));
        }
        Ok(ConnectionClaims {
            user: claims.sub,
            expires_at: claims.exp,
            channels: claims.channels,
            info: claims.info,
        })
    }

    /// Verifies a subscription token.
    ///
    /// # Errors
    /// 105 (invalid, no `channel` claim) or 106 (expired).
    pub async fn subscription(&self, token: &str) -> Result<SubscriptionClaims, ErrorReply> {
        let claims = self.verify(token).await?;
        let Some(channel) = claims.channel else {
            return Err(unauthorized("not a subscription token (no channel claim)"));
        };
        Ok(SubscriptionClaims {
            user: claims.sub,
            channel,
            expires_at: claims.exp,
        })
    }

    async fn verify(&self, token: &str) -> Result<Claims, ErrorReply> {
        if !self.enabled() {
            return Err(unauthorized(
                "tokens are not accepted: no token key is configured",
            ));
        }
        let header =
            decode_header(token).map_err(|e| unauthorized(format!("malformed token: {e}")))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hmac.clone(),
            Algorithm::RS256 | Algorithm::ES256 => match (&header.kid, &self.jwks) {
                (Some(kid), Some(jwks)) => jwks.key(kid).await?,
                _ if header.alg == Algorithm::RS256 => self.rsa.clone(),
                _ => self.ecdsa.clone(),
            },
            other => {
                return Err(unauthorized(format!(
                    "algorithm {other:?} is not accepted (HS256, RS256, ES256)"
                )))
            }
        };
        let Some(key) = key else {
            return Err(unauthorized(format!(
                "no key configured for {:?} tokens",
                header.alg
            )));
        };
        let mut validation = Validation::new(header.alg);
        // Expiry is exact: an expired token is refused at once.
        validation.leeway = 0;
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = true;
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        decode::<Claims>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    ErrorReply::new(ErrorCode::TokenExpired, "token expired")
                }
                _ => unauthorized(format!("invalid token: {e}")),
            })
    }
}

impl Jwks {
    async fn key(&self, kid: &str) -> Result<Option<DecodingKey>, ErrorReply> {
        if let Some(key) = lock(&self.keys).0.get(kid) {
            return Ok(Some(key.clone()));
        }
        let _one_fetch_at_a_time = self.refresh.lock().await;
        {
            let keys = lock(&self.keys);
            if let Some(key) = keys.0.get(kid) {
                return Ok(Some(key.clone()));
            }
            if keys.1.is_some_and(|at| at.elapsed() < JWKS_MIN_REFETCH) {
                return Ok(None);
            }
        }
        let fetched = self.fetch().await;
        let mut keys = lock(&self.keys);
        keys.1 = Some(tokio::time::Instant::now());
        match fetched {
            Ok(new) => keys.0 = new,
            Err(e) => {
                tracing::warn!(url = %self.url, "JWKS fetch failed: {e}");
                return Err(ErrorReply::new(
                    ErrorCode::Unavailable,
                    "token keys are unavailable; retry later",
                ));
            }
        }
        Ok(keys.0.get(kid).cloned())
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, String> {
        let (status, body) =
            crate::http_client::request(http::Method::GET, &self.url, None, Duration::from_secs(5))
                .await?;
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                DecodingKey::from_jwk(jwk).ok().map(|key| (kid, key))
            })
            .collect())
    }
}

/// The claims `tidewire token` and tests put in a token.
#[derive(Debug, Default, Serialize)]
pub struct TokenClaims {
    /// The user id.
    pub sub: String,
    /// Expiry (seconds since the Unix epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Channels for `token` namespaces.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// The channel of a subscription token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Connection info.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
}

/// Signs an HS256 token (development tokens, tests).
///
/// # Errors
/// Serialization failure (not expected).
pub fn sign_hs256(secret: &str, claims: &TokenClaims) -> Result<String, String> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// Whether `channel` is granted by a `channels` claim (exact names, or
/// `ns:*` for every channel of a namespace).
pub fn claim_grants(channels: &[String], channel: &str) -> bool {
    channels.iter().any(|granted| {
        granted == channel
            || granted
                .strip_suffix('*')
                .is_some_and(|prefix| prefix.ends_with(':') && channel.starts_with(prefix))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(secret: &str) -> Verifier {
        Verifier::new(&TokenSettings {
            hmac_secret: Some(secret.into()),
            ..TokenSettings::default()
        })
        .unwrap()
    }

    fn claims(sub: &str, exp: Option<u64>) -> TokenClaims {
        TokenClaims {
            sub: sub.into(),
            exp,
            ..TokenClaims::default()
        }
    }

    #[tokio::test]
    async fn hs256_connection_tokens() {
        let v = hs("s3cret");
        let mut c = claims("42", Some(now_unix() + 60));
        c.channels = vec!["private:*".into()];
        c.info = Some(serde_json::json!({"name": "Ann"}));
        let got = v
            .connection(&sign_hs256("s3cret", &c).unwrap())
            .await
            .unwrap();
        assert_eq!(got.user, "42");
        assert_eq!(got.channels, ["private:*"]);
        assert_eq!(got.info.unwrap().get(), r#"{"name":"Ann"}"#);
        // No exp: valid, never expires.
        let got = v
            .connection(&sign_hs256("s3cret", &claims("7", None)).unwrap())
            .await
            .unwrap();
        assert_eq!(got.expires_at, None);
    }

    #[tokio::test]
    async fn bad_tokens_get_their_codes() {
        let v = hs("s3cret");
        let expired = sign_hs256("s3cret", &claims("42", Some(now_unix() - 1))).unwrap();
        assert_eq!(
            v.connection(&expired).await.unwrap_err().code,
            ErrorCode::TokenExpired
        );
        let forged = sign_hs256("other", &claims("42", None)).unwrap();
        assert_eq!(
            v.connection(&forged).await.unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(
            v.connection("garbage").await.unwrap_err().code,
            ErrorCode::Unauthorized
        );
        let none = Verifier::new(&TokenSettings::default()).unwrap();
        assert_eq!(
            none.connection(&forged).await.unwrap_err().code,
            ErrorCode::Unauthorized
        );
    }

    #[tokio::test]
    async fn connection_and_subscription_tokens_are_not_interchangeable() {
        let v = hs("k");
        let mut sub = claims("42", None);
        sub.channel = Some("private:x".into());
        let sub = sign_hs256("k", &sub).unwrap();
        let conn = sign_hs256("k", &claims("42", None)).unwrap();
        assert_eq!(v.subscription(&sub).await.unwrap().channel, "private:x");
        assert!(v.connection(&sub).await.is_err());
        assert!(v.subscription(&conn).await.is_err());
    }

    #[tokio::test]
    async fn es256_with_a_pem_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let v = Verifier::new(&TokenSettings {
            ecdsa_public_key: Some(key.public_key_pem()),
            ..TokenSettings::default()
        })
        .unwrap();
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &claims("ec-user", Some(now_unix() + 60)),
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.connection(&token).await.unwrap().user, "ec-user");
        // An HS256 token is refused: no secret configured.
        let hs = sign_hs256("x", &claims("a", None)).unwrap();
        assert_eq!(
            v.connection(&hs).await.unwrap_err().code,
            ErrorCode::Unauthorized
        );
    }

    #[test]
    fn channel_claims_match_names_and_namespace_patterns() {
        let granted = vec![
            "news:eu".to_string(),
            "private:*".to_string(),
            "odd*".to_string(),
        ];
        assert!(claim_grants(&granted, "news:eu"));
        assert!(!claim_grants(&granted, "news:us"));
        assert!(claim_grants(&granted, "private:room"));
        assert!(!claim_grants(&granted, "privateroom"));
        assert!(!claim_grants(&granted, "oddity"));
    }
}
