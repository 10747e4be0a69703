"""What each agent spends: the local proxy counts requests and tokens per agent, model and day
from the answers of the fake gateway, for every API shape, JSON and streamed; the counts survive
a restart, go to the Delta log table, and GET /api/usage answers them with estimated costs
(the price table overridable, bad prices a clear error). The AI Gateway's usage system table
gives the same view where it is readable, and says why where not. Real agent CLIs are counted
end to end, and the page shows the panel in real Chromium."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Coda, free_port, wait_for

sys.path.insert(0, str(ROOT))
import coda  # noqa: E402

AGENTS = Path(os.environ.get("CODA_TEST_AGENTS", Path.home() / ".cache" / "coda-test" / "agents"))
OPUS = "databricks-claude-opus-4-7"
TODAY = time.strftime("%Y-%m-%d", time.gmtime())


def start(home, workspace, **env):
    """A CoDA with a token configured, whose proxy holds its port."""
    server = Coda(home, {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
                         "PAT_ROTATION_INTERVAL": "3600", "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": "", **env})
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    server.proxy = f"http://127.0.0.1:{server.proxy_port}"
    wait_for(lambda: requests.get(server.proxy + "/health", timeout=5).ok)
    return server


@pytest.fixture
def server(tmp_path, workspace):
    coda_server = start(tmp_path / "home", workspace)
    yield coda_server
    coda_server.stop(signal.SIGKILL)


def agent_key(server, agent):
    return (server.home / ".coda" / "proxy-key").read_text().strip() + "." + agent


# (route path, request body): each API shape, JSON and streamed, as the agents send it.
CALLS = {
    "anthropic-json": ("/anthropic/v1/messages", {"model": OPUS, "max_tokens": 10,
                                                  "messages": [{"role": "user", "content": "hi"}]}),
    "anthropic-sse": ("/anthropic/v1/messages", {"model": OPUS, "max_tokens": 10, "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]}),
    "responses-json": ("/openai/v1/responses", {"model": "databricks-gpt-5-5", "input": "hi", "stream": False}),
    "responses-sse": ("/openai/v1/responses", {"model": "databricks-gpt-5-5", "input": "hi", "stream": True}),
    "chat-json": ("/mlflow/v1/chat/completions", {"model": "databricks-claude-opus-4-6",
                                                  "messages": [{"role": "user", "content": "hi"}]}),
    "chat-sse": ("/mlflow/v1/chat/completions", {"model": "databricks-claude-opus-4-6", "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]}),
    "gemini-json": ("/gemini/v1beta/models/databricks-gemini-2-5-pro:generateContent",
                    {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
    "gemini-sse": ("/gemini/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent?alt=sse",
                   {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
    "gemini-array": ("/gemini/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent",
                     {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
}


def call(server, agent, shape):
    path, body = CALLS[shape]
    answer = requests.post(server.proxy + path, json=body, timeout=30, stream=True,
                           headers={"Authorization": f"Bearer {agent_key(server, agent)}"})
    assert answer.status_code == 200, answer.text
    return b"".join(answer.iter_content(None))


def today(server, agent, model):
    usage = server.get("/api/usage").json()
    [row] = [a for a in usage["agents"] if a["agent"] == agent]
    return {m["model"]: m["today"] for m in row["models"]}.get(model)


@pytest.mark.parametrize("shape", list(CALLS))
def test_each_answer_shape_is_counted_for_the_agent_that_sent_it(server, workspace, shape):
    workspace.chat_stream_usage = True  # the gateway sends usage in the last chunk (CoDA does not ask)
    agent = {"anthropic": "claude", "responses": "codex", "chat": "hermes", "gemini": "gemini"}[shape.split("-")[0]]
    model = CALLS[shape][1].get("model", "databricks-gemini-2-5-pro")
    call(server, agent, shape)
    call(server, agent, shape)
    counted = today(server, agent, model)
    assert counted and {k: counted[k] for k in ("requests", "input_tokens", "output_tokens")} == {
        "requests": 2, "input_tokens": 84, "output_tokens": 14}, counted
    others = [a for a in server.get("/api/usage").json()["agents"] if a["agent"] != agent]
    assert all(a["total"]["today"]["requests"] == 0 for a in others)  # the key tells the agents apart


def test_an_answer_without_usage_counts_a_request_and_nothing_else(server, workspace):
    events = call(server, "opencode", "chat-sse").decode()  # no usage chunk: none was asked for
    assert events.rstrip().endswith("data: [DONE]") and "\"finish_reason\": \"stop\"" in events
    counted = today(server, "opencode", "databricks-claude-opus-4-6")
    assert (counted["requests"], counted["input_tokens"], counted["output_tokens"]) == (1, 0, 0)


def test_the_plain_proxy_key_still_works_and_counts_as_another_caller(server):
    path, body = CALLS["chat-json"]
    key = (server.home / ".coda" / "proxy-key").read_text().strip()
    assert requests.post(server.proxy + path, json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=30).status_code == 200
    assert today(server, "other", "databricks-claude-opus-4-6")["requests"] == 1
    assert requests.post(server.proxy + path, json=body, headers={"Authorization": f"Bearer {key}.nobody"},
                         timeout=30).status_code == 401


# The meter alone: every chunking of a real answer gives the same count; garbage gives none.
def anthropic_stream():
    usage = {"input_tokens": 42, "output_tokens": 1, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 5}
    return (f'event: message_start\ndata: {json.dumps({"type": "message_start", "message": {"usage": usage}})}\n\n'
            'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"the \\"usage\\": {\\"output_tokens\\": 999}"}}\n\n'
            'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n').encode()


class Counter:
    def __init__(self):
        self.added = []

    def add(self, *args):
        self.added.append(args)


def metered(chunks):
    counter = Counter()
    meter = coda.UsageMeter("claude", OPUS, counter)
    for chunk in chunks:
        meter.feed(chunk)
    meter.finish()
    return counter.added


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10 ** 6])
def test_the_meter_reads_a_stream_however_it_is_chunked(size):
    data = anthropic_stream()
    assert metered([data[i:i + size] for i in range(0, len(data), size)]) == [("claude", OPUS, 50, 7)]


@pytest.mark.parametrize("answer", [b"not json at all", b'{"usage": {"input_tokens": "many"}}',
                                    b'{"usage": {"input_tokens": -5, "output_tokens": true}}',
                                    b'{"usage": ' + b"[" * 100000, b'data: {"usage": null}\n\n', b"\xff\xfe" * 1000])
def test_a_malformed_answer_counts_a_request_and_nothing_else(answer):
    assert metered([answer]) == [("claude", OPUS, 0, 0)]


def test_the_counts_survive_a_restart_and_reach_the_delta_table(tmp_path, workspace):
    home = tmp_path / "home"
    env = {"CODA_LOG_TABLE": "main.coda.logs", "CODA_LOG_WAREHOUSE_ID": "wh1"}
    first = start(home, workspace, **env)
    try:
        call(first, "claude", "anthropic-sse")
        call(first, "codex", "responses-json")
    finally:
        first.stop()  # SIGTERM: the counts are saved, and their records flushed to the table
    saved = home / ".coda" / "usage.json"
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    records = [p["value"] for s in workspace.sql_statements if s["statement"].startswith("INSERT")
               for p in s.get("parameters", []) if p["name"].startswith("message_") and '"agent"' in p["value"]]
    assert {"day": TODAY, "agent": "claude", "model": OPUS, "requests": 1, "input_tokens": 42,
            "output_tokens": 7} in [json.loads(r) for r in records], records

    second = start(home, workspace)
    try:
        usage = second.get("/api/usage").json()
        [claude] = [a for a in usage["agents"] if a["agent"] == "claude"]
        assert claude["total"]["today"]["requests"] == 1 and claude["total"]["session"]["requests"] == 0
        call(second, "claude", "anthropic-json")
        assert today(second, "claude", OPUS)["requests"] == 2
    finally:
        second.stop(signal.SIGKILL)


def test_a_file_that_is_not_usage_counts_is_set_aside(tmp_path, workspace):
    home = tmp_path / "home"
    (home / ".coda").mkdir(parents=True)
    (home / ".coda" / "usage.json").write_text('{"days": {"2026-01-01": {"claude": "lots"}}}')
    server = start(home, workspace)
    try:
        assert server.get("/api/usage").json()["total"]["today"]["requests"] == 0
        assert "lots" in (home / ".coda" / "usage.json.unreadable").read_text()
    finally:
        server.stop(signal.SIGKILL)


def test_usage_answer_shape_and_estimated_cost(server):
    call(server, "claude", "anthropic-json")
    usage = server.get("/api/usage").json()
    assert set(usage) >= {"source", "day", "session_started", "currency", "prices", "agents", "total"}
    assert usage["source"] == "proxy" and usage["day"] == TODAY and usage["currency"] == "USD"
    assert [a["agent"] for a in usage["agents"]] == ["claude", "codex", "gemini", "opencode", "hermes"]
    [claude] = [a for a in usage["agents"] if a["agent"] == "claude"]
    assert claude["label"] == "Claude Code"
    expected = {"requests": 1, "input_tokens": 42, "output_tokens": 7, "cost": round((42 * 5 + 7 * 25) / 1e6, 6)}
    assert claude["models"] == [{"model": OPUS, "today": expected, "session": expected}]
    assert claude["total"] == {"today": expected, "session": expected} == usage["total"]
    assert server.get("/api/usage?source=elsewhere").status_code == 400


def test_prices_can_be_overridden_inline_or_in_a_file(tmp_path, workspace):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({OPUS: {"input": 100, "output": 1000}}))
    for setting in (json.dumps({OPUS: {"input": 100, "output": 1000}}), str(prices)):
        server = start(tmp_path / f"home{len(setting)}", workspace, CODA_PRICES=setting)
        try:
            call(server, "claude", "anthropic-json")
            assert today(server, "claude", OPUS)["cost"] == round((42 * 100 + 7 * 1000) / 1e6, 6)
            assert "price_error" not in server.get("/api/usage").json()
        finally:
            server.stop(signal.SIGKILL)


@pytest.mark.parametrize("setting,said", [
    ("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object"),
    ('{"m": {"input": -1, "output": 2}}', "gives m"), ('{"m": {"input": 1}}', "gives m"),
    ('{"m": {"input": true, "output": 2}}', "gives m"), ('{"m": {"input": NaN, "output": 2}}', "is not valid JSON"),
    ('{"m": {"input": 1, "output": 2, "cached": 0}}', "gives m"), ('{"bad name!": {"input": 1, "output": 2}}', "names the model"),
    ("/nonexistent/prices.json", "cannot be read")])
def test_bad_prices_are_a_clear_error(setting, said):
    with pytest.raises(ValueError, match=said):
        coda.parse_prices(setting)


def test_bad_prices_keep_the_counts_and_say_why(tmp_path, workspace):
    server = start(tmp_path / "home", workspace, CODA_PRICES='{"m": {"input": "cheap", "output": 2}}')
    try:
        call(server, "claude", "anthropic-json")
        usage = server.get("/api/usage").json()
        assert usage["price_error"].startswith("CODA_PRICES gives m ") and usage["price_error"].count(".") >= 1
        assert today(server, "claude", OPUS) == {"requests": 1, "input_tokens": 42, "output_tokens": 7, "cost": None}
    finally:
        server.stop(signal.SIGKILL)


# The AI Gateway's usage system table.
def gateway_row(requester, model, days_ago=0, tokens=(100, 10)):
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days_ago * 86400))
    return {"event_time": when, "endpoint_name": model, "requester": requester,
            "input_tokens": tokens[0], "output_tokens": tokens[1]}


def test_the_gateway_usage_table_gives_the_users_own_rows(tmp_path, workspace):
    workspace.ai_gateway_usage = [gateway_row(workspace.user_name, OPUS), gateway_row(workspace.user_name, OPUS, 3),
                                  gateway_row(workspace.user_name, OPUS, 30), gateway_row("bob@example.com", OPUS),
                                  gateway_row(workspace.user_name, "databricks-gpt-5-5", 1)]
    server = start(tmp_path / "home", workspace, CODA_USAGE_WAREHOUSE_ID="wh-usage")
    try:
        usage = server.get("/api/usage?source=workspace").json()
        assert usage["readable"] is True and usage["table"] == "system.ai_gateway.usage"
        rows = {m["model"]: m for m in usage["models"]}
        assert rows[OPUS]["today"]["requests"] == 1 and rows[OPUS]["week"]["requests"] == 2
        assert rows[OPUS]["week"]["input_tokens"] == 200 and rows[OPUS]["week"]["cost"] == round(
            (200 * 5 + 20 * 25) / 1e6, 6)
        assert rows["databricks-gpt-5-5"]["today"]["requests"] == 0
        assert usage["total"]["week"]["requests"] == 3
        [statement] = [s for s in workspace.sql_statements if "system.ai_gateway.usage" in s["statement"]]
        assert statement["warehouse_id"] == "wh-usage"
        assert {p["name"]: p["value"] for p in statement["parameters"]}["requester"] == workspace.user_name
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.parametrize("case,said", [("no warehouse", "set CODA_USAGE_WAREHOUSE_ID"),
                                        ("missing", "does not exist in this workspace"),
                                        ("denied", "is not readable with your token"),
                                        ("403", "is not readable with your token")])
def test_an_unreadable_gateway_usage_table_says_why_in_one_sentence(tmp_path, workspace, case, said):
    env = {} if case == "no warehouse" else {"CODA_USAGE_WAREHOUSE_ID": "wh-usage"}
    server = start(tmp_path / "home", workspace, **env)
    try:
        if case == "missing":
            workspace.ai_gateway_usage = None
        elif case == "denied":
            workspace.ai_gateway_usage_denied = True
        elif case == "403":
            workspace.inject("sql/statements", status=403, count=10, message="You do not have CAN USE on the warehouse.")
        answer = server.get("/api/usage?source=workspace")
        assert answer.status_code == 200
        usage = answer.json()
        assert usage["readable"] is False and said in usage["reason"]
        assert usage["reason"].startswith("system.ai_gateway.usage ") and usage["reason"].endswith(".")
    finally:
        server.stop(signal.SIGKILL)


def test_doctor_prints_the_usage(tmp_path, workspace):
    workspace.ai_gateway_usage = [gateway_row(workspace.user_name, OPUS)]
    server = start(tmp_path / "home", workspace, CODA_USAGE_WAREHOUSE_ID="wh-usage")
    try:
        call(server, "claude", "anthropic-json")
    finally:
        server.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "CODA_"))}
    done = subprocess.run([sys.executable, str(ROOT / "coda.py"), "doctor"], capture_output=True, text=True, timeout=120,
                          env={**env, "HOME": str(server.home), "CODA_USAGE_WAREHOUSE_ID": "wh-usage"})
    out = done.stdout
    assert f"usage today ({TODAY} UTC), counted by the local proxy:" in out, out
    assert "Claude Code: 1 requests, 42 input and 7 output tokens, about $0.0004" in out, out
    assert "usage today from system.ai_gateway.usage (your rows):" in out and f"{OPUS}: 1 requests" in out, out
    done = subprocess.run([sys.executable, str(ROOT / "coda.py"), "doctor"], capture_output=True, text=True, timeout=120,
                          env={**env, "HOME": str(server.home)})
    assert "note  system.ai_gateway.usage cannot be read: no SQL warehouse is configured" in done.stdout, done.stdout


# The real CLIs, in CoDA terminals: their turns are counted for them.
@pytest.mark.skipif(not (AGENTS / "bin" / "claude").exists(), reason="the agent CLIs are installed by tests/run.sh")
@pytest.mark.parametrize("agent,command,model", [("claude", "claude -p", OPUS),
                                                 ("codex", "codex exec --skip-git-repo-check", "databricks-gpt-5-5"),
                                                 ("gemini", "GEMINI_CLI_TRUST_WORKSPACE=true gemini -p",
                                                  "databricks-gemini-2-5-pro")])
def test_a_real_agent_turn_is_counted_for_that_agent(tmp_path, workspace, agent, command, model):
    server = start(tmp_path / "home", workspace, PATH=f"{AGENTS / 'bin'}:{os.environ['PATH']}")
    try:
        sid = server.new_session(cols=120, rows=40)
        server.type(sid, "mkdir -p ~/projects/work && cd ~/projects/work\r")
        offset = server.wait_prompt(sid)
        server.type(sid, f"{command} 'hello usage'; echo EXIT-$((40+2))-$?\r")
        text, offset = server.read_until(sid, "EXIT-42-", since=offset, timeout=120)
        text += server.read_until(sid, "\n", since=offset)[0] if "\n" not in text.split("EXIT-42-")[-1] else ""
        assert "EXIT-42-0\r" in text, text
        answered = [r for r in workspace.gateway_requests if r["status"] == 200 and r["model"] == model]
        counted = today(server, agent, model)
        assert counted and counted["requests"] == len(answered) >= 1, (counted, len(answered))
        assert counted["input_tokens"] == 42 * counted["requests"] and counted["output_tokens"] == 7 * counted["requests"]
        assert all(r["token"] != agent_key(server, agent) for r in workspace.gateway_requests)  # the live token went on
    finally:
        server.stop(signal.SIGKILL)


# The page's panel, in real Chromium.
def test_the_page_shows_the_usage_panel(tmp_path, workspace):
    pytest.importorskip("playwright.sync_api")
    from test_browser import CHROMIUM, Tab, shot, wait_ready

    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium")
    from playwright.sync_api import sync_playwright

    workspace.ai_gateway_usage = None
    server = start(tmp_path / "home", workspace, CODA_USAGE_WAREHOUSE_ID="wh-usage")
    try:
        call(server, "claude", "anthropic-json")
        call(server, "gemini", "gemini-json")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless", "--disable-gpu"])
            tab = Tab(browser, server)
            page = tab.open()
            wait_ready(page)
            page.click("#help-btn")
            page.click("#usage-open")
            page.locator("#usage-table tr[data-agent='claude']").wait_for()
            claude = page.locator("#usage-table tr[data-agent='claude']").inner_text()
            assert "Claude Code" in claude and "1 req" in claude and "42 in / 7 out" in claude and "$0.0004" in claude
            assert "1 req" in page.locator("#usage-table tr[data-agent='gemini']").inner_text()
            assert "2 req" in page.locator("#usage-table tr.total").inner_text()
            assert "Estimated cost in USD" in page.locator("#usage-note").inner_text()
            shot(page, "usage")
            page.click("#usage-from-workspace")
            wait_for(lambda: "does not exist" in page.locator("#usage-workspace").inner_text(), timeout=30,
                     what="the workspace table's reason")
            tab.close()
            browser.close()
        assert not tab.problems, tab.problems
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.parametrize("body,model", [
    (b'{"model": "databricks-gpt-5-5", "input": "hi"}', "databricks-gpt-5-5"),  # Codex, Claude Code, OpenCode
    (b'{"messages": [{"content": "say \\"model\\": \\"x\\""}], "model": "databricks-claude-opus-4-6"}',
     "databricks-claude-opus-4-6"),  # Hermes (openai-python): after the messages; a quoted "model" is not a key
    (b'{"messages": "' + b"a" * (3 * 2 ** 20) + b'", "model": "m-at-the-end"}', "m-at-the-end"),
    (b'{"messages": "' + b"a" * (3 * 2 ** 20) + b'", "model": "m", "tools": "' + b"t" * (2 * 2 ** 20) + b'"}', None),
    (b'"model"' * 1000000, None), (b"", None)])
def test_the_request_model_is_found_by_a_bounded_search(body, model):
    assert coda.request_model(body) == model
