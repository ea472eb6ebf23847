#!/usr/bin/env node
// Feeds the demo's live ticker (/ticker.html of `tidewire serve`): publishes
// made-up prices to a channel through the HTTP API, the way an
// application's backend publishes.
//
//   node examples/ticker.mjs --key API_KEY [--url http://127.0.0.1:8080]
//        [--channel ticker:prices] [--interval 1000] [--count N]
//
// --key       the API key (default: $TIDEWIRE_API_KEY): the one `tidewire
//             serve` printed at start, or api.key of its configuration
// --url       the server (default: $TIDEWIRE_URL or http://127.0.0.1:8080)
// --interval  milliseconds between updates (default 1000)
// --count     stop after this many updates (default: run until Ctrl-C)
//
// Node >= 18 (fetch). No dependencies.

const args = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  if (i === -1) return fallback;
  if (i + 1 >= args.length) usage(`--${name} needs a value`);
  return args[i + 1];
};
function usage(msg) {
  if (msg) console.error(`ticker: ${msg}`);
  console.error('usage: node examples/ticker.mjs --key API_KEY [--url URL] [--channel CH] [--interval MS] [--count N]');
  process.exit(2);
}
if (args.includes('-h') || args.includes('--help')) usage();

const url = opt('url', process.env.TIDEWIRE_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
const key = opt('key', process.env.TIDEWIRE_API_KEY);
const channel = opt('channel', 'ticker:prices');
const interval = Number(opt('interval', '1000'));
const count = Number(opt('count', 'Infinity'));
if (!key) usage('the API key is required (--key, or TIDEWIRE_API_KEY)');
if (!(interval >= 10)) usage('--interval must be at least 10 (ms)');
if (!(count >= 1)) usage('--count must be at least 1');

const prices = { ACME: 120.5, GLOBX: 87.25, INITECH: 42.1, UMBRL: 310.0, TIDE: 18.75 };

async function publish(data) {
  const res = await fetch(`${url}/api/publish`, {
    method: 'POST',
    headers: { Authorization: `apikey ${key}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ channel, data }),
    signal: AbortSignal.timeout(5000),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${JSON.stringify(body)}`);
  return body;
}

let sent = 0;
let attempts = 0;
let stop = false;
process.on('SIGINT', () => {
  stop = true;
});
console.log(`publishing to ${channel} on ${url} every ${interval} ms`);
while (!stop && attempts < count) {
  attempts++;
  for (const symbol of Object.keys(prices)) {
    // A small random walk, two decimals.
    const next = prices[symbol] * (1 + (Math.random() - 0.5) * 0.01);
    prices[symbol] = Math.round(Math.max(0.01, next) * 100) / 100;
  }
  try {
    const r = await publish({ ts: Date.now(), prices });
    sent++;
    console.log(`#${sent} offset ${r.offset ?? '-'}: ${Object.entries(prices).map(([s, p]) => `${s} ${p.toFixed(2)}`).join('  ')}`);
  } catch (e) {
    console.error(`publish failed: ${e.message}`);
    if (e.message.startsWith('HTTP 401')) process.exit(1);
  }
  if (attempts < count && !stop) await new Promise((r) => setTimeout(r, interval));
}
