#!/usr/bin/env node
// Socket.IO fan-out peer for tidewire's fan-out benchmark
// (bench/run-fanout): clients join a room with the event `join` (answered
// with `joined`), and a `pub` event (room, data) from a client is emitted to
// that room (every member but the sender) as `pub` (data): Socket.IO's
// room broadcast, which encodes the packet once for the room.
//
//   node fanout_socketio.js --port P
//
// WebSocket transport only (the generator connects to
// /socket.io/?EIO=4&transport=websocket), permessage-deflate off (the
// default), no client bundle served.
'use strict';

const http = require('http');
const { Server } = require('socket.io');

function usage() {
  console.error('usage: node fanout_socketio.js --port PORT   (binds 127.0.0.1:PORT)');
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

const server = http.createServer();
const io = new Server(server, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
});

io.on('connection', (socket) => {
  socket.on('join', (room) => {
    socket.join(String(room));
    socket.emit('joined');
  });
  socket.on('pub', (room, data) => {
    socket.to(String(room)).emit('pub', data);
  });
});

server.listen(port, '127.0.0.1', () => {
  console.log(`fanout_socketio listening on ws://127.0.0.1:${server.address().port}/socket.io/`);
});
