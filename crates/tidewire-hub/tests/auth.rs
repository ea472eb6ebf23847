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

/// An HS256 token with exactly these claims.
fn signed(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn without_anonymous_clients_a_token_must_name_a_user() {
    let mut cfg = config();
    cfg.client.anonymous = false;
    cfg.namespaces.insert(
        "private".into(),
        tidewire_hub::config::ChannelOptions {
            subscribe: tidewire_hub::config::SubscribeRule::Token,
            ..Default::default()
        },
    );
    let server = start(cfg).await;
    let mut c = Client::open(&server).await;
    let exp = now_unix() + 60;
    for claims in [
        json!({"exp": exp}),
        json!({"sub": "", "exp": exp}),
        json!({"sub": "", "channels": ["private:*"]}),
    ] {
        let reply = c.call("connect", json!({"token": signed(claims)})).await;
        assert_eq!(reply["error"]["code"], 105, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains("sub claim"), "{message}");
    }
    assert_eq!(server.hub.counts().clients, 0);
    // A user connects; a subscription token naming nobody grants nothing.
    c.ok("connect", json!({"token": token("42", 60, &[])}))
        .await;
    let nobody = signed(json!({"channel": "private:plans", "exp": exp}));
    let reply = c
        .call(
            "subscribe",
            json!({"channel": "private:plans", "token": nobody}),
        )
        .await;
    assert_eq!(reply["error"]["code"], 105, "{reply}");
    // A token for another user cannot take over the connection either.
    let unnamed = signed(json!({"sub": "", "exp": exp}));
    assert_eq!(
        c.error_code("refresh", json!({"token": unnamed})).await,
        105
    );
    c.ok(
        "subscribe",
        json!({"channel": "private:plans", "token": subscription_token("42", "private:plans", 60)}),
    )
    .await;
}

#[tokio::test]
async fn with_anonymous_clients_a_token_without_user_is_anonymous() {
    // The embedded defaults: anonymous clients are allowed, so a token
    // naming no user connects as the anonymous user, with its grants.
    let server = start(config()).await;
    let mut c = Client::open(&server).await;
    let unnamed = signed(json!({"channels": ["private:*"]}));
    let reply = c.ok("connect", json!({"token": unnamed})).await;
    assert_eq!(reply["user"], "");
}

#[tokio::test]
async fn without_anonymous_clients_the_connect_proxy_must_name_a_user() {
    let backend = axum::Router::new().route(
        "/connect",
        axum::routing::post(
            |axum::Json(call): axum::Json<serde_json::Value>| async move {
                let user = call["data"]["as"].clone();
                axum::Json(json!({"result": {"user": user}}))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, backend).await });
    let mut cfg = config();
    cfg.client.anonymous = false;
    cfg.proxy.connect_url = Some(format!("http://{backend_addr}/connect"));
    let server = start(cfg).await;
    let mut c = Client::open(&server).await;
    assert_eq!(
        c.error_code("connect", json!({"data": {"as": ""}})).await,
        105
    );
    // The proxy may name the user of a token that names none.
    let unnamed = signed(json!({"exp": now_unix() + 60}));
    let reply = c
        .ok("connect", json!({"token": unnamed, "data": {"as": "7"}}))
        .await;
    assert_eq!(reply["user"], "7");
}

#[tokio::test]
async fn a_configured_audience_and_issuer_must_be_in_the_token() {
    // RS256 with the key given as a file path, as operators mount keys.
    let key_file =
        std::env::temp_dir().join(format!("tidewire-hub-rsa-{}.pem", std::process::id()));
    std::fs::write(&key_file, include_str!("fixtures/rsa_public.pem")).unwrap();
    let mut cfg = config();
    cfg.token.hmac_secret = None;
    cfg.token.rsa_public_key = Some(key_file.to_str().unwrap().into());
    cfg.token.audience = Some("my-app".into());
    cfg.token.issuer = Some("https://auth.example".into());
    let server = start(cfg).await;
    let _ = std::fs::remove_file(&key_file);
    let key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa_private.pem")).unwrap();
    let rs256 = |claims: serde_json::Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap()
    };
    let mut c = Client::open(&server).await;
    for claims in [
        json!({"sub": "42", "iss": "https://auth.example"}),
        json!({"sub": "42", "aud": "my-app"}),
        json!({"sub": "42", "aud": "other", "iss": "https://auth.example"}),
    ] {
        let reply = c.call("connect", json!({"token": rs256(claims)})).await;
        assert_eq!(reply["error"]["code"], 105, "{reply}");
    }
    let good = rs256(json!({"sub": "42", "aud": "my-app", "iss": "https://auth.example"}));
    assert_eq!(c.ok("connect", json!({"token": good})).await["user"], "42");
}
