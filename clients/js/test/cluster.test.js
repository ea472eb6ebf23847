// Against `tidewire serve --engine redis` (a redis-server of the test's
// own on a free loopback port; scripts/install-deps installs it): when
// Redis loses the history while a client is subscribed, the server tells
// the subscription that publications were lost (unsubscribe code 2002);
// the client subscribes again by itself, learns `recovered: false`, and
// then gets the new publications.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';

import { Client, subscribingCodes } from '../src/index.js';
import { Server, clientFactory, nextEvent, sleep, startRedis, subscriber, waitFor } from './helpers.js';

const FAST = { minReconnectDelay: 50, maxReconnectDelay: 400, timeout: 5000 };

describe('several nodes on Redis', { timeout: 60000 }, () => {
  const newClient = clientFactory(Client);
  let redis;
  let server;
  before(async () => {
    redis = await startRedis();
    server = await Server.start(`[engine]\ntype = "redis"\nredis_url = "redis://127.0.0.1:${redis.port}"\n`);
  });
  after(async () => {
    await server?.close();
    redis?.child.kill('SIGKILL');
  });

  test('history lost in Redis: the subscription is told, subscribes again and says recovered: false', async () => {
    const { sub, got, events } = await subscriber(newClient, server.wsUrl, 'lost:feed', FAST);
    for (const n of [1, 2, 3]) await server.api('publish', { channel: 'lost:feed', data: { n } });
    await waitFor(() => got.length === 3, 'three publications');
    const oldEpoch = sub.position.epoch;

    const told = nextEvent(sub, 'subscribing', (ctx) => ctx.code === subscribingCodes.gap);
    const again = nextEvent(sub, 'subscribed', (ctx) => ctx.wasRecovering);
    const flushed = spawnSync('redis-cli', ['-p', String(redis.port), 'FLUSHALL'], { encoding: 'utf8' });
    assert.equal(flushed.status, 0, flushed.stderr);
    await server.api('publish', { channel: 'lost:feed', data: { n: 100 } });
    await told;
    const ctx = await again;
    assert.equal(ctx.recovered, false, 'the history is gone: not recovered');
    assert.notEqual(sub.position.epoch, oldEpoch);

    await server.api('publish', { channel: 'lost:feed', data: { n: 101 } });
    await waitFor(() => got.includes(101), 'live again');
    await sleep(100);
    assert.deepEqual(got, [1, 2, 3, 101]);
    assert.ok(events.some((e) => e.event === 'subscribing' && e.code === subscribingCodes.gap));
  });
});
