"""MCP servers for every agent: the Databricks managed servers (their settings, the writers'
entries in each agent's own format, merged with the user's own) and the local proxy's /mcp
route, which adds the live token; the third-party servers and their switch."""

import json
import tomllib

import pytest
import requests

import coda
from conftest import wait_for
from fake_workspace import FakeWorkspace

GENIE = "01ef0123456789abcdef0123456789ab"
MANAGED = {"CODA_MCP_GENIE_SPACES": GENIE, "CODA_MCP_UC_FUNCTIONS": "main.tools",
           "CODA_MCP_VECTOR_SEARCH": "main.docs.pages_index"}
EXPECTED_PATHS = {"databricks-sql": "/sql", f"databricks-genie-{GENIE}": f"/genie/{GENIE}",
                  "databricks-functions-main-tools": "/functions/main/tools",
                  "databricks-vector-search-main-docs-pages_index": "/vector-search/main/docs/pages_index"}
PROXY_PORT = 4999


def test_the_settings_name_the_documented_paths():
    managed, errors = coda._env_managed_mcp(MANAGED)
    assert dict(managed) == EXPECTED_PATHS and errors == ()
    assert coda._env_managed_mcp({"CODA_MCP_SQL": "0"}) == ((), ())


@pytest.mark.parametrize("setting,value", [
    ("CODA_MCP_GENIE_SPACES", "not-a-space"), ("CODA_MCP_GENIE_SPACES", GENIE + "0"),
    ("CODA_MCP_GENIE_SPACES", "../../token/create"), ("CODA_MCP_UC_FUNCTIONS", "main"),
    ("CODA_MCP_UC_FUNCTIONS", "main.a.b.c"), ("CODA_MCP_UC_FUNCTIONS", "main..x"),
    ("CODA_MCP_UC_FUNCTIONS", "main.sch ema"), ("CODA_MCP_VECTOR_SEARCH", "main/../x.y"),
    ("CODA_MCP_VECTOR_SEARCH", "main.%2e%2e"), ("CODA_MCP_VECTOR_SEARCH", "cat.sch?x=1"),
])
def test_a_malformed_value_is_named_and_left_out(setting, value):
    good = GENIE if setting == "CODA_MCP_GENIE_SPACES" else "main.good"
    managed, errors = coda._env_managed_mcp({setting: f"{value}, {good}", "CODA_MCP_SQL": "0"})
    assert len(managed) == 1 and len(errors) == 1 and setting in errors[0] and repr(value) in errors[0]
    assert [path.split("/", 2)[2] for _, path in managed] == [good.replace(".", "/")]
    assert all(coda.PROXY_PATH_SEGMENT.fullmatch(part) for _, path in managed for part in path.split("/")[1:])


@pytest.fixture
def home(tmp_path, monkeypatch):
    """coda's writers in this process, for a HOME of their own, with the proxy port ours."""
    def configure(**env):
        config = coda.Config.from_env({"HOME": str(tmp_path), "DATABRICKS_HOST": "https://ws.example.com",
                                       "CODA_PROXY_PORT": str(PROXY_PORT), **env})
        monkeypatch.setattr(coda, "CONFIG", config)
        monkeypatch.setattr(coda, "PATHS", coda.Paths.under(tmp_path))
        coda.proxy_key.cache_clear()
        port = coda.ProxyPort()
        port.tried.set()
        monkeypatch.setattr(coda.PROCESS, "proxy_port", port)
        gateway = coda.Gateway()
        gateway.origin, gateway.generation = "https://ws.example.com", 1
        monkeypatch.setattr(coda.PROCESS, "gateway", gateway)
        for agent in coda.AGENTS:
            coda.agent_function(agent.writer)(coda.AgentContext())
        return servers(tmp_path)
    configure.path = tmp_path
    yield configure
    coda.proxy_key.cache_clear()


def servers(home):
    """Each agent's MCP servers, as its config file holds them."""
    return {"claude": json.loads((home / ".claude.json").read_text()).get("mcpServers", {}),
            "codex": tomllib.loads((home / ".codex" / "config.toml").read_text()).get("mcp_servers", {}),
            "gemini": json.loads((home / ".gemini" / "settings.json").read_text()).get("mcpServers", {}),
            "opencode": json.loads((home / ".config" / "opencode" / "opencode.json").read_text()).get("mcp", {}),
            "hermes": json.loads((home / ".hermes" / "config.yaml").read_text().split("\n", 1)[1])["mcp_servers"]}


def url_and_headers(agent, entry):
    url = entry.get("httpUrl") if agent == "gemini" else entry["url"]
    return url, entry.get("http_headers" if agent == "codex" else "headers")


def test_every_agent_gets_every_managed_server_at_the_proxy_with_its_key(home):
    written = home(**MANAGED)
    key = coda.proxy_key()
    for agent, entries in written.items():
        for name, path in EXPECTED_PATHS.items():
            url, headers = url_and_headers(agent, entries[name])
            assert url == f"http://127.0.0.1:{PROXY_PORT}/mcp{path}", (agent, name)
            assert headers == {"Authorization": f"Bearer {key}"}, agent
    assert written["claude"]["databricks-sql"]["type"] == "http"
    assert written["opencode"]["databricks-sql"]["type"] == "remote"
    assert set(written["claude"]) == set(EXPECTED_PATHS) | {"deepwiki", "exa"}


def test_the_users_own_servers_stay_and_coda_s_old_ones_go(home):
    own = {"mine": {"type": "http", "url": "https://mine.example.com/mcp"},
           "databricks-mine": {"type": "http", "url": "https://ws.example.com/api/2.0/mcp/sql"}}
    stale = {"databricks-genie-" + "f" * 32: {"type": "http", "url": f"http://127.0.0.1:4000/mcp/genie/{'f' * 32}"},
             "deepwiki": {"type": "http", "url": "https://old.example.com"}}
    home.path.joinpath(".claude.json").write_text(json.dumps({"mcpServers": {**own, **stale}, "theme": "dark"}))
    home.path.joinpath(".codex").mkdir()
    home.path.joinpath(".codex", "config.toml").write_text(
        '[mcp_servers.mine]\nurl = "https://mine.example.com/mcp"\n\n'
        f'[mcp_servers.databricks-genie-{"f" * 32}]\nurl = "http://127.0.0.1:4000/mcp/genie/{"f" * 32}"\n')
    written = home(CODA_MCP_THIRD_PARTY="0")
    assert written["claude"] == {**own, "databricks-sql": written["claude"]["databricks-sql"]}
    assert set(written["codex"]) == {"mine", "databricks-sql"}
    assert json.loads(home.path.joinpath(".claude.json").read_text())["theme"] == "dark"


def test_one_switch_drops_every_third_party_server(home):
    before = home(TEAM_MEMORY_MCP_URL="https://memory.example.com/mcp")
    assert all({"deepwiki", "exa", "team-memory"} <= set(entries) for entries in before.values())
    after = home(TEAM_MEMORY_MCP_URL="https://memory.example.com/mcp", CODA_MCP_THIRD_PARTY="0")
    assert all(set(entries) == {"databricks-sql"} for entries in after.values()), after
    assert coda.CONFIG.mcp_servers == ()


def test_a_malformed_setting_fails_the_mcp_step_and_breaks_no_config(home):
    written = home(CODA_MCP_GENIE_SPACES=f"{GENIE},oops", CODA_MCP_UC_FUNCTIONS="main")
    for entries in written.values():
        assert set(entries) == {"databricks-sql", f"databricks-genie-{GENIE}", "deepwiki", "exa"}
    step = coda.mcp_step()
    step.execute()
    assert step.status == "failed"
    assert "'oops'" in step.error and "CODA_MCP_GENIE_SPACES" in step.error and "'main'" in step.error
    assert "deepwiki, exa leave the workspace" in step.label
    assert any("deepwiki: LEAVES THE WORKSPACE" in line for line in step.output)


def test_without_the_proxy_port_no_managed_server_is_written(home, monkeypatch):
    home()
    port = coda.ProxyPort()
    port.tried.set()
    port.error = "127.0.0.1:4999 is held by another program"
    monkeypatch.setattr(coda.PROCESS, "proxy_port", port)
    monkeypatch.setattr(coda, "PROXY_SETTLE_SECONDS", 0)
    coda.configure_claude(coda.AgentContext())
    assert set(servers(home.path)["claude"]) == {"deepwiki", "exa"}
    step = coda.mcp_step()
    step.execute()
    assert step.status == "failed" and "held by another program" in step.error
