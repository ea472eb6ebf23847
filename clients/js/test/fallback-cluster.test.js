// The HTTP fallbacks on three `tidewire serve --engine redis` nodes behind
// haproxy balancing every request round-robin, with no stickiness (a
// redis-server and haproxy of the test's own; scripts/install-deps
// installs both): long-polling and HTTP-streaming sessions keep working
// though their polls and POSTs land on any node, and when the node that
// holds a session is killed (SIGKILL), its client reconnects through
// haproxy and recovers every publication it missed, once, in order.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { Client } from '../src/index.js';
import { Server, clientFactory, freePort, listening, nextEvent, spawnChecked, startRedis, waitFor } from './helpers.js';

const FAST = { minReconnectDelay: 50, maxReconnectDelay: 400, timeout: 5000 };

describe('fallbacks on three nodes behind round-robin haproxy', { timeout: 120000 }, () => {
  const newClient = clientFactory(Client);
  let redis;
  let haproxy;
  let dir;
  let nodes = [];
  let port;

  before(async () => {
    redis = await startRedis();
    const config = `[engine]\ntype = "redis"\nredis_url = "redis://127.0.0.1:${redis.port}"\nredis_prefix = "rr"\n`;
    nodes = await Promise.all([0, 1, 2].map(() => Server.start(config)));
    port = await freePort();
    dir = mkdtempSync(path.join(tmpdir(), 'tidewire-haproxy-'));
    const cfg = path.join(dir, 'haproxy.cfg');
    writeFileSync(
      cfg,
      [
        'global',
        '  maxconn 1000',
        'defaults',
        '  mode http',
        '  timeout connect 2s',
        '  timeout client 90s',
        '  timeout server 90s',
        '  timeout tunnel 1h',
        '  option redispatch',
        '  retries 3',
        // Every request balanced on its own: no stickiness of any kind.
        '  option http-server-close',
        'frontend tidewire',
        `  bind 127.0.0.1:${port}`,
        '  default_backend nodes',
        'backend nodes',
        '  balance roundrobin',
        '  option httpchk GET /health',
        '  http-check expect status 200',
        '  default-server inter 300ms fall 2 rise 2',
        ...nodes.map((n, i) => `  server node${i} ${n.addr} check`),
        '',
      ].join('\n'),
    );
    haproxy = await spawnChecked('haproxy', ['-f', cfg, '-db']);
    await listening(port);
    // Every node knows the others (their heartbeats), so relays find them.
    await waitFor(async () => (await nodes[0].api('info')).nodes.length === 3, 'three nodes');
  });

  after(async () => {
    haproxy?.kill('SIGKILL');
    await Promise.all(nodes.map((n) => n.close()));
    redis?.child.kill('SIGKILL');
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('long-polling and HTTP streaming through round-robin; the owner killed, the client recovers', async () => {
    const url = `ws://127.0.0.1:${port}/connection/websocket`;
    const subscribe = async (transports) => {
      const client = newClient(url, { ...FAST, transports });
      const sub = client.newSubscription('rr:chat');
      const got = [];
      sub.on('publication', (p) => got.push(p.data.n));
      sub.subscribe();
      client.connect();
      await sub.ready(10000);
      return { client, sub, got };
    };
    const poller = await subscribe(['long_poll']);
    const streamer = await subscribe(['http_stream']);
    assert.equal(poller.client.transport, 'long_poll');
    assert.equal(streamer.client.transport, 'http_stream');

    // Each publishes from its own client: the POSTs land on every node.
    for (let n = 1; n <= 10; n++) await poller.client.publish('rr:chat', { n });
    for (let n = 11; n <= 20; n++) await streamer.client.publish('rr:chat', { n });
    const all = Array.from({ length: 20 }, (_, i) => i + 1);
    await waitFor(() => poller.got.length >= 20 && streamer.got.length >= 20, 'twenty each');
    assert.deepEqual(poller.got, all);
    assert.deepEqual(streamer.got, all);

    // The node that holds the poller's session dies.
    const owner = poller.client._ws._session.split('.')[0];
    const infos = await Promise.all(nodes.map((n) => n.api('info')));
    const victim = nodes[infos.findIndex((i) => i.node === owner)];
    assert.ok(victim, `the owner ${owner} is one of the nodes`);
    const reconnected = nextEvent(poller.sub, 'subscribed', (ctx) => ctx.wasRecovering, 30000);
    victim.child.kill('SIGKILL');
    const alive = nodes.find((n) => n !== victim);
    for (let n = 21; n <= 25; n++) await alive.api('publish', { channel: 'rr:chat', data: { n } });
    const ctx = await reconnected;
    assert.equal(ctx.recovered, true);
    await waitFor(() => poller.got.length >= 25 && streamer.got.length >= 25, 'the rest', 30000);
    const everything = Array.from({ length: 25 }, (_, i) => i + 1);
    assert.deepEqual(poller.got, everything, 'the poller: every publication once, in order');
    assert.deepEqual(streamer.got, everything, 'the streamer too');
    assert.equal(poller.client.transport, 'long_poll');
  });
});
