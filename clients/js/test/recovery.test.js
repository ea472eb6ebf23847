// Reconnection, resubscription and recovery against a real server:
// a dropped connection (no close frame) and an API disconnect recover
// every missed publication once, in order, also the first ones of a
// channel subscribed before it had any; a server restart (history gone,
// new epoch) reconnects, resubscribes and says `recovered: false`, also
// to a subscription that had seen no publication.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Client, State, connectingCodes, subscribingCodes } from '../src/index.js';
import { Proxy, Server, clientFactory, nextEvent, record, sleep, subscriber as subscribe, waitFor } from './helpers.js';

const FAST = { minReconnectDelay: 50, maxReconnectDelay: 400, timeout: 5000 };

/** A subscribed client that records the `n` of every publication, and its subscription's events. */
const subscriber = (newClient, url, channel) => subscribe(newClient, url, channel, FAST);

const range = (from, to) => Array.from({ length: to - from }, (_, i) => from + i);

describe('reconnect and recover', { timeout: 90000 }, () => {
  const newClient = clientFactory(Client);
  let server;
  before(async () => {
    server = await Server.start('');
  });
  after(async () => {
    await server.close();
  });

  const publish = (channel, from, to) =>
    range(from, to).reduce((p, n) => p.then(() => server.api('publish', { channel, data: { n } })), Promise.resolve());

  test('a dropped connection recovers every missed publication once, in order', async () => {
    const proxy = await Proxy.start(server.addr);
    try {
      // A fresh channel: the subscribe reply names its epoch already.
      const { client, sub, got, events } = await subscriber(newClient, proxy.wsUrl, 'drop:one');
      const epoch = sub.position.epoch;
      assert.match(epoch, /^[0-9a-f]{12}$/);
      assert.equal(sub.position.offset, 0);
      const log = record(client, ['connecting', 'connected']);
      await publish('drop:one', 0, 5);
      await waitFor(() => got.length === 5, 'the first five');
      assert.deepEqual(sub.position, { offset: 5, epoch });

      // The network fails: no close frame; reconnecting fails for a while.
      const refused = proxy.refuse();
      proxy.cut();
      await refused;
      await nextEvent(client, 'connecting');
      assert.equal(client.state, State.Connecting);
      assert.equal(sub.state, 'subscribing');
      await publish('drop:one', 5, 25); // missed while away
      await sleep(300); // a few refused attempts
      assert.equal(client.state, State.Connecting);
      await proxy.accept();
      const resubscribed = nextEvent(sub, 'subscribed', (ctx) => ctx.wasRecovering);
      const during = publish('drop:one', 25, 45); // some race the resubscribe
      const ctx = await resubscribed;
      assert.equal(ctx.recovered, true, 'recovered');
      await during;
      await publish('drop:one', 45, 50);
      await waitFor(() => got.length >= 50, 'all 50 publications');
      await sleep(100);
      assert.deepEqual(got, range(0, 50), 'no gap, no duplicate, in order');
      assert.equal(log[0].event, 'connecting');
      assert.equal(log[0].code, 1006);
      assert.equal(log.filter((e) => e.event === 'connected').length, 1);
      assert.equal(events.filter((e) => e.event === 'subscribing').at(-1).code, subscribingCodes.transportClosed);
      assert.ok(proxy.connections >= 2);
    } finally {
      await proxy.close();
    }
  });

  test('subscribed before the first publication and away during the first ones: they are recovered', async () => {
    const proxy = await Proxy.start(server.addr);
    try {
      const { client, sub, got } = await subscriber(newClient, proxy.wsUrl, 'drop:first');
      const epoch = sub.position.epoch;
      const refused = proxy.refuse();
      proxy.cut();
      await refused;
      await nextEvent(client, 'connecting');
      await publish('drop:first', 0, 2); // the channel's first publications, missed
      const resubscribed = nextEvent(sub, 'subscribed', (ctx) => ctx.wasRecovering);
      await proxy.accept();
      const ctx = await resubscribed;
      assert.equal(ctx.recovered, true, 'recovered');
      assert.deepEqual(ctx.streamPosition, { offset: 2, epoch });
      await waitFor(() => got.length === 2, 'the two missed');
      await sleep(100);
      assert.deepEqual(got, [0, 1]);
    } finally {
      await proxy.close();
    }
  });

  test('an API disconnect with reconnect allowed recovers; without, the client stops', async () => {
    const { client, got, events } = await subscriber(newClient, server.wsUrl, 'api:one');
    await publish('api:one', 0, 3);
    await waitFor(() => got.length === 3, 'three');
    const connecting = nextEvent(client, 'connecting');
    await server.api('disconnect', { user: '', client: client.clientId, reconnect: true, code: 4000, reason: 'go away and come back' });
    const c = await connecting;
    assert.deepEqual([c.code, c.reason], [4000, 'go away and come back']);
    await publish('api:one', 3, 10);
    await waitFor(() => got.length === 10, 'ten');
    assert.deepEqual(got, range(0, 10));
    assert.ok(events.some((e) => e.event === 'subscribed' && e.wasRecovering && e.recovered));

    const disconnected = nextEvent(client, 'disconnected');
    await server.api('disconnect', { user: '', client: client.clientId });
    const d = await disconnected;
    assert.deepEqual([d.code, d.reason], [3000, 'disconnected by the server']);
    assert.equal(client.state, State.Disconnected);
    await sleep(200);
    assert.equal(client.state, State.Disconnected, 'no reconnect after reconnect: false');
    // connect() again resubscribes and recovers what was missed meanwhile
    await publish('api:one', 10, 12);
    const again = nextEvent(client.getSubscription('api:one'), 'subscribed');
    client.connect();
    assert.equal((await again).recovered, true);
    await waitFor(() => got.length === 12, 'twelve');
    assert.deepEqual(got, range(0, 12));
  });

  test('after a server restart: reconnect, resubscribe, recovered: false, then live again', async () => {
    const a = await subscriber(newClient, server.wsUrl, 'restart:one');
    const b = await subscriber(newClient, server.wsUrl, 'restart:two');
    await publish('restart:one', 0, 3);
    await waitFor(() => a.got.length === 3, 'three');
    const oldEpoch = a.sub.position.epoch;
    const bPosition = b.sub.position;
    assert.equal(bPosition.offset, 0);
    const connecting = nextEvent(a.client, 'connecting');
    const resubscribed = nextEvent(a.sub, 'subscribed', (ctx) => ctx.wasRecovering);
    const bResubscribed = nextEvent(b.sub, 'subscribed', (ctx) => ctx.wasRecovering);
    await server.restart();
    const c = await connecting;
    assert.equal(c.code, 3001, 'the shutdown advice');
    const ctx = await resubscribed;
    assert.equal(ctx.recovered, false, 'history is gone: not recovered');
    assert.equal(ctx.recoverable, true);
    assert.equal(a.client.state, State.Connected);
    // b had seen no publication, but its position is of the lost stream:
    // what was published there before the restart cannot be told, so
    // not recovered either.
    const bCtx = await bResubscribed;
    assert.equal(bCtx.recovered, false);
    assert.notEqual(bCtx.streamPosition.epoch, bPosition.epoch);
    assert.deepEqual(b.sub.position, bCtx.streamPosition);

    await publish('restart:one', 100, 102);
    await waitFor(() => a.got.length === 5, 'the new publications');
    assert.deepEqual(a.got, [0, 1, 2, 100, 101]);
    assert.notEqual(a.sub.position.epoch, oldEpoch);
    assert.equal(a.sub.position.offset, 2);
    assert.ok(connectingCodes.connectCalled === 0);
  });
});
