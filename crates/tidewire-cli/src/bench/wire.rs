//! The echo generator's hot path, working on the wire bytes directly.
//!
//! A load generator must be faster than the server it measures, so this path
//! does as little per message as the protocol allows: the client frames are
//! built and masked once ([`FrameSet`]: K distinct messages laid out twice, so
//! any run of up to K frames is one contiguous slice and a refill of n
//! messages is one `write`), and echoes are checked as they stream in
//! ([`EchoParser`]: frame headers parsed in place, payload bytes compared with
//! the expected message without copying, fragments and pings handled).
//!
//! Reusing K pre-masked frames departs from RFC 6455's fresh masking key per
//! frame; the key guards against cache poisoning by intermediaries, which a
//! benchmark on a known network does not face, and the server cannot tell.
//! Compression and `--rate` take the library path in `mod.rs` instead.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use tidewire::proto::frame::{FrameHeader, OpCode};
use tidewire::proto::mask::apply_mask;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// K distinct client frames of one size, masked, laid out twice in a row.
pub(super) struct FrameSet {
    wire: Vec<u8>,
    frame_len: usize,
    count: usize,
    /// The unmasked payloads, back to back: what each echo must carry.
    payloads: Vec<u8>,
    size: usize,
    text: bool,
}

impl FrameSet {
    /// `count` must be at least the number of messages in flight.
    pub(super) fn new(size: usize, count: usize, text: bool) -> FrameSet {
        let count = count.max(1);
        let mut payloads = Vec::with_capacity(size * count);
        let mut frames = BytesMut::new();
        for i in 0..count {
            let start = payloads.len();
            payloads.extend((0..size).map(|j| b'a' + (j % 26) as u8));
            // A per-message prefix makes the K messages distinct, so a lost,
            // repeated or reordered echo shows as a mismatch.
            let prefix = format!("{i}-");
            let k = prefix.len().min(size);
            payloads[start..start + k].copy_from_slice(&prefix.as_bytes()[..k]);
            let key: [u8; 4] = rand::random();
            FrameHeader {
                fin: true,
                rsv1: false,
                rsv2: false,
                rsv3: false,
                opcode: if text { OpCode::Text } else { OpCode::Binary },
                mask: Some(key),
                payload_len: size as u64,
            }
            .encode(&mut frames);
            let at = frames.len();
            frames.extend_from_slice(&payloads[start..]);
            apply_mask(&mut frames[at..], key, 0);
        }
        let frame_len = frames.len() / count;
        let mut wire = Vec::with_capacity(frames.len() * 2);
        wire.extend_from_slice(&frames);
        wire.extend_from_slice(&frames);
        FrameSet {
            wire,
            frame_len,
            count,
            payloads,
            size,
            text,
        }
    }

    fn payload(&self, seq: u64) -> &[u8] {
        let i = (seq % self.count as u64) as usize;
        &self.payloads[i * self.size..(i + 1) * self.size]
    }
}

/// Why a connection stopped early.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stop {
    Mismatch,
    Protocol(&'static str),
    Closed(Option<u16>),
}

impl Stop {
    pub(super) fn kind(&self) -> String {
        match self {
            Stop::Mismatch => "echo mismatch".into(),
            Stop::Protocol(what) => format!("protocol: {what}"),
            Stop::Closed(None) => "closed by server".into(),
            Stop::Closed(Some(code)) => format!("closed by server: {code}"),
        }
    }
}

/// Streaming parser of the server's frames, checking each data message
/// against the next expected payload.
pub(super) struct EchoParser {
    header: [u8; 14],
    header_len: usize,
    /// Inside a frame's payload, with `remaining` bytes to go.
    in_payload: bool,
    remaining: u64,
    /// The current frame is a control frame with this opcode.
    control: Option<OpCode>,
    control_payload: Vec<u8>,
    /// Inside a fragmented data message.
    fragmented: bool,
    /// Bytes of the current echo matched so far.
    matched: usize,
    /// Sequence number of the echo being matched.
    pub(super) echoed: u64,
}

impl EchoParser {
    pub(super) fn new() -> EchoParser {
        EchoParser {
            header: [0; 14],
            header_len: 0,
            in_payload: false,
            remaining: 0,
            control: None,
            control_payload: Vec::new(),
            fragmented: false,
            matched: 0,
            echoed: 0,
        }
    }

    /// Consumes `data`; calls `on_echo(seq)` for each complete, correct echo
    /// and `on_ping(payload)` for each ping.
    pub(super) fn feed(
        &mut self,
        frames: &FrameSet,
        mut data: &[u8],
        mut on_echo: impl FnMut(u64),
        mut on_ping: impl FnMut(&[u8]),
    ) -> Result<(), Stop> {
        while !data.is_empty() {
            if !self.in_payload {
                // Between frames: gather the header (it may span reads).
                if self.header_len == 0 {
                    if let Some((header, len)) = decode(data)? {
                        data = &data[len..];
                        self.begin(frames, header, &mut on_echo, &mut on_ping)?;
                        continue;
                    }
                }
                let take = (self.header.len() - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                let have = self.header_len + take;
                match decode(&self.header[..have])? {
                    Some((header, len)) => {
                        // Only the header's own bytes are consumed.
                        data = &data[len - self.header_len..];
                        self.header_len = 0;
                        self.begin(frames, header, &mut on_echo, &mut on_ping)?;
                    }
                    None => {
                        self.header_len = have;
                        data = &data[take..];
                    }
                }
                continue;
            }
            let n = (self.remaining.min(data.len() as u64)) as usize;
            let (chunk, rest) = data.split_at(n);
            data = rest;
            self.remaining -= n as u64;
            match self.control {
                Some(_) => self.control_payload.extend_from_slice(chunk),
                None => {
                    let expected = frames.payload(self.echoed);
                    if expected.get(self.matched..self.matched + n) != Some(chunk) {
                        return Err(Stop::Mismatch);
                    }
                    self.matched += n;
                }
            }
            if self.remaining == 0 {
                self.in_payload = false;
                self.end(frames, &mut on_echo, &mut on_ping)?;
            }
        }
        Ok(())
    }

    fn begin(
        &mut self,
        frames: &FrameSet,
        header: FrameHeader,
        on_echo: &mut impl FnMut(u64),
        on_ping: &mut impl FnMut(&[u8]),
    ) -> Result<(), Stop> {
        if header.mask.is_some() {
            return Err(Stop::Protocol("masked frame from the server"));
        }
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(Stop::Protocol("reserved bit set"));
        }
        if header.opcode.is_control() {
            if header.payload_len > 125 || !header.fin {
                return Err(Stop::Protocol("bad control frame"));
            }
            self.control = Some(header.opcode);
            self.control_payload.clear();
        } else {
            let expected_start = if frames.text {
                OpCode::Text
            } else {
                OpCode::Binary
            };
            match (self.fragmented, header.opcode) {
                (false, op) if op == expected_start => self.matched = 0,
                (true, OpCode::Continuation) => {}
                (false, OpCode::Text | OpCode::Binary) => return Err(Stop::Mismatch),
                _ => return Err(Stop::Protocol("bad fragmentation")),
            }
            self.fragmented = !header.fin;
            self.control = None;
        }
        self.remaining = header.payload_len;
        self.in_payload = self.remaining > 0;
        if self.remaining == 0 {
            self.end(frames, on_echo, on_ping)?;
        }
        Ok(())
    }

    fn end(
        &mut self,
        frames: &FrameSet,
        on_echo: &mut impl FnMut(u64),
        on_ping: &mut impl FnMut(&[u8]),
    ) -> Result<(), Stop> {
        match self.control.take() {
            Some(OpCode::Ping) => on_ping(&self.control_payload),
            Some(OpCode::Close) => {
                let code = (self.control_payload.len() >= 2).then(|| {
                    u16::from_be_bytes([self.control_payload[0], self.control_payload[1]])
                });
                return Err(Stop::Closed(code));
            }
            Some(_) => {}
            None if self.fragmented => {}
            None => {
                if self.matched != frames.size {
                    return Err(Stop::Mismatch);
                }
                on_echo(self.echoed);
                self.echoed += 1;
                self.matched = 0;
            }
        }
        Ok(())
    }
}

fn decode(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, Stop> {
    FrameHeader::decode(buf).map_err(|_| Stop::Protocol("bad frame header"))
}

/// Appends a masked client frame (data, pong or close) to `out`.
pub(super) fn masked_frame(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let key: [u8; 4] = rand::random();
    let mut frame = BytesMut::with_capacity(payload.len() + 14);
    FrameHeader {
        fin: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: Some(key),
        payload_len: payload.len() as u64,
    }
    .encode(&mut frame);
    let at = frame.len();
    frame.extend_from_slice(payload);
    apply_mask(&mut frame[at..], key, 0);
    out.extend_from_slice(&frame);
}

/// What [`pipeline`] measured on one connection.
pub(super) struct Run {
    pub(super) echoed: u64,
    pub(super) stop: Option<Stop>,
    pub(super) io_error: Option<io::Error>,
}

/// Keeps `in_flight` echoes outstanding on `io` until `deadline`, calling
/// `on_latency(micros)` for every checked echo. `leftover` holds bytes that
/// arrived with the handshake response.
pub(super) async fn pipeline<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    leftover: &[u8],
    frames: &FrameSet,
    in_flight: usize,
    deadline: Instant,
    mut on_latency: impl FnMut(u64),
) -> Run {
    let in_flight = in_flight.clamp(1, frames.count);
    let period = frames.count * frames.frame_len;
    let mut parser = EchoParser::new();
    let mut sent_at = vec![Instant::now(); in_flight];
    let mut sent: u64 = 0;
    // The data bytes still to write: wire[from..to], `from` kept below one
    // period so that `to` stays inside the doubled layout.
    let (mut from, mut to) = (0usize, 0usize);
    let mut control_out: Vec<u8> = Vec::new();
    // Room for every echo in flight, so one read can take them all.
    let mut buf = vec![0u8; (frames.frame_len * in_flight).clamp(4096, 1 << 20)];
    let mut stopping = false;
    let mut need_flush = false;
    let deadline_tokio = tokio::time::Instant::from_std(deadline);
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(deadline_tokio));
    let mut run = Run {
        echoed: 0,
        stop: None,
        io_error: None,
    };

    let mut pongs = Vec::new();
    if let Err(stop) = parser.feed(
        frames,
        leftover,
        |_| {},
        |ping| masked_frame(OpCode::Pong, ping, &mut pongs),
    ) {
        run.stop = Some(stop);
        return run;
    }
    control_out.append(&mut pongs);

    let result: Result<(), Result<Stop, io::Error>> = poll_fn(|cx: &mut Context<'_>| {
        if !stopping && sleep.as_mut().poll(cx).is_ready() {
            stopping = true;
        }
        if stopping {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut progress = false;
            // Refill the window: one contiguous run of frames.
            let outstanding = (sent - parser.echoed) as usize;
            if outstanding < in_flight {
                let now = Instant::now();
                for seq in sent..sent + (in_flight - outstanding) as u64 {
                    sent_at[(seq % in_flight as u64) as usize] = now;
                }
                sent += (in_flight - outstanding) as u64;
                to += (in_flight - outstanding) * frames.frame_len;
            }
            // Control replies go out between data frames, never inside one.
            if !control_out.is_empty() && from % frames.frame_len == 0 {
                match Pin::new(&mut *io).poll_write(cx, &control_out) {
                    Poll::Ready(Ok(n)) => {
                        control_out.drain(..n);
                        progress = true;
                        need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Err(e))),
                    Poll::Pending => {}
                }
            }
            if from < to && control_out.is_empty() {
                match Pin::new(&mut *io).poll_write(cx, &frames.wire[from..to]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Err(io::ErrorKind::WriteZero.into())))
                    }
                    Poll::Ready(Ok(n)) => {
                        from += n;
                        if from >= period {
                            from -= period;
                            to -= period;
                        }
                        progress = true;
                        need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Err(e))),
                    Poll::Pending => {}
                }
            }
            if need_flush && from == to && control_out.is_empty() {
                match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => need_flush = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Err(e))),
                    Poll::Pending => {}
                }
            }
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    return Poll::Ready(Err(Ok(Stop::Closed(None))))
                }
                Poll::Ready(Ok(())) => {
                    let now = Instant::now();
                    let fed = parser.feed(
                        frames,
                        read.filled(),
                        |seq| {
                            let at = sent_at[(seq % in_flight as u64) as usize];
                            on_latency(now.duration_since(at).as_micros().max(1) as u64);
                        },
                        |ping| masked_frame(OpCode::Pong, ping, &mut control_out),
                    );
                    if let Err(stop) = fed {
                        return Poll::Ready(Err(Ok(stop)));
                    }
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Err(e))),
                Poll::Pending => {}
            }
            if !progress {
                return Poll::Pending;
            }
        }
    })
    .await;
    run.echoed = parser.echoed;
    match result {
        Ok(()) => {
            // Say goodbye: finish the frame being written, send a close, and
            // wait (briefly) for the server's close or EOF.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let partial = from % frames.frame_len;
                let finish = if partial == 0 {
                    0
                } else {
                    frames.frame_len - partial
                };
                io.write_all(&frames.wire[from..from + finish]).await?;
                let mut close = Vec::new();
                masked_frame(OpCode::Close, &1000u16.to_be_bytes(), &mut close);
                io.write_all(&close).await?;
                io.flush().await?;
                while io.read(&mut buf).await? > 0 {}
                io::Result::Ok(())
            })
            .await;
        }
        Err(Ok(stop)) => run.stop = Some(stop),
        Err(Err(e)) => run.io_error = Some(e),
    }
    run
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Server frames carrying the given payloads, unmasked.
    pub(in crate::bench) fn server_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        FrameHeader {
            fin,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask: None,
            payload_len: payload.len() as u64,
        }
        .encode(&mut out);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn feed_all(
        frames: &FrameSet,
        input: &[u8],
        step: usize,
    ) -> (Vec<u64>, Vec<Vec<u8>>, Result<(), Stop>) {
        let mut parser = EchoParser::new();
        let (mut echoes, mut pings) = (Vec::new(), Vec::new());
        for chunk in input.chunks(step) {
            if let Err(e) = parser.feed(
                frames,
                chunk,
                |s| echoes.push(s),
                |p| pings.push(p.to_vec()),
            ) {
                return (echoes, pings, Err(e));
            }
        }
        (echoes, pings, Ok(()))
    }

    #[test]
    fn frames_are_masked_distinct_and_contiguous() {
        let frames = FrameSet::new(300, 8, false);
        assert_eq!(frames.wire.len(), 2 * 8 * frames.frame_len);
        assert_eq!(frames.frame_len, 4 + 4 + 300);
        assert_ne!(frames.payload(0), frames.payload(1));
        assert_eq!(frames.payload(3), frames.payload(11));
        // Decoding and unmasking frame 5 gives payload 5.
        let at = 5 * frames.frame_len;
        let (header, len) = FrameHeader::decode(&frames.wire[at..]).unwrap().unwrap();
        let mut payload = frames.wire[at + len..at + frames.frame_len].to_vec();
        apply_mask(&mut payload, header.mask.unwrap(), 0);
        assert_eq!(payload, frames.payload(5));
    }

    #[test]
    fn echoes_are_checked_across_any_read_boundaries() {
        let frames = FrameSet::new(200, 4, true);
        let mut input = Vec::new();
        for seq in 0..10 {
            input.extend(server_frame(OpCode::Text, true, frames.payload(seq)));
        }
        // A ping between echoes, and a fragmented echo.
        input.extend(server_frame(OpCode::Ping, true, b"hi"));
        let p = frames.payload(10);
        input.extend(server_frame(OpCode::Text, false, &p[..50]));
        input.extend(server_frame(OpCode::Pong, true, b""));
        input.extend(server_frame(OpCode::Continuation, true, &p[50..]));
        for step in [1, 3, 7, 64, 4096] {
            let (echoes, pings, result) = feed_all(&frames, &input, step);
            assert_eq!(result, Ok(()));
            assert_eq!(echoes, (0..11).collect::<Vec<_>>(), "step {step}");
            assert_eq!(pings, vec![b"hi".to_vec()]);
        }
    }

    #[test]
    fn a_wrong_lost_or_mistyped_echo_is_a_mismatch() {
        let frames = FrameSet::new(16, 4, false);
        let mut skipped = server_frame(OpCode::Binary, true, frames.payload(0));
        skipped.extend(server_frame(OpCode::Binary, true, frames.payload(2)));
        assert_eq!(feed_all(&frames, &skipped, 5).2, Err(Stop::Mismatch));
        let short = server_frame(OpCode::Binary, true, &frames.payload(0)[..15]);
        assert_eq!(feed_all(&frames, &short, 5).2, Err(Stop::Mismatch));
        let text = server_frame(OpCode::Text, true, frames.payload(0));
        assert_eq!(feed_all(&frames, &text, 5).2, Err(Stop::Mismatch));
        let close = server_frame(OpCode::Close, true, &1001u16.to_be_bytes());
        assert_eq!(
            feed_all(&frames, &close, 1).2,
            Err(Stop::Closed(Some(1001)))
        );
        let mut masked = frames.wire[..frames.frame_len].to_vec();
        masked[0] = 0x82;
        assert!(matches!(
            feed_all(&frames, &masked, 100).2,
            Err(Stop::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn pipeline_keeps_the_window_full_against_an_echo_peer() {
        let frames = FrameSet::new(100, 16, false);
        let (mut client, mut server) = tokio::io::duplex(4096);
        // A minimal echo peer: unmask each client frame, send it back.
        let peer = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut input = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                input.extend_from_slice(&buf[..n]);
                while let Some((header, len)) = FrameHeader::decode(&input).unwrap() {
                    let end = len + header.payload_len as usize;
                    if input.len() < end {
                        break;
                    }
                    let mut payload = input[len..end].to_vec();
                    apply_mask(&mut payload, header.mask.unwrap(), 0);
                    input.drain(..end);
                    if header.opcode == OpCode::Close {
                        return;
                    }
                    server
                        .write_all(&server_frame(header.opcode, true, &payload))
                        .await
                        .unwrap();
                }
            }
        });
        let mut latencies = 0u64;
        let deadline = Instant::now() + std::time::Duration::from_millis(300);
        let run = pipeline(&mut client, &[], &frames, 8, deadline, |_| latencies += 1).await;
        assert!(run.stop.is_none() && run.io_error.is_none());
        assert!(run.echoed > 100, "{}", run.echoed);
        assert_eq!(latencies, run.echoed);
        peer.await.unwrap();
    }
}
