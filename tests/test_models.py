"""Models come from the workspace: CoDA lists the served endpoints (the real databricks-sdk against
the fake workspace's GET /api/2.0/serving-endpoints), gives each agent its own model when served,
else the best served one of its row's list, and says which and why in setup and doctor. Bad input
(no endpoints, a 403, an unknown API) is one sentence, and the agents keep their configured models."""

import json
import os
import subprocess
import sys
import tomllib

import gevent
import pytest

from conftest import ROOT, wait_for
from fake_workspace import OTHER_SERVING_ENDPOINTS, serving_endpoint
from test_browser import browser, open_tab  # noqa: F401 (fixtures)
from test_databricks import coda_env, load_coda

UNSERVED = "databricks-claude-opus-9-9"  # a name no workspace serves


def listings(workspace):
    return [r for r in workspace.requests if r["method"] == "GET" and r["path"] == "/api/2.0/serving-endpoints"]


def choices_after_listing(workspace, tmp_path, **env):
    """A fresh coda in this process, configured by `env`, after one listing with a pasted token:
    {agent: ModelChoice}, the listing's notice, and the module."""
    coda = load_coda(tmp_path, DATABRICKS_HOST=workspace.url, CODA_SDK_RETRY_TIMEOUT="2", **env)
    coda.PROCESS.models.refresh(workspace.add_token())
    coda.PROCESS.models.wait()
    return {agent.name: coda.model_choice(agent.name) for agent in coda.AGENTS}, coda.PROCESS.models.notice, coda


def without(workspace, *names):
    workspace.serving_endpoints = [e for e in workspace.serving_endpoints if e["name"] not in names]


def test_the_model_set_is_kept_when_the_workspace_serves_it(workspace, tmp_path):
    choices, notice, _ = choices_after_listing(workspace, tmp_path, CODEX_MODEL="databricks-gpt-5-5")
    assert notice is None
    assert choices["codex"] == ("databricks-gpt-5-5", "CODEX_MODEL databricks-gpt-5-5 is served here", "served")
    assert choices["claude"].model == "databricks-claude-opus-4-7" and choices["claude"].status == "served"
    assert choices["hermes"].model == "databricks-claude-opus-4-6"  # the row's default counts as set


def test_a_model_not_served_is_replaced_by_the_best_served_one_with_a_warning(workspace, tmp_path):
    without(workspace, "databricks-claude-opus-4-7")
    workspace.serving_endpoints.append(serving_endpoint("databricks-claude-sonnet-4-6"))
    choices, _, coda = choices_after_listing(workspace, tmp_path, GEMINI_MODEL="databricks-gemini-1-0-pro")
    claude = choices["claude"]
    assert claude.model == "databricks-claude-opus-4-6" and claude.status == "replaced"  # next on the row's list
    assert claude.why.startswith("ANTHROPIC_MODEL databricks-claude-opus-4-7 is not served here (served for Claude "
                                 "Code: databricks-claude-opus-4-6, databricks-claude-sonnet-4-6, ")
    assert coda.describe_choice("Claude Code", claude).startswith(
        "Claude Code: databricks-claude-opus-4-6 \N{EM DASH} ANTHROPIC_MODEL databricks-claude-opus-4-7 is not served")
    assert choices["gemini"].model == "databricks-gemini-2-5-pro"  # its list ranks pro above flash
    assert "databricks-gemini-2-5-flash" in choices["gemini"].why
    assert choices["codex"].status == "served"


def test_an_agent_with_no_served_model_of_its_api_keeps_its_own_and_others_go_on(workspace, tmp_path):
    without(workspace, "databricks-gpt-5-5")
    choices, notice, _ = choices_after_listing(workspace, tmp_path)
    assert notice is None
    assert choices["codex"].status == "unserved" and choices["codex"].model == "databricks-gpt-5-5"
    assert "no model for the OpenAI Responses API Codex needs" in choices["codex"].why
    assert choices["claude"].status == choices["opencode"].status == "served"


def test_the_chat_agents_take_any_chat_model_claude_first(workspace, tmp_path):
    workspace.serving_endpoints = [serving_endpoint("databricks-meta-llama-3-3-70b-instruct"),
                                   serving_endpoint("databricks-gpt-5-5"),
                                   serving_endpoint("my-claude", display_name="Claude Sonnet 4.5")]
    choices, _, _ = choices_after_listing(workspace, tmp_path, HERMES_MODEL=UNSERVED)
    # my-claude is a Claude model by its foundation model's display name, but not on the list
    assert choices["hermes"].model == "databricks-gpt-5-5" and choices["hermes"].status == "replaced"
    assert choices["claude"].model == "my-claude"  # the only model speaking Anthropic's API
    assert choices["gemini"].status == "unserved"


def test_an_external_model_speaks_its_providers_api(workspace, tmp_path):
    workspace.serving_endpoints = [serving_endpoint("team-gemini", provider="google-cloud-vertex-ai",
                                                    display_name="gemini-2.5-pro")]
    choices, _, _ = choices_after_listing(workspace, tmp_path)
    assert choices["gemini"].model == "team-gemini" and choices["hermes"].model == "team-gemini"
    assert choices["claude"].status == "unserved"


@pytest.mark.parametrize("bad, sentence", [
    ("refused", "The workspace refused to list its serving endpoints (User does not have permission"),
    ("empty", "The workspace lists no serving endpoints"),
    ("unknown only", "The workspace names only endpoints with an API CoDA does not know (telepathy (task llm/v9/think))"),
    ("no chat model", "The workspace lists 2 serving endpoint(s) but no chat model"),
])
def test_a_listing_that_tells_nothing_is_one_sentence_and_the_configured_models_stay(workspace, tmp_path, bad,
                                                                                    sentence):
    if bad == "refused":
        workspace.serving_endpoints_status = 403
    else:
        workspace.serving_endpoints = {"empty": [], "unknown only": [serving_endpoint("telepathy", task="llm/v9/think")],
                                       "no chat model": [serving_endpoint(**e) for e in OTHER_SERVING_ENDPOINTS]}[bad]
    choices, notice, _ = choices_after_listing(workspace, tmp_path, ANTHROPIC_MODEL=UNSERVED)
    assert notice.startswith(sentence) and notice.endswith("so the agents keep their configured models.")
    assert notice.count(". ") == 0  # one sentence
    assert choices["claude"] == (UNSERVED, "ANTHROPIC_MODEL as set: what the workspace serves is not known", "unknown")
    assert choices["codex"].model == "databricks-gpt-5-5"


def test_an_endpoint_with_an_unknown_api_is_left_out_but_kept_when_set(workspace, tmp_path):
    workspace.serving_endpoints.append(serving_endpoint("telepathy", task="llm/v9/think"))
    choices, notice, _ = choices_after_listing(workspace, tmp_path, GEMINI_MODEL="telepathy")
    assert notice == ("The workspace names 1 endpoint(s) with an API CoDA does not know (telepathy (task llm/v9/think)); "
                      "they are left out of the choice (an agent set to one keeps it).")
    assert choices["gemini"].model == "telepathy" and "an API CoDA does not know" in choices["gemini"].why
    assert choices["claude"].status == "served"


def test_hermes_fallback_is_picked_the_same_way_and_never_its_own_model(workspace, tmp_path):
    _, _, coda = choices_after_listing(workspace, tmp_path, HERMES_FALLBACK_MODEL=UNSERVED)
    fallback = coda.hermes_fallback_choice()
    assert fallback.model == "databricks-claude-opus-4-7" and fallback.status == "replaced"  # opus-4-6 is Hermes' own
    assert fallback.why.startswith(f"HERMES_FALLBACK_MODEL {UNSERVED} is not served here")


# --- setup and doctor, in a real server --------------------------------------------------

def steps_of(server):
    return {step["id"]: step for step in server.get("/api/setup-status").json()["steps"]}


def run_doctor(server, env):
    return subprocess.run([sys.executable, str(ROOT / "coda.py"), "doctor"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env, "HOME": str(server.home)}).stdout


def test_setup_writes_the_chosen_models_and_setup_and_doctor_say_why(start_coda, workspace):
    without(workspace, "databricks-claude-opus-4-7", "databricks-gpt-5-5")
    env = coda_env(workspace, ANTHROPIC_MODEL="databricks-claude-opus-4-7")
    server = start_coda(env)
    (server.home / ".claude").mkdir()
    (server.home / ".claude" / "settings.json").write_text(json.dumps({"env": {"MINE": "1"}}))
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    steps = steps_of(server)

    settings = json.loads((server.home / ".claude" / "settings.json").read_text())
    assert settings["env"]["ANTHROPIC_MODEL"] == "databricks-claude-opus-4-6" and settings["env"]["MINE"] == "1"
    assert settings["env"]["ANTHROPIC_DEFAULT_SONNET_MODEL"] == "databricks-claude-sonnet-4-5"  # the served one
    claude = steps["configure-claude"]
    assert claude["status"] == "complete"
    assert claude["detail"].startswith("Claude Code: databricks-claude-opus-4-6 \N{EM DASH} ANTHROPIC_MODEL "
                                       "databricks-claude-opus-4-7 is not served here (served for Claude Code: ")
    assert "Claude Code: databricks-claude-opus-4-6" in server.log()  # the warning, logged too

    codex = steps["configure-codex"]  # nothing speaks the Responses API here: it says so, the others go on
    assert codex["status"] == "failed" and "no model for the OpenAI Responses API Codex needs" in codex["error"]
    assert tomllib.loads((server.home / ".codex" / "config.toml").read_text())["model"] == "databricks-gpt-5-5"
    assert all(steps[f"configure-{name}"]["status"] == "complete" for name in ("gemini", "opencode", "hermes"))
    assert steps["models"]["status"] == "complete"
    assert "Anthropic Messages: databricks-claude-haiku-4-5, databricks-claude-opus-4-6" in steps["models"]["output"][0]

    out = run_doctor(server, env)
    assert "ok    served models: 5 chat model(s)" in out, out
    assert "      OpenAI Responses: none" in out
    assert "      Gemini: databricks-gemini-2-5-flash, databricks-gemini-2-5-pro" in out
    assert ("warn  Claude Code model: databricks-claude-opus-4-6 \N{EM DASH} ANTHROPIC_MODEL databricks-claude-opus-4-7 "
            "is not served here") in out
    assert "FAIL  Codex model: databricks-gpt-5-5 \N{EM DASH} the workspace serves no model for the OpenAI" in out
    assert "ok    Gemini CLI model: databricks-gemini-2-5-pro \N{EM DASH} GEMINI_MODEL" in out


def test_a_refused_listing_is_one_sentence_in_setup_and_doctor(start_coda, workspace):
    workspace.serving_endpoints_status = 403
    env = coda_env(workspace, ANTHROPIC_MODEL=UNSERVED)
    server = start_coda(env)
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    steps = steps_of(server)
    assert steps["models"]["status"] == "complete"
    assert steps["models"]["detail"].startswith("The workspace refused to list its serving endpoints (")
    assert steps["configure-claude"]["status"] == "complete"
    settings = json.loads((server.home / ".claude" / "settings.json").read_text())
    assert settings["env"]["ANTHROPIC_MODEL"] == UNSERVED  # the configured name, as before
    out = run_doctor(server, env)
    assert "warn  served models: The workspace refused to list its serving endpoints" in out, out
    assert f"warn  Claude Code model: {UNSERVED} \N{EM DASH} ANTHROPIC_MODEL as set" in out


# --- rotations ---------------------------------------------------------------------------

def rotating_coda(workspace, tmp_path, **env):
    """A coda in this process whose token rotates every 0.2 s (its proxy taken as started)."""
    coda = load_coda(tmp_path, DATABRICKS_HOST=workspace.url, DATABRICKS_GATEWAY_HOST=workspace.gateway_url,
                     PAT_ROTATION_INTERVAL="0.2", PAT_TOKEN_LIFETIME="60", CODA_SDK_RETRY_TIMEOUT="2",
                     CODA_SKILLS="", **env)
    coda.PROCESS.proxy_port.tried.set()
    return coda


def gevent_wait_for(condition, timeout=30, what="the condition"):
    """wait_for, sleeping in gevent so the coda under test runs meanwhile."""
    for _ in range(int(timeout / 0.1)):
        value = condition()
        if value:
            return value
        gevent.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_rotations_reuse_a_fresh_listing(workspace, tmp_path):
    coda = rotating_coda(workspace, tmp_path)
    coda.PROCESS.pat.configure(workspace.add_token())
    minted = len(workspace.minted_tokens())
    gevent_wait_for(lambda: len(workspace.minted_tokens()) >= minted + 5, what="five rotations")
    assert len(listings(workspace)) == 1  # listed at token time only: MODELS_REFRESH_SECONDS is not over


def test_a_rotation_lists_again_and_rewrites_the_configs_whose_model_changed(workspace, tmp_path, monkeypatch):
    coda = rotating_coda(workspace, tmp_path)
    monkeypatch.setattr(coda, "MODELS_REFRESH_SECONDS", 0.5)
    coda.PROCESS.pat.configure(workspace.add_token())
    settings_path = tmp_path / ".claude" / "settings.json"
    assert json.loads(settings_path.read_text())["env"]["ANTHROPIC_MODEL"] == "databricks-claude-opus-4-7"
    settings = json.loads(settings_path.read_text())
    settings["env"]["MINE"] = "kept"
    settings_path.write_text(json.dumps(settings))
    codex_written = (tmp_path / ".codex" / "config.toml").stat().st_mtime_ns
    before = len(listings(workspace))

    without(workspace, "databricks-claude-opus-4-7")  # withdrawn from the workspace between rotations
    gevent_wait_for(lambda: json.loads(settings_path.read_text())["env"]["ANTHROPIC_MODEL"] == "databricks-claude-opus-4-6",
                    what="Claude Code's config to be rewritten")
    assert len(listings(workspace)) > before
    assert json.loads(settings_path.read_text())["env"]["MINE"] == "kept"  # merged, never wholesale
    assert (tmp_path / ".codex" / "config.toml").stat().st_mtime_ns == codex_written  # its model did not change
    step = next(s for s in coda.PROCESS.setup.token if s.id == "configure-claude")
    assert step.detail.startswith("Claude Code: databricks-claude-opus-4-6 \N{EM DASH}")


# --- the page ----------------------------------------------------------------------------

def test_the_setup_card_shows_which_model_an_agent_uses_and_why(open_tab):
    """The setup card's step detail line, with the server's answer stood in for."""
    from test_browser import json_route, wait_ready

    detail = ("Claude Code: databricks-claude-opus-4-6 \N{EM DASH} ANTHROPIC_MODEL databricks-claude-opus-4-7 is "
              "not served here (served for Claude Code: databricks-claude-opus-4-6)")
    answer = {"status": "running", "steps": [
        {"id": "configure-claude", "label": "Configure Claude Code", "status": "complete", "error": None,
         "started_at": 1, "finished_at": 2, "output": [], "detail": detail},
        {"id": "configure-codex", "label": "Configure Codex", "status": "failed", "error": "no model\nmore",
         "started_at": 1, "finished_at": 2, "output": [], "detail": "no model\nmore"},
        {"id": "models", "label": "Models the workspace serves", "status": "running", "error": None,
         "started_at": 1, "finished_at": None, "output": [], "detail": None}]}
    _, page = open_tab(routes={"api/setup-status": json_route(answer)})
    wait_ready(page)
    card = page.locator(".setup-card")
    card.wait_for()
    assert page.locator(".step-detail").count() == 1  # a failed step's error says it once
    assert card.locator(".step-detail").inner_text() == detail
