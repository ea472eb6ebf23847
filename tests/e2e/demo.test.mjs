// End to end: the demo app served by a real `tidewire serve` (embedded
// defaults), in headless Chromium (Debian's /usr/bin/chromium) driven by
// playwright-core (tests/interop's, pinned by its package-lock.json).
//
//   node --test tests/e2e/
//
// Environment: TIDEWIRE_BIN (default target/debug/tidewire), CHROMIUM_PATH
// (default /usr/bin/chromium), TIDEWIRE_TEST_ARTIFACTS (screenshots;
// default test-artifacts/) under which screenshots go to e2e/.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { API_KEY, Server, sleep } from '../../clients/js/test/helpers.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const require = createRequire(path.join(root, 'tests/interop/package.json'));
const { chromium } = require('playwright-core');

const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const artifacts = path.join(process.env.TIDEWIRE_TEST_ARTIFACTS || path.join(root, 'test-artifacts'), 'e2e');
const WAIT = 15000;

/** The texts of the chat messages (not the system lines) a page shows, in order. */
const messages = (page) => page.$$eval('#messages li.msg .text', (els) => els.map((e) => e.textContent));
/** The texts of the chat messages a page marks as from before a server restart. */
const earlierMessages = (page) => page.$$eval('#messages li.msg.earlier .text', (els) => els.map((e) => e.textContent));
/** The lines of the chat, in order: [class, text] ("msg", "sys", "divider"; "+earlier"). */
const lines = (page) =>
  page.$$eval('#messages li', (els) =>
    els.map((e) => [
      ['msg', 'sys', 'divider'].find((c) => e.classList.contains(c)) + (e.classList.contains('earlier') ? '+earlier' : ''),
      e.querySelector('.text').textContent,
    ]),
  );
/** The names in "Here now" (without the "(you)" mark), sorted. */
const presence = (page) => page.$$eval('#presence li .name', (els) => els.map((e) => e.textContent).sort());
const state = (page) => page.$eval('#state', (e) => e.dataset.state);

async function waitText(page, selector, text, timeout = WAIT) {
  await page.waitForFunction(
    ([sel, t]) => [...document.querySelectorAll(sel)].some((e) => e.textContent.includes(t)),
    [selector, text],
    { timeout, polling: 50 },
  );
}

async function waitState(page, want, timeout = WAIT) {
  await page.waitForFunction((s) => document.getElementById('state').dataset.state === s, want, {
    timeout,
    polling: 50,
  });
}

async function waitPresence(page, names, timeout = WAIT) {
  await page.waitForFunction(
    (want) => {
      const got = [...document.querySelectorAll('#presence li .name')].map((e) => e.textContent).sort();
      return JSON.stringify(got) === JSON.stringify(want);
    },
    [...names].sort(),
    { timeout, polling: 50 },
  );
}

async function send(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

describe('demo app in headless Chromium', { timeout: 360000 }, () => {
  let server;
  let browser;
  const pageErrors = [];

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

  async function open(nick, room) {
    const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`${nick}: ${e.message}`));
    await page.goto(`${server.httpUrl}/?nick=${nick}#${room}`, { waitUntil: 'load' });
    await waitState(page, 'connected');
    return { context, page };
  }

  test('two pages chat; one goes offline and recovers every missed message once, in order; a server restart; presence on leave', async () => {
    const ann = await open('Ann', 'e2e');
    const bob = await open('Bob', 'e2e');
    const { page: a } = ann;
    const { page: b } = bob;

    // Presence: each page sees both (nicknames from their hello messages).
    await waitPresence(a, ['Ann', 'Bob']);
    await waitPresence(b, ['Ann', 'Bob']);
    assert.equal(await a.textContent('#count'), '2');

    // Chat in one room.
    await send(a, 'hello from Ann');
    await waitText(b, '#messages li.msg .text', 'hello from Ann');
    await send(b, 'hi Ann');
    await waitText(a, '#messages li.msg .text', 'hi Ann');
    await waitText(b, '#messages li.msg .text', 'hi Ann');
    assert.deepEqual(await messages(a), ['hello from Ann', 'hi Ann']);
    assert.deepEqual(await messages(b), ['hello from Ann', 'hi Ann']);
    // Bob's page loaded the room's history when it joined: it shows that Ann was there first.
    await waitText(b, '#messages li.sys .text', 'Ann joined');
    await a.screenshot({ path: path.join(artifacts, 'chat-two-pages-ann.png') });
    await b.screenshot({ path: path.join(artifacts, 'chat-two-pages-bob.png') });

    // Ann's browser goes offline; Bob keeps writing.
    await ann.context.setOffline(true);
    await waitState(a, 'connecting');
    assert.equal(await a.textContent('#state'), 'reconnecting…');
    const missed = ['missed 1', 'missed 2', 'missed 3', 'missed 4', 'missed 5'];
    for (const text of missed) {
      await send(b, text);
      await waitText(b, '#messages li.msg .text', text);
    }
    await sleep(300);
    assert.equal(await state(a), 'connecting', 'still offline');
    assert.deepEqual(await messages(a), ['hello from Ann', 'hi Ann'], 'nothing arrives while offline');
    await a.screenshot({ path: path.join(artifacts, 'chat-offline.png') });

    // Back online: Ann's page reconnects and shows each missed message once, in order.
    await ann.context.setOffline(false);
    await waitState(a, 'connected');
    await waitText(a, '#notice', '5 missed messages recovered');
    await send(b, 'welcome back');
    // Each page shows it when the hub delivers it (Bob's own page too).
    await waitText(a, '#messages li.msg .text', 'welcome back');
    await waitText(b, '#messages li.msg .text', 'welcome back');
    const expected = ['hello from Ann', 'hi Ann', ...missed, 'welcome back'];
    assert.deepEqual(await messages(a), expected);
    assert.deepEqual(await messages(b), expected);
    await a.screenshot({ path: path.join(artifacts, 'chat-recovered.png') });

    // A server restart: both pages reconnect by themselves and say so.
    await server.restart();
    for (const page of [a, b]) {
      await waitState(page, 'connected');
      await waitText(page, '#notice', 'server restart');
    }
    await waitPresence(a, ['Ann', 'Bob']);
    await send(a, 'after the restart');
    await waitText(b, '#messages li.msg .text', 'after the restart');
    // What was on screen stays, marked as from before the restart.
    assert.deepEqual(await messages(b), [...expected, 'after the restart']);
    assert.deepEqual(await earlierMessages(b), expected);
    await a.screenshot({ path: path.join(artifacts, 'chat-after-restart.png') });

    // Bob leaves: Ann's presence list updates, and the chat says so.
    await bob.context.close();
    await waitPresence(a, ['Ann']);
    assert.equal(await a.textContent('#count'), '1');
    await waitText(a, '#messages li.sys .text', 'Bob left');
    await a.screenshot({ path: path.join(artifacts, 'chat-bob-left.png') });
    await ann.context.close();
    assert.deepEqual(pageErrors, []);
  });

  test('an API disconnect (reconnect allowed) while the other page writes: recovered once, in order', async () => {
    const ann = await open('Ann', 'api');
    const bob = await open('Bob', 'api');
    const { page: a } = ann;
    const { page: b } = bob;
    await waitPresence(a, ['Ann', 'Bob']);
    const id = await a.evaluate(() => window.demo.client.clientId);
    const sending = (async () => {
      for (let i = 1; i <= 10; i++) await send(b, `m${i}`);
    })();
    await server.api('disconnect', { user: '', client: id, reconnect: true });
    await sending;
    await waitText(b, '#messages li.msg .text', 'm10');
    await waitText(a, '#messages li.msg .text', 'm10');
    await waitText(a, '#notice', 'Reconnected');
    const want = Array.from({ length: 10 }, (_, i) => `m${i + 1}`);
    assert.deepEqual(await messages(a), want);
    assert.deepEqual(await messages(b), want);
    await ann.context.close();
    await bob.context.close();
    assert.deepEqual(pageErrors, []);
  });

  test('a message longer than 500 characters is sent whole; one over the server limit is refused before sending, never cut', async () => {
    const ann = await open('Ann', 'long');
    const bob = await open('Bob', 'long');
    const { page: a } = ann;
    const { page: b } = bob;
    await waitPresence(a, ['Ann', 'Bob']);
    const long = 'a'.repeat(600) + ' the end';
    await send(a, long);
    await waitText(b, '#messages li.msg .text', 'the end');
    assert.deepEqual(await messages(b), [long], 'received whole');

    // The limit is the server's (client.max_message_size, 64 KiB by default)
    // for the whole publish command: the page counts the JSON envelope too.
    const size = () => a.$eval('#text-size', (e) => ({ bytes: Number(e.dataset.bytes), limit: Number(e.dataset.limit) }));
    await a.fill('#text', 'x');
    const one = await size();
    assert.equal(one.limit, 65536);
    const envelope = one.bytes - 1;
    assert.ok(envelope > 50 && envelope < 200, `envelope ${envelope}`);
    const largest = 'y'.repeat(one.limit - envelope);
    await a.fill('#text', largest);
    assert.equal((await size()).bytes, one.limit);
    assert.equal(await a.isEnabled('#send'), true, 'the largest message the server accepts can be sent');
    await a.press('#text', 'Enter');
    await b.waitForFunction((n) => [...document.querySelectorAll('#messages li.msg .text')].some((e) => e.textContent.length === n), largest.length, { timeout: WAIT, polling: 50 });
    assert.equal(await state(a), 'connected');

    // One byte more (a two-byte character instead of a one-byte one): refused, and said so.
    const tooLong = 'y'.repeat(one.limit - envelope - 1) + 'é';
    await a.fill('#text', tooLong);
    assert.equal(await a.isEnabled('#send'), false, 'Send is disabled');
    const warning = await a.textContent('#text-size');
    assert.match(warning, /too long/i);
    assert.match(warning, /65,?536/);
    await a.press('#text', 'Enter');
    await sleep(500);
    assert.equal(await a.inputValue('#text'), tooLong, 'kept in the box, not cut');
    assert.equal((await messages(b)).length, 2, 'nothing more was sent');
    assert.equal(await state(a), 'connected');
    // Shortened again: Send comes back.
    await a.fill('#text', 'short');
    assert.equal(await a.isEnabled('#send'), true);
    assert.equal(await a.textContent('#text-size'), '');
    await ann.context.close();
    await bob.context.close();
    assert.deepEqual(pageErrors, []);
  });

  test('a 24-character nickname fits: ellipsis and the full name as a tooltip, no sideways scroll (wide and narrow)', async () => {
    const longNick = 'W'.repeat(24); // wide letters: the worst case of 24 characters
    const ann = await open('Ann', 'nicks');
    const long = await open(longNick, 'nicks');
    const { page: a } = ann;
    await waitPresence(a, ['Ann', longNick]);
    await send(long.page, 'a message from the long name');
    await waitText(a, '#messages li.msg .text', 'a message from the long name');
    for (const [width, height] of [
      [1100, 700],
      [800, 700],
      [360, 640],
    ]) {
      for (const page of [a, long.page]) {
        await page.setViewportSize({ width, height });
        const fit = await page.evaluate(() => ({
          scroll: document.documentElement.scrollWidth,
          client: document.documentElement.clientWidth,
        }));
        assert.ok(fit.scroll <= fit.client, `${width}px: the page scrolls sideways (${fit.scroll} > ${fit.client})`);
        const entry = await page.$eval(
          '#presence li[title]',
          (e) => {
            const name = e.querySelector('.name') || e;
            return {
              title: e.title,
              overflow: getComputedStyle(name).textOverflow,
              inside: e.getBoundingClientRect().right <= e.closest('.people').getBoundingClientRect().right + 0.5,
            };
          },
        ).catch(() => null);
        assert.ok(entry, 'the presence entries have a title');
        const titles = await page.$$eval('#presence li', (els) => els.map((e) => e.title));
        assert.ok(titles.includes(longNick), `the full name is a tooltip: ${titles}`);
        assert.equal(entry.overflow, 'ellipsis');
        assert.ok(entry.inside, 'the entry stays inside the "Here now" panel');
      }
    }
    await long.page.screenshot({ path: path.join(artifacts, 'chat-long-nickname-narrow.png'), fullPage: true });
    await ann.context.close();
    await long.context.close();
    assert.deepEqual(pageErrors, []);
  });

  test('entering a room shows its last 50 chat messages, not fewer because of "joined" lines', async () => {
    // 60 chat messages through the HTTP API, with others entering among the
    // last 50 (their "joined" lines are publications too).
    for (let i = 1; i <= 60; i++) {
      await server.api('publish', { channel: 'chat:history', data: { type: 'msg', nick: 'seed', text: `seed ${i}`, ts: Date.now() } });
      if (i % 20 === 0) await server.api('publish', { channel: 'chat:history', data: { type: 'hello', nick: `visitor ${i}` } });
    }
    const ann = await open('Ann', 'history');
    const { page: a } = ann;
    await waitText(a, '#messages li.msg .text', 'seed 60');
    await waitText(a, '#messages li.sys .text', 'Ann joined');
    await sleep(300); // anything late would show by now
    const want = Array.from({ length: 50 }, (_, i) => `seed ${i + 11}`);
    assert.deepEqual(await messages(a), want, 'exactly the newest 50, in order');
    const joined = await a.$$eval('#messages li.sys .text', (els) => els.map((e) => e.textContent));
    assert.deepEqual(joined, ['visitor 20 joined', 'visitor 40 joined', 'visitor 60 joined', 'Ann joined']);
    await ann.context.close();
    assert.deepEqual(pageErrors, []);
  });

  test('a server restart keeps the messages on screen, marked as earlier, and the reloaded history shows nothing twice', async () => {
    const ann = await open('Ann', 'restart');
    const bob = await open('Bob', 'restart');
    const { page: a } = ann;
    const { page: b } = bob;
    await waitPresence(a, ['Ann', 'Bob']);
    await send(a, 'before 1');
    await send(b, 'before 2');
    await waitText(a, '#messages li.msg .text', 'before 2');
    await waitText(b, '#messages li.msg .text', 'before 2');

    // Ann's browser is offline across the restart; Bob writes in the new
    // server's history before Ann is back.
    await ann.context.setOffline(true);
    await waitState(a, 'connecting');
    await server.restart();
    await waitState(b, 'connected');
    await waitText(b, '#notice', 'server restart');
    await send(b, 'after 1');
    await waitText(b, '#messages li.msg .text', 'after 1');
    await ann.context.setOffline(false);
    await waitState(a, 'connected');
    await waitText(a, '#notice', 'server restart');
    await waitText(a, '#messages li.msg .text', 'after 1');
    await send(a, 'after 2');
    await waitText(a, '#messages li.msg .text', 'after 2');
    await waitText(b, '#messages li.msg .text', 'after 2');
    await sleep(300);

    for (const page of [a, b]) {
      assert.deepEqual(await messages(page), ['before 1', 'before 2', 'after 1', 'after 2'], 'kept, none twice');
      assert.deepEqual(await earlierMessages(page), ['before 1', 'before 2']);
      const all = await lines(page);
      const divider = all.findIndex(([kind]) => kind === 'divider');
      assert.ok(divider > 0, 'a divider');
      assert.equal(all[divider][1], 'server restarted — earlier messages above');
      assert.equal(all.filter(([kind]) => kind === 'divider').length, 1);
      assert.ok(all.slice(0, divider).every(([kind]) => kind.endsWith('+earlier')), 'above the line: earlier');
      assert.ok(all.slice(divider + 1).every(([kind]) => !kind.endsWith('+earlier')), 'below: the new server');
    }
    await a.screenshot({ path: path.join(artifacts, 'chat-restart-kept.png') });

    // Too much missed for recovery, the same stream: nothing is marked
    // earlier, the history fills in after what is shown, nothing twice.
    await ann.context.setOffline(true);
    await waitState(a, 'connecting');
    for (let i = 1; i <= 120; i++) await server.api('publish', { channel: 'chat:restart', data: { type: 'msg', nick: 'seed', text: `gap ${i}` } });
    await ann.context.setOffline(false);
    await waitState(a, 'connected');
    await waitText(a, '#messages li.msg .text', 'gap 120');
    await sleep(300);
    const got = await messages(a);
    assert.deepEqual(got, ['before 1', 'before 2', 'after 1', 'after 2', ...Array.from({ length: 50 }, (_, i) => `gap ${i + 71}`)]);
    assert.equal((await lines(a)).filter(([kind]) => kind === 'divider').length, 1, 'no new divider');
    await ann.context.close();
    await bob.context.close();
    assert.deepEqual(pageErrors, []);
  });

  test('closing a tab says "left", also of someone whose "joined" is out of the history, and of one of two tabs of one name; you are marked "(you)"', async () => {
    const bob = await open('Bob', 'close');
    // Bob's "joined" falls out of what a newcomer reads (the last 50 messages).
    for (let i = 1; i <= 60; i++) await server.api('publish', { channel: 'chat:close', data: { type: 'msg', nick: 'seed', text: `seed ${i}` } });
    const ann = await open('Ann', 'close');
    const { page: a } = ann;
    await waitText(a, '#messages li.msg .text', 'seed 60');
    await waitPresence(a, ['Ann', 'Bob']); // not "guest": Ann's page asked who is here
    assert.deepEqual(
      await a.$$eval('#presence li.me', (els) => els.map((e) => e.textContent)),
      ['Ann (you)'],
      'you are marked "(you)", not only in bold',
    );
    assert.deepEqual(await a.$$eval('#presence li:not(.me)', (els) => els.map((e) => e.textContent)), ['Bob']);

    // A reload is no leave: no "left" line.
    await bob.page.reload({ waitUntil: 'load' });
    await waitState(bob.page, 'connected');
    await waitText(a, '#messages li.sys .text', 'Bob joined');
    await sleep(3500);
    assert.equal(await a.$$eval('#messages li.sys .text', (els) => els.filter((e) => e.textContent === 'Bob left').length), 0);
    await waitPresence(a, ['Ann', 'Bob']);

    // Bob closes his tab: Ann's page says so.
    await bob.page.close();
    await waitPresence(a, ['Ann']);
    await waitText(a, '#messages li.sys .text', 'Bob left');

    // Two tabs of one name (one browser remembers the nickname): closing
    // one says "left" too; the other is still here.
    const ann2 = await open('Ann', 'close');
    await waitPresence(a, ['Ann', 'Ann']);
    await ann2.page.close();
    await waitPresence(a, ['Ann']);
    await waitText(a, '#messages li.sys .text', 'Ann left');
    await a.screenshot({ path: path.join(artifacts, 'chat-tab-closed.png') });
    await ann.context.close();
    await bob.context.close();
    await ann2.context.close();
    assert.deepEqual(pageErrors, []);
  });

  test('the ticker shows an unchanged price as neutral, neither up nor down', async () => {
    const context = await browser.newContext({ viewport: { width: 900, height: 600 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`ticker: ${e.message}`));
    await page.goto(`${server.httpUrl}/ticker.html?channel=ticker:flat`, { waitUntil: 'load' });
    await waitState(page, 'connected');
    const publish = (ts, prices) => server.api('publish', { channel: 'ticker:flat', data: { ts, prices } });
    const change = (symbol) =>
      page.$eval(`#prices tr[data-symbol="${symbol}"] td.change`, (e) => ({ text: e.textContent, className: e.className, color: getComputedStyle(e).color }));
    const base = Date.now();
    await publish(base, { UP: 10, DOWN: 10, SAME: 10, TINY: 10 });
    await page.waitForFunction(() => document.getElementById('updates').textContent === '1', null, { timeout: WAIT });
    await publish(base + 1, { UP: 10.5, DOWN: 9.25, SAME: 10, TINY: 10.001 });
    await page.waitForFunction(() => document.getElementById('updates').textContent === '2', null, { timeout: WAIT });
    assert.equal((await change('UP')).text, '▲ 0.50');
    assert.match((await change('UP')).className, /\bup\b/);
    assert.equal((await change('DOWN')).text, '▼ 0.75');
    assert.match((await change('DOWN')).className, /\bdown\b/);
    for (const symbol of ['SAME', 'TINY']) {
      const c = await change(symbol);
      assert.equal(c.text, '0.00', `${symbol}: no arrow`);
      assert.doesNotMatch(c.className, /\b(up|down)\b/, `${symbol}: not up or down`);
      assert.notEqual(c.color, (await change('UP')).color, `${symbol}: not the colour of up`);
      assert.notEqual(c.color, (await change('DOWN')).color, `${symbol}: not the colour of down`);
    }
    await context.close();
    assert.deepEqual(pageErrors, []);
  });

  test('the live ticker shows prices published through the HTTP API by examples/ticker.mjs', async () => {
    const feed = (count) =>
      promisify(execFile)(
        process.execPath,
        [path.join(root, 'examples/ticker.mjs'), '--url', server.httpUrl, '--key', API_KEY, '--interval', '100', '--count', String(count)],
        { timeout: 30000 },
      );
    await feed(2); // before the page opens: it shows the latest from history
    const context = await browser.newContext({ viewport: { width: 900, height: 600 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`ticker: ${e.message}`));
    await page.goto(`${server.httpUrl}/ticker.html`, { waitUntil: 'load' });
    await waitState(page, 'connected');
    await page.waitForFunction(() => document.querySelectorAll('#prices tr[data-symbol]').length === 5, null, {
      timeout: WAIT,
    });
    assert.equal(await page.textContent('#updates'), '1');
    await feed(3);
    await page.waitForFunction(() => document.getElementById('updates').textContent === '4', null, { timeout: WAIT });
    const rows = await page.$$eval('#prices tr[data-symbol]', (els) =>
      els.map((e) => [e.dataset.symbol, Number(e.cells[1].textContent)]),
    );
    assert.deepEqual(
      rows.map(([s]) => s),
      ['ACME', 'GLOBX', 'INITECH', 'UMBRL', 'TIDE'],
    );
    assert.ok(rows.every(([, p]) => p > 0));
    await page.screenshot({ path: path.join(artifacts, 'ticker.png') });
    await context.close();
    assert.deepEqual(pageErrors, []);
  });
});
