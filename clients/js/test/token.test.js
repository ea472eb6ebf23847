// Tokens against a real server that requires them (HS256, short TTLs):
// refresh before expiry without a reconnect, an expired token at connect,
// expiry without a way to refresh, refusal, and subscription tokens that
// expire while publications flow.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Client, State, UnauthorizedError, disconnectedCodes } from '../src/index.js';
import { Server, clientFactory, nextEvent, nowSecs, record, sleep, token, waitFor } from './helpers.js';

const FAST = { minReconnectDelay: 50, maxReconnectDelay: 400, timeout: 5000 };

const CONFIG = `
[client]
anonymous = false
refresh_grace = "1s"

[token]
hmac_secret = "test-hmac-secret"

[namespaces.private]
subscribe = "token"
`;

describe('tokens', { timeout: 90000 }, () => {
  const newClient = clientFactory(Client);
  let server;
  before(async () => {
    server = await Server.start(CONFIG);
  });
  after(async () => {
    await server.close();
  });

  test('the connection token is refreshed before it expires: no reconnect, no lost publication', async () => {
    let calls = 0;
    const client = newClient(server.wsUrl, {
      ...FAST,
      getToken: async () => {
        calls++;
        return token({ sub: '42', exp: nowSecs() + 2 });
      },
    });
    const log = record(client, ['connecting', 'connected', 'disconnected', 'refreshed']);
    const sub = client.newSubscription('feed:one');
    const got = [];
    sub.on('publication', (p) => got.push(p.data));
    sub.subscribe();
    client.connect();
    await sub.ready(5000);
    assert.equal(client.user, '42');
    assert.ok(log.find((e) => e.event === 'connected').expiresIn <= 2);
    // Publish for 4.5 s: the 2 s token is refreshed a few times meanwhile.
    const until = Date.now() + 4500;
    let n = 0;
    while (Date.now() < until) {
      await server.api('publish', { channel: 'feed:one', data: n++ });
      await sleep(50);
    }
    await waitFor(() => got.length === n, `${n} publications`);
    assert.deepEqual(got, Array.from({ length: n }, (_, i) => i));
    assert.ok(calls >= 3, `getToken called ${calls} times`);
    assert.ok(log.filter((e) => e.event === 'refreshed').length >= 2);
    assert.deepEqual(
      log.filter((e) => e.event !== 'refreshed').map((e) => e.event),
      ['connecting', 'connected'],
      'connected once, never dropped',
    );
    assert.equal(client.state, State.Connected);
  });

  test('an expired token at connect: getToken gives a new one', async () => {
    let calls = 0;
    const client = newClient(server.wsUrl, {
      ...FAST,
      token: token({ sub: '7', exp: nowSecs() - 10 }),
      getToken: () => {
        calls++;
        return token({ sub: '7', exp: nowSecs() + 60 });
      },
    });
    const errors = record(client, ['error']);
    client.connect();
    await client.ready(5000);
    assert.equal(calls, 1);
    assert.equal(client.user, '7');
    assert.equal(errors[0].error.code, 106);
  });

  test('without getToken, an expired connection ends (3003) and does not come back anonymous', async () => {
    const client = newClient(server.wsUrl, { ...FAST, token: token({ sub: '8', exp: nowSecs() + 1 }) });
    const log = record(client, ['connecting', 'connected', 'disconnected', 'error']);
    client.connect();
    await client.ready(5000);
    const disconnected = await nextEvent(client, 'disconnected', () => true, 10000);
    assert.deepEqual(disconnected, { code: disconnectedCodes.unauthorized, reason: 'token expired' });
    // The client said it could not refresh (the server's refresh push), then stopped.
    assert.ok(log.some((e) => e.event === 'error' && e.type === 'refresh'));
    assert.deepEqual(
      log.filter((e) => e.event !== 'error').map((e) => e.event),
      ['connecting', 'connected', 'disconnected'],
    );
    assert.equal(client.state, State.Disconnected);
  });

  test('getToken refusing (UnauthorizedError or empty) stops the client', async () => {
    const a = newClient(server.wsUrl, {
      ...FAST,
      getToken: () => {
        throw new UnauthorizedError();
      },
    });
    const da = nextEvent(a, 'disconnected');
    a.connect();
    assert.equal((await da).code, disconnectedCodes.unauthorized);
    const b = newClient(server.wsUrl, { ...FAST, getToken: async () => '' });
    const db = nextEvent(b, 'disconnected');
    b.connect();
    assert.equal((await db).code, disconnectedCodes.unauthorized);
    // A bad signature: refused by the server (105), no retry loop.
    const c = newClient(server.wsUrl, { ...FAST, token: token({ sub: '1' }, 'wrong secret') });
    const dc = nextEvent(c, 'disconnected');
    c.connect();
    assert.equal((await dc).code, disconnectedCodes.unauthorized);
  });

  test('a subscription token that expires is renewed and the subscription recovers', async () => {
    let subTokens = 0;
    const client = newClient(server.wsUrl, { ...FAST, token: token({ sub: '5', exp: nowSecs() + 600 }) });
    const sub = client.newSubscription('private:plans', {
      getToken: ({ channel }) => {
        subTokens++;
        return token({ sub: '5', channel, exp: nowSecs() + 2 });
      },
    });
    const got = [];
    sub.on('publication', (p) => got.push(p.data));
    const events = record(sub, ['subscribing', 'subscribed', 'unsubscribed']);
    sub.subscribe();
    client.connect();
    await sub.ready(5000);
    const until = Date.now() + 3500;
    let n = 0;
    while (Date.now() < until) {
      await server.api('publish', { channel: 'private:plans', data: n++ });
      await sleep(50);
    }
    await waitFor(() => got.length === n, `${n} publications`);
    assert.deepEqual(got, Array.from({ length: n }, (_, i) => i));
    assert.ok(subTokens >= 2, `subscription getToken called ${subTokens} times`);
    const resubscribes = events.filter((e) => e.event === 'subscribed' && e.wasRecovering);
    assert.ok(resubscribes.length >= 1);
    assert.ok(resubscribes.every((e) => e.recovered));
    assert.ok(!events.some((e) => e.event === 'unsubscribed'));
    // No token for the channel: refused.
    const other = client.newSubscription('private:other');
    const unsubscribed = nextEvent(other, 'unsubscribed');
    other.subscribe();
    assert.equal((await unsubscribed).code, 2); // refused (107)
  });
});
