// The live ticker: subscribes to a channel that a backend feeds through the
// HTTP API (examples/ticker.mjs), shows the latest prices at once (history)
// and every update after.
import { Client } from '../client/tidewire.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const channel = params.get('channel') || 'ticker:prices';
$('channel').textContent = channel;
const wsUrl = params.get('server') || new URL('connection/websocket', location.href).href.replace(/^http/, 'ws');

const client = new Client(wsUrl);
const badge = $('state');
client.on('state', ({ newState }) => {
  badge.dataset.state = newState;
  badge.textContent = newState === 'connecting' ? 'connecting…' : newState;
});

const rows = new Map();
let updates = 0;
let lastTs = 0;

function render(data) {
  if (!data || typeof data.prices !== 'object') return;
  if (typeof data.ts === 'number') {
    if (data.ts < lastTs) return; // older than what is shown
    lastTs = data.ts;
  }
  $('waiting')?.remove();
  for (const [symbol, price] of Object.entries(data.prices)) {
    let row = rows.get(symbol);
    if (!row) {
      row = document.createElement('tr');
      row.dataset.symbol = symbol;
      row.innerHTML = '<td></td><td class="price"></td><td class="change"></td>';
      row.cells[0].textContent = symbol;
      rows.set(symbol, row);
      $('prices').append(row);
    }
    const before = Number(row.dataset.price);
    row.dataset.price = price;
    row.cells[1].textContent = Number(price).toFixed(2);
    const change = row.cells[2];
    if (Number.isFinite(before)) {
      const d = price - before;
      const shown = Math.abs(d).toFixed(2);
      // Unchanged as far as two decimals show: neutral, no arrow.
      const direction = Number(shown) === 0 ? 'same' : d > 0 ? 'up' : 'down';
      change.textContent = direction === 'same' ? shown : `${direction === 'up' ? '▲' : '▼'} ${shown}`;
      change.className = `change ${direction}`;
    }
    row.classList.remove('flash');
    void row.offsetWidth; // restart the animation
    row.classList.add('flash');
  }
  updates++;
  $('updates').textContent = String(updates);
  $('updated').textContent = new Date(data.ts || Date.now()).toLocaleTimeString();
}

const sub = client.newSubscription(channel);
sub.on('publication', (ctx) => render(ctx.data));
sub.on('subscribed', async (ctx) => {
  if (ctx.wasRecovering && ctx.recovered) return; // the missed updates follow
  try {
    const h = await sub.history({ limit: 1, reverse: true });
    if (h.publications[0]) render(h.publications[0].data);
  } catch {
    // no history in this namespace: wait for the next update
  }
});
sub.subscribe();
client.connect();
window.demo = { client, sub };
