// The publisher's reply latency on a busy hub: one more client of
// `tidewire serve` that publishes to a channel every 50 ms, each `publish`
// with an id, and reports how long the replies took (p50, p99, max) while
// the channel fans out to its subscribers (run it beside
// `tidewire bench --fanout`). Uses this folder's `ws` (npm ci here first).
//
//   node bench/node/reply_latency.mjs ws://127.0.0.1:8080/connection/websocket [SECONDS] [CHANNEL]
import WebSocket from 'ws';

const [url, secondsArg, channelArg] = process.argv.slice(2);
if (!url) {
  console.error('usage: node bench/node/reply_latency.mjs URL [SECONDS] [CHANNEL]');
  process.exit(2);
}
const seconds = Number(secondsArg || 5);
const channel = channelArg || 'bench';
const ws = new WebSocket(url);
const sent = new Map();
const rtts = [];
let id = 10;

ws.on('open', () => {
  ws.send('{"id":1,"connect":{}}');
  const timer = setInterval(() => {
    id += 1;
    sent.set(id, process.hrtime.bigint());
    ws.send(JSON.stringify({ id, publish: { channel, data: 'probe' } }));
  }, 50);
  setTimeout(() => {
    clearInterval(timer);
    // Replies still under way get a second.
    setTimeout(() => {
      rtts.sort((a, b) => a - b);
      const at = (q) => rtts[Math.min(rtts.length - 1, Math.floor(q * rtts.length))];
      console.log(
        JSON.stringify({ replies: rtts.length, unanswered: sent.size, p50_ms: at(0.5), p99_ms: at(0.99), max_ms: rtts[rtts.length - 1] }),
      );
      process.exit(0);
    }, 1000);
  }, seconds * 1000);
});
ws.on('message', (data) => {
  for (const line of String(data).split('\n')) {
    let message;
    try {
      message = JSON.parse(line);
    } catch {
      continue;
    }
    if (message.id && sent.has(message.id)) {
      rtts.push(Number(process.hrtime.bigint() - sent.get(message.id)) / 1e6);
      sent.delete(message.id);
    }
  }
});
ws.on('error', (e) => {
  console.error(`reply_latency: ${e.message}`);
  process.exit(1);
});
