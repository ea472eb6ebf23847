//! Every command of the client protocol against a real hub on loopback:
//! replies, pushes, error codes, recovery, and cleanup under churn.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tidewire_hub::config::{ChannelOptions, PublishRule};

#[tokio::test]
async fn connect_reply_carries_client_user_and_ping_interval() {
    let server = start(config()).await;
    let (_client, reply) = Client::connect(&server, None).await;
    assert_eq!(reply["user"], "");
    assert_eq!(reply["version"], 1);
    assert_eq!(reply["ping_interval"], 25);
    assert_eq!(reply["max_message_size"], 64 * 1024);
    assert_eq!(reply["client"].as_str().unwrap().len(), 16);
    assert!(reply.get("expires_in").is_none());
    let (mut authed, reply) = Client::connect(&server, Some(&token("42", 600, &[]))).await;
    assert_eq!(reply["user"], "42");
    let expires_in = reply["expires_in"].as_u64().unwrap();
    assert!((590..=600).contains(&expires_in), "{expires_in}");
    assert_eq!(authed.error_code("connect", json!({})).await, 104);
    assert_eq!(authed.ok("ping", json!({})).await, json!({}));
}

#[tokio::test]
async fn malformed_and_premature_commands_get_codes_and_the_connection_survives() {
    let server = start(config()).await;
    let mut c = Client::open(&server).await;
    assert_eq!(
        c.error_code("subscribe", json!({"channel": "a"})).await,
        103
    );
    assert_eq!(c.error_code("ping", json!({})).await, 103);
    c.send_raw("this is not json").await;
    let reply = c.next_message().await.unwrap();
    assert_eq!(reply["error"]["code"], 101);
    assert!(reply.get("id").is_none());
    c.send_raw(r#"{"id":7,"dance":{}}"#).await;
    let reply = c.reply_to(7).await;
    assert_eq!(reply["error"]["code"], 102);
    c.send_raw(r#"{"id":8,"subscribe":{"chanel":"typo"}}"#)
        .await;
    assert_eq!(c.reply_to(8).await["error"]["code"], 101);
    c.ws.send_binary(vec![1u8, 2, 3]).await.unwrap();
    assert_eq!(c.next_message().await.unwrap()["error"]["code"], 101);
    // Still alive: connect works.
    c.ok("connect", json!({})).await;
    assert_eq!(c.error_code("publish", json!({"channel": "a"})).await, 101);
    c.ok("ping", json!({})).await;
}

#[tokio::test]
async fn batched_commands_are_answered_in_order_and_bounded() {
    let mut cfg = config();
    cfg.client.max_batch = 3;
    let server = start(cfg).await;
    let mut c = Client::open(&server).await;
    c.send_raw("{\"id\":1,\"connect\":{}}\n{\"id\":2,\"ping\":{}}\n\n{\"id\":3,\"ping\":{}}\n")
        .await;
    for id in 1..=3 {
        let reply = c.next_message().await.unwrap();
        assert_eq!(reply["id"], id);
    }
    // Past the limit: every command with an id gets its own 113 with that
    // id, in order; the ones without an id share one 113 without id.
    c.send_raw(
        "{\"id\":4,\"ping\":{}}\n{\"id\":5,\"ping\":{}}\n{\"id\":6,\"ping\":{}}\n\
         {\"id\":7,\"ping\":{}}\n{\"ping\":{}}\n{\"id\":8,\"dance\":{}}\nnot json\n{\"id\":9,\"ping\":{}}",
    )
    .await;
    for id in 4..=6 {
        assert_eq!(
            c.next_message().await.unwrap(),
            json!({"id": id, "ping": {}})
        );
    }
    for (id, number) in [(7, 4), (8, 6), (9, 8)] {
        let reply = c.next_message().await.unwrap();
        assert_eq!(reply["id"], id, "{reply}");
        assert_eq!(reply["error"]["code"], 113);
        assert_eq!(
            reply["error"]["message"],
            format!("not run: at most 3 commands in one message, this was command {number}")
        );
    }
    let reply = c.next_message().await.unwrap();
    assert!(reply.get("id").is_none(), "{reply}");
    assert_eq!(reply["error"]["code"], 113);
    assert_eq!(
        reply["error"]["message"],
        "2 command(s) without an id not run: at most 3 commands in one message"
    );
    c.ok("ping", json!({})).await;
}

/// A message of thousands of commands (as many as 64 KiB holds) past the
/// batch limit: every reply that arrives is the right one, in order, and
/// the work ends (all answered, or the connection closed 1013 when the
/// refusals overflow the send queue); other clients are served meanwhile.
#[tokio::test]
async fn a_batch_far_over_the_limit_is_answered_or_closed_never_hung() {
    let server = start(config()).await;
    let (mut c, _) = Client::connect(&server, None).await;
    let mut message = String::new();
    let mut count = 0u64;
    while message.len() < 64 * 1024 - 40 {
        count += 1;
        message.push_str(&format!("{{\"id\":{count},\"ping\":{{}}}}\n"));
    }
    assert!(count > 2500, "{count} commands");
    c.send_raw(&message).await;
    let mut next = 1;
    let mut close_code = None;
    while next <= count {
        let msg = tokio::time::timeout(LIMIT, c.ws.recv())
            .await
            .expect("no message in time");
        let text = match msg {
            Some(Ok(tidewire::Message::Text(text))) => text,
            Some(Ok(tidewire::Message::Close(frame))) => {
                close_code = frame.map(|f| f.code.0);
                break;
            }
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => break,
        };
        let reply: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(reply["id"], next, "{reply}");
        if next <= 100 {
            assert_eq!(reply["ping"], json!({}));
        } else {
            assert_eq!(reply["error"]["code"], 113, "{reply}");
        }
        next += 1;
    }
    if next <= count {
        assert_eq!(close_code, Some(1013), "after {} replies", next - 1);
    } else {
        c.ok("ping", json!({})).await;
    }
    assert!(next > 100, "the first 100 commands were answered");
    let (mut other, _) = Client::connect(&server, None).await;
    other.ok("ping", json!({})).await;
}

/// Error messages name the field and what it must be, never the JSON
/// parser's internals ("expected usize at line 1 column 26").
#[tokio::test]
async fn error_messages_name_the_field_not_the_parser() {
    let server = start(config()).await;
    let (mut c, _) = Client::connect(&server, None).await;
    c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
    let cases = [
        (
            json!({"channel": "chat:lobby", "limit": "50"}),
            "history",
            r#"history: "limit" must be a non-negative integer"#,
        ),
        (
            json!({"channel": "chat:lobby", "since": {"offset": -1, "epoch": "e"}}),
            "history",
            r#"history: "since.offset" must be a non-negative integer"#,
        ),
        (
            json!({"channel": "chat:lobby", "reverse": "yes"}),
            "history",
            r#"history: "reverse" must be true or false"#,
        ),
        (
            json!({"channel": ["chat:lobby"]}),
            "subscribe",
            r#"subscribe: "channel" must be a string"#,
        ),
        (
            json!({"channel": "chat:lobby", "text": "hi"}),
            "publish",
            r#"publish: unknown field "text"; fields: channel, data"#,
        ),
        (
            json!({"data": "hi"}),
            "publish",
            r#"publish: "channel" is required (a string)"#,
        ),
        (
            json!({"token": 42}),
            "refresh",
            r#"refresh: "token" must be a string"#,
        ),
    ];
    for (body, command, expected) in cases {
        let reply = c.call(command, body.clone()).await;
        assert_eq!(reply["error"]["code"], 101, "{reply}");
        assert_eq!(reply["error"]["message"], expected, "{command} {body}");
    }
    c.send_raw(r#"{"id":50,"history":{"channel":"chat:lobby","limit":5}"#)
        .await;
    let reply = c.next_message().await.unwrap();
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("the JSON ends too early (at column 53): a command is one JSON object"),
        "{message}"
    );
    c.ok("ping", json!({})).await;
}

/// `history` with `limit` and no `since`: the latest `limit` publications,
/// oldest first (with `reverse`: newest first).
#[tokio::test]
async fn history_with_a_limit_and_no_since_returns_the_latest() {
    let server = start(config()).await;
    let (mut c, _) = Client::connect(&server, None).await;
    c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
    let mut epoch = String::new();
    for i in 1..=5 {
        let ack = c
            .ok("publish", json!({"channel": "chat:lobby", "data": i}))
            .await;
        epoch = ack["epoch"].as_str().unwrap().into();
    }
    let offsets = |h: &serde_json::Value| -> Vec<u64> {
        h["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect()
    };
    let history = |body: serde_json::Value| {
        let mut body = body;
        body["channel"] = json!("chat:lobby");
        body
    };
    let h = c.ok("history", history(json!({"limit": 2}))).await;
    assert_eq!(offsets(&h), [4, 5]);
    assert_eq!(h["publications"][1]["data"], 5);
    let h = c
        .ok("history", history(json!({"limit": 2, "reverse": true})))
        .await;
    assert_eq!(offsets(&h), [5, 4]);
    let h = c.ok("history", history(json!({"limit": 0}))).await;
    assert_eq!(offsets(&h), [] as [u64; 0]);
    assert_eq!(h["offset"], 5);
    // With `since`, `limit` counts from the position on (paging forward).
    let since = json!({"offset": 1, "epoch": epoch});
    let h = c
        .ok("history", history(json!({"limit": 2, "since": since})))
        .await;
    assert_eq!(offsets(&h), [2, 3]);
    // The HTTP API reads the same way.
    let (status, h) = api(
        &server,
        "history",
        json!({"channel": "chat:lobby", "limit": 3}),
    )
    .await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(offsets(&h), [3, 4, 5]);
}

/// The README's browser example, as a newcomer pastes it: connect,
/// subscribe and publish sent at once, with the embedded defaults. The
/// publish works (commands run in order, so the subscribe is done first);
/// a publish to a channel the client did not subscribe to says what to do.
#[tokio::test]
async fn the_readme_example_publishes_with_the_embedded_defaults() {
    let server = start(tidewire_hub::Config::default()).await;
    let mut c = Client::open(&server).await;
    for command in [
        json!({ "id": 1, "connect": {} }),
        json!({ "id": 2, "subscribe": { "channel": "chat:lobby" } }),
        json!({ "id": 3, "publish": { "channel": "chat:lobby", "data": { "text": "hi" } } }),
    ] {
        c.send_raw(&command.to_string()).await;
    }
    assert!(c.reply_to(1).await.get("connect").is_some());
    assert!(c.reply_to(2).await.get("subscribe").is_some());
    let ack = c.reply_to(3).await;
    assert_eq!(ack["publish"]["offset"], 1, "{ack}");
    let p = c.publication("chat:lobby").await;
    assert_eq!(p["data"], json!({"text": "hi"}));

    let reply = c
        .call("publish", json!({"channel": "chat:elsewhere", "data": 1}))
        .await;
    assert_eq!(reply["error"]["code"], 107);
    assert_eq!(
        reply["error"]["message"],
        "subscribe to \"chat:elsewhere\" before publishing to it: its namespace has \
         publish = \"subscribers\" (publish = \"clients\" lets any connected client publish)"
    );
}

#[tokio::test]
async fn a_message_over_the_size_limit_closes_with_1009() {
    let mut cfg = config();
    cfg.client.max_message_size = 1024;
    let server = start(cfg).await;
    let (mut c, _) = Client::connect(&server, None).await;
    let big = format!(
        r#"{{"id":1,"publish":{{"channel":"a","data":"{}"}}}}"#,
        "x".repeat(2000)
    );
    c.send_raw(&big).await;
    assert_eq!(c.closed().await, Some(1009));
}

#[tokio::test]
async fn publications_reach_every_subscriber_once_with_offsets() {
    let server = start(config()).await;
    let (mut a, _) = Client::connect(&server, Some(&token("ann", 600, &[]))).await;
    let (mut b, _) = Client::connect(&server, None).await;
    let sub = a.ok("subscribe", json!({"channel": "chat:lobby"})).await;
    assert_eq!(sub["recoverable"], true);
    // Before the first publication: offset 0 of a real epoch, the one of
    // the publications that follow.
    let (offset, epoch) = position(&sub);
    assert_eq!((offset, epoch.len()), (0, 12));
    let sub = b.ok("subscribe", json!({"channel": "chat:lobby"})).await;
    assert_eq!(position(&sub), (0, epoch.clone()));
    let ack = a
        .ok(
            "publish",
            json!({"channel": "chat:lobby", "data": {"text": "hi"}}),
        )
        .await;
    assert_eq!(
        (ack["offset"].clone(), ack["epoch"].clone()),
        (json!(1), json!(epoch))
    );
    for client in [&mut a, &mut b] {
        let p = client.publication("chat:lobby").await;
        assert_eq!(p["data"], json!({"text": "hi"}));
        assert_eq!(p["offset"], 1);
        assert_eq!(p["info"]["user"], "ann");
        assert_eq!(p["info"]["info"], json!({"name": "user ann"}));
    }
    let ack = b
        .ok(
            "publish",
            json!({"channel": "chat:lobby", "data": [1, 2, 3]}),
        )
        .await;
    assert_eq!(
        (ack["offset"].clone(), ack["epoch"].clone()),
        (json!(2), json!(epoch))
    );
    assert_eq!(a.publication("chat:lobby").await["data"], json!([1, 2, 3]));
    // Unsubscribed: nothing more arrives.
    b.publication("chat:lobby").await;
    b.ok("unsubscribe", json!({"channel": "chat:lobby"})).await;
    a.ok("publish", json!({"channel": "chat:lobby", "data": 3}))
        .await;
    assert_eq!(a.publication("chat:lobby").await["offset"], 3);
    b.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn order_per_channel_holds_for_every_subscriber_with_concurrent_publishers() {
    let server = start(config()).await;
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let (mut c, _) = Client::connect(&server, None).await;
        c.ok("subscribe", json!({"channel": "race"})).await;
        subscribers.push(c);
    }
    let mut publishers = Vec::new();
    for p in 0..3 {
        let url = server.url();
        let _ = url;
        let (mut c, _) = Client::connect(&server, None).await;
        c.ok("subscribe", json!({"channel": "race"})).await;
        publishers.push(tokio::spawn(async move {
            for i in 0..50 {
                c.ok(
                    "publish",
                    json!({"channel": "race", "data": {"p": p, "i": i}}),
                )
                .await;
            }
            c
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let mut sequences = Vec::new();
    for c in &mut subscribers {
        let mut offsets = Vec::new();
        let mut data = Vec::new();
        for _ in 0..150 {
            let p = c.publication("race").await;
            offsets.push(p["offset"].as_u64().unwrap());
            data.push(p["data"].clone());
        }
        assert_eq!(offsets, (1..=150).collect::<Vec<u64>>());
        sequences.push(data);
    }
    assert!(sequences.windows(2).all(|w| w[0] == w[1]));
}

#[tokio::test]
async fn join_leave_presence_and_presence_stats() {
    let server = start(config()).await;
    let (mut a, ra) = Client::connect(&server, Some(&token("ann", 600, &[]))).await;
    let (mut b, rb) = Client::connect(&server, Some(&token("bob", 600, &[]))).await;
    a.ok("subscribe", json!({"channel": "room"})).await;
    // The subscriber's own join: the first of a quiet channel goes out at once.
    let diff = a.presence_diff("room").await;
    assert_eq!(diff["joined"], 1);
    assert_eq!(diff["left"], 0);
    assert_eq!(diff["joins"][0]["client"], ra["client"]);
    assert_eq!(diff["leaves"], json!([]));
    b.ok("subscribe", json!({"channel": "room"})).await;
    let diff = a.presence_diff("room").await;
    assert_eq!(diff["joined"], 1);
    let join = &diff["joins"][0];
    assert_eq!(join["user"], "bob");
    assert_eq!(join["client"], rb["client"]);
    assert_eq!(join["info"], json!({"name": "user bob"}));
    let presence = a.ok("presence", json!({"channel": "room"})).await;
    let mut users: Vec<String> = presence["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["user"].as_str().unwrap().to_string())
        .collect();
    users.sort();
    assert_eq!(users, ["ann", "bob"]);
    let stats = a.ok("presence_stats", json!({"channel": "room"})).await;
    assert_eq!(stats, json!({"clients": 2, "users": 2}));
    b.ok("unsubscribe", json!({"channel": "room"})).await;
    let diff = a.presence_diff("room").await;
    assert_eq!(
        (diff["joined"].as_u64(), diff["left"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(diff["leaves"][0]["user"], "bob");
    let stats = a.ok("presence_stats", json!({"channel": "room"})).await;
    assert_eq!(stats, json!({"clients": 1, "users": 1}));
    // A client that goes away leaves too (a join and leave within one
    // interval may cancel out: wait for bob's join first).
    b.ok("subscribe", json!({"channel": "room"})).await;
    assert_eq!(a.presence_diff("room").await["joins"][0]["user"], "bob");
    b.close().await;
    let diff = a.presence_diff("room").await;
    assert_eq!(diff["leaves"][0]["user"], "bob");
    // Presence and history need a subscription.
    let (mut c, _) = Client::connect(&server, None).await;
    assert_eq!(
        c.error_code("presence", json!({"channel": "room"})).await,
        107
    );
    assert_eq!(
        c.error_code("history", json!({"channel": "room"})).await,
        107
    );
}

#[tokio::test]
async fn joins_within_an_interval_arrive_as_one_presence_diff() {
    let mut cfg = config();
    cfg.channels.join_leave_interval = Duration::from_secs(1);
    let server = start(cfg).await;
    let (mut watcher, rw) = Client::connect(&server, None).await;
    let mut others = Vec::new();
    for _ in 0..5 {
        others.push(Client::connect(&server, None).await);
    }
    watcher.ok("subscribe", json!({"channel": "room"})).await;
    let own = watcher.presence_diff("room").await;
    assert_eq!(own["joins"][0]["client"], rw["client"]);
    // Five joins right after: one push when the interval ends, not five.
    for (c, _) in &mut others {
        c.send_raw(r#"{"id":900,"subscribe":{"channel":"room"}}"#)
            .await;
    }
    for (c, _) in &mut others {
        let reply = c.reply_to(900).await;
        assert!(reply.get("subscribe").is_some(), "{reply}");
    }
    let diff = watcher.presence_diff("room").await;
    assert_eq!(diff["joined"], 5, "{diff}");
    let mut joined: Vec<&str> = diff["joins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["client"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = others
        .iter()
        .map(|(_, r)| r["client"].as_str().unwrap())
        .collect();
    joined.sort_unstable();
    expected.sort_unstable();
    assert_eq!(joined, expected);
}

#[tokio::test]
async fn a_newcomers_join_arrives_before_its_first_publication() {
    let mut cfg = config();
    cfg.channels.join_leave_interval = Duration::from_secs(5);
    let server = start(cfg).await;
    let (mut watcher, _) = Client::connect(&server, None).await;
    watcher.ok("subscribe", json!({"channel": "room"})).await;
    watcher.presence_diff("room").await;
    let (mut newcomer, rn) = Client::connect(&server, None).await;
    newcomer.ok("subscribe", json!({"channel": "room"})).await;
    newcomer
        .ok("publish", json!({"channel": "room", "data": "hello"}))
        .await;
    // Long before the interval ends: the publication brings the join along.
    let first = tokio::time::timeout(Duration::from_secs(3), watcher.push())
        .await
        .expect("the join and publication did not wait for the interval");
    assert_eq!(
        first["presence_diff"]["joins"][0]["client"], rn["client"],
        "{first}"
    );
    assert_eq!(watcher.publication("room").await["data"], "hello");
}

#[tokio::test]
async fn above_join_leave_max_members_presence_diffs_carry_counts_only() {
    let mut cfg = config();
    cfg.channels.join_leave_max_members = 3;
    cfg.channels.join_leave_interval = Duration::ZERO;
    let server = start(cfg).await;
    let (mut watcher, _) = Client::connect(&server, None).await;
    watcher.ok("subscribe", json!({"channel": "room"})).await;
    assert_eq!(watcher.presence_diff("room").await["joined"], 1);
    let mut others = Vec::new();
    for n in 2..=4 {
        let (mut c, r) = Client::connect(&server, None).await;
        c.ok("subscribe", json!({"channel": "room"})).await;
        let diff = watcher.presence_diff("room").await;
        assert_eq!(diff["joined"], 1, "{diff}");
        if n <= 3 {
            assert_eq!(diff["joins"][0]["client"], r["client"], "{diff}");
        } else {
            assert!(diff.get("joins").is_none(), "{diff}");
            assert!(diff.get("leaves").is_none(), "{diff}");
        }
        others.push(c);
    }
    // Presence still lists everyone.
    let presence = watcher.ok("presence", json!({"channel": "room"})).await;
    assert_eq!(presence["clients"].as_array().unwrap().len(), 4);
    // Back at the limit: leaves are listed again.
    let gone = others.pop().unwrap();
    gone.close().await;
    let diff = watcher.presence_diff("room").await;
    assert_eq!(diff["left"], 1, "{diff}");
    assert_eq!(diff["leaves"].as_array().unwrap().len(), 1, "{diff}");
}

#[tokio::test]
async fn a_batch_stops_at_the_reply_that_overflows_the_queue() {
    let mut cfg = config();
    cfg.client.queue_messages = 4;
    let server = start(cfg).await;
    let (mut c, _) = Client::connect(&server, None).await;
    c.ok("subscribe", json!({"channel": "feed"})).await;
    // Ten replies for a queue of four (nothing is written while the batch
    // runs), then a publish: the connection closes at the fifth reply and
    // the publish never happens.
    let mut batch: Vec<String> = (1..=10)
        .map(|id| format!(r#"{{"id":{id},"ping":{{}}}}"#))
        .collect();
    batch.push(r#"{"id":11,"publish":{"channel":"feed","data":"after"}}"#.into());
    c.send_raw(&batch.join("\n")).await;
    if common::on_event_loop() {
        // The event loop writes replies while the batch runs (its worker
        // is not the session's task), so the queue may never fill: the
        // replies come in order, until the one that overflowed, if any.
        let mut replies = Vec::new();
        let closed = loop {
            match c.next_message().await {
                // Its own publication, as a subscriber of the channel.
                Some(push) if push.get("push").is_some() => {}
                Some(reply) => {
                    replies.push(reply["id"].as_u64().expect("a reply"));
                    if replies.last() == Some(&11) {
                        break false;
                    }
                }
                None => break true,
            }
        };
        assert_eq!(replies, (1..=replies.len() as u64).collect::<Vec<_>>());
        let (_, history) = api(&server, "history", json!({"channel": "feed"})).await;
        let published = history["publications"].as_array().unwrap().len();
        // A reply that overflowed stops the batch: the publish ran only if
        // every ping's reply was queued (its own reply or push may be the
        // one that overflowed).
        match (closed, replies.len()) {
            (false, _) => assert_eq!(published, 1, "{history}"),
            (true, n) if n < 10 => assert_eq!(published, 0, "{replies:?} {history}"),
            (true, _) => assert!(published <= 1, "{history}"),
        }
        return;
    }
    // 1013: try again later (the slow-consumer close).
    assert_eq!(c.closed().await, Some(1013));
    let (status, history) = api(&server, "history", json!({"channel": "feed"})).await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["publications"], json!([]), "{history}");
}

#[tokio::test]
async fn history_latest_since_and_reverse() {
    let server = start(config()).await;
    let (mut c, _) = Client::connect(&server, None).await;
    c.ok("subscribe", json!({"channel": "feed"})).await;
    let mut epoch = String::new();
    for i in 1..=5 {
        let ack = c.ok("publish", json!({"channel": "feed", "data": i})).await;
        epoch = ack["epoch"].as_str().unwrap().into();
    }
    let offsets = |h: &serde_json::Value| -> Vec<u64> {
        h["publications"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect()
    };
    let h = c.ok("history", json!({"channel": "feed"})).await;
    assert_eq!(offsets(&h), [1, 2, 3, 4, 5]);
    assert_eq!(
        (h["offset"].clone(), h["epoch"].clone()),
        (json!(5), json!(epoch))
    );
    assert_eq!(h["publications"][0]["data"], 1);
    let h = c
        .ok(
            "history",
            json!({"channel": "feed", "limit": 2, "reverse": true}),
        )
        .await;
    assert_eq!(offsets(&h), [5, 4]);
    let h = c
        .ok(
            "history",
            json!({"channel": "feed", "since": {"offset": 3, "epoch": epoch}}),
        )
        .await;
    assert_eq!(offsets(&h), [4, 5]);
    let h = c
        .ok(
            "history",
            json!({"channel": "feed", "limit": 2, "since": {"offset": 3, "epoch": epoch}, "reverse": true}),
        )
        .await;
    assert_eq!(offsets(&h), [2, 1]);
    let stale = json!({"channel": "feed", "since": {"offset": 3, "epoch": "another"}});
    assert_eq!(c.error_code("history", stale).await, 115);
}

/// Reads a subscribe reply's position.
fn position(reply: &serde_json::Value) -> (u64, String) {
    (
        reply["offset"].as_u64().unwrap(),
        reply["epoch"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn recovery_after_a_reconnect_returns_exactly_the_missed_publications_in_order() {
    let server = start(config()).await;
    let (mut c, _) = Client::connect(&server, None).await;
    let sub = c.ok("subscribe", json!({"channel": "chat:lobby"})).await;
    let mut last = position(&sub);
    for i in 1..=2 {
        api(
            &server,
            "publish",
            json!({"channel": "chat:lobby", "data": {"n": i}}),
        )
        .await;
    }
    for _ in 1..=2 {
        let p = c.publication("chat:lobby").await;
        last.0 = p["offset"].as_u64().unwrap();
    }
    assert_eq!(last.0, 2);
    c.close().await;
    // Missed while away.
    for i in 3..=5 {
        let (status, _) = api(
            &server,
            "publish",
            json!({"channel": "chat:lobby", "data": {"n": i}}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (mut c, _) = Client::connect(&server, None).await;
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "chat:lobby", "recover": true, "offset": last.0, "epoch": last.1}),
        )
        .await;
    assert_eq!(reply["recovered"], true);
    let recovered: Vec<(u64, serde_json::Value)> = reply["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["offset"].as_u64().unwrap(), p["data"]["n"].clone()))
        .collect();
    assert_eq!(
        recovered,
        [(3, json!(3)), (4, json!(4)), (5, json!(5))],
        "exactly the missed publications, in order"
    );
    assert_eq!(position(&reply), (5, last.1.clone()));
    // Then live, with nothing repeated.
    api(
        &server,
        "publish",
        json!({"channel": "chat:lobby", "data": {"n": 6}}),
    )
    .await;
    assert_eq!(c.publication("chat:lobby").await["offset"], 6);
    // Nothing missed: recovered with no publications.
    let (mut d, _) = Client::connect(&server, None).await;
    let reply = d
        .ok(
            "subscribe",
            json!({"channel": "chat:lobby", "recover": true, "offset": 6, "epoch": last.1}),
        )
        .await;
    assert_eq!(reply["recovered"], true);
    assert!(reply.get("publications").is_none());
}

/// Publishes `{"n": i}` for each `i` through the HTTP API.
async fn publish_numbered(server: &TestServer, channel: &str, ns: std::ops::RangeInclusive<u64>) {
    for n in ns {
        let (status, _) = api(
            server,
            "publish",
            json!({"channel": channel, "data": {"n": n}}),
        )
        .await;
        assert_eq!(status, 200);
    }
}

/// The offsets and `n`s of a subscribe reply's recovered publications.
fn recovered(reply: &serde_json::Value) -> Vec<(u64, u64)> {
    reply["publications"]
        .as_array()
        .map(|pubs| {
            pubs.iter()
                .map(|p| {
                    (
                        p["offset"].as_u64().unwrap(),
                        p["data"]["n"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn subscribed_before_the_first_publication_the_position_recovers_when_up_to_date() {
    let server = start(config()).await;
    let (mut c, _) = Client::connect(&server, None).await;
    let sub = c.ok("subscribe", json!({"channel": "fresh:a"})).await;
    let (offset, epoch) = position(&sub);
    assert_eq!((offset, epoch.len()), (0, 12), "offset 0 of a real epoch");
    publish_numbered(&server, "fresh:a", 1..=3).await;
    for n in 1..=3 {
        let p = c.publication("fresh:a").await;
        assert_eq!(
            (p["offset"].as_u64(), p["data"]["n"].as_u64()),
            (Some(n), Some(n))
        );
    }
    c.close().await;
    let (mut c, _) = Client::connect(&server, None).await;
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "fresh:a", "recover": true, "offset": 3, "epoch": epoch}),
        )
        .await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(recovered(&reply), [], "nothing was missed");
    assert_eq!(position(&reply), (3, epoch));
}

#[tokio::test]
async fn subscribed_before_the_first_publication_offset_0_recovers_everything_missed() {
    let server = start(config()).await;
    let (mut c, _) = Client::connect(&server, None).await;
    let (_, epoch) = position(&c.ok("subscribe", json!({"channel": "fresh:b"})).await);
    c.close().await;
    // Once the subscriber left, its stream is kept (the namespace's TTL).
    eventually("the subscriber gone", || server.hub.counts().channels == 0).await;
    assert_eq!(server.hub.engine_stats().streams, 1);
    publish_numbered(&server, "fresh:b", 1..=2).await;
    let (mut c, _) = Client::connect(&server, None).await;
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "fresh:b", "recover": true, "offset": 0, "epoch": epoch}),
        )
        .await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(
        recovered(&reply),
        [(1, 1), (2, 2)],
        "exactly what was missed, in order"
    );
    assert_eq!(position(&reply), (2, epoch));
    publish_numbered(&server, "fresh:b", 3..=3).await;
    assert_eq!(c.publication("fresh:b").await["offset"], 3);
}

#[tokio::test]
async fn a_position_from_before_a_restart_or_without_epoch_never_recovers() {
    let server = start(config()).await;
    let (mut c, _) = Client::connect(&server, None).await;
    let (_, epoch) = position(&c.ok("subscribe", json!({"channel": "fresh:c"})).await);
    let (_, epoch_d) = position(&c.ok("subscribe", json!({"channel": "fresh:d"})).await);
    c.close().await;
    // The server restarts: a new hub with a new in-memory engine, which
    // has publications the client never saw.
    server.shutdown.cancel();
    let restarted = start(config()).await;
    publish_numbered(&restarted, "fresh:c", 1..=2).await;
    let (mut c, _) = Client::connect(&restarted, None).await;
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "fresh:c", "recover": true, "offset": 0, "epoch": epoch}),
        )
        .await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(recovered(&reply), []);
    let (offset, new_epoch) = position(&reply);
    assert_eq!(offset, 2);
    assert_ne!(new_epoch, epoch);
    // Nothing published since the restart: another stream all the same.
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "fresh:d", "recover": true, "offset": 0, "epoch": epoch_d}),
        )
        .await;
    assert_eq!(reply["recovered"], false);
    let (offset, new_epoch) = position(&reply);
    assert_eq!(offset, 0);
    assert_ne!(new_epoch, epoch_d);
    // An empty epoch names no stream: never recovered, even from offset 0.
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "fresh:e", "recover": true, "offset": 0, "epoch": ""}),
        )
        .await;
    assert_eq!(reply["recovered"], false);
    assert_ne!(position(&reply).1, "");
}

#[tokio::test]
async fn recovery_fails_with_another_epoch_or_a_gap_in_history() {
    let mut cfg = config();
    cfg.namespaces.insert(
        "short".into(),
        ChannelOptions {
            history_size: 3,
            ..ChannelOptions::default()
        },
    );
    let server = start(cfg).await;
    let mut epoch = String::new();
    for i in 1..=10 {
        let (_, ack) = api(&server, "publish", json!({"channel": "short:a", "data": i})).await;
        epoch = ack["epoch"].as_str().unwrap().into();
    }
    let (mut c, _) = Client::connect(&server, None).await;
    // Offsets 3..=7 are gone (history of 3 keeps 8, 9, 10).
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "short:a", "recover": true, "offset": 2, "epoch": epoch}),
        )
        .await;
    assert_eq!(reply["recovered"], false);
    assert!(reply.get("publications").is_none());
    assert_eq!(position(&reply), (10, epoch.clone()));
    c.ok("unsubscribe", json!({"channel": "short:a"})).await;
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "short:a", "recover": true, "offset": 9, "epoch": "not-this-one"}),
        )
        .await;
    assert_eq!(reply["recovered"], false);
    c.ok("unsubscribe", json!({"channel": "short:a"})).await;
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "short:a", "recover": true, "offset": 7, "epoch": epoch}),
        )
        .await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(reply["publications"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn recovery_while_publishing_has_no_gap_and_no_repeat() {
    let server = start(config()).await;
    let (_, ack) = api(&server, "publish", json!({"channel": "busy", "data": 0})).await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    let publisher = {
        let (mut p, _) = Client::connect(&server, None).await;
        p.ok("subscribe", json!({"channel": "busy"})).await;
        tokio::spawn(async move {
            for i in 1..=200 {
                p.ok("publish", json!({"channel": "busy", "data": i})).await;
            }
        })
    };
    let mut seen = Vec::new();
    let (mut c, _) = Client::connect(&server, None).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "busy", "recover": true, "offset": 1, "epoch": epoch}),
        )
        .await;
    assert_eq!(reply["recovered"], true);
    if let Some(pubs) = reply["publications"].as_array() {
        seen.extend(pubs.iter().map(|p| p["offset"].as_u64().unwrap()));
    }
    let top = reply["offset"].as_u64().unwrap();
    assert_eq!(seen.last().copied().unwrap_or(1), top);
    publisher.await.unwrap();
    while seen.last().copied().unwrap_or(1) < 201 {
        seen.push(c.publication("busy").await["offset"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (2..=201).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn without_history_publications_have_no_offset_and_recovery_is_off() {
    let mut cfg = config();
    cfg.namespaces.insert(
        "live".into(),
        ChannelOptions {
            history_size: 0,
            ..ChannelOptions::default()
        },
    );
    let server = start(cfg).await;
    let (mut c, _) = Client::connect(&server, None).await;
    let reply = c
        .ok(
            "subscribe",
            json!({"channel": "live:x", "recover": true, "offset": 1, "epoch": "e"}),
        )
        .await;
    assert_eq!(reply, json!({"recoverable": false}));
    let ack = c
        .ok("publish", json!({"channel": "live:x", "data": 1}))
        .await;
    assert_eq!(ack, json!({}));
    let p = c.publication("live:x").await;
    assert!(p.get("offset").is_none());
    assert_eq!(
        c.error_code("history", json!({"channel": "live:x"})).await,
        112
    );
}

#[tokio::test]
async fn ten_thousand_subscribe_unsubscribe_cycles_leave_nothing_behind() {
    // Every subscribe starts its channel's stream, forgotten the history
    // TTL after the last unsubscribe: a short one, to see them all go.
    let mut cfg = config();
    for ns in ["churn", "fresh"] {
        cfg.namespaces.insert(
            ns.into(),
            ChannelOptions {
                history_ttl: Duration::from_secs(1),
                ..ChannelOptions::default()
            },
        );
    }
    let server = start(cfg).await;
    let mut clients = Vec::new();
    for user in 0..10 {
        let t = token(&format!("churn-{user}"), 600, &[]);
        clients.push(Client::connect(&server, Some(&t)).await.0);
    }
    // 10 clients × 1,000 cycles, over 500 channel names, batched.
    let mut handles = Vec::new();
    for (n, mut c) in clients.into_iter().enumerate() {
        handles.push(tokio::spawn(async move {
            let mut id = 1000;
            for round in 0..10 {
                let mut batch = String::new();
                for i in 0..50 {
                    let channel = format!("churn:{}", (n * 7 + round * 50 + i) % 500);
                    id += 1;
                    batch.push_str(&format!(
                        "{{\"id\":{id},\"subscribe\":{{\"channel\":\"{channel}\"}}}}\n"
                    ));
                    id += 1;
                    batch.push_str(&format!(
                        "{{\"id\":{id},\"unsubscribe\":{{\"channel\":\"{channel}\"}}}}\n"
                    ));
                }
                c.send_raw(&batch).await;
                c.reply_to(id).await;
            }
            // The batch above was 100 commands at most: the default batch limit.
            c
        }));
    }
    let mut clients = Vec::new();
    for h in handles {
        clients.push(h.await.unwrap());
    }
    // 10 × 10 × 50 = 5,000 cycles so far; 5,000 more from fresh sessions.
    for n in 0..50 {
        let t = token(&format!("fresh-{n}"), 600, &[]);
        let (mut c, _) = Client::connect(&server, Some(&t)).await;
        let mut batch = String::new();
        for i in 0..50 {
            batch.push_str(&format!(
                "{{\"id\":{},\"subscribe\":{{\"channel\":\"fresh:{n}:{i}\"}}}}\n",
                2 * i + 1
            ));
            batch.push_str(&format!(
                "{{\"id\":{},\"unsubscribe\":{{\"channel\":\"fresh:{n}:{i}\"}}}}\n",
                2 * i + 2
            ));
        }
        c.send_raw(&batch).await;
        c.reply_to(100).await;
        // Half of them leave while still subscribed: disconnect cleans up.
        for i in 0..50 {
            c.ok("subscribe", json!({"channel": format!("fresh:{n}:x{i}")}))
                .await;
            if n % 2 == 0 {
                c.ok("unsubscribe", json!({"channel": format!("fresh:{n}:x{i}")}))
                    .await;
            }
        }
        c.close().await;
    }
    let hub = server.hub.clone();
    eventually("no channel left", || {
        let c = hub.counts();
        c.channels == 0 && c.subscriptions == 0 && c.presence_channels == 0 && c.sessions == 10
    })
    .await;
    for c in clients {
        c.close().await;
    }
    // The streams go last, a second after their last unsubscribe.
    eventually("every entry gone", || {
        let c = hub.counts();
        c == tidewire_hub::HubCounts::default()
    })
    .await;
    assert_eq!(server.hub.engine_stats(), Default::default());
}

#[tokio::test]
async fn permission_rules_of_namespaces() {
    let mut cfg = config();
    cfg.namespaces.insert(
        "news".into(),
        ChannelOptions {
            publish: PublishRule::Server,
            ..ChannelOptions::default()
        },
    );
    cfg.namespaces.insert(
        "open".into(),
        ChannelOptions {
            publish: PublishRule::Clients,
            presence: false,
            ..ChannelOptions::default()
        },
    );
    cfg.namespaces.insert(
        "members".into(),
        ChannelOptions {
            subscribe: tidewire_hub::config::SubscribeRule::Authenticated,
            ..ChannelOptions::default()
        },
    );
    cfg.namespaces.insert(
        "private".into(),
        ChannelOptions {
            subscribe: tidewire_hub::config::SubscribeRule::Token,
            ..ChannelOptions::default()
        },
    );
    cfg.unknown_namespaces = tidewire_hub::config::UnknownNamespaces::Reject;
    cfg.client.max_subscriptions = 3;
    let server = start(cfg).await;
    let (mut anon, _) = Client::connect(&server, None).await;

    // A forbidden publish gets 107 and the connection survives.
    anon.ok("subscribe", json!({"channel": "news:eu"})).await;
    let forbidden = json!({"channel": "news:eu", "data": "x"});
    assert_eq!(anon.error_code("publish", forbidden).await, 107);
    anon.ok("ping", json!({})).await;
    let (status, _) = api(
        &server,
        "publish",
        json!({"channel": "news:eu", "data": "ok"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(anon.publication("news:eu").await["data"], "ok");

    // Subscribers rule: subscribe first.
    let (mut other, _) = Client::connect(&server, None).await;
    assert_eq!(
        other
            .error_code("publish", json!({"channel": "lobby", "data": 1}))
            .await,
        107
    );
    // Clients rule: any connected client.
    other
        .ok("publish", json!({"channel": "open:x", "data": 1}))
        .await;
    // Presence off.
    other.ok("subscribe", json!({"channel": "open:x"})).await;
    assert_eq!(
        other
            .error_code("presence", json!({"channel": "open:x"}))
            .await,
        112
    );

    // Authenticated rule.
    assert_eq!(
        anon.error_code("subscribe", json!({"channel": "members:a"}))
            .await,
        107
    );
    let (mut ann, _) = Client::connect(
        &server,
        Some(&token("ann", 600, &["private:ann-*", "private:team:*"])),
    )
    .await;
    ann.ok("subscribe", json!({"channel": "members:a"})).await;

    // Token rule: the channels claim (exact or ns:*), or a subscription token.
    assert_eq!(
        ann.error_code("subscribe", json!({"channel": "private:x"}))
            .await,
        107
    );
    let (mut bob, _) = Client::connect(&server, Some(&token("bob", 600, &["private:*"]))).await;
    bob.ok("subscribe", json!({"channel": "private:x"})).await;
    let sub = subscription_token("ann", "private:x", 600);
    ann.ok("subscribe", json!({"channel": "private:x", "token": sub}))
        .await;
    let wrong_channel = subscription_token("ann", "private:y", 600);
    assert_eq!(
        ann.error_code(
            "subscribe",
            json!({"channel": "private:z", "token": wrong_channel})
        )
        .await,
        107
    );
    let not_hers = subscription_token("bob", "private:y", 600);
    assert_eq!(
        ann.error_code(
            "subscribe",
            json!({"channel": "private:y", "token": not_hers})
        )
        .await,
        107
    );
    let expired = subscription_token("ann", "private:y", -5);
    assert_eq!(
        ann.error_code(
            "subscribe",
            json!({"channel": "private:y", "token": expired})
        )
        .await,
        106
    );
    // A connection token is not a subscription token.
    let conn_token = token("ann", 600, &[]);
    assert_eq!(
        ann.error_code(
            "subscribe",
            json!({"channel": "private:y", "token": conn_token})
        )
        .await,
        105
    );
    // Limit of subscriptions (3): members:a, private:x, and one more.
    ann.ok("subscribe", json!({"channel": "lobby2"})).await;
    assert_eq!(
        ann.error_code("subscribe", json!({"channel": "lobby3"}))
            .await,
        113
    );

    // Names and namespaces.
    assert_eq!(
        anon.error_code("subscribe", json!({"channel": "nope:a"}))
            .await,
        108
    );
    let long = "x".repeat(256);
    assert_eq!(
        anon.error_code("subscribe", json!({"channel": long})).await,
        109
    );
    assert_eq!(
        anon.error_code("subscribe", json!({"channel": "a b"}))
            .await,
        109
    );
    assert_eq!(
        anon.error_code("subscribe", json!({"channel": ""})).await,
        109
    );
    assert_eq!(
        anon.error_code("subscribe", json!({"channel": "news:eu"}))
            .await,
        110
    );
    assert_eq!(
        anon.error_code("unsubscribe", json!({"channel": "lobby"}))
            .await,
        111
    );
    anon.ok("ping", json!({})).await;
}

#[tokio::test]
async fn personal_channels_belong_to_their_users() {
    let server = start(config()).await;
    let (mut u42, _) = Client::connect(&server, Some(&token("42", 600, &[]))).await;
    let (mut u43, _) = Client::connect(&server, Some(&token("43", 600, &[]))).await;
    let (mut anon, _) = Client::connect(&server, None).await;
    u42.ok("subscribe", json!({"channel": "notify:#42"})).await;
    assert_eq!(
        u43.error_code("subscribe", json!({"channel": "notify:#42"}))
            .await,
        107
    );
    assert_eq!(
        anon.error_code("subscribe", json!({"channel": "notify:#42"}))
            .await,
        107
    );
    assert_eq!(
        anon.error_code("subscribe", json!({"channel": "notify:#"}))
            .await,
        107
    );
    // Shared by the users listed.
    u42.ok("subscribe", json!({"channel": "dm:#42,43"})).await;
    u43.ok("subscribe", json!({"channel": "dm:#42,43"})).await;
    api(
        &server,
        "publish",
        json!({"channel": "notify:#42", "data": {"note": "hi"}}),
    )
    .await;
    assert_eq!(u42.publication("notify:#42").await["data"]["note"], "hi");
}

#[tokio::test]
async fn the_connect_timeout_disconnects_silent_connections() {
    let mut cfg = config();
    cfg.client.connect_timeout = Duration::from_millis(300);
    let server = start(cfg).await;
    let mut c = Client::open(&server).await;
    assert_eq!(c.closed().await, Some(3002));
    let push = c.push().await;
    assert_eq!(push["disconnect"]["code"], 3002);
    assert_eq!(push["disconnect"]["reconnect"], true);
}

#[tokio::test]
async fn application_pings_are_pushed_at_the_announced_interval() {
    let mut cfg = config();
    cfg.client.ping_interval = Duration::from_secs(1);
    let server = start(cfg).await;
    let (mut c, reply) = Client::connect(&server, None).await;
    assert_eq!(reply["ping_interval"], 1);
    let ping = tokio::time::timeout(LIMIT, async {
        loop {
            if let Some(Ok(tidewire::Message::Text(t))) = c.ws.recv().await {
                return t.to_string();
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ping, r#"{"push":{"ping":{}}}"#);
}

#[tokio::test]
async fn plain_websocket_without_subprotocol_speaks_the_same_protocol() {
    let server = start(config()).await;
    let (mut ws, response) = tidewire::connect(&server.url()).await.unwrap();
    assert!(response.headers().get("sec-websocket-protocol").is_none());
    ws.send_text(r#"{"id":1,"connect":{}}"#).await.unwrap();
    let Some(Ok(tidewire::Message::Text(reply))) = ws.recv().await else {
        panic!("no reply")
    };
    let reply: serde_json::Value = serde_json::from_str(reply.as_str()).unwrap();
    assert_eq!(reply["id"], 1);
    assert!(reply["connect"]["client"].is_string());
}
