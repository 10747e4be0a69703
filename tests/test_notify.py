"""Notices (issue 13): the bell, OSC 9 and OSC 777 in a session's output, and the agents' own hooks
(which write OSC 777 to their terminal through `coda.py notify`), reach every open page as
{"type": "notify"} over the WebSocket and in the long-poll answers."""

import json
import os
import subprocess
import sys
import time
import tomllib

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


@pytest.fixture
def workspace():
    fake = FakeWorkspace().start()
    yield fake
    fake.stop()


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
