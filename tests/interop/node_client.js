#!/usr/bin/env node
// Reference CLIENT for tidewire's interop tests, built on Node `ws`: runs a
// scripted conversation against an ECHO server and exits 0 only if every
// check passed. Same checks and output as py_client.py.
//
//   node tests/interop/node_client.js URL [--require-deflate] [--timeout SECS]
//
// Checks, in order, one output line each ("PASS <check>" or
// "FAIL <check>: <why>"), then "RESULT: PASS" or "RESULT: FAIL (...)":
//   connect    opening handshake (prints the negotiated extensions; with
//              --require-deflate, fails unless permessage-deflate was agreed)
//   text       "hello" echoed as text
//   large      a 100 KiB compressible text message echoed
//   binary     bytes 0..255 echoed as binary
//   fragmented a text message sent as 4 frames (send(data, {fin: false}))
//              echoed as the whole message
//   ping       ping with payload answered by a pong with the same payload
//   close      close with 4000 "done"; the server's close frame echoes 4000
//
// Exit status: 0 all passed, 1 a check failed, 2 usage error. Gives up after
// --timeout seconds (default 30) in total.
'use strict';
const WebSocket = require('ws');

const STEP_TIMEOUT_MS = 10000;

function usage(msg) {
  if (msg) console.error(`node_client: ${msg}`);
  console.error('usage: node_client.js URL [--require-deflate] [--timeout SECS]');
  process.exit(2);
}

let url = null;
let requireDeflate = false;
let timeoutSecs = 30;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === '--require-deflate') requireDeflate = true;
  else if (a === '--timeout') {
    timeoutSecs = Number(argv[++i]);
    if (!Number.isFinite(timeoutSecs) || timeoutSecs <= 0) usage('bad --timeout');
  } else if (a === '-h' || a === '--help') usage();
  else if (a.startsWith('-')) usage(`unknown option ${a}`);
  else if (url === null) url = a;
  else usage('only one URL');
}
if (url === null) usage('URL missing');

const failed = [];
const pass = (name, detail) => console.log(`PASS ${name}${detail ? ` (${detail})` : ''}`);
const fail = (name, why) => {
  failed.push(name);
  console.log(`FAIL ${name}: ${why}`);
};
const short = (v) => {
  const s = JSON.stringify(typeof v === 'string' ? v : Array.from(v));
  return s.length <= 60 ? s : `${s.slice(0, 60)}...(${v.length})`;
};

// A queue of incoming events so each step can await "the next message".
class Inbox {
  constructor(ws) {
    this.items = [];
    this.waiters = [];
    ws.on('message', (data, isBinary) => this.push({ kind: 'message', data, isBinary }));
    ws.on('pong', (data) => this.push({ kind: 'pong', data }));
    ws.on('close', (code, reason) => this.push({ kind: 'close', code, reason: reason.toString() }));
    ws.on('error', (err) => this.push({ kind: 'error', err }));
  }
  push(item) {
    const w = this.waiters.shift();
    if (w) w(item);
    else this.items.push(item);
  }
  next(what) {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(resolve), 1);
        resolve({ kind: 'timeout', what });
      }, STEP_TIMEOUT_MS);
      this.waiters.push((item) => {
        clearTimeout(t);
        resolve(item);
      });
    });
  }
}

function describe(ev) {
  switch (ev.kind) {
    case 'timeout': return `nothing received within ${STEP_TIMEOUT_MS / 1000}s`;
    case 'close': return `connection closed (${ev.code} ${JSON.stringify(ev.reason)})`;
    case 'error': return `error: ${ev.err.message}`;
    case 'pong': return 'unexpected pong';
    default: return `unexpected ${ev.isBinary ? 'binary' : 'text'} message`;
  }
}

class Abort extends Error {}

async function echoCheck(inbox, name, expected, isBinary, send) {
  send();
  const ev = await inbox.next(name);
  if (ev.kind !== 'message') {
    fail(name, describe(ev));
    if (ev.kind === 'close' || ev.kind === 'error') throw new Abort();
    return;
  }
  const got = ev.isBinary ? ev.data : ev.data.toString('utf8');
  if (ev.isBinary !== isBinary) {
    fail(name, `echo is ${ev.isBinary ? 'binary' : 'text'}, expected ${isBinary ? 'binary' : 'text'}`);
  } else if (isBinary ? !Buffer.from(got).equals(expected) : got !== expected) {
    fail(name, `echo differs: got ${short(got)}, expected ${short(expected)}`);
  } else {
    pass(name, `${expected.length} ${isBinary ? 'bytes' : 'chars'}`);
  }
}

async function conversation() {
  const ws = new WebSocket(url, {
    perMessageDeflate: { threshold: 0 },
    maxPayload: 0,
    maxFragments: 0,
    handshakeTimeout: STEP_TIMEOUT_MS,
  });
  const inbox = new Inbox(ws);
  const opened = await new Promise((resolve) => {
    ws.once('open', () => resolve(null));
    ws.once('unexpected-response', (req, res) => resolve(`HTTP ${res.statusCode} ${res.statusMessage}`));
    ws.once('error', (err) => resolve(err.message));
  });
  if (opened !== null) {
    fail('connect', opened);
    return;
  }
  inbox.items = inbox.items.filter((e) => e.kind !== 'error');
  const ext = ws.extensions || '';
  if (requireDeflate && !ext.includes('permessage-deflate')) {
    fail('connect', `permessage-deflate not negotiated (extensions: ${JSON.stringify(ext)})`);
  } else {
    pass('connect', `extensions: ${ext || 'none'}`);
  }

  try {
    await echoCheck(inbox, 'text', 'hello', false, () => ws.send('hello'));

    const parts = [];
    let len = 0;
    for (let i = 0; len < 100 * 1024; i++) {
      const line = `tidewire interop: the quick brown fox jumps over the lazy dog ${i}\n`;
      parts.push(line);
      len += line.length;
    }
    const big = parts.join('').slice(0, 100 * 1024);
    await echoCheck(inbox, 'large', big, false, () => ws.send(big));

    const bin = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
    await echoCheck(inbox, 'binary', bin, true, () => ws.send(bin, { binary: true }));

    const frags = ['frag-one|', 'frag-two|', 'frag-three|', 'end'];
    await echoCheck(inbox, 'fragmented', frags.join(''), false, () => {
      frags.forEach((f, i) => ws.send(f, { binary: false, fin: i === frags.length - 1 }));
    });

    const pingData = Buffer.from('tidewire-ping');
    const t0 = process.hrtime.bigint();
    ws.ping(pingData);
    const pong = await inbox.next('ping');
    if (pong.kind !== 'pong') {
      fail('ping', describe(pong));
      if (pong.kind === 'close' || pong.kind === 'error') throw new Abort();
    } else if (!pong.data.equals(pingData)) {
      fail('ping', `pong payload ${short(pong.data)} differs from ping payload`);
    } else {
      pass('ping', `pong after ${(Number(process.hrtime.bigint() - t0) / 1e6).toFixed(1)} ms`);
    }

    ws.close(4000, 'done');
    let ev = await inbox.next('close');
    while (ev.kind === 'message' || ev.kind === 'pong') ev = await inbox.next('close');
    if (ev.kind !== 'close') {
      fail('close', describe(ev));
    } else if (ev.code !== 4000) {
      fail('close', `server closed with ${ev.code} ${JSON.stringify(ev.reason)}, expected 4000`);
    } else {
      pass('close', `server echoed ${ev.code} ${JSON.stringify(ev.reason)}`);
    }
  } catch (e) {
    if (!(e instanceof Abort)) throw e;
  } finally {
    if (ws.readyState !== WebSocket.CLOSED) ws.terminate();
  }
}

const overall = setTimeout(() => {
  fail('timeout', `conversation did not finish within ${timeoutSecs}s`);
  finish();
}, timeoutSecs * 1000);

function finish() {
  clearTimeout(overall);
  if (failed.length) {
    console.log(`RESULT: FAIL (${failed.length} failed: ${failed.join(', ')})`);
    process.exit(1);
  }
  console.log('RESULT: PASS');
  process.exit(0);
}

conversation().then(finish, (err) => {
  fail('conversation', `unexpected exception: ${err && err.stack ? err.stack : err}`);
  finish();
});
