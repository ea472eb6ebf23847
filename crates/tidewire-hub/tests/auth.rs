//! Connection tokens against a real hub: HS256, RS256 (PEM), ES256 (JWKS
//! URL), expiry at connect and while connected, refresh.

mod common;

use std::time::Duration;

use axum::routing::get;
use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tidewire_hub::auth::{now_unix, TokenClaims};

fn claims(user: &str, ttl: i64) -> TokenClaims {
    TokenClaims {
        sub: user.into(),
        exp: Some((now_unix() as i64 + ttl).max(0) as u64),
        ..TokenClaims::default()
    }
}

#[tokio::test]
async fn expired_forged_and_missing_tokens_are_refused() {
    let mut cfg = config();
    cfg.client.anonymous = false;
    let server = start(cfg).await;
    let mut c = Client::open(&server).await;
    let expired = token("42", -10, &[]);
    assert_eq!(
        c.error_code("connect", json!({"token": expired})).await,
        106
    );
    let forged = tidewire_hub::auth::sign_hs256("not-the-secret", &claims("42", 60)).unwrap();
    assert_eq!(c.error_code("connect", json!({"token": forged})).await, 105);
    assert_eq!(
        c.error_code("connect", json!({"token": "a.b.c"})).await,
        105
    );
    // Anonymous connections are off here.
    assert_eq!(c.error_code("connect", json!({})).await, 105);
    // The connection survives and may try again with a good token.
    let reply = c
        .ok("connect", json!({"token": token("42", 60, &[])}))
        .await;
    assert_eq!(reply["user"], "42");
    let counts = server.hub.counts();
    assert_eq!((counts.clients, counts.users), (1, 1));
}

#[tokio::test]
async fn a_token_expiring_while_connected_asks_for_refresh_then_disconnects() {
    let mut cfg = config();
    cfg.client.refresh_grace = Duration::from_secs(1);
    let server = start(cfg).await;
    let (mut c, reply) = Client::connect(&server, Some(&token("42", 1, &[]))).await;
    assert!(reply["expires_in"].as_u64().unwrap() <= 1);
    let push = c.push().await;
    assert_eq!(push, json!({"refresh": {"grace": 1}}));
    // Not refreshed: disconnected with 3003, reconnect advised.
    assert_eq!(c.closed().await, Some(3003));
    let push = c.push().await;
    assert_eq!(push["disconnect"]["code"], 3003);
    assert_eq!(push["disconnect"]["reconnect"], true);
    let hub = server.hub.clone();
    eventually("the session gone", || hub.counts().sessions == 0).await;
}

#[tokio::test]
async fn refreshing_in_time_keeps_the_connection() {
    let mut cfg = config();
    cfg.client.refresh_grace = Duration::from_secs(1);
    let server = start(cfg).await;
    let (mut c, _) = Client::connect(&server, Some(&token("42", 1, &[]))).await;
    assert_eq!(c.push().await, json!({"refresh": {"grace": 1}}));
    let other_user = token("43", 600, &[]);
    assert_eq!(
        c.error_code("refresh", json!({"token": other_user})).await,
        105
    );
    let expired = token("42", -1, &[]);
    assert_eq!(
        c.error_code("refresh", json!({"token": expired})).await,
        106
    );
    let reply = c
        .ok("refresh", json!({"token": token("42", 600, &[])}))
        .await;
    assert!(reply["expires_in"].as_u64().unwrap() >= 599);
    c.expect_silence(Duration::from_millis(2500)).await;
    c.ok("ping", json!({})).await;
}

#[tokio::test]
async fn rs256_tokens_with_a_pem_public_key() {
    let mut cfg = config();
    cfg.token.hmac_secret = None;
    cfg.token.rsa_public_key = Some(include_str!("fixtures/rsa_public.pem").into());
    let server = start(cfg).await;
    let key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa_private.pem")).unwrap();
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims("rsa", 60), &key).unwrap();
    let (_c, reply) = Client::connect(&server, Some(&token)).await;
    assert_eq!(reply["user"], "rsa");
    // HS256 is not accepted without a secret.
    let mut c = Client::open(&server).await;
    let hs = tidewire_hub::auth::sign_hs256("x", &claims("a", 60)).unwrap();
    assert_eq!(c.error_code("connect", json!({"token": hs})).await, 105);
}

#[tokio::test]
async fn es256_tokens_with_keys_from_a_jwks_url() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = key.public_key_raw();
    assert_eq!(point.len(), 65);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": b64(&point[1..33]), "y": b64(&point[33..]),
    }]});
    let app = axum::Router::new().route(
        "/jwks.json",
        get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut cfg = config();
    cfg.token.hmac_secret = None;
    cfg.token.jwks_url = Some(format!("http://{jwks_addr}/jwks.json"));
    let server = start(cfg).await;
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let token = jsonwebtoken::encode(&header, &claims("jwks-user", 60), &signing).unwrap();
    let (_c, reply) = Client::connect(&server, Some(&token)).await;
    assert_eq!(reply["user"], "jwks-user");
    // An unknown kid is refused.
    header.kid = Some("k2".into());
    let token = jsonwebtoken::encode(&header, &claims("x", 60), &signing).unwrap();
    let mut c = Client::open(&server).await;
    assert_eq!(c.error_code("connect", json!({"token": token})).await, 105);
}

#[tokio::test]
async fn a_subscription_ends_when_its_token_expires() {
    let mut cfg = config();
    cfg.namespaces.insert(
        "private".into(),
        tidewire_hub::config::ChannelOptions {
            subscribe: tidewire_hub::config::SubscribeRule::Token,
            ..Default::default()
        },
    );
    let server = start(cfg).await;
    let (mut c, _) = Client::connect(&server, Some(&token("42", 600, &[]))).await;
    let short = subscription_token("42", "private:plans", 1);
    c.ok(
        "subscribe",
        json!({"channel": "private:plans", "token": short}),
    )
    .await;
    let push = loop {
        let p = c.push().await;
        if p.get("unsubscribe").is_some() {
            break p;
        }
    };
    assert_eq!(push["channel"], "private:plans");
    assert_eq!(push["unsubscribe"]["code"], 2001);
    assert_eq!(
        c.error_code("unsubscribe", json!({"channel": "private:plans"}))
            .await,
        111
    );
    let hub = server.hub.clone();
    eventually("the channel gone", || hub.counts().channels == 0).await;
    // A fresh token subscribes again; the connection was never at risk.
    let fresh = subscription_token("42", "private:plans", 600);
    c.ok(
        "subscribe",
        json!({"channel": "private:plans", "token": fresh}),
    )
    .await;
}
