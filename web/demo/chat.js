// The demo chat of `tidewire serve`: rooms (channels chat:ROOM),
// nicknames, a presence list, history on join, and the connection state.
//
// Nicknames travel in the messages: every message is {type, nick, ...}.
// A client says {type: "hello", nick, tab} when it enters a room, so the
// others can put a name on its presence entry (anonymous clients have no
// user info). A newcomer who finds entries it cannot name (their hello is
// out of the history it read) asks {type: "who", clients: [ids]}, and those
// clients say hello again, quietly. `tab` names the browser tab across its
// reconnects and reloads, which is how a leave tells from a reconnect.
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
/**
 * The largest WebSocket message the server reads, until its connect reply
 * says (`max_message_size`, the server's `client.max_message_size`;
 * this is its default). A bigger publish would close the connection
 * (1009), so the page refuses it before sending.
 */
const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024;
const maxMessageBytes = () => client.maxMessageSize || DEFAULT_MAX_MESSAGE_BYTES;
/** The widest command id the client may put on a publish (it counts up). */
const WIDEST_COMMAND_ID = Number.MAX_SAFE_INTEGER;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const wsUrl = params.get('server') || new URL('connection/websocket', location.href).href.replace(/^http/, 'ws');

// ---------------------------------------------------------------- nickname
/** This browser tab: kept across reloads and reconnects (sessionStorage is per tab). */
const TAB = (() => {
  let tab = sessionStorage.getItem('tidewire-demo-tab');
  if (!tab) {
    tab = Math.random().toString(36).slice(2, 10);
    sessionStorage.setItem('tidewire-demo-tab', tab);
  }
  return tab;
})();
/** The message that puts this tab's name on its presence entry. */
const hello = (quiet) => ({ type: 'hello', nick, tab: TAB, quiet });
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
  if (sub && sub.state === 'subscribed') sub.publish(hello(true)).catch(() => {});
});

// ------------------------------------------------------ connection state
// ?transports=sse,http_stream tries only those (to see the fallbacks at work).
const transports = params.get('transports')?.split(',').filter(Boolean);
const client = new Client(wsUrl, { debug: params.has('debug'), ...(transports?.length ? { transports } : {}) });
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
const TRANSPORT_NAMES = { websocket: 'WebSocket', http_stream: 'HTTP streaming', sse: 'SSE', long_poll: 'long-polling' };
client.on('connected', ({ transport }) => {
  // Which transport got through: WebSocket, or a fallback where a proxy refuses it.
  showState('connected', `connected · ${TRANSPORT_NAMES[transport] || transport}`);
  stateBadge.dataset.transport = transport;
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
/** The stream (epoch) those offsets belong to: a restarted server starts a new one. */
let shownEpoch;

/**
 * The server lost the room's stream (it restarted): the lines on screen
 * stay, marked as earlier ones, below them a divider; their offsets are of
 * the old stream, so they leave the offset order and the dedup set.
 */
function markEarlierStream() {
  for (const li of list.children) {
    if (li.classList.contains('earlier') || li.classList.contains('divider')) continue;
    li.classList.add('earlier');
    if (li.dataset.offset !== undefined) {
      li.dataset.earlierOffset = li.dataset.offset;
      delete li.dataset.offset;
    }
  }
  if (list.children.length > 0) {
    const divider = document.createElement('li');
    divider.className = 'divider';
    divider.setAttribute('role', 'separator');
    divider.append(span('text', 'server restarted — earlier messages above'));
    list.append(divider);
  }
  shown = new Set();
}
/** client id → nickname, learned from messages. */
const nicks = new Map();
/** client id → browser tab, learned from hello messages. */
const tabs = new Map();

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
  if (data.type === 'who') return; // asks for names: no line
  if (data.type === 'hello') {
    if (pub.info && typeof data.tab === 'string') tabs.set(pub.info.client, data.tab);
    if (!data.quiet) line('sys', [span('text', `${who} joined`)], pub.offset);
    return;
  }
  const mine = pub.info && pub.info.client === client.clientId;
  const time_ = document.createElement('time');
  time_.textContent = time(data.ts);
  const whoSpan = span('nick', who);
  whoSpan.title = who;
  line(mine ? 'msg mine' : 'msg', [whoSpan, span('text', String(data.text ?? '')), time_], pub.offset);
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
    const name = id === client.clientId ? nick : nicks.get(id) || 'guest';
    li.title = name;
    li.append(span('name', name));
    if (id === client.clientId) {
      li.classList.add('me');
      li.append(span('you', ' (you)'));
    }
    return li;
  });
  items.sort((a, b) => a.querySelector('.name').textContent.localeCompare(b.querySelector('.name').textContent));
  presenceList.replaceChildren(...items);
  $('count').textContent = String(present.size);
}

// --------------------------------------------------------------- the room
let room = null;
let sub = null;

/** Whether a publication is a chat message (not a "hello", a "joined" line, nor a "who"). */
const isChatMessage = (pub) => !(pub.data && typeof pub.data === 'object' && (pub.data.type === 'hello' || pub.data.type === 'who'));

/** Asks the members this page cannot name (their hello is out of the history read) to say hello. */
function askNames(s) {
  if (s !== sub) return;
  const unnamed = [...present.keys()].filter((id) => id !== client.clientId && !nicks.has(id)).slice(0, 100);
  if (unnamed.length > 0) s.publish({ type: 'who', nick, clients: unnamed }).catch(() => {});
}

/**
 * Shows the room's last HISTORY chat messages, with the "joined" lines
 * among them: pages back through the history (newest first) until it has
 * HISTORY chat messages or the history ends, so that "joined" lines (the
 * newcomer's own included) do not take their places.
 */
async function loadHistory(s) {
  const PAGE = 100;
  const MAX_PAGES = 10; // what a room with many comings and goings needs, bounded
  try {
    const newestFirst = [];
    let chatMessages = 0;
    let since;
    for (let page = 0; page < MAX_PAGES && chatMessages < HISTORY; page++) {
      const h = await s.history(since ? { limit: PAGE, reverse: true, since } : { limit: PAGE, reverse: true });
      if (s !== sub) return;
      for (const pub of h.publications) {
        if (isChatMessage(pub)) {
          if (chatMessages === HISTORY) break;
          chatMessages++;
        }
        newestFirst.push(pub);
      }
      const oldest = h.publications[h.publications.length - 1];
      if (h.publications.length < PAGE || !oldest || oldest.offset === undefined) break;
      since = { offset: oldest.offset, epoch: h.epoch };
    }
    // The "joined" lines older than the oldest message shown are left out.
    while (newestFirst.length > 0 && !isChatMessage(newestFirst[newestFirst.length - 1]) && chatMessages === HISTORY) newestFirst.pop();
    for (const pub of newestFirst.reverse()) show(pub);
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
    if (wasBig && !bigRoom) s.publish(hello(true)).catch(() => {});
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
  shownEpoch = undefined;
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
    const presenceLoaded = loadPresence(s);
    presenceLoaded.then(() => {
      if (s === sub && !bigRoom) s.publish(hello(ctx.wasRecovering)).catch(() => {});
    });
    const epoch = ctx.streamPosition ? ctx.streamPosition.epoch : undefined;
    if (!ctx.wasRecovering) {
      shownEpoch = epoch;
      Promise.all([presenceLoaded, loadHistory(s)]).then(() => askNames(s));
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
    } else if (epoch !== undefined && epoch === shownEpoch) {
      // The same stream, but part of what was missed fell out of its
      // history: what is on screen stays, the history fills in after it
      // (offsets keep out what is shown already).
      system('Too much was missed to recover it all: the latest messages follow.');
      say('Reconnected: some missed messages are no longer in the server\'s history.', 'warn');
      loadHistory(s);
    } else {
      markEarlierStream();
      shownEpoch = epoch;
      say('Reconnected after a server restart: missed messages could not be recovered; earlier messages are kept above the line.', 'warn');
      loadHistory(s);
    }
  });
  s.on('publication', (pub) => {
    if (s !== sub) return;
    if (recovering && isChatMessage(pub)) recovering.count++;
    const data = pub.data;
    if (data && data.type === 'who' && Array.isArray(data.clients) && data.clients.includes(client.clientId)) {
      s.publish(hello(true)).catch(() => {});
    }
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
    const tab = tabs.get(info.client);
    // A reconnecting (or reloaded) tab leaves and joins again under a new
    // client id: say "left" only if that tab is not back a moment later.
    // Another tab of the same name is someone else's presence entry (pages
    // without tab ids: the name is all there is to go by).
    if (who) {
      setTimeout(() => {
        if (s !== sub) return;
        const back = [...present.keys()].some((id) => (tab ? tabs.get(id) === tab : nicks.get(id) === who));
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
const textInput = $('text');
const sendButton = $('send');
const sizeNote = $('text-size');
const utf8 = new TextEncoder();
const formatBytes = (n) => n.toLocaleString('en-US');

/** The chat message a text is sent as. */
function chatMessage(text) {
  return { type: 'msg', nick, text, ts: Date.now() };
}

/** Bytes of the publish command that would carry `data`: what the server's limit counts. */
function publishBytes(data) {
  const command = { id: WIDEST_COMMAND_ID, publish: { channel: `chat:${room}`, data } };
  return utf8.encode(JSON.stringify(command)).length;
}

/** Says how close the text is to the server's limit; false when over it. */
function checkSize() {
  const limit = maxMessageBytes();
  const bytes = publishBytes(chatMessage(textInput.value.trim()));
  const over = bytes > limit;
  sizeNote.dataset.bytes = bytes;
  sizeNote.dataset.limit = limit;
  if (over) {
    sizeNote.dataset.kind = 'error';
    sizeNote.textContent = `Too long to send: ${formatBytes(bytes)} bytes with the message envelope; the server accepts at most ${formatBytes(limit)}.`;
  } else if (bytes > limit * 0.9) {
    sizeNote.dataset.kind = 'warn';
    sizeNote.textContent = `${formatBytes(limit - bytes)} bytes left of the server's ${formatBytes(limit)}.`;
  } else {
    delete sizeNote.dataset.kind;
    sizeNote.textContent = '';
  }
  sendButton.disabled = over;
  if (over) textInput.setAttribute('aria-invalid', 'true');
  else textInput.removeAttribute('aria-invalid');
  return !over;
}
textInput.addEventListener('input', checkSize);
nickInput.addEventListener('change', checkSize);
addEventListener('hashchange', checkSize);

$('send-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const input = textInput;
  const text = input.value.trim();
  if (!text || !sub || !checkSize()) return;
  input.value = '';
  checkSize();
  try {
    await sub.publish(chatMessage(text));
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
