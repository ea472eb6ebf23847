// The HTTP fallbacks against a real server: a client on HTTP streaming
// alone does what a WebSocket client does (connect, subscribe, publish,
// presence, recover after a cut); with WebSocket refused, or accepted but
// silent, the client falls back to HTTP streaming by itself and says so.
// (SSE needs EventSource, a browser's: tests/e2e covers it.)

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';

import { Client, TRANSPORTS } from '../src/index.js';
import { Proxy, Server, clientFactory, nextEvent, sleep, subscriber, waitFor } from './helpers.js';

const FAST = { minReconnectDelay: 50, maxReconnectDelay: 400, timeout: 3000 };

/** A WebSocket class whose sockets are refused at once. */
class RefusedWebSocket {
  constructor() {
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    setTimeout(() => this.onclose && this.onclose({ code: 1006, reason: 'refused by a proxy' }), 0);
  }

  send() {}

  close() {}
}

describe('HTTP fallbacks', { timeout: 90000 }, () => {
  const newClient = clientFactory(Client);
  let server;
  before(async () => {
    server = await Server.start('');
  });
  after(async () => {
    await server.close();
  });

  test('HTTP streaming alone: connect, subscribe, publish, presence', async () => {
    const { client, sub, got } = await subscriber(newClient, server.wsUrl, 'fb:one', { ...FAST, transports: ['http_stream'] });
    assert.equal(client.transport, 'http_stream');
    await server.api('publish', { channel: 'fb:one', data: { n: 1 } });
    await client.publish('fb:one', { n: 2 });
    await waitFor(() => got.length === 2, 'two publications');
    assert.deepEqual(got, [1, 2]);
    const presence = await sub.presence();
    assert.equal(Object.keys(presence.clients).length, 1);
    const history = await sub.history({ limit: 10 });
    assert.deepEqual(history.publications.map((p) => p.data.n), [1, 2]);
  });

  test('HTTP streaming recovers what it missed after its stream is cut', async () => {
    const proxy = await Proxy.start(server.addr);
    try {
      const { client, sub, got } = await subscriber(newClient, proxy.wsUrl, 'fb:cut', { ...FAST, transports: ['http_stream'] });
      await server.api('publish', { channel: 'fb:cut', data: { n: 0 } });
      await waitFor(() => got.length === 1, 'the first');
      const refused = proxy.refuse();
      proxy.cut();
      await refused;
      await nextEvent(client, 'connecting');
      for (let n = 1; n < 6; n++) await server.api('publish', { channel: 'fb:cut', data: { n } });
      await proxy.accept();
      const ctx = await nextEvent(sub, 'subscribed', (c) => c.wasRecovering);
      assert.equal(ctx.recovered, true);
      await waitFor(() => got.length === 6, 'every missed one');
      assert.deepEqual(got, [0, 1, 2, 3, 4, 5]);
      assert.equal(client.transport, 'http_stream');
    } finally {
      await proxy.close();
    }
  });

  test('WebSocket refused: the client falls back to HTTP streaming by itself', async () => {
    assert.deepEqual(TRANSPORTS, ['websocket', 'http_stream', 'sse', 'long_poll']);
    const client = newClient(server.wsUrl, { ...FAST, WebSocket: RefusedWebSocket });
    const connected = nextEvent(client, 'connected');
    client.connect();
    const ctx = await connected;
    assert.equal(ctx.transport, 'http_stream');
    assert.equal(client.transport, 'http_stream');
    // The next reconnect keeps to the fallback (WebSocket failed just now).
    await server.api('disconnect', { user: '', client: client.clientId, reconnect: true }).catch(() => {});
    const again = await nextEvent(client, 'connected', () => true, 10000);
    assert.equal(again.transport, 'http_stream');
  });

  test('WebSocket accepted but silent: after the timeout, HTTP streaming', async () => {
    // A "proxy" that takes the WebSocket's connection and never answers;
    // HTTP requests go through to the server.
    const silent = net.createServer((socket) => {
      socket.once('data', (head) => {
        if (/upgrade: websocket/i.test(head.toString())) return; // black hole
        const [host, port] = server.addr.split(':');
        const up = net.connect(Number(port), host);
        up.write(head);
        socket.pipe(up).pipe(socket);
        const end = () => {
          socket.destroy();
          up.destroy();
        };
        socket.on('error', end).on('close', end);
        up.on('error', end).on('close', end);
      });
      socket.on('error', () => {});
    });
    await new Promise((resolve) => silent.listen(0, '127.0.0.1', resolve));
    try {
      const url = `ws://127.0.0.1:${silent.address().port}/connection/websocket`;
      const { client, got } = await subscriber(newClient, url, 'fb:silent', { ...FAST, timeout: 1000 });
      assert.equal(client.transport, 'http_stream');
      await server.api('publish', { channel: 'fb:silent', data: { n: 7 } });
      await waitFor(() => got.length === 1, 'the publication');
    } finally {
      silent.close();
      await sleep(10);
    }
  });

  test('long-polling alone: connect, subscribe, publish, recover after a cut', async () => {
    const proxy = await Proxy.start(server.addr);
    try {
      const { client, sub, got } = await subscriber(newClient, proxy.wsUrl, 'fb:poll', { ...FAST, transports: ['long_poll'] });
      assert.equal(client.transport, 'long_poll');
      await server.api('publish', { channel: 'fb:poll', data: { n: 1 } });
      await client.publish('fb:poll', { n: 2 });
      await waitFor(() => got.length === 2, 'two publications');
      const refused = proxy.refuse();
      proxy.cut();
      await refused;
      await nextEvent(client, 'connecting');
      for (let n = 3; n < 6; n++) await server.api('publish', { channel: 'fb:poll', data: { n } });
      await proxy.accept();
      const ctx = await nextEvent(sub, 'subscribed', (c) => c.wasRecovering);
      assert.equal(ctx.recovered, true);
      await waitFor(() => got.length === 5, 'every missed one');
      assert.deepEqual(got, [1, 2, 3, 4, 5]);
    } finally {
      await proxy.close();
    }
  });

  test('withCredentials asks fetch to send cookies to another origin; by default only to the same', async () => {
    for (const [withCredentials, expected] of [[true, 'include'], [false, 'same-origin']]) {
      const modes = new Set();
      const spy = (url, init) => {
        modes.add(init.credentials);
        return fetch(url, init);
      };
      const { client } = await subscriber(newClient, server.wsUrl, `fb:cred:${withCredentials}`,
        { ...FAST, transports: ['long_poll'], fetch: spy, withCredentials });
      await client.publish(`fb:cred:${withCredentials}`, { n: 1 });
      assert.deepEqual([...modes], [expected]);
    }
  });

  test('an unknown transport is refused at construction', () => {
    assert.throws(() => new Client(server.wsUrl, { transports: ['carrier-pigeon'] }), /transports/);
    assert.throws(() => new Client(server.wsUrl, { transports: [] }), /transports/);
  });
});
