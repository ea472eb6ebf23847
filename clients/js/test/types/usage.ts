// Compiled (not run) by `npm run typecheck`: the declarations in
// src/index.d.ts describe the API the README shows.
import {
  Client,
  Subscription,
  TidewireError,
  UnauthorizedError,
  errorCodes,
  connectingCodes,
  disconnectedCodes,
  SubscriptionState,
  State,
  type PublicationContext,
  type StreamPosition,
} from 'tidewire-client';

async function tour(): Promise<void> {
  const client = new Client('ws://127.0.0.1:8080/connection/websocket', {
    getToken: async () => {
      const res = await fetch('/token');
      if (res.status === 403) throw new UnauthorizedError();
      return res.text();
    },
    minReconnectDelay: 250,
    maxReconnectDelay: 10000,
    data: { app: 'demo' },
  });
  client.on('connecting', (ctx) => console.log(ctx.code === connectingCodes.transportClosed, ctx.reason));
  client.on('connected', (ctx) => console.log(ctx.client, ctx.user, ctx.expiresIn ?? 0));
  client.on('disconnected', (ctx) => console.log(ctx.code === disconnectedCodes.disconnectCalled));
  client.on('error', (ctx) => console.log(ctx.type, ctx.error.code === errorCodes.timeout, ctx.channel));
  client.on('state', (ctx) => console.log(ctx.oldState, '->', ctx.newState === State.Connected));
  client.on('publication', (ctx: PublicationContext) => console.log(ctx.channel, ctx.data, ctx.offset));

  const sub: Subscription = client.newSubscription('chat:lobby', { since: { offset: 3, epoch: 'abc' } });
  sub.on('subscribed', (ctx) => {
    if (ctx.wasRecovering && !ctx.recovered) console.log('reload');
    const p: StreamPosition | undefined = ctx.streamPosition;
    console.log(p?.offset);
  });
  sub.on('publication', (ctx) => console.log(ctx.info?.user, ctx.data));
  sub.on('join', (ctx) => console.log(ctx.info.client));
  sub.on('leave', (ctx) => console.log(ctx.info.user));
  const limit: number | null = client.maxMessageSize;
  console.log(limit);
  sub.on('presence_diff', (ctx) => {
    const change: number = ctx.joined - ctx.left;
    if (ctx.relist) void sub.presence();
    console.log(change, ctx.listed, ctx.joins.map((j) => j.client), ctx.leaves.length);
  });
  sub.on('unsubscribed', (ctx) => console.log(ctx.code));
  sub.subscribe();
  client.connect();
  await client.ready(5000);
  await sub.ready();
  const r = await sub.publish({ text: 'hi', n: 1, tags: ['a'], nested: { ok: true } });
  console.log(r.offset, r.epoch);
  const presence = await sub.presence();
  presence.clients.forEach((c) => console.log(c.client, c.user, c.info));
  const stats = await client.presenceStats('chat:lobby');
  console.log(stats.clients + stats.users);
  const h = await sub.history({ limit: 10, reverse: true });
  h.publications.forEach((p) => console.log(p.offset, p.data));
  await client.history('chat:lobby', { since: { offset: h.offset, epoch: h.epoch } });
  console.log(sub.state === SubscriptionState.Subscribed, sub.position?.epoch);
  try {
    await client.publish('bad channel', 1);
  } catch (e) {
    if (e instanceof TidewireError) console.log(e.code, e.message);
  }
  client.getSubscription('chat:lobby')?.unsubscribe();
  client.removeSubscription(sub);
  client.disconnect();
}

void tour;
