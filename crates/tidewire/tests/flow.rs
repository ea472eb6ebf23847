//! Flow control and lifetime on loopback: Sender handles, the slow-consumer
//! policies, keepalive, idle timeout, shutdown.

use std::time::Duration;

use tidewire::{
    accept_with, Accept, CloseCode, CloseFrame, Error, IoOptions, Message, QueueLimits, SendError,
    ServerConfig, SlowConsumer, WebSocket,
};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);

/// Accepts one connection with these I/O options.
async fn serve_one(io: IoOptions) -> (tokio::task::JoinHandle<WebSocket<TcpStream>>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let config = ServerConfig {
            io,
            ..ServerConfig::default()
        };
        accept_with(stream, config, |_| Ok(Accept::default()))
            .await
            .unwrap()
    });
    (task, url)
}

fn queue(policy: SlowConsumer) -> IoOptions {
    IoOptions {
        send_queue: QueueLimits {
            max_messages: 10_000,
            max_bytes: 256 << 10,
            policy,
        },
        close_timeout: Duration::from_secs(5),
        ..IoOptions::default()
    }
}

#[tokio::test]
async fn senders_from_other_tasks_keep_order() {
    let (server, url) = serve_one(IoOptions::default()).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let mut ws = server.await.unwrap();
    let sender = ws.sender();
    let producer = tokio::spawn(async move {
        for i in 0..500 {
            sender.send(Message::text(format!("{i}"))).await.unwrap();
        }
        sender.close(1000u16, "all sent").unwrap();
    });
    let driver = tokio::spawn(async move { while ws.recv().await.is_some() {} });
    for i in 0..500 {
        assert_eq!(
            client.recv().await.unwrap().unwrap(),
            Message::text(format!("{i}"))
        );
    }
    assert_eq!(
        client.recv().await.unwrap().unwrap(),
        Message::Close(Some(CloseFrame::new(1000, "all sent")))
    );
    producer.await.unwrap();
    tokio::time::timeout(LIMIT, driver).await.unwrap().unwrap();
}

#[tokio::test]
async fn deferred_sends_wait_for_a_wake_and_go_out_in_one_batch() {
    let (server, url) = serve_one(IoOptions::default()).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let mut ws = server.await.unwrap();
    let sender = ws.sender();
    let driver = tokio::spawn(async move { while ws.recv().await.is_some() {} });
    // Let the driver wait for input.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..10 {
        sender
            .try_send_deferred(Message::text(format!("{i}")))
            .unwrap();
    }
    // Queued, not written: the driver was not woken.
    let early = tokio::time::timeout(Duration::from_millis(100), client.recv()).await;
    assert!(early.is_err(), "a deferred message went out without a wake");
    assert_eq!(sender.queued_messages(), 10);
    sender.wake();
    for i in 0..10 {
        assert_eq!(
            client.recv().await.unwrap().unwrap(),
            Message::text(format!("{i}"))
        );
    }
    sender.close(1000u16, "done").unwrap();
    let _ = client.recv().await;
    tokio::time::timeout(LIMIT, driver).await.unwrap().unwrap();
}

/// A client that completes the handshake and then does not read.
async fn stalled_client(url: &str) -> TcpStream {
    let (ws, _) = tidewire::connect(url).await.unwrap();
    // Take the raw TCP stream back: nothing reads it any more.
    let tidewire::MaybeTlsStream::Plain(tcp) = into_tcp(ws) else {
        panic!("plain")
    };
    tcp
}

fn into_tcp(ws: WebSocket<tidewire::ClientStream>) -> tidewire::ClientStream {
    ws.into_inner()
}

#[tokio::test]
async fn slow_reader_with_wait_policy_blocks_the_sender_and_bounds_memory() {
    let (server, url) = serve_one(queue(SlowConsumer::Wait)).await;
    let _stalled = stalled_client(&url).await;
    let mut ws = server.await.unwrap();
    let sender = ws.sender();
    tokio::spawn(async move { while ws.recv().await.is_some() {} });
    let payload = "x".repeat(16 << 10);
    let mut sent = 0usize;
    let blocked = loop {
        match tokio::time::timeout(
            Duration::from_millis(500),
            sender.send(Message::text(payload.clone())),
        )
        .await
        {
            Ok(Ok(())) => sent += 1,
            Ok(Err(e)) => panic!("unexpected {e:?}"),
            Err(_) => break true,
        }
        assert!(sent < 100_000, "the sender never blocked");
    };
    assert!(blocked);
    // Queue plus encoded output stay within the limit plus one message and the write mark.
    assert!(
        sender.buffered_amount() <= (256 << 10) + (16 << 10) + 64 * 1024,
        "{}",
        sender.buffered_amount()
    );
    assert!(matches!(
        sender.try_send(Message::text(payload)),
        Err(SendError::Full(_))
    ));
}

#[tokio::test]
async fn slow_reader_with_drop_policy_drops_and_counts() {
    let (server, url) = serve_one(queue(SlowConsumer::Drop)).await;
    let _stalled = stalled_client(&url).await;
    let mut ws = server.await.unwrap();
    let sender = ws.sender();
    tokio::spawn(async move { while ws.recv().await.is_some() {} });
    let payload = "y".repeat(16 << 10);
    let mut dropped = 0;
    for _ in 0..5_000 {
        match sender.try_send(Message::text(payload.clone())) {
            Ok(()) => tokio::task::yield_now().await,
            Err(SendError::Dropped) => dropped += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(dropped > 0);
    assert_eq!(sender.dropped(), dropped);
    assert!(sender.buffered_amount() <= (256 << 10) + (16 << 10) + 64 * 1024);
    assert!(!sender.is_closed());
}

#[tokio::test]
async fn slow_reader_with_close_policy_is_closed_with_its_code() {
    let mut options = queue(SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER));
    options.close_timeout = Duration::from_secs(10);
    let (server, url) = serve_one(options).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let mut ws = server.await.unwrap();
    let sender = ws.sender();
    let driver = tokio::spawn(async move {
        let mut last = None;
        while let Some(msg) = ws.recv().await {
            last = Some(msg);
        }
        last
    });
    let payload = "z".repeat(16 << 10);
    let mut closed = false;
    for _ in 0..5_000 {
        match sender.try_send(Message::text(payload.clone())) {
            Ok(()) => {}
            Err(SendError::Closed) => {
                closed = true;
                break;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(closed, "the close policy never fired");
    assert!(sender.is_closed());
    // The client (which was not reading) now reads: data, then close 1013.
    let frame = tokio::time::timeout(LIMIT, async {
        loop {
            match client.recv().await.unwrap().unwrap() {
                Message::Close(frame) => return frame,
                _ => continue,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(frame, Some(CloseFrame::new(1013, "send queue full")));
    let last = tokio::time::timeout(LIMIT, driver).await.unwrap().unwrap();
    assert!(matches!(last, Some(Ok(Message::Close(_)))), "{last:?}");
}

#[tokio::test]
async fn keepalive_drops_a_peer_that_never_answers() {
    let options = IoOptions {
        ping_interval: Some(Duration::from_millis(100)),
        pong_timeout: Duration::from_millis(200),
        ..IoOptions::default()
    };
    let (server, url) = serve_one(options).await;
    let mut stalled = stalled_client(&url).await;
    let mut ws = server.await.unwrap();
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(LIMIT, ws.recv()).await.unwrap();
    assert!(
        matches!(outcome, Some(Err(Error::KeepaliveTimeout))),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // What the stalled peer got: a ping, then close 1011.
    let mut bytes = Vec::new();
    tokio::time::timeout(LIMIT, stalled.read_to_end(&mut bytes))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bytes[0], 0x89, "{bytes:?}");
    let close = bytes
        .iter()
        .position(|b| *b == 0x88)
        .expect("a close frame");
    assert_eq!(&bytes[close + 2..close + 4], &1011u16.to_be_bytes());
}

#[tokio::test]
async fn keepalive_keeps_a_responsive_idle_peer() {
    let options = IoOptions {
        ping_interval: Some(Duration::from_millis(50)),
        pong_timeout: Duration::from_millis(200),
        ..IoOptions::default()
    };
    let (server, url) = serve_one(options).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let mut ws = server.await.unwrap();
    let server_side = tokio::spawn(async move {
        let mut pongs = 0;
        while let Some(msg) = ws.recv().await {
            match msg {
                Ok(Message::Pong(_)) => pongs += 1,
                Ok(Message::Text(t)) if t == "stop" => return pongs,
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("connection ended");
    });
    // The client only answers pings (inside recv) for a second.
    let pings = tokio::time::timeout(Duration::from_secs(1), async {
        let mut pings = 0;
        while let Some(Ok(Message::Ping(_))) = client.recv().await {
            pings += 1;
        }
        pings
    })
    .await;
    assert!(pings.is_err(), "the connection ended early");
    client.send_text("stop").await.unwrap();
    let pongs = tokio::time::timeout(LIMIT, server_side)
        .await
        .unwrap()
        .unwrap();
    assert!(pongs >= 5, "only {pongs} pongs in a second");
}

#[tokio::test]
async fn idle_timeout_closes_with_1001() {
    let options = IoOptions {
        idle_timeout: Some(Duration::from_millis(200)),
        ..IoOptions::default()
    };
    let (server, url) = serve_one(options).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let mut ws = server.await.unwrap();
    let server_side = tokio::spawn(async move { while ws.recv().await.is_some() {} });
    let msg = tokio::time::timeout(LIMIT, client.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        msg,
        Message::Close(Some(CloseFrame::new(1001, "idle timeout")))
    );
    tokio::time::timeout(LIMIT, server_side)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_flushes_queued_messages_then_closes_with_1001() {
    let (server, url) = serve_one(IoOptions::default()).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let mut ws = server.await.unwrap();
    let token = CancellationToken::new();
    ws.set_shutdown(token.clone());
    let sender = ws.sender();
    for i in 0..100 {
        sender
            .try_send(Message::text(format!("queued {i}")))
            .unwrap();
    }
    token.cancel();
    let server_side = tokio::spawn(async move {
        let mut last = None;
        while let Some(msg) = ws.recv().await {
            last = Some(msg.unwrap());
        }
        last
    });
    for i in 0..100 {
        assert_eq!(
            client.recv().await.unwrap().unwrap(),
            Message::text(format!("queued {i}"))
        );
    }
    assert_eq!(
        client.recv().await.unwrap().unwrap(),
        Message::Close(Some(CloseFrame::new(1001, "server shutting down")))
    );
    let last = tokio::time::timeout(LIMIT, server_side)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last, Some(Message::Close(Some(CloseFrame::new(1001, "")))));
}

#[tokio::test]
async fn drained_fires_when_the_queue_is_written() {
    let (server, url) = serve_one(queue(SlowConsumer::Wait)).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let mut ws = server.await.unwrap();
    let sender = ws.sender();
    tokio::spawn(async move { while ws.recv().await.is_some() {} });
    let payload = "d".repeat(64 << 10);
    for _ in 0..8 {
        sender.send(Message::text(payload.clone())).await.unwrap();
    }
    // The client has not read yet: some of it is still buffered here.
    assert!(sender.buffered_amount() > 0);
    let reader = tokio::spawn(async move {
        for _ in 0..8 {
            client.recv().await.unwrap().unwrap();
        }
        client
    });
    tokio::time::timeout(LIMIT, sender.drained()).await.unwrap();
    assert_eq!(sender.buffered_amount(), 0);
    assert_eq!(sender.queued_messages(), 0);
    reader.await.unwrap();
}

/// The send queue is made by the first Sender. One made from the writer half
/// while the reader half already waits for input must still wake the reader
/// (which drives the connection), or the message would wait for the peer.
#[tokio::test]
async fn a_sender_made_while_the_reader_waits_wakes_it() {
    let (server, url) = serve_one(IoOptions::default()).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let ws = server.await.unwrap();
    let (mut reader, writer) = ws.split();
    let driver = tokio::spawn(async move { while reader.recv().await.is_some() {} });
    // Let the reader park on the socket before the queue exists.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sender = writer.sender();
    sender.try_send(Message::text("late queue")).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), client.recv())
        .await
        .expect("the queued message was not written: the reader was not woken")
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("late queue"));
    assert_eq!(writer.buffered_amount(), 0);
    client.close(1000u16, "").await.unwrap();
    tokio::time::timeout(LIMIT, driver).await.unwrap().unwrap();
}

/// A Sender made after the connection ended refuses messages at once.
#[tokio::test]
async fn a_sender_made_after_the_end_is_closed() {
    let (server, url) = serve_one(IoOptions::default()).await;
    let (mut client, _) = tidewire::connect(&url).await.unwrap();
    let mut ws = server.await.unwrap();
    let closing = tokio::spawn(async move { client.close(1000u16, "bye").await });
    while ws.recv().await.is_some() {}
    assert!(matches!(
        ws.sender().try_send(Message::text("too late")),
        Err(SendError::Closed)
    ));
    tokio::time::timeout(LIMIT, closing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
