//! The async server and client against each other and against raw sockets,
//! on loopback.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tidewire::http::StatusCode;
use tidewire::proto::HandshakeError;
use tidewire::{
    accept, accept_with, Accept, ClientBuilder, CloseCode, CloseFrame, Config, DeflateConfig,
    Error, IoOptions, Message, Reject, ServerConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", l.local_addr().unwrap());
    (l, url)
}

fn deflate_config() -> Config {
    Config {
        deflate: Some(DeflateConfig::default()),
        ..Config::default()
    }
}

/// Serves one connection: echoes data messages until the close.
async fn echo_once(l: TcpListener, config: ServerConfig) -> Option<CloseFrame> {
    let (stream, _) = l.accept().await.unwrap();
    let mut ws = accept_with(stream, config, |_| Ok(Accept::default()))
        .await
        .unwrap();
    while let Some(msg) = ws.recv().await {
        match msg.unwrap() {
            m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await.unwrap(),
            Message::Close(frame) => return frame,
            _ => {}
        }
    }
    panic!("stream ended without a close");
}

#[tokio::test]
async fn echo_text_binary_ping_and_close() {
    let (l, url) = listener().await;
    let server = tokio::spawn(echo_once(l, ServerConfig::default()));
    let (mut ws, response) = tidewire::connect(&url).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send_text("hello").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("hello"));
    ws.send_binary(vec![0u8, 1, 2, 255]).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.ping("are you there").await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::Pong("are you there".into())
    );
    let big = "x".repeat(3 << 20);
    ws.send_text(big.clone()).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(big));
    let reply = ws.close(4001u16, "bye").await.unwrap();
    assert_eq!(reply, Some(CloseFrame::new(4001, "")));
    assert!(ws.recv().await.is_none());
    assert_eq!(server.await.unwrap(), Some(CloseFrame::new(4001, "bye")));
}

#[tokio::test]
async fn permessage_deflate_is_negotiated_and_round_trips() {
    let (l, url) = listener().await;
    let config = ServerConfig {
        protocol: deflate_config(),
        ..ServerConfig::default()
    };
    let server = tokio::spawn(echo_once(l, config));
    let (mut ws, response) = ClientBuilder::new(url)
        .config(deflate_config())
        .connect()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["sec-websocket-extensions"],
        "permessage-deflate"
    );
    assert!(ws.connection().deflate_params().is_some());
    let json = r#"{"channel":"news","data":{"title":"hello","body":"world"}}"#.repeat(1000);
    for _ in 0..3 {
        ws.send_text(json.clone()).await.unwrap();
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Message::text(json.clone())
        );
    }
    ws.send_text("tiny").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("tiny"));
    ws.close(1000u16, "").await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn split_halves_work_from_separate_tasks() {
    let (l, url) = listener().await;
    let server = tokio::spawn(echo_once(l, ServerConfig::default()));
    let (ws, _) = tidewire::connect(&url).await.unwrap();
    let (mut reader, mut writer) = ws.split();
    const N: usize = 2000;
    let send = tokio::spawn(async move {
        for i in 0..N {
            writer
                .send(Message::text(format!("message {i}")))
                .await
                .unwrap();
        }
        writer
    });
    for i in 0..N {
        let msg = reader.recv().await.unwrap().unwrap();
        assert_eq!(msg, Message::text(format!("message {i}")));
    }
    let mut writer = send.await.unwrap();
    writer.close(1000u16, "done").await.unwrap();
    assert_eq!(
        reader.recv().await.unwrap().unwrap(),
        Message::Close(Some(CloseFrame::new(1000, "")))
    );
    assert!(reader.recv().await.is_none());
    server.await.unwrap();
}

#[tokio::test]
async fn stream_and_sink() {
    let (l, url) = listener().await;
    let server = tokio::spawn(echo_once(l, ServerConfig::default()));
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    for i in 0..100 {
        ws.feed(Message::text(format!("{i}"))).unwrap();
    }
    SinkExt::<Message>::flush(&mut ws).await.unwrap();
    let got: Vec<Message> = (&mut ws).take(100).map(Result::unwrap).collect().await;
    assert_eq!(got.len(), 100);
    assert_eq!(got[99], Message::text("99"));
    SinkExt::<Message>::close(&mut ws).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Close(_)))));
    server.await.unwrap();
}

#[tokio::test]
async fn server_initiated_close_reaches_the_client() {
    let (l, url) = listener().await;
    let server = tokio::spawn(async move {
        let (stream, _) = l.accept().await.unwrap();
        let mut ws = accept(stream).await.unwrap();
        ws.close(CloseCode::GOING_AWAY, "shutting down")
            .await
            .unwrap()
    });
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::Close(Some(CloseFrame::new(1001, "shutting down")))
    );
    assert!(ws.recv().await.is_none());
    assert_eq!(server.await.unwrap(), Some(CloseFrame::new(1001, "")));
}

#[tokio::test]
async fn close_times_out_when_the_peer_never_answers() {
    let (l, url) = listener().await;
    // A server that completes the handshake and then ignores everything.
    let silent = tokio::spawn(async move {
        let (mut stream, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        let request = String::from_utf8_lossy(&buf[..n]).to_string();
        let key = request
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap()
            .trim()
            .to_string();
        let accept = tidewire::proto::handshake::accept_key(key.as_bytes());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        stream.write_all(response.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(stream);
    });
    let options = IoOptions {
        close_timeout: Duration::from_millis(300),
        ..IoOptions::default()
    };
    let (mut ws, _) = ClientBuilder::new(url)
        .io_options(options)
        .connect()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(LIMIT, ws.close(1000u16, ""))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, Error::AbnormalClosure), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    silent.abort();
}

/// Connects a raw TCP client and completes the handshake by hand.
async fn raw_client(url: &str) -> TcpStream {
    let addr = url.trim_start_matches("ws://").trim_end_matches('/');
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    stream
}

/// Reads everything until EOF (bounded by LIMIT).
async fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

async fn server_outcome(l: TcpListener, config: ServerConfig) -> Option<Result<Message, Error>> {
    let (stream, _) = l.accept().await.unwrap();
    let mut ws = accept_with(stream, config, |_| Ok(Accept::default()))
        .await
        .unwrap();
    ws.recv().await
}

#[tokio::test]
async fn rfc6455_5_1_unmasked_client_frame_fails_with_1002() {
    let (l, url) = listener().await;
    let server = tokio::spawn(server_outcome(l, ServerConfig::default()));
    let mut raw = raw_client(&url).await;
    raw.write_all(b"\x81\x05Hello").await.unwrap();
    let bytes = read_to_eof(&mut raw).await;
    drop(raw);
    assert_eq!(bytes[0], 0x88, "a close frame: {bytes:?}");
    assert_eq!(&bytes[2..4], &1002u16.to_be_bytes(), "code 1002: {bytes:?}");
    let outcome = server.await.unwrap().unwrap();
    assert!(matches!(outcome, Err(Error::Protocol(_))), "{outcome:?}");
}

#[tokio::test]
async fn rfc6455_10_4_hostile_length_fails_with_1009_without_allocating() {
    let (l, url) = listener().await;
    let config = ServerConfig {
        protocol: Config {
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
            ..Config::default()
        },
        ..ServerConfig::default()
    };
    let server = tokio::spawn(server_outcome(l, config));
    let mut raw = raw_client(&url).await;
    // A masked binary frame announcing 2^62 bytes.
    raw.write_all(b"\x82\xff\x40\x00\x00\x00\x00\x00\x00\x00\x01\x02\x03\x04")
        .await
        .unwrap();
    let bytes = read_to_eof(&mut raw).await;
    drop(raw);
    assert_eq!(&bytes[2..4], &1009u16.to_be_bytes(), "{bytes:?}");
    let outcome = server.await.unwrap().unwrap();
    assert!(matches!(
        outcome,
        Err(Error::Protocol(
            tidewire::proto::ProtocolError::FrameTooBig { .. }
        ))
    ));
}

#[tokio::test]
async fn abrupt_disconnect_is_an_abnormal_closure() {
    let (l, url) = listener().await;
    let server = tokio::spawn(server_outcome(l, ServerConfig::default()));
    let raw = raw_client(&url).await;
    drop(raw);
    let outcome = server.await.unwrap().unwrap();
    assert!(
        matches!(outcome, Err(Error::AbnormalClosure)),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn rfc6455_5_4_fragmented_message_arriving_slowly_survives_cancelled_recvs() {
    let (l, url) = listener().await;
    let server = tokio::spawn(async move {
        let (stream, _) = l.accept().await.unwrap();
        let mut ws = accept(stream).await.unwrap();
        let mut timeouts = 0;
        let mut received = Vec::new();
        while received.len() < 2 {
            // Cancel recv again and again while the message trickles in.
            match tokio::time::timeout(Duration::from_millis(5), ws.recv()).await {
                Err(_) => timeouts += 1,
                Ok(msg) => received.push(msg.unwrap().unwrap()),
            }
        }
        (received, timeouts)
    });
    let mut raw = raw_client(&url).await;
    // "Hello" in two masked fragments with a ping between, sent a byte at a time.
    let frames: &[u8] =
        b"\x01\x83\x00\x00\x00\x00Hel\x89\x80\x00\x00\x00\x00\x80\x82\x00\x00\x00\x00lo";
    for b in frames {
        raw.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (received, timeouts) = tokio::time::timeout(LIMIT, server).await.unwrap().unwrap();
    assert_eq!(
        received,
        [Message::Ping(bytes::Bytes::new()), Message::text("Hello")]
    );
    assert!(timeouts > 0);
    // The pong went out even while recv kept being cancelled.
    let mut pong = [0u8; 2];
    raw.read_exact(&mut pong).await.unwrap();
    assert_eq!(pong, *b"\x8a\x00");
}

#[tokio::test]
async fn hook_rejects_with_status_and_reason_and_chooses_a_subprotocol() {
    let (l, url) = listener().await;
    let server = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (stream, _) = l.accept().await.unwrap();
            let result = accept_with(stream, ServerConfig::default(), |hs| {
                let token = hs
                    .request()
                    .headers()
                    .get("authorization")
                    .map(|v| v.as_bytes().to_vec());
                if token.as_deref() != Some(b"Bearer secret") {
                    return Err(Reject::new(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong token",
                    ));
                }
                let protocol = hs.protocols().find(|p| *p == "chat.v2").map(str::to_string);
                Ok(Accept {
                    protocol,
                    ..Accept::default()
                })
            })
            .await;
            outcomes.push(result.map(|ws| ws.protocol().map(str::to_string)));
        }
        outcomes
    });
    let err = ClientBuilder::new(&url).connect().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Handshake(HandshakeError::UnexpectedStatus(StatusCode::UNAUTHORIZED))
        ),
        "{err:?}"
    );
    let (ws, _) = ClientBuilder::new(&url)
        .header("Authorization", "Bearer secret")
        .protocol("chat.v1")
        .protocol("chat.v2")
        .connect()
        .await
        .unwrap();
    assert_eq!(ws.protocol(), Some("chat.v2"));
    let outcomes = server.await.unwrap();
    assert!(matches!(
        &outcomes[0],
        Err(Error::Handshake(HandshakeError::Rejected { .. }))
    ));
    assert_eq!(outcomes[1].as_ref().unwrap().as_deref(), Some("chat.v2"));
}

async fn http_exchange(url: &str, request: &str) -> String {
    let addr = url.trim_start_matches("ws://").trim_end_matches('/');
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    String::from_utf8(read_to_eof(&mut stream).await).unwrap()
}

#[tokio::test]
async fn rfc6455_4_2_2_bad_handshakes_get_clear_http_errors() {
    let (l, url) = listener().await;
    let server = tokio::spawn(async move {
        loop {
            let (stream, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = accept(stream).await;
            });
        }
    });
    let version = http_exchange(&url, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n").await;
    assert!(
        version.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{version}"
    );
    assert!(version.contains("Sec-WebSocket-Version: 13\r\n"));
    let garbage = http_exchange(&url, "\x16\x03\x01 hello\r\n\r\n").await;
    assert!(
        garbage.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{garbage}"
    );
    let key = http_exchange(&url, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n").await;
    assert!(
        key.contains("400 Bad Request") && key.contains("Sec-WebSocket-Key"),
        "{key}"
    );
    let post = http_exchange(&url, "POST / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{post}"
    );
    server.abort();
}

#[tokio::test]
async fn handshake_timeout_drops_a_slow_client() {
    let (l, url) = listener().await;
    let server = tokio::spawn(async move {
        let (stream, _) = l.accept().await.unwrap();
        let config = ServerConfig {
            handshake_timeout: Duration::from_millis(200),
            ..ServerConfig::default()
        };
        accept_with(stream, config, |_| Ok(Accept::default())).await
    });
    let addr = url.trim_start_matches("ws://").trim_end_matches('/');
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let response = String::from_utf8(read_to_eof(&mut stream).await).unwrap();
    assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
    assert!(matches!(
        server.await.unwrap(),
        Err(Error::HandshakeTimeout)
    ));
}

#[tokio::test]
async fn frames_sent_right_after_the_handshake_are_not_lost() {
    let (l, url) = listener().await;
    let server = tokio::spawn(server_outcome(l, ServerConfig::default()));
    let addr = url.trim_start_matches("ws://").trim_end_matches('/');
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // Request and a masked "Hello" frame in one write.
    let mut bytes = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
    bytes.extend_from_slice(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
    stream.write_all(&bytes).await.unwrap();
    let msg = server.await.unwrap().unwrap().unwrap();
    assert_eq!(msg, Message::text("Hello"));
}

/// A transport that serves prepared bytes and records how many bytes each
/// read asked for; writes are swallowed.
struct RecordingTransport {
    incoming: Vec<u8>,
    at: usize,
    /// Serve at most this many bytes per read from this offset on.
    trickle_from: usize,
    trickle: usize,
    requested: Vec<usize>,
    /// Bytes taken by each write call.
    written: Vec<usize>,
}

impl tokio::io::AsyncRead for RecordingTransport {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        this.requested.push(buf.remaining());
        let mut n = buf.remaining().min(this.incoming.len() - this.at);
        if this.at >= this.trickle_from {
            n = n.min(this.trickle);
        } else {
            n = n.min(this.trickle_from - this.at);
        }
        buf.put_slice(&this.incoming[this.at..this.at + n]);
        this.at += n;
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for RecordingTransport {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.written.push(buf.len());
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = bufs.iter().map(|b| b.len()).sum();
        self.written.push(n);
        std::task::Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl RecordingTransport {
    /// Serves `incoming`, at most `trickle` bytes per read from
    /// `trickle_from` on.
    fn new(incoming: Vec<u8>, trickle_from: usize, trickle: usize) -> RecordingTransport {
        RecordingTransport {
            incoming,
            at: 0,
            trickle_from,
            trickle,
            requested: Vec::new(),
            written: Vec::new(),
        }
    }

    /// A server-side WebSocket over this transport.
    fn server(self) -> tidewire::WebSocket<RecordingTransport> {
        let conn = tidewire::proto::Connection::new(
            tidewire::proto::Role::Server,
            Config::default(),
            None,
        );
        tidewire::WebSocket::from_parts(self, conn, &[], None, IoOptions::default())
    }
}

/// Receives the next message and checks it is `expected`.
async fn recv_binary(ws: &mut tidewire::WebSocket<RecordingTransport>, expected: &[u8]) -> Message {
    let got = tokio::time::timeout(LIMIT, ws.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::binary(expected.to_vec()));
    got
}

fn masked_binary(payload: &[u8]) -> Vec<u8> {
    let key = [0x12, 0x34, 0x56, 0x78];
    let mut frame = bytes::BytesMut::new();
    tidewire::proto::frame::FrameHeader {
        fin: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: tidewire::OpCode::Binary,
        mask: Some(key),
        payload_len: payload.len() as u64,
    }
    .encode(&mut frame);
    let at = frame.len();
    frame.extend_from_slice(payload);
    tidewire::proto::mask::apply_mask(&mut frame[at..], key, 0);
    frame.to_vec()
}

#[tokio::test]
async fn reads_grow_while_large_messages_stream_in_and_shrink_after() {
    // 48 messages of 64 KiB all available at once, then 64 small messages
    // arriving 100 bytes per read.
    let large: Vec<Vec<u8>> = (0..48u8).map(|i| vec![i; 64 * 1024]).collect();
    let small: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 40]).collect();
    let mut incoming = Vec::new();
    for m in &large {
        incoming.extend(masked_binary(m));
    }
    let trickle_from = incoming.len();
    for m in &small {
        incoming.extend(masked_binary(m));
    }
    let chunk = IoOptions::default().read_chunk;
    let mut ws = RecordingTransport::new(incoming, trickle_from, 100).server();
    // Every message arrives whole and in order.
    for m in large.iter().chain(&small) {
        recv_binary(&mut ws, m).await;
    }
    let requested = &ws.get_ref().requested;
    let largest = *requested.iter().max().unwrap();
    // While reads came back full, the requests grew well past one chunk
    // (several 64 KiB frames per read)...
    assert!(largest >= 4 * chunk, "{requested:?}");
    // ...and once reads came back short, they went back to about one chunk
    // (the buffer may have doubled to carry a partial frame over).
    let last = *requested.last().unwrap();
    assert!(last <= 2 * chunk, "{requested:?}");
}

#[tokio::test]
async fn answers_to_one_large_read_go_out_in_one_write() {
    // 32 messages of 64 KiB available at once, each echoed with `feed` (as
    // the echo server does): once reads have grown, the echoes of one read
    // leave together instead of one write per message.
    let large: Vec<Vec<u8>> = (0..32u8).map(|i| vec![i; 64 * 1024]).collect();
    let incoming: Vec<u8> = large.iter().flat_map(|m| masked_binary(m)).collect();
    let trickle_from = incoming.len();
    let mut ws = RecordingTransport::new(incoming, trickle_from, 0).server();
    for m in &large {
        let got = recv_binary(&mut ws, m).await;
        ws.feed(got).unwrap();
    }
    tokio::time::timeout(LIMIT, ws.flush())
        .await
        .unwrap()
        .unwrap();
    let written = &ws.get_ref().written;
    let echo = 64 * 1024 + 10; // a 64-bit length: 2 + 8 header bytes
                               // Every echo went out, whole...
    assert_eq!(
        written.iter().sum::<usize>(),
        large.len() * echo,
        "{written:?}"
    );
    // ...and some writes carried several of them.
    let largest = *written.iter().max().unwrap();
    assert!(largest >= 3 * echo, "{written:?}");
}
