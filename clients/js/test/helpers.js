// Test helpers: a real `tidewire serve` (restartable on the same port), a
// TCP proxy that can cut connections, HS256 tokens, and waiting.
//
// TIDEWIRE_BIN: the tidewire binary (default: target/debug/tidewire of
// this repository; scripts/test builds it).

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { afterEach } from 'node:test';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '../../..');

export function tidewireBin() {
  const bin = process.env.TIDEWIRE_BIN || path.join(repoRoot, 'target/debug/tidewire');
  if (!existsSync(bin)) {
    throw new Error(`${bin} does not exist: build it (cargo build -p tidewire-cli) or set TIDEWIRE_BIN`);
  }
  return bin;
}

export const API_KEY = 'test-api-key';
export const SECRET = 'test-hmac-secret';

/**
 * A running `tidewire serve` with `config` (TOML text) on 127.0.0.1.
 * `restart()` stops it (SIGTERM: graceful) and starts a new process on the
 * same port: the in-memory history is gone, streams get new epochs.
 */
export class Server {
  /** `args`: more flags for `tidewire serve` (`--tls-self-signed` makes it https). */
  static async start(config = '', { port = 0, args = [] } = {}) {
    const server = new Server(config);
    server.args = args;
    await server._spawn(port);
    return server;
  }

  constructor(config) {
    this.args = [];
    this.scheme = 'http';
    this.dir = mkdtempSync(path.join(tmpdir(), 'tidewire-js-'));
    this.configPath = path.join(this.dir, 'tidewire.toml');
    writeFileSync(this.configPath, config);
    this.child = null;
    this.port = 0;
    this.log = [];
  }

  get addr() {
    return `127.0.0.1:${this.port}`;
  }

  get wsUrl() {
    return `${this.scheme === 'https' ? 'wss' : 'ws'}://${this.addr}/connection/websocket`;
  }

  get httpUrl() {
    return `${this.scheme}://${this.addr}`;
  }

  async _spawn(port) {
    const bin = tidewireBin();
    // A port just given up may still be busy for a moment: retry.
    for (let attempt = 0; ; attempt++) {
      try {
        await this._spawnOnce(bin, port);
        return;
      } catch (e) {
        if (attempt >= 20 || port === 0) throw e;
        await sleep(100);
      }
    }
  }

  _spawnOnce(bin, port) {
    return new Promise((resolve, reject) => {
      const child = spawn(
        bin,
        ['serve', '--listen', `127.0.0.1:${port}`, '--config', this.configPath, '--api-key', API_KEY, ...this.args],
        { cwd: this.dir, env: { ...process.env, RUST_LOG: 'warn' }, stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let buffered = '';
      let listening = false;
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`tidewire serve did not start in time:\n${this.log.join('')}`));
      }, 20000);
      child.stdout.setEncoding('utf8');
      child.stdout.on('data', (chunk) => {
        this.log.push(chunk);
        if (listening) return;
        buffered += chunk;
        const m = buffered.match(/listening on (https?):\/\/([^/]+)\//);
        if (m) {
          listening = true;
          clearTimeout(timer);
          this.scheme = m[1];
          this.port = Number(m[2].split(':').pop());
          this.child = child;
          resolve();
        }
      });
      child.stderr.setEncoding('utf8');
      child.stderr.on('data', (chunk) => this.log.push(chunk));
      child.on('exit', (code, signal) => {
        if (!listening) {
          clearTimeout(timer);
          reject(new Error(`tidewire serve exited (${code ?? signal}) before listening:\n${this.log.join('')}`));
        }
      });
    });
  }

  /** Stops the server (SIGTERM, graceful: clients get a reconnect advice). */
  async stop() {
    const child = this.child;
    this.child = null;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    await new Promise((resolve) => {
      const kill = setTimeout(() => child.kill('SIGKILL'), 15000);
      child.once('exit', () => {
        clearTimeout(kill);
        resolve();
      });
      child.kill('SIGTERM');
    });
  }

  async restart() {
    const port = this.port;
    await this.stop();
    await this._spawn(port);
  }

  async close() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** Calls the HTTP API; resolves to the result, rejects on an error status. */
  async api(method, body = {}) {
    const res = await fetch(`${this.httpUrl}/api/${method}`, {
      method: 'POST',
      headers: { Authorization: `apikey ${API_KEY}` },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(10000),
    });
    const json = await res.json();
    if (!res.ok) throw new Error(`api ${method}: HTTP ${res.status} ${JSON.stringify(json)}`);
    return json;
  }
}

/**
 * A TCP proxy in front of the server: `cut()` drops every connection (no
 * close frame: the client sees 1006), `refuse` makes new ones fail.
 */
export class Proxy {
  static async start(target) {
    const proxy = new Proxy(target);
    await new Promise((resolve) => proxy.server.listen(0, '127.0.0.1', resolve));
    proxy.port = proxy.server.address().port;
    return proxy;
  }

  constructor(target) {
    this.target = target;
    this.connections = 0;
    this.pairs = new Set();
    this.server = net.createServer((down) => {
      this.connections++;
      const [host, port] = this.target.split(':');
      const up = net.connect(Number(port), host);
      const pair = { down, up };
      this.pairs.add(pair);
      const end = () => {
        down.destroy();
        up.destroy();
        this.pairs.delete(pair);
      };
      down.on('error', end).on('close', end);
      up.on('error', end).on('close', end);
      down.pipe(up);
      up.pipe(down);
    });
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/connection/websocket`;
  }

  /** Refuses new connections (the port is closed) until {@link accept}. */
  async refuse() {
    await new Promise((resolve) => this.server.close(resolve));
  }

  async accept() {
    await new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.port, '127.0.0.1', () => {
        this.server.off('error', reject);
        resolve();
      });
    });
  }

  cut() {
    for (const { down, up } of this.pairs) {
      down.destroy();
      up.destroy();
    }
    this.pairs.clear();
  }

  async close() {
    this.cut();
    if (this.server.listening) await new Promise((resolve) => this.server.close(resolve));
  }
}

/**
 * `new Client(...)` for a test; every client made so is disconnected after
 * each test (also a failed one: no client goes on reconnecting).
 */
export function clientFactory(Client) {
  const made = [];
  afterEach(() => {
    for (const client of made.splice(0)) client.disconnect();
  });
  return (url, options) => {
    const client = new Client(url, options);
    made.push(client);
    return client;
  };
}

/** An HS256 JWT signed with {@link SECRET}. */
export function token(claims, secret = SECRET) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  const sig = createHmac('sha256', secret).update(head).digest('base64url');
  return `${head}.${sig}`;
}

export const nowSecs = () => Math.floor(Date.now() / 1000);

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` until it returns a truthy value (resolved to), or fails after `timeout` ms with `what`. */
export async function waitFor(check, what, timeout = 10000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Resolves with the context of the next `event` of `emitter` (matching `filter`), or rejects after `timeout` ms. */
export function nextEvent(emitter, event, filter = () => true, timeout = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(event, listener);
      reject(new Error(`timed out waiting for event ${event}`));
    }, timeout);
    const listener = (ctx) => {
      if (!filter(ctx)) return;
      clearTimeout(timer);
      emitter.off(event, listener);
      resolve(ctx);
    };
    emitter.on(event, listener);
  });
}

/** Records a client's (or subscription's) events, in order. */
export function record(emitter, events) {
  const log = [];
  for (const event of events) emitter.on(event, (ctx) => log.push({ event, ...ctx }));
  return log;
}

/**
 * A subscribed client (connected with `options`) that records the `n` of
 * every publication, and its subscription's `subscribing` / `subscribed`
 * events.
 */
export async function subscriber(newClient, url, channel, options) {
  const client = newClient(url, options);
  const sub = client.newSubscription(channel);
  const got = [];
  sub.on('publication', (p) => got.push(p.data.n));
  const events = record(sub, ['subscribing', 'subscribed']);
  sub.subscribe();
  client.connect();
  await sub.ready(5000);
  return { client, sub, got, events };
}

/** A free TCP port on loopback (free when asked: bind it soon). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/** Resolves once something listens on `port` of 127.0.0.1. */
export function listening(port) {
  return waitFor(
    () =>
      new Promise((resolve) => {
        const socket = net.connect(port, '127.0.0.1', () => {
          socket.destroy();
          resolve(true);
        });
        socket.on('error', () => resolve(false));
      }),
    `port ${port} listening`,
  );
}

/** Spawns `command` (output ignored); rejects, naming install-deps, when it cannot start. */
export async function spawnChecked(command, args) {
  const child = spawn(command, args, { stdio: 'ignore' });
  await new Promise((resolve, reject) => {
    child.once('error', (e) => reject(new Error(`${command} (scripts/install-deps installs it): ${e.message}`)));
    child.once('spawn', resolve);
  });
  return child;
}

/** A redis-server of the test's own on a free port, without persistence: `{ port, child }`. */
export async function startRedis() {
  const port = await freePort();
  const child = await spawnChecked('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no']);
  await listening(port);
  return { port, child };
}
