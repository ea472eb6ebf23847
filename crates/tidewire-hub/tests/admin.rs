//! The admin page's server side: `POST /admin/token` trades the admin
//! secret for a token, an admin connection subscribes to `$admin` and gets
//! the cluster's nodes every second (two hubs on one engine here); nobody
//! else may join or publish there.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{api, http, Client, TestServer, API_KEY, LIMIT};
use serde_json::{json, Value};
use tidewire_hub::{Config, MemoryEngine};

const ADMIN_SECRET: &str = "operator-secret";

fn admin_config() -> Config {
    let mut config = common::config();
    config.admin.secret = Some(ADMIN_SECRET.into());
    config
}

async fn serve(config: Config, engine: Arc<MemoryEngine>) -> TestServer {
    common::start_on(config, engine).await
}

async fn token_for(server: &TestServer, body: &str) -> (u16, Value) {
    let (status, text) = http(
        server.addr,
        "POST",
        "/admin/token",
        &[("Content-Type", "application/json")],
        body,
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn admin_token(server: &TestServer) -> String {
    let (status, body) = token_for(server, &json!({ "secret": ADMIN_SECRET }).to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_in"].as_u64().unwrap() > 60, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

/// The next admin view whose node list satisfies `check`.
async fn view_where(admin: &mut Client, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no such admin view");
        let publication = admin.publication("$admin").await;
        let view = publication["data"].clone();
        if check(&view) {
            return view;
        }
    }
}

#[tokio::test]
async fn the_admin_page_and_its_token_are_for_the_secret_only() {
    let server = serve(admin_config(), Arc::new(MemoryEngine::new())).await;
    let (status, page) = http(server.addr, "GET", "/admin", &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("tidewire") && page.contains("/admin/admin.js"));
    let (status, script) = http(server.addr, "GET", "/admin/admin.js", &[], "").await;
    assert_eq!(status, 200);
    assert!(script.contains("$admin"));

    let (status, body) = token_for(&server, r#"{"secret":"guess"}"#).await;
    assert_eq!(status, 401);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("wrong admin secret"));
    // The API key is not the admin secret when one is set.
    let (status, _) = token_for(&server, &json!({ "secret": API_KEY }).to_string()).await;
    assert_eq!(status, 401);
    let (status, body) = token_for(&server, "not json").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = token_for(&server, &"x".repeat(10_000)).await;
    assert_eq!(status, 413);

    // An admin token is no application token, and no application token
    // passes for an admin one.
    let token = admin_token(&server).await;
    let (mut admin, reply) = Client::connect(&server, Some(&token)).await;
    assert_eq!(reply["user"], "$admin");
    admin.ok("subscribe", json!({"channel": "$admin"})).await;
    let app_token = common::token("mallory", 60, &["$admin"]);
    let (mut user, _) = Client::connect(&server, Some(&app_token)).await;
    assert_eq!(
        user.error_code("subscribe", json!({"channel": "$admin"}))
            .await,
        107
    );
    // Other $ channels are the server's too.
    assert_eq!(
        user.error_code("subscribe", json!({"channel": "$other"}))
            .await,
        109
    );
    // Only the nodes publish to $admin: not a client, admin or not, nor
    // the HTTP API.
    assert_eq!(
        admin
            .error_code("publish", json!({"channel": "$admin", "data": 1}))
            .await,
        107
    );
    let (status, body) = api(&server, "publish", json!({"channel": "$admin", "data": 1})).await;
    assert_ne!(status, 200, "{body}");
    assert_eq!(body["error"]["code"], 107, "{body}");
}

#[tokio::test]
async fn an_admin_connection_is_sent_every_node_with_its_counters_each_second() {
    let engine = Arc::new(MemoryEngine::new());
    let a = serve(admin_config(), engine.clone()).await;
    let b = serve(admin_config(), engine.clone()).await;
    // A subscriber on B, publications through A's API.
    let (mut reader, _) = Client::connect(&b, None).await;
    reader.ok("subscribe", json!({"channel": "news"})).await;
    for n in 0..5 {
        let (status, body) = api(&a, "publish", json!({"channel": "news", "data": n})).await;
        assert_eq!(status, 200, "{body}");
    }
    for _ in 0..5 {
        reader.publication("news").await;
    }

    // The token of one node is good on the other (the same secret).
    let token = admin_token(&b).await;
    let (mut admin, _) = Client::connect(&a, Some(&token)).await;
    admin.ok("subscribe", json!({"channel": "$admin"})).await;
    let b_id = b.hub.node_id().to_owned();
    let view = view_where(&mut admin, |view| {
        view["nodes"].as_array().is_some_and(|nodes| {
            nodes
                .iter()
                .any(|n| n["node"] == b_id.as_str() && n["publications"].as_u64() >= Some(5))
        })
    })
    .await;
    assert_eq!(view["node"], a.hub.node_id());
    assert_eq!(view["engine"], "memory");
    let nodes = view["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{view}");
    assert_eq!(nodes[0]["node"], a.hub.node_id(), "this node first");
    assert_eq!(nodes[0]["this_node"], true);
    // A's own counts: its admin connection (and nothing else).
    assert_eq!(nodes[0]["counts"]["clients"], 1, "{view}");
    let on_b = &nodes[1];
    assert_eq!(on_b["this_node"], false);
    assert_eq!(on_b["counts"]["subscriptions"], 1, "{view}");
    assert!(on_b["deliveries"].as_u64().unwrap() >= 5, "{view}");
    assert!(on_b["unhealthy"].is_null(), "{view}");
    assert!(on_b["at_ms"].as_u64().unwrap() > 0);

    // Views keep coming, each second, newer each time.
    let first = view["at_ms"].as_u64().unwrap();
    let next = admin.publication("$admin").await;
    let later = next["data"]["at_ms"].as_u64().unwrap();
    assert!(
        (first + 500..first + 3000).contains(&later),
        "{first} then {later}"
    );

    // B goes away (its server task and every handle on its hub gone, so
    // its heartbeats stop): it leaves the view once unheard of.
    drop(reader);
    b.task.abort();
    let _ = b.task.await;
    drop(b.hub);
    let gone = tokio::time::timeout(
        tidewire_hub::node::NODE_TIMEOUT + Duration::from_secs(10),
        view_where_forever(&mut admin, |view| {
            view["nodes"].as_array().map(Vec::len) == Some(1)
        }),
    )
    .await;
    assert!(gone.is_ok(), "B still listed");
}

/// As [`view_where`], without its own deadline.
async fn view_where_forever(admin: &mut Client, check: impl Fn(&Value) -> bool) -> Value {
    loop {
        let publication = admin.publication("$admin").await;
        let view = publication["data"].clone();
        if check(&view) {
            return view;
        }
    }
}

#[tokio::test]
async fn without_a_secret_nor_an_api_key_in_the_config_the_admin_page_is_off() {
    let server = serve(common::config(), Arc::new(MemoryEngine::new())).await;
    let (status, _) = http(server.addr, "GET", "/admin", &[], "").await;
    assert_eq!(status, 404);
    let (status, _) = token_for(&server, r#"{"secret":"anything"}"#).await;
    assert_eq!(status, 404);

    let mut config = admin_config();
    config.admin.enabled = false;
    let server = serve(config, Arc::new(MemoryEngine::new())).await;
    let (status, _) = token_for(&server, &json!({ "secret": ADMIN_SECRET }).to_string()).await;
    assert_eq!(status, 404);

    // With no admin.secret, the API key of the configuration is the secret.
    let mut config = common::config();
    config.api.key = Some(API_KEY.into());
    let server = serve(config, Arc::new(MemoryEngine::new())).await;
    let (status, body) = token_for(&server, &json!({ "secret": API_KEY }).to_string()).await;
    assert_eq!(status, 200, "{body}");
}
