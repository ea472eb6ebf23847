#!/usr/bin/env node
// Drive Debian's Chromium headless with playwright-core: open a page (served
// by the server under test), wait until the page's text contains a marker,
// save a screenshot.
//
//   node tests/interop/browser_echo.js URL MARKER SCREENSHOT.png [--timeout SECS]
//                                      [--ignore-https-errors]
//
// URL         page to open, e.g. http://127.0.0.1:PORT/
// MARKER      text the page shows when its WebSocket exchange succeeded
// SCREENSHOT  PNG path (parent directories are created); written once the
//             page has loaded, also when the marker never shows up, so a
//             failing run can be inspected
// --timeout   seconds to wait for the marker (default 30)
//
// Environment: CHROMIUM_PATH (default /usr/bin/chromium).
// Prints progress lines, the page's console messages and errors, and ends
// with "RESULT: PASS" (exit 0) or "RESULT: FAIL: <why>" (exit 1); 2 on usage
// errors.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

function usage(msg) {
  if (msg) console.error(`browser_echo: ${msg}`);
  console.error('usage: browser_echo.js URL MARKER SCREENSHOT.png [--timeout SECS] [--ignore-https-errors]');
  process.exit(2);
}

const pos = [];
let timeoutSecs = 30;
let ignoreHttpsErrors = false;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--ignore-https-errors') {
    ignoreHttpsErrors = true;
  } else if (argv[i] === '--timeout') {
    timeoutSecs = Number(argv[++i]);
    if (!Number.isFinite(timeoutSecs) || timeoutSecs <= 0) usage('bad --timeout');
  } else if (argv[i] === '-h' || argv[i] === '--help') usage();
  else pos.push(argv[i]);
}
if (pos.length !== 3) usage('need URL, MARKER and SCREENSHOT');
const [url, marker, shotPath] = pos;
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

async function main() {
  if (!fs.existsSync(executablePath)) {
    throw new Error(`${executablePath} not found (scripts/install-deps installs chromium)`);
  }
  fs.mkdirSync(path.dirname(path.resolve(shotPath)), { recursive: true });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'tidewire-chromium-'));
  console.log(`launching ${executablePath} (headless)`);
  // launchPersistentContext gives Chromium a fresh, private --user-data-dir
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    timeout: 60000,
    // For a server with a development (self-signed) certificate.
    ignoreHTTPSErrors: ignoreHttpsErrors,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-quic',
      '--no-first-run',
      '--disable-component-update',
      '--disable-sync',
      ...(ignoreHttpsErrors ? ['--ignore-certificate-errors'] : []),
    ],
  });
  let failure = null;
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (m) => console.log(`page console.${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
    page.on('websocket', (ws) => {
      console.log(`page websocket: ${ws.url()}`);
      ws.on('close', () => console.log(`page websocket closed: ${ws.url()}`));
      ws.on('socketerror', (e) => console.log(`page websocket error: ${e}`));
    });
    console.log(`opening ${url}`);
    const resp = await page.goto(url, { waitUntil: 'load', timeout: timeoutSecs * 1000 });
    console.log(`loaded: HTTP ${resp ? resp.status() : '?'}`);
    if (resp && !resp.ok()) failure = `page returned HTTP ${resp.status()}`;
    if (!failure) {
      console.log(`waiting up to ${timeoutSecs}s for marker ${JSON.stringify(marker)}`);
      try {
        await page.waitForFunction(
          (m) => document.body !== null && document.body.innerText.includes(m),
          marker,
          { timeout: timeoutSecs * 1000, polling: 100 },
        );
        console.log('marker found');
      } catch (e) {
        const text = await page.evaluate(() => (document.body ? document.body.innerText : '')).catch(() => '');
        failure = `marker ${JSON.stringify(marker)} not on the page after ${timeoutSecs}s; page text: ${JSON.stringify(text.slice(0, 500))}`;
      }
    }
    await page.screenshot({ path: shotPath, fullPage: true });
    console.log(`screenshot: ${shotPath}`);
  } finally {
    await context.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  }
  return failure;
}

const guard = setTimeout(() => {
  console.log(`RESULT: FAIL: did not finish within ${timeoutSecs + 90}s`);
  process.exit(1);
}, (timeoutSecs + 90) * 1000);
guard.unref();

main().then(
  (failure) => {
    if (failure) {
      console.log(`RESULT: FAIL: ${failure}`);
      process.exit(1);
    }
    console.log('RESULT: PASS');
    process.exit(0);
  },
  (err) => {
    console.log(`RESULT: FAIL: ${err && err.message ? err.message : err}`);
    process.exit(1);
  },
);
