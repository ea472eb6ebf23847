// End to end: the HTTP fallbacks over HTTP/2 (TLS, ALPN h2) in headless
// Chromium (see demo.test.mjs for the environment). Ten clients on HTTP
// streaming in one page: over HTTP/1.1 a browser holds at most six
// connections per host, so the seventh stream would wait for ever; over
// HTTP/2 they are streams of one connection, and all ten connect and get
// a publication. WebSocket still works beside them (it asks for
// HTTP/1.1).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { launch } from './chromium.mjs';

import { API_KEY, Server } from '../../clients/js/test/helpers.js';


const CLIENTS = 10;

describe('fallbacks over HTTP/2', { timeout: 120000 }, () => {
  let server;
  let browser;

  before(async () => {
    server = await Server.start('', { args: ['--tls-self-signed'] });
    assert.equal(server.scheme, 'https');
    browser = await launch(['--ignore-certificate-errors']);
  });

  after(async () => {
    await browser?.close();
    await server?.close();
  });

  test('ten HTTP-streaming clients in one page share one HTTP/2 connection', async () => {
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(`${server.httpUrl}/about.html`, { waitUntil: 'load' });
    const result = await page.evaluate(
      async ({ n, key }) => {
        const { Client } = await import('/client/tidewire.js');
        const url = `wss://${location.host}/connection/websocket`;
        const received = new Array(n).fill(0);
        const clients = [];
        const subscribed = [];
        for (let i = 0; i < n; i++) {
          const client = new Client(url, { transports: ['http_stream'], timeout: 10000 });
          const sub = client.newSubscription('h2:feed');
          sub.on('publication', () => received[i]++);
          sub.subscribe();
          client.connect();
          clients.push(client);
          subscribed.push(sub.ready(20000));
        }
        await Promise.all(subscribed);
        // And one on WebSocket, beside them.
        const ws = new Client(url);
        const wsSub = ws.newSubscription('h2:feed');
        let wsReceived = 0;
        wsSub.on('publication', () => wsReceived++);
        wsSub.subscribe();
        ws.connect();
        await wsSub.ready(20000);
        const published = await fetch('/api/publish', {
          method: 'POST',
          headers: { Authorization: `apikey ${key}` },
          body: JSON.stringify({ channel: 'h2:feed', data: { hello: 'h2' } }),
        });
        const deadline = Date.now() + 10000;
        while ((received.some((r) => r < 1) || wsReceived < 1) && Date.now() < deadline) {
          await new Promise((r) => setTimeout(r, 50));
        }
        const protocols = [...new Set(performance.getEntriesByType('resource')
          .filter((e) => e.name.includes('/connection/'))
          .map((e) => e.nextHopProtocol))];
        const transports = clients.map((c) => c.transport);
        for (const c of [...clients, ws]) c.disconnect();
        return { received, wsReceived, status: published.status, protocols, transports, wsTransport: 'websocket' };
      },
      { n: CLIENTS, key: API_KEY },
    );
    assert.equal(result.status, 200);
    assert.deepEqual(result.transports, new Array(CLIENTS).fill('http_stream'));
    assert.deepEqual(result.received, new Array(CLIENTS).fill(1), 'every stream got the publication');
    assert.equal(result.wsReceived, 1, 'and the WebSocket client');
    assert.ok(result.protocols.includes('h2'), `HTTP/2 in use: ${JSON.stringify(result.protocols)}`);
    assert.deepEqual(errors, []);
    await context.close();
  });
});
