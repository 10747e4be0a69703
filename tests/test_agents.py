"""The real agent CLIs from npm and PyPI, run in CoDA terminals after /api/configure-pat,
against the fake workspace's AI Gateway: each one-shot reaches the right path and model
with a live token; each interactive session started before a forced rotation (the old
token revoked) still gets its next answer after it."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_table import AGENT_ROWS, BY_NAME
from conftest import ROOT, Coda
from fake_workspace import FakeWorkspace, serving_endpoint

AGENTS = Path(os.environ.get("CODA_TEST_AGENTS", Path.home() / ".cache" / "coda-test" / "agents"))
pytestmark = pytest.mark.skipif(not (AGENTS / "bin" / "claude").exists(),
                                reason="the agent CLIs are installed by tests/run.sh")

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-B]|\x1b[=>]")
# agent: (one-shot command, gateway API, path the call must reach, interactive command, ready marker);
# the model each must ask for is its row's default (agent_table).
CASES = {
    "claude": ("claude -p", "anthropic", "/anthropic/v1/messages", "claude", "auto mode"),
    "codex": ("codex exec --skip-git-repo-check", "responses", "/openai/v1/responses", "codex", "Ask Codex"),
    "gemini": ("gemini -p", "gemini", "/gemini/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent",
               "gemini", "Type your message"),
    "opencode": ("opencode run", "chat", "/mlflow/v1/chat/completions", "opencode", "Ask anything"),
    "hermes": ("hermes -z", "chat", "/mlflow/v1/chat/completions", "hermes", "Welcome to Hermes"),
}


def test_every_agent_in_the_table_has_a_case():
    assert list(CASES) == [row.name for row in AGENT_ROWS]


# What each agent shows where it asks whether to trust a folder.
TRUST_PROMPTS = {"claude": "Is this a project you created or one you trust", "codex": "Trust this folder?",
                 "gemini": "Do you trust the files in this folder?"}


def seed_trust(home):
    """The HOME an earlier CoDA left (trusting all of ~/projects, and $HOME for Gemini CLI), where
    the user has also accepted each agent's trust prompt for ~/projects/work, the tests' folder."""
    projects, work = home / "projects", home / "projects" / "work"
    work.mkdir(parents=True)
    (home / ".claude.json").write_text(json.dumps({"projects": {
        str(projects): {"hasTrustDialogAccepted": True}, str(work): {"hasTrustDialogAccepted": True}}}))
    (home / ".codex").mkdir()
    (home / ".codex" / "config.toml").write_text(
        f'[projects."{projects}"]\ntrust_level = "trusted"\n\n[projects."{work}"]\ntrust_level = "trusted"\n')
    (home / ".gemini").mkdir()
    (home / ".gemini" / "trustedFolders.json").write_text(json.dumps(
        {str(projects): "TRUST_FOLDER", str(home): "TRUST_FOLDER", str(work): "TRUST_FOLDER"}))


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    workspace = FakeWorkspace().start()
    home = tmp_path_factory.mktemp("agents-home")
    seed_trust(home)
    env = {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
           "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": "",  # no internet here
           "PATH": f"{AGENTS / 'bin'}:{os.environ['PATH']}",
           "PAT_ROTATION_INTERVAL": "3600", "PAT_TOKEN_LIFETIME": "7200"}
    coda = Coda(home, env)
    pasted = workspace.add_token(comment="pasted by the user")
    coda.api("/api/configure-pat", {"token": pasted})
    coda.pasted = pasted
    yield coda, workspace
    coda.stop()
    workspace.stop()


class Terminal:
    """A CoDA session read over long-poll, with the escape sequences taken out."""

    def __init__(self, coda, folder="~/projects/work"):
        self.coda = coda
        self.sid = coda.new_session(cols=120, rows=40)
        coda.type(self.sid, f"cd {folder}\r")
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
    command, api, path, _, _ = CASES[agent]
    model = BY_NAME[agent].default_model
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


def start_and_ask(terminal, workspace, agent, question):
    """Start the agent in the terminal and, once it is ready, ask `question`: the gateway must answer it."""
    _, api, _, command, ready = CASES[agent]
    terminal.type_line(command)
    terminal.wait_for(ready, timeout=60)
    time.sleep(2)  # the prompt is drawn before it takes input
    mark = len(workspace.gateway_requests)
    terminal.type_line(question)
    assert workspace.wait_for_gateway(api=api, status=200, since=mark, timeout=60), \
        f"{agent}: no answer to {question!r}; requests {arrived(workspace, mark)}; screen ends with {terminal.tail()!r}"


@pytest.mark.parametrize("agent,dead_token_status", [(a, 401) for a in CASES] + [("codex", 403), ("claude", 403)])
def test_interactive_session_survives_a_rotation(rig, agent, dead_token_status):
    coda, workspace = rig
    workspace.gateway_auth_failure_status = dead_token_status  # gateways have been seen to say either
    api = CASES[agent][1]
    terminal = Terminal(coda)
    try:
        start_and_ask(terminal, workspace, agent, "first question")

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


def trust_entries(home):
    """The folders each agent's config trusts."""
    import tomllib

    claude = json.loads((home / ".claude.json").read_text()).get("projects", {})
    codex = tomllib.loads((home / ".codex" / "config.toml").read_text()).get("projects", {})
    return {"claude": {p for p, e in claude.items() if e.get("hasTrustDialogAccepted")},
            "codex": {p for p, e in codex.items() if e.get("trust_level") == "trusted"},
            "gemini": set(json.loads((home / ".gemini" / "trustedFolders.json").read_text()))}


def test_the_old_blanket_trust_is_gone_and_the_users_own_stays(rig):
    coda, _ = rig
    work = str(coda.home / "projects" / "work")
    assert trust_entries(coda.home) == {"claude": {work}, "codex": {work}, "gemini": {work}}


@pytest.fixture(scope="module")
def restored_and_cloned(rig, tmp_path_factory):
    """A project `coda.py restore` brought back, and a repository the user has just cloned."""
    coda, workspace = rig
    with workspace.lock:
        root = f"/Workspace/Users/{workspace.user_name}/projects/restored"
        workspace._mkdirs(root)
        workspace.files[root + "/README.md"] = {"object_type": "FILE", "content": b"# Restored\n", "language": None}
    env = {"HOME": str(coda.home), "PATH": os.environ["PATH"]}
    subprocess.run([sys.executable, str(ROOT / "coda.py"), "restore"], env=env, check=True, timeout=120)
    source = tmp_path_factory.mktemp("upstream")
    for argv in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "upstream"]):
        subprocess.run(["git", "-c", "user.name=U", "-c", "user.email=u@example.com", "-C", str(source), *argv],
                       env=env, check=True)
    subprocess.run(["git", "clone", "-q", str(source), str(coda.home / "projects" / "cloned")], env=env, check=True)
    return coda.home / "projects" / "restored", coda.home / "projects" / "cloned"


@pytest.mark.parametrize("agent", list(TRUST_PROMPTS))
def test_a_restored_project_is_trusted_and_a_fresh_clone_is_not(rig, restored_and_cloned, agent):
    coda, workspace = rig
    restored, cloned = restored_and_cloned
    trusted = [Path(p) for p in trust_entries(coda.home)[agent]]
    assert not [p for p in trusted if p == cloned or p in cloned.parents], trusted
    command = CASES[agent][3]
    terminal = Terminal(coda, cloned)
    try:
        terminal.type_line(command)
        terminal.wait_for(TRUST_PROMPTS[agent], timeout=60)  # the agent's own question: CoDA did not answer it
    finally:
        terminal.close()
    assert restored.resolve() in trusted
    terminal = Terminal(coda, restored)
    try:
        start_and_ask(terminal, workspace, agent, "hello from the restored project")
        assert TRUST_PROMPTS[agent].replace(" ", "") not in terminal.text().replace(" ", "")
    finally:
        terminal.close()


def test_opencode_keeps_a_model_coda_has_no_row_for(rig, tmp_path):
    """HERMES_MODEL names a model newer than CoDA's table: OpenCode still asks the gateway for it
    (undeclared, it once fell back to a Google model and failed for want of a Google API key)."""
    _, workspace = rig
    model = "databricks-claude-opus-9-9"
    workspace.serving_endpoints.append(serving_endpoint(model))  # the workspace serves it (else CoDA picks another)
    env = {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
           "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": "", "PATH": f"{AGENTS / 'bin'}:{os.environ['PATH']}",
           "HERMES_MODEL": model, "ENABLE_HERMES": "0"}
    coda = Coda(tmp_path / "home", env)
    try:
        coda.api("/api/configure-pat", {"token": workspace.add_token(comment="pasted by the user")})
        config = coda.home / ".config" / "opencode" / "opencode.json"
        deadline = time.time() + 60
        while not (config.exists() and model in config.read_text()):
            assert time.time() < deadline, "OpenCode was not configured"
            time.sleep(0.2)
        settings = json.loads(config.read_text())
        assert settings["enabled_providers"] == ["databricks"]
        assert set(settings["provider"]["databricks"]["models"]) >= {model, "databricks-claude-opus-4-7"}
        terminal = Terminal(coda, "~")
        try:
            mark = len(workspace.gateway_requests)
            terminal.type_line("opencode run 'hello from a new model'; echo EXIT-new-$?")
            terminal.wait_for("EXIT-new-0", timeout=120)
            assert "FAKE-REPLY-chat: hello from a new model" in terminal.text()
            calls = [r for r in workspace.gateway_requests[mark:] if r["api"] == "chat" and r["status"] == 200]
            assert calls and all(r["model"] == model for r in calls), [r["model"] for r in calls]
        finally:
            terminal.close()
    finally:
        coda.stop()
