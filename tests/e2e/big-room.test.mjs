// End to end: the demo chat in a room too big to list (more members than
// the server's join_leave_max_members, 100 by default), with a real
// `tidewire serve` on its embedded defaults and headless Chromium (see
// demo.test.mjs for the environment).
//
// The other members are plain WebSockets opened by a second page: the
// demo must show how many are here, not fetch and draw every name, and
// list names again once the room shrinks.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Server } from '../../clients/js/test/helpers.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const require = createRequire(path.join(root, 'tests/interop/package.json'));
const { chromium } = require('playwright-core');

const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const artifacts = path.join(process.env.TIDEWIRE_TEST_ARTIFACTS || path.join(root, 'test-artifacts'), 'e2e');
const WAIT = 20000;
const OTHERS = 110;

describe('demo app in a big room', { timeout: 120000 }, () => {
  let server;
  let browser;

  before(async () => {
    assert.ok(existsSync(executablePath), `${executablePath} not found (scripts/install-deps installs chromium)`);
    mkdirSync(artifacts, { recursive: true });
    server = await Server.start(''); // the embedded defaults
    browser = await chromium.launch({
      executablePath,
      headless: true,
      timeout: 60000,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run'],
    });
  });

  after(async () => {
    await browser?.close();
    await server?.close();
  });

  test('shows a count past the list limit, says no hello, and lists names again when the room shrinks', async () => {
    // OTHERS members of chat:big, from one page of the server's origin.
    const crowd = await browser.newPage();
    await crowd.goto(`${server.httpUrl}/health`);
    const subscribed = await crowd.evaluate(
      ({ url, n }) =>
        new Promise((resolve, reject) => {
          window.sockets = [];
          let ready = 0;
          for (let i = 0; i < n; i++) {
            const ws = new WebSocket(url);
            window.sockets.push(ws);
            ws.onopen = () => ws.send('{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"chat:big"}}');
            ws.onmessage = (e) => {
              for (const line of String(e.data).split('\n')) {
                const m = JSON.parse(line);
                if (m.id === 2 && m.subscribe && ++ready === n) resolve(ready);
                if (m.id === 2 && m.error) reject(new Error(line));
              }
            };
            ws.onerror = () => reject(new Error('a crowd socket failed'));
          }
        }),
      { url: server.wsUrl, n: OTHERS },
    );
    assert.equal(subscribed, OTHERS);

    const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
    const page = await context.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(`${server.httpUrl}/?nick=Big#big`, { waitUntil: 'load' });
    await page.waitForFunction(
      (want) => document.getElementById('count').textContent === want && document.querySelector('#presence li.many'),
      String(OTHERS + 1),
      { timeout: WAIT, polling: 50 },
    );
    assert.equal(await page.$$eval('#presence li', (els) => els.length), 1, 'no list of 111 names');
    await page.screenshot({ path: path.join(artifacts, 'chat-big-room.png') });

    // More join: the count follows the server's counts-only diffs.
    await crowd.evaluate(
      ({ url }) =>
        new Promise((resolve) => {
          let ready = 0;
          for (let i = 0; i < 5; i++) {
            const ws = new WebSocket(url);
            window.sockets.push(ws);
            ws.onopen = () => ws.send('{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"chat:big"}}');
            ws.onmessage = (e) => {
              if (String(e.data).includes('"id":2') && ++ready === 5) resolve();
            };
          }
        }),
      { url: server.wsUrl },
    );
    await page.waitForFunction((want) => document.getElementById('count').textContent === want, String(OTHERS + 6), {
      timeout: WAIT,
      polling: 50,
    });

    // Entering a big room says no hello (it would go to every member).
    const history = await server.api('history', { channel: 'chat:big' });
    assert.equal(history.publications.length, 0, JSON.stringify(history));

    // The room shrinks under the limit: the page lists names again.
    const keep = 20;
    await crowd.evaluate((k) => {
      for (const ws of window.sockets.splice(k)) ws.close();
    }, keep);
    await page.waitForFunction(
      (want) =>
        !document.querySelector('#presence li.many') &&
        document.querySelectorAll('#presence li').length === want &&
        document.getElementById('count').textContent === String(want),
      keep + 1,
      { timeout: WAIT, polling: 50 },
    );
    assert.ok(
      await page.$eval('#presence', (ul) => [...ul.children].some((li) => li.textContent.includes('Big'))),
      'the page itself is listed by its nickname',
    );
    assert.deepEqual(errors, []);
    await context.close();
    await crowd.close();
  });
});
