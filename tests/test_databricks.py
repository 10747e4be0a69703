"""Databricks wiring against a fake workspace spoken to by the real databricks-sdk:
owner resolution, the PAT lifecycle with rotation, gateway discovery, agent
configs, and the local proxy."""

import concurrent.futures
import configparser
import importlib.util
import json
import os
import subprocess
import sys
import time
import tomllib
from unittest import mock

import pytest
import requests

from conftest import ROOT, free_port, wait_for


def coda_env(workspace, **extra):
    env = {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
           "CODA_PROXY_PORT": str(free_port())}
    env.update(extra)
    return env


def coda_tokens(workspace):
    return workspace.live_tokens(comment_contains="CoDA")


def mode(path):
    return oct(path.stat().st_mode & 0o777)


def test_configure_pat_validates_mints_and_configures(start_coda, workspace):
    home = None
    server = start_coda(coda_env(workspace))
    home = server.home
    (home / ".databrickscfg").write_text("[other]\nhost = https://elsewhere\ntoken = keep-me\n")
    (home / ".claude").mkdir()
    (home / ".claude" / "settings.json").write_text(json.dumps({"theme": "light", "env": {"MINE": "1"}}))
    assert server.get("/api/pat-status").json()["configured"] is False

    bad = server.post("/api/configure-pat", {"token": "dapi" + "0" * 32})
    assert bad.status_code == 400 and "did not accept" in bad.json()["error"]
    assert server.post("/api/configure-pat", {"token": 5}).status_code == 400

    pasted = workspace.add_token(comment="pasted by the user")
    answer = server.api("/api/configure-pat", {"token": pasted})
    assert answer == {"status": "ok", "user": workspace.user_name}
    status = server.get("/api/pat-status").json()
    assert status["valid"] is True and status["user"] == workspace.user_name
    assert status["workspace_host"] == workspace.url and status["expires_at"] > time.time()
    [minted] = coda_tokens(workspace)
    assert workspace.find_token(pasted).live()  # never revoked: CoDA cannot prove its id
    state = server.get("/api/app-state").json()
    assert state["pat_configured"] is True and state["last_rotation"] > 0
    assert state["gateway"]["origin"] == workspace.gateway_url

    config = configparser.ConfigParser(interpolation=None)
    config.read(home / ".databrickscfg")
    assert config["DEFAULT"]["token"] == minted.value and config["DEFAULT"]["host"] == workspace.url
    assert config["other"]["token"] == "keep-me" and mode(home / ".databrickscfg") == "0o600"

    token = subprocess.run([sys.executable, str(ROOT / "coda.py"), "token"], env={**os.environ, "HOME": str(home)},
                           capture_output=True, text=True, timeout=30)
    assert token.stdout.strip() == minted.value

    settings = json.loads((home / ".claude" / "settings.json").read_text())
    assert settings["theme"] == "light" and settings["env"]["MINE"] == "1"  # merged, not clobbered
    assert settings["env"]["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{server.proxy_port}/anthropic"  # the proxy
    assert settings["env"]["ANTHROPIC_MODEL"] == "databricks-claude-opus-4-7"
    assert "coda.py" in settings["apiKeyHelper"] and settings["apiKeyHelper"].endswith(" proxy-key claude")
    claude_state = json.loads((home / ".claude.json").read_text())
    assert claude_state["hasCompletedOnboarding"] is True
    assert str(home / "projects") not in claude_state.get("projects", {})  # a clone there asks for trust itself
    assert set(claude_state["mcpServers"]) == {"databricks-sql", "deepwiki", "exa"}  # SQL at the proxy (test_mcp.py)

    codex = tomllib.loads((home / ".codex" / "config.toml").read_text())
    provider = codex["model_providers"]["databricks"]
    assert codex["model"] == "databricks-gpt-5-5" and codex["model_provider"] == "databricks"
    assert provider["wire_api"] == "responses" and provider["base_url"] == f"http://127.0.0.1:{server.proxy_port}/openai/v1"
    assert provider["auth"]["args"][-2:] == ["proxy-key", "codex"]
    assert codex["mcp_optional_startup_grace_ms"] == 10_000  # the workspace's MCP tools in a first turn too
    key = subprocess.run([sys.executable, str(ROOT / "coda.py"), "proxy-key", "codex"], env={**os.environ, "HOME": str(home)},
                         capture_output=True, text=True, timeout=30)
    assert key.stdout.strip() == proxy_key(home) + ".codex"  # never the workspace token: the proxy adds that

    gemini_env = (home / ".gemini" / ".env").read_text()
    assert "GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:" in gemini_env and "GEMINI_API_KEY_AUTH_MECHANISM=bearer" in gemini_env
    assert minted.value not in gemini_env  # Gemini holds only the proxy key
    assert json.loads((home / ".gemini" / "settings.json").read_text())["security"]["auth"]["selectedType"] == "gemini-api-key"
    opencode = json.loads((home / ".config" / "opencode" / "opencode.json").read_text())
    assert opencode["provider"]["databricks"]["options"]["baseURL"].endswith("/mlflow/v1")
    assert opencode["autoupdate"] is False and opencode["share"] == "disabled"
    assert opencode["enabled_providers"] == ["databricks"]  # no falling back to a provider CoDA did not set up
    auth = json.loads((home / ".local" / "share" / "opencode" / "auth.json").read_text())
    assert auth["databricks"]["type"] == "api"
    hermes = (home / ".hermes" / "config.yaml").read_text()
    assert "databricks-claude-opus-4-6" in hermes and "custom" in hermes
    for path in (home / ".claude" / "settings.json", home / ".codex" / "config.toml", home / ".gemini" / ".env",
                 home / ".local" / "share" / "opencode" / "auth.json", home / ".hermes" / "config.yaml"):
        assert mode(path) == "0o600", path
    assert "~/projects" in (home / ".claude" / "CLAUDE.md").read_text()
    git_identity = subprocess.run(["git", "config", "--global", "user.email"], env={**os.environ, "HOME": str(home)},
                                  capture_output=True, text=True).stdout.strip()
    assert git_identity == workspace.user_name

    again = server.post("/api/configure-pat", {"token": pasted})
    assert again.status_code == 409
    replaced = server.post("/api/configure-pat", {"token": pasted, "replace": True})
    assert replaced.status_code == 200, replaced.text
    assert len(coda_tokens(workspace)) == 1

    log = server.log()
    for secret in (pasted, minted.value, proxy_key(home)):
        assert secret not in log
        assert secret not in json.dumps(server.get("/api/pat-status").json())


def proxy_key(home):
    return (home / ".coda" / "proxy-key").read_text().strip()


def test_a_hand_edited_hermes_config_is_left_alone(start_coda, workspace):
    server = start_coda(coda_env(workspace))
    (server.home / ".hermes").mkdir()
    (server.home / ".hermes" / "config.yaml").write_text("model:\n  default: my-own\n")
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    assert (server.home / ".hermes" / "config.yaml").read_text() == "model:\n  default: my-own\n"


def test_invalid_user_json_is_not_overwritten(start_coda, workspace):
    server = start_coda(coda_env(workspace))
    (server.home / ".gemini").mkdir()
    (server.home / ".gemini" / "settings.json").write_text("{ not json")
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    assert (server.home / ".gemini" / "settings.json").read_text() == "{ not json"
    assert "not valid JSON" in server.log()


def test_hundred_accelerated_rotations_leave_one_live_coda_token(start_coda, workspace):
    server = start_coda(coda_env(workspace, PAT_TOKEN_LIFETIME="30", PAT_ROTATION_INTERVAL="0.02"))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    wait_for(lambda: len(workspace.minted_tokens()) >= 101, timeout=120)
    status = server.get("/api/pat-status").json()
    assert status["valid"] is True and "error" not in status
    wait_for(lambda: len(coda_tokens(workspace)) == 1, timeout=5)  # a revocation may still be in flight
    current = server.get("/api/app-state").json()
    assert current["last_rotation"] > time.time() - 5
    assert "rotation failed" not in server.log().lower()
    for record in workspace.minted_tokens():
        assert record.value not in server.log()


def test_rotation_retries_through_errors_and_timeouts(start_coda, workspace):
    server = start_coda(coda_env(workspace, PAT_TOKEN_LIFETIME="60", PAT_ROTATION_INTERVAL="0.5",
                                 CODA_SDK_HTTP_TIMEOUT="2", CODA_SDK_RETRY_TIMEOUT="4"))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    first = len(workspace.minted_tokens())
    workspace.inject("token/create", status=503, count=40)
    wait_for(lambda: "error" in server.get("/api/pat-status").json(), timeout=60)
    status = server.get("/api/pat-status").json()
    assert status["valid"] is True and "retrying" in status["error"]
    workspace.clear_faults()
    workspace.inject("token/create", status=None, count=1, delay=3)  # longer than CoDA's HTTP timeout
    wait_for(lambda: len(workspace.minted_tokens()) > first + 1, timeout=90)
    wait_for(lambda: "error" not in server.get("/api/pat-status").json(), timeout=30)
    # The timed-out create finished on the workspace's side too: the next sweep revokes it.
    wait_for(lambda: len(coda_tokens(workspace)) == 1, timeout=30)


def pat_status_with_error(server):
    status = server.get("/api/pat-status").json()
    return status if "error" in status else None


def doctor(server):
    return subprocess.run([sys.executable, str(ROOT / "coda.py"), "doctor"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "HOME": str(server.home)}).stdout


OUTAGE = dict(PAT_ROTATION_INTERVAL="0.5", CODA_SDK_HTTP_TIMEOUT="1", CODA_SDK_RETRY_TIMEOUT="1")


def test_a_workspace_outage_keeps_the_token_and_rotation_resumes_after_it(start_coda, workspace):
    server = start_coda(coda_env(workspace, PAT_TOKEN_LIFETIME="300", **OUTAGE))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    workspace.disconnect()  # connection refused
    status = wait_for(lambda: pat_status_with_error(server), timeout=30, what="the outage in pat-status")
    assert status["valid"] is True
    assert "Could not reach the workspace" in status["error"] and "valid until" in status["error"]
    deadline = time.time() + 4  # failed rotation after failed rotation: the token is still good
    while time.time() < deadline:
        assert server.get("/api/pat-status").json()["valid"] is True
        time.sleep(0.2)
    assert "Could not reach the workspace" in doctor(server)
    before = len(workspace.minted_tokens())

    workspace.reconnect()
    wait_for(lambda: "error" not in server.get("/api/pat-status").json(), timeout=30, what="rotation to resume")
    assert len(workspace.minted_tokens()) > before
    [current] = wait_for(lambda: coda_tokens(workspace) if len(coda_tokens(workspace)) == 1 else None, timeout=10)
    config = configparser.ConfigParser(interpolation=None)
    config.read(server.home / ".databrickscfg")
    assert config["DEFAULT"]["token"] == current.value
    assert "ok    token rotation: valid until" in doctor(server)


def test_a_hanging_or_failing_workspace_is_retried_not_taken_for_a_refusal(start_coda, workspace):
    server = start_coda(coda_env(workspace, PAT_TOKEN_LIFETIME="300", **OUTAGE))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    for route in ("token/create", "scim-me"):
        workspace.inject(route, status=None, count=1000, delay=3)  # answers only after CoDA gave up
    status = wait_for(lambda: pat_status_with_error(server), timeout=30)
    assert status["valid"] is True and "retrying" in status["error"]
    workspace.clear_faults()
    for route in ("token/create", "scim-me"):
        workspace.inject(route, status=503, count=1000)
    wait_for(lambda: "injected failure" in (pat_status_with_error(server) or {}).get("error", ""), timeout=30)
    assert server.get("/api/pat-status").json()["valid"] is True
    workspace.clear_faults()
    wait_for(lambda: "error" not in server.get("/api/pat-status").json(), timeout=30, what="rotation to resume")


def test_a_token_that_expires_during_an_outage_says_expired(start_coda, workspace):
    server = start_coda(coda_env(workspace, PAT_TOKEN_LIFETIME="6", **OUTAGE))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    workspace.disconnect()
    status = wait_for(lambda: (lambda s: s if not s["valid"] else None)(server.get("/api/pat-status").json()),
                      timeout=30, what="the token to expire")
    assert status["configured"] is True and "expired" in status["error"] and "paste a new one" in status["error"]
    workspace.reconnect()


def test_a_token_that_lapsed_between_rotations_says_expired(start_coda, workspace):
    server = start_coda(coda_env(workspace, PAT_TOKEN_LIFETIME="3", PAT_ROTATION_INTERVAL="3600"))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    status = wait_for(lambda: (lambda s: s if not s["valid"] else None)(server.get("/api/pat-status").json()),
                      timeout=30, what="the token to expire")
    assert "expired at" in status.get("error", "") and "paste a new one" in status["error"]


def test_a_refused_token_gives_its_reason(start_coda, workspace):
    server = start_coda(coda_env(workspace, PAT_TOKEN_LIFETIME="300", PAT_ROTATION_INTERVAL="0.3"))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    for record in coda_tokens(workspace):
        workspace.revoke_token(record.value)
    status = wait_for(lambda: (lambda s: s if not s["valid"] else None)(server.get("/api/pat-status").json()))
    assert "refused" in status["error"] and "paste a new one" in status["error"]
    assert "refuses the token" in doctor(server)


def test_two_tokens_pasted_at_once_make_one_decision(start_coda, workspace):
    server = start_coda(coda_env(workspace))
    workspace.inject("scim-me", status=None, count=2, delay=1)  # both requests are in flight together
    tokens = [workspace.add_token(), workspace.add_token()]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda token: server.post("/api/configure-pat", {"token": token}), tokens))
    assert sorted(answer.status_code for answer in answers) == [200, 409]
    assert len(coda_tokens(workspace)) <= 1


def load_coda(home, **env):
    """A fresh coda module in this process, configured by `env`: for tests of its inner bookkeeping."""
    with mock.patch.dict(os.environ, {"HOME": str(home), **env}):
        spec = importlib.util.spec_from_file_location("coda_under_test", ROOT / "coda.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_the_redaction_list_holds_only_tokens_that_may_be_live(workspace, tmp_path):
    local = "local-access-token-0123456789"
    coda = load_coda(tmp_path, DATABRICKS_HOST=workspace.url, CODA_TOKEN=local, CODA_SDK_RETRY_TIMEOUT="1")
    pat, pasted = coda.PROCESS.pat, workspace.add_token()
    pat.token = pasted
    coda.SECRETS.add(pasted)
    for _ in range(30):
        pat._mint()
    assert coda.SECRETS == {local, pasted, pat.token}

    previous = pat.token
    workspace.inject("token/delete", status=503, count=100)  # the previous token outlives the next rotation
    pat._mint()
    workspace.clear_faults()
    assert workspace.find_token(previous).live()
    assert coda.SECRETS == {local, pasted, previous, pat.token}
    pat._mint()  # this sweep revokes both older ones
    assert not workspace.find_token(previous).live()
    assert coda.SECRETS == {local, pasted, pat.token}
    assert coda.redact(f"token {pat.token}!") == "token [REDACTED]!"


def test_a_token_lacking_the_scope_to_mint_is_used_and_reported(start_coda, workspace):
    server = start_coda(coda_env(workspace))
    pasted = workspace.add_token(can_mint=False)
    assert server.api("/api/configure-pat", {"token": pasted})["status"] == "ok"
    status = server.get("/api/pat-status").json()
    assert status["valid"] is True and "Could not mint" in status["error"]


def test_an_expired_token_flips_pat_status_to_invalid_with_a_reason(start_coda, workspace):
    server = start_coda(coda_env(workspace, PAT_ROTATION_INTERVAL="0.3"))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    for record in coda_tokens(workspace):
        workspace.expire_token(record.value)
    status = wait_for(lambda: (lambda s: s if not s["valid"] else None)(server.get("/api/pat-status").json()))
    assert status["configured"] is True and "paste a new one" in status["error"]


def test_databricks_token_in_the_environment_is_used_at_start(start_coda, workspace):
    pasted = workspace.add_token()
    server = start_coda(coda_env(workspace, DATABRICKS_TOKEN=pasted))
    wait_for(lambda: server.get("/api/pat-status").json()["valid"])
    wait_for(lambda: len(coda_tokens(workspace)) == 1)
    assert pasted not in server.log()


def test_owner_comes_from_the_apps_api_as_the_service_principal(start_coda, workspace):
    workspace.inject("apps/get", status=503, count=1)
    env = coda_env(workspace, DATABRICKS_APP_NAME=workspace.app_name, DATABRICKS_CLIENT_ID=workspace.client_id,
                   DATABRICKS_CLIENT_SECRET=workspace.client_secret, CODA_TOKEN=None)
    server = start_coda(env)
    as_owner = {"X-Forwarded-Email": workspace.app_creator.upper()}
    wait_for(lambda: requests.get(server.url + "/api/version", headers=as_owner).status_code == 200, timeout=40)
    assert "owner_error" not in requests.get(server.url + "/health").json()
    assert requests.get(server.url + "/api/version", headers={"X-Forwarded-Email": "eve@example.com"}).status_code == 403
    sid = requests.post(server.url + "/api/session", json={}, headers=as_owner).json()["session_id"]
    requests.post(server.url + "/api/input", json={"session_id": sid, "input": "env; echo E$((1))NV\r"}, headers=as_owner)
    text = ""
    deadline = time.time() + 10
    while "E1NV" not in text:
        assert time.time() < deadline
        text += requests.post(server.url + "/api/output", json={"session_id": sid, "wait": 1}, headers=as_owner).json()["output"]
    assert workspace.client_secret not in text and "DATABRICKS_CLIENT_ID" not in text


def test_unresolvable_owner_fails_closed_and_says_why(start_coda, workspace):
    workspace.inject("apps/get", status=500, count=1000)
    env = coda_env(workspace, DATABRICKS_APP_NAME=workspace.app_name, DATABRICKS_CLIENT_ID=workspace.client_id,
                   DATABRICKS_CLIENT_SECRET=workspace.client_secret, CODA_TOKEN=None)
    server = start_coda(env)
    wait_for(lambda: "Apps API" in (requests.get(server.url + "/health").json().get("owner_error") or ""))
    assert requests.get(server.url + "/api/version", headers={"X-Forwarded-Email": workspace.app_creator}).status_code == 403


def test_gateway_discovery_falls_back_to_workspace_routes(start_coda, workspace):
    server = start_coda(coda_env(workspace, DATABRICKS_GATEWAY_HOST=""))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    gateway = server.get("/api/app-state").json()["gateway"]
    assert gateway["origin"] == workspace.url and "/ai-gateway" in gateway["kind"]
    assert json.loads((server.home / ".coda" / "pat-status.json").read_text())["gateway"] == \
        workspace.url + "/ai-gateway/anthropic"  # what the proxy forwards Claude Code's calls to

    workspace.disabled_generations.add("ai-gateway")
    other = start_coda(coda_env(workspace, DATABRICKS_GATEWAY_HOST=""))
    other.api("/api/configure-pat", {"token": workspace.add_token()})
    assert other.get("/api/app-state").json()["gateway"]["kind"] == "the workspace's serving endpoints"


def test_host_without_scheme_is_normalised(start_coda, workspace):
    server = start_coda(coda_env(workspace, DATABRICKS_HOST=workspace.url.replace("http://", "")))
    assert server.get("/api/app-state").json()["workspace_host"] == workspace.url.replace("http://", "https://")


# --- the local proxy ----------------------------------------------------------------

@pytest.fixture
def proxied(start_coda, workspace):
    port = free_port()
    server = start_coda(coda_env(workspace, CODA_PROXY_PORT=str(port), PAT_ROTATION_INTERVAL="3600"))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    server.proxy = f"http://127.0.0.1:{port}"
    server.proxy_headers = {"Authorization": f"Bearer {proxy_key(server.home)}"}
    wait_for(lambda: requests.get(server.proxy + "/health").ok)
    return server


def chat_body(text="hi"):
    return {"model": "databricks-claude-opus-4-6", "stream": True,
            "messages": [{"role": "user", "content": text}]}


def test_proxy_injects_the_current_token_and_streams(proxied, workspace):
    answer = requests.post(proxied.proxy + "/mlflow/v1/chat/completions", json=chat_body("hello proxy"),
                           headers=proxied.proxy_headers, stream=True, timeout=30)
    assert answer.status_code == 200
    events = b"".join(answer.iter_content(None)).decode().split("\n\n")
    assert events[-2] == "data: [DONE]"
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events if e.startswith("data: {")]
    assert "FAKE-REPLY-chat" in "".join(d.get("content") or "" for d in deltas)
    [request] = workspace.gateway_requests_for(api="chat")
    [minted] = coda_tokens(workspace)
    assert request["token"] == minted.value
    assert requests.post(proxied.proxy + "/mlflow/v1/chat/completions", json=chat_body(), timeout=10).status_code == 401
    assert requests.get(proxied.proxy + "/elsewhere", headers=proxied.proxy_headers, timeout=10).status_code == 404


def test_proxy_uses_the_new_token_after_a_rotation(proxied, workspace):
    [old] = coda_tokens(workspace)
    proxied.api("/api/configure-pat", {"token": workspace.add_token(), "replace": True})
    wait_for(lambda: old.revoked or None)
    answer = requests.post(proxied.proxy + "/mlflow/v1/chat/completions", json=chat_body(),
                           headers=proxied.proxy_headers, timeout=30)
    assert answer.status_code == 200
    [new] = coda_tokens(workspace)
    assert workspace.gateway_requests_for(api="chat")[-1]["token"] == new.value != old.value


def test_proxy_says_502_when_the_gateway_is_down(start_coda, workspace):
    port, dead = free_port(), free_port()
    server = start_coda(coda_env(workspace, CODA_PROXY_PORT=str(port), DATABRICKS_GATEWAY_HOST=f"http://127.0.0.1:{dead}"))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    headers = {"Authorization": f"Bearer {proxy_key(server.home)}"}
    answer = requests.post(f"http://127.0.0.1:{port}/mlflow/v1/chat/completions", json=chat_body(), headers=headers, timeout=30)
    assert answer.status_code == 502 and answer.json()["error"]


def test_proxy_forwards_events_as_they_arrive(proxied, workspace):
    workspace.stream_delay = 0.4  # the upstream takes its time between events
    try:
        started = time.time()
        answer = requests.post(proxied.proxy + "/mlflow/v1/chat/completions", json=chat_body("slow please"),
                               headers=proxied.proxy_headers, stream=True, timeout=60)
        arrivals = []
        for chunk in answer.iter_content(None):
            if b"data:" in chunk:
                arrivals.append(time.time() - started)
        total = time.time() - started
    finally:
        workspace.stream_delay = 0.0
    assert len(arrivals) >= 3
    assert arrivals[0] < total - 0.8, f"first event at {arrivals[0]:.2f} s of {total:.2f} s: it was held back"


def test_proxy_says_504_when_the_gateway_is_too_slow(start_coda, workspace):
    port = free_port()
    server = start_coda(coda_env(workspace, CODA_PROXY_PORT=str(port), CODA_PROXY_TIMEOUT="1"))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    workspace.inject("gateway", status=None, count=1, delay=4)  # answers, but only after 4 s
    headers = {"Authorization": f"Bearer {proxy_key(server.home)}"}
    answer = requests.post(f"http://127.0.0.1:{port}/mlflow/v1/chat/completions", json=chat_body(),
                           headers=headers, timeout=30)
    assert answer.status_code == 504 and answer.json()["error"]
