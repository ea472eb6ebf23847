// Headless Chromium for the end-to-end tests: Debian's /usr/bin/chromium
// (CHROMIUM_PATH) driven by tests/interop's playwright-core, and where
// screenshots go (TIDEWIRE_TEST_ARTIFACTS, default test-artifacts/, e2e/).

import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const require = createRequire(path.join(root, 'tests/interop/package.json'));
const { chromium } = require('playwright-core');

export const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const artifacts = path.join(process.env.TIDEWIRE_TEST_ARTIFACTS || path.join(root, 'test-artifacts'), 'e2e');

/** Launches it headless (the flags this machine needs, and `extra`); makes the artifacts folder. */
export async function launch(extra = []) {
  assert.ok(existsSync(executablePath), `${executablePath} not found (scripts/install-deps installs chromium)`);
  mkdirSync(artifacts, { recursive: true });
  return chromium.launch({
    executablePath,
    headless: true,
    timeout: 60000,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run', ...extra],
  });
}
