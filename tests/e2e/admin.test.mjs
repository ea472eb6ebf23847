// End to end: the admin page at /admin of a real `tidewire serve` in
// headless Chromium (see demo.test.mjs for the environment). A wrong
// secret is refused; the right one shows the node with its connections
// and rates as they change, over the hub's own WebSocket; the charts
// draw; a reload keeps the session; signing out asks again.

import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { artifacts, launch } from './chromium.mjs';

import { Server } from '../../clients/js/test/helpers.js';


const WAIT = 20000;
const ADMIN_SECRET = 'e2e-admin-secret';
const CLIENTS = 5;

describe('admin page', { timeout: 120000 }, () => {
  let server;
  let browser;

  before(async () => {
    server = await Server.start(`[admin]\nsecret = "${ADMIN_SECRET}"\n`);
    browser = await launch();
  });

  after(async () => {
    await browser?.close();
    await server?.close();
  });

  test('signs in with the admin secret only and shows the node live', async () => {
    const context = await browser.newContext({ viewport: { width: 1200, height: 800 } });
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(`${server.httpUrl}/admin`, { waitUntil: 'load' });
    await page.waitForSelector('#login:not([hidden])', { timeout: WAIT });

    // The API key is not the secret when admin.secret is set.
    await page.fill('#secret', 'test-api-key');
    await page.click('#sign-in');
    await page.waitForFunction(() => document.getElementById('login-error').textContent.includes('wrong secret'), null, { timeout: WAIT });
    assert.equal(await page.isHidden('#dashboard'), true);

    await page.fill('#secret', ADMIN_SECRET);
    await page.click('#sign-in');
    await page.waitForSelector('#dashboard:not([hidden])', { timeout: WAIT });
    await page.waitForFunction(() => document.getElementById('state').dataset.state === 'connected', null, { timeout: WAIT });
    const row = '#nodes tbody tr';
    await page.waitForSelector(row, { timeout: WAIT });
    assert.equal(await page.locator(row).count(), 1, 'one node');
    const summary = await page.textContent('#summary');
    assert.match(summary, /1 node · engine memory/);

    // Clients come, and publish: the page shows them and the rates.
    const crowd = await browser.newPage();
    await crowd.goto(`${server.httpUrl}/health`);
    await crowd.evaluate(
      ({ url, n }) =>
        new Promise((resolve, reject) => {
          window.sockets = [];
          let ready = 0;
          for (let i = 0; i < n; i++) {
            const ws = new WebSocket(url);
            window.sockets.push(ws);
            ws.onopen = () => ws.send('{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"feed"}}');
            ws.onmessage = (e) => {
              for (const line of String(e.data).split('\n')) {
                const m = JSON.parse(line);
                if (m.id === 2 && m.subscribe && ++ready === n) resolve();
                if (m.id === 2 && m.error) reject(new Error(line));
              }
            };
          }
        }),
      { url: server.wsUrl, n: CLIENTS },
    );
    const publishing = setInterval(() => {
      server.api('publish', { channel: 'feed', data: { at: Date.now() } }).catch(() => {});
    }, 50);
    try {
      // The crowd and the admin page itself.
      await page.waitForFunction(
        (n) => Number(document.querySelector('#nodes tbody tr td.connections').textContent.replace(/\D/g, '')) === n,
        CLIENTS + 1,
        { timeout: WAIT },
      );
      await page.waitForFunction(
        () => Number(document.querySelector('#nodes tbody tr td.deliveries').textContent.replace(/[^\d.]/g, '')) > 10,
        null,
        { timeout: WAIT },
      );
      assert.ok(Number(await page.textContent('#nodes tbody tr td.publications')) > 1);
      assert.match(await page.textContent('#nodes tbody tr td.health'), /ok/);
      for (const chart of ['chart-connections', 'chart-publications', 'chart-deliveries']) {
        await page.waitForFunction((id) => Number(document.getElementById(id).dataset.points) >= 3, chart, { timeout: WAIT });
      }
      await page.screenshot({ path: path.join(artifacts, 'admin.png') });
    } finally {
      clearInterval(publishing);
    }

    // The crowd leaves: the count follows.
    await crowd.evaluate(() => window.sockets.forEach((ws) => ws.close()));
    await page.waitForFunction(
      () => Number(document.querySelector('#nodes tbody tr td.connections').textContent.replace(/\D/g, '')) === 1,
      null,
      { timeout: WAIT },
    );

    // A reload keeps the session (the token is in sessionStorage).
    await page.reload({ waitUntil: 'load' });
    await page.waitForSelector('#dashboard:not([hidden])', { timeout: WAIT });
    await page.waitForSelector(row, { timeout: WAIT });

    await page.click('#sign-out');
    await page.waitForSelector('#login:not([hidden])', { timeout: WAIT });
    assert.deepEqual(errors, []);
    await context.close();
  });
});
