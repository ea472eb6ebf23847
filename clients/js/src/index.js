// tidewire-client: the browser and Node (>= 20) client of `tidewire serve`.
//
// Speaks the JSON protocol of docs/protocol.md (version 1) over one
// WebSocket, or where WebSocket cannot pass over HTTP streaming or
// Server-Sent Events with HTTP POSTs up (the `transports` option; it falls
// back by itself and tries WebSocket again later): connect with a token (refreshed before it expires), subscribe,
// publish, presence, history; reconnects by itself with exponential backoff
// and jitter, resubscribes, and recovers what it missed (without gaps or
// duplicates, or says `recovered: false` when it cannot).
//
// No dependencies. Types: index.d.ts next to this file.

/** The subprotocol of version 1 of the protocol. */
export const SUBPROTOCOL = 'tidewire.v1.json';

/** States of a {@link Client}. */
export const State = Object.freeze({
  Disconnected: 'disconnected',
  Connecting: 'connecting',
  Connected: 'connected',
});

/** States of a {@link Subscription}. */
export const SubscriptionState = Object.freeze({
  Unsubscribed: 'unsubscribed',
  Subscribing: 'subscribing',
  Subscribed: 'subscribed',
});

/**
 * Codes of errors raised by the client itself (server errors keep the
 * protocol's codes, 100 and up).
 */
export const errorCodes = Object.freeze({
  timeout: 1,
  transportClosed: 2,
  clientDisconnected: 3,
  subscriptionUnsubscribed: 4,
  connectToken: 5,
  refreshToken: 6,
  subscriptionToken: 7,
  badConfiguration: 8,
  transportWrite: 9,
});

/** Codes of the `connecting` event (besides close codes of the server, 1000 and up). */
export const connectingCodes = Object.freeze({
  connectCalled: 0,
  transportClosed: 1,
  noPing: 2,
  connectTimeout: 3,
  offline: 4,
  tokenExpired: 5,
  serverError: 6,
});

/** Codes of the `disconnected` event (besides close codes of the server, 1000 and up). */
export const disconnectedCodes = Object.freeze({
  disconnectCalled: 0,
  unauthorized: 1,
  badProtocol: 2,
  refused: 3,
});

/** Codes of a subscription's `subscribing` event. */
export const subscribingCodes = Object.freeze({
  subscribeCalled: 0,
  transportClosed: 1,
  gap: 2,
  tokenExpired: 3,
  retry: 4,
});

/** Codes of a subscription's `unsubscribed` event (besides the server's 2000). */
export const unsubscribedCodes = Object.freeze({
  unsubscribeCalled: 0,
  unauthorized: 1,
  refused: 2,
});

// Close codes after which the client does not reconnect by itself (when the
// server sent no `disconnect` push with its own advice): message too big,
// disconnected by the server, refused by the application backend.
const NO_RECONNECT = new Set([1009, 3000, 3004]);

/** An error of a command, a token callback or the transport. */
export class TidewireError extends Error {
  /**
   * @param {number} code a protocol error code (100 and up) or one of {@link errorCodes}
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = 'TidewireError';
    this.code = code;
  }
}

/** Thrown (or rejected with) by a `getToken` callback: the user may not connect or subscribe. */
export class UnauthorizedError extends Error {
  constructor(message = 'unauthorized') {
    super(message);
    this.name = 'UnauthorizedError';
  }
}

/** The transports the client knows, in the order it tries them by default. */
export const TRANSPORTS = Object.freeze(['websocket', 'http_stream', 'sse', 'long_poll']);

/** After WebSocket failed, how long the client keeps to a fallback before it tries WebSocket again. */
const WEBSOCKET_RETRY_AFTER = 5 * 60 * 1000;

const DEFAULTS = {
  token: null,
  transports: TRANSPORTS,
  fetch: null,
  EventSource: null,
  withCredentials: false,
  getToken: null,
  data: undefined,
  WebSocket: null,
  minReconnectDelay: 500,
  maxReconnectDelay: 20000,
  timeout: 10000,
  maxServerPingDelay: 10000,
  // Refresh the connection token this long before it expires (or halfway,
  // for tokens that live less than twice as long).
  refreshMargin: 10000,
  maxBatch: 100,
  maxBatchBytes: 32768,
  debug: false,
};

/** A minimal event emitter: `on`, `once`, `off`; listeners' errors are reported, not thrown at the emitter. */
class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) {
      set = new Set();
      this._listeners.set(event, set);
    }
    set.add(listener);
    return this;
  }

  once(event, listener) {
    const wrapper = (ctx) => {
      this.off(event, wrapper);
      listener(ctx);
    };
    wrapper.listener = listener;
    return this.on(event, wrapper);
  }

  off(event, listener) {
    if (event === undefined) {
      this._listeners.clear();
      return this;
    }
    const set = this._listeners.get(event);
    if (!set) return this;
    if (listener === undefined) {
      set.clear();
      return this;
    }
    for (const l of set) {
      if (l === listener || l.listener === listener) set.delete(l);
    }
    return this;
  }

  removeAllListeners(event) {
    return this.off(event);
  }

  /** @protected */
  _emit(event, ctx) {
    const set = this._listeners.get(event);
    if (!set || set.size === 0) return;
    for (const listener of [...set]) {
      try {
        listener(ctx);
      } catch (e) {
        // Like a DOM event listener: reported as uncaught, the client goes on.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

function backoff(attempt, min, max) {
  const interval = Math.min(max, min * 2 ** Math.min(attempt, 30));
  // "Equal jitter": between half the interval and the whole of it.
  return Math.floor(interval * (0.5 + Math.random() * 0.5));
}

function textOf(data) {
  if (typeof data === 'string') return data;
  if (data instanceof ArrayBuffer) return new TextDecoder().decode(data);
  if (ArrayBuffer.isView(data)) return new TextDecoder().decode(data);
  return String(data);
}

/** `ws://host/connection/websocket` → `http://host/connection/` (where the HTTP fallbacks are). */
function fallbackBase(url) {
  const u = new URL(url);
  u.protocol = u.protocol === 'wss:' || u.protocol === 'https:' ? 'https:' : 'http:';
  u.pathname = u.pathname.replace(/websocket\/?$/, '');
  if (!u.pathname.endsWith('/')) u.pathname += '/';
  u.search = '';
  u.hash = '';
  return u.toString();
}

/**
 * A WebSocket look-alike over the HTTP fallbacks (bidirectional
 * emulation): the first `send` opens the stream with those commands, the
 * server's first message names the session, and later sends are POSTed to
 * `/connection/emulation` in order. Subclasses open the stream.
 */
class EmulatedSocket {
  constructor(url, fetchImpl, withCredentials) {
    this.readyState = 0;
    this._base = fallbackBase(url);
    this._fetch = fetchImpl;
    this._withCredentials = withCredentials === true;
    // Cookies go to another origin only when asked for (and the server
    // allows that origin); to the page's own, always.
    this._credentials = this._withCredentials ? 'include' : 'same-origin';
    this._abort = typeof AbortController === 'function' ? new AbortController() : null;
    this._session = null;
    this._seq = 0;
    this._pending = [];
    this._posting = Promise.resolve();
    this._started = false;
    this._closed = false;
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    // Open at once: the stream itself starts with the first commands.
    setTimeout(() => {
      if (this._closed) return;
      this.readyState = 1;
      if (this.onopen) this.onopen();
    }, 0);
  }

  send(text) {
    if (this._closed) throw new Error('the transport is closed');
    if (!this._started) {
      this._started = true;
      this._open(text);
    } else if (this._session === null) {
      this._pending.push(text);
    } else {
      this._post(text);
    }
  }

  close() {
    if (this._closed) return;
    this._closed = true;
    this.readyState = 3;
    this._stop();
  }

  _stop() {
    if (this._abort) this._abort.abort();
  }

  /** One message of the stream (a line of JSON). */
  _line(line) {
    if (line.startsWith('{"emulation"')) {
      const m = JSON.parse(line).emulation;
      if (m.session) {
        this._session = m.session;
        for (const text of this._pending.splice(0)) this._post(text);
      } else if (m.close) {
        this._fail(m.close.code, m.close.reason);
      }
      return;
    }
    if (this.onmessage) this.onmessage({ data: line });
  }

  _post(text) {
    const body = JSON.stringify({ session: this._session, seq: ++this._seq, text });
    // One at a time: the server orders them anyway, but a failure should
    // stop those behind it.
    this._posting = this._posting.then(async () => {
      if (this._closed) return;
      try {
        const response = await this._fetch(`${this._base}emulation`, {
          method: 'POST',
          headers: { 'Content-Type': 'application/json' },
          body,
          cache: 'no-store',
          credentials: this._credentials,
          signal: this._abort ? this._abort.signal : undefined,
        });
        if (!response.ok) this._fail(response.status === 429 ? 1013 : 1006, `commands refused: HTTP ${response.status}`);
      } catch (e) {
        this._fail(1006, `commands failed: ${e && e.message ? e.message : e}`);
      }
    });
  }

  _fail(code, reason) {
    if (this._closed) return;
    this._closed = true;
    this.readyState = 3;
    this._stop();
    if (this.onclose) this.onclose({ code, reason });
  }
}

/** HTTP streaming: `fetch` POST /connection/http_stream, newline-delimited JSON read from its body. */
class HttpStreamSocket extends EmulatedSocket {
  async _open(initial) {
    let response;
    try {
      response = await this._fetch(`${this._base}http_stream`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-ndjson' },
        body: initial,
        cache: 'no-store',
        credentials: this._credentials,
        signal: this._abort ? this._abort.signal : undefined,
      });
    } catch (e) {
      this._fail(1006, `stream failed: ${e && e.message ? e.message : e}`);
      return;
    }
    if (!response.ok || !response.body) {
      this._fail(1006, `stream refused: HTTP ${response.status}`);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this._closed) break;
        buffered += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buffered.indexOf('\n')) >= 0) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          if (line.trim() !== '') this._line(line);
          if (this._closed) return;
        }
      }
    } catch (e) {
      this._fail(1006, `stream failed: ${e && e.message ? e.message : e}`);
      return;
    }
    this._fail(1006, 'the stream ended');
  }
}

/**
 * Long-polling: POST /connection/long_poll opens the session with the first
 * commands, then GET /connection/long_poll?session=…&ack=N waits for what
 * is queued; `ack` (the last message it has) makes the server send again
 * what a lost answer carried.
 */
class LongPollSocket extends EmulatedSocket {
  async _open(initial) {
    let ack = 0;
    let answer = await this._request(`${this._base}long_poll`, { method: 'POST', body: initial });
    while (answer !== null && !this._closed) {
      const lines = answer.split('\n').filter((l) => l.trim() !== '');
      const head = lines.length > 0 ? JSON.parse(lines[0]).emulation : null;
      if (!head || typeof head.first !== 'number') {
        this._fail(1006, 'not a long-polling answer');
        return;
      }
      let seq = head.first - 1;
      for (const line of lines.slice(1)) {
        if (line.startsWith('{"emulation"')) {
          this._line(line); // the end
          continue;
        }
        seq++;
        if (seq <= ack) continue; // sent again: had it
        ack = seq;
        this._line(line);
        if (this._closed) return;
      }
      if (this._session === null) this._line(JSON.stringify({ emulation: { session: head.session } }));
      answer = await this._request(`${this._base}long_poll?session=${encodeURIComponent(this._session)}&ack=${ack}`, { method: 'GET' });
    }
  }

  /** One request; its body, or null once failed (then closed). */
  async _request(url, init) {
    try {
      const response = await this._fetch(url, {
        ...init,
        cache: 'no-store',
        credentials: this._credentials,
        signal: this._abort ? this._abort.signal : undefined,
      });
      const body = await response.text();
      if (!response.ok) {
        this._fail(1006, `long poll refused: HTTP ${response.status}`);
        return null;
      }
      return body;
    } catch (e) {
      this._fail(1006, `long poll failed: ${e && e.message ? e.message : e}`);
      return null;
    }
  }
}

/** Server-Sent Events: `EventSource` on GET /connection/sse?commands=…; each event one or more JSON lines. */
class SseSocket extends EmulatedSocket {
  constructor(url, fetchImpl, EventSourceImpl, withCredentials) {
    super(url, fetchImpl, withCredentials);
    this._EventSource = EventSourceImpl;
    this._source = null;
  }

  _open(initial) {
    const source = new this._EventSource(`${this._base}sse?commands=${encodeURIComponent(initial)}`,
      { withCredentials: this._withCredentials });
    this._source = source;
    source.onmessage = (event) => {
      for (const line of String(event.data).split('\n')) {
        if (line.trim() !== '') this._line(line);
        if (this._closed) return;
      }
    };
    // EventSource would reconnect by itself, to a new session: the client
    // reconnects instead, and recovers.
    source.onerror = () => this._fail(1006, 'the event stream failed');
  }

  _stop() {
    super._stop();
    if (this._source) this._source.close();
  }
}

function isBrowserWindow() {
  return typeof window !== 'undefined' && typeof window.addEventListener === 'function';
}

function publicationContext(channel, pub) {
  const ctx = { channel, data: pub.data };
  if (pub.offset !== undefined) ctx.offset = pub.offset;
  if (pub.info !== undefined) ctx.info = pub.info;
  return ctx;
}

/** The length of `text` in UTF-8 bytes (what the server counts). */
function utf8Length(text) {
  let bytes = 0;
  for (let i = 0; i < text.length; i++) {
    const unit = text.charCodeAt(i);
    if (unit < 0x80) bytes += 1;
    else if (unit < 0x800) bytes += 2;
    else if (unit >= 0xd800 && unit <= 0xdbff && i + 1 < text.length) {
      // A surrogate pair: one 4-byte character.
      bytes += 4;
      i++;
    } else bytes += 3;
  }
  return bytes;
}

/**
 * A connection to `tidewire serve`. See README.md for a tour.
 */
export class Client extends Emitter {
  /**
   * @param {string} url e.g. `ws://127.0.0.1:8080/connection/websocket`
   * @param {object} [options] see index.d.ts (`ClientOptions`)
   */
  constructor(url, options = {}) {
    super();
    if (typeof url !== 'string' || url === '') throw new TypeError('tidewire: the server URL is required');
    for (const key of Object.keys(options)) {
      if (!(key in DEFAULTS)) throw new TypeError(`tidewire: unknown option ${JSON.stringify(key)}`);
    }
    this.url = url;
    this._options = { ...DEFAULTS, ...options };
    const transports = this._options.transports;
    if (!Array.isArray(transports) || transports.length === 0 || transports.some((t) => !TRANSPORTS.includes(t))) {
      throw new TypeError(`tidewire: transports is a non-empty list of ${TRANSPORTS.map((t) => JSON.stringify(t)).join(', ')}`);
    }
    /** @type {'disconnected'|'connecting'|'connected'} */
    this.state = State.Disconnected;
    /** This connection's client id (from the connect reply), or null. */
    this.clientId = null;
    /** The user id of this connection ("" for anonymous), or null before the first connect. */
    this.user = null;
    /** The largest message the server reads, in bytes (from the connect reply), or null before. */
    this.maxMessageSize = null;
    this._token = this._options.token || null;
    /** @type {Map<string, Subscription>} */
    this._subs = new Map();
    this._ws = null;
    /** The transport in use ('websocket', 'http_stream', 'sse'), or null while not connected. */
    this.transport = null;
    this._transportIndex = 0;
    this._transportName = null;
    this._attemptConnected = false;
    this._websocketFailedAt = 0;
    this._transportId = 0;
    this._nextId = 1;
    /** @type {Map<number, {resolve: Function, reject: Function, timer: any}>} */
    this._calls = new Map();
    this._outbox = [];
    this._flushScheduled = false;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._pingTimer = null;
    this._pingWindow = 0;
    this._refreshTimer = null;
    this._refreshing = false;
    this._refreshAttempt = 0;
    this._disconnectAdvice = null;
    this._windowListeners = null;
  }

  // ------------------------------------------------------------ public API

  /** Connects (and from then on reconnects by itself) until {@link disconnect}. */
  connect() {
    if (this.state !== State.Disconnected) return;
    this._attempt = 0;
    this._listenToWindow(true);
    this._setState(State.Connecting);
    this._emit('connecting', { code: connectingCodes.connectCalled, reason: 'connect called' });
    this._startConnecting();
  }

  /** Closes the connection and stops reconnecting. Subscriptions are kept and resubscribed by the next {@link connect}. */
  disconnect() {
    if (this.state === State.Disconnected) return;
    this._closeTransport(1000, 'disconnect called');
    this._goDisconnected(disconnectedCodes.disconnectCalled, 'disconnect called');
  }

  /**
   * Resolves when the client is connected (at once if it is); rejects when
   * it is or becomes disconnected, or after `timeout` ms.
   * @param {number} [timeout]
   */
  ready(timeout) {
    if (this.state === State.Connected) return Promise.resolve();
    if (this.state === State.Disconnected) {
      return Promise.reject(new TidewireError(errorCodes.clientDisconnected, 'client disconnected'));
    }
    return new Promise((resolve, reject) => {
      let timer = null;
      const done = () => {
        this.off('connected', onConnected);
        this.off('disconnected', onDisconnected);
        if (timer !== null) clearTimeout(timer);
      };
      const onConnected = () => {
        done();
        resolve();
      };
      const onDisconnected = () => {
        done();
        reject(new TidewireError(errorCodes.clientDisconnected, 'client disconnected'));
      };
      this.on('connected', onConnected);
      this.on('disconnected', onDisconnected);
      if (timeout !== undefined && timeout !== null) {
        timer = setTimeout(() => {
          done();
          reject(new TidewireError(errorCodes.timeout, 'timeout'));
        }, timeout);
      }
    });
  }

  /**
   * A new subscription (not yet subscribed: call `subscribe()`).
   * @param {string} channel
   * @param {object} [options] see index.d.ts (`SubscriptionOptions`)
   */
  newSubscription(channel, options = {}) {
    if (this._subs.has(channel)) {
      throw new Error(`tidewire: a subscription to ${JSON.stringify(channel)} exists already`);
    }
    const sub = new Subscription(this, channel, options);
    this._subs.set(channel, sub);
    return sub;
  }

  /** The subscription to `channel`, or null. */
  getSubscription(channel) {
    return this._subs.get(channel) || null;
  }

  /** All subscriptions by channel. */
  subscriptions() {
    return Object.fromEntries(this._subs);
  }

  /** Unsubscribes and forgets a subscription. */
  removeSubscription(sub) {
    if (!sub) return;
    if (sub.state !== SubscriptionState.Unsubscribed) sub.unsubscribe();
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
  }

  /** Publishes `data` to `channel` (waits until connected, at most `timeout`). Resolves to `{offset, epoch}` (`{}` without history). */
  publish(channel, data) {
    return this._methodCall('publish', { channel, data });
  }

  /** Who is subscribed to `channel` (this client must be subscribed): `{clients: [{client, user, info}]}`. */
  presence(channel) {
    return this._methodCall('presence', { channel });
  }

  /** `{clients, users}` counts of `channel`. */
  presenceStats(channel) {
    return this._methodCall('presence_stats', { channel });
  }

  /**
   * Publications of `channel` kept in history: `{publications, offset, epoch}`.
   * @param {string} channel
   * @param {{limit?: number, since?: {offset: number, epoch: string}, reverse?: boolean}} [options]
   */
  history(channel, options = {}) {
    const params = { channel };
    if (options.limit !== undefined) params.limit = options.limit;
    if (options.since !== undefined) params.since = { offset: options.since.offset, epoch: options.since.epoch };
    if (options.reverse !== undefined) params.reverse = options.reverse;
    return this._methodCall('history', params).then((r) => ({
      publications: (r.publications || []).map((p) => publicationContext(channel, p)),
      offset: r.offset,
      epoch: r.epoch,
    }));
  }

  /** Replaces the connection token (used at the next connect or refresh). */
  setToken(token) {
    this._token = token || null;
  }

  // ------------------------------------------------------------ connection

  _log(...args) {
    if (this._options.debug) console.debug('[tidewire]', ...args);
  }

  _setState(state) {
    if (this.state === state) return;
    const oldState = this.state;
    this.state = state;
    this._emit('state', { newState: state, oldState });
  }

  /** The transports of this client that this runtime can use. */
  _usableTransports() {
    const o = this._options;
    return o.transports.filter((t) => {
      if (t === 'websocket') return typeof (o.WebSocket || globalThis.WebSocket) === 'function';
      const hasFetch = typeof (o.fetch || globalThis.fetch) === 'function';
      if (t === 'sse') return hasFetch && typeof (o.EventSource || globalThis.EventSource) === 'function';
      return hasFetch;
    });
  }

  /** A new transport of kind `name`, WebSocket-like. */
  _newTransport(name) {
    const o = this._options;
    const fetchImpl = o.fetch || globalThis.fetch.bind(globalThis);
    const credentials = o.withCredentials;
    if (name === 'http_stream') return new HttpStreamSocket(this.url, fetchImpl, credentials);
    if (name === 'sse') return new SseSocket(this.url, fetchImpl, o.EventSource || globalThis.EventSource, credentials);
    if (name === 'long_poll') return new LongPollSocket(this.url, fetchImpl, credentials);
    const WS = o.WebSocket || globalThis.WebSocket;
    return new WS(this.url, SUBPROTOCOL);
  }

  async _startConnecting() {
    const tid = ++this._transportId;
    const usable = this._usableTransports();
    if (usable.length === 0) {
      this._emitError('configuration', errorCodes.badConfiguration,
        'no usable transport: pass the `WebSocket` option (e.g. from the ws package) on Node < 22, or `fetch`');
      this._goDisconnected(disconnectedCodes.badProtocol, 'no usable transport');
      return;
    }
    if (this._transportIndex >= usable.length) this._transportIndex = 0;
    // WebSocket failed a while ago: try it again first.
    if (this._transportIndex > 0 && usable[0] === 'websocket' && Date.now() - this._websocketFailedAt > WEBSOCKET_RETRY_AFTER) {
      this._transportIndex = 0;
    }
    const name = usable[this._transportIndex];
    this._attemptConnected = false;
    if (!this._token && this._options.getToken) {
      let token;
      try {
        token = await this._options.getToken({});
      } catch (e) {
        if (tid !== this._transportId || this.state !== State.Connecting) return;
        if (e instanceof UnauthorizedError) {
          this._goDisconnected(disconnectedCodes.unauthorized, 'unauthorized');
          return;
        }
        this._emitError('connectToken', errorCodes.connectToken, `getToken failed: ${e && e.message ? e.message : e}`);
        this._scheduleReconnect();
        return;
      }
      if (tid !== this._transportId || this.state !== State.Connecting) return;
      if (!token) {
        this._goDisconnected(disconnectedCodes.unauthorized, 'unauthorized');
        return;
      }
      this._token = token;
    }
    let ws;
    try {
      ws = this._newTransport(name);
    } catch (e) {
      this._emitError('transport', errorCodes.transportClosed, `cannot open ${name}: ${e && e.message ? e.message : e}`);
      this._transportLost(connectingCodes.transportClosed, `cannot open ${name}`, true);
      return;
    }
    this._ws = ws;
    this._transportName = name;
    this._log('opening', name, this.url);
    this._connectTimer = setTimeout(() => {
      this._connectTimer = null;
      if (tid !== this._transportId) return;
      this._closeTransport(3000, 'connect timeout');
      this._transportLost(connectingCodes.connectTimeout, 'connect timeout', true);
    }, this._options.timeout);
    ws.onopen = () => {
      if (tid !== this._transportId) return;
      const params = {};
      if (this._token) params.token = this._token;
      if (this._options.data !== undefined) params.data = this._options.data;
      this._command(
        'connect',
        params,
        (err, result) => {
          if (tid !== this._transportId) return;
          if (err) this._onConnectError(err);
          else this._onConnected(result);
        },
        true,
      );
    };
    ws.onmessage = (event) => {
      if (tid !== this._transportId) return;
      this._onData(event.data);
    };
    ws.onerror = () => {
      // Browsers follow an error with a close event, some Node versions do
      // not (Node 20 on a refused connection): the transport is done either way.
      if (tid !== this._transportId) return;
      this._log('transport error');
      this._closeTransport(1000, 'transport error');
      this._transportClosed(1006, 'transport error');
    };
    ws.onclose = (event) => {
      if (tid !== this._transportId) return;
      this._ws = null;
      this._transportClosed(event.code, event.reason || '');
    };
  }

  _onConnected(result) {
    this._clearConnectTimer();
    this._attemptConnected = true;
    this.transport = this._transportName;
    if (this.transport === 'websocket') this._websocketFailedAt = 0;
    this.clientId = result.client;
    this.user = result.user;
    if (Number.isInteger(result.max_message_size)) this.maxMessageSize = result.max_message_size;
    this._attempt = 0;
    this._refreshAttempt = 0;
    this._setState(State.Connected);
    this._startPingWatch(result.ping_interval);
    this._scheduleRefresh(result.expires_in);
    const ctx = { client: result.client, user: result.user, version: result.version, transport: this.transport };
    if (result.expires_in !== undefined) ctx.expiresIn = result.expires_in;
    this._log('connected', ctx);
    this._emit('connected', ctx);
    for (const sub of this._subs.values()) {
      if (sub.state === SubscriptionState.Subscribing) sub._sendSubscribe();
    }
  }

  _onConnectError(err) {
    const code = err.code;
    this._emitError('connect', code, err.message);
    if (code === 106) {
      // Token expired: get a new one (if we can) and try again.
      this._token = null;
      this._closeTransport(1000, 'token expired');
      if (this._options.getToken) {
        this._transportLost(connectingCodes.tokenExpired, 'token expired', true);
      } else {
        this._goDisconnected(disconnectedCodes.unauthorized, 'token expired');
      }
      return;
    }
    if (code === 105 || code === 107) {
      this._closeTransport(1000, 'refused');
      this._goDisconnected(code === 105 ? disconnectedCodes.unauthorized : disconnectedCodes.refused, err.message);
      return;
    }
    if (code === errorCodes.transportClosed) return; // the close handler decides
    this._closeTransport(1000, 'connect failed');
    this._transportLost(connectingCodes.serverError, err.message, true);
  }

  /** The WebSocket closed (by the server, the network, or us). */
  _transportClosed(code, reason) {
    const advice = this._disconnectAdvice;
    this._disconnectAdvice = null;
    let reconnect = !NO_RECONNECT.has(code);
    if (advice) {
      reconnect = advice.reconnect;
      code = advice.code;
      reason = advice.reason;
    }
    if (code === 3003) {
      // The token expired: reconnect with a new one, if we can get one
      // (never silently as an anonymous client).
      this._token = null;
      if (!this._options.getToken) {
        this._log('token expired and no getToken');
        this._transportLost(disconnectedCodes.unauthorized, 'token expired', false);
        return;
      }
    }
    this._log('transport closed', code, reason, reconnect ? 'reconnecting' : 'not reconnecting');
    this._transportLost(code, reason, reconnect);
  }

  /** Common path after the transport is gone: fail calls, then reconnect or stop. */
  _transportLost(code, reason, reconnect) {
    this._ws = null;
    this._transportId++;
    this.transport = null;
    // This transport never got as far as a connect reply: the next one
    // at once (WebSocket refused or black-holed by a proxy, say).
    let fallback = false;
    if (reconnect && !this._attemptConnected && this.state !== State.Disconnected) {
      if (this._transportName === 'websocket') this._websocketFailedAt = Date.now();
      this._transportIndex++;
      fallback = this._transportIndex < this._usableTransports().length;
      if (!fallback) this._transportIndex = 0;
    }
    this._stopConnectionTimers();
    this._failCalls(errorCodes.transportClosed, 'transport closed');
    this._outbox = [];
    for (const sub of this._subs.values()) sub._transportLost();
    if (this.state === State.Disconnected) return;
    if (!reconnect) {
      this._goDisconnected(code, reason);
      return;
    }
    if (this.state !== State.Connecting) {
      this._setState(State.Connecting);
      this._emit('connecting', { code, reason });
    }
    if (fallback) {
      this._log('falling back to', this._usableTransports()[this._transportIndex], 'after', reason);
      this._clearReconnect();
      this._reconnectTimer = setTimeout(() => {
        this._reconnectTimer = null;
        if (this.state === State.Connecting) this._startConnecting();
      }, 0);
      return;
    }
    this._scheduleReconnect();
  }

  _goDisconnected(code, reason) {
    this._transportId++;
    this.transport = null;
    this._ws = null;
    this._stopConnectionTimers();
    this._clearReconnect();
    this._failCalls(errorCodes.clientDisconnected, 'client disconnected');
    this._outbox = [];
    for (const sub of this._subs.values()) sub._transportLost();
    this._listenToWindow(false);
    if (this.state === State.Disconnected) return;
    this._setState(State.Disconnected);
    this._emit('disconnected', { code, reason });
  }

  _scheduleReconnect() {
    this._clearReconnect();
    const delay = backoff(this._attempt++, this._options.minReconnectDelay, this._options.maxReconnectDelay);
    const offline = typeof navigator !== 'undefined' && navigator.onLine === false && isBrowserWindow();
    // While the browser says it is offline, wait for its `online` event
    // (at most maxReconnectDelay: onLine is not always right).
    const wait = offline ? this._options.maxReconnectDelay : delay;
    this._log('reconnecting in', wait, 'ms', offline ? '(offline)' : '');
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (this.state === State.Connecting) this._startConnecting();
    }, wait);
  }

  _clearReconnect() {
    if (this._reconnectTimer !== null) clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
  }

  /** Reconnect now if waiting (the browser came online, the page became visible). */
  _reconnectNow() {
    if (this.state !== State.Connecting || this._reconnectTimer === null) return;
    this._clearReconnect();
    this._attempt = 0;
    this._startConnecting();
  }

  _listenToWindow(on) {
    if (!isBrowserWindow()) return;
    if (on && !this._windowListeners) {
      const online = () => this._reconnectNow();
      const offline = () => {
        // The socket may linger for minutes without traffic: drop it now,
        // and reconnect when the browser is back online.
        if (this.state === State.Disconnected || !this._ws) return;
        this._closeTransport(1000, 'offline');
        this._transportLost(connectingCodes.offline, 'browser offline', true);
      };
      const visible = () => {
        if (typeof document !== 'undefined' && document.visibilityState === 'visible') this._reconnectNow();
      };
      window.addEventListener('online', online);
      window.addEventListener('offline', offline);
      if (typeof document !== 'undefined') document.addEventListener('visibilitychange', visible);
      this._windowListeners = { online, offline, visible };
    } else if (!on && this._windowListeners) {
      const { online, offline, visible } = this._windowListeners;
      window.removeEventListener('online', online);
      window.removeEventListener('offline', offline);
      if (typeof document !== 'undefined') document.removeEventListener('visibilitychange', visible);
      this._windowListeners = null;
    }
  }

  _closeTransport(code, reason) {
    const ws = this._ws;
    this._ws = null;
    this._transportId++;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      ws.close(code, reason);
    } catch {
      try {
        ws.close();
      } catch {
        // already closed
      }
    }
  }

  _clearConnectTimer() {
    if (this._connectTimer !== null) clearTimeout(this._connectTimer);
    this._connectTimer = null;
  }

  _stopConnectionTimers() {
    this._clearConnectTimer();
    if (this._pingTimer !== null) clearTimeout(this._pingTimer);
    this._pingTimer = null;
    this._pingWindow = 0;
    if (this._refreshTimer !== null) clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this._refreshing = false;
  }

  _startPingWatch(pingInterval) {
    this._pingWindow = pingInterval > 0 ? pingInterval * 1000 + this._options.maxServerPingDelay : 0;
    this._resetPingWatch();
  }

  _resetPingWatch() {
    if (this._pingWindow <= 0) return;
    if (this._pingTimer !== null) clearTimeout(this._pingTimer);
    this._pingTimer = setTimeout(() => {
      this._pingTimer = null;
      this._log('no ping from the server');
      this._closeTransport(3000, 'no ping');
      this._transportLost(connectingCodes.noPing, 'no ping', true);
    }, this._pingWindow);
  }

  // ---------------------------------------------------------------- tokens

  _scheduleRefresh(expiresIn) {
    if (this._refreshTimer !== null) clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (expiresIn === undefined || expiresIn === null) return;
    const ttl = expiresIn * 1000;
    const margin = Math.min(this._options.refreshMargin, ttl / 2);
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      this._refresh();
    }, Math.max(0, ttl - margin));
  }

  async _refresh() {
    if (this._refreshing || this.state !== State.Connected) return;
    if (!this._options.getToken) {
      // Without a way to get a token, the server will disconnect (3003).
      this._emitError('refresh', errorCodes.refreshToken, 'the connection token expires and there is no getToken option');
      return;
    }
    this._refreshing = true;
    const tid = this._transportId;
    const retry = () => {
      this._refreshing = false;
      if (tid !== this._transportId || this.state !== State.Connected) return;
      const delay = backoff(this._refreshAttempt++, this._options.minReconnectDelay, this._options.maxReconnectDelay);
      this._refreshTimer = setTimeout(() => {
        this._refreshTimer = null;
        this._refresh();
      }, delay);
    };
    let token;
    try {
      token = await this._options.getToken({});
    } catch (e) {
      if (e instanceof UnauthorizedError) {
        this._refreshing = false;
        if (tid !== this._transportId) return;
        this._closeTransport(1000, 'unauthorized');
        this._goDisconnected(disconnectedCodes.unauthorized, 'unauthorized');
        return;
      }
      this._emitError('refreshToken', errorCodes.refreshToken, `getToken failed: ${e && e.message ? e.message : e}`);
      retry();
      return;
    }
    if (tid !== this._transportId || this.state !== State.Connected) {
      this._refreshing = false;
      return;
    }
    if (!token) {
      this._refreshing = false;
      this._closeTransport(1000, 'unauthorized');
      this._goDisconnected(disconnectedCodes.unauthorized, 'unauthorized');
      return;
    }
    this._token = token;
    try {
      const result = await this._call('refresh', { token });
      this._refreshing = false;
      if (tid !== this._transportId) return;
      this._refreshAttempt = 0;
      this._scheduleRefresh(result.expires_in);
      this._emit('refreshed', { expiresIn: result.expires_in });
    } catch (err) {
      this._emitError('refresh', err.code, err.message);
      if (err.code === 105 || err.code === 106) this._token = null;
      retry();
    }
  }

  // ----------------------------------------------------- commands, replies

  _emitError(type, code, message) {
    const error = new TidewireError(code, message);
    this._log('error', type, code, message);
    this._emit('error', { type, error });
  }

  /** Waits until connected (at most `timeout`), then sends a command. */
  async _methodCall(method, params) {
    if (this.state !== State.Connected) await this.ready(this._options.timeout);
    return this._call(method, params);
  }

  /**
   * Sends one command; `done(error, result)` is called exactly once, at
   * once when the reply is read (before the messages after it: a
   * subscribe's reply is handled before the publications that follow it).
   * @param {boolean} [immediate] send now (connect), not in the next batch
   */
  _command(method, params, done, immediate = false) {
    if (!this._ws) {
      done(new TidewireError(errorCodes.transportClosed, 'not connected'), null);
      return;
    }
    const id = this._nextId++;
    const frame = JSON.stringify({ id, [method]: params });
    const timer = setTimeout(() => {
      this._calls.delete(id);
      done(new TidewireError(errorCodes.timeout, `${method}: timeout`), null);
    }, this._options.timeout);
    this._calls.set(id, { method, done, timer });
    if (immediate) this._write(frame);
    else this._enqueue(frame);
  }

  /** {@link _command} as a promise. */
  _call(method, params, immediate = false) {
    return new Promise((resolve, reject) => {
      this._command(method, params, (err, result) => (err ? reject(err) : resolve(result)), immediate);
    });
  }

  _failCalls(code, message) {
    const calls = [...this._calls.values()];
    this._calls.clear();
    for (const call of calls) {
      clearTimeout(call.timer);
      call.done(new TidewireError(code, message), null);
    }
  }

  _enqueue(frame) {
    this._outbox.push(frame);
    if (this._flushScheduled) return;
    this._flushScheduled = true;
    queueMicrotask(() => {
      this._flushScheduled = false;
      this._flush();
    });
  }

  /** Sends queued commands as newline-separated batches (the server's max_batch and size in mind). */
  _flush() {
    const frames = this._outbox;
    this._outbox = [];
    let batch = [];
    let bytes = 0;
    const send = () => {
      if (batch.length > 0) this._write(batch.join('\n'));
      batch = [];
      bytes = 0;
    };
    for (const frame of frames) {
      // The server's limit is in bytes of UTF-8, not in characters.
      const size = utf8Length(frame);
      if (batch.length >= this._options.maxBatch || (batch.length > 0 && bytes + size > this._options.maxBatchBytes)) send();
      batch.push(frame);
      bytes += size + 1;
    }
    send();
  }

  _write(text) {
    const ws = this._ws;
    if (!ws) return;
    try {
      ws.send(text);
    } catch (e) {
      this._emitError('transport', errorCodes.transportWrite, `send failed: ${e && e.message ? e.message : e}`);
    }
  }

  _onData(data) {
    this._resetPingWatch();
    const text = textOf(data);
    for (const line of text.split('\n')) {
      if (line.trim() === '') continue;
      let message;
      try {
        message = JSON.parse(line);
      } catch {
        this._emitError('protocol', errorCodes.badConfiguration, 'the server sent a message that is not JSON');
        continue;
      }
      this._onMessage(message);
    }
  }

  _onMessage(message) {
    if (message.id) {
      const call = this._calls.get(message.id);
      if (!call) return; // timed out already
      this._calls.delete(message.id);
      clearTimeout(call.timer);
      if (message.error) {
        call.done(new TidewireError(message.error.code, message.error.message), null);
      } else {
        call.done(null, message[call.method] || {});
      }
      return;
    }
    if (message.push) {
      this._onPush(message.push);
      return;
    }
    if (message.error) {
      this._emitError('server', message.error.code, message.error.message);
    }
  }

  _onPush(push) {
    if (push.channel !== undefined) {
      const sub = this._subs.get(push.channel);
      if (push.pub) {
        if (sub) sub._onPublication(push.pub);
      } else if (push.presence_diff) {
        if (sub) sub._onPresenceDiff(push.presence_diff);
      } else if (push.unsubscribe) {
        if (sub) sub._onServerUnsubscribe(push.unsubscribe);
      }
      return;
    }
    if (push.disconnect) {
      // The close frame follows; this advice decides what happens then.
      this._disconnectAdvice = push.disconnect;
    } else if (push.refresh) {
      this._refresh();
    }
    // push.ping: nothing to do, the watchdog was reset.
  }
}

/**
 * A subscription to one channel, with its own state and events
 * (`subscribing`, `subscribed`, `unsubscribed`, `publication`, `join`,
 * `leave`, `error`, `state`). Created by {@link Client#newSubscription}.
 */
export class Subscription extends Emitter {
  constructor(client, channel, options) {
    super();
    for (const key of Object.keys(options)) {
      if (!['token', 'getToken', 'recover', 'since', 'minResubscribeDelay', 'maxResubscribeDelay'].includes(key)) {
        throw new TypeError(`tidewire: unknown subscription option ${JSON.stringify(key)}`);
      }
    }
    this.client = client;
    this.channel = channel;
    /** @type {'unsubscribed'|'subscribing'|'subscribed'} */
    this.state = SubscriptionState.Unsubscribed;
    this._token = options.token || null;
    this._getToken = options.getToken || null;
    this._recover = options.recover !== false;
    this._minDelay = options.minResubscribeDelay ?? client._options.minReconnectDelay;
    this._maxDelay = options.maxResubscribeDelay ?? client._options.maxReconnectDelay;
    /** Position in the channel's stream: the last offset seen and its epoch (null until known). */
    this._offset = null;
    this._epoch = null;
    if (options.since) {
      this._offset = options.since.offset;
      this._epoch = options.since.epoch;
    }
    this._recoverable = false;
    /** The last presence_diff carried counts only (a big channel). */
    this._unlisted = false;
    this._gen = 0;
    this._inflight = false;
    this._attempt = 0;
    this._retryTimer = null;
  }

  /** The last position seen, `{offset, epoch}`, or null (no history in this namespace, or not subscribed yet). */
  get position() {
    return this._offset === null ? null : { offset: this._offset, epoch: this._epoch };
  }

  /** Subscribes (now if connected, else when connected), and resubscribes after every reconnect. */
  subscribe() {
    if (this.state !== SubscriptionState.Unsubscribed) return;
    this._setSubscribing(subscribingCodes.subscribeCalled, 'subscribe called');
    if (this.client.state === State.Connected) this._sendSubscribe();
  }

  /** Unsubscribes (and stops resubscribing). */
  unsubscribe() {
    if (this.state === SubscriptionState.Unsubscribed) return;
    // The server handles a connection's commands in order: an unsubscribe
    // sent now also undoes a subscribe still in flight.
    const wasActive = this.state === SubscriptionState.Subscribed || this._inflight;
    this._setUnsubscribed(unsubscribedCodes.unsubscribeCalled, 'unsubscribe called');
    if (wasActive && this.client.state === State.Connected) this._sendUnsubscribe();
  }

  /**
   * Resolves when subscribed (at once if it is); rejects when it is or
   * becomes unsubscribed, or after `timeout` ms.
   * @param {number} [timeout]
   */
  ready(timeout) {
    if (this.state === SubscriptionState.Subscribed) return Promise.resolve();
    if (this.state === SubscriptionState.Unsubscribed) {
      return Promise.reject(new TidewireError(errorCodes.subscriptionUnsubscribed, 'unsubscribed'));
    }
    return new Promise((resolve, reject) => {
      let timer = null;
      const done = () => {
        this.off('subscribed', onSubscribed);
        this.off('unsubscribed', onUnsubscribed);
        if (timer !== null) clearTimeout(timer);
      };
      const onSubscribed = () => {
        done();
        resolve();
      };
      const onUnsubscribed = () => {
        done();
        reject(new TidewireError(errorCodes.subscriptionUnsubscribed, 'unsubscribed'));
      };
      this.on('subscribed', onSubscribed);
      this.on('unsubscribed', onUnsubscribed);
      if (timeout !== undefined && timeout !== null) {
        timer = setTimeout(() => {
          done();
          reject(new TidewireError(errorCodes.timeout, 'timeout'));
        }, timeout);
      }
    });
  }

  /** Publishes to this channel (waits until subscribed, at most the client's `timeout`). */
  async publish(data) {
    await this._methodReady();
    return this.client._call('publish', { channel: this.channel, data });
  }

  /** Who is here: `{clients: [{client, user, info}]}`. */
  async presence() {
    await this._methodReady();
    return this.client._call('presence', { channel: this.channel });
  }

  /** `{clients, users}`. */
  async presenceStats() {
    await this._methodReady();
    return this.client._call('presence_stats', { channel: this.channel });
  }

  /** History of this channel: `{publications, offset, epoch}` (see {@link Client#history}). */
  async history(options = {}) {
    await this._methodReady();
    return this.client.history(this.channel, options);
  }

  async _methodReady() {
    if (this.state !== SubscriptionState.Subscribed) await this.ready(this.client._options.timeout);
  }

  _setState(state) {
    if (this.state === state) return;
    const oldState = this.state;
    this.state = state;
    this._emit('state', { channel: this.channel, newState: state, oldState });
  }

  _setSubscribing(code, reason) {
    if (this.state === SubscriptionState.Subscribing) return;
    this._setState(SubscriptionState.Subscribing);
    this._emit('subscribing', { channel: this.channel, code, reason });
  }

  _setUnsubscribed(code, reason) {
    this._gen++;
    this._inflight = false;
    this._clearRetry();
    if (this.state === SubscriptionState.Unsubscribed) return;
    this._setState(SubscriptionState.Unsubscribed);
    this._emit('unsubscribed', { channel: this.channel, code, reason });
  }

  _clearRetry() {
    if (this._retryTimer !== null) clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  _scheduleRetry() {
    this._clearRetry();
    const delay = backoff(this._attempt++, this._minDelay, this._maxDelay);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this.state === SubscriptionState.Subscribing && this.client.state === State.Connected) this._sendSubscribe();
    }, delay);
  }

  /** The client lost its transport: subscribed or subscribing, wait to resubscribe. */
  _transportLost() {
    this._inflight = false;
    this._gen++;
    this._clearRetry();
    if (this.state === SubscriptionState.Subscribed) {
      this._setSubscribing(subscribingCodes.transportClosed, 'transport closed');
    }
  }

  async _sendSubscribe() {
    if (this._inflight || this.state !== SubscriptionState.Subscribing) return;
    const client = this.client;
    const gen = ++this._gen;
    const tid = client._transportId;
    this._inflight = true;
    const stale = () => gen !== this._gen || tid !== client._transportId;
    if (!this._token && this._getToken) {
      let token;
      try {
        token = await this._getToken({ channel: this.channel });
      } catch (e) {
        if (stale()) return;
        this._inflight = false;
        if (e instanceof UnauthorizedError) {
          this._fail(unsubscribedCodes.unauthorized, 'unauthorized');
          return;
        }
        this._emitError('subscribeToken', errorCodes.subscriptionToken, `getToken failed: ${e && e.message ? e.message : e}`);
        this._scheduleRetry();
        return;
      }
      if (stale()) return;
      if (!token) {
        this._inflight = false;
        this._fail(unsubscribedCodes.unauthorized, 'unauthorized');
        return;
      }
      this._token = token;
    }
    const params = { channel: this.channel };
    if (this._token) params.token = this._token;
    const recovering = this._recover && this._offset !== null;
    if (recovering) {
      params.recover = true;
      params.offset = this._offset;
      params.epoch = this._epoch || '';
    }
    // Whoever makes this attempt stale (unsubscribe, a lost transport, a
    // resubscribe) has reset _inflight and sent what undoes it.
    client._command('subscribe', params, (err, result) => {
      if (stale()) return;
      this._inflight = false;
      if (err) this._onSubscribeError(err);
      else this._onSubscribed(result, recovering);
    });
  }

  _sendUnsubscribe() {
    this.client._call('unsubscribe', { channel: this.channel }).catch(() => {
      // Not subscribed any more (111), or the transport is gone: fine.
    });
  }

  _onSubscribeError(err) {
    const code = err.code;
    this._emitError('subscribe', code, err.message);
    if (code === 106) {
      this._token = null;
      if (this._getToken) this._scheduleRetry();
      else this._fail(unsubscribedCodes.unauthorized, 'subscription token expired');
    } else if (code === 105) {
      this._fail(unsubscribedCodes.unauthorized, err.message);
    } else if (code === 107 || code === 108 || code === 109 || code === 112 || code === 113) {
      this._fail(unsubscribedCodes.refused, err.message);
    } else if (code === 110) {
      // The server still has us (an earlier subscribe timed out here): start over.
      this._sendUnsubscribe();
      this._scheduleRetry();
    } else if (code === errorCodes.transportClosed) {
      // The client resubscribes after the reconnect.
    } else {
      this._scheduleRetry();
    }
  }

  _fail(code, reason) {
    this._setUnsubscribed(code, reason);
  }

  _onSubscribed(result, wasRecovering) {
    this._attempt = 0;
    const positioned = result.epoch !== undefined;
    this._recoverable = result.recoverable === true;
    const previous = this._offset;
    const recovered = wasRecovering && result.recovered === true;
    const publications = recovered ? result.publications || [] : [];
    if (positioned) {
      // The stream's epoch, also before its first publication: the
      // publications that follow (pushes carry no epoch) belong to it. An
      // epoch "" (a server older than that rule) is kept as it is: such a
      // position gets `recovered: false`, never a wrong `true`.
      this._epoch = result.epoch;
      // Recovered publications advance the offset one by one below.
      this._offset = recovered ? previous : result.offset;
    } else {
      this._offset = null;
      this._epoch = null;
    }
    this._setState(SubscriptionState.Subscribed);
    const ctx = {
      channel: this.channel,
      recoverable: this._recoverable,
      positioned,
      wasRecovering,
      recovered,
    };
    if (positioned) ctx.streamPosition = { offset: result.offset, epoch: result.epoch };
    this._emit('subscribed', ctx);
    this.client._emit('subscribed', ctx);
    for (const pub of publications) {
      if (this.state !== SubscriptionState.Subscribed) return;
      this._onPublication(pub);
    }
    if (positioned && this.state === SubscriptionState.Subscribed) {
      this._offset = Math.max(this._offset ?? 0, result.offset);
    }
  }

  _onPublication(pub) {
    if (this.state !== SubscriptionState.Subscribed) return;
    if (typeof pub.offset === 'number' && pub.offset > 0 && this._offset !== null) {
      if (pub.offset <= this._offset) return; // seen already
      if (pub.offset > this._offset + 1) {
        // A gap (the server's slow-consumer policy dropped some): recover.
        this._resubscribe(subscribingCodes.gap, 'gap in offsets');
        return;
      }
      this._offset = pub.offset;
    }
    const ctx = publicationContext(this.channel, pub);
    this._emit('publication', ctx);
    this.client._emit('publication', ctx);
  }

  /**
   * The server's gathered joins and leaves: a `join`/`leave` event per
   * listed client, then one `presence_diff` event. In a big channel the
   * server sends counts only (`listed: false`); when listed diffs come
   * back after that, the list kept from events is out of date
   * (`relist: true`): fetch `presence()` again.
   */
  _onPresenceDiff(diff) {
    if (this.state !== SubscriptionState.Subscribed) return;
    const listed = Array.isArray(diff.joins) && Array.isArray(diff.leaves);
    const relist = listed && this._unlisted === true;
    this._unlisted = !listed;
    if (listed) {
      for (const info of diff.joins) {
        const ctx = { channel: this.channel, info };
        this._emit('join', ctx);
        this.client._emit('join', ctx);
      }
      for (const info of diff.leaves) {
        const ctx = { channel: this.channel, info };
        this._emit('leave', ctx);
        this.client._emit('leave', ctx);
      }
    }
    const ctx = {
      channel: this.channel,
      joined: Number(diff.joined) || 0,
      left: Number(diff.left) || 0,
      listed,
      relist,
      joins: listed ? diff.joins : [],
      leaves: listed ? diff.leaves : [],
    };
    this._emit('presence_diff', ctx);
    this.client._emit('presence_diff', ctx);
  }

  _onServerUnsubscribe({ code, reason }) {
    if (code === 2002) {
      // Publications were lost between the server's nodes: subscribe
      // again, recovering from the last position seen (the server says
      // whether it could).
      this._gen++;
      this._inflight = false;
      this._setSubscribing(subscribingCodes.gap, reason);
      if (this.client.state === State.Connected) this._sendSubscribe();
      return;
    }
    if (code === 2001) {
      // The subscription token expired: subscribe again with a new one.
      this._token = null;
      this._gen++;
      this._inflight = false;
      this._setSubscribing(subscribingCodes.tokenExpired, reason);
      if (this.client.state === State.Connected) this._sendSubscribe();
      return;
    }
    this._setUnsubscribed(code, reason);
  }

  /** Unsubscribe, then subscribe again with recovery. */
  _resubscribe(code, reason) {
    this._gen++;
    this._inflight = false;
    this._setSubscribing(code, reason);
    this._sendUnsubscribe();
    this._sendSubscribe();
  }

  _emitError(type, code, message) {
    const error = new TidewireError(code, message);
    this._emit('error', { channel: this.channel, type, error });
    this.client._emit('error', { channel: this.channel, type, error });
  }
}
