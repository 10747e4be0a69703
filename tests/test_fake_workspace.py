"""The fake workspace against the real databricks-sdk, and its gateway against
plain HTTP clients: if these fail, every test built on the fake is suspect."""

import json
import time

import pytest
import requests
from fake_workspace import FakeWorkspace

import databricks.sdk as sdk  # a declared dependency: missing means failing, not skipping
from databricks.sdk import WorkspaceClient
from databricks.sdk.core import Config
from databricks.sdk.errors import DatabricksError, NotFound, PermissionDenied


@pytest.fixture
def fw():
    fake = FakeWorkspace(app_name="coda-test", app_creator="owner@example.com").start()
    yield fake
    fake.stop()


def pat_client(fw, token):
    return WorkspaceClient(config=Config(host=fw.url, token=token, auth_type="pat",
                                         retry_timeout_seconds=5, http_timeout_seconds=5))


def m2m_client(fw, client_id=None, client_secret=None):
    return WorkspaceClient(config=Config(host=fw.url, client_id=client_id or fw.client_id,
                                         client_secret=client_secret or fw.client_secret,
                                         auth_type="oauth-m2m", retry_timeout_seconds=5,
                                         http_timeout_seconds=5))


# ---------------------------------------------------------------- SDK, PAT

def test_pat_current_user(fw):
    w = pat_client(fw, fw.add_token())
    me = w.current_user.me()
    assert me.user_name == "alice@example.com"
    assert me.display_name == "Alice Example"
    assert me.emails[0].value == "alice@example.com"


def test_pat_create_list_delete(fw):
    bootstrap = fw.add_token(comment="pasted")
    w = pat_client(fw, bootstrap)
    created = w.tokens.create(comment="CoDA short-lived", lifetime_seconds=900)
    assert created.token_value.startswith("dapi")
    assert created.token_value != bootstrap
    info = created.token_info
    assert info.comment == "CoDA short-lived"
    assert info.expiry_time - info.creation_time == 900 * 1000

    listed = {t.token_id: t for t in w.tokens.list()}
    assert info.token_id in listed
    assert fw.find_token(bootstrap).token_id in listed

    # the minted token works on its own, then is revoked and refused everywhere
    minted = pat_client(fw, created.token_value)
    assert minted.current_user.me().user_name == "alice@example.com"
    w.tokens.delete(info.token_id)
    assert info.token_id not in {t.token_id for t in w.tokens.list()}
    with pytest.raises(PermissionDenied):
        minted.current_user.me()
    r = requests.post(fw.url + "/ai-gateway/mlflow/v1/chat/completions",
                      headers={"Authorization": "Bearer " + created.token_value},
                      json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401
    assert fw.find_token(created.token_value).revoked


def test_delete_unknown_token_is_404(fw):
    w = pat_client(fw, fw.add_token())
    with pytest.raises(NotFound):
        w.tokens.delete("0" * 64)


def test_expired_token_refused(fw):
    w = pat_client(fw, fw.add_token())
    short = w.tokens.create(comment="short", lifetime_seconds=1)
    c = pat_client(fw, short.token_value)
    assert c.current_user.me().user_name
    time.sleep(1.2)
    with pytest.raises(PermissionDenied):
        c.current_user.me()
    assert short.token_value not in fw.live_token_values()


def test_expire_knob_and_margin(fw):
    tok = fw.add_token(lifetime_seconds=60)
    w = pat_client(fw, tok)
    assert w.current_user.me()
    fw.refuse_within_seconds = 120  # like the platform refusing tokens near expiry
    with pytest.raises(PermissionDenied):
        w.current_user.me()
    fw.refuse_within_seconds = 0
    assert w.current_user.me()
    fw.expire_token(tok)
    with pytest.raises(PermissionDenied):
        w.current_user.me()


def test_missing_and_unknown_token(fw):
    r = requests.get(fw.url + "/api/2.0/preview/scim/v2/Me")
    assert r.status_code == 401 and r.json()["error_code"] == "UNAUTHENTICATED"
    r = requests.get(fw.url + "/api/2.0/preview/scim/v2/Me",
                     headers={"Authorization": "Bearer dapi-not-a-token"})
    assert r.status_code == 403 and r.json()["message"] == "Invalid access token."


def test_mint_refusals(fw):
    no_scope = pat_client(fw, fw.add_token(can_mint=False))
    with pytest.raises(PermissionDenied):
        no_scope.tokens.create(comment="x", lifetime_seconds=60)
    w = pat_client(fw, fw.add_token())
    fw.max_token_lifetime_seconds = 300
    with pytest.raises(DatabricksError) as e:
        w.tokens.create(comment="x", lifetime_seconds=900)
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    assert w.tokens.create(comment="x", lifetime_seconds=300).token_value
    fw.token_quota = 3  # two tokens live already
    with pytest.raises(DatabricksError) as e:
        w.tokens.create(comment="y", lifetime_seconds=60)
    assert e.value.error_code == "QUOTA_EXCEEDED"


def test_injected_5xx_then_success(fw):
    tok = fw.add_token()
    fw.inject("token/create", status=503, count=2)
    for _ in range(2):
        r = requests.post(fw.url + "/api/2.0/token/create",
                          headers={"Authorization": "Bearer " + tok},
                          json={"comment": "c", "lifetime_seconds": 60})
        assert r.status_code == 503
    r = requests.post(fw.url + "/api/2.0/token/create",
                      headers={"Authorization": "Bearer " + tok},
                      json={"comment": "c", "lifetime_seconds": 60})
    assert r.status_code == 200 and r.json()["token_value"]
    assert len(fw.minted_tokens()) == 1


def test_sdk_retries_injected_503(fw):
    w = pat_client(fw, fw.add_token())
    fw.inject("scim-me", status=503, count=1)
    assert w.current_user.me().user_name == "alice@example.com"
    me_calls = [r for r in fw.requests if r["path"].endswith("/Me")]
    assert [r["status"] for r in me_calls] == [503, 200]


def test_injected_timeout(fw):
    tok = fw.add_token()
    fw.inject("token/create", status=None, delay=2.0)
    with pytest.raises(requests.exceptions.Timeout):
        requests.post(fw.url + "/api/2.0/token/create",
                      headers={"Authorization": "Bearer " + tok},
                      json={"comment": "slow", "lifetime_seconds": 60}, timeout=0.5)


# ---------------------------------------------------------------- SDK, M2M

def test_oauth_m2m_apps_get_creator(fw):
    w = m2m_client(fw)
    app = w.apps.get("coda-test")
    assert app.creator == "owner@example.com"
    assert w.current_user.me().user_name == fw.client_id
    paths = [r["path"] for r in fw.requests]
    assert "/.well-known/databricks-config" in paths
    assert "/oidc/.well-known/oauth-authorization-server" in paths
    assert "/oidc/v1/token" in paths
    assert fw.live_tokens(kind="oauth")


def test_oauth_m2m_wrong_secret(fw):
    with pytest.raises(Exception) as e:
        m2m_client(fw, client_secret="wrong").apps.get("coda-test")
    assert "invalid_client" in str(e.value)
    assert not fw.live_tokens(kind="oauth")


def test_apps_get_unknown(fw):
    with pytest.raises(NotFound):
        m2m_client(fw).apps.get("nope")


# ------------------------------------------------------ workspace files, SQL

def test_workspace_files(fw):
    w = pat_client(fw, fw.add_token())
    home = "/Users/alice@example.com"
    w.workspace.mkdirs(f"{home}/proj/src")
    w.workspace.upload(f"{home}/proj/src/a.py", b"print(1)\n",
                       format=sdk.service.workspace.ImportFormat.AUTO)
    assert fw.read_file(f"{home}/proj/src/a.py") == b"print(1)\n"
    st = w.workspace.get_status(f"{home}/proj/src/a.py")
    assert st.object_type.value == "FILE"
    names = [o.path for o in w.workspace.list(f"{home}/proj/src")]
    assert names == [f"{home}/proj/src/a.py"]
    with pytest.raises(DatabricksError):
        w.workspace.upload(f"{home}/proj/src/a.py", b"again",
                           format=sdk.service.workspace.ImportFormat.AUTO)
    w.workspace.upload(f"{home}/proj/src/a.py", b"again",
                       format=sdk.service.workspace.ImportFormat.AUTO, overwrite=True)
    assert fw.read_file(f"{home}/proj/src/a.py") == b"again"
    with w.workspace.download(f"{home}/proj/src/a.py") as f:
        assert f.read() == b"again"
    with pytest.raises(DatabricksError):
        w.workspace.delete(f"{home}/proj")
    w.workspace.delete(f"{home}/proj", recursive=True)
    with pytest.raises(NotFound):
        w.workspace.get_status(f"{home}/proj/src/a.py")
    with pytest.raises(NotFound):
        w.workspace.upload("/nowhere/x.py", b"x", format=sdk.service.workspace.ImportFormat.AUTO)


def test_sql_statement_recorded(fw):
    w = pat_client(fw, fw.add_token())
    res = w.statement_execution.execute_statement(statement="SELECT 1", warehouse_id="wh1")
    assert res.status.state.value == "SUCCEEDED"
    assert fw.sql_statements[0]["statement"] == "SELECT 1"


def test_sql_statements_are_checked_like_the_real_api(fw):
    from databricks.sdk.service.sql import StatementParameterListItem as Param

    run = pat_client(fw, fw.add_token()).statement_execution
    ok = run.execute_statement(statement="SELECT :a, ':b', `:c`, x::int -- :d", warehouse_id="wh1",
                               parameters=[Param(name="a", value="2026-01-02T03:04:05.6Z", type="TIMESTAMP")])
    assert ok.status.state.value == "SUCCEEDED"
    unbound = run.execute_statement(statement="SELECT :a, :b", warehouse_id="wh1", parameters=[Param(name="a")])
    assert unbound.status.state.value == "FAILED" and "UNBOUND_SQL_PARAMETER" in unbound.status.error.message
    bad = run.execute_statement(statement="SELECT :a", warehouse_id="wh1",
                                parameters=[Param(name="a", value="yesterday", type="TIMESTAMP")])
    assert bad.status.state.value == "FAILED" and "CAST_INVALID_INPUT" in bad.status.error.message
    with pytest.raises(DatabricksError, match="limit is 256"):
        run.execute_statement(statement="SELECT 1", warehouse_id="wh1",
                              parameters=[Param(name=f"p{i}", value="1") for i in range(257)])
    with pytest.raises(DatabricksError, match="warehouse_id"):
        run.execute_statement(statement="SELECT 1", warehouse_id="")
    fw.sql_running_polls = 2
    started = run.execute_statement(statement="SELECT 1", warehouse_id="wh1")
    polls = [run.get_statement(started.statement_id).status.state.value for _ in range(3)]
    assert (started.status.state.value, polls) == ("PENDING", ["RUNNING", "RUNNING", "SUCCEEDED"])
    waiting = run.execute_statement(statement="SELECT 1", warehouse_id="wh1")
    run.cancel_execution(waiting.statement_id)
    assert run.get_statement(waiting.statement_id).status.state.value == "CANCELED"
    fw.sql_running_polls, fw.sql_failure = 0, ("BAD_REQUEST", "[TABLE_OR_VIEW_NOT_FOUND] no such table")
    failed = run.execute_statement(statement="SELECT 1", warehouse_id="wh1")
    assert failed.status.state.value == "FAILED" and "TABLE_OR_VIEW_NOT_FOUND" in failed.status.error.message


# --------------------------------------------------------------- the gateway

def sse_events(resp):
    """(event, data) pairs of an SSE response; data parsed as JSON when it is."""
    out, event = [], None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            raw = line[5:].strip()
            try:
                out.append((event, json.loads(raw)))
            except ValueError:
                out.append((event, raw))
            event = None
    return out


@pytest.mark.parametrize("base_attr,prefix,generation", [
    ("gateway_url", "/anthropic", "host"),
    ("url", "/ai-gateway/anthropic", "ai-gateway"),
    ("url", "/serving-endpoints/anthropic", "serving-endpoints"),
])
def test_anthropic_stream(fw, base_attr, prefix, generation):
    tok = fw.add_token()
    base = getattr(fw, base_attr) + prefix
    assert requests.head(base).status_code == 200
    r = requests.post(base + "/v1/messages?beta=true", stream=True,
                      headers={"Authorization": "Bearer " + tok,
                               "x-databricks-use-coding-agent-mode": "true"},
                      json={"model": "databricks-claude-opus-4-7", "stream": True,
                            "max_tokens": 100,
                            "messages": [{"role": "user", "content": [
                                {"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                {"type": "text", "text": "hello there"}]}]})
    assert r.status_code == 200
    events = sse_events(r)
    names = [e for e, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    text = "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta")
    assert text == "FAKE-REPLY-anthropic: hello there"
    rec = fw.gateway_requests_for(api="anthropic")[-1]
    assert rec["generation"] == generation and rec["base"] == prefix
    assert rec["model"] == "databricks-claude-opus-4-7" and rec["token"] == tok
    assert rec["headers"]["x-databricks-use-coding-agent-mode"] == "true"
    assert rec["status"] == 200


def test_anthropic_tool_call_round_trip(fw):
    tok = fw.add_token()
    url = fw.gateway_url + "/anthropic/v1/messages"
    tools = [{"name": "Bash", "description": "run", "input_schema": {
        "type": "object", "properties": {"command": {"type": "string"},
                                         "description": {"type": "string"}},
        "required": ["command"]}}]
    msgs = [{"role": "user", "content": "please USE_TOOL"}]
    r = requests.post(url, headers={"x-api-key": tok},
                      json={"model": "m", "messages": msgs, "tools": tools})
    block = r.json()["content"][0]
    assert r.json()["stop_reason"] == "tool_use"
    assert block["name"] == "Bash" and block["input"]["command"] == fw.tool_command
    msgs += [{"role": "assistant", "content": [block]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"],
                                           "content": "FAKE-TOOL-OUTPUT\n"}]}]
    r = requests.post(url, headers={"x-api-key": tok},
                      json={"model": "m", "messages": msgs, "tools": tools})
    assert r.json()["content"][0]["text"] == "FAKE-REPLY-anthropic tool said: FAKE-TOOL-OUTPUT"


@pytest.mark.parametrize("path", ["/openai/v1/responses"])
def test_responses_stream_ends_completed(fw, path):
    tok = fw.add_token()
    r = requests.post(fw.gateway_url + path, stream=True,
                      headers={"Authorization": "Bearer " + tok},
                      json={"model": "databricks-gpt-5-5", "stream": True,
                            "input": [{"type": "message", "role": "user",
                                       "content": [{"type": "input_text", "text": "hi"}]}]})
    events = sse_events(r)
    assert events[-1][0] == "response.completed"
    done = events[-1][1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["text"] == "FAKE-REPLY-responses: hi"
    seqs = [d["sequence_number"] for _, d in events]
    assert seqs == sorted(seqs)


def test_responses_tool_call(fw):
    tok = fw.add_token()
    tools = [{"type": "function", "name": "shell", "parameters": {
        "type": "object", "properties": {"command": {"type": "array",
                                                     "items": {"type": "string"}}},
        "required": ["command"]}}]
    r = requests.post(fw.url + "/ai-gateway/codex/v1/responses", stream=True,
                      headers={"Authorization": "Bearer " + tok},
                      json={"model": "m", "stream": True, "tools": tools,
                            "input": [{"role": "user", "content": "USE_TOOL now"}]})
    item = [d for e, d in sse_events(r) if e == "response.output_item.done"][0]["item"]
    assert item["type"] == "function_call" and item["name"] == "shell"
    assert json.loads(item["arguments"])["command"] == ["bash", "-lc", fw.tool_command]


@pytest.mark.parametrize("base_attr,prefix", [
    ("gateway_url", "/mlflow/v1"), ("url", "/ai-gateway/mlflow/v1"), ("url", "/serving-endpoints"),
])
def test_chat_stream(fw, base_attr, prefix):
    tok = fw.add_token()
    base = getattr(fw, base_attr) + prefix
    r = requests.get(base + "/models", headers={"Authorization": "Bearer " + tok})
    assert "databricks-claude-opus-4-6" in [m["id"] for m in r.json()["data"]]
    r = requests.post(base + "/chat/completions", stream=True,
                      headers={"Authorization": "Bearer " + tok},
                      json={"model": "databricks-claude-opus-4-6", "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "yo"}]})
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[5:]) for ln in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "FAKE-REPLY-chat: yo"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] == 49


def test_chat_tool_call_stream(fw):
    tok = fw.add_token()
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}},
        "required": ["command"]}}}]
    r = requests.post(fw.gateway_url + "/mlflow/v1/chat/completions", stream=True,
                      headers={"Authorization": "Bearer " + tok},
                      json={"model": "m", "stream": True, "tools": tools,
                            "messages": [{"role": "user", "content": "USE_TOOL"}]})
    lines = [ln for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data:")]
    chunks = [json.loads(ln[5:]) for ln in lines[:-1]]
    args = "".join(tc["function"].get("arguments", "") for c in chunks
                   for tc in c["choices"][0]["delta"].get("tool_calls", []))
    assert json.loads(args) == {"command": fw.tool_command}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("base_attr,prefix", [
    ("gateway_url", "/gemini"), ("url", "/ai-gateway/gemini"), ("url", "/serving-endpoints/google"),
])
def test_gemini_stream(fw, base_attr, prefix):
    tok = fw.add_token()
    url = (getattr(fw, base_attr) + prefix
           + "/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent?alt=sse")
    r = requests.post(url, stream=True, headers={"Authorization": "Bearer " + tok},
                      json={"contents": [{"role": "user", "parts": [{"text": "hey"}]}]})
    assert r.status_code == 200
    datas = [d for _, d in sse_events(r)]
    text = "".join(p.get("text", "") for d in datas
                   for p in d["candidates"][0]["content"]["parts"])
    assert text == "FAKE-REPLY-gemini: hey"
    assert datas[-1]["candidates"][0]["finishReason"] == "STOP"
    assert fw.gateway_requests[-1]["model"] == "databricks-gemini-2-5-pro"


def test_gemini_stream_without_sse_is_a_json_array(fw):
    tok = fw.add_token()
    r = requests.post(fw.gateway_url + "/gemini/v1beta/models/m:streamGenerateContent",
                      headers={"x-goog-api-key": tok},
                      json={"contents": [{"role": "user", "parts": [{"text": "a"}]}]})
    assert r.json()[0]["candidates"][0]["content"]["parts"][0]["text"] == "FAKE-REPLY-gemini: a"


def test_gemini_structured_output(fw):
    tok = fw.add_token()
    schema = {"type": "object", "properties": {
        "reasoning": {"type": "string"},
        "next_speaker": {"type": "string", "enum": ["user", "model"]}}}
    r = requests.post(fw.gateway_url + "/gemini/v1beta/models/m:generateContent",
                      headers={"x-goog-api-key": tok},
                      json={"contents": [{"role": "user", "parts": [{"text": "who?"}]}],
                            "generationConfig": {"responseJsonSchema": schema}})
    text = r.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert json.loads(text)["next_speaker"] == "user"


@pytest.mark.parametrize("path", [
    "/anthropic/v1/messages", "/openai/v1/responses", "/mlflow/v1/chat/completions",
    "/gemini/v1beta/models/m:streamGenerateContent",
])
def test_gateway_refuses_dead_tokens(fw, path):
    good = fw.add_token()
    dead = fw.add_token()
    fw.revoke_token(dead)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "input": "x", "contents": [{"role": "user", "parts": [{"text": "x"}]}]}
    for headers in ({}, {"Authorization": "Bearer " + dead},
                    {"Authorization": "Bearer nonsense"}):
        assert requests.post(fw.gateway_url + path, json=body,
                             headers=headers).status_code == 401
    ok = requests.post(fw.gateway_url + path, json=body,
                       headers={"Authorization": "Bearer " + good})
    assert ok.status_code == 200
    assert [r["token_live"] for r in fw.gateway_requests] == [False, False, False, True]


def test_disabled_generation_is_404(fw):
    tok = fw.add_token()
    fw.disabled_generations.add("host")
    r = requests.get(fw.gateway_url + "/anthropic", headers={"Authorization": "Bearer " + tok})
    assert r.status_code == 404
    r = requests.get(fw.url + "/ai-gateway/anthropic", headers={"Authorization": "Bearer " + tok})
    assert r.status_code == 200
    assert requests.get(fw.gateway_url + "/elsewhere").status_code == 404


def test_gateway_fault_injection(fw):
    tok = fw.add_token()
    fw.inject("gateway", status=529, count=1)
    url = fw.gateway_url + "/anthropic/v1/messages"
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    r = requests.post(url, json=body, headers={"x-api-key": tok})
    assert r.status_code == 529 and r.json()["type"] == "error"
    assert requests.post(url, json=body, headers={"x-api-key": tok}).status_code == 200


def test_no_token_in_public_state_or_log(fw, capsys):
    fw.verbose = True
    tok = fw.add_token()
    requests.post(fw.gateway_url + "/gemini/v1beta/models/m:generateContent?key=" + tok,
                  json={"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
    requests.get(fw.url + "/api/2.0/preview/scim/v2/Me", headers={"Authorization": "Bearer " + tok})
    state = requests.get(fw.url + "/_fake/state").text
    assert tok not in state
    assert tok not in json.dumps(fw.requests)
    err = capsys.readouterr().err
    assert "/Me" in err and tok not in err


def test_standalone_main(tmp_path):
    import subprocess
    import sys
    import os
    token_file = tmp_path / "pat"
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                          "fake_workspace.py"),
                             "--token-file", str(token_file), "--quiet"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip().split("=", 1)[1]
        gw = proc.stdout.readline().strip().split("=", 1)[1]
        tok = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        me = requests.get(url + "/api/2.0/preview/scim/v2/Me",
                          headers={"Authorization": "Bearer " + tok}, timeout=5).json()
        assert me["userName"] == "alice@example.com"
        assert requests.head(gw + "/anthropic", timeout=5).status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()


def test_unknown_gateway_paths_are_404(fw):
    tok = fw.add_token()
    auth = {"Authorization": "Bearer " + tok}
    for url in (fw.gateway_url + "/mlflow/v1/props", fw.gateway_url + "/mlflow/api/tags",
                fw.url + "/serving-endpoints/version"):
        assert requests.get(url, headers=auth).status_code == 404, url
    assert requests.get(fw.gateway_url + "/mlflow/v1", headers=auth).status_code == 200
    assert requests.get(fw.gateway_url + "/mlflow/v1").status_code == 401


def test_wait_for_gateway(fw):
    import threading
    tok = fw.add_token()
    mark = len(fw.gateway_requests)
    assert fw.wait_for_gateway(api="chat", since=mark, timeout=0.2) is None

    def later():
        time.sleep(0.3)
        requests.post(fw.gateway_url + "/mlflow/v1/chat/completions",
                      headers={"Authorization": "Bearer " + tok},
                      json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    t = threading.Thread(target=later)
    t.start()
    rec = fw.wait_for_gateway(api="chat", status=200, since=mark, timeout=10)
    t.join()
    assert rec is not None and rec["token"] == tok and rec["model"] == "m"


def test_tool_command_from_the_prompt(fw):
    tok = fw.add_token()
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"},
                                         "description": {"type": "string"}},
        "required": ["command", "description"]}}}]
    r = requests.post(fw.gateway_url + "/mlflow/v1/chat/completions",
                      headers={"Authorization": "Bearer " + tok},
                      json={"model": "m", "tools": tools, "messages": [
                          {"role": "user", "content": "please USE_TOOL[touch /tmp/x] now"}]})
    call = r.json()["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"command": "touch /tmp/x",
                                                         "description": "fake tool call"}
    msgs = [{"role": "user", "content": "please USE_TOOL[touch /tmp/x] now"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "done\nexit 0"}]
    r = requests.post(fw.gateway_url + "/mlflow/v1/chat/completions",
                      headers={"Authorization": "Bearer " + tok},
                      json={"model": "m", "tools": tools, "messages": msgs})
    assert r.json()["choices"][0]["message"]["content"] == "FAKE-REPLY-chat tool said: exit 0"


def test_failing_models_knob(fw):
    tok = fw.add_token()
    fw.failing_models["bad-model"] = 503
    url = fw.gateway_url + "/mlflow/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "x"}]}
    auth = {"Authorization": "Bearer " + tok}
    assert requests.post(url, headers=auth, json=dict(body, model="bad-model")).status_code == 503
    assert requests.post(url, headers=auth, json=dict(body, model="good")).status_code == 200


def test_responses_multi_turn_with_tool(fw):
    tok = fw.add_token()
    url = fw.gateway_url + "/openai/v1/responses"
    auth = {"Authorization": "Bearer " + tok}
    tools = [{"type": "function", "name": "exec_command", "parameters": {
        "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}]
    items = []

    def turn(*new_items):
        """Add the items, send the whole conversation, keep and return the answer's output."""
        items.extend(new_items)
        out = requests.post(url, headers=auth, json={"model": "m", "stream": False, "input": items,
                                                     "tools": tools}).json()["output"]
        items.extend(out)
        return out

    def user(text):
        return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}

    assert turn(user("one"))[0]["content"][0]["text"] == "FAKE-REPLY-responses: one"
    call = turn(user("two USE_TOOL"))[0]
    assert call["type"] == "function_call" and json.loads(call["arguments"]) == {
        "cmd": fw.tool_command}
    out = turn({"type": "function_call_output", "call_id": call["call_id"],
                "output": "Chunk ID: 1\nOutput:\nFAKE-TOOL-OUTPUT\n"})
    assert out[0]["content"][0]["text"] == "FAKE-REPLY-responses tool said: FAKE-TOOL-OUTPUT"
    assert turn(user("three"))[0]["content"][0]["text"] == "FAKE-REPLY-responses: three"


def test_gemini_tool_round_trip(fw):
    tok = fw.add_token()
    url = fw.gateway_url + "/gemini/v1beta/models/m:streamGenerateContent?alt=sse"
    auth = {"x-goog-api-key": tok}
    tools = [{"functionDeclarations": [{"name": "run_shell_command", "parametersJsonSchema": {
        "type": "object", "properties": {"command": {"type": "string"},
                                         "description": {"type": "string"}},
        "required": ["command"]}}]}]
    contents = [{"role": "user", "parts": [{"text": "USE_TOOL please"}]}]
    r = requests.post(url, headers=auth, stream=True, json={"contents": contents, "tools": tools})
    parts = [p for _, d in sse_events(r) for p in d["candidates"][0]["content"]["parts"]]
    call = parts[0]["functionCall"]
    assert call["name"] == "run_shell_command" and call["args"]["command"] == fw.tool_command
    contents += [{"role": "model", "parts": parts},
                 {"role": "user", "parts": [{"functionResponse": {
                     "name": "run_shell_command",
                     "response": {"output": "Output: FAKE-TOOL-OUTPUT\nExit Code: 0"}}}]}]
    r = requests.post(url, headers=auth, stream=True, json={"contents": contents, "tools": tools})
    text = "".join(p.get("text", "") for _, d in sse_events(r)
                   for p in d["candidates"][0]["content"]["parts"])
    assert text == "FAKE-REPLY-gemini tool said: Output: FAKE-TOOL-OUTPUT"
