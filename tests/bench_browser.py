"""Browser figures: what the real page renders, and how fast a keystroke echoes during a flood.

Run: `.venv/bin/python tests/bench_browser.py [--mib 32] [--keys-every 0.05]`

Starts the real coda.py (127.0.0.1, a temporary HOME, CODA_INSTALL=0), opens the
page in Debian's headless Chromium and `cat`s a file of `--mib` MiB in one pane,
with the page's flow control on (it acks as xterm renders). While the flood runs
it types a capital Z every `--keys-every` seconds; the terminal's line discipline
echoes each one into the same output stream, behind whatever is still queued.

Both clocks are the page's own: an init script wraps `Terminal.prototype.write`
(the vendored xterm.js, nothing in CoDA's code) so that a write's callback,
which xterm calls once it has parsed that data, stamps when bytes were
rendered; a keydown listener stamps when each Z was typed.

Before the flood it loads the page --loads times in fresh browser contexts (a
new session each; "cold": nothing cached) and --loads times more in one context
("warm": each a new page after one load, so the files come from the HTTP cache
after a 304 and xterm.js's compiled code is cached), and times navigation start
(the page's performance.now() 0) to the first animation frame at which the
shell's prompt is in the terminal: the WebSocket joined and the prompt drawn.
Page loads vary by tens of ms from run to run on a small machine: --versus DIR
starts a second server from another checkout and alternates the loads between
the two, so that both see the same machine.

Prints JSON lines:
  {"metric": "browser_page_load_ms", ...}     median / p25 / p75 of navigation start -> prompt drawn,
                                              per cache state (and per checkout with --versus)
  {"metric": "browser_render_mb_s", ...}      MB/s (10^6 bytes) from Enter to the last byte rendered
  {"metric": "browser_echo_latency_ms", ...}  p50 / p99 / max of keydown -> echoed Z rendered
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402
from conftest import Coda  # noqa: E402  (the same server helper the tests use)
from playwright.sync_api import sync_playwright  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

# Wraps xterm's write once xterm.js defines window.Terminal. Counts rendered
# bytes and echoed Zs only while armed, so the command line itself is not counted.
PROBE = """
(() => {
  const probe = window.__bench = { armed: false, bytes: 0, target: 0, start: 0, end: 0, typed: [], echoed: [] };
  let Real;
  Object.defineProperty(window, 'Terminal', {
    configurable: true,
    get() { return Real; },
    set(T) {
      Real = T;
      const write = T.prototype.write;
      T.prototype.write = function (data, callback) {
        return write.call(this, data, () => {
          if (probe.armed && data instanceof Uint8Array) {
            const now = performance.now();
            probe.bytes += data.length;
            for (let i = data.indexOf(0x5a); i !== -1; i = data.indexOf(0x5a, i + 1)) probe.echoed.push(now);
            if (!probe.end && probe.target && probe.bytes >= probe.target) probe.end = now;
          }
          if (callback) callback();
        });
      };
    },
  });
  window.addEventListener('keydown', (e) => {
    if (!probe.armed) return;
    if (e.key === 'Enter' && !probe.start) probe.start = performance.now();
    if (e.key === 'Z') probe.typed.push(performance.now());
  }, true);
})();
"""


# Stamps the first animation frame at which the active pane shows the prompt (user@host).
PROMPT_PROBE = """
(() => {
  const check = () => {
    if (window.coda && window.coda.tabs.length && window.coda.activeText().includes('@')) {
      window.__promptAt = performance.now();
      return;
    }
    requestAnimationFrame(check);
  };
  requestAnimationFrame(check);
})();
"""


def page_loads(browser, servers, renderer, n):
    """{(server, "cold" or "warm"): [ms from navigation start to the prompt drawn]}, n each,
    the servers' loads alternating; a first round (warming the servers and the warm contexts)
    is not counted."""
    def context():
        made = browser.new_context(viewport={"width": 1200, "height": 720})
        made.add_init_script(PROMPT_PROBE)
        made.add_init_script(f"localStorage.setItem('coda.renderer', JSON.stringify('{renderer}'))")
        return made

    warm = {server: context() for server in servers}
    times = {(server, cache): [] for server in servers for cache in ("cold", "warm")}
    for round_ in range(n + 1):
        for server in servers:
            for cache in ("cold", "warm"):
                made = warm[server] if cache == "warm" else context()
                page = made.new_page()
                page.goto(f"{server.url}/?token={server.token}")
                wait(page, "window.__promptAt", 20, "the first prompt")
                if round_:
                    times[server, cache].append(page.evaluate("window.__promptAt"))
                page.close()
                if made is not warm[server]:
                    made.close()
                for session in server.get("/api/sessions").json():
                    server.close_session(session["session_id"])
    for made in warm.values():
        made.close()
    return times


def make_flood(path, mib):
    """mib MiB of 64-byte lines without a capital Z; returns (bytes, lines)."""
    alphabet = "abcdefghijklmnopqrstuvwxy0123456789"
    line = (alphabet * 2)[:63] + "\n"
    lines = mib * 1024 * 1024 // len(line)
    with open(path, "w") as f:
        for _ in range(lines // 1024):
            f.write(line * 1024)
    return (lines // 1024) * 1024 * len(line), (lines // 1024) * 1024


def wait(page, script, timeout, what):
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_browser: timed out waiting for {what}")
        time.sleep(0.02)


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--keys-every", type=float, default=0.05)
    parser.add_argument("--renderer", choices=["webgl", "webgl-always", "dom"], default="webgl",
                        help="xterm renderer (the page's own setting, coda.renderer in localStorage)")
    parser.add_argument("--flow-high", type=int, default=None, help="CODA_FLOW_HIGH for the server (bytes)")
    parser.add_argument("--flow-low", type=int, default=None, help="CODA_FLOW_LOW for the server (bytes)")
    parser.add_argument("--loads", type=int, default=5, help="page loads timed before the flood (0: none)")
    parser.add_argument("--coda-dir", type=Path, default=None,
                        help="a checkout whose coda.py and static/ to measure (default: this one)")
    parser.add_argument("--versus", type=Path, default=None,
                        help="another checkout whose page loads alternate with these (the flood runs on this one)")
    parser.add_argument("--chromium-flag", action="append", default=[],
                        help="one more Chromium flag, e.g. --disable-features=DeferRendererTasksAfterInput")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="coda-bench-"))
    flood = home / "flood.txt"
    size, lines = make_flood(flood, args.mib)
    env = {}
    if args.flow_high:
        env["CODA_FLOW_HIGH"] = str(args.flow_high)
    if args.flow_low:
        env["CODA_FLOW_LOW"] = str(args.flow_low)
    other = None
    if args.versus and args.loads:
        conftest.ROOT = args.versus.resolve()  # Coda starts ROOT / "coda.py" in ROOT
        other = Coda(Path(tempfile.mkdtemp(prefix="coda-bench-")), env)
    conftest.ROOT = (args.coda_dir or Path(__file__).resolve().parent.parent).resolve()
    server = Coda(home, env)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS + args.chromium_flag)
            loads = page_loads(browser, [server] + ([other] if other else []), args.renderer, args.loads) \
                if args.loads else {}
            if other:
                other.stop()
            context = browser.new_context(viewport={"width": 1200, "height": 720})
            context.add_init_script(PROBE)
            context.add_init_script(f"localStorage.setItem('coda.renderer', JSON.stringify('{args.renderer}'))")
            page = context.new_page()
            page.goto(f"{server.url}/?token={server.token}")
            wait(page, "window.coda && window.coda.tabs.length && window.coda.activeText().includes('@')", 20,
                 "the first prompt")
            renderer = page.evaluate("document.querySelector('.xterm canvas') ? 'webgl' : 'dom'")
            page.keyboard.type(f"cat {flood}; echo BENCH-DONE")
            wait(page, "window.coda.activeText().includes('BENCH-DONE')", 10, "the command line")
            # The PTY turns each \n into \r\n: that many bytes must be rendered.
            page.evaluate(f"window.__bench.target = {size + lines}; window.__bench.armed = true")
            page.keyboard.press("Enter")
            deadline = time.monotonic() + 300
            while not page.evaluate("window.__bench.end"):
                if time.monotonic() > deadline:
                    raise SystemExit("bench_browser: the flood did not finish in 300 s")
                page.keyboard.press("Z")
                time.sleep(args.keys_every)
            # The last Zs may still be on their way: wait for every echo.
            wait(page, "window.__bench.echoed.length >= window.__bench.typed.length", 10, "the last echoes")
            probe = page.evaluate("window.__bench")
            browser.close()
    finally:
        server.stop()
        if other:
            other.stop()
        flood.unlink(missing_ok=True)

    for (which, cache), runs in loads.items():
        print(json.dumps({"metric": "browser_page_load_ms", "cache": cache,
                          "coda_dir": str(args.versus if which is other else conftest.ROOT),
                          "median": round(percentile(runs, 50), 1), "p25": round(percentile(runs, 25), 1),
                          "p75": round(percentile(runs, 75), 1), "loads": len(runs), "target_ms": 300}))
    seconds = (probe["end"] - probe["start"]) / 1000
    print(json.dumps({"metric": "browser_render_mb_s", "value": round(size / seconds / 1e6, 2),
                      "bytes": size, "seconds": round(seconds, 3), "renderer": renderer,
                      "flow_control": True, "flow_high": args.flow_high, "flow_low": args.flow_low}))
    # Pair the n-th Z typed with the n-th Z rendered.
    pairs = list(zip(probe["typed"], probe["echoed"]))
    latencies = [rendered - typed for typed, rendered in pairs]
    if latencies:
        print(json.dumps({"metric": "browser_echo_latency_ms", "p50": round(percentile(latencies, 50), 1),
                          "p99": round(percentile(latencies, 99), 1), "max": round(max(latencies), 1),
                          "samples": len(latencies), "target_p99_ms": 100}))


if __name__ == "__main__":
    main()
