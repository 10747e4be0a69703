"""The real agent CLIs from npm and PyPI, run in CoDA terminals after /api/configure-pat,
against the fake workspace's AI Gateway: each one-shot reaches the right path and model
with a live token; each interactive session started before a forced rotation (the old
token revoked) still gets its next answer after it."""

import os
import re
import time
from pathlib import Path

import pytest

from conftest import Coda
from fake_workspace import FakeWorkspace

AGENTS = Path(os.environ.get("CODA_TEST_AGENTS", Path.home() / ".cache" / "coda-test" / "agents"))
pytestmark = pytest.mark.skipif(not (AGENTS / "bin" / "claude").exists(),
                                reason="the agent CLIs are installed by tests/run.sh")

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-B]|\x1b[=>]")
# agent: (one-shot command, gateway API, path the call must reach, model, interactive command, ready marker)
CASES = {
    "claude": ("claude -p", "anthropic", "/anthropic/v1/messages", "databricks-claude-opus-4-7", "claude", "auto mode"),
    "codex": ("codex exec --skip-git-repo-check", "responses", "/openai/v1/responses", "databricks-gpt-5-5", "codex",
              "Ask Codex"),
    "gemini": ("gemini -p", "gemini", "/gemini/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent",
               "databricks-gemini-2-5-pro", "gemini", "Type your message"),
    "opencode": ("opencode run", "chat", "/mlflow/v1/chat/completions", "databricks-claude-opus-4-6", "opencode",
                 "Ask anything"),
    "hermes": ("hermes -z", "chat", "/mlflow/v1/chat/completions", "databricks-claude-opus-4-6", "hermes",
               "Welcome to Hermes"),
}


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    workspace = FakeWorkspace().start()
    env = {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
           "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": "",  # no internet here
           "PATH": f"{AGENTS / 'bin'}:{os.environ['PATH']}",
           "PAT_ROTATION_INTERVAL": "3600", "PAT_TOKEN_LIFETIME": "7200"}
    coda = Coda(tmp_path_factory.mktemp("agents-home"), env)
    pasted = workspace.add_token(comment="pasted by the user")
    coda.api("/api/configure-pat", {"token": pasted})
    coda.pasted = pasted
    yield coda, workspace
    coda.stop()
    workspace.stop()


class Terminal:
    """A CoDA session read over long-poll, with the escape sequences taken out."""

    def __init__(self, coda):
        self.coda = coda
        self.sid = coda.new_session(cols=120, rows=40)
        self.offset = coda.wait_prompt(self.sid)
        self.raw = ""

    def text(self):
        return ANSI.sub("", self.raw)

    def read(self, wait):
        answer = self.coda.api("/api/output", {"session_id": self.sid, "since": self.offset, "wait": wait})
        self.raw += answer["output"]
        self.offset = answer["next_offset"]

    def tail(self):
        """What the screen ends with now, for a failure message."""
        self.read(0)
        return self.text()[-1500:]

    def wait_for(self, needle, timeout):
        """Wait until `needle` is on screen; spaces are ignored, since TUIs often draw
        them as cursor moves, which the escape-stripping takes out."""
        deadline = time.time() + timeout
        while needle.replace(" ", "") not in self.text().replace(" ", ""):
            assert time.time() < deadline, f"{needle!r} not seen; screen ends with {self.text()[-1500:]!r}"
            self.read(1)

    def type_line(self, line):
        """Type a line, and press Enter only once it shows: a TUI that reads the two
        together takes them for a paste and the Enter for a newline (Codex does)."""
        seen = len(self.raw)
        self.coda.type(self.sid, line)
        deadline = time.time() + 30
        while line.replace(" ", "") not in ANSI.sub("", self.raw[seen:]).replace(" ", ""):
            assert time.time() < deadline, f"{line!r} was not echoed; screen ends with {self.text()[-1500:]!r}"
            self.read(1)
        time.sleep(0.2)  # and the paste-burst window it was read in has closed
        self.coda.type(self.sid, "\r")

    def close(self):
        self.coda.close_session(self.sid)


def coda_tokens(workspace):
    return {t.value for t in workspace.live_tokens(comment_contains="CoDA")}


@pytest.mark.parametrize("agent", list(CASES))
def test_one_shot_reaches_the_gateway_with_a_live_token(rig, agent):
    coda, workspace = rig
    command, api, path, model, _, _ = CASES[agent]
    terminal = Terminal(coda)
    try:
        mark = len(workspace.gateway_requests)
        terminal.type_line(f"{command} 'hello from {agent}'; echo EXIT-{agent}-$?")
        terminal.wait_for(f"EXIT-{agent}-0", timeout=120)
        assert f"FAKE-REPLY-{api}: hello from {agent}" in terminal.text()
        calls = [r for r in workspace.gateway_requests[mark:] if r["api"] == api and r["method"] == "POST"]
        assert calls, f"{agent} made no {api} call"
        answered = [r for r in calls if r["status"] == 200]
        assert answered and all(r["token_live"] for r in answered)
        assert any(r["path"].startswith(path) for r in answered), [r["path"] for r in calls]
        assert any(r["model"] == model for r in answered), [r["model"] for r in calls]
        assert all(r["token"] in coda_tokens(workspace) for r in answered)  # CoDA's minted token, not the pasted one
    finally:
        terminal.close()


def arrived(workspace, since):
    """The gateway requests since `since`, as (api, status), for a failure message."""
    return [(r["api"], r["status"]) for r in workspace.gateway_requests[since:]]


@pytest.mark.parametrize("agent,dead_token_status", [(a, 401) for a in CASES] + [("codex", 403), ("claude", 403)])
def test_interactive_session_survives_a_rotation(rig, agent, dead_token_status):
    coda, workspace = rig
    workspace.gateway_auth_failure_status = dead_token_status  # gateways have been seen to say either
    _, api, _, _, command, ready = CASES[agent]
    terminal = Terminal(coda)
    try:
        terminal.type_line(command)
        terminal.wait_for(ready, timeout=60)
        time.sleep(2)  # the prompt is drawn before it takes input
        mark = len(workspace.gateway_requests)
        terminal.type_line("first question")
        assert workspace.wait_for_gateway(api=api, status=200, since=mark, timeout=60), \
            f"{agent}: no first answer; requests {arrived(workspace, mark)}; screen ends with {terminal.tail()!r}"

        old = coda_tokens(workspace)
        coda.api("/api/configure-pat", {"token": coda.pasted, "replace": True})  # a forced rotation
        deadline = time.time() + 30
        while any(workspace.find_token(value).live() for value in old):
            assert time.time() < deadline, "the old CoDA token was not revoked"
            time.sleep(0.2)

        mark = len(workspace.gateway_requests)
        terminal.type_line("second question")
        answer = workspace.wait_for_gateway(api=api, status=200, since=mark, timeout=90)
        assert answer, (f"{agent}: no answer after the rotation; requests {arrived(workspace, mark)}; "
                        f"screen ends with {terminal.tail()!r}")
        assert answer["token"] not in old
        terminal.wait_for(f"FAKE-REPLY-{api}", timeout=30)
    finally:
        workspace.gateway_auth_failure_status = 401
        terminal.close()


def test_opencode_completes_a_tool_call_through_the_proxy(rig):
    coda, workspace = rig
    terminal = Terminal(coda)
    try:
        mark = len(workspace.gateway_requests)
        terminal.type_line("opencode run 'please USE_TOOL now'; echo EXIT-tool-$?")
        terminal.wait_for("EXIT-tool-0", timeout=180)
        assert "FAKE-REPLY-chat tool said: FAKE-TOOL-OUTPUT" in terminal.text()
        turns = [r for r in workspace.gateway_requests[mark:] if r["api"] == "chat" and r["status"] == 200]
        with_result = [r for r in turns if any(m.get("role") == "tool" for m in r["body"].get("messages", []))]
        assert with_result, "no request carried the tool's result"
        assert all(r["token"] in coda_tokens(workspace) for r in turns)  # the proxy's current token
    finally:
        terminal.close()
