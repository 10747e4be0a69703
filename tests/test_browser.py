"""The browser terminal, driven in real headless Chromium against the real coda.py.

Chromium is Debian's (`/usr/bin/chromium`); Playwright only drives it. The
page's CSP forbids eval, so conditions are polled with `page.evaluate` (which
the DevTools protocol runs outside the CSP) rather than `wait_for_function`.
Terminal text is read from xterm's buffer through the read-only `window.coda`.
"""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, TOKEN, free_port, wait_for

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "static" / "screenshots"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")

# Every page records JavaScript errors and CSP violations; each test ends by
# asserting there were none.
WATCH_ERRORS = """
window.__codaProblems = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__codaProblems.push('CSP: ' + e.violatedDirective + ' ' + e.blockedURI);
});
"""

# Makes every WebSocket fail to construct, as a proxy that refuses upgrades would.
BLOCK_WEBSOCKET = """
window.WebSocket = function () { throw new Error('WebSocket blocked by the test'); };
"""


def wait(page, script, arg=None, timeout=10.0, what=None):
    """Poll a JS expression (a function source taking `arg`) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(script, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            text = page.evaluate("window.coda ? window.coda.activeText() : '(no window.coda)'")
            raise AssertionError(f"timed out waiting for {what or script}; terminal shows:\n{text[-1500:]}")
        time.sleep(0.05)


def wait_text(page, needle, tab=None, pane=0, timeout=10.0):
    """Wait until the terminal (the active pane, or tabs[tab].panes[pane]) contains `needle`."""
    if tab is None:
        script = "(n) => window.coda && window.coda.activeText().includes(n)"
        return wait(page, script, needle, timeout, what=repr(needle))
    script = "([n, t, p]) => window.coda && window.coda.tabs.length > t && window.coda.paneText(t, p).includes(n)"
    return wait(page, script, [needle, tab, pane], timeout, what=repr(needle))


def text(page, tab=None, pane=0):
    if tab is None:
        return page.evaluate("window.coda.activeText()")
    return page.evaluate("([t, p]) => window.coda.paneText(t, p)", [tab, pane])


def wait_ready(page):
    """The page is up, with one tab whose shell has printed its prompt."""
    wait(page, "() => window.coda && window.coda.tabs.length > 0 && window.coda.tabs[0].sessions[0]",
         what="a first session")
    wait_text(page, "@", timeout=15)   # the shell prompt (user@host)
    # The WebGL and image addons load once output is on screen: fetched before a test
    # takes the cookie away or stops the server, else the page fails to load them.
    wait(page, "() => ['addon-webgl.js', 'addon-image.js'].every((name) => "
               "performance.getEntriesByType('resource').some((entry) => entry.name.endsWith(name)))",
         what="the addons fetched after the first prompt")


def split(page):
    """Alt+Shift+D, then wait until the second pane has its session."""
    page.keyboard.press("Alt+Shift+D")
    wait(page, "() => window.coda.tabs[0].sessions.length === 2 && window.coda.tabs[0].sessions[1]",
         what="a second pane with its session")


def shot(page, name):
    """Screenshots for the README, only when asked (CODA_SCREENSHOTS=1): a
    plain test run leaves the work tree alone."""
    if not os.environ.get("CODA_SCREENSHOTS"):
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def test_no_background_pane_is_fed_while_a_keystrokes_echo_is_due(open_tab):
    """The frame that draws an echo stays light: after a keystroke, until its echo has come
    (here it never does: the program reads with the tty's echo off) and for at most 100 ms,
    a flooding background pane is not handed output; between keystrokes and once typing
    stops it is, and its flood arrives whole."""
    _, page = open_tab(init_scripts=[WATCH_WRITES])
    wait_ready(page)
    split(page)
    wait_text(page, "@", tab=0, pane=1)
    page.keyboard.type("stty -echo; cat > /dev/null\n")  # pane 1: keystrokes that are never echoed
    page.keyboard.press("Alt+Shift+BracketLeft")
    page.keyboard.type("yes 0123456789abcdef | head -c 30000000; echo FLO$((6*7))OD\n")
    page.keyboard.press("Alt+Shift+BracketRight")
    wait(page, "() => window.__writes.filter((w) => !w.focused).length > 20", what="the flood reaching the page")
    started = page.evaluate("performance.now()")
    page.keyboard.type("x" * 40, delay=25)  # a keystroke every 25 ms: an echo is always due
    ended = page.evaluate("performance.now()")
    page.wait_for_timeout(1000)
    writes = page.evaluate("window.__writes")
    fed = lambda a, b: [w for w in writes if not w["focused"] and a <= w["at"] <= b]
    assert len(fed(started + 100, ended)) <= 3, "a background pane was fed while an echo was due"
    assert len(fed(ended + 150, ended + 1000)) > 5, "the background pane was not fed once typing stopped"
    wait_text(page, "FLO42OD", tab=0, pane=0, timeout=60)
    offsets = page.evaluate("window.coda.offsets()")
    assert all(o["rendered"] == o["offset"] for o in offsets)


class Tab:
    """Opens pages on one server with one browser context (shared localStorage)."""

    def __init__(self, browser, server, init_scripts=(), http_errors_expected=False, routes=None,
                 color_scheme="light", extra_http_headers=None, ignored=()):
        self.server = server
        self.ignored = ignored   # console errors a test provokes on purpose
        # Chrome logs every 4xx answer as a console error; a test that provokes
        # one on purpose says so.
        self.http_errors_expected = http_errors_expected
        self.context = browser.new_context(viewport={"width": 1200, "height": 720}, color_scheme=color_scheme,
                                           extra_http_headers=extra_http_headers)
        self.context.add_init_script(WATCH_ERRORS)
        for script in init_scripts:
            self.context.add_init_script(script)
        # Stand-in answers for endpoints whose real behaviour needs a
        # Databricks workspace or a long setup: {path: handler(route)}.
        for path, handler in (routes or {}).items():
            self.context.route(f"**/{path}", handler)
        self.problems = []
        self.warnings = []
        self.pages = []

    def open(self):
        page = self.context.new_page()
        page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        page.on("console", self.on_console)
        page.goto(f"{self.server.url}/?token={self.server.token}")
        self.pages.append(page)
        return page

    def on_console(self, msg):
        if msg.type == "warning":
            self.warnings.append(msg.text)
        if msg.type != "error":
            return
        if self.http_errors_expected and msg.text.startswith("Failed to load resource"):
            return
        if any(part in msg.text for part in self.ignored):
            return
        self.problems.append(f"console: {msg.text}")

    def reload(self, page):
        self.collect(page)
        page.reload()
        return page

    def collect(self, page):
        try:
            self.problems += page.evaluate("window.__codaProblems || []")
        except playwright_api.Error:
            pass

    def close(self):
        for page in self.pages:
            if not page.is_closed():
                self.collect(page)
        self.context.close()


@pytest.fixture
def open_tab(browser, coda_server):
    """open_tab(init_scripts=()) -> a page on the shared server, logged in."""
    tabs = []

    def opener(init_scripts=(), server=None, **kw):
        tab = Tab(browser, server or coda_server, init_scripts, **kw)
        tabs.append(tab)
        return tab, tab.open()

    yield opener
    problems = []
    for tab in tabs:
        tab.close()
        problems += tab.problems
    # Leave no session behind for the next test (the cap is small).
    for session in coda_server.get("/api/sessions").json():
        coda_server.post("/api/session/close", {"session_id": session["session_id"]})
    assert not problems, "JavaScript errors or CSP violations:\n" + "\n".join(problems)


def test_type_a_command_and_read_its_output(open_tab, coda_server):
    _, page = open_tab()
    wait_ready(page)
    assert page.evaluate("window.coda.transport") == "ws"
    assert page.locator("#transport-note").is_hidden()
    page.keyboard.type("echo hello-$((6*7))\n")
    wait_text(page, "hello-42")
    # The splash of a new session: version, help shortcut, persistence.
    version = coda_server.get("/api/version").json()["version"]
    assert f"CoDA {version}" in text(page)
    assert "Ctrl+/" in text(page) and "idle timeout" in text(page)
    assert page.inner_text("#sessions-badge") == "1 active session"
    shot(page, "terminal")


def test_split_and_type_in_both_panes(open_tab):
    _, page = open_tab()
    wait_ready(page)
    split(page)
    wait_text(page, "@", tab=0, pane=1)
    page.keyboard.type("echo right-$((1+1))\n")
    wait_text(page, "right-2", tab=0, pane=1)
    # Back to the left pane with the pane shortcut, type there.
    page.keyboard.press("Alt+Shift+BracketLeft")
    page.keyboard.type("echo left-$((2+2))\n")
    wait_text(page, "left-4", tab=0, pane=0)
    assert "left-4" not in text(page, 0, 1) and "right-2" not in text(page, 0, 0)
    assert page.locator(".pane.focused").count() == 1
    # Drag the divider: the split stays within 15-85 %.
    box = page.locator(".tab-view.active .divider").bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(20, box["y"] + 100, steps=5)
    page.mouse.up()
    left = page.locator(".tab-view.active .pane").first.bounding_box()["width"]
    assert 0.14 * 1200 < left < 0.3 * 1200
    shot(page, "split")


SCROLLBAR = """(() => {
  const bar = document.querySelector('.tab-view.active .xterm .scrollbar.vertical');
  const slider = bar.querySelector('.slider');
  return { bar: bar.getBoundingClientRect().height, top: slider.offsetTop, height: slider.offsetHeight };
})()"""


# Counts timers armed: xterm 6 re-arms its scrollbar's hide timer on each sync.
COUNT_TIMERS = """
window.__timers = 0;
const realSetTimeout = window.setTimeout;
window.setTimeout = function (...args) { window.__timers += 1; return realSetTimeout.apply(this, args); };
"""


def test_scrollbar_follows_a_flood_and_scrolls_back(open_tab):
    """app.js syncs xterm's scrollbar once per frame, not once per line (which
    made a new terminal ~4x slower for its first 10,000 lines): a 5,000-line
    flood arms a few timers, not thousands; after it the view and the scrollbar
    are at the end, the slider's size reflects the scrollback, and the wheel
    scrolls back."""
    tab, page = open_tab(init_scripts=[COUNT_TIMERS])
    wait_ready(page)
    before = page.evaluate("window.__timers")
    page.keyboard.type("seq 1 5000\n")
    wait_text(page, "\n5000")
    assert page.evaluate("window.__timers") - before < 1000
    wait(page, "() => { const s = window.coda.scroll(); return s.top === s.bottom && s.length > 5000; }",
         what="the view at the end of the output")
    wait(page, f"() => {{ const s = {SCROLLBAR}; return Math.abs(s.top + s.height - s.bar) <= 2; }}",
         what="the slider at the bottom")
    at_end = page.evaluate(SCROLLBAR)
    assert at_end["height"] < 0.1 * at_end["bar"]  # 5,000 lines behind a screenful
    page.mouse.move(600, 300)
    for _ in range(12):  # a wheel event scrolls a few lines
        page.mouse.wheel(0, -500)
    wait(page, "() => { const s = window.coda.scroll(); return s.top < s.bottom - 20; }", what="scrolled back")
    wait(page, f"() => {SCROLLBAR}.top < {at_end['top'] - 2}", what="the slider moved up")
    assert not [w for w in tab.warnings if "Viewport._sync" in w], tab.warnings


def test_closing_a_pane_mid_flood_raises_no_error(open_tab, coda_server):
    """A pane closed while output scrolls it: the scrollbar sync queued for the
    next frame must not touch the disposed terminal (the fixture fails the test
    on any page error)."""
    _, page = open_tab()
    wait_ready(page)
    for _ in range(12):
        split(page)
        wait_text(page, "@", tab=0, pane=1)
        flooding = page.evaluate("window.coda.tabs[0].sessions[1]")
        page.keyboard.type("yes\n")
        wait(page, "() => window.coda.paneText(0, 1).includes('y\\ny\\ny\\ny')", what="the flood")
        page.keyboard.press("Alt+Shift+W")
        page.locator("#close-end").click()  # `yes` runs in it: closing asks first
        wait(page, "() => window.coda.tabs[0].sessions.length === 1", what="the pane closed")
        coda_server.post("/api/session/close", {"session_id": flooding})
    page.wait_for_timeout(300)  # frames after the last close


def test_theme_and_font_persist_across_reload(open_tab):
    tab, page = open_tab()
    wait_ready(page)
    page.select_option("#theme-select", "Dracula")
    page.select_option("#font-select", "Fira Code")
    page.click(".xterm")
    page.keyboard.press("Control+Equal")
    page.keyboard.press("Control+Equal")
    assert page.inner_text("#font-size") == "16"
    tab.reload(page)
    wait_ready(page)
    assert page.input_value("#theme-select") == "Dracula"
    assert page.input_value("#font-select") == "Fira Code"
    assert page.inner_text("#font-size") == "16"
    background = page.evaluate("getComputedStyle(document.documentElement).getPropertyValue('--bg').trim()")
    assert background == "#282a36"
    # The light/dark toggle goes to the last light theme and back to Dracula.
    page.click("#mode-btn")
    assert page.input_value("#theme-select") == "Light"
    page.click("#mode-btn")
    assert page.input_value("#theme-select") == "Dracula"
    shot(page, "dracula")


def test_search_finds_and_highlights_scrollback(open_tab):
    _, page = open_tab()
    wait_ready(page)
    # The marker scrolls far out of view, into the scrollback.
    page.keyboard.type("echo needle-$((40+2)); seq 1 300\n")
    wait_text(page, "\n300")
    page.keyboard.press("Control+Shift+F")
    page.wait_for_selector("#search-panel:not([hidden])")
    page.keyboard.type("needle-42")
    wait(page, "() => document.querySelector('#search-count').textContent === '1 of 1'",
         what="one match counted")
    # The match is outlined (the active one in its own colour) and selected,
    # which scrolled the viewport back up to it.
    wait(page, "() => [...document.querySelectorAll('.xterm-find-result-decoration')]"
               ".some((d) => d.style.outline.includes('255, 176, 0'))",
         what="the active match highlighted")
    assert page.evaluate("window.coda.selection()") == "needle-42"
    shot(page, "search")
    page.keyboard.press("Escape")
    assert page.locator("#search-panel").is_hidden()
    wait(page, "() => document.querySelectorAll('.xterm-find-result-decoration').length === 0",
         what="highlights cleared")


def test_long_poll_when_websocket_is_blocked(open_tab):
    _, page = open_tab(init_scripts=[BLOCK_WEBSOCKET])
    wait_ready(page)
    assert page.evaluate("window.coda.transport") == "poll"
    assert page.locator("#transport-note").is_visible()
    page.keyboard.type("echo polled-$((3*3))\n")
    wait_text(page, "polled-9")
    # A long output arrives whole and in order over polling too.
    page.keyboard.type("seq 1 2000 | tail -n 3; echo done-$((5+5))\n")
    wait_text(page, "done-10")
    assert "1998\n1999\n2000" in text(page)


@pytest.mark.parametrize("transport", ["ws", "poll"])
def test_bytes_that_are_not_utf8_cost_no_following_output(open_tab, coda_server, transport):
    """Output that is not valid UTF-8 reaches xterm as bytes: the text after it is
    intact, over the WebSocket and over HTTP polling (whose JSON text could not carry
    those bytes), and the pane's offset stays the server's."""
    _, page = open_tab(init_scripts=[BLOCK_WEBSOCKET] if transport == "poll" else [])
    wait_ready(page)
    assert page.evaluate("window.coda.transport") == transport
    # The pause puts the invalid bytes and the text in separate answers.
    page.keyboard.type("printf '\\377\\376\\375\\300'; sleep 0.3; echo Q0$((40+2))ABCDEFGHIJ\n")
    wait_text(page, "Q042ABCDEFGHIJ")
    # 500 lines of a euro sign, an invalid byte and a character cut short.
    page.keyboard.type("yes \"$(printf '\\342\\202\\254\\377\\303')\" | head -n 500; echo after-$((9*9))\n")
    wait_text(page, "\nafter-81")
    session = page.evaluate("window.coda.tabs[0].sessions[0]")

    def offsets_agree():
        server_offset = {s["session_id"]: s["offset"] for s in coda_server.get("/api/sessions").json()}[session]
        return page.evaluate("window.coda.offsets()[0].offset") == server_offset

    wait_for(offsets_agree, timeout=10, what="the pane's offset to be the server's")


def test_reload_restores_layout_and_replays_output(open_tab):
    tab, page = open_tab()
    wait_ready(page)
    page.keyboard.type("echo before-$((7*6))\n")
    wait_text(page, "before-42")
    page.keyboard.press("Alt+Shift+D")
    wait(page, "() => window.coda.tabs[0].sessions[1]", what="a second pane")
    wait_text(page, "@", tab=0, pane=1)
    page.keyboard.type("echo second-$((1+2))\n")
    wait_text(page, "second-3", tab=0, pane=1)
    page.keyboard.press("Alt+Shift+T")
    wait(page, "() => window.coda.tabs.length === 2 && window.coda.tabs[1].sessions[0]", what="a second tab")
    layout = page.evaluate("window.coda.tabs")

    tab.reload(page)
    wait(page, "(n) => window.coda && window.coda.tabs.length === n", len(layout), what="tabs restored")
    assert page.evaluate("window.coda.tabs") == layout
    asked = page.evaluate("performance.getEntriesByType('resource').map((e) => new URL(e.name).pathname)")
    assert "/api/session" not in asked, "a page with tabs to rejoin asked for a new session"
    wait_text(page, "before-42", tab=0, pane=0)
    wait_text(page, "second-3", tab=0, pane=1)
    # Replayed once: the command and its output, no duplicates.
    assert len(re.findall(r"^before-42$", text(page, 0, 0), re.M)) == 1
    assert len(re.findall(r"^second-3$", text(page, 0, 1), re.M)) == 1
    # And the restored panes are live.
    page.click(".tab >> nth=0")
    page.click(".tab-view.active .pane >> nth=0")
    page.keyboard.type("echo after-$((2*4))\n")
    wait_text(page, "after-8", tab=0, pane=0)


# Logs each output write xterm is handed: was its terminal focused, and was it
# handed over inside the WebSocket's message handler (at once) or later.
WATCH_WRITES = """
window.__writes = [];
let inMessage = false;
const onmessage = Object.getOwnPropertyDescriptor(WebSocket.prototype, 'onmessage');
Object.defineProperty(WebSocket.prototype, 'onmessage', {
  configurable: true,
  get() { return onmessage.get.call(this); },
  set(handler) {
    onmessage.set.call(this, (ev) => { inMessage = true; try { handler(ev); } finally { inMessage = false; } });
  },
});
let Real;
Object.defineProperty(window, 'Terminal', {
  configurable: true,
  get() { return Real; },
  set(T) {
    Real = T;
    const write = T.prototype.write;
    T.prototype.write = function (data, callback) {
      if (data instanceof Uint8Array) {
        window.__writes.push({ focused: document.activeElement === this.textarea, now: inMessage, n: data.length,
                               at: performance.now() });
      }
      return write.call(this, data, callback);
    };
  },
});
"""


def test_the_focused_pane_is_written_at_once_and_a_flooding_one_by_frames(open_tab):
    """The page decides what xterm parses: output for the pane being typed into goes to xterm
    as it arrives; another pane's flood waits for animation frames, in slices, and still
    arrives whole (its acks follow what is parsed, so the flow keeps going)."""
    _, page = open_tab(init_scripts=[WATCH_WRITES])
    wait_ready(page)
    split(page)
    wait_text(page, "@", tab=0, pane=1)
    page.keyboard.press("Alt+Shift+BracketLeft")
    page.keyboard.type("sleep 0.5; yes 0123456789abcdef | head -c 6000000; echo FLO$((6*7))OD\n")
    page.keyboard.press("Alt+Shift+BracketRight")
    wait(page, "() => window.__writes.filter((w) => !w.focused).length > 10", what="the flood reaching the page")
    for i in range(5):
        page.keyboard.type(f"echo TYPED$((40+{i}))\n")
        wait_text(page, f"TYPED{40 + i}", tab=0, pane=1)
    wait_text(page, "FLO42OD", tab=0, pane=0, timeout=60)
    writes = page.evaluate("window.__writes")
    background = [w for w in writes if not w["focused"]]
    focused_at_once = [w for w in writes if w["focused"] and w["now"]]
    assert len(background) > 10 and not [w for w in background if w["now"]], \
        "a pane not being typed into was handed its output as it arrived"
    assert focused_at_once, "the focused pane's output waited"
    offsets = page.evaluate("window.coda.offsets()")
    assert all(o["rendered"] == o["offset"] for o in offsets)


def test_yes_then_ctrl_c_leaves_the_page_responsive(open_tab):
    _, page = open_tab()
    wait_ready(page)
    page.keyboard.type("yes\n")
    wait(page, "() => (window.coda.activeText().match(/^y$/gm) || []).length > 20", what="yes flooding")
    page.keyboard.press("Control+c")
    page.keyboard.type("echo alive-$((9+9))\n")
    started = time.monotonic()
    wait_text(page, "alive-18", timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"echo after Ctrl+C took {elapsed:.2f}s"


def test_image_paste_uploads_and_types_the_path(open_tab, coda_server):
    _, page = open_tab()
    wait_ready(page)
    page.keyboard.type("echo ")
    # A 1x1 PNG pasted from the clipboard.
    page.evaluate("""() => {
      const bytes = Uint8Array.from(atob('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=='), (c) => c.charCodeAt(0));
      const data = new DataTransfer();
      data.items.add(new File([bytes], 'shot.png', { type: 'image/png' }));
      const event = new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true });
      document.querySelector('.xterm-helper-textarea').dispatchEvent(event);
    }""")
    uploads = coda_server.home / "uploads"
    typed = wait_text(page, str(uploads) + "/")
    assert typed
    match = re.search(re.escape(str(uploads)) + r"/(\S+shot\.png) ", text(page))
    assert match, text(page)
    saved = uploads / match.group(1)
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wait(page, "() => [...document.querySelectorAll('.toast')].some((t) => t.textContent.startsWith('Uploaded'))",
         what="a success toast")
    # The path is typed, not run: Enter runs it.
    page.keyboard.press("Enter")
    wait(page, "(p) => window.coda.activeText().split('\\n').some((l) => l.trim() === p)", str(saved),
         what="the echoed path")


def test_exit_shows_code_and_offers_a_new_session(open_tab):
    _, page = open_tab()
    wait_ready(page)
    first = page.evaluate("window.coda.tabs[0].sessions[0]")
    page.keyboard.type("exit 3\n")
    wait_text(page, "process exited (code 3)")
    page.click(".exit-card button")
    wait(page, "(old) => { const s = window.coda.tabs[0].sessions[0]; return s && s !== old; }", first,
         what="a new session in the pane")
    wait_text(page, "@")
    page.keyboard.type("echo reborn-$((1+4))\n")
    wait_text(page, "reborn-5")


def test_rename_tab_renames_the_session(open_tab, coda_server):
    _, page = open_tab()
    wait_ready(page)
    session = page.evaluate("window.coda.tabs[0].sessions[0]")
    page.dblclick(".tab-name")
    page.fill(".tab-rename", "builds")
    page.keyboard.press("Enter")
    assert page.inner_text(".tab-name") == "builds"
    assert page.title() == "builds \u2014 CoDA"

    def label():
        return {s["session_id"]: s["label"] for s in coda_server.get("/api/sessions").json()}.get(session)

    deadline = time.monotonic() + 5
    while label() != "builds":
        assert time.monotonic() < deadline, label()
        time.sleep(0.05)


def test_session_picker_lists_and_kills(open_tab, coda_server):
    _, page = open_tab()
    wait_ready(page)
    other = coda_server.new_session(label="elsewhere")
    page.keyboard.press("Control+Shift+S")
    page.wait_for_selector("#sessions-modal:not([hidden])")
    row = page.locator("#sessions-table tr", has_text="elsewhere")
    row.wait_for()
    shot(page, "sessions")
    row.locator("button", has_text="Attach").click()
    wait(page, "(id) => window.coda.tabs.some((t) => t.sessions.includes(id))", other, what="attached in a tab")
    page.keyboard.press("Control+Shift+S")
    page.locator("#sessions-kill-all").click()
    page.locator("#sessions-modal .confirm-yes").click()  # kill-all asks first
    wait(page, "() => document.querySelector('#sessions-empty') && !document.querySelector('#sessions-empty').hidden",
         what="no sessions left")
    assert coda_server.get("/api/sessions").json() == []


def test_session_cap_explains_how_to_raise_it(browser, start_coda):
    server = start_coda(env={"MAX_CONCURRENT_SESSIONS": "1"})
    tab = Tab(browser, server, http_errors_expected=True)
    try:
        page = tab.open()
        wait_ready(page)
        page.click("#new-tab")
        wait(page, "() => [...document.querySelectorAll('.toast')].some((t) => t.textContent.includes('MAX_CONCURRENT_SESSIONS'))",
             what="the 429 toast")
        assert "MAX_CONCURRENT_SESSIONS" in text(page)
    finally:
        tab.close()
    assert not tab.problems, tab.problems


def test_restart_shows_a_banner_and_reconnects(browser, tmp_path):
    """SIGTERM: "CoDA is restarting"; the server comes back on the same port; the page recovers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "CODA_", "APP_"))}
    env.update(HOME=str(tmp_path), CODA_TOKEN=TOKEN, CODA_INSTALL="0")

    def start():
        proc = subprocess.Popen([sys.executable, str(ROOT / "coda.py"), "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT))
        deadline = time.monotonic() + 15
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                return proc
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "coda.py did not start"
                time.sleep(0.05)

    class Server:
        url, token = f"http://127.0.0.1:{port}", TOKEN

    first = start()
    tab = Tab(browser, Server(), http_errors_expected=True)
    second = None
    try:
        page = tab.open()
        wait_ready(page)
        first.send_signal(signal.SIGTERM)
        wait(page, "() => !document.querySelector('#banner').hidden && "
                   "document.querySelector('#banner').textContent.includes('CoDA is restarting')",
             what="the restarting banner")
        first.wait(15)
        second = start()
        # Back: the banner goes, the old session is gone, a new one starts.
        wait(page, "() => document.querySelector('#banner').hidden", timeout=20, what="the banner to go")
        page.click(".exit-card button", timeout=20000)
        wait_text(page, "@", timeout=15)
        page.keyboard.type("echo back-$((2*5))\n")
        wait_text(page, "back-10")
    finally:
        tab.close()
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
    # Chrome logs the refused reconnects as console errors; nothing else may appear.
    unexpected = [p for p in tab.problems if "WebSocket connection" not in p]
    assert not unexpected, unexpected


def json_route(answer, status=200):
    return lambda route: route.fulfill(status=status, content_type="application/json", body=json.dumps(answer))


def test_no_token_prompt_locally(open_tab, coda_server):
    # Locally, without Databricks settings, the page never asks for a token.
    assert coda_server.get("/api/app-state").json()["workspace_host"] is None
    _, page = open_tab()
    wait_ready(page)
    page.keyboard.type("echo quiet\n")
    wait_text(page, "quiet\n")
    assert page.locator(".pat-card").count() == 0


def open_as_owner(browser, start_coda, workspace, **env):
    """coda.py in Databricks Apps mode against the fake workspace, and a page on it
    signed in as the app's owner: (server, tab, page, owner headers)."""
    env = {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
           "CODA_PROXY_PORT": str(free_port()), "DATABRICKS_APP_NAME": workspace.app_name,
           "DATABRICKS_CLIENT_ID": workspace.client_id, "DATABRICKS_CLIENT_SECRET": workspace.client_secret,
           "CODA_TOKEN": None, **env}
    server = start_coda(env, args=("--host", "127.0.0.1"))
    as_owner = {"X-Forwarded-Email": workspace.app_creator}
    deadline = time.monotonic() + 40
    while requests.get(server.url + "/api/version", headers=as_owner).status_code != 200:
        assert time.monotonic() < deadline, "the owner was not resolved"
        time.sleep(0.1)
    # The platform's proxy signs the owner in: every request carries the header.
    tab = Tab(browser, server, http_errors_expected=True, extra_http_headers=as_owner)
    page = tab.context.new_page()
    page.on("pageerror", lambda err: tab.problems.append(f"page error: {err}"))
    page.on("console", tab.on_console)
    tab.pages.append(page)
    page.goto(server.url + "/")
    return server, tab, page, as_owner


def test_token_prompt_in_apps_mode(browser, start_coda):
    """Databricks Apps mode against the fake workspace: the owner is asked for a
    token, a rejected one shows the workspace's reason, a good one connects."""
    from fake_workspace import FakeWorkspace

    workspace = FakeWorkspace().start()
    try:
        server, tab, page, as_owner = open_as_owner(browser, start_coda, workspace)
        try:
            wait_ready(page)
            card = page.locator(".pat-card")
            card.wait_for()
            assert card.locator(".pat-reason").count() == 0   # nothing has failed yet
            assert card.locator("a").get_attribute("href") == workspace.url + "/settings/user/developer/access-tokens"
            field = card.locator("input")
            assert field.get_attribute("type") == "password"
            field.click()
            page.keyboard.type("dapi" + "0" * 32)
            card.locator("button").click()
            wait(page, "() => document.querySelector('.pat-message').textContent.includes('did not accept')",
                 what="the workspace's refusal")
            shot(page, "token")
            # A text paste reaches the field untouched (only images are taken for upload).
            field.fill("")
            taken = field.evaluate("""(input) => {
              const data = new DataTransfer();
              data.setData('text/plain', 'x');
              const event = new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true });
              input.dispatchEvent(event);
              return event.defaultPrevented;
            }""")
            assert taken is False
            page.keyboard.insert_text(workspace.add_token(comment="pasted in the browser test"))
            card.locator("button").click()
            wait(page, "(u) => document.querySelector('.pat-message').textContent === `Connected as ${u}.`",
                 workspace.user_name, timeout=30, what="the confirmation")
            assert server.get("/api/pat-status", headers=as_owner).json()["valid"] is True
            # The terminal works through the same proxy header, WebSocket included.
            assert page.evaluate("window.coda.transport") == "ws"
        finally:
            tab.close()
        assert not tab.problems, tab.problems
    finally:
        workspace.stop()


def test_token_prompt_says_why_the_configured_token_does_not_work(browser, start_coda):
    """A token the workspace refuses (here DATABRICKS_TOKEN at start): the prompt
    shows /api/pat-status's one-sentence reason above the field."""
    from fake_workspace import FakeWorkspace

    workspace = FakeWorkspace().start()
    try:
        server, tab, page, as_owner = open_as_owner(browser, start_coda, workspace,
                                                    DATABRICKS_TOKEN="dapi" + "0" * 32)
        try:
            wait_for(lambda: server.get("/api/pat-status", headers=as_owner).json().get("error"),
                     timeout=30, what="the refusal in /api/pat-status")
            reason = server.get("/api/pat-status", headers=as_owner).json()["error"]
            page.reload()
            wait_ready(page)
            shown = page.locator(".pat-card .pat-reason")
            shown.wait_for()
            assert shown.inner_text() == reason and "did not accept" in reason
            assert shown.bounding_box()["y"] < page.locator(".pat-card input").bounding_box()["y"]
            assert page.locator(".pat-message").inner_text() == ""
        finally:
            tab.close()
        assert not tab.problems, tab.problems
    finally:
        workspace.stop()


def test_setup_progress_panel(open_tab):
    """Live setup progress in the first pane, with the server's answers stood in for."""
    now = time.time()
    states = iter([
        {"status": "running", "steps": [
            {"id": "tools", "label": "Install tools", "status": "complete", "error": None, "started_at": now - 5, "finished_at": now - 2},
            {"id": "claude", "label": "Configure Claude Code", "status": "running", "error": None, "started_at": now - 2, "finished_at": None},
            {"id": "codex", "label": "Configure Codex", "status": "failed", "error": "npm: registry unreachable\nmore", "started_at": now - 3, "finished_at": now - 1},
            {"id": "gemini", "label": "Configure Gemini CLI", "status": "pending", "error": None, "started_at": None, "finished_at": None},
        ]},
    ])
    last = {}

    def setup(route):
        last.update(next(states, last))
        json_route(last)(route)

    _, page = open_tab(routes={"api/setup-status": setup})
    wait_ready(page)
    card = page.locator(".setup-card")
    card.wait_for()
    assert "Setup: running" in card.inner_text()
    steps = card.locator(".step")
    assert steps.count() == 4
    assert "npm: registry unreachable" in card.inner_text() and "more" not in card.inner_text()
    assert re.search(r"done\s*Install tools\s*3\.0s", card.inner_text(), re.I)
    shot(page, "setup")
    # The terminal is usable meanwhile.
    page.click(".xterm")
    page.keyboard.type("echo usable-$((3+4))\n")
    wait_text(page, "usable-7")


# Lets a test cut the page's sockets and refuse new ones, then allow them again.
SOCKET_SWITCH = """
(() => {
  const Real = window.WebSocket;
  const open = [];
  let blocked = false;
  window.WebSocket = function (url, protocols) {
    if (blocked) throw new Error('WebSocket blocked by the test');
    const ws = new Real(url, protocols);
    open.push(ws);
    return ws;
  };
  window.WebSocket.OPEN = Real.OPEN;
  window.__cutSockets = () => { blocked = true; for (const ws of open.splice(0)) ws.close(); };
  window.__allowSockets = () => { blocked = false; };
})();
"""


def test_switching_transports_loses_and_repeats_nothing(open_tab):
    """WebSocket -> long-poll -> WebSocket while output streams: every line once, in order."""
    _, page = open_tab(init_scripts=[SOCKET_SWITCH])
    wait_ready(page)
    assert page.evaluate("window.coda.transport") == "ws"
    page.keyboard.type("for i in $(seq 1 60); do echo line-$i; sleep 0.1; done; echo end-$((6*10))\n")
    wait_text(page, "line-5\n")
    page.evaluate("window.__cutSockets()")
    wait(page, "() => window.coda.transport === 'poll'", timeout=15, what="the switch to polling")
    wait_text(page, "line-30\n", timeout=15)
    page.evaluate("window.__allowSockets()")
    wait(page, "() => window.coda.transport === 'ws'", timeout=15, what="the switch back to the socket")
    wait_text(page, "end-60", timeout=15)
    lines = [line for line in text(page).split("\n") if line.startswith("line-")]
    assert lines == [f"line-{i}" for i in range(1, 61)]


def interrupt_a_sleep(page, server):
    """Run `sleep 30` and Ctrl+C it once it really runs: a ^C that reaches bash
    between reading the line and starting the job garbles the next line."""
    page.keyboard.type("sleep 30")
    page.keyboard.press("Enter")
    session = page.evaluate("window.coda.tabs.find((t) => t.sessions.length).sessions[0]")
    deadline = time.monotonic() + 10
    while {s["session_id"]: s["process"] for s in server.get("/api/sessions").json()}.get(session) != "sleep":
        assert time.monotonic() < deadline, "sleep did not start"
        time.sleep(0.05)
    page.keyboard.press("Control+c")


def test_keyboard_shortcuts_and_help(open_tab, coda_server):
    _, page = open_tab()
    wait_ready(page)
    page.keyboard.press("Alt+Shift+T")
    wait(page, "() => window.coda.tabs.length === 2 && window.coda.tabs[1].sessions[0]", what="a second tab")
    assert page.inner_text(".tab.active .tab-name") == "Shell 2"
    page.keyboard.press("Control+Shift+Digit1")
    assert page.inner_text(".tab.active .tab-name") == "Shell 1"
    page.keyboard.press("Control+Shift+BracketRight")
    assert page.inner_text(".tab.active .tab-name") == "Shell 2"
    page.keyboard.press("Control+Shift+BracketLeft")
    assert page.inner_text(".tab.active .tab-name") == "Shell 1"
    # Font size: up, down, reset.
    page.keyboard.press("Control+Equal")
    assert page.inner_text("#font-size") == "15"
    page.keyboard.press("Control+Minus")
    page.keyboard.press("Control+Minus")
    assert page.inner_text("#font-size") == "13"
    page.keyboard.press("Control+Digit0")
    assert page.inner_text("#font-size") == "14"
    # Help lists the shortcuts; Esc closes it.
    page.keyboard.press("Control+Slash")
    help_text = page.inner_text("#help-modal")
    for keys in ("Ctrl+Shift+T", "Alt+Shift+D", "Alt+Shift+W", "Ctrl+Shift+F", "Ctrl+Shift+S", "Ctrl+/"):
        assert keys in help_text
    shot(page, "help")
    page.keyboard.press("Escape")
    assert page.locator("#modal-backdrop").is_hidden()
    # Alt+Shift+W closes the pane (its tab, with one pane) and ends its session.
    page.keyboard.press("Control+Shift+Digit2")
    closing = page.evaluate("window.coda.tabs[1].sessions[0]")
    page.keyboard.press("Alt+Shift+W")
    wait(page, "() => window.coda.tabs.length === 1", what="the tab closed")
    wait(page, "(id) => fetch('api/sessions').then((r) => r.json()).then((l) => !l.some((s) => s.session_id === id))",
         closing, what="its session ended")
    # The shell itself still gets ordinary keys: Ctrl+C interrupts.
    interrupt_a_sleep(page, coda_server)
    page.keyboard.type("echo interrupted-$((1+1))\n")
    wait_text(page, "interrupted-2", timeout=5)


# A stand-in for the Web Speech API: `start` hears "list files" in two steps.
FAKE_SPEECH = """
window.SpeechRecognition = class {
  start() {
    const said = (text, isFinal) => {
      const result = [{ transcript: text }];
      result.isFinal = isFinal;
      this.onresult({ results: [result] });
    };
    setTimeout(() => said('list', false), 50);
    setTimeout(() => said('list files', true), 100);
  }
  abort() {}
};
"""


def test_voice_input_types_the_dictation(open_tab):
    _, page = open_tab(init_scripts=[FAKE_SPEECH])
    wait_ready(page)
    assert page.locator("#voice-btn").is_visible()
    page.keyboard.press("Alt+KeyV")
    page.wait_for_selector("#voice-panel:not([hidden])")
    wait(page, "() => document.querySelector('#voice-text').textContent === 'list files'", what="the dictation")
    page.keyboard.press("Enter")
    assert page.locator("#voice-panel").is_hidden()
    wait_text(page, "# list files")
    # Esc cancels without typing.
    page.keyboard.press("Control+u")
    page.keyboard.press("Alt+KeyV")
    wait(page, "() => document.querySelector('#voice-text').textContent === 'list files'", what="the dictation")
    page.keyboard.press("Escape")
    assert page.locator("#voice-panel").is_hidden()
    page.keyboard.type("echo no-voice\n")
    wait_text(page, "\nno-voice")
    # Nothing dictated was typed before it.
    assert re.search(r"# echo no-voice$", text(page), re.M), text(page)


def test_voice_hidden_without_speech_recognition(open_tab):
    _, page = open_tab(init_scripts=["delete window.SpeechRecognition; delete window.webkitSpeechRecognition;"])
    wait_ready(page)
    assert page.locator("#voice-btn").is_hidden()
    page.keyboard.press("Alt+KeyV")
    assert page.locator("#voice-panel").is_hidden()
    page.keyboard.press("Control+Slash")
    assert "Voice" not in page.inner_text("#help-modal")


def drop_file(page, name, size):
    page.evaluate("""([name, size]) => {
      const data = new DataTransfer();
      data.items.add(new File([new Uint8Array(size).fill(65)], name, { type: 'application/octet-stream' }));
      const target = document.querySelector('.xterm');
      for (const type of ['dragenter', 'dragover', 'drop']) {
        target.dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));
      }
    }""", [name, size])


def test_drag_and_drop_uploads_and_too_large_is_explained(browser, start_coda):
    server = start_coda(env={"CODA_MAX_UPLOAD_BYTES": "1000"})
    tab = Tab(browser, server, http_errors_expected=True)
    try:
        page = tab.open()
        wait_ready(page)
        drop_file(page, "notes.txt", 10)
        wait_text(page, str(server.home / "uploads") + "/")
        assert re.search(r"/\S*notes\.txt ", text(page))
        drop_file(page, "big.bin", 5000)
        wait(page, "() => [...document.querySelectorAll('.toast.error')].length > 0", what="an error toast")
        toast = page.inner_text(".toast.error")
        assert "big.bin is too large" in toast, toast
        assert "big.bin" not in text(page)
        assert page.locator("#drop-hint").is_hidden()
    finally:
        tab.close()
    assert not tab.problems, tab.problems


def test_installable_as_an_app(open_tab):
    """A manifest and icons Chrome accepts: an installed window receives Ctrl+Shift+T/W."""
    tab, page = open_tab()
    wait_ready(page)
    cdp = tab.context.new_cdp_session(page)
    manifest = cdp.send("Page.getAppManifest")
    assert not manifest.get("errors"), manifest.get("errors")
    errors = cdp.send("Page.getInstallabilityErrors")["installabilityErrors"]
    # Playwright's contexts are incognito, where nothing installs: the rest must pass.
    errors = [e for e in errors if e["errorId"] != "in-incognito"]
    assert errors == [], errors


def test_ctrl_c_copies_a_selection_and_interrupts_otherwise(open_tab, coda_server):
    tab, page = open_tab()
    tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
    wait_ready(page)
    page.keyboard.type("echo copy-$((100+23))\n")
    wait_text(page, "\ncopy-123")
    # Double-click the word in xterm's DOM rows (the renderer used headless).
    row = page.locator(".xterm-rows > div", has_text=re.compile(r"^copy-123\s*$"))
    box = row.bounding_box()
    page.mouse.dblclick(box["x"] + 10, box["y"] + box["height"] / 2)
    wait(page, "() => window.coda.selection() === 'copy-123'", what="the word selected")
    page.keyboard.press("Control+c")
    wait(page, "() => navigator.clipboard.readText().then((t) => t === 'copy-123')", what="the clipboard")
    assert page.evaluate("window.coda.selection()") == ""
    # With nothing selected, Ctrl+C interrupts.
    interrupt_a_sleep(page, coda_server)
    page.keyboard.type("echo after-copy\n")
    wait_text(page, "\nafter-copy", timeout=5)


def test_osc52_sets_the_clipboard_but_never_reads_it(open_tab):
    """A program may copy with OSC 52; its query (ESC ] 52 ; c ; ?) never sends the
    browser's clipboard into the PTY, where a remote host could read it."""
    tab, page = open_tab()
    tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
    wait_ready(page)
    page.evaluate("navigator.clipboard.writeText('secret-clip-7')")
    # Raw mode: an answer needs no newline to reach `read`, which keeps what came in 2 s.
    page.keyboard.type("stty raw -echo; printf '\\033]52;c;?\\a'; read -t 2 -r -d Q x; stty sane; "
                       "printf 'GOT:%s:E%sD\\n' \"$x\" N | cat -v\n")
    wait_text(page, ":END")
    [got] = re.findall(r"^GOT:(.*):END", text(page), re.M)
    assert "secret-clip-7" not in text(page) and base64.b64encode(b"secret-clip-7").decode() not in got, got
    page.keyboard.type("printf '\\033]52;c;%s\\a' $(printf written-clip-9 | base64); echo copied-$((2*3))\n")
    wait_text(page, "\ncopied-6")
    wait(page, "() => navigator.clipboard.readText().then((t) => t === 'written-clip-9')", what="the OSC 52 copy")


def test_expired_login_shows_a_banner(open_tab):
    tab, page = open_tab(http_errors_expected=True)
    wait_ready(page)
    tab.context.clear_cookies()
    page.click("#sessions-badge")
    wait(page, "() => !document.querySelector('#banner').hidden && "
               "document.querySelector('#banner').textContent.includes('Authentication expired')",
         what="the authentication banner")


def test_replay_says_when_older_output_is_gone(browser, start_coda):
    server = start_coda(env={"CODA_SCROLLBACK_BYTES": "4096"})
    tab = Tab(browser, server)
    try:
        page = tab.open()
        wait_ready(page)
        page.keyboard.type("seq 1 3000; echo last-$((50+5))\n")
        wait_text(page, "last-55")
        tab.reload(page)
        wait_text(page, "last-55")
        shown = text(page)
        assert re.search(r"^\[\d+ bytes of older output are no longer kept\]", shown, re.M), shown[:300]
        assert "\n2999\n3000\n" in shown and "\n5\n" not in shown
    finally:
        tab.close()
    assert not tab.problems, tab.problems


def test_webgl_renderer_runs_clean(open_tab):
    """Headless Chromium rasterises WebGL on the CPU, where the page picks the
    DOM renderer; forced, the WebGL addon must still work without errors."""
    _, page = open_tab(init_scripts=["localStorage.setItem('coda.renderer', JSON.stringify('webgl-always'))"])
    wait_ready(page)  # the WebGL addon loads once the first prompt is on screen
    wait(page, "() => document.querySelector('.xterm-screen canvas') !== null", what="the WebGL canvas")
    page.keyboard.type("echo gl-$((4*4))\n")
    wait_text(page, "gl-16")


def test_os_dark_preference_picks_the_first_theme(open_tab):
    _, page = open_tab(color_scheme="dark")
    wait_ready(page)
    assert page.input_value("#theme-select") == "Dark"
    page.click("#mode-btn")
    assert page.input_value("#theme-select") == "Light"


def test_close_and_split_again_keeps_one_divider(open_tab):
    _, page = open_tab()
    wait_ready(page)
    for _ in range(2):
        split(page)
        page.keyboard.press("Alt+Shift+BracketLeft")   # the first pane
        page.keyboard.press("Alt+Shift+W")
        wait(page, "() => window.coda.tabs[0].sessions.length === 1", what="one pane left")
    assert page.locator(".tab-view.active .divider").count() <= 1
    page.keyboard.press("Alt+Shift+D")
    wait(page, "() => window.coda.tabs[0].sessions[1]", what="a second pane")
    order = page.evaluate("[...document.querySelector('.tab-view.active').children].map((c) => c.className.split(' ')[0])")
    assert order == ["pane", "divider", "pane"]
    # Closing the last tab leaves an empty workspace that says what to do.
    page.locator(".tab-close").click()
    wait(page, "() => window.coda.tabs.length === 0", what="no tabs")
    assert "Alt+Shift+T" in page.evaluate("getComputedStyle(document.querySelector('#workspace'), '::after').content")


# When the first Terminal is built, and when the first session output was parsed.
PROMPT_PATH_PROBE = """
(() => {
  let Real;
  Object.defineProperty(window, 'Terminal', {
    configurable: true,
    get() { return Real; },
    set(T) {
      window.__xtermAt = performance.now();
      Real = class extends T {
        constructor(...args) { if (!window.__termBuiltAt) window.__termBuiltAt = performance.now(); super(...args); }
      };
    },
  });
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (window.__firstSent === undefined) window.__firstSent = String(data);
    if (!window.__joinedAt && String(data).includes('join_session')) window.__joinedAt = performance.now();
    return send.call(this, data);
  };
  const Socket = window.WebSocket;
  window.WebSocket = class extends Socket {
    constructor(...args) {
      if (!window.__socketAt) window.__socketAt = performance.now();
      super(...args);
      this.addEventListener('open', () => { if (!window.__openAt) window.__openAt = performance.now(); });
    }
  };
  const check = () => {
    if (window.coda && window.coda.offsets().some((o) => o.rendered > 0)) {
      window.__firstOutputAt = performance.now();
      return;
    }
    requestAnimationFrame(check);
  };
  requestAnimationFrame(check);
})();
"""


def test_the_first_prompt_waits_for_nothing_it_does_not_need(open_tab):
    """On the way to the first prompt the page asks each first question once, opens its
    WebSocket and asks for the new tab's session (static/early.js, while the scripts load),
    joins it before its terminal is built, and leaves the status bar, badge, setup, token and
    agent questions until the first output is on screen; they are asked then."""
    _, page = open_tab(init_scripts=[PROMPT_PATH_PROBE])
    wait_ready(page)
    wait(page, "() => window.__firstOutputAt !== undefined", what="the probe at the first output")
    wait(page, "() => performance.getEntriesByType('resource').some((e) => e.name.endsWith('/api/setup-status'))",
         what="the setup question, once the prompt is drawn")
    requests = page.evaluate("performance.getEntriesByType('resource')"
                             ".map((e) => ({ path: new URL(e.name).pathname, start: e.startTime }))")
    [session] = [r["start"] for r in requests if r["path"] == "/api/session"]
    built = page.evaluate("window.__termBuiltAt")
    assert session < built, "the session was asked for after the terminal was built"
    if page.evaluate("window.__openAt") < built:
        assert page.evaluate("window.__joinedAt") < built, "the session was joined after the terminal was built"
    else:  # the socket opened after that: joining is the first thing it does
        assert "join_session" in page.evaluate("window.__firstSent"), page.evaluate("window.__firstSent")
    assert page.evaluate("window.__socketAt") < page.evaluate("window.__xtermAt"), "the socket waited for the scripts"
    assert session < page.evaluate("window.__xtermAt"), "the session waited for the scripts"
    first = [r["path"] for r in requests if r["start"] < built]
    for question in ("/api/version", "/api/sessions", "/api/layout", "/api/session"):
        assert first.count(question) == 1, (question, first)
    shown = page.evaluate("window.__firstOutputAt")
    later = ("/api/agents", "/api/setup-status", "/api/pat-status", "/api/app-state")
    assert not [r for r in requests if r["path"] in later and r["start"] < shown], requests


FIRST_PROMPT_PROBE = """
(() => {
  const check = () => {
    if (window.coda && window.coda.tabs.length && window.coda.activeText().includes('@')) {
      window.__addonsBeforePrompt = performance.getEntriesByType('resource')
        .filter((e) => /addon-(webgl|image|search|web-links|clipboard)/.test(e.name)).map((e) => e.name);
      return;
    }
    requestAnimationFrame(check);
  };
  requestAnimationFrame(check);
})();
"""


def test_the_first_prompt_does_not_wait_for_the_extra_addons(open_tab):
    """Drawing the first prompt needs none of the WebGL renderer, images, search, links or
    OSC 52 copy (half the page's script): they are fetched only once output is on screen,
    and still arrive."""
    _, page = open_tab(init_scripts=[FIRST_PROMPT_PROBE,
                                     "localStorage.setItem('coda.renderer', JSON.stringify('webgl-always'))"])
    wait_ready(page)
    wait(page, "() => window.__addonsBeforePrompt !== undefined", what="the probe at the first prompt")
    assert page.evaluate("window.__addonsBeforePrompt") == []
    wait(page, "() => document.querySelector('.xterm-screen canvas') !== null", what="the WebGL canvas")


def wait_held(page, held, what, timeout=10.0):
    """Until a route handler has held back a request in `held` (Playwright's sync API runs its
    handlers only inside its own calls, so this waits with the page's clock, not time.sleep)."""
    deadline = time.monotonic() + timeout
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(20)
    assert held, f"{what} was never asked for"


def test_a_new_tab_appears_with_its_terminal_once_its_session_is_answered(open_tab):
    """A new tab's session is asked for (and joined) before the tab is built: while the answer
    is on its way there is no tab without a terminal for a key, a close or a reader to meet."""
    held, holding = [], {"on": False}

    def session_route(route):
        if holding["on"] and route.request.method == "POST":
            held.append(route)
        else:
            route.continue_()

    _, page = open_tab(routes={"api/session": session_route})
    wait_ready(page)
    holding["on"] = True
    page.keyboard.press("Alt+Shift+T")
    wait_held(page, held, "the new tab's session")
    page.wait_for_timeout(200)
    assert page.evaluate("window.coda.tabs.length") == 1
    assert page.evaluate("[...document.querySelectorAll('.tab-view')].every((v) => v.querySelector('.xterm'))")
    holding["on"] = False
    held[0].continue_()
    wait(page, "() => window.coda.tabs.length === 2", what="the second tab")
    page.keyboard.type("echo second-$((40+2))\n")
    wait_text(page, "second-42", tab=1)


def test_a_search_asked_for_before_the_search_addon_arrives_runs_once_it_is_here(open_tab):
    held = []   # the search addon's script, held back until the query is typed
    _, page = open_tab(routes={"addon-search.js": lambda route: held.append(route)})
    wait_ready(page)
    page.keyboard.type("echo findme-$((20+22))\n")
    wait_text(page, "findme-42")
    wait_held(page, held, "the search addon", timeout=20)   # the extras are asked for after the first prompt
    page.keyboard.press("Control+Shift+F")
    page.wait_for_selector("#search-panel:not([hidden])")
    page.keyboard.type("findme-42")
    assert page.evaluate("document.querySelector('#search-count').textContent") == ""
    held[0].continue_()
    wait(page, "() => document.querySelector('#search-count').textContent === '1 of 1'", what="the match counted")


def print_inline_image(page):
    """An iTerm inline image (OSC 1337), then a marker line."""
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    size = len(base64.b64decode(png))   # the protocol's size= is the file's byte count
    page.keyboard.type(f"printf '\\033]1337;File=inline=1;size={size};width=4;height=2:{png}\\a\\n'; echo img-$((2+3))\n")
    wait_text(page, "img-5")


def test_inline_image_cannot_break_the_terminal_under_the_csp(open_tab, coda_server):
    """The image addon needs WebAssembly; where the CSP forbids it, an image
    escape is ignored, without a CSP violation and without stalling output."""
    csp = requests.get(coda_server.url + "/", headers=coda_server.headers).headers["Content-Security-Policy"]
    _, page = open_tab()
    wait_ready(page)
    print_inline_image(page)
    if "wasm-unsafe-eval" not in csp:
        assert page.locator(".xterm-image-layer").count() == 0
    page.keyboard.type("echo still-$((1+1))\n")
    wait_text(page, "still-2")


def test_inline_image_shows_where_the_csp_allows_webassembly(open_tab, coda_server):
    """With 'wasm-unsafe-eval' in the CSP (the page reads it), images render."""
    def allow_wasm(route):
        answer = route.fetch()
        headers = dict(answer.headers)
        headers["content-security-policy"] = headers["content-security-policy"].replace(
            "script-src 'self'", "script-src 'self' 'wasm-unsafe-eval'")
        route.fulfill(response=answer, headers=headers)

    # Chrome's local-network checks refuse a socket from a page it did not
    # fetch itself, so this page polls: that is fine here.
    tab, page = open_tab(ignored=("ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS",))
    wait_ready(page)
    # Logged in now (the token's redirect is not routable): load the page
    # again with the wider policy on it and on the page's own check of it.
    tab.context.route(coda_server.url + "/", allow_wasm)
    page.goto(coda_server.url + "/")
    wait_ready(page)
    print_inline_image(page)
    wait(page, "() => document.querySelector('.xterm-image-layer') !== null", what="the image layer")
