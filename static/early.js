// CoDA: what the page does while its stylesheets and scripts still load. It asks
// the first questions (app.js's boot() reads the answers through api()), opens
// the WebSocket (app.js's transport takes it over, with any message it has had
// by then), and, when this browser has no tabs to rejoin, asks for the session
// of the tab boot() will open and joins it, so the shell starts meanwhile. It
// also holds the three helpers that this needs and app.js shares.
'use strict';
(() => {
  // localStorage may be unavailable (private modes, quotas): never let that
  // break the terminal, just forget.
  const store = {
    get(key, fallback) {
      try {
        const raw = localStorage.getItem('coda.' + key);
        return raw === null ? fallback : JSON.parse(raw);
      } catch (_) { return fallback; }
    },
    set(key, value) {
      try { localStorage.setItem('coda.' + key, JSON.stringify(value)); } catch (_) { /* forget */ }
    },
  };

  // The size the last terminal was fitted to (in this browser), 80x24 at first.
  function lastSize() {
    const size = store.get('size', null);
    const ok = (n, most) => Number.isInteger(n) && n >= 1 && n <= most;
    return size && ok(size.cols, 1000) && ok(size.rows, 1000) ? size : { cols: 80, rows: 24 };
  }

  // Whether this browser's saved layout (app.js's saveLayout()) names no session to
  // rejoin: boot() then opens a new tab, unless work saved before a restart is
  // reopened instead (boot() closes the session unused then).
  function nothingToRejoin() {
    const saved = store.get('layout', null);
    const tabs = saved && Array.isArray(saved.tabs) ? saved.tabs : [];
    return !tabs.some((t) => t && Array.isArray(t.sessions) && t.sessions.some(Boolean));
  }

  const ask = (path, init) => fetch(path, { credentials: 'same-origin', ...init });

  // The page's WebSocket address: /ws beside the page, ws: or wss: as the page came.
  function socketUrl() {
    const url = new URL('ws', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return url.href;
  }

  function openSocket() {
    try {
      const ws = new WebSocket(socketUrl());
      ws.binaryType = 'arraybuffer';
      const socket = { ws, heard: [], joined: null, taken: false };
      ws.onmessage = (ev) => socket.heard.push(ev);
      return socket;
    } catch (_) {
      return null;   // transport.connect() opens its own
    }
  }

  // Joins a session once the socket is open, unless transport has taken the socket
  // by then (newTab() joins it instead).
  function joinWhenOpen(socket, sessionId) {
    const join = () => {
      if (socket.taken || socket.ws.readyState !== WebSocket.OPEN) return;
      socket.ws.send(JSON.stringify({ type: 'join_session', session_id: sessionId, since: 0 }));
      socket.joined = sessionId;
    };
    if (socket.ws.readyState === WebSocket.OPEN) join();
    else socket.ws.addEventListener('open', join, { once: true });
  }

  // The first tab's session: { size, answer (a fetch) }. Its label is the one
  // shellName() gives a first tab.
  function startSession(socket) {
    const size = lastSize();
    const answer = ask('api/session', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ label: 'Shell 1', cols: size.cols, rows: size.rows }),
    });
    answer.then((r) => (r.ok ? r.clone().json() : null)).catch(() => null)   // a copy: api() reads the answer
      .then((made) => { if (socket && made && made.session_id) joinWhenOpen(socket, made.session_id); });
    return { size, answer };
  }

  const socket = openSocket();
  window.codaEarly = Object.freeze({
    version: ask('api/version'),
    sessions: ask('api/sessions'),
    layout: ask('api/layout'),
    page: ask(location.pathname, { method: 'HEAD' }),
    socket,
    session: nothingToRejoin() ? startSession(socket) : null,
    store,
    lastSize,
    socketUrl,
  });
})();
