// The client against a real `tidewire serve` with its embedded defaults:
// connect, subscribe, publish, join/leave, presence, history, errors,
// promises, and the `WebSocket` option (the ws package, for Node 20).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { WebSocket as WsWebSocket } from 'ws';

import {
  Client,
  State,
  SubscriptionState,
  TidewireError,
  disconnectedCodes,
  errorCodes,
} from '../src/index.js';
import { Server, clientFactory, nextEvent, record, waitFor } from './helpers.js';

const FAST = { minReconnectDelay: 50, maxReconnectDelay: 500, timeout: 5000 };

describe('client against tidewire serve', { timeout: 60000 }, () => {
  const newClient = clientFactory(Client);
  let server;
  before(async () => {
    server = await Server.start('');
  });
  after(async () => {
    await server.close();
  });

  test('connects, subscribes, publishes and receives with offsets and info', async () => {
    const client = newClient(server.wsUrl, FAST);
    const events = record(client, ['state', 'connecting', 'connected']);
    assert.equal(client.state, State.Disconnected);
    client.connect();
    assert.equal(client.state, State.Connecting);
    await client.ready(5000);
    assert.equal(client.state, State.Connected);
    assert.match(client.clientId, /^[0-9a-f]{16}$/);
    assert.equal(client.maxMessageSize, 64 * 1024, "the server's limit, from the connect reply");
    assert.equal(client.user, '');
    assert.deepEqual(
      events.map((e) => e.event),
      ['state', 'connecting', 'state', 'connected'],
    );

    const sub = client.newSubscription('basic:one');
    const subscribed = nextEvent(sub, 'subscribed');
    sub.subscribe();
    const ctx = await subscribed;
    assert.equal(sub.state, SubscriptionState.Subscribed);
    assert.equal(ctx.recoverable, true);
    assert.equal(ctx.positioned, true);
    assert.equal(ctx.wasRecovering, false);
    // Nothing published yet: offset 0 of the epoch the publications will have.
    assert.equal(ctx.streamPosition.offset, 0);
    assert.match(ctx.streamPosition.epoch, /^[0-9a-f]{12}$/);
    assert.deepEqual(sub.position, ctx.streamPosition);

    const got = [];
    sub.on('publication', (p) => got.push(p));
    const r1 = await sub.publish({ text: 'hello' });
    assert.deepEqual(r1, { offset: 1, epoch: ctx.streamPosition.epoch });
    await server.api('publish', { channel: 'basic:one', data: { text: 'from the API' } });
    await waitFor(() => got.length === 2, 'two publications');
    assert.deepEqual(got[0], {
      channel: 'basic:one',
      data: { text: 'hello' },
      offset: 1,
      info: { client: client.clientId, user: '' },
    });
    assert.deepEqual(got[1], { channel: 'basic:one', data: { text: 'from the API' }, offset: 2 });
    assert.deepEqual(sub.position, { offset: 2, epoch: r1.epoch });

    client.disconnect();
    assert.equal(client.state, State.Disconnected);
    await assert.rejects(client.ready(), (e) => e.code === errorCodes.clientDisconnected);
  });

  test('join, leave, presence, presence stats and history', async () => {
    const a = newClient(server.wsUrl, FAST);
    const b = newClient(server.wsUrl, FAST);
    a.connect();
    b.connect();
    await Promise.all([a.ready(5000), b.ready(5000)]);
    const subA = a.newSubscription('room:presence');
    const joins = [];
    const leaves = [];
    subA.on('join', (ctx) => joins.push(ctx.info.client));
    subA.on('leave', (ctx) => leaves.push(ctx.info.client));
    const clientJoins = [];
    a.on('join', (ctx) => clientJoins.push(ctx.channel));
    subA.subscribe();
    await subA.ready(5000);
    const subB = b.newSubscription('room:presence');
    subB.subscribe();
    await subB.ready(5000);
    await waitFor(() => joins.includes(b.clientId), 'the join of b');
    assert.ok(joins.includes(a.clientId), 'a sees its own join');
    assert.ok(clientJoins.length >= 2, 'join events on the client too');

    const presence = await subA.presence();
    assert.deepEqual(
      presence.clients.map((c) => c.client).sort(),
      [a.clientId, b.clientId].sort(),
    );
    assert.deepEqual(await a.presenceStats('room:presence'), { clients: 2, users: 1 });

    for (let i = 1; i <= 5; i++) await subB.publish({ n: i });
    const latest = await subA.history({ limit: 2, reverse: true });
    assert.deepEqual(
      latest.publications.map((p) => p.data.n),
      [5, 4],
    );
    assert.equal(latest.offset, 5);
    const since = await a.history('room:presence', { since: { offset: 3, epoch: latest.epoch } });
    assert.deepEqual(
      since.publications.map((p) => [p.offset, p.data.n]),
      [
        [4, 4],
        [5, 5],
      ],
    );

    const bId = b.clientId;
    subB.unsubscribe();
    assert.equal(subB.state, SubscriptionState.Unsubscribed);
    await waitFor(() => leaves.includes(bId), 'the leave of b');
    b.disconnect();
    a.disconnect();
  });

  test('batches stay under the server\'s message size in bytes, not characters', async () => {
    const client = newClient(server.wsUrl, FAST);
    client.connect();
    await client.ready(5000);
    const sub = client.newSubscription('bytes:euro');
    sub.subscribe();
    await sub.ready(5000);
    // 10,000 three-byte characters a command: 4 of them are 40,000
    // characters (over maxBatchBytes only by bytes) and 120 KB.
    const text = '€'.repeat(10000);
    // Queued in one tick: one flush batches them.
    const acks = await Promise.all([1, 2, 3, 4].map((n) => client.publish('bytes:euro', { n, text })));
    assert.deepEqual(
      acks.map((a) => a.offset),
      [1, 2, 3, 4],
    );
    assert.equal(client.state, State.Connected, 'not closed for a message over the size limit');
    client.disconnect();
  });

  test('presence diffs: joins gathered into one event, counts only in a big channel, relist after', async () => {
    const big = await Server.start('[namespaces.big]\njoin_leave_max_members = 2\njoin_leave_interval = "0s"\n');
    try {
      const clients = [0, 1, 2].map(() => newClient(big.wsUrl, FAST));
      for (const c of clients) c.connect();
      await Promise.all(clients.map((c) => c.ready(5000)));
      const [a, b, c] = clients;
      const subA = a.newSubscription('big:room');
      const joins = [];
      const diffs = [];
      subA.on('join', (ctx) => joins.push(ctx.info.client));
      subA.on('presence_diff', (ctx) => diffs.push(ctx));
      subA.subscribe();
      await subA.ready(5000);
      const subB = b.newSubscription('big:room');
      subB.subscribe();
      await subB.ready(5000);
      await waitFor(() => joins.includes(b.clientId), 'the join of b');
      assert.deepEqual(joins, [a.clientId, b.clientId]);
      assert.deepEqual(
        diffs.map((d) => [d.joined, d.left, d.listed, d.relist]),
        [
          [1, 0, true, false],
          [1, 0, true, false],
        ],
      );
      // A third member: over the limit, counted but not named.
      const subC = c.newSubscription('big:room');
      subC.subscribe();
      await subC.ready(5000);
      await waitFor(() => diffs.length === 3, 'the third diff');
      assert.deepEqual(diffs[2].joins, []);
      assert.deepEqual([diffs[2].joined, diffs[2].listed, diffs[2].relist], [1, false, false]);
      assert.deepEqual(joins, [a.clientId, b.clientId], 'no join event for an unlisted join');
      // Back at the limit: listed again, and the list must be fetched anew.
      subC.unsubscribe();
      await waitFor(() => diffs.length === 4, 'the fourth diff');
      assert.deepEqual([diffs[3].left, diffs[3].listed, diffs[3].relist], [1, true, true]);
      assert.deepEqual(diffs[3].leaves.map((l) => l.client), [c.clientId]);
      for (const client of clients) client.disconnect();
    } finally {
      await big.close();
    }
  });

  test('errors: a refused subscription ends unsubscribed; bad commands reject with the protocol code', async () => {
    const client = newClient(server.wsUrl, FAST);
    client.connect();
    await client.ready(5000);
    const bad = client.newSubscription('bad channel');
    const errors = record(bad, ['error']);
    const unsubscribed = nextEvent(bad, 'unsubscribed');
    bad.subscribe();
    const ctx = await unsubscribed;
    assert.equal(ctx.code, 2); // unsubscribedCodes.refused
    assert.equal(errors[0].error.code, 109);
    await assert.rejects(bad.ready(), (e) => e.code === errorCodes.subscriptionUnsubscribed);

    await assert.rejects(client.publish('bad channel', 1), (e) => e instanceof TidewireError && e.code === 109);
    // presence needs a subscription
    await assert.rejects(client.presence('not:subscribed'), (e) => e.code === 107);
    assert.throws(() => client.newSubscription('bad channel'), /exists already/);
    client.removeSubscription(bad);
    assert.equal(client.getSubscription('bad channel'), null);
    assert.throws(() => new Client(server.wsUrl, { nope: 1 }), /unknown option/);
    client.disconnect();
  });

  test('calls made while connecting wait for the connection; ready() times out', async () => {
    const client = newClient(server.wsUrl, FAST);
    const sub = client.newSubscription('queue:one');
    sub.subscribe();
    client.connect();
    // Sent once connected and subscribed.
    const result = await sub.publish({ early: true });
    assert.equal(result.offset, 1);
    client.disconnect();

    const nowhere = newClient('ws://127.0.0.1:9/connection/websocket', FAST);
    nowhere.connect();
    await assert.rejects(nowhere.ready(300), (e) => e.code === errorCodes.timeout);
    const disconnected = nextEvent(nowhere, 'disconnected');
    nowhere.disconnect();
    assert.equal((await disconnected).code, disconnectedCodes.disconnectCalled);
  });

  test('unsubscribe while the subscribe is in flight leaves the channel', async () => {
    const client = newClient(server.wsUrl, FAST);
    client.connect();
    await client.ready(5000);
    const sub = client.newSubscription('flight:one');
    sub.subscribe();
    sub.unsubscribe();
    sub.subscribe();
    await sub.ready(5000);
    sub.unsubscribe();
    await waitFor(async () => {
      const { channels } = await server.api('channels', { prefix: 'flight:' });
      return channels.length === 0;
    }, 'the channel to be empty');
    client.disconnect();
  });

  test('the ws package as the WebSocket option (Node 20)', async () => {
    const client = newClient(server.wsUrl, { ...FAST, WebSocket: WsWebSocket });
    client.connect();
    await client.ready(5000);
    const sub = client.newSubscription('ws:pkg');
    const got = [];
    sub.on('publication', (p) => got.push(p.data));
    sub.subscribe();
    await sub.ready(5000);
    await server.api('publish', { channel: 'ws:pkg', data: 'über' });
    await waitFor(() => got.length === 1, 'a publication');
    assert.deepEqual(got, ['über']);
    // reconnects and recovers with it too
    await server.api('disconnect', { user: '', client: client.clientId, reconnect: true });
    await nextEvent(client, 'connecting');
    await server.api('publish', { channel: 'ws:pkg', data: 'missed?' });
    const subscribed = await nextEvent(sub, 'subscribed');
    assert.equal(subscribed.wasRecovering, true);
    await waitFor(() => got.length === 2, 'the second publication');
    assert.deepEqual(got, ['über', 'missed?']);
    client.disconnect();
  });
});
