// CoDA: the first questions the page asks, sent while its stylesheets and
// scripts still load (app.js's boot() reads the answers through api()).
'use strict';
window.codaEarly = Object.freeze({
  version: fetch('api/version', { credentials: 'same-origin' }),
  sessions: fetch('api/sessions', { credentials: 'same-origin' }),
  layout: fetch('api/layout', { credentials: 'same-origin' }),
  page: fetch(location.pathname, { method: 'HEAD', credentials: 'same-origin' }),
});
