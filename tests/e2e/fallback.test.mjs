// End to end: the demo chat where WebSocket cannot pass, in headless
// Chromium (see demo.test.mjs for the environment). A proxy of the test's
// own stands in front of a real `tidewire serve` and, for the WebSocket
// upgrade, either refuses it (403) or swallows it (accepted, not a byte
// forwarded); everything else it forwards. The pages fall back by
// themselves (HTTP streaming, or SSE when asked to try only that after
// WebSocket), chat in order, see each other's presence, and a page whose
// stream is cut recovers every message it missed once.

import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { artifacts, launch } from './chromium.mjs';

import { Server } from '../../clients/js/test/helpers.js';


const WAIT = 30000;

/** A TCP proxy that blocks WebSocket upgrades (`refuse` or `swallow`) and forwards the rest. */
class UpgradeBlocker {
  static async start(target, mode) {
    const blocker = new UpgradeBlocker(target, mode);
    await new Promise((resolve) => blocker.server.listen(0, '127.0.0.1', resolve));
    blocker.port = blocker.server.address().port;
    return blocker;
  }

  constructor(target, mode) {
    this.pairs = new Set();
    this.upgrades = 0;
    this.server = net.createServer((down) => {
      down.on('error', () => {});
      down.once('data', (head) => {
        if (/\r\nupgrade:\s*websocket/i.test(head.toString('latin1'))) {
          this.upgrades++;
          if (mode === 'refuse') {
            down.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
          }
          // swallow: keep it open, say nothing
          this.pairs.add({ down, up: null });
          return;
        }
        const [host, port] = target.split(':');
        const up = net.connect(Number(port), host);
        const pair = { down, up };
        this.pairs.add(pair);
        up.write(head);
        down.pipe(up).pipe(down);
        const end = () => {
          down.destroy();
          up.destroy();
          this.pairs.delete(pair);
        };
        down.on('close', end);
        up.on('error', end).on('close', end);
      });
    });
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Cuts every forwarded connection (the streams break). */
  cut() {
    for (const { down, up } of this.pairs) {
      down.destroy();
      up?.destroy();
    }
    this.pairs.clear();
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

const messages = (page) => page.$$eval('#messages li.msg .text', (els) => els.map((e) => e.textContent));

async function waitText(page, text) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll('#messages li.msg .text')].some((e) => e.textContent === t),
    text,
    { timeout: WAIT, polling: 50 },
  );
}

async function waitPresence(page, names) {
  await page.waitForFunction(
    (want) => JSON.stringify([...document.querySelectorAll('#presence li .name')].map((e) => e.textContent).sort()) === JSON.stringify(want),
    [...names].sort(),
    { timeout: WAIT, polling: 50 },
  );
}

async function send(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

describe('demo chat over the HTTP fallbacks', { timeout: 240000 }, () => {
  let server;
  let browser;
  const pageErrors = [];

  before(async () => {
    server = await Server.start('');
    browser = await launch();
  });

  after(async () => {
    await browser?.close();
    await server?.close();
    assert.deepEqual(pageErrors, []);
  });

  async function open(base, nick, room, query = '') {
    const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`${nick}: ${e.message}`));
    await page.goto(`${base}/?nick=${nick}${query}#${room}`, { waitUntil: 'load' });
    await page.waitForFunction(() => document.getElementById('state').dataset.state === 'connected', null, { timeout: WAIT, polling: 50 });
    const transport = await page.$eval('#state', (e) => e.dataset.transport);
    return { context, page, transport };
  }

  test('upgrade refused: HTTP streaming by itself; chat, presence, and recovery after a cut', async () => {
    const blocker = await UpgradeBlocker.start(server.addr, 'refuse');
    try {
      const ann = await open(blocker.url, 'Ann', 'fb');
      const bob = await open(blocker.url, 'Bob', 'fb');
      assert.equal(ann.transport, 'http_stream');
      assert.equal(bob.transport, 'http_stream');
      assert.ok(blocker.upgrades >= 2, 'each page tried WebSocket first');
      assert.match(await ann.page.textContent('#state'), /HTTP streaming/);
      await waitPresence(ann.page, ['Ann', 'Bob']);
      await waitPresence(bob.page, ['Ann', 'Bob']);
      for (let n = 1; n <= 5; n++) await send(ann.page, `ann ${n}`);
      await waitText(bob.page, 'ann 5');
      assert.deepEqual(await messages(bob.page), ['ann 1', 'ann 2', 'ann 3', 'ann 4', 'ann 5']);

      // Every stream breaks; while Ann's page is away, Bob writes on
      // (his own page reconnects as well): Ann gets it all once, in order.
      blocker.cut();
      for (let n = 1; n <= 5; n++) await send(bob.page, `bob ${n}`);
      await waitText(ann.page, 'bob 5');
      await waitText(bob.page, 'bob 5');
      const expected = ['ann 1', 'ann 2', 'ann 3', 'ann 4', 'ann 5', 'bob 1', 'bob 2', 'bob 3', 'bob 4', 'bob 5'];
      assert.deepEqual(await messages(ann.page), expected);
      assert.deepEqual(await messages(bob.page), expected);
      await ann.page.screenshot({ path: path.join(artifacts, 'fallback-http-stream.png') });
      await ann.context.close();
      await waitPresence(bob.page, ['Bob']);
      await bob.context.close();
    } finally {
      await blocker.close();
    }
  });

  test('a feed page with a bare EventSource recovers what it missed from Last-Event-ID', async () => {
    const blocker = await UpgradeBlocker.start(server.addr, 'refuse');
    try {
      const context = await browser.newContext();
      const page = await context.newPage();
      page.on('pageerror', (e) => pageErrors.push(`feed: ${e.message}`));
      await page.goto(`${blocker.url}/feed.html?channel=efeed`, { waitUntil: 'load' });
      await page.waitForFunction(() => document.getElementById('state').dataset.state === 'connected', null, { timeout: WAIT });
      const items = () => page.$$eval('#items li', (els) => els.map((e) => [Number(e.dataset.offset), e.textContent]));
      for (let n = 1; n <= 3; n++) await server.api('publish', { channel: 'efeed', data: { text: `item ${n}` } });
      await page.waitForFunction(() => document.querySelectorAll('#items li').length === 3, null, { timeout: WAIT });
      // The stream breaks; the browser comes back by itself (retry: 2 s).
      blocker.cut();
      for (let n = 4; n <= 6; n++) await server.api('publish', { channel: 'efeed', data: { text: `item ${n}` } });
      await page.waitForFunction(() => document.querySelectorAll('#items li').length >= 6, null, { timeout: WAIT });
      await server.api('publish', { channel: 'efeed', data: { text: 'item 7' } });
      await page.waitForFunction(() => document.querySelectorAll('#items li').length >= 7, null, { timeout: WAIT });
      assert.deepEqual(await items(), [1, 2, 3, 4, 5, 6, 7].map((n) => [n, `item ${n}`]));
      await page.screenshot({ path: path.join(artifacts, 'feed-uni-sse.png') });
      await context.close();
    } finally {
      await blocker.close();
    }
  });

  test('upgrade swallowed: SSE after the connect timeout; chat with pages on HTTP streaming and long-polling', async () => {
    const blocker = await UpgradeBlocker.start(server.addr, 'swallow');
    try {
      const [cid, dan, eve] = await Promise.all([
        open(blocker.url, 'Cid', 'sse', '&transports=websocket,sse'),
        open(blocker.url, 'Dan', 'sse', '&transports=http_stream'),
        open(blocker.url, 'Eve', 'sse', '&transports=long_poll'),
      ]);
      assert.equal(cid.transport, 'sse');
      assert.equal(dan.transport, 'http_stream');
      assert.equal(eve.transport, 'long_poll');
      await waitPresence(cid.page, ['Cid', 'Dan', 'Eve']);
      await waitPresence(eve.page, ['Cid', 'Dan', 'Eve']);
      await send(cid.page, 'from sse');
      await waitText(dan.page, 'from sse');
      await send(dan.page, 'from http stream');
      await waitText(cid.page, 'from http stream');
      await send(eve.page, 'from long poll');
      for (const page of [cid.page, dan.page, eve.page]) await waitText(page, 'from long poll');
      assert.deepEqual(await messages(eve.page), ['from sse', 'from http stream', 'from long poll']);
      assert.deepEqual(await messages(cid.page), ['from sse', 'from http stream', 'from long poll']);
      await eve.page.screenshot({ path: path.join(artifacts, 'fallback-long-poll.png') });
      for (const page of [cid, dan, eve]) await page.context.close();
    } finally {
      await blocker.close();
    }
  });
});
