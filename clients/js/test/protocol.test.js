// The client's protocol logic against a scripted fake WebSocket (no
// server): batching, duplicate and gap handling, the epoch of a fresh
// channel's position, the
// server's disconnect advice, the ping watchdog, backoff delays, refresh
// pushes, error replies.

import assert from 'node:assert/strict';
import { afterEach, describe, test } from 'node:test';

import { Client, SUBPROTOCOL, connectingCodes, subscribingCodes } from '../src/index.js';
import { nextEvent, record, sleep, waitFor } from './helpers.js';

/** A WebSocket the test plays the server of. */
class FakeWebSocket {
  static all = [];

  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.messages = []; // raw messages sent by the client
    this.commands = []; // parsed commands, in order
    this.taken = 0;
    this.closed = null;
    this.created = Date.now();
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    FakeWebSocket.all.push(this);
    if (!FakeWebSocket.refuse) setTimeout(() => this.onopen && this.onopen({}), 0);
    else setTimeout(() => this.onclose && this.onclose({ code: 1006, reason: '' }), 0);
  }

  send(text) {
    this.messages.push(text);
    for (const line of text.split('\n')) this.commands.push(JSON.parse(line));
  }

  close(code, reason) {
    this.closed = { code, reason };
  }

  /** The next command the client sent (waits for it). */
  async next(method) {
    await waitFor(() => this.commands.length > this.taken, `a ${method} command`, 3000);
    const command = this.commands[this.taken++];
    assert.ok(method in command, `expected ${method}, got ${JSON.stringify(command)}`);
    return command;
  }

  push(message) {
    this.onmessage({ data: JSON.stringify(message) });
  }

  reply(command, result) {
    const method = Object.keys(command).find((k) => k !== 'id');
    this.push({ id: command.id, [method]: result });
  }

  drop(code = 1006, reason = '') {
    this.onclose({ code, reason });
  }
}

const made = [];
afterEach(() => {
  for (const c of made.splice(0)) c.disconnect();
  FakeWebSocket.all = [];
  FakeWebSocket.refuse = false;
});

function fakeClient(options = {}) {
  const client = new Client('ws://fake/connection/websocket', {
    WebSocket: FakeWebSocket,
    minReconnectDelay: 10,
    maxReconnectDelay: 40,
    timeout: 2000,
    ...options,
  });
  made.push(client);
  return client;
}

/** Connects `client` through a new fake socket; returns the socket. */
async function connect(client, result = {}) {
  const before = FakeWebSocket.all.length;
  if (client.state === 'disconnected') client.connect();
  await waitFor(() => FakeWebSocket.all.length > before, 'a socket');
  const ws = FakeWebSocket.all.at(-1);
  const c = await ws.next('connect');
  ws.reply(c, { client: 'c1', user: '', version: 1, ping_interval: 0, ...result });
  return ws;
}

const pub = (channel, offset, data = offset) => ({ push: { channel, pub: { offset, data } } });

describe('protocol logic', { timeout: 30000 }, () => {
  test('connect first, with token and data and the subprotocol; subscriptions batched after the reply', async () => {
    const client = fakeClient({ token: 'T', data: { app: 1 } });
    for (const ch of ['a', 'b', 'c']) client.newSubscription(ch).subscribe();
    client.connect();
    await waitFor(() => FakeWebSocket.all.length === 1, 'a socket');
    const ws = FakeWebSocket.all[0];
    assert.equal(ws.protocol, SUBPROTOCOL);
    const c = await ws.next('connect');
    assert.deepEqual(c, { id: c.id, connect: { token: 'T', data: { app: 1 } } });
    assert.equal(ws.messages.length, 1, 'nothing before the connect reply');
    ws.reply(c, { client: 'c1', user: '42', version: 1, ping_interval: 0 });
    await waitFor(() => ws.commands.length === 4, 'three subscribes');
    assert.equal(ws.messages.length, 2, 'the three subscribes in one message');
    assert.deepEqual(
      ws.commands.slice(1).map((x) => x.subscribe),
      [{ channel: 'a' }, { channel: 'b' }, { channel: 'c' }],
    );
  });

  test('batches are cut at maxBatch', async () => {
    const client = fakeClient({ maxBatch: 2 });
    const ws = await connect(client);
    const calls = [1, 2, 3, 4, 5].map((n) => client.publish('x', n).catch(() => {}));
    await waitFor(() => ws.commands.length === 6, 'five publishes');
    assert.deepEqual(
      ws.messages.slice(1).map((m) => m.split('\n').length),
      [2, 2, 1],
    );
    for (const cmd of ws.commands.slice(1)) ws.reply(cmd, { offset: 1, epoch: 'e' });
    await Promise.all(calls);
  });

  test('duplicates are skipped; a gap resubscribes with recovery from the last offset', async () => {
    const client = fakeClient();
    const ws = await connect(client);
    const sub = client.newSubscription('ch');
    const got = [];
    sub.on('publication', (p) => got.push(p.offset));
    const events = record(sub, ['subscribing', 'subscribed']);
    sub.subscribe();
    const s1 = await ws.next('subscribe');
    ws.reply(s1, { recoverable: true, epoch: 'E', offset: 5 });
    // Publications in the same turn as the reply are checked against its position.
    ws.push(pub('ch', 5)); // before the reply's position: seen already
    ws.push(pub('ch', 6));
    ws.push(pub('ch', 7));
    ws.push(pub('ch', 7));
    ws.push(pub('ch', 9)); // 8 is missing
    assert.deepEqual(got, [6, 7]);
    assert.equal(sub.state, 'subscribing');
    assert.equal(events.at(-1).code, subscribingCodes.gap);
    const u = await ws.next('unsubscribe');
    assert.equal(u.unsubscribe.channel, 'ch');
    const s2 = await ws.next('subscribe');
    assert.deepEqual(s2.subscribe, { channel: 'ch', recover: true, offset: 7, epoch: 'E' });
    ws.push(pub('ch', 10)); // before the new reply: ignored
    ws.reply(u, {});
    ws.reply(s2, {
      recoverable: true,
      epoch: 'E',
      offset: 10,
      recovered: true,
      publications: [
        { offset: 8, data: 8 },
        { offset: 9, data: 9 },
        { offset: 10, data: 10 },
      ],
    });
    ws.push(pub('ch', 11));
    assert.deepEqual(got, [6, 7, 8, 9, 10, 11]);
    const last = events.at(-1);
    assert.deepEqual([last.event, last.wasRecovering, last.recovered], ['subscribed', true, true]);
    assert.deepEqual(sub.position, { offset: 11, epoch: 'E' });
  });

  test('subscribed before the first publication: the reply\'s epoch is the position\'s, nothing else is asked', async () => {
    const client = fakeClient();
    const ws = await connect(client);
    const sub = client.newSubscription('fresh');
    sub.subscribe();
    const s = await ws.next('subscribe');
    ws.reply(s, { recoverable: true, epoch: 'E', offset: 0 });
    assert.deepEqual(sub.position, { offset: 0, epoch: 'E' });
    ws.push(pub('fresh', 1));
    ws.push(pub('fresh', 2));
    assert.deepEqual(sub.position, { offset: 2, epoch: 'E' });
    // After a drop, it recovers from there.
    ws.drop();
    const ws2 = await connect(client);
    const s2 = await ws2.next('subscribe');
    assert.deepEqual(s2.subscribe, { channel: 'fresh', recover: true, offset: 2, epoch: 'E' });
    assert.deepEqual(
      [...ws.commands, ...ws2.commands].filter((c) => c.history),
      [],
      'no history call to learn the epoch',
    );
  });

  test('the disconnect push decides: reconnect: false stops with its code, reconnect: true reconnects', async () => {
    const client = fakeClient();
    let ws = await connect(client);
    const connecting = nextEvent(client, 'connecting');
    ws.push({ push: { disconnect: { code: 4001, reason: 'come back', reconnect: true } } });
    ws.drop(4001, 'come back');
    assert.deepEqual(await connecting, { code: 4001, reason: 'come back' });
    ws = await connect(client);
    assert.equal(client.state, 'connected');
    const disconnected = nextEvent(client, 'disconnected');
    ws.push({ push: { disconnect: { code: 4002, reason: 'banned', reconnect: false } } });
    ws.drop(4002, 'banned');
    assert.deepEqual(await disconnected, { code: 4002, reason: 'banned' });
    await sleep(100);
    assert.equal(FakeWebSocket.all.length, 2, 'no reconnect');
    // Without a push: 3000 and 3004 stop, others reconnect.
    ws = await connect(client);
    const stopped = nextEvent(client, 'disconnected');
    ws.drop(3004, 'refused by the application');
    assert.equal((await stopped).code, 3004);
  });

  test('silence longer than the ping interval plus maxServerPingDelay reconnects', async () => {
    const client = fakeClient({ maxServerPingDelay: 100 });
    const ws = await connect(client, { ping_interval: 1 });
    const started = Date.now();
    await sleep(700);
    ws.push({ push: { ping: {} } }); // resets the watchdog
    const connecting = await nextEvent(client, 'connecting', () => true, 3000);
    assert.equal(connecting.code, connectingCodes.noPing);
    assert.ok(Date.now() - started >= 1700, 'the ping reset the watchdog');
    assert.ok(ws.closed, 'the silent socket is closed');
  });

  test('reconnect delays grow exponentially with jitter, up to the maximum', async () => {
    FakeWebSocket.refuse = true;
    const client = fakeClient({ minReconnectDelay: 40, maxReconnectDelay: 160 });
    client.connect();
    await waitFor(() => FakeWebSocket.all.length >= 7, 'seven attempts', 5000);
    const at = FakeWebSocket.all.map((ws) => ws.created);
    const gaps = at.slice(1, 7).map((t, i) => t - at[i]);
    // attempt k waits between half and all of min(max, min * 2^k)
    const intervals = [40, 80, 160, 160, 160, 160];
    gaps.forEach((gap, k) => {
      assert.ok(gap >= intervals[k] / 2 - 2, `gap ${k}: ${gap} ms (${gaps})`);
      assert.ok(gap <= intervals[k] + 200, `gap ${k}: ${gap} ms (${gaps})`);
    });
    assert.equal(client.state, 'connecting');
  });

  test('a refresh push gets a new token from getToken and sends refresh', async () => {
    let n = 0;
    const client = fakeClient({ getToken: async () => `token-${++n}` });
    client.connect();
    await waitFor(() => FakeWebSocket.all.length === 1, 'a socket');
    const ws = FakeWebSocket.all[0];
    const c = await ws.next('connect');
    assert.equal(c.connect.token, 'token-1');
    ws.reply(c, { client: 'c1', user: '1', version: 1, ping_interval: 0, expires_in: 3600 });
    ws.push({ push: { refresh: { grace: 10 } } });
    const r = await ws.next('refresh');
    assert.deepEqual(r.refresh, { token: 'token-2' });
    const refreshed = nextEvent(client, 'refreshed');
    ws.reply(r, { expires_in: 3600 });
    assert.equal((await refreshed).expiresIn, 3600);
  });

  test('already subscribed (110) unsubscribes and subscribes again; errors without id are reported', async () => {
    const client = fakeClient();
    const ws = await connect(client);
    const errors = record(client, ['error']);
    const sub = client.newSubscription('x');
    sub.subscribe();
    const s1 = await ws.next('subscribe');
    ws.push({ id: s1.id, error: { code: 110, message: 'already subscribed' } });
    await ws.next('unsubscribe');
    const s2 = await ws.next('subscribe');
    ws.reply(s2, { recoverable: false });
    await sub.ready(1000);
    assert.equal(sub.position, null, 'no history: no position');
    ws.push({ error: { code: 101, message: 'bad' } });
    assert.deepEqual(
      errors.map((e) => [e.type, e.error.code]),
      [
        ['subscribe', 110],
        ['server', 101],
      ],
    );
  });
});
