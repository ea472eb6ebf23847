#!/usr/bin/env node
// Reference echo SERVER for tidewire's interop tests, built on Node `ws`
// (tests/interop/package.json, installed by scripts/install-deps).
// permessage-deflate on (threshold 0: every message is compressed), no
// payload limit, no fragment limit (as in tests/autobahn/examples).
//
//   node tests/interop/node_echo_server.js [PORT] [--close-after N] [--lifetime SECS]
//
// PORT            port on 127.0.0.1 (default 0 = ephemeral)
// --close-after N after echoing N messages on a connection, close it with
//                 code 4001 reason "bye"
// --lifetime SECS exit after SECS seconds at the latest (default 300)
//
// Prints "READY <port>" on stdout once it listens. Exits by itself: when its
// parent process goes away, after --lifetime, or on SIGTERM/SIGINT.
'use strict';
const { WebSocketServer } = require('ws');

function usage(msg) {
  if (msg) console.error(`node_echo_server: ${msg}`);
  console.error('usage: node_echo_server.js [PORT] [--close-after N] [--lifetime SECS]');
  process.exit(2);
}

let port = 0;
let closeAfter = null;
let lifetime = 300;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const value = () => {
    if (i + 1 >= argv.length) usage(`${a} needs a value`);
    const v = Number(argv[++i]);
    if (!Number.isFinite(v) || v < 0) usage(`bad value for ${a}`);
    return v;
  };
  if (a === '--close-after') closeAfter = value();
  else if (a === '--lifetime') lifetime = value();
  else if (a === '-h' || a === '--help') usage();
  else if (/^\d+$/.test(a)) port = Number(a);
  else usage(`unknown argument ${a}`);
}

const wss = new WebSocketServer({
  host: '127.0.0.1',
  port,
  perMessageDeflate: { threshold: 0 },
  maxPayload: 0, // unlimited
  maxFragments: 0, // unlimited (ws >= 8.18 defaults to 16384)
});

wss.on('connection', (ws) => {
  let count = 0;
  ws.on('message', (data, isBinary) => {
    if (ws.readyState !== ws.OPEN) return;
    ws.send(data, { binary: isBinary });
    count += 1;
    if (closeAfter !== null && count >= closeAfter) ws.close(4001, 'bye');
  });
  ws.on('error', () => {});
});

function stop(reason) {
  console.error(`node_echo_server: stopping (${reason})`);
  for (const c of wss.clients) c.terminate();
  wss.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
}

wss.on('error', (err) => {
  console.error(`node_echo_server: ${err.message}`);
  process.exit(1);
});
wss.on('listening', () => {
  process.stdout.write(`READY ${wss.address().port}\n`);
});

process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
setTimeout(() => stop('lifetime'), lifetime * 1000).unref();
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) stop('parent exited');
}, 500).unref();
