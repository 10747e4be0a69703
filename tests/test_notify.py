"""Notices (issue 13): the bell, OSC 9 and OSC 777 in a session's output, and the agents' own hooks
(which write OSC 777 to their terminal through `coda.py notify`), reach every open page as
{"type": "notify"} over the WebSocket and in the long-poll answers."""

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, Coda, wait_for
from fake_workspace import FakeWorkspace

CODA = [sys.executable, str(ROOT / "coda.py")]


def poll_notices(server, sid, since, marker, timeout=20):
    """Long-poll from `since` until `marker` is in the output: (notices, next_offset)."""
    text, notices, offset, deadline = "", [], since, time.time() + timeout
    while marker not in text:
        assert time.time() < deadline, f"{marker!r} not seen in {text[-500:]!r}"
        answer = server.api("/api/output", {"session_id": sid, "since": offset, "wait": 2})
        text += answer["output"]
        notices += answer.get("notices", [])
        offset = answer["next_offset"]
    return notices, offset


def run_and_collect(server, sid, since, command, marker="DONE"):
    server.type(sid, command + f"; echo {marker[:2]}''{marker[2:]}\r")
    return poll_notices(server, sid, since, marker + "\r\n")


@pytest.fixture
def shell(coda_server):
    sid = coda_server.new_session()
    offset = coda_server.wait_prompt(sid)
    yield sid, offset
    coda_server.close_session(sid)


def test_a_bell_osc9_and_osc777_reach_the_poll_answers(coda_server, shell):
    sid, offset = shell
    notices, _ = run_and_collect(coda_server, sid, offset,
                                 r"printf '\a'; sleep 0.3; printf '\033]9;Build done\007'; sleep 0.3; "
                                 r"printf '\033]777;notify;Deploy;It \033\\'; printf 'is live\033\\'")
    assert [(n["kind"], n["title"], n["body"]) for n in notices] == [
        ("bell", "", ""), ("osc9", "", "Build done"), ("osc777", "Deploy", "It")]
    assert all(n["type"] == "notify" and n["session_id"] == sid and isinstance(n["offset"], int) for n in notices)


def test_a_sequence_split_across_reads_is_found_once(coda_server, shell):
    sid, offset = shell
    notices, _ = run_and_collect(coda_server, sid, offset,
                                 r"printf '\033]777;noti'; sleep 0.5; printf 'fy;Split;across reads\007'")
    assert [(n["kind"], n["title"], n["body"]) for n in notices] == [("osc777", "Split", "across reads")]


def test_what_is_no_notice_makes_none(coda_server, shell):
    sid, offset = shell
    notices, _ = run_and_collect(coda_server, sid, offset,
                                 r"printf '\033]0;a title\007'; sleep 0.3; "      # a title's BEL ends it: no bell
                                 r"printf '\033P1$r\007q\033\\'; sleep 0.3; "     # a BEL inside DCS is data
                                 r"printf '\033]0;split'; sleep 0.5; printf ' title\007'; sleep 0.3; "
                                 r"printf '\033]9;4;1;50\007'; sleep 0.3; "       # ConEmu's progress bar
                                 r"printf '\033]777;preexec\007'")               # urxvt's other 777s
    assert notices == []


def test_notice_text_is_cleaned_and_bounded_and_a_flood_is_rate_limited(coda_server, shell):
    sid, offset = shell
    notices, offset = run_and_collect(coda_server, sid, offset,
                                      r"printf '\033]777;notify;<b>T\001i\033[31mtle;' ; printf 'x%.0s' {1..900}; "
                                      r"printf '\007'")
    assert [n["kind"] for n in notices] == ["bell"]  # an ESC inside ends the string: then its BEL is a bell
    notices, offset = run_and_collect(coda_server, sid, offset,
                                      r"printf '\033]777;notify;<b>T\001itle</b>;'; printf 'x%.0s' {1..900}; "
                                      r"printf '\007'")
    [notice] = notices
    assert notice["title"] == "<b>Title</b>" and notice["body"] == "x" * 300  # the page shows it as text
    notices, _ = run_and_collect(coda_server, sid, offset, r"for i in $(seq 30); do printf '\a'; sleep 0.02; done")
    assert 1 <= len(notices) <= 4, len(notices)


def test_the_socket_gets_notices_of_every_session(coda_server, shell):
    sid, offset = shell
    ws = coda_server.websocket()
    try:
        ws.send(type="heartbeat", session_ids=[])  # joined to nothing: notices go to every page all the same
        coda_server.type(sid, r"printf '\033]9;from the socket\007'" + "\r")
        ws.ws.settimeout(10)
        deadline = time.time() + 10
        while True:
            assert time.time() < deadline
            item = ws.receive()
            if item[0] == "event" and item[1].get("type") == "notify":
                break
        assert item[1] == {**item[1], "session_id": sid, "kind": "osc9", "body": "from the socket"}
    finally:
        ws.close()


def test_the_hook_command_writes_a_notice_to_its_terminal(coda_server, shell):
    sid, offset = shell
    event = json.dumps({"hook_event_name": "Notification", "message": "Claude needs your permission to use Bash"})
    command = f"echo '{event}' | {sys.executable} {ROOT / 'coda.py'} notify claude"
    notices, offset = run_and_collect(coda_server, sid, offset, command)
    assert [(n["kind"], n["title"], n["body"]) for n in notices] == [
        ("osc777", "Claude Code", "Claude needs your permission to use Bash")]
    notices, _ = run_and_collect(coda_server, sid, offset,
                                 f"echo '{{\"hook_event_name\": \"AfterAgent\"}}' | {sys.executable} "
                                 f"{ROOT / 'coda.py'} notify gemini")
    assert [(n["title"], n["body"]) for n in notices] == [("Gemini CLI", "Finished its turn.")]


def test_the_hook_answers_fast_and_quietly_without_a_terminal(tmp_path):
    started = time.perf_counter()
    done = subprocess.run(CODA + ["notify", "claude"], input=b"{}", capture_output=True, timeout=30,
                          start_new_session=True, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0 and done.stdout == done.stderr == b""
    assert time.perf_counter() - started < 2.0  # before the heavy imports


def configured(home, workspace, **env):
    """A server against the fake workspace with a token pasted, once the agents' configs are written."""
    server = Coda(home, {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
                         "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": "", **env})
    server.api("/api/configure-pat", {"token": workspace.add_token(comment="pasted")})

    def written():
        steps = server.get("/api/setup-status").json()["steps"]
        chosen = [s for s in steps if s["id"] in ("configure-claude", "configure-codex", "configure-gemini")]
        return len(chosen) == 3 and all(s["status"] not in ("pending", "running") for s in chosen) and chosen
    assert all(s["status"] == "complete" for s in wait_for(written, timeout=60, what="the agents' configs"))
    return server


def test_codex_notify_chains_the_users_own_and_tracing(workspace, tmp_path):
    home = tmp_path / "home"
    config = home / ".codex" / "config.toml"
    config.parent.mkdir(parents=True)
    marker = tmp_path / "user-notify-ran"
    script = tmp_path / "my-notify"
    script.write_text(f"#!/bin/sh\nprintf '%s' \"$1\" > {marker}\n")
    script.chmod(0o755)
    config.write_text(f'notify = ["{script}"]\n')
    for tracing in ({}, {"MLFLOW_TRACING_ENABLED": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}, {}):
        server = configured(home, workspace, **tracing)  # written again at every start: one of each, the user's kept
        server.stop()
        notify = tomllib.loads(config.read_text())["notify"]
        assert notify[2:4] == ["notify", "codex"] and notify[-2:] == ["--", str(script)]
        assert ("--trace" in notify) == bool(tracing)
        tui = tomllib.loads(config.read_text())["tui"]
        assert tui == {"notifications": ["approval-requested"], "notification_method": "osc9"}  # OSC 9, found as above

    payload = json.dumps({"type": "agent-turn-complete", "last-assistant-message": "All done"})
    done = subprocess.run(notify + [payload], capture_output=True, timeout=30, start_new_session=True)
    assert done.returncode == 0 and done.stderr == b""
    assert wait_for(lambda: marker.exists() and marker.read_text(), timeout=10) == payload  # the user's own ran


def test_claude_and_gemini_hooks_keep_the_users_own(workspace, tmp_path):
    home = tmp_path / "home"
    user_stop = {"hooks": [{"type": "command", "command": "echo user-stop-hook"}]}
    (home / ".claude").mkdir(parents=True)
    (home / ".claude" / "settings.json").write_text(json.dumps({"hooks": {"Stop": [user_stop]}}))
    for _ in range(2):  # and again at the next start: still one each
        configured(home, workspace).stop()
        claude = json.loads((home / ".claude" / "settings.json").read_text())["hooks"]
        assert claude["Stop"][0] == user_stop and len(claude["Stop"]) == 2
        assert claude["Stop"][1]["hooks"][0]["command"].endswith(" notify claude")
        assert len(claude["Notification"]) == 1
        gemini = json.loads((home / ".gemini" / "settings.json").read_text())["hooks"]
        assert [len(gemini[e]) for e in ("AfterAgent", "Notification")] == [1, 1]


# ---- in a real browser -------------------------------------------------------------------------

from test_browser import Tab, browser, open_tab, shot, wait, wait_ready, BLOCK_WEBSOCKET  # noqa: E402,F401

# The page's browser notifications, recorded; `window.__away = true` puts the page in the background
# as far as the page can tell (headless Chromium always has focus).
RECORD_NOTIFICATIONS = """
window.__popups = [];
window.Notification = class {
  constructor(title, options) { window.__popups.push([title, (options || {}).body]); }
  static get permission() { return 'granted'; }
  static requestPermission() { return Promise.resolve('granted'); }
  close() {}
};
Document.prototype.hasFocus = function () { return !window.__away; };
"""


def sessions_of(page):
    return page.evaluate("window.coda.tabs.map((t) => t.sessions[0])")


def second_tab(page):
    page.click("#new-tab")
    wait(page, "() => window.coda.tabs.length === 2 && window.coda.tabs[1].sessions[0]", what="a second tab")


def title(page):
    return page.evaluate("document.title")


@pytest.mark.parametrize("transport", ["ws", "poll"])
def test_a_notice_in_a_background_pane_shows_on_its_tab_and_in_the_title(open_tab, coda_server, transport):
    scripts = [RECORD_NOTIFICATIONS] + ([BLOCK_WEBSOCKET] if transport == "poll" else [])
    _, page = open_tab(init_scripts=scripts)
    wait_ready(page)
    assert page.evaluate("window.coda.transport") == transport
    second_tab(page)
    first = sessions_of(page)[0]
    dot = page.locator(".tab").nth(0).locator(".tab-dot")

    coda_server.type(first, r"printf '\033]777;notify;Claude Code;Claude needs your permission to use <Bash>\007'" + "\r")
    wait(page, "() => document.title.startsWith('(1) ')", what="the count in the title")
    assert dot.count() == 1 and dot.get_attribute("aria-label") == "1 unseen notice"
    assert page.locator(".tab").nth(1).locator(".tab-dot").count() == 0
    toast = "Claude Code \u2014 Shell 1: Claude needs your permission to use <Bash>"  # as text, not markup
    assert wait(page, "(t) => [...document.querySelectorAll('.toast')].some((n) => n.textContent === t)", toast)
    assert page.evaluate("window.__popups") == []  # the page is in front: no browser notification
    if transport == "ws":
        shot(page, "notify")

    page.evaluate("window.__away = true")
    coda_server.type(first, r"printf '\a'" + "\r")
    wait(page, "() => window.__popups.length === 1", what="a browser notification")
    assert page.evaluate("window.__popups") == [["Bell \u2014 Shell 1", "A program rang the bell."]]
    assert title(page).startswith("(2) ")

    page.evaluate("window.__away = false")
    page.locator(".tab").nth(0).click()  # looking at the pane clears it
    wait(page, "() => !document.title.startsWith('(')", what="the title without a count")
    assert dot.count() == 0

    page.click("#notify-btn")  # notifications off: still the dot, no browser notification
    assert page.get_attribute("#notify-btn", "aria-pressed") == "false"
    page.locator(".tab").nth(1).click()
    page.evaluate("window.__away = true")
    coda_server.type(first, r"printf '\033]9;quietly\007'" + "\r")
    wait(page, "() => document.title.startsWith('(1) ')", what="the count in the title")
    assert page.evaluate("window.__popups.length") == 1
    page.click("#notify-btn")
    assert page.get_attribute("#notify-btn", "aria-pressed") == "true"


def test_the_files_panel_lists_navigates_and_downloads(open_tab, coda_server):
    folder = coda_server.home / "projects" / "report"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.csv").write_text("quarter,revenue\nQ1,42\n")
    (folder / "notes.md").write_text("# Notes\n")
    tab, page = open_tab()
    wait_ready(page)
    page.click("#files-btn")
    page.locator("#files-table button.folder", has_text="projects/").click()
    page.locator("#files-table button.folder", has_text="report/").click()
    page.wait_for_selector("#files-table a:has-text('summary.csv')")
    assert page.inner_text("#files-path").replace("\n", "") == "~/projects/report"
    shot(page, "files")
    with page.expect_download() as info:
        page.click("#files-table a:has-text('summary.csv')")
    download = info.value
    assert download.suggested_filename == "summary.csv"
    assert Path(download.path()).read_text() == "quarter,revenue\nQ1,42\n"
    page.locator("#files-path button", has_text="~").click()  # back to the roots, by keyboard too
    page.wait_for_selector("#files-table button.folder:has-text('uploads/'), #files-table button.folder:has-text('projects/')")
    page.keyboard.press("Escape")


# ---- the real agents, their turn's end reaching the page ------------------------------------------

AGENTS = Path(os.environ.get("CODA_TEST_AGENTS", Path.home() / ".cache" / "coda-test" / "agents"))
needs_agents = pytest.mark.skipif(not (AGENTS / "bin" / "claude").exists(),
                                  reason="the agent CLIs are installed by tests/run.sh")


@pytest.fixture(scope="module")
def agent_rig(tmp_path_factory):
    from test_agents import seed_trust

    fake = FakeWorkspace().start()
    home = tmp_path_factory.mktemp("notify-agents-home")
    seed_trust(home)
    coda = configured(home, fake, PATH=f"{AGENTS / 'bin'}:{os.environ['PATH']}",
                      PAT_ROTATION_INTERVAL="3600", PAT_TOKEN_LIFETIME="7200")
    yield coda, fake
    coda.stop()
    fake.stop()


@needs_agents
@pytest.mark.parametrize("agent,title", [("claude", "Claude Code"), ("codex", "Codex"), ("gemini", "Gemini CLI")])
def test_an_agents_turn_end_reaches_the_page(browser, agent_rig, agent, title):
    from test_agents import Terminal, start_and_ask

    coda, fake = agent_rig
    tab = Tab(browser, coda, [RECORD_NOTIFICATIONS])
    try:
        page = tab.open()
        wait_ready(page)
        page.evaluate("window.__away = true")  # the user is in another window
        terminal = Terminal.__new__(Terminal)  # the page's own session, read over long-poll beside it
        terminal.coda, terminal.sid, terminal.raw = coda, sessions_of(page)[0], ""
        coda.type(terminal.sid, "cd ~/projects/work\r")
        terminal.offset = coda.wait_prompt(terminal.sid)
        start_and_ask(terminal, fake, agent, f"hello from the {agent} notice test")
        popups = wait(page, "(t) => window.__popups.some(([title]) => title.startsWith(t)) && window.__popups",
                      title, timeout=60, what=f"{title}'s notice")
        assert [title + " \u2014 Shell 1", "Finished its turn."] in popups, popups
        assert title_of_page(page).startswith("(")
        coda.type(terminal.sid, "\x03\x03")
    finally:
        tab.close()
        for session in coda.get("/api/sessions").json():
            coda.post("/api/session/close", {"session_id": session["session_id"]})
    assert not tab.problems, tab.problems


def title_of_page(page):
    return page.evaluate("document.title")
