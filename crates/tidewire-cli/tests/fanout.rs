//! `tidewire bench --fanout` against `tidewire serve`: every publication
//! reaches every subscriber, through a publishing client and through the
//! HTTP API; `--rate 0` holds idle subscribed connections.

mod common;

use std::process::Stdio;

use common::{run_bench, LIMIT};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// `tidewire serve` with the benchmark's configuration (bench/fanout), on
/// a free port; returns it with its address.
async fn serve() -> (Child, String) {
    let config = common::repo_root().join("bench/fanout/tidewire.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .env_remove("TIDEWIRE_API_KEY")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidewire serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return rest.split('/').next().unwrap().to_string();
            }
        }
        panic!("tidewire serve exited before listening");
    })
    .await
    .expect("tidewire serve did not start in time");
    (child, addr)
}

fn assert_every_publication_arrived(report: &serde_json::Value, subscribers: u64) {
    assert_eq!(report["mode"], "fanout", "{report}");
    assert_eq!(report["connected"], subscribers, "{report}");
    assert_eq!(report["errors"].as_object().unwrap().len(), 0, "{report}");
    let publications = report["publications"].as_u64().unwrap();
    assert!(publications >= 10, "{report}");
    assert_eq!(report["expected"], publications * subscribers, "{report}");
    assert_eq!(report["deliveries"], report["expected"], "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["out_of_order"], 0, "{report}");
    assert!(
        report["deliveries_per_sec"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    let latency = &report["latency"];
    assert!(latency["p50_us"].as_u64().unwrap() > 0, "{report}");
    assert!(latency["p50_us"].as_u64().unwrap() <= latency["p99_us"].as_u64().unwrap());
    assert!(latency["p99_us"].as_u64().unwrap() <= latency["max_us"].as_u64().unwrap());
}

#[tokio::test]
async fn fanout_through_a_publishing_client_reaches_every_subscriber() {
    let (server, addr) = serve().await;
    let pid = server.id().unwrap().to_string();
    let url = format!("ws://{addr}/connection/websocket");
    // More subscribers than the hub wakes in one wave (128).
    let report = run_bench(&[
        &url,
        "--fanout",
        "-c",
        "300",
        "--rate",
        "40",
        "-s",
        "100",
        "-d",
        "1s",
        "--server-pid",
        &pid,
        "--json",
    ])
    .await;
    assert_every_publication_arrived(&report, 300);
    assert_eq!(report["protocol"], "tidewire");
    assert_eq!(report["publish_via"], "ws");
    assert!(report["server_cpu_seconds"].as_f64().is_some(), "{report}");
}

#[tokio::test]
async fn fanout_through_the_http_api_reaches_every_subscriber() {
    let (_server, addr) = serve().await;
    let url = format!("ws://{addr}/connection/websocket");
    let api = format!("http://{addr}/api");
    let report = run_bench(&[
        &url,
        "--fanout",
        "-c",
        "20",
        "--rate",
        "30",
        "-s",
        "64",
        "-d",
        "1s",
        "--publish-via",
        "api",
        "--api-url",
        &api,
        "--api-key",
        "bench",
        "--json",
    ])
    .await;
    assert_every_publication_arrived(&report, 20);
    assert_eq!(report["publish_via"], "api");
}

#[tokio::test]
async fn rate_zero_holds_idle_subscriptions_and_reads_server_memory() {
    let (server, addr) = serve().await;
    let pid = server.id().unwrap().to_string();
    let url = format!("ws://{addr}/connection/websocket");
    let report = run_bench(&[
        &url,
        "--fanout",
        "-c",
        "30",
        "--rate",
        "0",
        "-d",
        "1s",
        "--source",
        "127.0.0.1,127.0.0.2",
        "--server-pid",
        &pid,
        "--json",
    ])
    .await;
    assert_eq!(report["connected"], 30, "{report}");
    assert_eq!(report["publications"], 0, "{report}");
    assert_eq!(report["errors"].as_object().unwrap().len(), 0, "{report}");
    assert!(
        report["server_kib_per_connection"].as_f64().is_some(),
        "{report}"
    );
}

#[tokio::test]
async fn a_wrong_api_key_is_reported() {
    let (_server, addr) = serve().await;
    let report = run_bench(&[
        &format!("ws://{addr}/connection/websocket"),
        "--fanout",
        "-c",
        "2",
        "--rate",
        "10",
        "-d",
        "1s",
        "--publish-via",
        "api",
        "--api-url",
        &format!("http://{addr}/api"),
        "--api-key",
        "wrong",
        "--json",
    ])
    .await;
    let errors = report["errors"].as_object().unwrap();
    assert!(errors.keys().any(|k| k.contains("401")), "{report}");
    assert_eq!(report["deliveries"], 0, "{report}");
}

#[tokio::test]
async fn fanout_over_each_http_fallback_reaches_every_subscriber() {
    let (server, addr) = serve().await;
    let pid = server.id().unwrap().to_string();
    let url = format!("ws://{addr}/connection/websocket");
    for transport in ["http-stream", "sse", "long-poll"] {
        let report = run_bench(&[
            &url,
            "--fanout",
            "-c",
            "50",
            "--rate",
            "40",
            "-s",
            "100",
            "-d",
            "1s",
            "--transport",
            transport,
            "--server-pid",
            &pid,
            "--json",
        ])
        .await;
        assert_every_publication_arrived(&report, 50);
        assert_eq!(report["transport"], transport, "{report}");
        let polls = report["polls"].as_u64().unwrap();
        if transport == "long-poll" {
            // At least one poll per subscriber after its first answer.
            assert!(polls >= 50, "{report}");
        } else {
            assert_eq!(polls, 0, "{report}");
        }
        assert!(
            report["server_cpu_us_per_delivery"].as_f64().unwrap() > 0.0,
            "{report}"
        );
    }
}
