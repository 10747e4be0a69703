// CoDA browser terminal.
//
// Sections, in order: settings and storage, themes and fonts, HTTP helpers,
// the transport (one WebSocket per tab, long-poll Worker as fallback), panes,
// tabs and layout, session picker, setup and token cards, search, voice,
// uploads, keyboard shortcuts, boot.
//
// Wire contract: PROTOCOL.md. Offsets are raw PTY byte offsets; every
// pane remembers how far it has handed bytes to xterm (`pane.offset`) and how
// far xterm has rendered them (`pane.rendered`), so any reconnect or switch of
// transport resumes exactly where the pane is, without loss or repeats.
'use strict';

(() => {

// ---------------------------------------------------------------------------
// Settings and storage
// ---------------------------------------------------------------------------

const IS_MAC = /Mac|iPhone|iPad/.test(navigator.platform || navigator.userAgent);
const MAX_TABS = 10;
const ACK_EVERY = 64 * 1024;       // PROTOCOL: ack at least every 64 KiB rendered
const INPUT_CHUNK = 64 * 1024;     // keep client frames far below the 1 MiB cap
const POLL_BACKLOG = 1024 * 1024;  // unrendered bytes before the poller waits
const BACKGROUND_MS = 5;           // parsing per animation frame for each pane not being typed into
const BACKGROUND_FIRST = 32 * 1024; // a background pane's first slice, before its parse rate is known
const TYPING_MS = 1000, TYPING_EVERY = 3; // typed within TYPING_MS: background panes every 3rd frame ...
const ECHO_WAIT_MS = 100, FRAME_MS = 17;   // ... and none while an echo is due (outputScheduler.echoDue)
const FONT_MIN = 8, FONT_MAX = 32, FONT_DEFAULT = 14;

// localStorage (never failing), the last terminal size and the WebSocket's
// address: early.js needs them before this script runs.
const { store, lastSize, socketUrl } = window.codaEarly;

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// ---------------------------------------------------------------------------
// Themes and fonts (data, not code)
// ---------------------------------------------------------------------------

// name, dark?, background, foreground, cursor, selection, then the 16 ANSI
// colours black red green yellow blue magenta cyan white, normal then bright.
const THEME_TABLE = [
  ['Dark', true, '#1e1e1e', '#d4d4d4', '#d4d4d4', '#264f78',
    '#000000 #cd3131 #0dbc79 #e5e510 #2472c8 #bc3fbc #11a8cd #e5e5e5 #666666 #f14c4c #23d18b #f5f543 #3b8eea #d670d6 #29b8db #ffffff'],
  ['Light', false, '#ffffff', '#333333', '#333333', '#add6ff',
    '#000000 #cd3131 #00bc00 #949800 #0451a5 #bc05bc #0598bc #555555 #666666 #cd3131 #14ce14 #b5ba00 #0451a5 #bc05bc #0598bc #a5a5a5'],
  ['Dracula', true, '#282a36', '#f8f8f2', '#f8f8f2', '#44475a',
    '#21222c #ff5555 #50fa7b #f1fa8c #bd93f9 #ff79c6 #8be9fd #f8f8f2 #6272a4 #ff6e6e #69ff94 #ffffa5 #d6acff #ff92df #a4ffff #ffffff'],
  ['Solarized Dark', true, '#002b36', '#839496', '#93a1a1', '#073642',
    '#073642 #dc322f #859900 #b58900 #268bd2 #d33682 #2aa198 #eee8d5 #586e75 #cb4b16 #586e75 #657b83 #839496 #6c71c4 #93a1a1 #fdf6e3'],
  ['Solarized Light', false, '#fdf6e3', '#657b83', '#586e75', '#eee8d5',
    '#073642 #dc322f #859900 #b58900 #268bd2 #d33682 #2aa198 #eee8d5 #586e75 #cb4b16 #586e75 #657b83 #839496 #6c71c4 #93a1a1 #fdf6e3'],
  ['Nord', true, '#2e3440', '#d8dee9', '#d8dee9', '#434c5e',
    '#3b4252 #bf616a #a3be8c #ebcb8b #81a1c1 #b48ead #88c0d0 #e5e9f0 #4c566a #bf616a #a3be8c #ebcb8b #81a1c1 #b48ead #8fbcbb #eceff4'],
  ['Monokai', true, '#272822', '#f8f8f2', '#f8f8f0', '#49483e',
    '#272822 #f92672 #a6e22e #f4bf75 #66d9ef #ae81ff #a1efe4 #f8f8f2 #75715e #f92672 #a6e22e #f4bf75 #66d9ef #ae81ff #a1efe4 #f9f8f5'],
  ['GitHub Dark', true, '#0d1117', '#c9d1d9', '#c9d1d9', '#264f78',
    '#484f58 #ff7b72 #3fb950 #d29922 #58a6ff #bc8cff #39c5cf #b1bac4 #6e7681 #ffa198 #56d364 #e3b341 #79c0ff #d2a8ff #56d4dd #ffffff'],
];
const ANSI_NAMES = ['black', 'red', 'green', 'yellow', 'blue', 'magenta', 'cyan', 'white'];
const THEMES = {};
for (const [name, dark, background, foreground, cursor, selection, colours] of THEME_TABLE) {
  const theme = { background, foreground, cursor, cursorAccent: background, selectionBackground: selection };
  colours.split(' ').forEach((c, i) => {
    const base = ANSI_NAMES[i % 8];
    theme[i < 8 ? base : 'bright' + base[0].toUpperCase() + base.slice(1)] = c;
  });
  THEMES[name] = { name, dark, theme };
}

// Each family is vendored in static/lib/fonts (served by CoDA itself, nothing
// fetched from elsewhere), so every name listed renders.
const SYSTEM_MONO = 'ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace';
const FONTS = {
  'System default': SYSTEM_MONO,
  'JetBrains Mono': '"JetBrains Mono", ' + SYSTEM_MONO,
  'Fira Code': '"Fira Code", ' + SYSTEM_MONO,
  'Cascadia Code': '"Cascadia Code", ' + SYSTEM_MONO,
  'Source Code Pro': '"Source Code Pro", ' + SYSTEM_MONO,
};

const prefersDark = window.matchMedia && window.matchMedia('(prefers-color-scheme: dark)').matches;
const prefs = {
  theme: THEMES[store.get('theme')] ? store.get('theme') : (prefersDark ? 'Dark' : 'Light'),
  lastDark: store.get('lastDark', 'Dark'),
  lastLight: store.get('lastLight', 'Light'),
  font: FONTS[store.get('font')] ? store.get('font') : 'System default',
  fontSize: clampFont(store.get('fontSize', FONT_DEFAULT)),
  // 'dom' forces xterm's DOM renderer for machines whose WebGL misbehaves;
  // 'webgl-always' keeps WebGL even when a CPU rasteriser draws it.
  renderer: store.get('renderer', 'webgl'),
};

function clampFont(size) {
  const n = Number(size);
  return Number.isFinite(n) ? Math.min(FONT_MAX, Math.max(FONT_MIN, Math.round(n))) : FONT_DEFAULT;
}

function applyTheme(name) {
  const t = THEMES[name] || THEMES.Dark;
  prefs.theme = t.name;
  store.set('theme', t.name);
  if (t.dark) { prefs.lastDark = t.name; store.set('lastDark', t.name); }
  else { prefs.lastLight = t.name; store.set('lastLight', t.name); }
  const root = document.documentElement.style;
  root.setProperty('--bg', t.theme.background);
  root.setProperty('--fg', t.theme.foreground);
  root.setProperty('--accent', t.theme.blue);
  root.setProperty('--danger', t.theme.red);
  root.setProperty('--ok', t.theme.green);
  document.documentElement.dataset.mode = t.dark ? 'dark' : 'light';
  $('meta[name="theme-color"]').setAttribute('content', t.theme.background);
  $('#theme-select').value = t.name;
  for (const pane of allPanes()) pane.term.options.theme = t.theme;
}

function toggleMode() {
  applyTheme(THEMES[prefs.theme].dark ? prefs.lastLight : prefs.lastDark);
}

function applyFont(name, size) {
  prefs.font = FONTS[name] ? name : 'System default';
  prefs.fontSize = clampFont(size);
  store.set('font', prefs.font);
  store.set('fontSize', prefs.fontSize);
  $('#font-select').value = prefs.font;
  $('#font-size').textContent = String(prefs.fontSize);
  for (const pane of allPanes()) {
    pane.term.options.fontFamily = FONTS[prefs.font];
    pane.term.options.fontSize = prefs.fontSize;
    pane.fit();
  }
  loadFontThenRefit(prefs.font);
}

// ---------------------------------------------------------------------------
// HTTP helpers, banner, toasts
// ---------------------------------------------------------------------------

// Every /api answer is JSON; failures carry {"error"}. Returns {status, data}
// and never throws, so callers handle one shape. `sent`: the request's fetch,
// when it was sent already (static/early.js).
async function api(method, path, body, sent) {
  const opts = { method, credentials: 'same-origin', headers: {} };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  let resp;
  try { resp = await (sent || fetch(path, opts)); } catch (err) {
    return { status: 0, data: { error: 'CoDA is not reachable.' } };
  }
  let data = {};
  try { data = await resp.json(); } catch (_) { /* not JSON: keep {} */ }
  if (resp.status === 403) showAuthExpired();
  return { status: resp.status, data };
}

let bannerKind = null;
function showBanner(kind, text) {
  // Auth expiry outranks everything: the page cannot heal by itself.
  if (bannerKind === 'auth' && kind !== 'auth') return;
  if (bannerKind === 'restart' && kind === 'net') return;
  bannerKind = kind;
  const b = $('#banner');
  b.textContent = text;
  b.dataset.kind = kind;
  b.hidden = false;
  if (kind === 'auth') {
    b.append(' ', el('button', { text: 'Reload', onclick: () => location.reload() }));
  }
}
function hideBanner(kind) {
  if (kind && bannerKind !== kind) return;
  bannerKind = null;
  $('#banner').hidden = true;
}
function showAuthExpired() {
  transport.stopForAuth();
  showBanner('auth', 'Authentication expired \u2014 reload the page to sign in again.');
}

function toast(text, kind) {
  const t = el('div', { class: 'toast ' + (kind || ''), text });
  $('#toasts').append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 8000 : 4000);
}

// ---------------------------------------------------------------------------
// Transport: one WebSocket per browser tab, HTTP long-poll as the fallback
// ---------------------------------------------------------------------------

const transport = {
  mode: 'connecting',   // 'ws' | 'poll' | 'connecting' | 'auth'
  ws: null,
  everOpened: false,
  failures: 0,          // consecutive connects that never opened
  drops: [],            // times of recent drops of an open socket
  retryTimer: null,
  worker: null,
  pollOutstanding: 0,   // write callbacks still pending for the last poll batch
  pollWaiting: false,   // the worker waits for our go-ahead
  shuttingDown: false,

  stash: new Map(),     // session id -> output that came before its pane (see joinEarly)

  start() { this.connect(); },

  connect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.mode === 'auth') return;
    // early.js's socket is used once, by the first connect; early.js joins nothing after that.
    const offered = window.codaEarly.socket;
    const early = offered && !offered.taken ? offered : null;
    if (early) early.taken = true;
    let ws;
    try {
      ws = early && early.ws.readyState <= WebSocket.OPEN ? early.ws : new WebSocket(socketUrl());
    } catch (_) {
      this.onFailedConnect();
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.everOpened = true;
      this.failures = 0;
      this.shuttingDown = false;
      hideBanner('net');
      hideBanner('restart');
      // Back from polling: stop the worker first; any answer it still sends
      // is harmless because panes drop bytes they already have.
      this.stopPolling();
      this.mode = 'ws';
      for (const sessionId of this.stash.keys()) this.sendJoin(sessionId, 0);
      for (const pane of allPanes()) pane.join();
      updateStatus();
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === 'string') this.onText(ev.data);
      else this.onBinary(ev.data);
    };
    if (early && ws === early.ws) {   // it may have opened (and heard) before these handlers were set
      if (ws.readyState === WebSocket.OPEN) ws.onopen();
      if (early.joined) this.stash.set(early.joined, []);   // the first tab's session, joined by early.js
      for (const ev of early.heard.splice(0)) ws.onmessage(ev);
    }
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (opened) {
        const now = Date.now();
        this.drops = this.drops.filter((t) => now - t < 60000).concat(now);
        if (this.mode === 'ws') this.mode = 'connecting';
        // A socket that keeps dropping is as bad as none: poll meanwhile.
        if (this.drops.length >= 3) this.startPolling();
      }
      if (!opened) this.onFailedConnect();
      else this.scheduleRetry();
      updateStatus();
    };
  },

  onFailedConnect() {
    this.failures += 1;
    // Cannot connect: fall back to polling at once (before any socket ever
    // worked) or after a second failure, so the terminal is never dead.
    if (!this.everOpened || this.failures >= 2) this.startPolling();
    if (this.failures >= 3) {
      this.checkAuth();
      if (this.mode !== 'poll') showBanner('net', 'Connection lost \u2014 retrying\u2026');
    }
    this.scheduleRetry();
  },

  // The browser hides the status of a refused upgrade; ask over HTTP.
  async checkAuth() {
    await api('GET', 'api/version');
  },

  scheduleRetry() {
    if (this.retryTimer || this.mode === 'auth') return;
    // Exponential backoff with jitter, capped at 10 s: someone is waiting.
    const n = Math.min(this.failures + this.drops.length, 5);
    const delay = Math.min(10000, 500 * 2 ** n) * (0.5 + Math.random());
    this.retryTimer = setTimeout(() => this.connect(), delay);
  },

  stopForAuth() {
    this.mode = 'auth';
    clearTimeout(this.retryTimer);
    this.stopPolling();
    if (this.ws) { const ws = this.ws; this.ws = null; ws.close(); }
  },

  wsOpen() { return this.ws && this.ws.readyState === WebSocket.OPEN; },

  send(msg) {
    if (!this.wsOpen()) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  },

  onText(text) {
    let msg;
    try { msg = JSON.parse(text); } catch (_) { return; }
    const pane = msg.session_id ? paneBySession(msg.session_id) : null;
    switch (msg.type) {
      case 'joined': if (pane) pane.onJoined(msg); break;
      case 'session_exited': if (pane) pane.onExit(msg.exit_code); break;
      case 'session_closed': if (pane) pane.onExit(null); break;
      case 'shutting_down': this.onShuttingDown(); break;
      case 'notify': notices.receive(msg); break;
      case 'error':
        if (pane && /not found|unknown/i.test(msg.message || '')) pane.onExit(null, msg.message);
        else if (msg.message) console.warn('CoDA:', msg.message);
        break;
      default: break;
    }
  },

  onBinary(buf) {
    if (buf.byteLength < 10) return;
    const view = new DataView(buf);
    if (view.getUint8(0) !== 0x01) return;
    const offset = Number(view.getBigUint64(1));
    const n = view.getUint8(9);
    const id = String.fromCharCode(...new Uint8Array(buf, 10, n));
    const pane = paneBySession(id);
    if (pane) pane.receive(offset, new Uint8Array(buf, 10 + n));
    else if (this.stash.has(id)) this.stash.get(id).push([offset, new Uint8Array(buf, 10 + n)]);
  },

  // A new tab's session, joined before its terminal is built (or as the socket opens; once,
  // early.js may have joined it already): the shell's first output comes meanwhile and waits
  // here for the pane's bind(), which joins again, from there.
  joinEarly(sessionId) {
    if (this.stash.has(sessionId)) return;
    this.stash.set(sessionId, []);
    this.sendJoin(sessionId, 0);
  },

  takeStash(sessionId) {
    const stashed = this.stash.get(sessionId) || [];
    this.stash.delete(sessionId);
    return stashed;
  },

  onShuttingDown() {
    this.shuttingDown = true;
    showBanner('restart', 'CoDA is restarting\u2026 reconnecting when it is back.');
  },

  // Keystrokes: over the socket when it is open, else over HTTP, so typing
  // works during a reconnect and in polling mode too. HTTP input goes one
  // request at a time per pane, so keystrokes cannot overtake each other.
  input(pane, data) {
    if (!pane.httpBusy && this.wsOpen()) {
      for (const chunk of chunks(data)) this.send({ type: 'terminal_input', session_id: pane.sessionId, input: chunk });
      return;
    }
    pane.httpQueue += data;
    if (pane.httpBusy) return;
    pane.httpBusy = true;
    (async () => {
      while (pane.httpQueue && pane.sessionId) {
        const [chunk] = chunks(pane.httpQueue);
        pane.httpQueue = pane.httpQueue.slice(chunk.length);
        const { status } = await api('POST', 'api/input', { session_id: pane.sessionId, input: chunk });
        if (status === 0) { pane.httpQueue = chunk + pane.httpQueue; await sleep(1000); }
        else if (status !== 200) pane.httpQueue = '';   // gone or refused: do not retry forever
      }
      pane.httpBusy = false;
    })();
  },

  resize(pane, cols, rows) {
    if (!this.send({ type: 'terminal_resize', session_id: pane.sessionId, cols, rows })) {
      api('POST', 'api/resize', { session_id: pane.sessionId, cols, rows });
    }
  },

  ack(pane, offset) {
    this.send({ type: 'ack', session_id: pane.sessionId, offset });
  },

  sendJoin(sessionId, since) {
    this.send({ type: 'join_session', session_id: sessionId, since });
  },

  join(pane) {
    if (this.mode === 'ws') {
      this.sendJoin(pane.sessionId, pane.offset);
    } else if (this.mode === 'poll') {
      this.worker.postMessage({ type: 'add', session_id: pane.sessionId, since: pane.offset });
    }
  },

  leave(pane) {
    this.send({ type: 'leave_session', session_id: pane.sessionId });
    if (this.worker) this.worker.postMessage({ type: 'remove', session_id: pane.sessionId });
  },

  heartbeat() {
    const ids = allPanes().filter((p) => p.sessionId && !p.exited).map((p) => p.sessionId);
    if (!ids.length) return;
    if (!this.send({ type: 'heartbeat', session_ids: ids })) {
      api('POST', 'api/heartbeat', { session_ids: ids });
    }
  },

  // ---- long-poll fallback, in a Worker so a background tab keeps pace ----

  startPolling() {
    if (this.mode === 'poll' || this.mode === 'auth') return;
    this.mode = 'poll';
    if (!this.worker) {
      this.worker = new Worker('static/poll-worker.js');
      this.worker.onmessage = (ev) => this.onWorker(ev.data);
    }
    const since = {};
    for (const pane of allPanes()) if (pane.sessionId && !pane.exited) since[pane.sessionId] = pane.offset;
    this.pollOutstanding = 0;
    this.pollWaiting = false;
    this.worker.postMessage({ type: 'start', since });
    updateStatus();
  },

  stopPolling() {
    if (this.worker) this.worker.postMessage({ type: 'stop' });
    if (this.mode === 'poll') this.mode = 'connecting';
  },

  onWorker(msg) {
    if (msg.type === 'status') {
      if (msg.status === 403) showAuthExpired();
      else if (msg.failures >= 3 && this.mode === 'poll') showBanner('net', 'Connection lost \u2014 retrying\u2026');
      return;
    }
    if (msg.type !== 'outputs' || this.mode !== 'poll') return;
    hideBanner('net');
    if (msg.shutting_down) this.onShuttingDown();
    else if (this.shuttingDown) { this.shuttingDown = false; hideBanner('restart'); }
    for (const [id, out] of Object.entries(msg.outputs || {})) {
      const pane = paneBySession(id);
      if (!pane) continue;
      if (out.error) { pane.onExit(null, out.error); continue; }
      for (const n of out.notices || []) notices.receive(n);
      // The exact bytes from the server's offset (the worker decoded them).
      if (out.bytes.length) {
        this.pollOutstanding += 1;
        pane.receive(out.offset, out.bytes, () => this.pollRendered());
      }
      // Exited with output still coming: the next answer carries the rest.
      if (out.exited && !out.bytes.length) pane.onExit(out.exit_code);
    }
    // Ask for more at once unless xterm is far behind; then wait until the
    // batch is rendered, which is the poller's flow control.
    if (this.pollOutstanding === 0 || unrenderedBytes() < POLL_BACKLOG) this.worker.postMessage({ type: 'next' });
    else this.pollWaiting = true;
  },

  pollRendered() {
    this.pollOutstanding -= 1;
    if (this.pollWaiting && (this.pollOutstanding === 0 || unrenderedBytes() < POLL_BACKLOG)) {
      this.pollWaiting = false;
      if (this.worker && this.mode === 'poll') this.worker.postMessage({ type: 'next' });
    }
  },
};

// Split input into pieces far below the 1 MiB frame cap, never between the
// two halves of a surrogate pair (that would corrupt an emoji).
function chunks(text) {
  const out = [];
  let i = 0;
  while (i < text.length) {
    let end = Math.min(text.length, i + INPUT_CHUNK);
    const last = text.charCodeAt(end - 1);
    if (end < text.length && last >= 0xd800 && last <= 0xdbff) end -= 1;
    out.push(text.slice(i, end));
    i = end;
  }
  return out;
}

function unrenderedBytes() {
  return allPanes().reduce((sum, p) => sum + (p.offset - p.rendered), 0);
}

// ---------------------------------------------------------------------------
// Panes: one xterm each, bound to one server session
// ---------------------------------------------------------------------------

// WebGL drawn by a CPU rasteriser (SwiftShader, llvmpipe: no GPU, remote
// desktops, headless browsers) is several times slower than xterm's DOM
// renderer, so it only counts as WebGL when a real GPU draws it. Asked once.
let softwareGl = null;
function softwareWebgl() {
  if (softwareGl !== null) return softwareGl;
  softwareGl = false;
  try {
    const gl = document.createElement('canvas').getContext('webgl2');
    if (!gl) return softwareGl;
    const info = gl.getExtension('WEBGL_debug_renderer_info');
    const name = info ? String(gl.getParameter(info.UNMASKED_RENDERER_WEBGL)) : '';
    softwareGl = /swiftshader|llvmpipe|softpipe|software|basic render/i.test(name);
    const lose = gl.getExtension('WEBGL_lose_context');
    if (lose) lose.loseContext();   // free the probe's context at once
  } catch (_) { /* no answer: assume a GPU */ }
  return softwareGl;
}

// xterm 6.0 re-measures its scrollbar on every line it scrolls (Viewport._sync
// per buffer scroll event, each re-arming a hide timer) until the scrollback is
// full, which makes a fresh terminal render a flood ~4x slower for its first
// 10,000 lines; xterm 3 had synced once per frame (xterm.js #444). Coalesce those
// calls to one per frame. Calls with an argument (resize, buffer switch) pass
// through. A future xterm without this private method is left as it is, with a
// console warning.
function syncScrollbarOncePerFrame(term) {
  const viewport = term._core && term._core._viewport;
  if (!viewport || typeof viewport._sync !== 'function') {
    console.warn('CoDA: this xterm has no Viewport._sync; its scrollbar is synced on every line');
    return;
  }
  const sync = viewport._sync.bind(viewport);
  let queued = false;
  let disposed = false;  // a pane closed mid-flood: its last queued sync must not run
  term.loadAddon({ activate() {}, dispose() { disposed = true; } });
  viewport._sync = (...args) => {
    if (args.length) return sync(...args);
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; if (!disposed) sync(); });
  };
}

let serverVersion = '';
let wasmAllowed = false;   // decided at boot from the page's CSP

// Drawing the first prompt needs none of these (the WebGL renderer, images,
// search, links, OSC 52 copy: half the page's script): they load once the first
// output is on screen (or 2 s after boot), and every pane takes them then.
const EXTRA_SCRIPTS = ['static/lib/addon-webgl/addon-webgl.js', 'static/lib/addon-image/addon-image.js',
  'static/lib/addon-search/addon-search.js', 'static/lib/addon-web-links/addon-web-links.js',
  'static/lib/addon-clipboard/addon-clipboard.js'];
let extrasLoaded = false;
let extrasAsked = null;   // loadExtras()'s promise, once asked for

// Runs `then` once a terminal has drawn output (or 2 s have passed), after that
// frame: what the page needs after its first prompt waits until then.
function afterFirstOutput(then) {
  const started = performance.now();
  const due = () => allPanes().some((p) => p.rendered > 0) || performance.now() - started > 2000;
  const poll = () => (due() ? requestAnimationFrame(() => setTimeout(then)) : requestAnimationFrame(poll));
  requestAnimationFrame(poll);
}

function loadExtras() {
  const load = (src) => new Promise((resolve) => {
    const script = document.createElement('script');
    script.src = src;
    script.onload = script.onerror = resolve;   // a missing addon leaves that feature off, as before
    document.head.appendChild(script);
  });
  extrasAsked = extrasAsked || Promise.all(EXTRA_SCRIPTS.map(load)).then(() => {
    extrasLoaded = true;
    for (const pane of allPanes()) pane.loadExtras();
  });
  return extrasAsked;
}

// Compiling WebAssembly under a CSP without 'wasm-unsafe-eval' is a CSP
// violation, so read the policy the server sends rather than try it.
async function checkWasmAllowed(sent) {
  try {
    const resp = await (sent || fetch(location.pathname, { method: 'HEAD', credentials: 'same-origin' }));
    const csp = resp.headers.get('content-security-policy') || '';
    const script = (csp.split(';').find((d) => /^\s*script-src\s/.test(d)) ||
      csp.split(';').find((d) => /^\s*default-src\s/.test(d)) || '');
    return !script || /'(wasm-unsafe-eval|unsafe-eval)'/.test(script);
  } catch (_) { return false; }
}

// OSC 52 lets a program in the terminal (vim, tmux, also over ssh) copy to the
// clipboard. A read would hand the browser's clipboard to whatever runs in the
// PTY, a remote host included: reads get an empty answer, never the clipboard.
const WRITE_ONLY_CLIPBOARD = {
  readText: () => '',
  writeText: (selection, text) => {
    if (selection !== 'c' || !navigator.clipboard) return undefined;
    return navigator.clipboard.writeText(text).catch(() => { /* not allowed now (no focus): drop it */ });
  },
};

class Pane {
  constructor(tab) {
    this.tab = tab;
    this.sessionId = null;
    this.offset = 0;      // next byte to hand to xterm
    this.rendered = 0;    // xterm has rendered every byte before this
    this.acked = 0;
    this.queue = [];      // [bytes or notice text, offset after it, done] not yet handed to xterm
    this.feeding = false; // a background slice is being parsed
    this.slice = BACKGROUND_FIRST;
    this.exited = false;
    this.replayUntil = -1; // after a reload: nudge a resize once replay is drawn
    this.httpQueue = '';   // keystrokes waiting for HTTP (no socket open)
    this.httpBusy = false;

    this.el = el('div', { class: 'pane' });
    this.host = el('div', { class: 'term-host' });
    this.el.append(this.host);
    this.el.addEventListener('mousedown', () => setActivePane(this));

    const size = lastSize();  // the last fitted: fit() has nothing to redo
    const term = new Terminal({
      cols: size.cols,
      rows: size.rows,
      allowProposedApi: true,   // unicode11 and search decorations need it
      cursorBlink: true,
      fontFamily: FONTS[prefs.font],
      fontSize: prefs.fontSize,
      scrollback: 10000,
      theme: THEMES[prefs.theme].theme,
      macOptionIsMeta: false,
    });
    this.term = term;
    this.fitAddon = new FitAddon.FitAddon();
    this.search = null;   // with the extras
    term.loadAddon(this.fitAddon);
    term.loadAddon(new Unicode11Addon.Unicode11Addon());
    term.unicode.activeVersion = '11';
    term.open(this.host);
    syncScrollbarOncePerFrame(term);
    if (extrasLoaded) this.loadExtras();

    term.attachCustomKeyEventHandler((ev) => terminalKey(this, ev));
    term.onData((data) => {
      if (!this.sessionId || this.exited) return;
      outputScheduler.typedAt = performance.now();
      transport.input(this, extraKeys.modify(data));
    });
    term.onBinary((data) => { if (this.sessionId && !this.exited) transport.input(this, data); });
    term.onResize(({ cols, rows }) => { store.set('size', { cols, rows }); this.sendSize(cols, rows); });
    term.textarea.addEventListener('focus', () => setActivePane(this, true));

    // Refit whenever the pane's box changes (window, divider, tab switch).
    this.resizeObserver = new ResizeObserver(() => this.fit());
    this.resizeObserver.observe(this.host);
  }

  // What loadExtras() brought (an addon whose script failed to load stays off):
  // search, links, OSC 52 copy, the WebGL renderer and images. The image addon
  // decodes both Sixel and iTerm images (its base64 too) with WebAssembly. Where
  // the page's CSP forbids compiling it, the first image would throw inside
  // xterm's parser and stall the terminal, so images stay off there and their
  // escape sequences are ignored.
  loadExtras() {
    if (window.SearchAddon) {
      this.search = new SearchAddon.SearchAddon();
      this.term.loadAddon(this.search);
      this.search.onDidChangeResults((r) => { if (this === activePane()) showSearchCount(r); });
    }
    if (window.WebLinksAddon) this.term.loadAddon(new WebLinksAddon.WebLinksAddon());
    if (window.ClipboardAddon) this.term.loadAddon(new ClipboardAddon.ClipboardAddon(undefined, WRITE_ONLY_CLIPBOARD));
    this.loadRenderer();
    if (wasmAllowed) {
      try { this.term.loadAddon(new ImageAddon.ImageAddon()); } catch (err) { console.warn('CoDA: images off:', err); }
    }
  }

  loadRenderer() {
    if (prefs.renderer === 'dom' || (prefs.renderer !== 'webgl-always' && softwareWebgl())) return;
    try {
      const webgl = new WebglAddon.WebglAddon();
      // A lost context (GPU reset, too many contexts) drops to the DOM renderer.
      webgl.onContextLoss(() => webgl.dispose());
      this.term.loadAddon(webgl);
    } catch (_) { /* no WebGL here: the DOM renderer stays */ }
  }

  fit() {
    if (!this.host.offsetWidth || !this.host.offsetHeight) return;
    try { this.fitAddon.fit(); } catch (_) { /* not laid out yet */ }
  }

  sendSize(cols, rows) {
    if (!this.sessionId || this.exited) return;
    clearTimeout(this.resizeTimer);
    this.resizeTimer = setTimeout(() => transport.resize(this, cols, rows), 50);
  }

  // A new session on the server, with the splash. `asked`: its request, when
  // newTab sent it before this pane's terminal was built (at the last size seen).
  async create(label, launch, asked) {
    this.fit();
    const ask = asked || askSession(label, launch, { cols: this.term.cols, rows: this.term.rows });
    const { status, data } = await ask.answer;
    if (status !== 200 || !data.session_id) {
      this.showCreateError(status, data.error);
      return false;
    }
    this.term.write(splashText());
    this.bind(data.session_id, 0);
    if (ask.size.cols !== this.term.cols || ask.size.rows !== this.term.rows) {
      transport.resize(this, this.term.cols, this.term.rows);
    }
    return true;
  }

  showCreateError(status, message) {
    let text = message || 'Could not start a session.';
    if (status === 429) {
      if (!/MAX_CONCURRENT_SESSIONS/.test(text)) text += ' Close a session or raise MAX_CONCURRENT_SESSIONS in the server\u2019s environment.';
      text += ` ${IS_MAC ? 'Cmd' : 'Ctrl'}+Shift+S lists the sessions.`;
    }
    this.term.write('\r\n\x1b[31m' + text + '\x1b[0m\r\n');
    this.offerNewSession(status === 429 ? 'Try again' : 'New session');
    toast(text, 'error');
  }

  // Attach to a session and stream it from `since` (0 replays what is kept).
  bind(sessionId, since, replayUntil) {
    this.sessionId = sessionId;
    this.offset = this.rendered = this.acked = since;
    for (const [, , done] of this.queue.splice(0)) if (done) done();
    this.exited = false;
    this.replayUntil = replayUntil === undefined ? -1 : replayUntil;
    this.clearCard('exit');
    for (const [offset, bytes] of transport.takeStash(sessionId)) this.receive(offset, bytes);
    this.join();
    saveLayout();
    refreshBadge();
  }

  join() {
    if (this.sessionId && !this.exited) transport.join(this);
  }

  onJoined(msg) {
    if (this.replayUntil >= 0 && this.rendered >= this.replayUntil) this.nudge();
  }

  // Output at byte `offset`. Bytes before this.offset were already handed to
  // xterm (a rejoin, a transport switch): drop them. A gap means the server
  // no longer keeps them (truncated): carry on from what arrived.
  receive(offset, bytes, done) {
    const end = offset + bytes.length;
    if (end <= this.offset) { if (done) done(); return; }
    if (offset < this.offset) bytes = bytes.subarray(this.offset - offset);
    if (offset > this.offset) {
      // Say so rather than silently splice: the start is gone from the server.
      this.queue.push([`\x1b[2m[${offset - this.offset} bytes of older output are no longer kept]\x1b[0m\r\n`,
        offset, null]);
    }
    this.offset = end;
    this.queue.push([bytes, end, done]);
    if (this.urgent()) {
      outputScheduler.answeredAt = performance.now();
      this.feed(Infinity);
    } else outputScheduler.wake();
  }

  // The pane being typed into (or any pane of a hidden page, where animation
  // frames stop) hands xterm its output at once; the others wait for the
  // scheduler, so a keystroke's echo never waits behind their parsing.
  urgent() { return this === activePane() || document.hidden; }

  // Hand xterm queued output, up to `limit` bytes (whole items, the last one
  // cut). Each write's callback marks its bytes rendered and acks by it, so
  // flow control follows what is parsed, not what is queued here.
  feed(limit) {
    const started = performance.now();
    let taken = 0;
    while (this.queue.length && taken < limit) {
      const item = this.queue[0];
      let [data, end, done] = item;
      if (typeof data !== 'string' && data.length > limit - taken) {
        item[0] = data.subarray(limit - taken);
        data = data.subarray(0, limit - taken);
        end -= item[0].length;
        done = null;
      } else this.queue.shift();
      taken += data.length;
      const last = !this.queue.length || taken >= limit;
      this.term.write(data, () => this.onParsed(end, done, last && limit !== Infinity ? [started, taken] : null));
    }
    if (limit !== Infinity && taken) this.feeding = true;
  }

  onParsed(end, done, slice) {
    this.rendered = Math.max(this.rendered, end);
    if (this.rendered - this.acked >= ACK_EVERY || this.rendered === this.offset) this.ackNow();
    if (this.replayUntil >= 0 && this.rendered >= this.replayUntil) this.nudge();
    if (done) done();
    if (slice) {  // a background slice parsed: size the next one to BACKGROUND_MS at the rate seen
      const [started, bytes] = slice;
      const rate = bytes / Math.max(1, performance.now() - started);
      this.slice = Math.min(1024 * 1024, Math.max(16 * 1024, Math.round(rate * BACKGROUND_MS)));
      this.feeding = false;
      if (this.queue.length) outputScheduler.wake();
    }
  }

  ackNow() {
    if (this.rendered <= this.acked || transport.mode !== 'ws') return;
    this.acked = this.rendered;
    transport.ack(this, this.rendered);
  }

  // After replaying a full-screen program's output, a size change makes it
  // repaint cleanly at the real size (SIGWINCH twice).
  nudge() {
    this.replayUntil = -1;
    const { cols, rows } = this.term;
    if (!this.sessionId || this.exited || rows < 2) return;
    transport.resize(this, cols, rows - 1);
    setTimeout(() => transport.resize(this, cols, rows), 100);
  }

  onExit(code, reason) {
    if (this.exited) return;
    this.exited = true;
    transport.leave(this);
    const what = reason ? reason : (code === null || code === undefined ? 'session closed' : `process exited (code ${code})`);
    this.term.write(`\r\n\x1b[2m[${what}]\x1b[0m\r\n`);
    this.offerNewSession('New session');
    refreshBadge();
  }

  offerNewSession(label) {
    this.clearCard('exit');
    const card = el('div', { class: 'card exit-card', 'data-card': 'exit' },
      el('button', {
        text: label,
        onclick: async () => {
          card.remove();
          if (this.sessionId) transport.leave(this);
          this.sessionId = null;
          this.term.reset();
          if (!(await this.create(this.tab.name))) return;
          this.term.focus();
        },
      }));
    this.el.append(card);
  }

  clearCard(name) {
    for (const c of this.el.querySelectorAll(`[data-card="${name}"]`)) c.remove();
  }

  // Closing a pane ends its session (the session cap is small), unless the
  // user chose to keep it running (keep): then it is only left, for the picker.
  dispose(keep) {
    if (this.sessionId && !this.exited) {
      transport.leave(this);
      if (!keep) api('POST', 'api/session/close', { session_id: this.sessionId }).then(() => refreshBadge());
    }
    this.resizeObserver.disconnect();
    this.term.dispose();
    this.el.remove();
  }
}

function splashText() {
  const dim = '\x1b[2m', bold = '\x1b[1m', off = '\x1b[0m';
  const help = IS_MAC ? 'Cmd+/' : 'Ctrl+/';
  return `${bold}CoDA${off}${serverVersion ? ' ' + serverVersion : ''}${dim} \u00b7 ${help} for shortcuts \u00b7 ` +
    `sessions persist until you type exit and expire after the idle timeout${off}\r\n`;
}

// ---------------------------------------------------------------------------
// Tabs and layout
// ---------------------------------------------------------------------------

const tabs = [];          // [{name, panes: [Pane, Pane?], split, el, tabEl, active}]
let activeTab = null;

function allPanes() { return tabs.flatMap((t) => t.panes); }

// Feeds the output of panes not being typed into, one slice per pane per
// animation frame (see Pane.feed): the focused pane's bytes go first, always.
// While someone types, background panes are fed (and so redrawn) only every
// TYPING_EVERY frames, and never while a keystroke's echo is due: drawing a
// scrolling pane costs each frame it happens in.
const outputScheduler = {
  frame: 0,
  count: 0,
  typedAt: -Infinity,
  answeredAt: -Infinity,  // the focused pane's latest output
  // Right after a keystroke, until its echo has had a frame of its own (or
  // ECHO_WAIT_MS passed): no background pane is fed, so its frame stays light.
  echoDue(now) {
    return (this.typedAt > this.answeredAt && now - this.typedAt < ECHO_WAIT_MS) || now - this.answeredAt < FRAME_MS;
  },
  wake() {
    if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.run(); });
  },
  run() {
    const now = performance.now();
    const typing = now - this.typedAt < TYPING_MS;
    if (typing && !document.hidden && (this.echoDue(now) || ++this.count % TYPING_EVERY)) {
      this.wake();
      return;
    }
    for (const pane of allPanes()) {
      if (!pane.queue.length || pane.feeding) continue;
      pane.feed(pane.urgent() ? Infinity : pane.slice);
    }
  },
};
// Hidden, the page gets no animation frames: write what waits at once.
document.addEventListener('visibilitychange', () => { if (document.hidden) outputScheduler.run(); });
function paneBySession(id) { return allPanes().find((p) => p.sessionId === id) || null; }
function activePane() { return activeTab ? (activeTab.focused || activeTab.panes[0]) : null; }

function makeTab(name) {
  const tab = { name, panes: [], split: 50, focused: null };
  tab.el = el('div', { class: 'tab-view' });
  tab.tabEl = el('button', { class: 'tab', role: 'tab' });
  tab.tabEl.append(el('span', { class: 'tab-name', text: name }),
    el('span', { class: 'tab-close', title: 'Close tab', 'aria-label': 'Close tab', text: '\u00d7', onclick: (ev) => { ev.stopPropagation(); closeTab(tab); } }));
  // Clicking the shown tab again does nothing: a double-click to rename
  // must not have the terminal steal focus from the name field.
  tab.tabEl.addEventListener('click', () => { if (activeTab !== tab) showTab(tab); });
  tab.tabEl.addEventListener('dblclick', () => renameTab(tab));
  $('#tabs').append(tab.tabEl);
  $('#workspace').append(tab.el);
  tabs.push(tab);
  return tab;
}

function shellName() {
  // The lowest "Shell N" not in use, so names stay short after closing tabs.
  const used = new Set(tabs.map((t) => t.name));
  for (let n = 1; ; n += 1) if (!used.has('Shell ' + n)) return 'Shell ' + n;
}

async function newTab(sessionId, replayUntil, launch) {
  if (tabs.length >= MAX_TABS) { toast(`At most ${MAX_TABS} tabs.`, 'error'); return null; }
  const name = launch ? launch.label : shellName();
  // A new session is asked for, and joined, before its tab is built (a tab is never without
  // its pane): its shell starts, and its first output comes, while the terminal is built.
  const asked = sessionId ? null : (!launch && takeEarlySession()) || askSession(name, launch, lastSize());
  if (asked) {
    const { status, data } = await asked.answer;
    if (status === 200 && data.session_id) transport.joinEarly(data.session_id);
  }
  const tab = makeTab(name);
  showTab(tab);
  const pane = addPane(tab);
  if (sessionId) pane.bind(sessionId, 0, replayUntil);
  else await pane.create(tab.name, launch, asked);
  saveLayout();
  pane.term.focus();
  return tab;
}

// The session early.js asked for the first tab, in askSession()'s shape; the first
// caller takes it (null when early.js asked for none, or it was taken).
let earlySession = window.codaEarly.session;
function takeEarlySession() {
  const early = earlySession;
  earlySession = null;
  return early && { size: early.size, answer: api('POST', 'api/session', undefined, early.answer) };
}

// A session asked for and never shown (early.js's, when boot() reopened saved work instead).
async function closeUnused(asked) {
  if (!asked) return;
  const { status, data } = await asked.answer;
  if (status !== 200 || !data.session_id) return;
  transport.takeStash(data.session_id);
  await api('POST', 'api/session/close', { session_id: data.session_id });
}

// POST /api/session at `size`: { size, answer (a promise of api()'s answer) }.
function askSession(label, launch, size) {
  return { size, answer: api('POST', 'api/session', { label, cols: size.cols, rows: size.rows,
    agent: launch ? launch.agent : undefined, project: launch && launch.project ? launch.project : undefined,
    cwd: launch && launch.cwd ? launch.cwd : undefined }) };
}

function addPane(tab) {
  const pane = new Pane(tab);
  if (tab.panes.length === 1) {
    if (!tab.divider) {
      tab.divider = el('div', { class: 'divider', title: 'Drag to resize' });
      tab.divider.addEventListener('pointerdown', (ev) => dragDivider(tab, ev));
    }
    tab.el.append(tab.divider);   // (re)placed between the two panes
  }
  tab.panes.push(pane);
  tab.el.append(pane.el);
  layoutTab(tab);
  setActivePane(pane);
  return pane;
}

function layoutTab(tab) {
  const [a, b] = tab.panes;
  if (a) a.el.style.flex = b ? `0 0 calc(${tab.split}% - 3px)` : '1 1 auto';
  if (b) b.el.style.flex = '1 1 0';
  if (tab.divider) tab.divider.hidden = !b;
  for (const p of tab.panes) p.fit();
}

async function splitPane() {
  const tab = activeTab;
  if (!tab) return;
  if (tab.panes.length >= 2) { toast('A tab holds two panes.', ''); return; }
  const pane = addPane(tab);
  await pane.create(tab.name);
  saveLayout();
  pane.term.focus();
}

async function closePane(pane) {
  pane = pane || activePane();
  if (!pane) return;
  const tab = pane.tab;
  if (tab.panes.length === 1) { closeTab(tab); return; }
  const choice = await askBeforeClosing([pane], 'pane');
  if (choice === 'cancel' || !tab.panes.includes(pane)) return;
  pane.dispose(choice === 'keep');
  tab.panes = tab.panes.filter((p) => p !== pane);
  tab.focused = tab.panes[0];
  layoutTab(tab);
  tab.panes[0].term.focus();
  saveLayout();
}

async function closeTab(tab) {
  const choice = await askBeforeClosing(tab.panes, 'tab');
  if (choice === 'cancel' || !tabs.includes(tab)) return;
  for (const p of tab.panes) p.dispose(choice === 'keep');
  tab.el.remove();
  tab.tabEl.remove();
  const i = tabs.indexOf(tab);
  tabs.splice(i, 1);
  if (activeTab === tab) {
    activeTab = null;
    if (tabs.length) showTab(tabs[Math.max(0, i - 1)]);
  }
  saveLayout();
  refreshBadge();
}

function showTab(tab) {
  if (!tab) return;
  activeTab = tab;
  document.title = `${tab.name} \u2014 CoDA`;
  notices.render();
  for (const t of tabs) {
    const on = t === tab;
    t.el.classList.toggle('active', on);
    t.tabEl.classList.toggle('active', on);
    t.tabEl.setAttribute('aria-selected', String(on));
  }
  // Panes hidden while another tab showed have no size: fit now.
  requestAnimationFrame(() => {
    for (const p of tab.panes) p.fit();
    const p = activePane();
    if (p) { p.term.focus(); setActivePane(p); }
  });
  saveLayout();
}

function cycleTab(step) {
  if (!activeTab || tabs.length < 2) return;
  const i = tabs.indexOf(activeTab);
  showTab(tabs[(i + step + tabs.length) % tabs.length]);
}

function cyclePane(step) {
  const panes = allPanes();
  if (panes.length < 2) return;
  const i = panes.indexOf(activePane());
  const next = panes[(i + step + panes.length) % panes.length];
  if (next.tab !== activeTab) showTab(next.tab);
  setActivePane(next);
  next.term.focus();
}

function setActivePane(pane, fromFocus) {
  const tab = pane.tab;
  tab.focused = pane;
  for (const p of allPanes()) p.el.classList.toggle('focused', p === pane && p.tab.panes.length > 1);
  if (pane.queue.length) outputScheduler.wake();  // what it was waiting for goes now, not slice by slice
  notices.look(pane);
  if (fromFocus) saveLayout();
}

function renameTab(tab) {
  const nameEl = tab.tabEl.querySelector('.tab-name');
  const input = el('input', { class: 'tab-rename', value: tab.name, maxlength: '100', 'aria-label': 'Tab name' });
  nameEl.replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (commit) => {
    if (done) return;
    done = true;
    const name = input.value.replace(/[\x00-\x1f\x7f]/g, '').trim().slice(0, 100);
    if (commit && name) {
      tab.name = name;
      if (tab === activeTab) document.title = `${name} \u2014 CoDA`;
      for (const p of tab.panes) {
        if (p.sessionId) api('POST', 'api/session/label', { session_id: p.sessionId, label: name });
      }
      saveLayout();
    }
    nameEl.textContent = tab.name;
    input.replaceWith(nameEl);
    const p = activePane();
    if (p) p.term.focus();
  };
  input.addEventListener('keydown', (ev) => {
    ev.stopPropagation();
    if (ev.key === 'Enter') finish(true);
    if (ev.key === 'Escape') finish(false);
  });
  input.addEventListener('blur', () => finish(true));
}

function dragDivider(tab, ev) {
  ev.preventDefault();
  const divider = tab.divider;
  divider.setPointerCapture(ev.pointerId);
  document.body.classList.add('dragging');
  let frame = 0;
  const move = (e) => {
    const box = tab.el.getBoundingClientRect();
    tab.split = Math.min(85, Math.max(15, ((e.clientX - box.left) / box.width) * 100));
    // Refit while dragging, at most once per frame.
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; layoutTab(tab); });
  };
  const up = () => {
    divider.removeEventListener('pointermove', move);
    divider.removeEventListener('pointerup', up);
    divider.removeEventListener('pointercancel', up);
    document.body.classList.remove('dragging');
    layoutTab(tab);
    saveLayout();
  };
  divider.addEventListener('pointermove', move);
  divider.addEventListener('pointerup', up);
  divider.addEventListener('pointercancel', up);
}

// The layout survives a reload: tab names, split, and each pane's session.
let restoring = false;
function saveLayout() {
  if (restoring) return;
  reportLayout();
  store.set('layout', {
    active: tabs.indexOf(activeTab),
    tabs: tabs.map((t) => ({
      name: t.name,
      split: t.split,
      focused: t.panes.indexOf(t.focused),
      sessions: t.panes.map((p) => p.sessionId),
    })),
  });
}

async function restoreLayout(live) {
  const saved = store.get('layout', null);
  if (!saved || !Array.isArray(saved.tabs)) return false;
  const byId = new Map(live.map((s) => [s.session_id, s]));
  restoring = true;
  for (const t of saved.tabs.slice(0, MAX_TABS)) {
    const ids = (t.sessions || []).filter((id) => id && byId.has(id)).slice(0, 2);
    if (!ids.length) continue;
    const tab = makeTab(typeof t.name === 'string' && t.name ? t.name.slice(0, 100) : shellName());
    tab.split = Math.min(85, Math.max(15, Number(t.split) || 50));
    showTab(tab);
    for (const id of ids) {
      const pane = addPane(tab);
      // since 0: replay everything the server kept; nudge once it is drawn.
      pane.bind(id, 0, byId.get(id).offset || 0);
    }
    const f = tab.panes[t.focused] || tab.panes[0];
    setActivePane(f);
  }
  restoring = false;
  if (!tabs.length) return false;
  showTab(tabs[saved.active] || tabs[0]);
  return true;
}

// ---------------------------------------------------------------------------
// Session picker and badge
// ---------------------------------------------------------------------------

// null when the server did not answer, so callers can keep what they show.
async function listSessions(sent) {
  const { status, data } = await api('GET', 'api/sessions', undefined, sent);
  return status === 200 && Array.isArray(data) ? data : null;
}

async function refreshBadge(list) {
  const sessions = list || await listSessions();
  if (!sessions) return;
  const n = sessions.filter((s) => !s.exited).length;
  $('#sessions-badge').textContent = `${n} active session${n === 1 ? '' : 's'}`;
}

function since(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm';
  if (s < 86400) return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
  return Math.floor(s / 86400) + 'd';
}

function epochSeconds(v) {
  if (typeof v === 'number') return v > 1e12 ? v / 1000 : v;
  const t = Date.parse(v);
  return Number.isFinite(t) ? t / 1000 : Date.now() / 1000;
}

async function openSessions() {
  openModal('#sessions-modal');
  await renderSessions();
}

async function renderSessions() {
  const sessions = (await listSessions()) || [];
  refreshBadge(sessions);
  const body = $('#sessions-table tbody');
  body.textContent = '';
  const now = Date.now() / 1000;
  for (const s of sessions) {
    const open = paneBySession(s.session_id);
    const attach = el('button', {
      text: open ? 'Open here' : 'Attach',
      title: open ? 'Already open in a pane of this page' : 'Open in a new tab',
      onclick: async () => {
        if (open) { showTab(open.tab); setActivePane(open); closeModal(); open.term.focus(); return; }
        closeModal();
        await newTab(s.session_id, s.offset || 0);
      },
    });
    const kill = el('button', {
      class: 'danger', text: 'Kill', 'aria-label': `Kill ${s.label || s.session_id}`,
      onclick: () => confirmInline(kill, `End ${s.label || 'it'}?`, async () => {
        await api('POST', 'api/session/close', { session_id: s.session_id });
        renderSessions();
      }),
    });
    body.append(el('tr', {},
      el('td', { text: s.label || s.session_id }),
      el('td', { text: s.exited ? 'exited' : (s.process || '') + (s.busy ? ' (running)' : '') }),
      el('td', { text: s.cwd || '' }),
      el('td', { text: since(now - epochSeconds(s.created_at)) }),
      el('td', { text: since(s.idle_seconds || 0) }),
      el('td', { class: 'actions' }, attach, kill)));
  }
  $('#sessions-empty').hidden = sessions.length > 0;
  $('#sessions-kill-all').disabled = sessions.length === 0;
}

async function killAll() {
  const sessions = (await listSessions()) || [];
  const n = sessions.filter((s) => !s.exited).length;
  confirmInline($('#sessions-kill-all'), `End all ${n} session${n === 1 ? '' : 's'}?`, async () => {
    await Promise.all(sessions.map((s) => api('POST', 'api/session/close', { session_id: s.session_id })));
    renderSessions();
  });
}

// Workbench: a kill asks first, in place: the button gives way to the question,
// a confirming button (focused) and Cancel.
function confirmInline(button, question, action) {
  const yes = el('button', { class: 'danger confirm-yes', text: 'End it', 'aria-label': question + ' Confirm' });
  const no = el('button', { text: 'Cancel' });
  const box = el('span', { class: 'confirm', role: 'group', 'aria-label': question }, el('span', { text: question + ' ' }), yes, no);
  button.hidden = true;
  button.after(box);
  yes.addEventListener('click', () => { box.remove(); button.hidden = false; action(); });
  no.addEventListener('click', () => { box.remove(); button.hidden = false; button.focus(); });
  yes.focus();
}

function openModal(sel) {
  $('#modal-backdrop').hidden = false;
  for (const m of document.querySelectorAll('.modal')) m.hidden = true;
  $(sel).hidden = false;
}

function closeModal() {
  if (pendingClose) { answerClose('cancel'); return; }
  $('#modal-backdrop').hidden = true;
  const p = activePane();
  if (p) p.term.focus();
}

function modalOpen() { return !$('#modal-backdrop').hidden; }

// ---------------------------------------------------------------------------
// Setup progress and the Databricks token card (first pane)
// ---------------------------------------------------------------------------

const STATE_WORDS = { pending: 'pending', running: 'running', complete: 'done', failed: 'failed', skipped: 'skipped' };

function firstPane() { return tabs.length ? tabs[0].panes[0] : null; }

function duration(step) {
  if (!step.started_at) return '';
  const start = epochSeconds(step.started_at);
  const end = step.finished_at ? epochSeconds(step.finished_at) : Date.now() / 1000;
  return (Math.max(0, end - start)).toFixed(1) + 's';
}

async function watchSetup() {
  const deadline = Date.now() + 30 * 60 * 1000;   // setup runs minutes, not hours
  let dismissed = false, first = true;
  while (Date.now() < deadline && !dismissed) {
    const { status, data } = await api('GET', 'api/setup-status');
    const pane = firstPane();
    if (status !== 200 || !pane) { await sleep(3000); continue; }
    const steps = Array.isArray(data.steps) ? data.steps : [];
    const done = data.status === 'complete' || data.status === 'failed';
    pane.clearCard('setup');
    // Nothing to show: no steps, or a clean setup finished before this page.
    if (!steps.length || (first && data.status === 'complete')) return;
    first = false;
    const list = el('ul', {});
    for (const s of steps) {
      const li = el('li', { class: 'step ' + s.status },
        el('span', { class: 'step-state', text: STATE_WORDS[s.status] || s.status }),
        el('span', { class: 'step-label', text: s.label || s.id }),
        el('span', { class: 'step-time', text: duration(s) }));
      if (s.error) li.append(el('div', { class: 'step-error', text: String(s.error).split('\n')[0] }));
      // Models from the workspace: which model an agent uses and why (the step's detail line)
      else if (s.detail) li.append(el('div', { class: 'step-detail', text: String(s.detail).split('\n')[0] }));
      list.append(li);
    }
    const hide = el('button', { class: 'icon', text: '\u2715', title: 'Hide', 'aria-label': 'Hide setup progress' });
    const card = el('div', { class: 'card setup-card', 'data-card': 'setup' },
      el('div', { class: 'card-title' }, el('span', { text: `Setup: ${STATE_WORDS[data.status] || data.status}` }), hide),
      list);
    hide.addEventListener('click', () => { dismissed = true; card.remove(); });
    pane.el.append(card);
    if (done) {
      // Failures stay visible; a clean finish folds away by itself.
      if (data.status === 'complete') { await sleep(4000); card.remove(); }
      return;
    }
    await sleep(1000);
  }
}

// Databricks Apps mode only (an owner and a workspace): locally without
// workspace settings there is no prompt. Checked at start and then every
// minute, since a token can expire or be revoked while the page is open.
async function watchToken() {
  const app = await api('GET', 'api/app-state');
  if (app.status !== 200 || !app.data.workspace_host || !app.data.owner) return;
  await checkToken(app.data.workspace_host);
  setInterval(() => checkToken(app.data.workspace_host), 60000);
}

// ---- MCP servers outside the workspace ----
// With a workspace, a card names the MCP servers the agents get that leave it
// (the third-party ones), until it is hidden for that same list.
// The cards at a pane's bottom left (the welcome, the MCP notice, a resume offer) stack in one
// column there, never one on top of another.
function addCornerCard(pane, card) {
  let stack = pane.el.querySelector(':scope > .card-stack');
  if (!stack) { stack = el('div', { class: 'card-stack' }); pane.el.append(stack); }
  stack.append(card);
}

async function noteThirdPartyMcp() {
  const app = await api('GET', 'api/app-state');
  const pane = firstPane();
  if (app.status !== 200 || !app.data.workspace_host || !pane) return;
  const servers = Array.isArray(app.data.mcp_servers) ? app.data.mcp_servers : [];
  const leaving = servers.filter((s) => s && s.leaves_workspace);
  const list = leaving.map((s) => `${s.name}@${s.host}`).join(' ');
  if (!leaving.length || store.get('mcpNoticeHidden', '') === list) return;
  const hide = el('button', { class: 'icon', text: '\u2715', title: 'Hide', 'aria-label': 'Hide the MCP servers notice' });
  const card = el('div', { class: 'card mcp-card', 'data-card': 'mcp' },
    el('div', { class: 'card-title' }, el('span', { text: 'MCP servers outside the workspace' }), hide),
    el('ul', {}, ...leaving.map((s) => el('li', { text: `${s.name} (${s.host})` }))),
    el('p', { text: 'The agents\u2019 tool calls to these leave your Databricks workspace. CODA_MCP_THIRD_PARTY=0 drops them.' }));
  hide.addEventListener('click', () => { store.set('mcpNoticeHidden', list); card.remove(); });
  addCornerCard(pane, card);
}

async function checkToken(workspaceHost) {
  const pane = firstPane();
  if (!pane || pane.el.querySelector('[data-card="pat"]')) return;
  const pat = await api('GET', 'api/pat-status');
  if (pat.status !== 200 || pat.data.valid) return;
  showTokenCard(pane, workspaceHost, pat.data.error);
}

function showTokenCard(pane, workspaceHost, why) {
  const host = String(workspaceHost).replace(/\/+$/, '');
  const origin = /^https?:\/\//.test(host) ? host : 'https://' + host;
  const input = el('input', { type: 'password', placeholder: 'dapi\u2026', autocomplete: 'off', spellcheck: 'false', 'aria-label': 'Databricks personal access token' });
  const message = el('div', { class: 'pat-message' });
  const submit = el('button', { text: 'Connect' });
  const card = el('form', { class: 'card pat-card', 'data-card': 'pat' },
    el('div', { class: 'card-title', text: 'Connect your Databricks token' }),
    el('p', {}, 'The coding agents call the workspace with your personal access token. ',
      el('a', { href: origin + '/settings/user/developer/access-tokens', target: '_blank', rel: 'noopener noreferrer', text: 'Create one here' }), '.'));
  // Why the configured token does not work (expired, refused), from /api/pat-status.
  if (why) card.append(el('p', { class: 'pat-reason', text: why }));
  card.append(el('div', { class: 'pat-row' }, input, submit), message);
  // Keys typed here belong to the field, not to the terminal shortcuts.
  input.addEventListener('keydown', (ev) => ev.stopPropagation());
  card.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) { message.textContent = 'Paste a token first.'; return; }
    submit.disabled = true;
    message.className = 'pat-message';
    message.textContent = 'Checking\u2026';
    const { status, data } = await api('POST', 'api/configure-pat', { token });
    submit.disabled = false;
    if (status === 200) {
      input.value = '';
      message.className = 'pat-message ok';
      message.textContent = `Connected as ${data.user || 'you'}.`;
      setTimeout(() => card.remove(), 4000);
      reopenSaved();
    } else {
      message.className = 'pat-message error';
      message.textContent = data.error || 'That token did not work.';
    }
  });
  pane.el.append(card);
  input.focus();
}

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

// ---------------------------------------------------------------------------
// Restart-proof work: the page reports its tabs (the server keeps them, with
// each session's folder and agent, in the workspace); after a restart it
// reopens the saved tabs in their folders, and offers each tab that ran an
// agent that agent's own resume command. Nothing is resumed unasked.
// ---------------------------------------------------------------------------

let bootTab = null;        // the tab boot opened itself, replaced by the saved ones
let layoutTimer = 0;

function reportLayout() {
  clearTimeout(layoutTimer);
  layoutTimer = setTimeout(() => api('POST', 'api/layout', {
    active: Math.max(0, tabs.indexOf(activeTab)),
    tabs: tabs.map((t) => ({ name: t.name, split: t.split, sessions: t.panes.map((p) => p.sessionId).filter(Boolean) })),
  }), 500);
}

// The saved tabs, once: false when there are none (or they were reopened already).
async function reopenSaved(first) {
  let answer = await (first || api('GET', 'api/layout'));
  for (let i = 0; answer.status === 200 && answer.data.restoring && i < 600; i += 1) {
    await sleep(1000);            // the restore runs before any saved tab opens
    answer = await api('GET', 'api/layout');
  }
  const saved = answer.status === 200 ? answer.data.restored : null;
  if (!saved || !Array.isArray(saved.tabs) || !saved.tabs.length) return false;
  if (store.get('reopened', null) === saved.saved_at) return false;
  store.set('reopened', saved.saved_at);
  const blank = bootTab && tabs.length === 1 && tabs[0] === bootTab ? bootTab : null;
  const opened = [];
  for (const t of saved.tabs.slice(0, MAX_TABS)) {
    if (tabs.length >= MAX_TABS) break;
    const tab = makeTab(String(t.name || '').slice(0, 100) || shellName());
    tab.split = Math.min(85, Math.max(15, Number(t.split) || 50));
    showTab(tab);
    for (const p of (t.panes || []).slice(0, 2)) {
      const pane = addPane(tab);
      if (await pane.create(p.label || tab.name, { cwd: p.cwd }) && p.resume) offerResume(pane, p);
    }
    opened.push(tab);
  }
  if (blank) closeTab(blank);
  bootTab = null;
  showTab(opened[saved.active] || opened[0]);
  saveLayout();
  toast(`Reopened ${opened.length} tab${opened.length === 1 ? '' : 's'} from before the restart.`, '');
  return opened.length > 0;
}

function offerResume(pane, saved) {
  const resume = el('button', { text: `Resume: ${saved.resume}` });
  const no = el('button', { text: 'No thanks' });
  const card = el('div', { class: 'card resume-card', 'data-card': 'resume' },
    el('div', { class: 'card-title', text: `This tab ran ${saved.agent_label || saved.agent} before the restart` }),
    el('div', { class: 'pat-row' }, resume, no));
  resume.addEventListener('click', () => {
    card.remove();
    if (pane.sessionId && !pane.exited) transport.input(pane, saved.resume + '\r');
    pane.term.focus();
  });
  no.addEventListener('click', () => { card.remove(); pane.term.focus(); });
  addCornerCard(pane, card);
}

// ---------------------------------------------------------------------------
// Search
// ---------------------------------------------------------------------------

const SEARCH_DECORATIONS = {
  matchBackground: '#806000', matchBorder: '#c09000', matchOverviewRuler: '#c09000',
  activeMatchBackground: '#d07000', activeMatchBorder: '#ffb000', activeMatchColorOverviewRuler: '#ffb000',
};

function openSearch() {
  const panel = $('#search-panel');
  panel.hidden = false;
  const input = $('#search-input');
  input.focus();
  input.select();
  if (input.value) runSearch(true);
}

function runSearch(forward, incremental) {
  const pane = activePane();
  const q = $('#search-input').value;
  if (!pane) return;
  if (!pane.search) {   // a search in the first moments: once the extras are here
    if (!extrasLoaded) loadExtras().then(() => runSearch(forward, incremental));
    return;
  }
  if (!q) { pane.search.clearDecorations(); $('#search-count').textContent = ''; return; }
  const opts = { decorations: SEARCH_DECORATIONS, incremental: !!incremental };
  const found = forward ? pane.search.findNext(q, opts) : pane.search.findPrevious(q, opts);
  if (!found) $('#search-count').textContent = 'no matches';
}

function showSearchCount({ resultIndex, resultCount }) {
  if ($('#search-panel').hidden) return;
  $('#search-count').textContent = resultCount ? `${resultIndex + 1} of ${resultCount}` : 'no matches';
}

function closeSearch() {
  $('#search-panel').hidden = true;
  $('#search-count').textContent = '';
  for (const p of allPanes()) if (p.search) p.search.clearDecorations();
  const p = activePane();
  if (p) { p.term.clearSelection(); p.term.focus(); }
}

// ---------------------------------------------------------------------------
// Voice input (Web Speech API; hidden where the browser has none)
// ---------------------------------------------------------------------------

const Recognition = window.SpeechRecognition || window.webkitSpeechRecognition;
let voice = null;

function startVoice() {
  if (!Recognition) { toast('This browser has no speech recognition.', 'error'); return; }
  if (!voiceEnabled()) { toast('Voice input is off: turn it on in the help (Ctrl+/).', 'error'); return; }
  if (voice) { stopVoice(false); return; }
  const rec = new Recognition();
  rec.continuous = true;
  rec.interimResults = true;
  rec.lang = navigator.language || 'en-US';
  voice = { rec, text: '' };
  $('#voice-text').textContent = '';
  $('#voice-panel').hidden = false;
  rec.onresult = (ev) => {
    let finalText = '', interim = '';
    for (const r of ev.results) (r.isFinal ? (finalText += r[0].transcript) : (interim += r[0].transcript));
    voice.text = finalText + interim;
    $('#voice-text').textContent = voice.text;
  };
  rec.onerror = (ev) => { toast(voiceErrorSentence(ev.error), 'error'); stopVoice(false); };
  rec.start();
}

function stopVoice(send) {
  if (!voice) return;
  const { rec, text } = voice;
  voice = null;
  try { rec.abort(); } catch (_) { /* already stopped */ }
  $('#voice-panel').hidden = true;
  const pane = activePane();
  if (send && pane && text.trim() && pane.sessionId && !pane.exited) transport.input(pane, text.trim());
  if (pane) pane.term.focus();
}

// ---------------------------------------------------------------------------
// Uploads: paste or drop a file, type its path into the active pane
// ---------------------------------------------------------------------------

async function upload(file) {
  const pane = activePane();
  const form = new FormData();
  form.append('file', file, file.name || 'pasted.png');
  const { status, data } = await api('POST', 'api/upload', form);
  if (status === 200 && data.path) {
    if (pane && pane.sessionId && !pane.exited) transport.input(pane, data.path + ' ');
    toast(`Uploaded ${data.path}`, 'ok');
  } else if (status === 413) {
    toast(`${file.name || 'That file'} is too large to upload. ${data.error || ''}`, 'error');
  } else {
    toast('Upload failed: ' + (data.error || `HTTP ${status}`), 'error');
  }
  if (pane) pane.term.focus();
}

function filesOf(transfer, imagesOnly) {
  const files = [];
  for (const item of transfer ? transfer.items || [] : []) {
    if (item.kind !== 'file') continue;
    if (imagesOnly && !item.type.startsWith('image/')) continue;
    const f = item.getAsFile();
    if (f) files.push(f);
  }
  return files;
}

function wireUploads() {
  // Capture phase: see an image paste before xterm turns it into text.
  document.addEventListener('paste', (ev) => {
    const files = filesOf(ev.clipboardData, true);
    if (!files.length) return;
    ev.preventDefault();
    ev.stopPropagation();
    for (const f of files) upload(f);
  }, true);
  let depth = 0;
  const hint = $('#drop-hint');
  document.addEventListener('dragenter', (ev) => {
    if (!ev.dataTransfer || ![...ev.dataTransfer.types].includes('Files')) return;
    depth += 1;
    hint.hidden = false;
  });
  document.addEventListener('dragleave', () => { depth = Math.max(0, depth - 1); if (!depth) hint.hidden = true; });
  document.addEventListener('dragover', (ev) => { if (ev.dataTransfer) ev.preventDefault(); });
  document.addEventListener('drop', (ev) => {
    depth = 0;
    hint.hidden = true;
    const files = filesOf(ev.dataTransfer, false);
    if (!files.length) return;
    ev.preventDefault();
    for (const f of files) upload(f);
  });
}

// ---------------------------------------------------------------------------
// Keyboard shortcuts
// ---------------------------------------------------------------------------

// `mod` is Ctrl, or Cmd on macOS. Keys match event.code, so layouts and the
// macOS Option key (which changes event.key) do not get in the way.
const SHORTCUTS = [
  { keys: 'Mod+Shift+T', mod: true, shift: true, code: 'KeyT', desc: 'New tab', run: () => newTab() },
  { keys: 'Alt+Shift+T', alt: true, shift: true, code: 'KeyT', desc: 'New tab', run: () => newTab() },
  { keys: 'Alt+Shift+A', alt: true, shift: true, code: 'KeyA', desc: 'Start an agent', run: () => openLauncher() },
  { keys: 'Mod+Shift+W', mod: true, shift: true, code: 'KeyW', desc: 'Close pane (asks if a program runs in it)', run: () => closePane() },
  { keys: 'Alt+Shift+W', alt: true, shift: true, code: 'KeyW', desc: 'Close pane (asks if a program runs in it)', run: () => closePane() },
  { keys: 'Mod+Shift+[', mod: true, shift: true, code: 'BracketLeft', desc: 'Previous tab', run: () => cycleTab(-1) },
  { keys: 'Mod+Shift+]', mod: true, shift: true, code: 'BracketRight', desc: 'Next tab', run: () => cycleTab(1) },
  ...[1, 2, 3, 4, 5, 6, 7, 8, 9].map((n) => ({
    keys: `Mod+Shift+${n}`, mod: true, shift: true, code: 'Digit' + n, desc: n > 1 ? `Tab ${n}` : 'Tab 1\u20269', hidden: n > 1,
    run: () => showTab(tabs[n - 1]),
  })),
  { keys: 'Alt+Shift+D', alt: true, shift: true, code: 'KeyD', desc: 'Split pane', run: () => splitPane() },
  { keys: 'Alt+Shift+[', alt: true, shift: true, code: 'BracketLeft', desc: 'Previous pane', run: () => cyclePane(-1) },
  { keys: 'Alt+Shift+]', alt: true, shift: true, code: 'BracketRight', desc: 'Next pane', run: () => cyclePane(1) },
  { keys: 'Mod+Shift+F', mod: true, shift: true, code: 'KeyF', desc: 'Search', run: () => openSearch() },
  { keys: 'Alt+V', alt: true, code: 'KeyV', desc: 'Voice input', run: () => startVoice(), voice: true },
  { keys: 'Mod+=', mod: true, code: 'Equal', desc: 'Larger font', run: () => applyFont(prefs.font, prefs.fontSize + 1) },
  { keys: 'Mod+-', mod: true, code: 'Minus', desc: 'Smaller font', run: () => applyFont(prefs.font, prefs.fontSize - 1) },
  { keys: 'Mod+0', mod: true, code: 'Digit0', desc: 'Default font size', run: () => applyFont(prefs.font, FONT_DEFAULT) },
  { keys: 'Mod+Shift+S', mod: true, shift: true, code: 'KeyS', desc: 'Sessions', run: () => openSessions() },
  { keys: 'Mod+/', mod: true, code: 'Slash', desc: 'This help', run: () => openHelp() },
];

function modKey(ev) { return IS_MAC ? ev.metaKey : ev.ctrlKey; }

function findShortcut(ev) {
  const mod = modKey(ev);
  const other = IS_MAC ? ev.ctrlKey : ev.metaKey;
  if (other) return null;
  return SHORTCUTS.find((s) => s.code === ev.code && !!s.mod === mod && !!s.alt === ev.altKey &&
    !!s.shift === ev.shiftKey && (!s.voice || voiceEnabled())) || null;
}

// Window capture phase: runs before xterm's own key handling, so a key we
// take here never reaches the shell.
function onKeyDown(ev) {
  const take = (action) => { ev.preventDefault(); ev.stopPropagation(); action(); };
  if (ev.key === 'Escape') {
    if (voice) return take(() => stopVoice(false));
    if (modalOpen()) return take(closeModal);
  }
  if (voice && ev.key === 'Enter') return take(() => stopVoice(true));
  const s = findShortcut(ev);
  if (s) take(s.run);
}

// Inside a terminal: shortcuts are ours, Ctrl+C copies only with a selection,
// Ctrl+Shift+C/V copy and paste. Returning false keeps xterm from sending it.
function terminalKey(pane, ev) {
  if (ev.type !== 'keydown') return !findShortcut(ev);
  if (findShortcut(ev)) return false;
  const ctrlOnly = ev.ctrlKey && !ev.altKey && !ev.metaKey;
  if (ctrlOnly && ev.code === 'KeyC' && (ev.shiftKey || pane.term.hasSelection())) {
    const text = pane.term.getSelection();
    if (text && navigator.clipboard) navigator.clipboard.writeText(text).catch(() => toast('Copy was not allowed.', 'error'));
    if (!ev.shiftKey) pane.term.clearSelection();
    ev.preventDefault();
    return false;
  }
  // Ctrl+Shift+V: let the browser raise its native paste event, which xterm
  // (or the image upload) takes; xterm must not send ^V.
  if (ctrlOnly && ev.shiftKey && ev.code === 'KeyV') return false;
  return true;
}

function openHelp() {
  const body = $('#help-table tbody');
  body.textContent = '';
  const mod = IS_MAC ? 'Cmd' : 'Ctrl';
  const rows = SHORTCUTS.filter((s) => !s.hidden && (!s.voice || voiceEnabled())).map((s) => [s.keys.replace('Mod', mod).replace(`${mod}+Shift+1`, `${mod}+Shift+1\u20269`), s.desc]);
  rows.push(['Ctrl+C', 'Copy when text is selected, else interrupt'], ['Ctrl+Shift+C / V', 'Copy / paste']);
  for (const [k, d] of rows) body.append(el('tr', {}, el('td', {}, el('kbd', { text: k })), el('td', { text: d })));
  openModal('#help-modal');
}

// ---------------------------------------------------------------------------
// Workbench: the launcher (agents from the server's table, a project folder)
// ---------------------------------------------------------------------------

let agentsCache = null;   // the last /api/agents answer
async function fetchAgents() {
  const { status, data } = await api('GET', 'api/agents');
  if (status === 200 && Array.isArray(data.agents)) agentsCache = data;
  return agentsCache;
}

// An agent starts when it is installed and switched on; without a token it
// may still sign itself in, so it starts with its reason shown.
function startable(agent) { return agent.installed && agent.enabled; }

async function openLauncher() {
  openModal('#launcher-modal');
  const [agents, projects] = await Promise.all([fetchAgents(), api('GET', 'api/projects')]);
  const select = $('#launcher-project');
  const chosen = select.value;
  select.textContent = '';
  select.append(el('option', { value: '', text: '~/projects' }));
  for (const name of (projects.status === 200 && projects.data.projects) || []) {
    select.append(el('option', { value: name, text: '~/projects/' + name }));
  }
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
  const list = $('#launcher-list');
  list.textContent = '';
  for (const agent of (agents && agents.agents) || []) {
    const id = 'agent-state-' + agent.name;
    const state = agent.ready ? 'Ready' + (agent.model ? ' \u00b7 ' + agent.model : '')
      : `Not ready: ${agent.reason}. ${agent.action || ''}`;
    const why = agent.ready && agent.model_why ? ` (${agent.model_why})` : '';  // which model, and why that one
    const start = el('button', { class: 'launch', text: agent.label, 'data-agent': agent.name, 'aria-describedby': id,
      onclick: () => launch(agent) });
    start.disabled = !startable(agent);
    list.append(el('li', { class: 'launcher-entry ' + (agent.ready ? 'ready' : 'not-ready') }, start,
      el('span', { id, class: 'launcher-state', text: state + why })));
  }
  const first = list.querySelector('button:not(:disabled)');
  if (first) first.focus();
}

async function launch(agent) {
  const project = $('#launcher-project').value;
  closeModal();
  await newTab(null, undefined, { agent: agent.name, project, label: agent.label + (project ? ' \u00b7 ' + project : '') });
}

// ---------------------------------------------------------------------------
// Workbench: the first pane greets (what CoDA is, ready agents, next step)
// ---------------------------------------------------------------------------

async function showWelcome(pane) {
  if (store.get('welcomeDismissed', false)) return;
  const [agents, app] = await Promise.all([fetchAgents(), api('GET', 'api/app-state')]);
  if (!agents || !pane.el.isConnected) return;
  const ready = agents.agents.filter((a) => a.ready && a.name !== 'shell');
  const missing = agents.agents.filter((a) => (agents.install_offer || []).includes(a.name));
  const card = el('section', { class: 'card welcome-card', 'data-card': 'welcome', 'aria-labelledby': 'welcome-title' });
  const hide = el('button', { class: 'icon', text: '\u2715', title: 'Hide', 'aria-label': 'Hide the welcome' });
  hide.addEventListener('click', () => { store.set('welcomeDismissed', true); card.remove(); pane.term.focus(); });
  card.append(el('div', { class: 'card-title' }, el('span', { id: 'welcome-title', text: 'Welcome to CoDA' }), hide),
    el('p', { text: 'Coding agents in real terminals in your browser: each tab is a shell on this machine ' +
      'that keeps running when the page closes.' }));
  const readyLine = el('p', { class: 'welcome-ready' }, ready.length ? 'Ready: ' : 'No agent is ready yet.');
  for (const a of ready) readyLine.append(el('button', { text: a.label, onclick: () => launch(a) }), ' ');
  card.append(readyLine);
  if (missing.length) {
    const install = el('button', { id: 'install-agents', text: 'Install them into ~/.local' });
    install.addEventListener('click', async () => {
      install.disabled = true;
      const { status, data } = await api('POST', 'api/setup/install-agents', {});
      if (status !== 200) { install.disabled = false; toast(data.error || 'The install did not start.', 'error'); return; }
      install.textContent = 'Installing\u2026 (progress in the setup card)';
      watchSetup();
    });
    card.append(el('p', { class: 'welcome-missing' },
      `This machine lacks ${missing.map((a) => a.label).join(', ')}. `, install));
  }
  const launcher = el('button', { text: 'Start an agent\u2026', onclick: openLauncher });
  let next;
  if (app.status === 200 && app.data.workspace_host && !app.data.pat_configured) {
    next = el('p', { text: 'Next: paste a Databricks token (in the token card, or from the status bar\u2019s details), ' +
      'so the agents can reach the models.' });
  } else if (ready.length) {
    next = el('p', {}, 'Next: type ', el('code', { text: ready[0].name }), ' in this shell, or ', launcher, ' (Alt+Shift+A).');
  } else {
    next = el('p', {}, missing.length ? 'Next: install them, or see what each agent needs: ' : 'Next: see what each agent needs: ',
      launcher, ' (Alt+Shift+A).');
  }
  card.append(next);
  addCornerCard(pane, card);
}

// ---------------------------------------------------------------------------
// Workbench: the status bar (user, token, gateway, setup, sessions, transport)
// ---------------------------------------------------------------------------

const statusBar = {
  app: null, pat: null, setup: null, sessions: null, rtt: null,

  async refresh() {
    const [app, pat, setup, sessions] = await Promise.all([api('GET', 'api/app-state'), api('GET', 'api/pat-status'),
      api('GET', 'api/setup-status'), listSessions()]);
    if (app.status === 200) this.app = app.data;
    if (pat.status === 200) this.pat = pat.data;
    if (setup.status === 200) this.setup = setup.data;
    if (sessions) this.sessions = sessions;
    if (this.app) applyVoiceSetting(this.app.apps_mode);
    this.render();
  },

  // One small request, timed: the round trip the page sees over HTTP.
  async measure() {
    const started = performance.now();
    const { status } = await api('GET', 'api/version');
    if (status === 200) this.rtt = Math.round(performance.now() - started);
    this.render();
  },

  fields() {
    const now = Date.now() / 1000;
    const app = this.app || {}, pat = this.pat || {};
    const user = pat.user || app.owner || (app.apps_mode ? 'owner unknown' : 'local user');
    let token = app.workspace_host ? 'no token' : 'no workspace';
    if (pat.configured) {
      token = pat.valid === false ? 'token invalid' : (pat.expires_at ? `token ${since(pat.expires_at - now)} left` : 'token set');
      token += app.last_rotation ? ` \u00b7 rotated ${since(now - epochSeconds(app.last_rotation))} ago` : ' \u00b7 not rotated yet';
    }
    const origin = app.gateway && app.gateway.origin;
    const gateway = origin ? 'gateway ' + origin.replace(/^https?:\/\//, '') : 'no gateway';
    const setup = 'setup ' + (this.setup ? (STATE_WORDS[this.setup.status] || this.setup.status) : '\u2026');
    const live = (this.sessions || []).filter((s) => !s.exited).length;
    const sessions = `${live}/${app.max_sessions || '?'} sessions`;
    const mode = { ws: 'WebSocket', poll: 'HTTP polling', connecting: 'connecting', auth: 'signed out' }[transport.mode] || transport.mode;
    const transportText = mode + (this.rtt !== null ? ` \u00b7 ${this.rtt} ms` : '');
    return { user, token, gateway, setup, sessions, transport: transportText };
  },

  render() {
    const f = this.fields();
    for (const key of Object.keys(f)) $('#st-' + key).textContent = f[key];
    const problem = (this.pat && this.pat.error) || (this.setup && this.setup.status === 'failed');
    $('#statusbar').classList.toggle('warn', !!problem);
    if (!$('#status-modal').hidden) this.renderDetails();
  },

  renderDetails() {
    const f = this.fields(), app = this.app || {}, pat = this.pat || {};
    const rows = [
      ['Signed in', f.user],
      ['Token', f.token + (pat.expires_at ? ` (until ${new Date(pat.expires_at * 1000).toLocaleTimeString()})` : '')],
      ['Workspace', app.workspace_host || 'none (DATABRICKS_HOST is not set)'],
      ['Gateway', (app.gateway && app.gateway.origin ? app.gateway.origin + ' \u2014 ' : '') + ((app.gateway && app.gateway.reason) || '')],
      ['Setup', f.setup.replace(/^setup /, '') + (this.setup ? ` (${this.setup.steps.filter((s) => s.status === 'failed').length} failed)` : '')],
      ['Sessions', f.sessions],
      ['Transport', f.transport + ' (round trip of a small request)'],
    ];
    if (pat.error) rows.push(['Problem', pat.error]);
    const body = $('#status-table tbody');
    body.textContent = '';
    for (const [k, v] of rows) body.append(el('tr', {}, el('th', { text: k, scope: 'row' }), el('td', { text: v })));
    const canReplace = !!app.workspace_host;
    $('#replace-token').hidden = !canReplace;
    if (!canReplace) $('#replace-token-message').textContent = 'No Databricks workspace is configured, so there is no token to replace.';
  },

  async open() {
    openModal('#status-modal');
    $('#replace-token-message').textContent = '';
    this.renderDetails();
    $('#status-modal .modal-close').focus();
    await this.refresh();
  },

  async replaceToken(ev) {
    ev.preventDefault();
    const input = $('#replace-token-input'), message = $('#replace-token-message');
    const token = input.value.trim();
    if (!token) { message.textContent = 'Paste the new token first.'; return; }
    message.className = 'replace-message';
    message.textContent = 'Checking\u2026';
    const { status, data } = await api('POST', 'api/configure-pat', { token, replace: true });
    if (status === 200) {
      input.value = '';
      message.className = 'replace-message ok';
      message.textContent = `Token replaced: signed in as ${data.user || 'you'}.`;
      this.refresh();
    } else {
      message.className = 'replace-message error';
      message.textContent = data.error || 'That token did not work.';
    }
  },

  start() {
    $('#status-btn').addEventListener('click', () => this.open());
    $('#replace-token').addEventListener('submit', (ev) => this.replaceToken(ev));
    $('#replace-token-input').addEventListener('keydown', (ev) => ev.stopPropagation());
    this.refresh();
    this.measure();
    setInterval(() => this.refresh(), 15000);
    setInterval(() => this.measure(), 5000);
  },
};

// ---------------------------------------------------------------------------
// Workbench: closing is safe (a busy session is kept, ended, or not closed)
// ---------------------------------------------------------------------------

let pendingClose = null;   // resolves the open close question

// 'end' to close and end the sessions, 'keep' to detach them, 'cancel'. Asks
// only when a pane's session runs something other than its idle shell.
async function askBeforeClosing(panes, what) {
  const live = panes.filter((p) => p.sessionId && !p.exited);
  if (!live.length) return 'end';
  const list = await listSessions();
  const busy = (list || []).filter((s) => s.busy && !s.exited && live.some((p) => p.sessionId === s.session_id));
  if (!busy.length) return 'end';
  $('#close-title').textContent = `Close this ${what}?`;
  $('#close-text').textContent = busy.map((s) => `${s.label} is running ${s.process}` + (s.cwd ? ` in ${s.cwd}` : '') + '.').join(' ') +
    ` Keep it running to reattach it later from Sessions (${IS_MAC ? 'Cmd' : 'Ctrl'}+Shift+S), or end it.`;
  if (pendingClose) pendingClose('cancel');
  openModal('#close-modal');
  $('#close-keep').focus();
  return new Promise((resolve) => { pendingClose = resolve; });
}

function answerClose(choice) {
  const resolve = pendingClose;
  pendingClose = null;
  $('#modal-backdrop').hidden = true;
  if (resolve) resolve(choice);
  if (choice === 'cancel') { const p = activePane(); if (p) p.term.focus(); }
}

// ---------------------------------------------------------------------------
// Workbench: extra keys for touch and narrow screens
// ---------------------------------------------------------------------------

const extraKeys = {
  ctrl: false,
  alt: false,
  SEQUENCES: { esc: '\x1b', tab: '\t' },
  ARROWS: { up: 'A', down: 'B', right: 'C', left: 'D' },

  wanted() {
    return window.matchMedia('(pointer: coarse)').matches || window.innerWidth < 760;
  },

  update() {
    const show = this.wanted();
    if ($('#extra-keys').hidden === show) {
      $('#extra-keys').hidden = !show;
      for (const p of allPanes()) p.fit();
    }
  },

  // What the terminal sends next, with a latched Ctrl or Alt applied once.
  modify(data) {
    if (!this.ctrl && !this.alt) return data;
    let out = data;
    if (this.ctrl && data.length === 1) {
      const code = data.toUpperCase().charCodeAt(0);
      if (code >= 64 && code <= 95) out = String.fromCharCode(code - 64);
      else if (data === ' ') out = '\x00';
    }
    if (this.alt) out = '\x1b' + out;
    this.latch('ctrl', false);
    this.latch('alt', false);
    return out;
  },

  latch(name, on) {
    this[name] = on;
    const b = $(`#extra-keys [data-key="${name}"]`);
    b.setAttribute('aria-pressed', String(on));
    b.classList.toggle('on', on);
  },

  async press(key) {
    const pane = activePane();
    if (!pane || !pane.sessionId || pane.exited) return;
    if (key === 'ctrl' || key === 'alt') { this.latch(key, !this[key]); pane.term.focus(); return; }
    if (key === 'paste') {
      let text = '';
      try { text = await navigator.clipboard.readText(); } catch (_) {
        toast('The browser did not allow reading the clipboard: long-press the terminal and choose Paste.', 'error');
        return;
      }
      if (text) pane.term.paste(text);
      pane.term.focus();
      return;
    }
    let seq = this.SEQUENCES[key];
    if (this.ARROWS[key]) seq = (pane.term.modes.applicationCursorKeysMode ? '\x1bO' : '\x1b[') + this.ARROWS[key];
    transport.input(pane, this.modify(seq));
    pane.term.focus();
  },

  start() {
    const bar = $('#extra-keys');
    // A tap must not take the focus (and the on-screen keyboard) from the terminal.
    bar.addEventListener('pointerdown', (ev) => { if (ev.target.closest('button')) ev.preventDefault(); });
    bar.addEventListener('click', (ev) => {
      const b = ev.target.closest('button[data-key]');
      if (b) this.press(b.dataset.key);
    });
    window.addEventListener('resize', () => this.update());
    this.update();
  },
};

// ---------------------------------------------------------------------------
// Workbench: fonts that render, and voice input as a setting
// ---------------------------------------------------------------------------

// The fonts are vendored (static/lib/fonts): the chosen one's stylesheets are
// added the first time it is chosen (a page on the system font loads none),
// its files loaded before xterm measures its cells, then they are measured again.
// A font's folder is its name in lower case, words joined by '-' (as @fontsource names them).
const fontSheets = {};
function addFontSheets(name) {
  const folder = name.toLowerCase().replace(/ /g, '-');
  fontSheets[name] = fontSheets[name] || Promise.all(['400', '700'].map((weight) => new Promise((resolve) => {
    document.head.append(el('link', { rel: 'stylesheet', href: `static/lib/fonts/${folder}/latin-${weight}.css`,
      onload: resolve, onerror: resolve }));
  })));
  return fontSheets[name];
}

function loadFontThenRefit(name) {
  if (name === 'System default' || !document.fonts) return;
  const family = FONTS[name].split(',')[0];
  addFontSheets(name)
    .then(() => Promise.all([document.fonts.load(`${prefs.fontSize}px ${family}`),
      document.fonts.load(`bold ${prefs.fontSize}px ${family}`)]))
    .then(() => {
      if (prefs.font !== name) return;
      for (const pane of allPanes()) {
        pane.term.options.fontFamily = SYSTEM_MONO;   // a change of family re-measures the cells
        pane.term.options.fontFamily = FONTS[name];
        pane.fit();
      }
    })
    .catch(() => toast(`The font ${name} could not be loaded; the system font is shown.`, 'error'));
}

// Voice input: on by default locally, off by default in Databricks Apps (the
// browser's recogniser may send the audio to its vendor); the help has the switch.
let voiceDefault = true;
function voiceEnabled() { return !!Recognition && store.get('voice', voiceDefault) === true; }

function applyVoiceSetting(appsMode) {
  if (appsMode !== undefined) voiceDefault = !appsMode;
  $('#voice-btn').hidden = !voiceEnabled();
  $('#voice-setting').checked = voiceEnabled();
  $('#voice-privacy').hidden = $('#voice-setting').parentElement.hidden = !Recognition;
}

const VOICE_ERRORS = {
  'not-allowed': 'The browser was not allowed to use the microphone: allow it in the site\u2019s settings and try again.',
  'service-not-allowed': 'The browser\u2019s speech recognition service is not allowed here.',
  'no-speech': 'No speech was heard: try again, closer to the microphone.',
  'audio-capture': 'No microphone was found: connect one and try again.',
  'network': 'Speech recognition could not reach its service over the network.',
  'language-not-supported': 'Speech recognition does not support this browser\u2019s language.',
  'aborted': 'Voice input was stopped.',
};
function voiceErrorSentence(code) {
  return VOICE_ERRORS[code] || `Voice input stopped with an error (${code}).`;
}
// Usage panel: what each agent spent (GET /api/usage), opened from the help
// ---------------------------------------------------------------------------

function usageTokens(n) {
  return n >= 1e6 ? (n / 1e6).toFixed(1) + 'M' : n >= 1e4 ? Math.round(n / 1e3) + 'k' : String(n);
}

function usageText(count) {
  const cost = count.cost === null ? '' : ` \u00b7 ~$${count.cost.toFixed(count.cost < 1 ? 4 : 2)}`;
  return `${count.requests} req \u00b7 ${usageTokens(count.input_tokens)} in / ${usageTokens(count.output_tokens)} out${cost}`;
}

async function openUsage() {
  openModal('#usage-modal');
  $('#usage-workspace').hidden = true;
  const body = $('#usage-table tbody');
  const { status, data } = await api('GET', 'api/usage');
  body.textContent = '';
  if (status !== 200) { $('#usage-note').textContent = data.error || 'Usage is not available.'; return; }
  for (const a of data.agents) {
    body.append(el('tr', { 'data-agent': a.agent }, el('td', { text: a.label }),
      el('td', { text: usageText(a.total.today) }), el('td', { text: usageText(a.total.session) })));
  }
  body.append(el('tr', { class: 'total' }, el('td', { text: 'Total' }),
    el('td', { text: usageText(data.total.today) }), el('td', { text: usageText(data.total.session) })));
  $('#usage-note').textContent = data.price_error
    || `Estimated cost in ${data.currency} from ${data.prices}; today is ${data.day} UTC.`;
}

async function showWorkspaceUsage() {
  const out = $('#usage-workspace');
  out.hidden = false;
  out.textContent = 'Reading the workspace\u2019s usage table\u2026';
  const { status, data } = await api('GET', 'api/usage?source=workspace');
  if (status !== 200) out.textContent = data.error || 'The workspace\u2019s usage is not available.';
  else if (!data.readable) out.textContent = data.reason;
  else {
    out.textContent = [`${data.table}, your rows (today; last 7 days):`,
      ...data.models.map((m) => `${m.model}: ${usageText(m.today)}; ${usageText(m.week)}`),
      `Total: ${usageText(data.total.today)}; ${usageText(data.total.week)}`].join('\n');
  }
}

$('#usage-open').addEventListener('click', openUsage);
$('#usage-from-workspace').addEventListener('click', showWorkspaceUsage);

// ---------------------------------------------------------------------------
// Boot
// ---------------------------------------------------------------------------

function updateStatus() {
  document.documentElement.dataset.transport = transport.mode;
  statusBar.render();
}

function wireChrome() {
  const themeSelect = $('#theme-select');
  for (const name of Object.keys(THEMES)) themeSelect.append(el('option', { value: name, text: name }));
  themeSelect.addEventListener('change', () => applyTheme(themeSelect.value));
  const fontSelect = $('#font-select');
  for (const name of Object.keys(FONTS)) fontSelect.append(el('option', { value: name, text: name }));
  fontSelect.addEventListener('change', () => applyFont(fontSelect.value, prefs.fontSize));
  $('#mode-btn').addEventListener('click', toggleMode);
  $('#font-up').addEventListener('click', () => applyFont(prefs.font, prefs.fontSize + 1));
  $('#font-down').addEventListener('click', () => applyFont(prefs.font, prefs.fontSize - 1));
  $('#new-tab').addEventListener('click', () => newTab());
  $('#split-btn').addEventListener('click', () => splitPane());
  $('#search-btn').addEventListener('click', openSearch);
  $('#help-btn').addEventListener('click', openHelp);
  $('#sessions-badge').addEventListener('click', openSessions);
  $('#sessions-new').addEventListener('click', () => { closeModal(); newTab(); });
  $('#sessions-kill-all').addEventListener('click', killAll);
  for (const b of document.querySelectorAll('.modal-close')) b.addEventListener('click', closeModal);
  $('#modal-backdrop').addEventListener('mousedown', (ev) => { if (ev.target === ev.currentTarget) closeModal(); });
  const voiceBtn = $('#voice-btn');
  voiceBtn.hidden = !Recognition;
  voiceBtn.addEventListener('click', startVoice);
  // Workbench controls
  $('#launch-btn').addEventListener('click', openLauncher);
  $('#close-keep').addEventListener('click', () => answerClose('keep'));
  $('#close-end').addEventListener('click', () => answerClose('end'));
  $('#close-cancel').addEventListener('click', () => answerClose('cancel'));
  $('#voice-setting').addEventListener('change', (ev) => { store.set('voice', ev.target.checked); applyVoiceSetting(); openHelp(); });
  applyVoiceSetting();
  extraKeys.start();

  const input = $('#search-input');
  input.addEventListener('input', () => runSearch(true, true));
  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter') { ev.preventDefault(); runSearch(!ev.shiftKey); }
    else if (ev.key === 'Escape') { ev.preventDefault(); closeSearch(); }
    else return;
    ev.stopPropagation();
  });
  $('#search-next').addEventListener('click', () => runSearch(true));
  $('#search-prev').addEventListener('click', () => runSearch(false));
  $('#search-close').addEventListener('click', closeSearch);

  window.addEventListener('keydown', onKeyDown, true);
  wireUploads();
  notices.wire();
  files.wire();
}


// ---------------------------------------------------------------------------
// Notices (issue 13): an agent finished its turn or waits for the user, or a
// program rang the bell / sent OSC 9 or 777. The server pushes {type:'notify'}
// over the socket and in the poll answers. A pane the user is not looking at
// gets a dot on its tab and counts in the page title; with the page in the
// background, a browser notification too (asked for once; the bell button
// turns them off). Looking at the pane clears it. The text is the terminal's:
// shown as text only, never as markup.
// ---------------------------------------------------------------------------

const notices = {
  enabled: store.get('notifications', true),
  seen: new Set(),          // session:offset:kind already handled (both transports may carry one)
  unseen: new Map(),        // pane -> count not yet looked at

  looking(pane) {
    return pane === activePane() && document.visibilityState === 'visible' && document.hasFocus();
  },

  receive(msg) {
    const pane = paneBySession(msg.session_id);
    const key = `${msg.session_id}:${msg.offset}:${msg.kind}`;
    if (!pane || this.seen.has(key)) return;
    this.seen.add(key);
    if (this.seen.size > 500) this.seen = new Set([...this.seen].slice(-250));
    if (msg.kind === 'download') { files.offer(String(msg.body || '')); return; }
    if (this.looking(pane)) return;
    this.unseen.set(pane, (this.unseen.get(pane) || 0) + 1);
    this.render();
    if (document.visibilityState === 'visible' && document.hasFocus()) {
      const { title, body } = this.text(pane, msg);   // in front, on another pane: say it in the page
      toast(body ? `${title}: ${body}` : title);
      return;
    }
    this.popup(pane, msg);
  },

  text(pane, msg) {
    const where = pane.tab.name;
    const title = String(msg.title || '').slice(0, 100) || (msg.kind === 'bell' ? 'Bell' : 'Notice');
    const body = String(msg.body || '').slice(0, 300) || (msg.kind === 'bell' ? 'A program rang the bell.' : '');
    return { title: `${title} \u2014 ${where}`, body };
  },

  popup(pane, msg) {
    if (!this.enabled || !window.Notification || Notification.permission !== 'granted') return;
    const { title, body } = this.text(pane, msg);
    try {
      const n = new Notification(title, { body, tag: msg.session_id, silent: false });
      n.onclick = () => { window.focus(); showTab(pane.tab); setActivePane(pane); pane.term.focus(); n.close(); };
    } catch (_) { /* some browsers allow notifications only from a service worker */ }
  },

  look(pane) {
    if (!pane || !this.unseen.has(pane) || !this.looking(pane)) return;
    this.unseen.delete(pane);
    this.render();
  },

  forget(pane) { if (this.unseen.delete(pane)) this.render(); },

  render() {
    for (const p of [...this.unseen.keys()]) if (!p.sessionId || !allPanes().includes(p)) this.unseen.delete(p);
    let total = 0;
    for (const tab of tabs) {
      const n = tab.panes.reduce((sum, p) => sum + (this.unseen.get(p) || 0), 0);
      total += n;
      let dot = tab.tabEl.querySelector('.tab-dot');
      if (n && !dot) {
        dot = el('span', { class: 'tab-dot', role: 'img' });
        tab.tabEl.prepend(dot);
      }
      if (dot && !n) dot.remove();
      if (dot && n) dot.setAttribute('aria-label', `${n} unseen notice${n === 1 ? '' : 's'}`);
    }
    const base = document.title.replace(/^\(\d+\) /, '');
    document.title = total ? `(${total}) ${base}` : base;
  },

  // The permission is asked once, at the user's first click or key (browsers want a gesture).
  askOnce() {
    if (!window.Notification || store.get('notificationsAsked', false) || Notification.permission !== 'default') return;
    store.set('notificationsAsked', true);
    try { Notification.requestPermission().then(() => this.renderButton()); } catch (_) { /* old API */ }
  },

  toggle() {
    this.enabled = !this.enabled;
    store.set('notifications', this.enabled);
    if (this.enabled && window.Notification && Notification.permission === 'default') {
      Notification.requestPermission().then(() => this.renderButton());
    }
    this.renderButton();
  },

  renderButton() {
    const btn = $('#notify-btn');
    if (!btn) return;
    const blocked = window.Notification && Notification.permission === 'denied';
    btn.setAttribute('aria-pressed', String(this.enabled));
    btn.classList.toggle('off', !this.enabled);
    btn.title = !this.enabled ? 'Notifications are off: click to turn them on'
      : blocked ? 'Notifications are blocked by the browser: allow them in its site settings'
      : 'Notifications are on: click to turn them off';
  },

  wire() {
    const btn = $('#notify-btn');
    if (btn) btn.addEventListener('click', () => this.toggle());
    this.renderButton();
    const first = () => this.askOnce();
    window.addEventListener('pointerdown', first, { once: true, capture: true });
    window.addEventListener('keydown', first, { once: true, capture: true });
    const lookNow = () => this.look(activePane());
    document.addEventListener('visibilitychange', lookNow);
    window.addEventListener('focus', lookNow);
  },
};


// ---------------------------------------------------------------------------
// Files (issue 13): list ~/projects and ~/uploads and download from them. The
// server confines every path to those roots; here a path is only ever built
// from names it listed, and names are shown as text.
// ---------------------------------------------------------------------------

const files = {
  path: '',

  async open(path) {
    openModal('#files-modal');
    await this.show(path === undefined ? this.path : path);
  },

  async show(path) {
    // Not api(): its 403 means the login expired, here it means a path outside the roots.
    let status = 0, data = {};
    try {
      const resp = await fetch('api/files?path=' + encodeURIComponent(path), { credentials: 'same-origin' });
      status = resp.status;
      data = await resp.json();
    } catch (_) { data = { error: 'CoDA is not reachable.' }; }
    const note = $('#files-note');
    if (status !== 200) {
      if (path) await this.show('');
      note.hidden = false;
      note.textContent = (data && data.error) || 'The folder could not be listed.';
      return;
    }
    this.path = data.path;
    note.hidden = !data.truncated;
    note.textContent = data.truncated ? 'Only the first entries of this folder are shown.' : '';
    this.renderPath(data.path);
    const body = $('#files-table tbody');
    body.textContent = '';
    for (const entry of data.entries) {
      const full = data.path ? `${data.path}/${entry.name}` : entry.name;
      let link;
      if (entry.type === 'dir') {
        link = el('button', { class: 'folder', text: entry.name + '/', onclick: () => this.show(full) });
      } else if (entry.type === 'file') {
        link = el('a', { href: 'api/download?path=' + encodeURIComponent(full), download: entry.name,
          text: entry.name, title: `Download ${entry.name}` });
      } else {
        link = el('span', { text: entry.name, title: 'Not a regular file' });
      }
      const when = entry.mtime ? new Date(entry.mtime * 1000).toLocaleString() : '';
      body.append(el('tr', {}, el('td', {}, link),
        el('td', { text: entry.type === 'file' ? this.size(entry.size) : '' }), el('td', { text: when })));
    }
    const first = body.querySelector('a, button');
    if (first) first.focus();
  },

  renderPath(path) {
    const nav = $('#files-path');
    nav.textContent = '';
    nav.append(el('button', { text: '~', title: 'Home: the folders offered', onclick: () => this.show('') }));
    const parts = path ? path.split('/') : [];
    parts.forEach((part, i) => {
      const to = parts.slice(0, i + 1).join('/');
      nav.append(el('span', { text: '/', 'aria-hidden': 'true' }), el('button', { text: part, onclick: () => this.show(to) }));
    });
  },

  // `coda.py download FILE` in a terminal: a link to click, never a download by itself, so terminal
  // output can at most offer a file under the roots (and /api/download checks it again).
  offer(path) {
    const name = path.split('/').pop();
    if (!name) return;
    const card = el('div', { class: 'toast download-offer', role: 'status' });
    const link = el('a', { href: 'api/download?path=' + encodeURIComponent(path), download: name,
      text: `Download ${name}`, title: `~/${path}`, onclick: () => setTimeout(() => card.remove(), 0) });
    card.append(link, el('button', { class: 'icon', 'aria-label': 'Dismiss', text: '\u2715', onclick: () => card.remove() }));
    $('#toasts').append(card);
    setTimeout(() => card.remove(), 60000);
  },

  size(n) {
    if (n >= 1024 * 1024) return (n / 1024 / 1024).toFixed(1) + ' MiB';
    if (n >= 1024) return (n / 1024).toFixed(1) + ' KiB';
    return n + ' B';
  },

  wire() {
    const btn = $('#files-btn');
    if (btn) btn.addEventListener('click', () => this.open());
  },
};

// A read-only view for tests and debugging; changes nothing.
function exposeDebug() {
  const text = (pane) => {
    const buf = pane.term.buffer.active;
    const lines = [];
    for (let i = 0; i < buf.length; i += 1) lines.push(buf.getLine(i).translateToString(true));
    return lines.join('\n');
  };
  window.coda = Object.freeze({
    get transport() { return transport.mode; },
    get tabs() { return tabs.map((t) => ({ name: t.name, sessions: t.panes.map((p) => p.sessionId) })); },
    paneText: (tabIndex, paneIndex) => text(tabs[tabIndex].panes[paneIndex || 0]),
    activeText: () => { const p = activePane(); return p ? text(p) : ''; },
    selection: () => { const p = activePane(); return p ? p.term.getSelection() : ''; },
    scroll: () => { const b = activePane().term.buffer.active; return { top: b.viewportY, bottom: b.baseY, length: b.length }; },
    offsets: () => allPanes().map((p) => ({ session: p.sessionId, offset: p.offset, rendered: p.rendered })),
  });
}

async function boot() {
  wireChrome();
  applyTheme(prefs.theme);
  applyFont(prefs.font, prefs.fontSize);
  exposeDebug();
  transport.start();  // early.js's socket, whose handshake came beside the first questions
  const early = window.codaEarly;
  const layout = api('GET', 'api/layout', undefined, early.layout);  // reopenSaved reads it
  const [version, live, wasm] = await Promise.all([api('GET', 'api/version', undefined, early.version),
    listSessions(early.sessions), checkWasmAllowed(early.page)]);
  wasmAllowed = wasm;
  if (version.status === 200) serverVersion = version.data.version || '';
  if (transport.mode === 'auth') return;
  let welcome = null;
  if (!(await restoreLayout(live || [])) && !(await reopenSaved(layout))) {
    bootTab = await newTab();
    welcome = firstPane();
  }
  closeUnused(takeEarlySession());  // the saved work was reopened instead
  afterFirstOutput(() => {
    loadExtras();
    if (welcome) showWelcome(welcome);
    statusBar.start();
    refreshBadge();
    watchSetup();
    watchToken();
    noteThirdPartyMcp();
  });
  // Keep sessions from the idle reaper while the page is open, and the
  // badge honest about sessions started elsewhere.
  setInterval(() => transport.heartbeat(), 30000);
  setInterval(() => refreshBadge(), 15000);
  window.addEventListener('resize', () => { if (activeTab) for (const p of activeTab.panes) p.fit(); });
}

boot();

})();
