// CoDA: the first questions the page asks, sent while its stylesheets and
// scripts still load (app.js's boot() reads the answers through api()), and
// the WebSocket, whose handshake happens meanwhile (app.js's transport takes
// it over, with any message it has had by then).
'use strict';
window.codaEarly = Object.freeze({
  version: fetch('api/version', { credentials: 'same-origin' }),
  sessions: fetch('api/sessions', { credentials: 'same-origin' }),
  layout: fetch('api/layout', { credentials: 'same-origin' }),
  page: fetch(location.pathname, { method: 'HEAD', credentials: 'same-origin' }),
  socket: (() => {
    try {
      const url = new URL('ws', location.href);
      url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const ws = new WebSocket(url.href);
      ws.binaryType = 'arraybuffer';
      const heard = [];
      ws.onmessage = (ev) => heard.push(ev);
      return { ws, heard };
    } catch (_) {
      return null;   // transport.connect() opens its own
    }
  })(),
});
