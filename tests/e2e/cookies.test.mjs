// End to end: a browser signed in by a cookie, on a page of another origin
// than the hub's (the application at http://127.0.0.1:APP, the hub at
// http://127.0.0.1:HUB). The application sets an HttpOnly cookie with the
// connection token; `tidewire serve` reads it (`client.token_cookie`) and
// lets the page's origin use the HTTP fallbacks with its cookies
// (`server.allowed_origins`, CORS with credentials). The page never sees
// the token, and connects as its user over every transport; without
// `withCredentials` a fallback carries no cookie and is refused; a page
// of an origin that is not allowed gets nothing.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';

import { launch } from './chromium.mjs';

import { Server } from '../../clients/js/test/helpers.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLIENT_JS = readFileSync(path.join(root, 'clients/js/src/index.js'));
const SECRET = 'e2e-cookie-secret';

function base64url(value) {
  return Buffer.from(value).toString('base64url');
}

/** An HS256 connection token for `user`. */
function token(user) {
  const head = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = base64url(JSON.stringify({ sub: user, exp: Math.floor(Date.now() / 1000) + 600 }));
  const signature = createHmac('sha256', SECRET).update(`${head}.${claims}`).digest('base64url');
  return `${head}.${claims}.${signature}`;
}

/** The application: `/` signs the visitor in as ann (the cookie) and serves an empty page; `/tidewire.js` the client. */
async function startApp() {
  const server = http.createServer((req, res) => {
    if (req.url === '/tidewire.js') {
      res.writeHead(200, { 'Content-Type': 'text/javascript' });
      res.end(CLIENT_JS);
      return;
    }
    res.writeHead(200, {
      'Content-Type': 'text/html',
      'Set-Cookie': `tw_token=${token('ann')}; Path=/; HttpOnly; SameSite=Lax`,
    });
    res.end('<!doctype html><title>app</title><p>signed in</p>');
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, url: `http://127.0.0.1:${server.address().port}` };
}

/** In the page: connects over `transport` and says as whom, or why not (`timeout` after `within` ms). */
async function connectAs(page, hubWsUrl, transport, withCredentials, within = 15000) {
  return page.evaluate(async ({ url, transport, withCredentials, within }) => {
    const { Client } = await import('/tidewire.js');
    const client = new Client(url, { transports: [transport], withCredentials, timeout: 5000, maxReconnectDelay: 500 });
    const outcome = new Promise((resolve) => {
      client.on('connected', (ctx) => resolve({ user: ctx.user, transport: ctx.transport }));
      client.on('disconnected', (ctx) => resolve({ disconnected: ctx.code, reason: ctx.reason }));
      setTimeout(() => resolve({ timeout: true }), within);
    });
    client.connect();
    const result = await outcome;
    client.disconnect();
    return result;
  }, { url: hubWsUrl, transport, withCredentials, within });
}

describe('a cookie signs the browser in, across origins', { timeout: 120000 }, () => {
  let app;
  let other;
  let hub;
  let browser;
  const pageErrors = [];

  before(async () => {
    app = await startApp();
    other = await startApp();
    hub = await Server.start(`
[client]
anonymous = false
token_cookie = "tw_token"

[token]
hmac_secret = "${SECRET}"

[server]
allowed_origins = ["${app.url}"]
`);
    browser = await launch();
  });

  after(async () => {
    await browser?.close();
    await hub?.close();
    app?.server.close();
    other?.server.close();
    assert.deepEqual(pageErrors, []);
  });

  test('every transport connects as the cookie\'s user; the script never sees the token', async () => {
    const page = await browser.newPage();
    page.on('pageerror', (e) => pageErrors.push(String(e)));
    await page.goto(`${app.url}/`);
    assert.equal(await page.evaluate(() => document.cookie), '', 'HttpOnly: not visible to the page');
    for (const transport of ['websocket', 'http_stream', 'sse', 'long_poll']) {
      const result = await connectAs(page, hub.wsUrl, transport, true);
      assert.deepEqual(result, { user: 'ann', transport }, transport);
    }
    // Without withCredentials, a cross-origin fallback sends no cookie.
    const result = await connectAs(page, hub.wsUrl, 'http_stream', false);
    assert.equal(result.user, undefined, JSON.stringify(result));
    assert.equal(result.disconnected, 1, JSON.stringify(result)); // unauthorized
    await page.close();
  });

  test('a page of an origin that is not allowed gets nothing, cookies or not', async () => {
    const page = await browser.newPage();
    await page.goto(`${other.url}/`);
    for (const transport of ['websocket', 'long_poll']) {
      // Refused (403) every time it tries: it never connects.
      const result = await connectAs(page, hub.wsUrl, transport, true, 3000);
      assert.equal(result.user, undefined, `${transport}: ${JSON.stringify(result)}`);
    }
    // The fallbacks answer it 403 without CORS headers: the browser refuses it the response.
    const fetched = await page.evaluate(async (url) => {
      try {
        const response = await fetch(url, { method: 'POST', body: '{"id":1,"connect":{}}', credentials: 'include' });
        return { status: response.status };
      } catch (e) {
        return { failed: String(e) };
      }
    }, `${hub.httpUrl}/connection/long_poll?wait=1`);
    assert.ok(fetched.failed, JSON.stringify(fetched));
    await page.close();
  });
});
