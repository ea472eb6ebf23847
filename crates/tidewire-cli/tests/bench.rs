//! `tidewire bench` against `tidewire echo`: both modes, JSON report.

mod common;

use common::{run_bench, start_echo};
use tokio::process::Command;

#[tokio::test]
async fn echo_mode_checks_every_echo_and_reports_latency() {
    let (_server, addr) = start_echo(&[]).await;
    let url = format!("ws://{addr}/");
    for extra in [
        &["--text"][..],
        &["--compression"][..],
        &["--busy-poll"][..],
        &[][..],
    ] {
        let mut args = vec![
            url.as_str(),
            "-c",
            "4",
            "-s",
            "1000",
            "-p",
            "8",
            "-d",
            "1s",
            "--json",
        ];
        args.extend_from_slice(extra);
        let report = run_bench(&args).await;
        assert_eq!(report["connected"], 4, "{report}");
        assert!(report["messages"].as_u64().unwrap() > 100, "{report}");
        assert_eq!(report["errors"].as_object().unwrap().len(), 0, "{report}");
        let latency = &report["latency"];
        assert!(latency["p50_us"].as_u64().unwrap() <= latency["p99_us"].as_u64().unwrap());
        assert!(latency["max_us"].as_u64().unwrap() > 0);
    }
}

#[tokio::test]
async fn rate_limits_the_load() {
    let (_server, addr) = start_echo(&[]).await;
    let report = run_bench(&[
        &format!("ws://{addr}/"),
        "-c",
        "2",
        "-d",
        "1s",
        "--rate",
        "200",
        "--json",
    ])
    .await;
    let rate = report["messages_per_sec"].as_f64().unwrap();
    assert!((120.0..=260.0).contains(&rate), "{report}");
}

#[tokio::test]
async fn idle_mode_holds_connections_from_several_sources_and_reads_server_memory() {
    let (server, addr) = start_echo(&[]).await;
    let pid = server.id().unwrap().to_string();
    let report = run_bench(&[
        &format!("ws://{addr}/"),
        "--idle",
        "-c",
        "50",
        "-d",
        "1s",
        "--source",
        "127.0.0.1,127.0.0.2",
        "--server-pid",
        &pid,
        "--json",
    ])
    .await;
    assert_eq!(report["connected"], 50, "{report}");
    assert_eq!(report["errors"].as_object().unwrap().len(), 0, "{report}");
    assert!(
        report["server_kib_per_connection"].as_f64().is_some(),
        "{report}"
    );
}

#[tokio::test]
async fn a_server_that_is_not_there_is_reported() {
    let output = Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args([
            "bench",
            "ws://127.0.0.1:1/",
            "-c",
            "2",
            "-d",
            "1s",
            "--json",
        ])
        .output()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["connected"], 0);
    let errors = report["errors"].as_object().unwrap();
    assert!(errors.keys().any(|k| k.contains("connect")), "{report}");
}
