#!/usr/bin/env node
// Node `ws` fan-out peer for tidewire's fan-out benchmark (bench/run-fanout):
// every text message a client sends goes to every other connected client.
// The frame is built once per message (ws's `Sender.frame`, unmasked, one
// buffer) and the same buffer is written to each client's socket, so the
// broadcast costs one socket write per client and no per-client encoding.
// bufferutil (installed next to ws) unmasks what clients send.
//
//   node fanout_ws.js --port P
//
// permessage-deflate is off (ws's default).
'use strict';

const { WebSocketServer, WebSocket } = require('ws');

function usage() {
  console.error('usage: node fanout_ws.js --port PORT   (binds 127.0.0.1:PORT)');
  process.exit(2);
}

let port = null;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--port') port = Number(argv[++i]);
  else if (argv[i].startsWith('--port=')) port = Number(argv[i].slice(7));
  else usage();
}
if (!Number.isInteger(port) || port < 0 || port > 65535) usage();

const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });

wss.on('connection', (ws) => {
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => {
    // Built once: header and payload in one buffer.
    const frame = Buffer.concat(WebSocket.Sender.frame(data, {
      fin: true,
      rsv1: false,
      opcode: isBinary ? 2 : 1,
      mask: false,
      readOnly: false,
    }));
    for (const client of wss.clients) {
      if (client !== ws && client.readyState === WebSocket.OPEN) {
        client._sender.sendFrame([frame]);
      }
    }
  });
});

wss.on('listening', () => {
  console.log(`fanout_ws listening on ws://127.0.0.1:${wss.address().port}/`);
});
