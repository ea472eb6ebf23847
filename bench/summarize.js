#!/usr/bin/env node
// bench/summarize.js RESULTS_DIR - the tables of bench/run, in Markdown, from
// RESULTS_DIR/meta.json and RESULTS_DIR/results.jsonl (one JSON object per run).
// Medians over the rounds, and each server's best round; ratios are
// tidewire's figure divided by the other server's (tidewire on its event
// loop when measured, its default front; else on tokio).
'use strict';

const fs = require('fs');
const path = require('path');

const dir = process.argv[2];
if (!dir) {
  console.error('usage: node bench/summarize.js bench/results/<time>');
  process.exit(2);
}
const meta = JSON.parse(fs.readFileSync(path.join(dir, 'meta.json'), 'utf8'));
const runs = fs
  .readFileSync(path.join(dir, 'results.jsonl'), 'utf8')
  .split('\n')
  .filter((l) => l.trim())
  .map((l) => JSON.parse(l));

const ORDER = ['tidewire', 'tidewire-loop', 'tungstenite', 'fastwebsockets', 'node', 'sink'];
const v = meta.versions || {};
const NAMES = {
  tidewire: `tidewire ${v.tidewire || ''}`.trim(),
  'tidewire-loop': `tidewire ${v.tidewire || ''} --event-loop`.trim(),
  tungstenite: `tokio-tungstenite ${v['tokio-tungstenite'] || ''}`.trim(),
  fastwebsockets: `fastwebsockets ${v.fastwebsockets || ''}`.trim(),
  node: `Node ws ${v.ws || ''}`.trim(),
  sink: 'sink_echo (generator ceiling)',
};
// Servers of --external: after the known ones, under their own names.
const servers = [...ORDER.filter((s) => meta.servers.includes(s)),
  ...meta.servers.filter((s) => !ORDER.includes(s))];
for (const s of servers) NAMES[s] = NAMES[s] || s;
const configs = meta.configs;

function median(xs) {
  const s = xs.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b);
  if (!s.length) return null;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function si(x) {
  if (x >= 1e6) return `${(x / 1e6).toFixed(x >= 1e7 ? 1 : 2)} M`;
  if (x >= 1e3) return `${(x / 1e3).toFixed(0)} k`;
  return x.toFixed(0);
}

function label(config, r) {
  const deflate = config.endsWith('-deflate') ? ', deflate' : '';
  if (r.mode === 'idle') {
    return `idle, ${r.connections.toLocaleString('en-US')} conns (KiB/conn)${deflate}`;
  }
  const size = r.size >= 1024 ? `${r.size / 1024} KiB` : `${r.size} B`;
  return `${r.connections} conns × ${size}, ${r.in_flight} in flight${deflate}`;
}

// The figure a configuration is judged by, and how to print it.
function figure(r) {
  if (r.mode === 'idle') return r.server_kib_per_connection;
  if (!r.generator) return null;
  return r.size >= 65536 ? r.generator.bytes_per_sec / 2 ** 30 : r.generator.messages_per_sec;
}
function show(r0, x) {
  if (r0.mode === 'idle') return `${x.toFixed(x < 10 ? 2 : 1)} KiB`;
  if (r0.size >= 65536) return `${x.toFixed(2)} GiB/s`;
  return si(x);
}

// Generator-bound: in the median run the generator used 95 % of its core or more.
const GENERATOR_BOUND = 0.95;
function bound(rs) {
  // A busy-polling generator reads 100 % whatever it waits for: the sink's
  // row is then the ceiling to compare with.
  if (rs[0].mode === 'idle' || meta.busy_poll) return false;
  const g = median(rs.map((r) => r.generator_cpu_share));
  return g !== null && g >= GENERATOR_BOUND;
}

const cells = {}; // config -> server -> {runs, ...}
for (const r of runs) {
  ((cells[r.config] ||= {})[r.server] ||= []).push(r);
}

function cell(config, server) {
  const rs = (cells[config] || {})[server] || [];
  if (!rs.length) return { text: '—' };
  if (rs.every((r) => r.status === 'n/a')) return { text: 'n/a' };
  const good = rs.filter((r) => r.status === 'ok' || r.status === 'errors');
  if (!good.length) return { text: 'failed' };
  const m = median(good.map(figure));
  if (m === null) return { text: 'failed' };
  const flagged = good.some((r) => r.status === 'errors');
  const noisy = good.some((r) => r.disturbed);
  const partial = good.length < meta.rounds ? ` [${good.length}/${meta.rounds}]` : '';
  return {
    value: m,
    text: show(good[0], m) + (bound(good) ? ' *' : '') + (flagged ? ' !' : '') + (noisy ? ' ~' : '') + partial,
    p99: median(good.map((r) => r.generator && r.generator.latency.p99_us)),
    gen: median(good.map((r) => r.generator_cpu_share)),
    srv: median(good.map((r) => r.server_cpu_share)),
    // Idle rows: the least memory; echo rows: the most throughput.
    best: good[0].mode === 'idle' ? Math.min(...good.map(figure)) : Math.max(...good.map(figure)),
    first: good[0],
  };
}

function row(config) {
  const any = Object.values(cells[config] || {}).flat()[0];
  return any ? label(config, any) : config;
}

const out = [];
const p = (s = '') => out.push(s);

p(`## Peer comparison: medians of ${meta.rounds} round(s), ${meta.duration} s per echo run`);
p();
p('(×N) after a figure: tidewire\'s median divided by that server\'s, so above 1 tidewire');
p('echoes more (for idle KiB/conn: above 1, tidewire uses more memory). msg/s are');
p('messages echoed per second; 64 KiB rows are GiB/s echoed (each way); idle rows are');
p('server RSS per held connection (peak RSS while they stand, less RSS before). * : the');
p('generator used >= 95 % of its core (median): the figure is the generator\'s ceiling, not');
p('the server\'s. ! : some run had errors (listed below). ~ : other processes used more than');
p('0.15 of a core during some run counted here (runs so disturbed are redone once; the');
p('redone ones are left out).');
p();
const BASE = servers.includes('tidewire-loop') ? 'tidewire-loop' : 'tidewire';
const flags = [];

// A table with a row per configuration of `rows`, a column per server,
// `text(config, server)` in each cell.
function table(rows, text) {
  p(`| configuration | ${servers.map((s) => NAMES[s]).join(' | ')} |`);
  p(`|---|${servers.map(() => '---:').join('|')}|`);
  for (const config of rows) {
    p(`| ${row(config)} | ${servers.map((s) => text(config, s)).join(' | ')} |`);
  }
  p();
}

// `shown`, followed by BASE's figure divided by this server's (the figure
// `pick` takes from a cell), when both have one.
function withRatio(config, server, pick, shown) {
  const mine = pick(cell(config, server));
  const base = pick(cell(config, BASE));
  if (server !== BASE && mine !== undefined && base !== undefined && mine > 0) {
    return `${shown} (×${(base / mine).toFixed(2)})`;
  }
  return shown;
}

table(configs, (config, s) => withRatio(config, s, (c) => c.value, cell(config, s).text));
if (meta.rounds > 1) {
  p('Best round of each server (the most throughput; for idle rows the least memory).');
  p('What else runs on this machine only ever slows a run down, so the best round is the');
  p('least disturbed one; ratios as above, best against best:');
  p();
  table(configs, (config, s) => {
    const c = cell(config, s);
    return c.best === undefined ? c.text : withRatio(config, s, (x) => x.best, show(c.first, c.best));
  });
}

const echoConfigs = configs.filter((c) => !c.startsWith('idle'));
if (echoConfigs.length) {
  p('Latency p99 (µs), medians:');
  p();
  table(echoConfigs, (config, s) => {
    const c = cell(config, s);
    if (c.p99 != null) return String(Math.round(c.p99));
    // A generator that does not time echoes (epoll_generator) has no p99.
    return c.value != null ? '—' : c.text;
  });
  p('CPU share of one core, medians: generator / server. The generator\'s is its CPU');
  p('time over the measured interval (generator_cpu_seconds); the server\'s is sampled');
  p('from /proc from 1 s after the generator started to its deadline. A side near');
  p('100 % is the bottleneck.');
  p();
  const pct = (x) => (x == null ? '?' : `${Math.round(x * 100)} %`);
  table(echoConfigs, (config, s) => {
    const c = cell(config, s);
    return c.value !== undefined ? `${pct(c.gen)} / ${pct(c.srv)}` : c.text;
  });
}

for (const r of runs) {
  if (r.status === 'errors' || r.status === 'failed') {
    const what = r.generator
      ? `${r.generator.connected}/${r.generator.connections} connected, errors ${JSON.stringify(r.generator.errors)}`
      : `${r.note || 'no report'} (generator exit ${r.generator_exit})`;
    flags.push(`- round ${r.round}, ${r.config}, ${r.server}: ${what}`);
  }
}
if (flags.length) {
  p('Runs marked ! or failed:');
  p();
  flags.forEach((f) => p(f));
  p();
}
p(`Machine: nproc ${meta.machine.nproc}, ${meta.machine.cpu}, Linux ${meta.machine.kernel}; ${meta.rustc}; Node ${meta.node}.`);
p(`tidewire at ${meta.tidewire_commit}${meta.crates_dirty === 'yes' ? ` with uncommitted changes under crates/ (diff ${meta.crates_diff_sha1})` : ''}.`);
p(`Generator: ${meta.generator === 'epoll' ? 'bench/peers epoll_generator (every echo checked byte for byte, not timed)' : 'tidewire bench'}${meta.busy_poll ? ', busy-polling (its CPU share always reads 100 %)' : ''}.`);
p(`Command: ${meta.command}`);
console.log(out.join('\n'));
