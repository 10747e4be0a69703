// CoDA long-poll fallback, run in a Web Worker so that a background tab,
// whose timers the browser throttles, still fetches output promptly.
//
// The page tells us which sessions to follow and from which byte offset;
// we long-poll /api/output-batch and post each answer back. After each
// answer we wait for the page's "next", which it sends once xterm has caught
// up enough: that is the poller's flow control.
//
// Messages in:  {type:'start', since:{id:offset}}  follow exactly these
//               {type:'add', session_id, since}    follow one more
//               {type:'remove', session_id}        stop following one
//               {type:'next'}                      ready for the next answer
//               {type:'stop'}                      stop polling
// Messages out: {type:'outputs', outputs, shutting_down}
//               each output carries `bytes` (a Uint8Array) instead of the
//               server's base64 `output`: the exact PTY bytes from `offset`
//               {type:'status', status, failures}  a failed poll (status 0: no answer)
'use strict';

const WAIT_SECONDS = 25;         // the server caps `wait` at 30
let since = {};                  // session id -> next offset to ask for
let running = false;
let mayFetch = true;             // the page has taken our last answer
let controller = null;           // aborts the request in flight
let wake = null;                 // resolves a pause early
let generation = 0;              // bumps on every change of the session set
let loopId = 0;                  // one loop at a time, even after stop + start

self.onmessage = (ev) => {
  const msg = ev.data || {};
  switch (msg.type) {
    case 'start':
      since = Object.assign({}, msg.since);
      mayFetch = true;
      running = true;
      loopId += 1;
      restart();
      loop(loopId);
      break;
    case 'add':
      since[msg.session_id] = msg.since;
      restart();
      break;
    case 'remove':
      delete since[msg.session_id];
      restart();
      break;
    case 'next':
      mayFetch = true;
      poke();
      break;
    case 'stop':
      running = false;
      loopId += 1;
      restart();
      break;
    default:
      break;
  }
};

// A changed session set must not wait for a long-poll that ignores it.
function restart() {
  generation += 1;
  if (controller) controller.abort();
  poke();
}

function poke() {
  if (wake) { const w = wake; wake = null; w(); }
}

function pause(ms) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => { wake = null; resolve(); }, ms);
    wake = () => { clearTimeout(timer); resolve(); };
  });
}

async function loop(id) {
  let failures = 0;
  const current = () => running && id === loopId;
  while (current()) {
    const ids = Object.keys(since);
    if (!ids.length || !mayFetch) { await pause(30000); continue; }
    const gen = generation;
    controller = new AbortController();
    let resp = null;
    try {
      resp = await fetch('../api/output-batch', {
        method: 'POST',
        credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json' },
        // base64: JSON text cannot carry bytes that are not UTF-8, and the
        // page writes exact bytes, so offsets stay the server's.
        body: JSON.stringify({ session_ids: ids, since, wait: WAIT_SECONDS, encoding: 'base64' }),
        signal: controller.signal,
      });
    } catch (_) {
      resp = null;    // aborted or network down
    }
    controller = null;
    if (!current()) break;
    if (gen !== generation) continue;   // the set changed meanwhile: ask again
    if (!resp || !resp.ok) {
      failures += 1;
      self.postMessage({ type: 'status', status: resp ? resp.status : 0, failures });
      if (resp && resp.status === 403) { running = false; break; }   // the page shows the banner
      // Back off, with jitter, up to 10 s; a change of sessions retries early.
      await pause(Math.min(10000, 250 * 2 ** failures) * (0.5 + Math.random()));
      continue;
    }
    failures = 0;
    let data;
    try { data = await resp.json(); } catch (_) { continue; }
    if (gen !== generation || !current()) continue;
    const outputs = {};            // the answers for sessions we still follow
    const buffers = [];
    let any = false;
    for (const [id, out] of Object.entries(data.outputs || {})) {
      if (!(id in since)) continue;
      outputs[id] = out;
      out.bytes = fromBase64(out.output || '');
      delete out.output;
      buffers.push(out.bytes.buffer);
      // An exited session is done once its last bytes have arrived.
      if (out.error || (out.exited && !out.bytes.length)) delete since[id];
      else if (typeof out.next_offset === 'number') since[id] = out.next_offset;
      if (out.bytes.length || out.error || out.exited) any = true;
    }
    if (any || data.shutting_down) {
      mayFetch = false;
      self.postMessage({ type: 'outputs', outputs, shutting_down: !!data.shutting_down }, buffers);
    }
    // While the server shuts down, do not spin on instant answers.
    if (data.shutting_down) await pause(1000);
  }
}

function fromBase64(text) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
  const binary = atob(text);   // browsers older than Uint8Array.fromBase64
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
