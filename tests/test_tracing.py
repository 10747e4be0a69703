"""MLflow tracing (MLFLOW_TRACING_ENABLED) end to end: a real coda server against the
fake workspace writes the agents' hooks, the real Claude Code, Codex and Gemini CLI
run a turn with a tool call against the fake gateway, and the traces land in a real
local tracking store (sqlite in a temporary folder), in the expected experiment.
"""

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from agent_table import AGENT_ROWS
from conftest import ROOT, Coda, wait_for

CODA = [sys.executable, str(ROOT / "coda.py")]
AGENTS_BIN = Path(os.environ.get("CODA_TEST_AGENTS") or Path.home() / ".cache" / "coda-test" / "agents") / "bin"
pytestmark = pytest.mark.skipif(not (AGENTS_BIN / "claude").exists(), reason="the agent CLIs are installed by tests/run.sh")
TRACE_WAIT = 90  # seconds for a detached writer: Python and MLflow imports, then the store
USER_STOP_HOOK = {"hooks": [{"type": "command", "command": "echo user-stop-hook"}]}


class Server(Coda):
    """conftest's Coda against the fake workspace, with the setup steps at hand."""

    def __init__(self, home, workspace, **env):
        super().__init__(home, {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
                                "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": "", **env})

    def configure(self, workspace, replace=False):
        """Paste a token; the token steps (agent configs, tracing) then run (see finished())."""
        answer = self.post("/api/configure-pat", {"token": workspace.add_token(comment="pasted"), "replace": replace},
                           timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def steps(self):
        return {step["id"]: step for step in self.get("/api/setup-status", timeout=10).json()["steps"]}


@pytest.fixture
def start(tmp_path, workspace):
    servers = []

    def start_server(**env):
        servers.append(Server(tmp_path / "home", workspace, **env))
        return servers[-1]

    yield start_server
    for server in servers:
        server.stop()


def tracing_env(tmp_path):
    return {"MLFLOW_TRACING_ENABLED": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}


def agent(*names):
    missing = [n for n in names if not (AGENTS_BIN / n).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"agent CLIs not installed in {AGENTS_BIN}: {missing}")


def run_agent(home, argv, timeout=120):
    """One agent turn as a terminal would run it: HOME with CoDA's configs, cwd a folder under
    ~/projects whose trust the user has granted (CoDA trusts only what it restored, and Gemini CLI
    reads its ~/.gemini/.env only in a trusted folder)."""
    work = home / "projects" / "work"
    work.mkdir(parents=True, exist_ok=True)
    trusted = home / ".gemini" / "trustedFolders.json"
    trusted.write_text(json.dumps({**(json.loads(trusted.read_text()) if trusted.exists() else {}),
                                   str(work): "TRUST_FOLDER"}))
    env = {"PATH": f"{AGENTS_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "USER": "root", "TERM": "xterm-256color"}
    done = subprocess.run(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout, start_new_session=True)
    assert done.returncode == 0, (done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")[-3000:])
    return done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def finished(server, prefix, timeout=120):
    """The setup steps once every one whose id starts with `prefix` has finished."""
    def steps():
        steps = server.steps()
        chosen = [step for name, step in steps.items() if name.startswith(prefix)]
        return steps if chosen and all(step["status"] not in ("pending", "running") for step in chosen) else None

    return wait_for(steps, timeout, step=0.2, what=f"the setup steps {prefix}*")


def ready_tracing(server, workspace):
    """Configure a token with tracing on; the tracing step must create the experiment."""
    server.configure(workspace)
    steps = finished(server, "tracing")
    assert steps["tracing"]["status"] == "complete", steps["tracing"]
    settings = json.loads((server.home / ".coda" / "tracing.json").read_text())
    assert settings["experiment_name"] == f"/Users/{workspace.user_name}/coda"  # the default name
    assert oct((server.home / ".coda" / "tracing.json").stat().st_mode & 0o777) == "0o600"
    return settings


def traces(settings, count):
    """Poll the tracking store until the experiment holds `count` traces; return them, oldest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings["tracking_uri"])

    def found():
        got = client.search_traces(locations=[settings["experiment_id"]], order_by=["timestamp_ms ASC"])
        finished = [t for t in got if t.info.trace_metadata.get("mlflow.trace.infoFinalized") == "true"]  # spans land first
        return finished if len(finished) >= count else None

    # Read each again once it is final: a search reads a trace's row and its metadata in two SELECTs, which
    # SQLite answers from two moments, so one that lands between them has the flag without its session.
    finished = wait_for(found, TRACE_WAIT, step=0.2, what=f"{count} trace(s) in the tracking store")
    return [client.get_trace(trace.info.trace_id) for trace in finished]


def span_types(trace):
    return sorted(span.span_type for span in trace.data.spans)


def tracing_log(home):
    path = home / ".coda" / "tracing.log"
    return path.read_text(errors="replace") if path.exists() else "(no tracing.log)"


@agent("claude")
def test_a_claude_code_turn_becomes_a_trace_with_llm_and_tool_spans(start, workspace, tmp_path):
    server = start(**tracing_env(tmp_path))
    settings = ready_tracing(server, workspace)
    hooks = json.loads((server.home / ".claude" / "settings.json").read_text())["hooks"]["Stop"]
    assert [h["hooks"][0]["command"].rsplit(" ", 2)[-2:] for h in hooks] == [["trace", "claude"], ["notify", "claude"]]

    output, _ = run_agent(server.home, ["claude", "-p", "please USE_TOOL now", "--allowedTools", "Bash"])
    assert "FAKE-REPLY-anthropic tool said: FAKE-TOOL-OUTPUT" in output
    try:
        [trace] = traces(settings, 1)
    except AssertionError:
        raise AssertionError(tracing_log(server.home)) from None
    assert span_types(trace) == ["AGENT", "LLM", "TOOL"]
    tool = next(span for span in trace.data.spans if span.span_type == "TOOL")
    assert tool.name == "tool_Bash" and "FAKE-TOOL-OUTPUT" in json.dumps(tool.outputs)
    root = next(span for span in trace.data.spans if span.parent_id is None)
    assert root.inputs == {"prompt": "please USE_TOOL now"}
    assert "FAKE-REPLY-anthropic tool said" in json.dumps(root.outputs)
    assert trace.info.trace_metadata.get("mlflow.trace.session")
    assert not list((server.home / "projects").rglob("claude_tracing.log"))  # MLflow's log stays out of projects


@agent("claude")
def test_the_claude_hook_returns_at_once_and_traces_in_the_background(start, workspace, tmp_path):
    server = start(**tracing_env(tmp_path))
    settings = ready_tracing(server, workspace)
    run_agent(server.home, ["claude", "-p", "first turn"])
    [first] = traces(settings, 1)
    transcript = next((server.home / ".claude" / "projects").rglob("*.jsonl"))
    command = json.loads((server.home / ".claude" / "settings.json").read_text())["hooks"]["Stop"][0]["hooks"][0]["command"]
    hook_input = json.dumps({"session_id": "by-hand", "transcript_path": str(transcript), "hook_event_name": "Stop",
                             "cwd": str(server.home / "projects"), "stop_hook_active": False})

    started = time.perf_counter()  # the installed command, run by a shell as Claude Code runs it
    done = subprocess.run(["bash", "-c", command], input=hook_input.encode(), capture_output=True, timeout=30,
                          env={"HOME": str(server.home), "PATH": "/usr/bin:/bin"})
    elapsed = time.perf_counter() - started
    assert done.returncode == 0 and done.stdout == b"" and done.stderr == b""
    assert elapsed < 2.0, f"the hook took {elapsed:.2f} s"  # the writer alone takes several seconds
    [second] = [t for t in traces(settings, 2) if t.info.trace_metadata["mlflow.trace.session"] == "by-hand"]
    assert span_types(second) == span_types(first)


@agent("codex")
def test_a_codex_turn_becomes_a_trace_with_llm_and_tool_spans(start, workspace, tmp_path):
    server = start(**tracing_env(tmp_path))
    settings = ready_tracing(server, workspace)
    config = tomllib.loads((server.home / ".codex" / "config.toml").read_text())
    assert config["notify"][-3:] == ["notify", "codex", "--trace"]  # notices and tracing chained (test_notify)

    output, _ = run_agent(server.home, ["codex", "exec", "--skip-git-repo-check",
                                        "--dangerously-bypass-approvals-and-sandbox", "please USE_TOOL now"])
    assert "FAKE-REPLY-responses tool said: FAKE-TOOL-OUTPUT" in output
    try:
        [trace] = traces(settings, 1)
    except AssertionError:
        raise AssertionError(tracing_log(server.home)) from None
    assert span_types(trace) == ["AGENT", "LLM", "LLM", "TOOL"]  # the call, the tool, the answer
    spans = {span.span_type: span for span in trace.data.spans}
    assert spans["TOOL"].name == "tool_exec_command" and "FAKE-TOOL-OUTPUT" in json.dumps(spans["TOOL"].outputs)
    assert spans["TOOL"].inputs == {"cmd": "echo FAKE-TOOL-OUTPUT"}
    assert spans["AGENT"].inputs == {"prompt": "please USE_TOOL now"}
    assert spans["AGENT"].outputs == {"response": "FAKE-REPLY-responses tool said: FAKE-TOOL-OUTPUT"}
    llms = sorted((s for s in trace.data.spans if s.span_type == "LLM"), key=lambda s: s.start_time_ns)
    assert llms[0].start_time_ns <= spans["TOOL"].start_time_ns <= llms[1].start_time_ns
    assert llms[1].attributes["mlflow.chat.tokenUsage"]["input_tokens"] > 0
    assert trace.info.trace_metadata["mlflow.trace.session"]  # Codex's thread id


@agent("gemini")
def test_a_gemini_turn_becomes_one_trace_and_the_terminal_stays_clean(start, workspace, tmp_path):
    server = start(**tracing_env(tmp_path))
    settings = ready_tracing(server, workspace)
    run_agent(server.home, ["gemini", "-p", "hi"])
    [plain] = traces(settings, 1)

    output, errors = run_agent(server.home, ["gemini", "-p", "please USE_TOOL now", "--yolo"])
    assert "FAKE-REPLY-gemini tool said" in output
    assert "hook" not in (output + errors).lower(), errors  # nothing about hooks in the terminal
    try:
        second = traces(settings, 2)[1]
    except AssertionError:
        raise AssertionError(tracing_log(server.home)) from None
    time.sleep(2)
    assert len(traces(settings, 2)) == 2  # one trace per prompt, not one per model call
    assert span_types(plain) == ["AGENT", "LLM"]
    assert span_types(second) == ["AGENT", "LLM", "LLM", "TOOL"]
    tool = next(span for span in second.data.spans if span.span_type == "TOOL")
    assert tool.name == "tool_run_shell_command" and "FAKE-TOOL-OUTPUT" in json.dumps(tool.outputs)
    root = next(span for span in second.data.spans if span.parent_id is None)
    assert root.inputs == {"prompt": "please USE_TOOL now"}
    assert root.outputs == {"response": "FAKE-REPLY-gemini tool said: Output: FAKE-TOOL-OUTPUT"}


def test_tracing_off_writes_no_hooks_and_never_imports_mlflow(start, workspace):
    # PYTHONPROFILEIMPORTTIME makes Python print every import it makes to stderr (the server's log).
    server = start(PYTHONPROFILEIMPORTTIME="1")
    server.configure(workspace)
    assert "tracing" not in finished(server, "configure-")
    assert not trace_hooks(server.home)  # the notice hooks (test_notify) stay
    assert not (server.home / ".coda" / "tracing.json").exists()
    imported = [line.rsplit("|", 1)[-1].strip() for line in server.log().splitlines() if line.startswith("import time:")]
    assert "databricks.sdk.core" in imported  # the check sees what the server imports late, on demand
    assert not [name for name in imported if name.split(".")[0] == "mlflow"]


def test_switching_tracing_off_removes_the_hooks_and_keeps_the_users_own(start, workspace, tmp_path):
    home = tmp_path / "home"
    settings_path = home / ".claude" / "settings.json"
    settings_path.parent.mkdir(parents=True)
    settings_path.write_text(json.dumps({"hooks": {"Stop": [USER_STOP_HOOK],
                                                   "PostToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "true"}]}]}}))
    server = start(**tracing_env(tmp_path))
    ready_tracing(server, workspace)
    server.configure(workspace, replace=True)  # the writers run again: still one hook each
    finished(server, "configure-")
    claude = json.loads(settings_path.read_text())["hooks"]
    assert claude["Stop"][0] == USER_STOP_HOOK and len(claude["Stop"]) == 3
    assert claude["Stop"][1]["hooks"][0]["command"].endswith(" trace claude")
    assert len(trace_hooks(home)) == 3  # one for each agent
    server.stop()

    server = start()  # tracing off
    server.configure(workspace)
    finished(server, "configure-")
    claude = json.loads(settings_path.read_text())["hooks"]
    assert claude["Stop"][0] == USER_STOP_HOOK and len(claude["Stop"]) == 2 and "PostToolUse" in claude
    assert not trace_hooks(home)
    assert not (home / ".coda" / "tracing.json").exists()


def test_a_users_own_codex_notify_is_chained_after_tracing(start, workspace, tmp_path):
    config = tmp_path / "home" / ".codex" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('notify = ["notify-send", "Codex"]\n')
    server = start(**tracing_env(tmp_path))
    ready_tracing(server, workspace)
    assert tomllib.loads(config.read_text())["notify"][-5:] == ["codex", "--trace", "--", "notify-send", "Codex"]


def trace_hooks(home):
    """CoDA's tracing hooks in the three agents' configs."""
    claude = json.loads((home / ".claude" / "settings.json").read_text()).get("hooks", {})
    gemini = json.loads((home / ".gemini" / "settings.json").read_text()).get("hooks", {})
    commands = [hook.get("command", "") for groups in (*claude.values(), *gemini.values())
                for group in groups for hook in group.get("hooks", [])]
    notify = tomllib.loads((home / ".codex" / "config.toml").read_text()).get("notify", [])
    return [c for c in commands if " trace " in c] + (["codex"] if "--trace" in notify else [])


def test_a_hook_without_tracing_set_up_says_so_in_its_log_and_nothing_else(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    started = time.perf_counter()
    done = subprocess.run(CODA + ["trace", "codex", json.dumps({"type": "agent-turn-complete", "thread-id": "t",
                                                                  "turn-id": "u", "input-messages": ["hi"]})],
                          env={**os.environ, "HOME": str(home)}, capture_output=True, timeout=30)
    assert done.returncode == 0 and done.stdout == done.stderr == b""
    assert time.perf_counter() - started < 2.0
    log = wait_for(lambda: "not traced" in tracing_log(home) and tracing_log(home), 30, step=0.2,
                   what="the tracing log")
    assert "tracing is not set up" in log
    assert oct((home / ".coda" / "tracing.log").stat().st_mode & 0o777) == "0o600"


def test_a_codex_helper_thread_without_a_rollout_is_not_traced(tmp_path):
    """Codex's TUI also notifies for its title writer, a thread it keeps no rollout of."""
    home = tmp_path / "home"
    settings = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment_id": "1", "experiment_name": "x"}
    (home / ".coda").mkdir(parents=True)
    (home / ".coda" / "tracing.json").write_text(json.dumps(settings))
    hook = {"type": "agent-turn-complete", "thread-id": "0000-helper", "turn-id": "1", "client": "codex-tui",
            "input-messages": ["Generate a concise, single-line task title"], "last-assistant-message": "{}"}
    subprocess.run(CODA + ["trace", "codex", json.dumps(hook)], env={**os.environ, "HOME": str(home)}, timeout=30)
    log = wait_for(lambda: "not traced" in tracing_log(home) and tracing_log(home), 30, step=0.2,
                   what="the tracing log")
    assert "thread 0000-helper has no session rollout" in log
    assert not (tmp_path / "mlflow.db").exists()  # MLflow never opened the store


def test_exactly_the_agents_whose_row_names_a_tracer_have_a_trace_hook(tmp_path):
    """`coda.py trace NAME` answers at once for a traced agent (the fast path at the top of coda.py
    and TRACERS both read the rows) and is a usage error for the others."""
    home = tmp_path / "home"
    home.mkdir()
    for row in AGENT_ROWS:
        done = subprocess.run(CODA + ["trace", row.name, "{}"], env={**os.environ, "HOME": str(home)},
                              capture_output=True, text=True, timeout=60)
        if row.tracer:
            assert done.returncode == 0 and done.stderr == "", row.name
            wait_for(lambda: f"{row.name} turn not traced" in tracing_log(home), 30, step=0.2, what=row.name)
        else:
            assert done.returncode == 2 and "usage: coda.py trace" in done.stderr, row.name
