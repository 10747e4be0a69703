"""The agent workbench (issue 13): the launcher and its API, the first-run greeting and the
install offer, the status bar, safe closing, the phone layout, fonts and voice.

API tests speak to the real coda.py; browser tests drive real Chromium (the fixtures are
tests/test_browser.py's). Agents are stood in for by small scripts on the terminals' PATH
(~/.local/bin), so which are "installed" is the test's choice.
"""

import json
import os
import time

import pytest
import requests
from conftest import TOKEN, wait_for
from test_browser import CHROMIUM, Tab, browser, json_route, shot, text, wait, wait_ready, wait_text  # noqa: F401

AGENT_NAMES = ["claude", "codex", "gemini", "opencode", "hermes"]
# npm and pip with nowhere to go: an install fails at once, offline, with npm's own sentence.
DEAD_REGISTRIES = {"NPM_CONFIG_REGISTRY": "http://127.0.0.1:9/", "NPM_CONFIG_FETCH_RETRIES": "0",
                   "NPM_CONFIG_FETCH_TIMEOUT": "2000", "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0"}


def fake_agent(home, name, body=None):
    """An executable `name` in ~/.local/bin that says it ran, where, and then waits."""
    path = home / ".local" / "bin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body or f'#!/bin/sh\necho "{name.upper()}-RAN in $PWD"\nexec sleep 300\n')
    path.chmod(0o755)


def make_projects(home):
    projects = home / "projects"
    (projects / "alpha").mkdir(parents=True)
    (projects / "beta").mkdir()
    (projects / ".hidden").mkdir()
    (projects / "notes.txt").write_text("a file, not a project")
    (home / "outside").mkdir()
    (projects / "escape").symlink_to(home / "outside")
    (projects / "escape-up").symlink_to("..")


def agents_by_name(server):
    answer = server.get("/api/agents")
    assert answer.status_code == 200, answer.text
    return {a["name"]: a for a in answer.json()["agents"]}, answer.json()


# ---------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------

def test_agents_come_from_the_table_with_why_not_ready_and_what_to_do(start_coda, tmp_path):
    home = tmp_path / "home"
    fake_agent(home, "codex")
    server = start_coda({"ENABLE_HERMES": "0"}, home=home)
    agents, answer = agents_by_name(server)
    assert list(agents) == ["shell", *AGENT_NAMES]
    assert agents["shell"]["ready"] is True
    claude = agents["claude"]
    assert (claude["ready"], claude["installed"], claude["reason"]) == (False, False, "not installed")
    assert "Install" in claude["action"] and claude["model"] == "databricks-claude-opus-4-7"
    codex = agents["codex"]  # installed, but locally without a workspace there is no token
    assert (codex["ready"], codex["installed"], codex["reason"]) == (False, True, "no token yet")
    assert "DATABRICKS_HOST" in codex["action"]
    hermes = agents["hermes"]
    assert (hermes["reason"], hermes["enabled"]) == ("switched off", False) and "ENABLE_HERMES=true" in hermes["action"]
    # Locally with CODA_INSTALL=0 the page may install what is missing (not the switched-off one).
    assert answer["install_offer"] == ["claude", "gemini", "opencode"]


def test_an_installed_agent_with_a_token_is_ready(start_coda, tmp_path):
    from fake_workspace import FakeWorkspace

    workspace = FakeWorkspace().start()
    try:
        home = tmp_path / "home"
        fake_agent(home, "claude")
        server = start_coda({"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
                             "PAT_ROTATION_INTERVAL": "3600"}, home=home)
        assert agents_by_name(server)[0]["claude"]["reason"] == "no token yet"
        assert "Paste a Databricks token" in agents_by_name(server)[0]["claude"]["action"]
        server.api("/api/configure-pat", {"token": workspace.add_token()})
        claude = wait_for(lambda: (a := agents_by_name(server)[0]["claude"])["ready"] and a, timeout=60,
                          what="claude ready")
        assert claude["reason"] is None and claude["action"] is None
        assert agents_by_name(server)[0]["gemini"]["reason"] == "not installed"
    finally:
        workspace.stop()


def test_projects_lists_only_folders_inside_projects(start_coda, tmp_path):
    home = tmp_path / "home"
    make_projects(home)
    server = start_coda(home=home)
    answer = server.get("/api/projects")
    assert answer.status_code == 200
    assert answer.json() == {"root": "~/projects", "projects": ["alpha", "beta"]}


@pytest.mark.parametrize("body, words", [
    ({"agent": "rm -rf ~"}, "must be one of shell, claude, codex, gemini, opencode, hermes"),
    ({"agent": "hermes"}, "switched off"),
    ({"agent": 7}, "must be a str"),
    ({"project": "../outside"}, "must name a folder in ~/projects"),
    ({"project": "alpha/../../outside"}, "must name a folder in ~/projects"),
    ({"project": ".hidden"}, "must name a folder in ~/projects"),
    ({"project": "escape"}, "is not a folder in ~/projects"),
    ({"project": "escape-up"}, "is not a folder in ~/projects"),
    ({"project": "notes.txt"}, "is not a folder in ~/projects"),
    ({"project": "missing"}, "is not a folder in ~/projects"),
])
def test_starting_a_session_checks_the_agent_and_the_folder(start_coda, tmp_path, body, words):
    home = tmp_path / "home"
    make_projects(home)
    server = start_coda({"ENABLE_HERMES": "0"}, home=home)
    answer = server.post("/api/session", body)
    assert answer.status_code == 400 and words in answer.json()["error"], answer.text
    assert server.get("/api/sessions").json() == []  # nothing was started


def test_a_session_starts_an_agent_in_a_project_and_says_it_is_busy(start_coda, tmp_path):
    home = tmp_path / "home"
    make_projects(home)
    fake_agent(home, "codex")
    server = start_coda(home=home)
    sid = server.new_session(label="Codex", agent="codex", project="alpha")
    server.read_until(sid, f"CODEX-RAN in {home / 'projects' / 'alpha'}")
    listed = wait_for(lambda: [s for s in server.get("/api/sessions").json() if s["busy"]], what="a busy session")
    assert listed[0]["cwd"] == "~/projects/alpha" and listed[0]["label"] == "Codex"
    shell = server.new_session()  # a plain shell in ~/projects, idle
    server.wait_prompt(shell)
    described = {s["session_id"]: s for s in server.get("/api/sessions").json()}[shell]
    assert (described["busy"], described["cwd"]) == (False, "~/projects")


def test_a_browser_without_the_token_gets_a_page_saying_where_it_is(start_coda, tmp_path):
    server = start_coda()
    for url in (server.url + "/", server.url + "/?token=wrong-" + TOKEN):
        answer = requests.get(url, timeout=10, headers={"Accept": "text/html"})
        assert answer.status_code == 403
        assert answer.headers["Content-Type"].startswith("text/html")
        assert "?token=" in answer.text and "python coda.py" in answer.text and "CODA_TOKEN" in answer.text
        assert TOKEN not in answer.text
        assert "Content-Security-Policy" in answer.headers
    api = requests.get(server.url + "/api/version", timeout=10)  # API paths keep JSON
    assert api.status_code == 403 and api.json()["error"]


def test_the_install_offer_runs_agents_sh_as_setup_steps(start_coda, tmp_path):
    home = tmp_path / "home"
    for name in ("codex", "gemini", "opencode"):
        fake_agent(home, name)
    server = start_coda({"ENABLE_HERMES": "0", **DEAD_REGISTRIES}, home=home)
    assert server.get("/api/agents").json()["install_offer"] == ["claude"]
    def install_step():
        return {s["id"]: s for s in server.get("/api/setup-status").json()["steps"]}["claude"]["status"]

    assert wait_for(lambda: install_step() != "pending" and install_step(), what="setup's install steps") == "skipped"
    assert server.api("/api/setup/install-agents", {}) == {"status": "started", "agents": ["claude"]}

    def settled():
        step = {s["id"]: s for s in server.get("/api/setup-status").json()["steps"]}["claude"]
        return step["status"] not in ("pending", "running") and step

    step = wait_for(settled, timeout=120, what="the claude install step to end")
    assert step["status"] == "failed" and step["error"] and step["output"], step
    claude = agents_by_name(server)[0]["claude"]
    assert claude["reason"].startswith("setup failed: ") and "setup card" in claude["action"]


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

pytestmark_browser = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")


@pytest.fixture
def page_on(browser, start_coda, tmp_path):
    """page_on(env, prepare=None, **tab options) -> (server, tab, page): a private server whose HOME
    `prepare(home)` fills first, and a logged-in page on it."""
    tabs = []

    def opener(env=None, prepare=None, **kw):
        home = tmp_path / f"home{len(tabs)}"
        home.mkdir()
        if prepare:
            prepare(home)
        server = start_coda(env, home=home)
        tab = Tab(browser, server, **kw)
        tabs.append(tab)
        return server, tab, tab.open()

    yield opener
    problems = []
    for tab in tabs:
        tab.close()
        problems += tab.problems
    assert not problems, "JavaScript errors or CSP violations:\n" + "\n".join(problems)


def with_codex_and_projects(home):
    make_projects(home)
    fake_agent(home, "codex")


@pytestmark_browser
def test_launcher_starts_an_agent_in_a_picked_project(page_on):
    server, _, page = page_on({"ENABLE_HERMES": "0"}, with_codex_and_projects)
    wait_ready(page)
    page.keyboard.press("Alt+Shift+A")
    page.wait_for_selector("#launcher-modal:not([hidden])")
    entries = page.locator(".launcher-entry")
    wait(page, "() => document.querySelectorAll('.launcher-entry').length === 6", what="six entries")
    assert [entries.nth(i).locator("button").inner_text() for i in range(6)] == \
        ["Shell", "Claude Code", "Codex", "Gemini CLI", "OpenCode", "Hermes Agent"]
    claude = page.locator(".launcher-entry", has_text="Claude Code")
    assert "Not ready: not installed" in claude.inner_text() and claude.locator("button").is_disabled()
    assert "switched off" in page.locator(".launcher-entry", has_text="Hermes Agent").inner_text()
    codex = page.locator(".launcher-entry", has_text="Codex")
    assert "no token yet" in codex.inner_text() and codex.locator("button").is_enabled()
    # Keyboard: the folder picker and the entries are reachable and named.
    assert page.get_by_label("Folder to start in").count() == 1
    options = page.eval_on_selector_all("#launcher-project option", "(os) => os.map((o) => o.textContent)")
    assert options == ["~/projects", "~/projects/alpha", "~/projects/beta"]
    page.select_option("#launcher-project", "alpha")
    shot(page, "launcher")
    codex.locator("button").focus()
    page.keyboard.press("Enter")
    wait(page, "() => window.coda.tabs.length === 2", what="a second tab")
    assert page.evaluate("window.coda.tabs[1].name") == "Codex \u00b7 alpha"
    wait_text(page, "CODEX-RAN in " + str(server.home / "projects" / "alpha"), tab=1)


@pytestmark_browser
def test_first_run_greets_and_offers_to_install_the_missing_agents(page_on):
    def prepare(home):
        for name in ("codex", "gemini", "opencode"):
            fake_agent(home, name)

    _, _, page = page_on({"ENABLE_HERMES": "0", **DEAD_REGISTRIES}, prepare, http_errors_expected=True)
    wait_ready(page)
    card = page.locator(".welcome-card")
    card.wait_for()
    words = card.inner_text()
    assert "Welcome to CoDA" in words and "terminals in your browser" in words
    assert "This machine lacks Claude Code." in words
    shot(page, "first-run")
    page.get_by_role("button", name="Install them into ~/.local").click()
    setup = page.locator(".setup-card")
    setup.wait_for()
    wait(page, "() => /failed/.test(document.querySelector('.setup-card') && document.querySelector('.setup-card').textContent)",
         timeout=120, what="the install step's end in the setup card")
    assert "Claude Code" in setup.inner_text()
    # The terminal stays usable meanwhile.
    page.click(".xterm-screen", position={"x": 600, "y": 500})
    page.keyboard.type("echo usable-$((2+5))\n")
    wait_text(page, "usable-7")
    # Dismissed, it stays away.
    page.get_by_role("button", name="Hide the welcome").click()
    page.reload()
    wait_ready(page)
    page.wait_for_timeout(300)
    assert page.locator(".welcome-card").count() == 0


@pytestmark_browser
def test_status_bar_shows_the_state_and_replaces_the_token(page_on):
    from fake_workspace import FakeWorkspace

    workspace = FakeWorkspace().start()
    try:
        server, _, page = page_on({"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
                                   "PAT_ROTATION_INTERVAL": "3600", "MAX_CONCURRENT_SESSIONS": "7"},
                                  http_errors_expected=True)
        server.api("/api/configure-pat", {"token": workspace.add_token()})
        wait_ready(page)
        bar = page.locator("#statusbar")
        user = server.get("/api/pat-status").json()["user"]
        wait(page, "(u) => { const t = document.querySelector('#statusbar').textContent; "
                   "return t.includes(u) && t.includes('left') && / ms/.test(t); }", user, timeout=20,
             what="the status bar filled")
        words = bar.inner_text()
        assert "1/7 sessions" in words and "WebSocket" in words and "rotated" in words
        assert "gateway " + workspace.gateway_url.split("://")[1] in words and "setup " in words
        page.get_by_role("button", name="Status details").click()
        page.wait_for_selector("#status-modal:not([hidden])")
        assert "Signed in" in page.inner_text("#status-modal")
        new = workspace.add_token()
        page.get_by_label("New Databricks personal access token").fill(new)
        shot(page, "status")
        page.get_by_role("button", name="Replace token").click()
        wait(page, "() => document.querySelector('#replace-token-message').textContent.startsWith('Token replaced')",
             timeout=30, what="the token replaced")
        assert new not in page.content()
        page.keyboard.press("Escape")
        assert page.locator("#status-modal").is_hidden()
    finally:
        workspace.stop()


@pytestmark_browser
def test_status_bar_names_http_polling(page_on):
    _, _, page = page_on(init_scripts=["window.WebSocket = function () { throw new Error('blocked'); };"])
    wait_ready(page)
    wait(page, "() => /HTTP polling \u00b7 \\d+ ms/.test(document.querySelector('#statusbar').textContent)",
         timeout=20, what="HTTP polling with its round trip")


def session_ids(server):
    return {s["session_id"]: s for s in server.get("/api/sessions").json()}


@pytestmark_browser
def test_closing_a_busy_tab_asks_and_can_keep_it_running(page_on):
    server, _, page = page_on(prepare=make_projects)
    wait_ready(page)
    first = page.evaluate("window.coda.tabs[0].sessions[0]")
    # An idle shell closes without a question.
    page.click("#new-tab")
    wait(page, "() => window.coda.tabs.length === 2 && window.coda.tabs[1].sessions[0]", what="a second tab")
    wait_text(page, "@", tab=1)
    idle = page.evaluate("window.coda.tabs[1].sessions[0]")
    page.keyboard.press("Control+Shift+W")
    wait(page, "() => window.coda.tabs.length === 1", what="the idle tab closed")
    assert page.locator("#close-modal").is_hidden()
    wait_for(lambda: idle not in session_ids(server), what="the idle session ended")
    # A running program: the question, Cancel keeps everything.
    page.keyboard.type("cd alpha && sleep 300\n")
    wait_for(lambda: session_ids(server)[first]["busy"], what="sleep in the foreground")
    page.keyboard.press("Control+Shift+W")
    page.wait_for_selector("#close-modal:not([hidden])")
    assert "is running sleep in ~/projects/alpha" in page.inner_text("#close-text")
    shot(page, "close")
    page.keyboard.press("Escape")
    assert page.locator("#close-modal").is_hidden()
    assert page.evaluate("window.coda.tabs.length") == 1
    # Keep it running: the tab goes, the session stays, the picker reattaches it.
    page.keyboard.press("Control+Shift+W")
    page.get_by_role("button", name="Keep it running").click()
    wait(page, "() => window.coda.tabs.length === 0", what="the tab closed")
    assert session_ids(server)[first]["process"] == "sleep"
    page.keyboard.press("Control+Shift+S")
    row = page.locator("#sessions-table tr", has_text="sleep")
    row.wait_for()
    assert "~/projects/alpha" in row.inner_text()
    row.get_by_role("button", name="Attach").click()
    wait(page, "(id) => window.coda.tabs.some((t) => t.sessions.includes(id))", first, what="reattached")
    # End it: the session is gone.
    page.keyboard.press("Control+Shift+W")
    page.get_by_role("button", name="End it").click()
    wait_for(lambda: first not in session_ids(server), what="the session ended")


@pytestmark_browser
def test_the_picker_confirms_kill_and_kill_all(page_on):
    server, _, page = page_on()
    wait_ready(page)
    other = server.new_session(label="elsewhere")
    server.new_session(label="third")
    page.keyboard.press("Control+Shift+S")
    row = page.locator("#sessions-table tr", has_text="elsewhere")
    row.wait_for()
    row.get_by_role("button", name="Kill elsewhere").click()
    assert other in session_ids(server)  # asked, not done
    row.get_by_role("button", name="Cancel").click()
    assert other in session_ids(server)
    row.get_by_role("button", name="Kill elsewhere").click()
    page.keyboard.press("Enter")  # the confirming button has the focus
    wait_for(lambda: other not in session_ids(server), what="elsewhere killed")
    page.locator("#sessions-kill-all").click()
    page.get_by_role("group", name="End all 2 sessions?").wait_for()
    assert len(session_ids(server)) == 2
    page.get_by_role("button", name="End all 2 sessions? Confirm").click()
    wait_for(lambda: not session_ids(server), what="every session killed")


@pytestmark_browser
def test_phone_has_extra_keys_and_every_control_in_reach(browser, start_coda, tmp_path):
    server = start_coda()
    context = browser.new_context(viewport={"width": 390, "height": 760}, has_touch=True, is_mobile=True,
                                  device_scale_factor=2)
    try:
        page = context.new_page()
        problems = []
        page.on("pageerror", lambda err: problems.append(str(err)))
        page.goto(f"{server.url}/?token={server.token}")
        wait_ready(page)
        bar = page.locator("#extra-keys")
        assert bar.is_visible()
        for name in ("Escape", "Tab", "Control (applies to the next key)", "Alt (applies to the next key)",
                     "Arrow left", "Arrow up", "Arrow down", "Arrow right", "Paste"):
            assert bar.get_by_role("button", name=name).is_visible(), name
        # Every control of the bars is on screen, large enough to tap.
        controls = page.eval_on_selector_all(
            "#topbar button, #topbar select, #status-btn, #extra-keys button",
            "(els) => els.filter((e) => !e.hidden && getComputedStyle(e).display !== 'none')"
            ".map((e) => { const r = e.getBoundingClientRect(); return [e.id || e.textContent, r.left, r.right, r.top, r.bottom, r.height]; })")
        assert len(controls) >= 20
        for name, left, right, top, bottom, height in controls:
            assert left >= 0 and right <= 390.5 and top >= 0 and bottom <= 760.5, (name, left, right, top, bottom)
            assert height >= 22, (name, height)
        for selector in ("#font-select", "#font-up", "#theme-select", "#launch-btn", "#help-btn"):
            assert page.locator(selector).is_visible(), selector
        # Arrows move the cursor; a latched Ctrl makes the next key a control key.
        page.tap(".xterm-screen", position={"x": 40, "y": 20})
        page.keyboard.type("echo abc")
        bar.get_by_role("button", name="Arrow left").tap()
        bar.get_by_role("button", name="Arrow left").tap()
        page.keyboard.type("X\n")
        wait_text(page, "\naXbc")
        page.keyboard.type("sleep 300\n")
        wait_for(lambda: any(s["busy"] for s in server.get("/api/sessions").json()), what="sleep running")
        bar.get_by_role("button", name="Control (applies to the next key)").tap()
        assert bar.get_by_role("button", name="Control (applies to the next key)").get_attribute("aria-pressed") == "true"
        page.keyboard.type("c")
        wait_for(lambda: not any(s["busy"] for s in server.get("/api/sessions").json()), what="sleep interrupted")
        assert bar.get_by_role("button", name="Control (applies to the next key)").get_attribute("aria-pressed") == "false"
        page.keyboard.type("echo after-$((3*3))\n")
        wait_text(page, "after-9")
        shot(page, "phone")
        page.get_by_role("button", name="Start an agent", exact=True).tap()
        page.wait_for_selector("#launcher-modal:not([hidden])")
        assert page.locator(".launcher-entry").first.is_visible()
        assert not problems, problems
    finally:
        context.close()


@pytestmark_browser
def test_every_font_offered_renders(page_on):
    _, _, page = page_on()
    wait_ready(page)
    names = page.eval_on_selector_all("#font-select option", "(os) => os.map((o) => o.value)")
    assert names[0] == "System default" and len(names) == 5
    # On the system font the page loads no font stylesheet; each font's come when it is chosen.
    assert page.evaluate("[...document.styleSheets].filter((s) => (s.href || '').includes('/fonts/')).length") == 0
    for name in names[1:]:
        page.select_option("#font-select", name)
        wait(page, "(n) => [...document.fonts].some((f) => f.family.replace(/\"/g, '') === n && f.status === 'loaded')"
                   " && document.fonts.check(`14px \"${n}\"`)", name, what=f"{name} loaded")


FAILING_SPEECH = """
window.SpeechRecognition = class {
  start() { setTimeout(() => this.onerror({ error: 'not-allowed' }), 50); }
  abort() {}
};
"""


@pytestmark_browser
def test_voice_errors_are_sentences_and_the_help_warns_of_the_vendor(page_on):
    _, _, page = page_on(init_scripts=[FAILING_SPEECH])
    wait_ready(page)
    page.keyboard.press("Alt+KeyV")
    wait(page, "() => [...document.querySelectorAll('.toast')].some((t) => "
               "t.textContent.startsWith('The browser was not allowed to use the microphone'))", what="the sentence")
    page.keyboard.press("Control+Slash")
    help_text = page.inner_text("#help-modal")
    assert "may send the recorded audio to the browser's vendor" in help_text
    assert page.get_by_label("Voice input (Alt+V)").is_checked()  # on by default locally


@pytestmark_browser
def test_voice_is_off_by_default_in_apps_mode_and_a_setting_turns_it_on(page_on):
    def apps_state(route):
        answer = route.fetch()
        json_route({**answer.json(), "apps_mode": True})(route)

    _, _, page = page_on(init_scripts=["window.SpeechRecognition = class { start() {} abort() {} };"],
                         routes={"api/app-state": apps_state})
    wait_ready(page)
    wait(page, "() => document.querySelector('#voice-btn').hidden", what="the voice button hidden")
    page.keyboard.press("Alt+KeyV")
    assert page.locator("#voice-panel").is_hidden()
    page.keyboard.press("Control+Slash")
    setting = page.get_by_label("Voice input (Alt+V)")
    assert not setting.is_checked()
    setting.check()
    assert page.locator("#voice-btn").is_visible()
    page.keyboard.press("Escape")
    page.keyboard.press("Alt+KeyV")
    page.wait_for_selector("#voice-panel:not([hidden])")
