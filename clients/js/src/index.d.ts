// Types of tidewire-client (hand-written; checked by `npm run typecheck`).

/** The subprotocol of version 1 of the tidewire protocol: `"tidewire.v1.json"`. */
export declare const SUBPROTOCOL: 'tidewire.v1.json';

export type ClientState = 'disconnected' | 'connecting' | 'connected';
export type SubscriptionStateName = 'unsubscribed' | 'subscribing' | 'subscribed';

export declare const State: {
  readonly Disconnected: 'disconnected';
  readonly Connecting: 'connecting';
  readonly Connected: 'connected';
};

export declare const SubscriptionState: {
  readonly Unsubscribed: 'unsubscribed';
  readonly Subscribing: 'subscribing';
  readonly Subscribed: 'subscribed';
};

/** Codes of errors raised by the client itself (server errors keep the protocol's codes, 100 and up). */
export declare const errorCodes: {
  readonly timeout: 1;
  readonly transportClosed: 2;
  readonly clientDisconnected: 3;
  readonly subscriptionUnsubscribed: 4;
  readonly connectToken: 5;
  readonly refreshToken: 6;
  readonly subscriptionToken: 7;
  readonly badConfiguration: 8;
  readonly transportWrite: 9;
};

/** Codes of the `connecting` event, besides the server's close and disconnect codes (1000 and up). */
export declare const connectingCodes: {
  readonly connectCalled: 0;
  readonly transportClosed: 1;
  readonly noPing: 2;
  readonly connectTimeout: 3;
  readonly offline: 4;
  readonly tokenExpired: 5;
  readonly serverError: 6;
};

/** Codes of the `disconnected` event, besides the server's close and disconnect codes (1000 and up). */
export declare const disconnectedCodes: {
  readonly disconnectCalled: 0;
  readonly unauthorized: 1;
  readonly badProtocol: 2;
  readonly refused: 3;
};

/** Codes of a subscription's `subscribing` event. */
export declare const subscribingCodes: {
  readonly subscribeCalled: 0;
  readonly transportClosed: 1;
  readonly gap: 2;
  readonly tokenExpired: 3;
  readonly retry: 4;
};

/** Codes of a subscription's `unsubscribed` event, besides the server's 2000. */
export declare const unsubscribedCodes: {
  readonly unsubscribeCalled: 0;
  readonly unauthorized: 1;
  readonly refused: 2;
};

/** An error of a command (`code` from the protocol, 100 and up) or of the client (`errorCodes`). */
export declare class TidewireError extends Error {
  constructor(code: number, message: string);
  readonly name: 'TidewireError';
  code: number;
}

/** Throw (or reject with) this from a `getToken` callback: the user may not connect or subscribe; the client stops. */
export declare class UnauthorizedError extends Error {
  constructor(message?: string);
}

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A position in a channel's stream. */
export interface StreamPosition {
  offset: number;
  /**
   * Names the channel's stream; offsets compare only within one epoch. The subscribe reply names
   * it also before the channel's first publication (offset 0). A position with epoch `""` never
   * recovers.
   */
  epoch: string;
}

/** Who a client is: in presence, join/leave, and publications from clients. */
export interface ClientInfo {
  client: string;
  /** `""` for anonymous clients. */
  user: string;
  /** The `info` claim of the client's connection token, if any. */
  info?: Json;
}

/** The minimal WebSocket the client needs (the browser's, Node 22's global, or the `ws` package's). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: any }) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** How the client reaches the server: WebSocket, or the HTTP fallbacks where it cannot pass. */
export type TransportName = 'websocket' | 'http_stream' | 'sse' | 'long_poll';

/** The transports the client knows, in its default order. */
export const TRANSPORTS: readonly TransportName[];

export interface ClientOptions {
  /** A connection token (JWT). */
  token?: string | null;
  /**
   * Called for a (new) connection token: at the first connect without `token`, after the token
   * expired, and before it expires (refresh). Resolve to `""`/`null` or throw `UnauthorizedError`
   * to stop; any other error is retried with backoff.
   */
  getToken?: ((ctx: {}) => Promise<string | null> | string | null) | null;
  /** Sent with `connect` (handed to the connect proxy of the server). */
  data?: Json;
  /** The WebSocket class. Default: `globalThis.WebSocket` (browsers, Node >= 22); on Node 20 pass `ws`'s. */
  WebSocket?: WebSocketConstructor | null;
  /**
   * The transports to try, in order (`TRANSPORTS`: websocket, http_stream, sse, long_poll). One that fails
   * before the server's connect reply (refused, or silent for `timeout`) gives way to the next
   * at once; after WebSocket failed, the client tries it again first 5 minutes later.
   */
  transports?: TransportName[];
  /** `fetch` for the HTTP fallbacks. Default: `globalThis.fetch`. */
  fetch?: ((input: string, init?: any) => Promise<any>) | null;
  /** The EventSource class for `sse`. Default: `globalThis.EventSource` (browsers). */
  EventSource?: (new (url: string, init?: { withCredentials?: boolean }) => any) | null;
  /**
   * Send the page's cookies with the HTTP fallbacks when the server is of another origin
   * (`fetch` `credentials: 'include'`, `EventSource` `withCredentials`); the server must list the
   * page's origin in `server.allowed_origins`. Same-origin requests always carry them, and so does
   * a WebSocket. Default false.
   */
  withCredentials?: boolean;
  /** First reconnect delay in ms (500); doubles up to `maxReconnectDelay` (20000), with jitter. */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** Timeout of connect and of every command, in ms (10000). */
  timeout?: number;
  /** How long past the server's ping interval the client waits before it reconnects, in ms (10000). */
  maxServerPingDelay?: number;
  /** Refresh the connection token this long before it expires, in ms (10000; halfway for short tokens). */
  refreshMargin?: number;
  /** Most commands in one WebSocket message (100, the server's default `client.max_batch`). */
  maxBatch?: number;
  /** Most bytes of batched commands in one message (32768). */
  maxBatchBytes?: number;
  /** Log to console.debug. */
  debug?: boolean;
}

export interface SubscriptionOptions {
  /** A subscription token (JWT) for channels that need one. */
  token?: string | null;
  /** Called for a (new) subscription token; see `ClientOptions.getToken`. */
  getToken?: ((ctx: { channel: string }) => Promise<string | null> | string | null) | null;
  /** Recover missed publications after a reconnect (true). */
  recover?: boolean;
  /** Start from this position (recover what came after it at the first subscribe). */
  since?: StreamPosition;
  /** Delays of resubscribe attempts after errors, in ms (default: the client's reconnect delays). */
  minResubscribeDelay?: number;
  maxResubscribeDelay?: number;
}

export interface ConnectingContext {
  /** One of `connectingCodes`, or the server's close or disconnect code. */
  code: number;
  reason: string;
}

export interface ConnectedContext {
  client: string;
  user: string;
  version: number;
  /** The transport of this connection. */
  transport: TransportName;
  /** Seconds until the connection token expires (absent when it does not). */
  expiresIn?: number;
}

export interface DisconnectedContext {
  /** One of `disconnectedCodes`, or the server's close or disconnect code. */
  code: number;
  reason: string;
}

export interface ErrorContext {
  /** What failed: `connect`, `connectToken`, `refresh`, `refreshToken`, `subscribe`, `subscribeToken`, `transport`, `server`, `protocol`, `configuration`. */
  type: string;
  error: TidewireError;
  /** The channel, for errors of a subscription. */
  channel?: string;
}

export interface StateContext<S> {
  newState: S;
  oldState: S;
  channel?: string;
}

export interface PublicationContext {
  channel: string;
  data: Json;
  /** The publication's offset (absent in namespaces without history). */
  offset?: number;
  /** Who published (absent for publications from the HTTP API). */
  info?: ClientInfo;
}

export interface JoinLeaveContext {
  channel: string;
  info: ClientInfo;
}

/**
 * The joins and leaves the server gathered (one push per channel and
 * interval). In a channel above the server's `join_leave_max_members`,
 * only the counts are known (`listed` false, `joins`/`leaves` empty).
 */
export interface PresenceDiffContext {
  channel: string;
  /** How many joined and left (`joined - left`: the change in members). */
  joined: number;
  left: number;
  /** Whether `joins` and `leaves` say who. */
  listed: boolean;
  /**
   * Listed again after counts-only diffs: a member list kept from
   * `join`/`leave` events is out of date; fetch `presence()` again.
   */
  relist: boolean;
  joins: ClientInfo[];
  leaves: ClientInfo[];
}

export interface SubscribingContext {
  channel: string;
  /** One of `subscribingCodes`. */
  code: number;
  reason: string;
}

export interface SubscribedContext {
  channel: string;
  /** The namespace keeps history and allows recovery. */
  recoverable: boolean;
  /** The channel has a stream position (history is on). */
  positioned: boolean;
  /** This subscribe asked to recover from a known position (a resubscribe, or `since`). */
  wasRecovering: boolean;
  /**
   * Everything missed was recovered: the `publication` events that follow hold it, in order,
   * without duplicates. `false` after `wasRecovering`: the server could not (it restarted, the
   * stream expired, or history was too short): reload the state some other way.
   */
  recovered: boolean;
  streamPosition?: StreamPosition;
}

export interface UnsubscribedContext {
  channel: string;
  /** One of `unsubscribedCodes`, or the server's (2000: unsubscribed by the server). */
  code: number;
  reason: string;
}

export interface PublishResult {
  offset?: number;
  epoch?: string;
}

export interface PresenceResult {
  clients: ClientInfo[];
}

export interface PresenceStatsResult {
  clients: number;
  users: number;
}

export interface HistoryOptions {
  /** Most publications (0: only the position). */
  limit?: number;
  /** Forward: publications after this position; with `reverse`: those before it. */
  since?: StreamPosition;
  /** Newest first. */
  reverse?: boolean;
}

export interface HistoryResult {
  publications: PublicationContext[];
  offset: number;
  epoch: string;
}

export interface ClientEvents {
  state: StateContext<ClientState>;
  connecting: ConnectingContext;
  connected: ConnectedContext;
  disconnected: DisconnectedContext;
  error: ErrorContext;
  refreshed: { expiresIn?: number };
  /** Every subscription's events, on the client too. */
  subscribed: SubscribedContext;
  publication: PublicationContext;
  join: JoinLeaveContext;
  leave: JoinLeaveContext;
  presence_diff: PresenceDiffContext;
}

export interface SubscriptionEvents {
  state: StateContext<SubscriptionStateName>;
  subscribing: SubscribingContext;
  subscribed: SubscribedContext;
  unsubscribed: UnsubscribedContext;
  error: ErrorContext;
  publication: PublicationContext;
  join: JoinLeaveContext;
  leave: JoinLeaveContext;
  presence_diff: PresenceDiffContext;
}

declare class Emitter<E> {
  on<K extends keyof E>(event: K, listener: (ctx: E[K]) => void): this;
  once<K extends keyof E>(event: K, listener: (ctx: E[K]) => void): this;
  off<K extends keyof E>(event?: K, listener?: (ctx: E[K]) => void): this;
  removeAllListeners<K extends keyof E>(event?: K): this;
}

/** A connection to `tidewire serve` that reconnects, resubscribes and recovers by itself. */
export declare class Client extends Emitter<ClientEvents> {
  /** @param url e.g. `ws://127.0.0.1:8080/connection/websocket` */
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly state: ClientState;
  /** This connection's client id, or null. */
  readonly clientId: string | null;
  /** The user id ("" for anonymous), or null before the first connect. */
  readonly user: string | null;
  /** The largest message the server reads, in bytes (from the connect reply), or null before. */
  readonly maxMessageSize: number | null;
  /** The transport in use while connected, else null. */
  readonly transport: TransportName | null;
  connect(): void;
  disconnect(): void;
  /** Resolves when connected; rejects when disconnected or after `timeout` ms. */
  ready(timeout?: number): Promise<void>;
  newSubscription(channel: string, options?: SubscriptionOptions): Subscription;
  getSubscription(channel: string): Subscription | null;
  subscriptions(): Record<string, Subscription>;
  removeSubscription(sub: Subscription | null | undefined): void;
  publish(channel: string, data: Json): Promise<PublishResult>;
  presence(channel: string): Promise<PresenceResult>;
  presenceStats(channel: string): Promise<PresenceStatsResult>;
  history(channel: string, options?: HistoryOptions): Promise<HistoryResult>;
  /** Replaces the connection token (used at the next connect or refresh). */
  setToken(token: string | null): void;
}

/** A subscription to one channel, with its own state and events. */
export declare class Subscription extends Emitter<SubscriptionEvents> {
  private constructor();
  readonly client: Client;
  readonly channel: string;
  readonly state: SubscriptionStateName;
  /** The last position seen, or null (no history, or not subscribed yet). */
  readonly position: StreamPosition | null;
  subscribe(): void;
  unsubscribe(): void;
  /** Resolves when subscribed; rejects when unsubscribed or after `timeout` ms. */
  ready(timeout?: number): Promise<void>;
  publish(data: Json): Promise<PublishResult>;
  presence(): Promise<PresenceResult>;
  presenceStats(): Promise<PresenceStatsResult>;
  history(options?: HistoryOptions): Promise<HistoryResult>;
}
