// The demo chat of `tidewire serve`: rooms (channels chat:ROOM),
// nicknames, a presence list, history on join, and the connection state.
//
// Nicknames travel in the messages: every message is {type, nick, ...}.
// A client says {type: "hello"} when it enters a room, so the others can
// put a name on its presence entry (anonymous clients have no user info).
import { Client } from '../client/tidewire.js';

const ROOMS = ['lobby', 'random', 'help'];
const HISTORY = 50;
/**
 * Above this many members "Here now" shows how many, not who (the
 * server's default `join_leave_max_members`: past it, its presence diffs
 * carry counts only). Nor does a newcomer say hello to a room that big:
 * that alone would be one message to each member per newcomer.
 */
const LIST_MAX = 100;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const wsUrl = params.get('server') || new URL('connection/websocket', location.href).href.replace(/^http/, 'ws');

// ---------------------------------------------------------------- nickname
const nickInput = $('nick');
let nick = params.get('nick') || localStorage.getItem('tidewire-demo-nick') || `guest-${Math.random().toString(36).slice(2, 6)}`;
nickInput.value = nick;
nickInput.addEventListener('change', () => {
  const value = nickInput.value.trim().slice(0, 24);
  if (!value || value === nick) {
    nickInput.value = nick;
    return;
  }
  nick = value;
  localStorage.setItem('tidewire-demo-nick', nick);
  if (sub && sub.state === 'subscribed') sub.publish({ type: 'hello', nick, quiet: true }).catch(() => {});
});

// ------------------------------------------------------ connection state
const client = new Client(wsUrl, { debug: params.has('debug') });
let everConnected = false;
const stateBadge = $('state');
function showState(state, text) {
  stateBadge.dataset.state = state;
  stateBadge.textContent = text;
}
const notice = $('notice');
function say(text, kind = 'info') {
  notice.hidden = false;
  notice.dataset.kind = kind;
  notice.textContent = text;
}
client.on('connecting', ({ code, reason }) => {
  if (everConnected) {
    showState('connecting', 'reconnecting…');
    say(`Connection lost (${reason || code}): reconnecting…`, 'warn');
  } else {
    showState('connecting', 'connecting…');
  }
});
client.on('connected', () => {
  showState('connected', 'connected');
  everConnected = true;
});
client.on('disconnected', ({ code, reason }) => {
  showState('disconnected', 'disconnected');
  say(`Disconnected by the server (${reason || code}). Reload the page to come back.`, 'error');
});

// ------------------------------------------------------------------ rooms
const roomList = $('room-list');
const rooms = new Set(ROOMS);
function roomFromHash() {
  const name = decodeURIComponent(location.hash.slice(1));
  return /^[A-Za-z0-9_-]{1,40}$/.test(name) ? name : 'lobby';
}
function renderRooms() {
  roomList.replaceChildren(
    ...[...rooms].map((name) => {
      const li = document.createElement('li');
      const a = document.createElement('a');
      a.href = `#${name}`;
      a.textContent = `# ${name}`;
      if (name === room) a.setAttribute('aria-current', 'true');
      li.append(a);
      return li;
    }),
  );
}
$('room-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = $('room-input');
  if (input.checkValidity() && input.value) location.hash = input.value;
  input.value = '';
});
addEventListener('hashchange', () => enter(roomFromHash()));

// -------------------------------------------------------------- messages
const list = $('messages');
/** Offsets shown, so that history and live messages never show twice. */
let shown = new Set();
/** client id → nickname, learned from messages. */
const nicks = new Map();

function time(ts) {
  const d = ts ? new Date(ts) : new Date();
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function line(className, parts, offset) {
  const li = document.createElement('li');
  li.className = className;
  if (offset !== undefined) li.dataset.offset = offset;
  li.append(...parts);
  // In offset order (history may arrive after the first live messages).
  if (offset !== undefined) {
    let before = null;
    for (let node = list.lastElementChild; node; node = node.previousElementSibling) {
      if (node.dataset.offset === undefined) continue;
      if (Number(node.dataset.offset) < offset) break;
      before = node;
    }
    list.insertBefore(li, before);
  } else {
    list.append(li);
  }
  list.scrollTop = list.scrollHeight;
  return li;
}

function span(className, text) {
  const s = document.createElement('span');
  s.className = className;
  s.textContent = text;
  return s;
}

function system(text) {
  line('sys', [span('text', text)]);
}

/** Shows a publication of the room (live, recovered or from history). */
function show(pub) {
  if (pub.offset !== undefined) {
    if (shown.has(pub.offset)) return;
    shown.add(pub.offset);
  }
  const data = pub.data && typeof pub.data === 'object' ? pub.data : { type: 'msg', text: String(pub.data) };
  const who = typeof data.nick === 'string' ? data.nick.slice(0, 24) : 'server';
  if (pub.info && typeof data.nick === 'string') {
    nicks.set(pub.info.client, who);
    renderPresence();
  }
  if (data.type === 'hello') {
    if (!data.quiet) line('sys', [span('text', `${who} joined`)], pub.offset);
    return;
  }
  const mine = pub.info && pub.info.client === client.clientId;
  const time_ = document.createElement('time');
  time_.textContent = time(data.ts);
  line(mine ? 'msg mine' : 'msg', [span('nick', who), span('text', String(data.text ?? '')), time_], pub.offset);
}

// -------------------------------------------------------------- presence
const presenceList = $('presence');
/** client id → true, of the clients in the room. */
let present = new Map();
/** The room is too big to list: `bigCount` members, about (see LIST_MAX). */
let bigRoom = false;
let bigCount = 0;
function renderPresence() {
  if (bigRoom) {
    const li = document.createElement('li');
    li.className = 'many';
    li.textContent = `${bigCount} people: too many to list`;
    presenceList.replaceChildren(li);
    $('count').textContent = String(bigCount);
    return;
  }
  const items = [...present.keys()].map((id) => {
    const li = document.createElement('li');
    li.dataset.client = id;
    li.textContent = id === client.clientId ? nick : nicks.get(id) || 'guest';
    if (id === client.clientId) li.classList.add('me');
    return li;
  });
  items.sort((a, b) => a.textContent.localeCompare(b.textContent));
  presenceList.replaceChildren(...items);
  $('count').textContent = String(present.size);
}

// --------------------------------------------------------------- the room
let room = null;
let sub = null;

async function loadHistory(s) {
  try {
    const h = await s.history({ limit: HISTORY, reverse: true });
    if (s !== sub) return;
    for (const pub of h.publications.reverse()) show(pub);
  } catch (e) {
    system(`Could not load the history: ${e.message}`);
  }
}

async function loadPresence(s) {
  try {
    // Counts first: a big room's list is not worth fetching.
    const stats = await s.presenceStats();
    if (s !== sub) return;
    const wasBig = bigRoom;
    bigRoom = stats.clients > LIST_MAX;
    // Small again: the others can put a name on this page's entry now.
    if (wasBig && !bigRoom) s.publish({ type: 'hello', nick, quiet: true }).catch(() => {});
    bigCount = stats.clients;
    if (!bigRoom) {
      const p = await s.presence();
      if (s !== sub) return;
      present = new Map(p.clients.map((c) => [c.client, true]));
    }
    renderPresence();
  } catch {
    // the next join/leave corrects it
  }
}

/** In a big room, the count from the diffs drifts: re-read it soon. */
let countTimer = null;
function refreshCountSoon(s) {
  if (countTimer) return;
  countTimer = setTimeout(() => {
    countTimer = null;
    if (s === sub) loadPresence(s);
  }, 2000);
}

function enter(name) {
  if (name === room) return;
  if (sub) client.removeSubscription(sub);
  room = name;
  rooms.add(name);
  renderRooms();
  $('room-title').textContent = `# ${name}`;
  document.title = `#${name} · tidewire demo chat`;
  list.replaceChildren();
  shown = new Set();
  present = new Map();
  bigRoom = false;
  renderPresence();

  const s = client.newSubscription(`chat:${name}`);
  sub = s;
  let recovering = null;
  // While away, the presence list is what it was: shown faded.
  s.on('subscribing', () => {
    if (s === sub) presenceList.classList.add('stale');
  });
  s.on('subscribed', (ctx) => {
    if (s !== sub) return;
    presenceList.classList.remove('stale');
    loadPresence(s).then(() => {
      if (s === sub && !bigRoom) s.publish({ type: 'hello', nick, quiet: ctx.wasRecovering }).catch(() => {});
    });
    if (!ctx.wasRecovering) {
      loadHistory(s);
      return;
    }
    if (ctx.recovered) {
      // The missed publications follow this event at once.
      recovering = { count: 0 };
      queueMicrotask(() => {
        const n = recovering.count;
        recovering = null;
        say(n === 0 ? 'Reconnected: nothing was missed.' : `Reconnected: ${n} missed message${n === 1 ? '' : 's'} recovered.`, 'ok');
      });
    } else {
      list.replaceChildren();
      shown = new Set();
      system('The server restarted (or too much was missed): earlier messages are gone from its history.');
      say('Reconnected after a server restart: missed messages could not be recovered; history reloaded.', 'warn');
      loadHistory(s);
    }
  });
  s.on('publication', (pub) => {
    if (s !== sub) return;
    if (recovering && !(pub.data && pub.data.type === 'hello')) recovering.count++;
    show(pub);
  });
  s.on('join', ({ info }) => {
    if (s !== sub) return;
    present.set(info.client, true);
    renderPresence();
  });
  s.on('leave', ({ info }) => {
    if (s !== sub) return;
    present.delete(info.client);
    renderPresence();
    const who = nicks.get(info.client);
    // A reconnecting client leaves and joins again: say "left" only if
    // nobody of that name is back a moment later.
    if (who) {
      setTimeout(() => {
        if (s !== sub) return;
        const back = [...present.keys()].some((id) => nicks.get(id) === who);
        if (!back) system(`${who} left`);
      }, 3000);
    }
  });
  s.on('presence_diff', (diff) => {
    if (s !== sub) return;
    if (!diff.listed) {
      // Counts only: the room outgrew its list.
      if (!bigRoom) bigCount = present.size;
      bigRoom = true;
      bigCount = Math.max(1, bigCount + diff.joined - diff.left);
      renderPresence();
      refreshCountSoon(s);
    } else if (diff.relist || bigRoom) {
      // Listed again: the joins and leaves in between were not named.
      loadPresence(s);
    }
  });
  s.subscribe();
}

// ---------------------------------------------------------------- sending
$('send-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const input = $('text');
  const text = input.value.trim();
  if (!text || !sub) return;
  input.value = '';
  try {
    await sub.publish({ type: 'msg', nick, text, ts: Date.now() });
  } catch (err) {
    system(`Not sent (${err.message}): "${text}"`);
  }
});

enter(roomFromHash());
client.connect();

// For the curious (and the end-to-end tests).
window.demo = {
  client,
  get sub() {
    return sub;
  },
};
