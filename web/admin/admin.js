// The admin page: trades the admin secret for an admin token
// (POST /admin/token), connects over the hub's own WebSocket with it,
// subscribes to the reserved channel $admin and draws what its node sends
// every second: every node of the cluster with its counts, its rates
// (from the cumulative counters of two successive reports) and its
// engine's health.
//
// The secret stays in this page's memory (to fetch a new token before the
// current one expires); only the token is kept in sessionStorage, so that
// a reload does not ask again while it lasts.

import { Client, UnauthorizedError } from '/client/tidewire.js';

const $ = (id) => document.getElementById(id);
const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/connection/websocket`;
const HISTORY_SECONDS = 120;
const COLORS = ['#4aa3ff', '#3ecf8e', '#ffb347', '#ff6b9a', '#b58cff', '#5fd3d3', '#e6e36b', '#ff8a5c'];

let secret = null;
let client = null;
/** Per node: its last report, the rates it gave, and series for the charts. */
const nodes = new Map();
/** Samples for the charts: {t, values: Map(node -> {connections, publications, deliveries})}. */
const samples = [];

async function fetchToken(given) {
  const response = await fetch('/admin/token', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ secret: given }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  sessionStorage.setItem('tidewire-admin-token', body.token);
  return body.token;
}

function setState(state, text) {
  const el = $('state');
  el.dataset.state = state;
  el.textContent = text;
}

function showLogin(message) {
  $('dashboard').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  setState('disconnected', 'signed out');
}

function start(token) {
  client?.disconnect();
  client = new Client(wsUrl, {
    token,
    // A new token when this one nears its end (or was refused).
    getToken: async () => {
      if (!secret) throw new UnauthorizedError('sign in again');
      try {
        return await fetchToken(secret);
      } catch (e) {
        if (e.status === 401 || e.status === 404) throw new UnauthorizedError(e.message);
        throw e;
      }
    },
  });
  client.on('connecting', () => setState('connecting', 'connecting…'));
  client.on('connected', () => setState('connected', 'live'));
  client.on('disconnected', ({ reason }) => {
    sessionStorage.removeItem('tidewire-admin-token');
    showLogin(`disconnected: ${reason}`);
  });
  const subscription = client.newSubscription('$admin');
  subscription.on('publication', ({ data }) => onView(data));
  subscription.on('error', ({ error }) => { $('summary').textContent = `admin channel: ${error.message}`; });
  subscription.subscribe();
  client.connect();
  $('login').hidden = true;
  $('dashboard').hidden = false;
}

function onView(view) {
  const seen = new Set();
  for (const n of view.nodes) {
    seen.add(n.node);
    let entry = nodes.get(n.node);
    if (!entry) {
      entry = { color: COLORS[nodes.size % COLORS.length], rates: { publications: 0, deliveries: 0 } };
      nodes.set(n.node, entry);
    }
    const last = entry.report;
    if (last && n.at_ms > last.at_ms) {
      const seconds = (n.at_ms - last.at_ms) / 1000;
      entry.rates = {
        publications: Math.max(0, (n.publications - last.publications) / seconds),
        deliveries: Math.max(0, (n.deliveries - last.deliveries) / seconds),
      };
    }
    if (!last || n.at_ms >= last.at_ms) entry.report = n;
    entry.heard = n.heard_seconds_ago;
    entry.thisNode = n.this_node;
  }
  for (const id of [...nodes.keys()]) if (!seen.has(id)) nodes.delete(id);
  const values = new Map();
  for (const [id, entry] of nodes) {
    values.set(id, {
      connections: entry.report.counts.sessions,
      publications: entry.rates.publications,
      deliveries: entry.rates.deliveries,
    });
  }
  samples.push({ t: view.at_ms, values });
  while (samples.length > HISTORY_SECONDS) samples.shift();
  $('summary').textContent = `${nodes.size} node${nodes.size === 1 ? '' : 's'} · engine ${view.engine} · this page on node ${view.node}`;
  drawTable();
  drawChart('chart-connections', 'connections');
  drawChart('chart-publications', 'publications');
  drawChart('chart-deliveries', 'deliveries');
}

const rate = (x) => (x >= 100 ? Math.round(x).toLocaleString() : x.toFixed(1));
const duration = (s) => (s < 120 ? `${s}s` : s < 7200 ? `${Math.floor(s / 60)}m` : `${Math.floor(s / 3600)}h`);

function cell(text, className) {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function drawTable() {
  const body = $('nodes').tBodies[0];
  body.replaceChildren();
  const total = { sessions: 0, clients: 0, users: 0, channels: 0, subscriptions: 0, publications: 0, deliveries: 0 };
  for (const [id, entry] of nodes) {
    const { counts, uptime_seconds: uptime, unhealthy } = entry.report;
    const tr = document.createElement('tr');
    tr.dataset.node = id;
    const name = cell(entry.thisNode ? `${id} (this page)` : id);
    name.style.borderLeft = `4px solid ${entry.color}`;
    tr.append(
      name,
      cell(duration(uptime)),
      cell(counts.sessions.toLocaleString(), 'connections'),
      cell(counts.clients.toLocaleString()),
      cell(counts.users.toLocaleString()),
      cell(counts.channels.toLocaleString()),
      cell(counts.subscriptions.toLocaleString()),
      cell(rate(entry.rates.publications), 'publications'),
      cell(rate(entry.rates.deliveries), 'deliveries'),
      cell(unhealthy ? `unhealthy: ${unhealthy}` : 'ok', `health ${unhealthy ? 'bad' : 'ok'}`),
      cell(entry.thisNode ? 'now' : `${entry.heard}s ago`),
    );
    body.append(tr);
    for (const k of ['sessions', 'clients', 'users', 'channels', 'subscriptions']) total[k] += counts[k];
    total.publications += entry.rates.publications;
    total.deliveries += entry.rates.deliveries;
  }
  // Users and channels may be on several nodes: their totals are upper bounds.
  $('totals').replaceChildren(
    cell('all nodes'), cell(''),
    cell(total.sessions.toLocaleString(), 'connections'), cell(total.clients.toLocaleString()),
    cell(`≤ ${total.users.toLocaleString()}`), cell(`≤ ${total.channels.toLocaleString()}`),
    cell(total.subscriptions.toLocaleString()), cell(rate(total.publications)),
    cell(rate(total.deliveries)), cell(''), cell(''),
  );
}

function drawChart(canvasId, key) {
  const canvas = $(canvasId);
  const ctx = canvas.getContext('2d');
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  let max = 1;
  for (const s of samples) for (const v of s.values.values()) max = Math.max(max, v[key]);
  max *= 1.1;
  ctx.strokeStyle = '#273443';
  ctx.fillStyle = '#8798aa';
  ctx.font = '11px system-ui, sans-serif';
  for (let i = 0; i <= 4; i++) {
    const y = Math.round((height - 14) * (1 - i / 4)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(40, y);
    ctx.lineTo(width, y);
    ctx.stroke();
    ctx.fillText(rate((max * i) / 4), 2, Math.max(10, y - 2));
  }
  const x = (i) => 40 + ((width - 40) * i) / Math.max(1, HISTORY_SECONDS - 1);
  const y = (v) => (height - 14) * (1 - v / max);
  const offset = HISTORY_SECONDS - samples.length;
  let drawn = 0;
  for (const [id, entry] of nodes) {
    ctx.strokeStyle = entry.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    samples.forEach((s, i) => {
      const v = s.values.get(id);
      if (!v) { started = false; return; }
      if (started) ctx.lineTo(x(offset + i), y(v[key]));
      else ctx.moveTo(x(offset + i), y(v[key]));
      started = true;
      drawn++;
    });
    ctx.stroke();
  }
  ctx.lineWidth = 1;
  canvas.dataset.points = String(drawn);
  const legend = document.querySelector(`.legend[data-for="${canvasId}"]`);
  legend.replaceChildren(...[...nodes].map(([id, entry]) => {
    const span = document.createElement('span');
    span.style.color = entry.color;
    const last = samples.at(-1)?.values.get(id)?.[key] ?? 0;
    span.textContent = `■ ${id.slice(0, 8)} ${rate(last)}`;
    return span;
  }));
}

$('login').addEventListener('submit', async (event) => {
  event.preventDefault();
  const given = $('secret').value;
  $('login-error').textContent = '';
  try {
    const token = await fetchToken(given);
    secret = given;
    $('secret').value = '';
    start(token);
  } catch (e) {
    showLogin(e.status === 401 ? 'wrong secret' : `cannot sign in: ${e.message}`);
  }
});

$('sign-out').addEventListener('click', () => {
  secret = null;
  sessionStorage.removeItem('tidewire-admin-token');
  client?.disconnect();
  client = null;
  showLogin('');
});

const kept = sessionStorage.getItem('tidewire-admin-token');
if (kept) start(kept);
