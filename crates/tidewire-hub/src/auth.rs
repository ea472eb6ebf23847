//! JWT verification: connection tokens and subscription tokens.
//!
//! Algorithms: HS256 (shared secret), RS256 and ES256 (public keys as PEM
//! text or PEM files, read at start, or from a JWKS URL by `kid`). Claims:
//!
//! | claim | connection token | subscription token |
//! |---|---|---|
//! | `sub` | the user id (the hub refuses none or `""` when anonymous clients are off) | the user id it was issued to (likewise) |
//! | `exp` | enforced (no leeway); optional | enforced; optional |
//! | `nbf` | enforced (no leeway): refused before; optional | likewise |
//! | `channels` | channels (or `ns:*` patterns) the client may subscribe to in `token` namespaces | – |
//! | `channel` | must be absent | the channel it grants |
//! | `info` | any JSON, shown in presence, join/leave and publications | – |
//! | `aud`, `iss` | required and checked when configured | required and checked when configured |
//!
//! A subscription token cannot be used to connect, nor a connection token
//! to subscribe: the `channel` claim tells them apart.

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
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

/// A token key setting that cannot be used (the server does not start).
/// Each message names the setting and says what is wrong in words.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenKeyError {
    /// `token.hmac_secret` is set but empty: it would sign tokens anyone
    /// can forge.
    #[error(
        "token.hmac_secret is empty: set a secret (32 bytes or more of randomness), or leave \
         the key out for no HS256 tokens"
    )]
    EmptySecret,
    /// A public key setting is empty.
    #[error("{setting} is empty: give the PEM text or the path of a PEM file")]
    EmptyKey {
        /// The setting (`token.rsa_public_key`, ...).
        setting: &'static str,
    },
    /// The key file could not be read.
    #[error("{setting}: cannot read the key file {path:?}: {source}")]
    Unreadable {
        /// The setting.
        setting: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is too big to be a public key.
    #[error("{setting}: cannot read the key file {path:?}: it is over {max_kib} KiB, too big for a public key")]
    TooBig {
        /// The setting.
        setting: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The limit.
        max_kib: u64,
    },
    /// The PEM is not a public key of the setting's kind.
    #[error("{setting} ({origin}): {reason}")]
    InvalidKey {
        /// The setting.
        setting: &'static str,
        /// `PEM text`, or `file "path"`.
        origin: String,
        /// What the PEM holds instead, in words.
        reason: String,
    },
}

impl Verifier {
    /// Builds the verifier from settings; key files are read here.
    ///
    /// # Errors
    /// A key that cannot be read or is not a public key of its kind, or
    /// an empty secret.
    pub fn new(settings: &TokenSettings) -> Result<Verifier, TokenKeyError> {
        if settings.hmac_secret.as_deref().is_some_and(str::is_empty) {
            // An empty key signs tokens anyone can forge: a mistake (an
            // unset variable, say), never a choice.
            return Err(TokenKeyError::EmptySecret);
        }
        let rsa = settings
            .rsa_public_key
            .as_deref()
            .map(|value| public_key("token.rsa_public_key", value, KeyKind::Rsa))
            .transpose()?;
        let ecdsa = settings
            .ecdsa_public_key
            .as_deref()
            .map(|value| public_key("token.ecdsa_public_key", value, KeyKind::Ecdsa))
            .transpose()?;
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
        // A token issued for later is not valid yet.
        validation.validate_nbf = true;
        // A configured audience or issuer is required, not only checked
        // when present: a token without the claim (or with one that is not
        // a string or a list of strings) is refused like a wrong one.
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
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
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    unauthorized("token not valid yet (its nbf is in the future)")
                }
                _ => unauthorized(format!("invalid token: {e}")),
            })
    }
}

/// Which public key a setting holds.
#[derive(Debug, Clone, Copy)]
enum KeyKind {
    Rsa,
    Ecdsa,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "an RSA public key (RS256)",
            KeyKind::Ecdsa => "an ECDSA P-256 public key (ES256)",
        }
    }

    fn parse(self, pem: &[u8]) -> jsonwebtoken::errors::Result<DecodingKey> {
        match self {
            KeyKind::Rsa => DecodingKey::from_rsa_pem(pem),
            KeyKind::Ecdsa => DecodingKey::from_ec_pem(pem),
        }
    }
}

/// Public key files are a few KiB at most; this bounds what a wrong path
/// (a log file, a device) can make the server read.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// A public key setting: PEM text, or (when it does not start with
/// `-----BEGIN`) the path of a PEM file, read now. Errors name the setting
/// and say what is wrong in words.
fn public_key(
    setting: &'static str,
    value: &str,
    kind: KeyKind,
) -> Result<DecodingKey, TokenKeyError> {
    let invalid = |origin: String| {
        move |reason| TokenKeyError::InvalidKey {
            setting,
            origin,
            reason,
        }
    };
    if value.trim_start().starts_with("-----BEGIN") {
        return parse_public_key(value.as_bytes(), kind).map_err(invalid("PEM text".into()));
    }
    let path = value.trim();
    if path.is_empty() {
        return Err(TokenKeyError::EmptyKey { setting });
    }
    let pem = read_key_file(setting, Path::new(path))?;
    parse_public_key(&pem, kind).map_err(invalid(format!("file {path:?}")))
}

fn read_key_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, TokenKeyError> {
    let unreadable = |source| TokenKeyError::Unreadable {
        setting,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut pem = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut pem)
        .map_err(unreadable)?;
    if pem.len() as u64 > MAX_KEY_FILE {
        return Err(TokenKeyError::TooBig {
            setting,
            path: path.to_owned(),
            max_kib: MAX_KEY_FILE / 1024,
        });
    }
    Ok(pem)
}

/// Parses a PEM public key; the error says, in words, what the PEM holds
/// instead (jsonwebtoken itself says `InvalidKeyFormat` for all of it).
fn parse_public_key(pem: &[u8], kind: KeyKind) -> Result<DecodingKey, String> {
    let text = String::from_utf8_lossy(pem);
    let Some(label) = pem_label(&text) else {
        return Err(format!(
            "not PEM: expected {} between -----BEGIN PUBLIC KEY----- and \
             -----END PUBLIC KEY----- lines",
            kind.name()
        ));
    };
    // jsonwebtoken would take some private keys for public ones, and then
    // refuse every token; a private key has no place on the hub anyway.
    if label.contains("PRIVATE") {
        return Err(format!(
            "this is a private key (-----BEGIN {label}-----); configure its public key \
             (`openssl pkey -in private.pem -pubout`)"
        ));
    }
    // jsonwebtoken does not look at the key's algorithm and curve: an
    // ECDSA key on another curve would load and then refuse every token.
    let der = pem_der(&text).unwrap_or_default();
    let names = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    match kind {
        KeyKind::Rsa if names(OID_EC_PUBLIC_KEY) => {
            return Err(
                "this is an EC key, not an RSA key (ES256 keys go in token.ecdsa_public_key)"
                    .to_owned(),
            )
        }
        KeyKind::Ecdsa if names(OID_RSA_ENCRYPTION) => {
            return Err(
                "this is an RSA key, not an EC key (RS256 keys go in token.rsa_public_key)"
                    .to_owned(),
            )
        }
        KeyKind::Ecdsa if names(OID_EC_PUBLIC_KEY) && !names(OID_P256) => {
            return Err("this EC key is not on the P-256 curve, the only one ES256 uses".to_owned())
        }
        _ => {}
    }
    kind.parse(pem).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidKeyFormat => format!(
            "the PEM block (-----BEGIN {label}-----) does not hold {}: it is damaged or of \
             a form jsonwebtoken does not read",
            kind.name()
        ),
        jsonwebtoken::errors::ErrorKind::InvalidRsaKey(why) => {
            format!("not a usable RSA public key: {why}")
        }
        jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey => {
            "not a usable ECDSA public key".to_owned()
        }
        _ => format!("not {}: {e}", kind.name()),
    })
}

/// DER object identifiers, tag and length included: rsaEncryption
/// (1.2.840.113549.1.1.1), id-ecPublicKey (1.2.840.10045.2.1) and the
/// P-256 curve (1.2.840.10045.3.1.7), as they appear in a
/// SubjectPublicKeyInfo.
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The DER bytes of the first PEM block, if its base64 decodes.
fn pem_der(text: &str) -> Option<Vec<u8>> {
    let body: String = text
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|line| !line.trim_start().starts_with("-----END"))
        .flat_map(|line| line.trim().chars())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// The label of the first PEM block (`PUBLIC KEY` in
/// `-----BEGIN PUBLIC KEY-----`).
fn pem_label(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let rest = &text[start..];
    let end = rest.find("-----")?;
    Some(rest[..end].trim()).filter(|label| !label.contains('\n'))
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
pub fn sign_hs256(
    secret: &str,
    claims: &TokenClaims,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// The `channel` claim of a (subscription) token, read without checking
/// it: only to know which channel to subscribe with it, where the token is
/// then verified like any other.
pub fn channel_claim(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("channel")?.as_str().map(str::to_owned)
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

    #[tokio::test]
    async fn a_token_before_its_nbf_is_refused() {
        let v = hs("s3cret");
        let key = EncodingKey::from_secret(b"s3cret");
        let later = sign(
            Algorithm::HS256,
            &key,
            &serde_json::json!({"sub": "42", "nbf": now_unix() + 60}),
        );
        let err = v.connection(&later).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
        assert!(err.message.contains("not valid yet"), "{}", err.message);
        let now = sign(
            Algorithm::HS256,
            &key,
            &serde_json::json!({"sub": "42", "nbf": now_unix() - 1}),
        );
        assert_eq!(v.connection(&now).await.unwrap().user, "42");
    }

    #[test]
    fn an_empty_hmac_secret_is_refused_at_start() {
        let Err(err) = Verifier::new(&TokenSettings {
            hmac_secret: Some(String::new()),
            ..TokenSettings::default()
        }) else {
            panic!("an empty secret must be refused");
        };
        assert!(matches!(err, TokenKeyError::EmptySecret), "{err}");
        assert!(
            err.to_string().contains("token.hmac_secret is empty"),
            "{err}"
        );
    }

    const RSA_PUBLIC: &str = include_str!("../tests/fixtures/rsa_public.pem");
    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/rsa_private.pem");

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    /// A file under the temporary folder, removed when dropped.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path =
                std::env::temp_dir().join(format!("tidewire-auth-{}-{name}", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }

        fn path(&self) -> String {
            self.0.to_str().unwrap().to_owned()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// For each algorithm, with an audience and an issuer configured: a
    /// token needs both claims, with the configured values.
    #[tokio::test]
    async fn configured_audience_and_issuer_are_required() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cases = [
            (
                Algorithm::HS256,
                TokenSettings {
                    hmac_secret: Some("s3cret".into()),
                    ..TokenSettings::default()
                },
                EncodingKey::from_secret(b"s3cret"),
            ),
            (
                Algorithm::RS256,
                TokenSettings {
                    rsa_public_key: Some(RSA_PUBLIC.into()),
                    ..TokenSettings::default()
                },
                EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
            ),
            (
                Algorithm::ES256,
                TokenSettings {
                    ecdsa_public_key: Some(ec.public_key_pem()),
                    ..TokenSettings::default()
                },
                EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
            ),
        ];
        for (alg, settings, key) in cases {
            let v = Verifier::new(&TokenSettings {
                audience: Some("my-app".into()),
                issuer: Some("https://auth.example".into()),
                ..settings
            })
            .unwrap();
            let token = |claims: serde_json::Value| sign(alg, &key, &claims);
            let good = token(serde_json::json!({
                "sub": "42", "aud": "my-app", "iss": "https://auth.example"
            }));
            assert_eq!(v.connection(&good).await.unwrap().user, "42", "{alg:?}");
            let one_of_several = token(serde_json::json!({
                "sub": "42", "aud": ["other", "my-app"], "iss": "https://auth.example"
            }));
            assert!(v.connection(&one_of_several).await.is_ok(), "{alg:?}");
            for (what, claims) in [
                (
                    "no aud",
                    serde_json::json!({"sub": "42", "iss": "https://auth.example"}),
                ),
                ("no iss", serde_json::json!({"sub": "42", "aud": "my-app"})),
                ("neither", serde_json::json!({"sub": "42"})),
                (
                    "wrong aud",
                    serde_json::json!({"sub": "42", "aud": "app2", "iss": "https://auth.example"}),
                ),
                (
                    "wrong iss",
                    serde_json::json!({"sub": "42", "aud": "my-app", "iss": "https://evil"}),
                ),
                (
                    "aud not a string",
                    serde_json::json!({"sub": "42", "aud": 7, "iss": "https://auth.example"}),
                ),
                (
                    "iss not a string",
                    serde_json::json!({"sub": "42", "aud": "my-app", "iss": {"x": 1}}),
                ),
            ] {
                let err = v.connection(&token(claims.clone())).await.unwrap_err();
                assert_eq!(err.code, ErrorCode::Unauthorized, "{alg:?}, {what}");
                // Subscription tokens are held to the same rule.
                let mut sub = claims;
                sub["channel"] = "private:x".into();
                let err = v.subscription(&token(sub)).await.unwrap_err();
                assert_eq!(err.code, ErrorCode::Unauthorized, "{alg:?}, {what}");
            }
        }
    }

    #[tokio::test]
    async fn public_keys_are_pem_text_or_a_file_path() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rsa_file = TempFile::new("rsa.pem", RSA_PUBLIC.as_bytes());
        let ec_file = TempFile::new("ec.pem", ec.public_key_pem().as_bytes());
        let v = Verifier::new(&TokenSettings {
            rsa_public_key: Some(rsa_file.path()),
            ecdsa_public_key: Some(ec_file.path()),
            ..TokenSettings::default()
        })
        .unwrap();
        let claims = serde_json::json!({"sub": "42"});
        let rs = sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
            &claims,
        );
        let es = sign(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(),
            &claims,
        );
        assert_eq!(v.connection(&rs).await.unwrap().user, "42");
        assert_eq!(v.connection(&es).await.unwrap().user, "42");
        // PEM text with the leading newline a TOML or shell quote may add.
        let inline = Verifier::new(&TokenSettings {
            rsa_public_key: Some(format!("\n{RSA_PUBLIC}")),
            ..TokenSettings::default()
        })
        .unwrap();
        assert_eq!(inline.connection(&rs).await.unwrap().user, "42");
    }

    fn key_error(rsa: Option<String>, ecdsa: Option<String>) -> String {
        Verifier::new(&TokenSettings {
            rsa_public_key: rsa,
            ecdsa_public_key: ecdsa,
            ..TokenSettings::default()
        })
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn a_key_that_fails_says_which_and_why() {
        let missing = std::env::temp_dir().join("tidewire-auth-no-such-key.pem");
        let missing = missing.to_str().unwrap();
        let e = key_error(Some(missing.into()), None);
        assert!(
            e.starts_with("token.rsa_public_key: cannot read the key file"),
            "{e}"
        );
        assert!(e.contains(missing), "{e}");
        assert!(e.contains("No such file or directory"), "{e}");
        let e = key_error(None, Some(missing.into()));
        assert!(e.starts_with("token.ecdsa_public_key: "), "{e}");

        let e = key_error(Some("  ".into()), None);
        assert!(e.contains("token.rsa_public_key is empty"), "{e}");

        // Damaged PEM text.
        let damaged = RSA_PUBLIC.replace("MII", "MIX");
        let e = key_error(Some(damaged), None);
        assert!(
            e.starts_with(
                "token.rsa_public_key (PEM text): the PEM block (-----BEGIN PUBLIC KEY-----) \
                 does not hold an RSA public key"
            ),
            "{e}"
        );

        // A file that holds no PEM at all.
        let junk = TempFile::new("junk.pem", b"hello\n");
        let e = key_error(None, Some(junk.path()));
        assert!(e.starts_with("token.ecdsa_public_key (file "), "{e}");
        assert!(e.contains(&junk.path()), "{e}");
        assert!(e.contains("not PEM"), "{e}");

        // A private key where the public one belongs.
        let e = key_error(Some(RSA_PRIVATE.into()), None);
        assert!(
            e.contains("this is a private key (-----BEGIN PRIVATE KEY-----)"),
            "{e}"
        );
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let e = key_error(None, Some(ec.serialize_pem()));
        assert!(e.contains("this is a private key"), "{e}");

        // The other algorithm's key, and an EC key on another curve.
        let e = key_error(None, Some(RSA_PUBLIC.into()));
        assert!(
            e.starts_with("token.ecdsa_public_key (PEM text): this is an RSA key"),
            "{e}"
        );
        let e = key_error(Some(ec.public_key_pem()), None);
        assert!(e.contains("this is an EC key, not an RSA key"), "{e}");
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let e = key_error(None, Some(p384.public_key_pem()));
        assert!(e.contains("not on the P-256 curve"), "{e}");

        // A path to something huge is not read whole.
        let big = TempFile::new("big.pem", &vec![b'A'; 100 * 1024]);
        let e = key_error(Some(big.path()), None);
        assert!(e.contains("over 64 KiB"), "{e}");
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
