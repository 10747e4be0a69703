"""MCP servers for every agent: the Databricks managed servers (their settings, the writers'
entries in each agent's own format, merged with the user's own) and the local proxy's /mcp
route, which adds the live token; the third-party servers and their switch."""

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
import requests

import coda
from conftest import ROOT, Coda, wait_for
from fake_workspace import FakeWorkspace
from test_agents import AGENTS, Terminal, seed_trust

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
    assert [name for name, _, _ in coda.AgentContext().mcp_servers()] == ["deepwiki", "exa"]
    with pytest.raises(coda.ConfigError, match="held by another program"):
        coda.configure_claude(coda.AgentContext())  # every agent's model calls need the proxy too
    step = coda.mcp_step()
    step.execute()
    assert step.status == "failed" and "held by another program" in step.error


def doctor_lines(home, **env):
    """What `coda.py doctor` says of the MCP servers (its check and the lines under it)."""
    outside = {k: v for k, v in os.environ.items() if not k.startswith(("CODA_", "DATABRICKS_"))}
    done = subprocess.run([sys.executable, str(ROOT / "coda.py"), "doctor"], capture_output=True, text=True,
                          timeout=120, env={**outside, "HOME": str(home), **env})
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "MCP servers" in line)
    return [lines[start]] + [line.strip() for line in lines[start + 1:] if line.startswith("        ")]


def test_doctor_says_which_servers_leave_the_workspace_and_names_a_malformed_value(tmp_path):
    lines = doctor_lines(tmp_path, **MANAGED)
    assert lines[0].startswith("ok    MCP servers: 4 in the workspace, 2 leaving it"), lines
    assert "databricks-sql: in the workspace (/api/2.0/mcp/sql, with the user's current token)" in lines
    assert "deepwiki: LEAVES THE WORKSPACE (to mcp.deepwiki.com; CODA_MCP_THIRD_PARTY=0 drops it)" in lines
    assert doctor_lines(tmp_path, CODA_MCP_THIRD_PARTY="0")[0] == "ok    MCP servers: 1 in the workspace, 0 leaving it"
    failed = doctor_lines(tmp_path, CODA_MCP_VECTOR_SEARCH="main")[0]
    assert failed.startswith("FAIL  MCP servers: CODA_MCP_VECTOR_SEARCH: 'main' is not catalog.schema"), failed


# The local proxy's /mcp route and the real agent CLIs, against the fake workspace.

@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    workspace = FakeWorkspace().start()
    home = tmp_path_factory.mktemp("mcp-home")
    seed_trust(home)
    env = {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
           "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": "",  # no internet here
           "PATH": f"{AGENTS / 'bin'}:{os.environ['PATH']}", **MANAGED,
           "PAT_ROTATION_INTERVAL": "3600", "PAT_TOKEN_LIFETIME": "7200"}
    server = Coda(home, env)
    server.pasted = workspace.add_token(comment="pasted by the user")
    server.api("/api/configure-pat", {"token": server.pasted})
    wait_for(lambda: step_status(server, "mcp") in ("complete", "failed"), timeout=60, what="the MCP step")
    yield server, workspace
    server.stop()
    workspace.stop()


def step_status(server, step_id):
    steps = server.get("/api/setup-status").json()["steps"]
    return next(step["status"] for step in steps if step["id"] == step_id)


def coda_tokens(workspace):
    return {t.value for t in workspace.live_tokens(comment_contains="CoDA")}


def rotate(server, workspace):
    """A forced rotation: CoDA mints a new token and the old one is revoked."""
    old = coda_tokens(workspace)
    server.api("/api/configure-pat", {"token": server.pasted, "replace": True})
    wait_for(lambda: not any(workspace.find_token(value).live() for value in old), timeout=30,
             what="the old CoDA token to be revoked")
    return old


class McpClient:
    """Streamable HTTP as an MCP client speaks it, to the local proxy's /mcp route."""

    def __init__(self, server, path):
        self.url = f"http://127.0.0.1:{server.proxy_port}/mcp{path}"
        self.key = (server.home / ".coda" / "proxy-key").read_text().strip()
        self.session = None
        self.next_id = 1

    def send(self, method, params=None, notification=False, http="POST"):
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": "2025-06-18"}
        if self.session:
            headers["Mcp-Session-Id"] = self.session
        message = {"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})}
        if not notification:
            message["id"], self.next_id = self.next_id, self.next_id + 1
        answer = requests.request(http, self.url, json=message if http == "POST" else None, headers=headers,
                                  timeout=20)
        self.session = answer.headers.get("Mcp-Session-Id", self.session)
        return answer

    def call(self, method, params=None):
        """The JSON-RPC result, from a JSON or an SSE answer."""
        answer = self.send(method, params)
        assert answer.status_code == 200, (answer.status_code, answer.text)
        if answer.headers["Content-Type"].startswith("text/event-stream"):
            data = [line[5:].strip() for line in answer.text.splitlines() if line.startswith("data:")]
            return "sse", json.loads(data[-1])["result"]
        return "json", answer.json()["result"]


def test_the_proxy_speaks_streamable_http_with_the_live_token_across_a_rotation(rig):
    server, workspace = rig
    assert step_status(server, "mcp") == "complete"
    mark = len(workspace.mcp_requests)
    client = McpClient(server, "/sql")
    kind, result = client.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                              "clientInfo": {"name": "test", "version": "1"}})
    assert kind == "json" and client.session and result["capabilities"]["tools"] is not None
    assert client.send("notifications/initialized", notification=True).status_code == 202
    assert client.call("tools/list")[1]["tools"][0]["name"] == "execute_sql"
    kind, result = client.call("tools/call", {"name": "execute_sql", "arguments": {"query": "SELECT 1"}})
    assert kind == "sse" and "FAKE-TOOL-MCP-RESULT from /sql: SELECT 1" in result["content"][0]["text"]
    assert client.send("", http="GET").status_code == 405  # no server stream: the client goes on without
    before = workspace.mcp_requests[mark:]
    assert all(r["token"] in coda_tokens(workspace) and r["token_live"] for r in before)
    assert all(r["session"] == client.session for r in before[1:])  # the session id passed both ways

    old = rotate(server, workspace)
    mark = len(workspace.mcp_requests)
    kind, result = client.call("tools/call", {"name": "execute_sql", "arguments": {"query": "SELECT 2"}})
    assert "SELECT 2" in result["content"][0]["text"]  # the same session, now with the new token
    assert client.send("", http="DELETE").status_code == 200
    after = workspace.mcp_requests[mark:]
    assert len(after) == 2 and all(r["token"] in coda_tokens(workspace) and r["token"] not in old for r in after)


@pytest.mark.parametrize("path", ["/genie/" + GENIE, "/functions/main/tools", "/vector-search/main/docs/pages_index"])
def test_every_managed_server_answers_through_the_proxy(rig, path):
    server, workspace = rig
    client = McpClient(server, path)
    client.call("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                               "clientInfo": {"name": "test", "version": "1"}})
    assert client.call("tools/list")[1]["tools"][0]["name"] == "lookup"
    assert workspace.mcp_requests[-1]["server"] == path


@pytest.mark.parametrize("path", ["/mcp/../api/2.0/token/create", "/mcp/%2e%2e/api/2.0/token/list",
                                  "/mcp/sql/..%2f..%2ftoken%2flist", "/mcp//sql", "/mcp/sql%252f..", "/mcpx/sql"])
def test_hostile_mcp_paths_get_an_error_and_nothing_leaves(rig, path):
    server, workspace = rig
    key = (server.home / ".coda" / "proxy-key").read_text().strip()
    mark = len(workspace.requests)
    answer = requests.post(f"http://127.0.0.1:{server.proxy_port}{path}", json={}, timeout=10,
                           headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 404 and "error" in answer.json()
    assert workspace.requests[mark:] == []


def test_the_mcp_route_needs_the_proxy_key(rig):
    server, workspace = rig
    mark = len(workspace.requests)
    answer = requests.post(f"http://127.0.0.1:{server.proxy_port}/mcp/sql", json={}, timeout=10,
                           headers={"Authorization": f"Bearer {server.pasted}"})
    assert answer.status_code == 401 and workspace.requests[mark:] == []


# agent: the one-shot asking for the MCP tool (allowed where the CLI asks first: a one-shot cannot
# answer), and the API its model calls go to.
MCP_ONE_SHOTS = {
    "claude": ("claude --allowedTools=mcp__databricks-sql__execute_sql -p", "anthropic"),
    "codex": ("codex exec --skip-git-repo-check -c mcp_servers.databricks-sql.default_tools_approval_mode=approve",
              "responses"),
    "gemini": ("gemini --approval-mode yolo -p", "gemini"),
    "opencode": ("opencode run", "chat"),
    "hermes": ("hermes -z", "chat"),
}


def offered_tools(workspace, since):
    """The tool names each model call since `since` offered, for a failure message."""
    from fake_workspace import _turn_anthropic, _turn_chat, _turn_gemini, _turn_responses

    turns = {"anthropic": _turn_anthropic, "responses": _turn_responses, "chat": _turn_chat, "gemini": _turn_gemini}
    return [[name for name, _ in turns[r["api"]](r["body"]).tools] for r in workspace.gateway_requests[since:]
            if r["api"] in turns]


def ask_for_the_mcp_tool(server, workspace, agent, label):
    """The agent's one-shot in a CoDA terminal calls the SQL server's tool and quotes its result;
    returns the fake's record of that tools/call."""
    command, api = MCP_ONE_SHOTS[agent]
    terminal = Terminal(server)
    try:
        mark, gateway_mark = len(workspace.mcp_requests), len(workspace.gateway_requests)
        terminal.type_line(f"{command} 'please USE_MCP {label}'; echo END-$((6*7))-{label}-$?")
        terminal.wait_for(f"END-42-{label}-", timeout=120)  # the line typed says $((6*7)), not 42
        calls = [r for r in workspace.mcp_requests[mark:] if r["rpc"] == "tools/call"]
        assert calls, (f"{agent} called no MCP tool; MCP requests {[(r['method'], r['rpc'], r['status']) for r in workspace.mcp_requests[mark:]]}; "
                       f"offered tools {offered_tools(workspace, gateway_mark)}; screen ends with {terminal.tail()!r}")
        said = re.search(f"FAKE-REPLY-{api} tool said: [^\r\n]*FAKE-TOOL-MCP-RESULT from /sql", terminal.text())
        assert said, terminal.tail()  # the model got the tool's result (Hermes prefixes it with "result: ")
        return calls[0], workspace.mcp_requests[mark:]
    finally:
        terminal.close()


@pytest.mark.skipif(not (AGENTS / "bin" / "claude").exists(), reason="the agent CLIs are installed by tests/run.sh")
@pytest.mark.parametrize("agent", list(MCP_ONE_SHOTS))
def test_each_agent_calls_a_managed_mcp_tool_with_the_live_token_before_and_after_a_rotation(rig, agent):
    server, workspace = rig
    call, requests_made = ask_for_the_mcp_tool(server, workspace, agent, f"{agent}-before")
    assert call["server"] == "/sql" and call["tool"] == "execute_sql" and call["status"] == 200
    assert all(r["token_live"] and r["token"] in coda_tokens(workspace) for r in requests_made)
    old = rotate(server, workspace)
    call, requests_made = ask_for_the_mcp_tool(server, workspace, agent, f"{agent}-after")
    assert call["status"] == 200 and all(r["token"] not in old and r["token_live"] for r in requests_made)


def test_no_file_under_home_holds_a_workspace_token(rig):
    """After every agent above ran (so their own files are there too): no config, cache or log holds
    any token the workspace knows (pasted or minted), but ~/.databrickscfg, which is for the CLI
    and SDK and holds the current one by design."""
    server, workspace = rig
    values = {t.value.encode() for t in workspace.tokens}
    assert len(values) >= 3  # the pasted one and at least two minted (a rotation ran)
    holding = []
    for path in server.home.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != server.home / ".databrickscfg":
            data = path.read_bytes()
            holding += [str(path.relative_to(server.home)) for value in values if value in data]
    assert holding == []


def test_the_page_names_the_servers_that_leave_the_workspace_and_never_their_url(start_coda, tmp_path):
    """/api/app-state lists every MCP server; a third-party one by its host alone, since its URL may
    carry a key (Exa's ?exaApiKey=): neither it nor setup's step shows the URL. The page's card
    names them, and stays hidden once hidden."""
    from test_browser import CHROMIUM, Tab, wait, wait_ready
    from playwright import sync_api

    workspace = FakeWorkspace().start()
    try:
        server = start_coda({"DATABRICKS_HOST": workspace.url, "EXA_MCP_URL": "https://mcp.exa.ai/mcp?exaApiKey=key-123",
                             "DEEPWIKI_MCP_URL": ""})
        state = server.get("/api/app-state").json()
        assert state["mcp_servers"] == [
            {"name": "databricks-sql", "leaves_workspace": False, "path": "/api/2.0/mcp/sql"},
            {"name": "exa", "leaves_workspace": True, "host": "mcp.exa.ai"}]
        server.api("/api/configure-pat", {"token": workspace.add_token(comment="pasted by the user")})
        wait_for(lambda: step_status(server, "mcp") == "complete", timeout=60, what="the MCP step")
        setup = server.get("/api/setup-status").text
        assert "key-123" not in setup and "exa leave the workspace" in setup
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            tab = Tab(browser, server)
            page = tab.open()
            wait_ready(page)
            wait(page, "() => !!document.querySelector('[data-card=\"mcp\"]')", what="the MCP card")
            card = page.locator('[data-card="mcp"]').inner_text()
            assert "exa (mcp.exa.ai)" in card and "leave your Databricks workspace" in card and "key-123" not in card
            page.locator('[data-card="mcp"] button').click()
            page = tab.reload(page)
            wait_ready(page)
            wait(page, "() => performance.getEntriesByType('resource').filter((e) => e.name.endsWith('api/app-state'))"
                       ".length >= 2", what="the page's app-state reads (the token's and the MCP card's)")
            assert page.locator('[data-card="mcp"]').count() == 0  # hidden for this same list
            tab.close()
            browser.close()
            assert not tab.problems, tab.problems
    finally:
        workspace.stop()
