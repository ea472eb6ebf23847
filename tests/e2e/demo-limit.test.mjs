// End to end: the demo chat follows the message size limit the server
// announces in its connect reply (`client.max_message_size`), here a
// server configured below the 64 KiB default, in headless Chromium (see
// demo.test.mjs for the environment).

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Server, sleep } from '../../clients/js/test/helpers.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const require = createRequire(path.join(root, 'tests/interop/package.json'));
const { chromium } = require('playwright-core');

const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const WAIT = 15000;
const LIMIT = 4096;

describe('demo app with a smaller message limit', { timeout: 120000 }, () => {
  let server;
  let browser;

  before(async () => {
    assert.ok(existsSync(executablePath), `${executablePath} not found (scripts/install-deps installs chromium)`);
    server = await Server.start(`[client]\nmax_message_size = ${LIMIT}\n`);
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

  test("a message over the server's configured limit is refused before sending, with that limit", async () => {
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(`${server.httpUrl}/?nick=Lim#limit`, { waitUntil: 'load' });
    await page.waitForFunction(() => document.getElementById('state').dataset.state === 'connected', null, { timeout: WAIT });
    // 5,000 characters: far under 64 KiB, over this server's 4 KiB.
    await page.fill('#text', 'z'.repeat(5000));
    const limit = await page.$eval('#text-size', (e) => Number(e.dataset.limit));
    assert.equal(limit, LIMIT, "the page counts against the server's limit");
    assert.equal(await page.isEnabled('#send'), false, 'Send is disabled');
    assert.match(await page.textContent('#text-size'), /4,?096/);
    await page.press('#text', 'Enter');
    await sleep(500);
    assert.equal(await page.$eval('#state', (e) => e.dataset.state), 'connected', 'not closed with 1009');
    // Under the limit: sent.
    await page.fill('#text', 'small enough');
    await page.press('#text', 'Enter');
    await page.waitForFunction(
      () => [...document.querySelectorAll('#messages li.msg .text')].some((e) => e.textContent === 'small enough'),
      null,
      { timeout: WAIT },
    );
    assert.deepEqual(errors, []);
    await page.close();
  });
});
