#!/usr/bin/env node
// Node `ws` echo server for tidewire's peer benchmark (bench/run), as ws's
// README writes one: a WebSocketServer on its own port, every message sent
// back with its type. bufferutil (installed next to ws) masks and unmasks;
// UTF-8 is checked by Node's own buffer.isUtf8, so ws needs no
// utf-8-validate on Node >= 18.14.
//
//   node ws_echo.js --port P [--deflate]
//
// permessage-deflate is off unless --deflate, which offers it with ws's
// defaults (`perMessageDeflate: true`: messages under 1024 bytes are sent
// uncompressed, context takeover as negotiated).
'use strict';

const { WebSocketServer } = require('ws');

function usage() {
  console.error('usage: node ws_echo.js --port PORT [--deflate]   (binds 127.0.0.1:PORT)');
  process.exit(2);
}

let port = null;
let deflate = false;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--port') port = Number(argv[++i]);
  else if (argv[i].startsWith('--port=')) port = Number(argv[i].slice(7));
  else if (argv[i] === '--deflate') deflate = true;
  else usage();
}
if (!Number.isInteger(port) || port < 0 || port > 65535) usage();

const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: deflate });

wss.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    ws.send(data, { binary: isBinary });
  });
});

wss.on('listening', () => {
  console.log(`ws_echo listening on ws://127.0.0.1:${wss.address().port}/` +
    (deflate ? ' (permessage-deflate offered)' : ''));
});
