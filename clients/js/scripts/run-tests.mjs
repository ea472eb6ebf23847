#!/usr/bin/env node
// Runs the client tests (test/*.test.js) with node's test runner against a
// real `tidewire serve` (TIDEWIRE_BIN, default target/debug/tidewire).
// Node 20 has the WebSocket global only behind --experimental-websocket
// (Node 22 has it by default): the tests use the global one, like a browser,
// and the ws package where they say so.
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const only = process.argv.slice(2);
const files = only.length > 0
  ? only
  : readdirSync(path.join(root, 'test'))
    .filter((f) => f.endsWith('.test.js'))
    .sort()
    .map((f) => path.join('test', f));
const flags = typeof globalThis.WebSocket === 'function' ? [] : ['--experimental-websocket'];
const result = spawnSync(process.execPath, [...flags, '--test', ...files], {
  cwd: root,
  stdio: 'inherit',
  timeout: 10 * 60 * 1000,
});
if (result.error) throw result.error;
process.exit(result.status ?? 1);
