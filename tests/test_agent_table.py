"""Adding an agent is one function and one row, for real: a copy of coda.py given a sixth row
and its writer (and its pin in versions.env) has that agent installed by install/agents.sh
(stand-in npm), configured by setup and checked by doctor. And the README's tables say what
the rows say."""

import json
import os
import re
import shutil
import subprocess
import sys

import conftest
from agent_table import AGENT_ROWS, agent_rows
from conftest import Coda, free_port, wait_for
from fake_workspace import FakeWorkspace
from test_agents_sh import FAKE_NPM

ROOT = conftest.ROOT
SIXTH_ROW = '''    Agent("sixth", "Sixth Agent", "npm", "sixth-agent", "SIXTH_AGENT_VERSION",
          "SIXTH_MODEL", "databricks-claude-sonnet-4-5", ".sixth/config.json", "configure_sixth",
          switch="ENABLE_SIXTH"),
'''
SIXTH_WRITER = '''def configure_sixth(ctx):
    """Sixth Agent: an OpenAI-compatible client at the local proxy."""
    merge_json(ctx.home / ".sixth" / "config.json", lambda data: data.update(
        model=CONFIG.models["sixth"], base_url=ctx.proxied("chat"), api_key=ctx.proxy_key))


'''


def coda_with_a_sixth_agent(root):
    """coda.py, install/ and static/ copied to `root`, plus the one row, the one function and the pin."""
    for folder in ("install", "static"):
        shutil.copytree(ROOT / folder, root / folder)
    source = (ROOT / "coda.py").read_text()
    source = source.replace("\n)\n\nif __name__ == \"__main__\" and sys.argv[1:] == [\"agents\"]:",
                            "\n" + SIXTH_ROW + ")\n\nif __name__ == \"__main__\" and sys.argv[1:] == [\"agents\"]:", 1)
    source = source.replace("\nMCP_NAMES = ", "\n" + SIXTH_WRITER + "MCP_NAMES = ", 1)
    (root / "coda.py").write_text(source)
    with open(root / "install" / "versions.env", "a") as versions:
        versions.write("SIXTH_AGENT_VERSION=1.2.3\n")
    assert [row.name for row in agent_rows(root / "coda.py")][-1] == "sixth"


def test_a_sixth_agent_is_one_function_and_one_row(tmp_path, monkeypatch):
    root = tmp_path / "coda"
    coda_with_a_sixth_agent(root)
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "npm").write_text(FAKE_NPM.replace("PYTHON", sys.executable, 1))
    (tools / "npm").chmod(0o755)
    bins = {row.package: row.name for row in agent_rows(root / "coda.py") if row.kind == "npm"}
    env = {"PATH": f"{tools}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "npm.log"),
           "FAKE_NPM_BINS": json.dumps(bins), "CODA_INSTALL": "1", "CODA_SKILLS": "", "ENABLE_HERMES": "0",
           "CODA_RELEASE_MIRROR": f"http://127.0.0.1:{free_port()}", "SIXTH_MODEL": "databricks-sixth-model",
           "DEEPWIKI_MCP_URL": "", "EXA_MCP_URL": ""}

    listed = subprocess.run([sys.executable, str(root / "coda.py"), "agents"], capture_output=True, text=True, timeout=30)
    assert listed.stdout.splitlines()[-1] == "sixth npm sixth-agent SIXTH_AGENT_VERSION"
    help_text = subprocess.run(["bash", str(root / "install" / "agents.sh"), "--prefix", str(tmp_path / "p"), "nope"],
                               capture_output=True, text=True, timeout=30, env={**os.environ, **env}).stderr
    assert help_text.splitlines()[-1].endswith("(agents: claude codex gemini opencode hermes sixth)")

    workspace = FakeWorkspace().start()
    monkeypatch.setattr(conftest, "ROOT", root)  # Coda runs ROOT/coda.py
    coda = Coda(tmp_path / "home", {**env, "DATABRICKS_HOST": workspace.url,
                                    "DATABRICKS_GATEWAY_HOST": workspace.gateway_url})
    try:
        def settled():
            steps = {s["id"]: s for s in coda.get("/api/setup-status").json()["steps"]}
            return steps if steps["sixth"]["status"] not in ("pending", "running") else None
        steps = wait_for(settled, 120, step=0.3, what="the sixth agent's install step")
        assert steps["sixth"]["status"] == "complete", steps["sixth"]
        assert steps["sixth"]["label"] == "Sixth Agent" and "hermes" not in steps
        assert "npm install -g --prefix" in (tmp_path / "npm.log").read_text()
        assert (coda.home / ".local" / "bin" / "sixth").exists()

        coda.api("/api/configure-pat", {"token": workspace.add_token(comment="pasted")})
        config = coda.home / ".sixth" / "config.json"
        wait_for(config.exists, 60, step=0.2, what="the sixth agent's config")
        written = json.loads(config.read_text())
        assert written["model"] == "databricks-sixth-model" and written["base_url"].endswith("/mlflow/v1")
        assert oct(config.stat().st_mode & 0o777) == "0o600"
        steps = {s["id"]: s for s in coda.get("/api/setup-status").json()["steps"]}
        assert steps["configure-sixth"]["status"] == "complete"
        opencode = json.loads((coda.home / ".config" / "opencode" / "opencode.json").read_text())
        assert "databricks-sixth-model" in opencode["provider"]["databricks"]["models"]  # every model is declared

        doctor_env = {**os.environ, **env, "HOME": str(coda.home), "CODA_PROXY_PORT": str(coda.proxy_port)}
        doctor = subprocess.run([sys.executable, str(root / "coda.py"), "doctor"], capture_output=True, text=True,
                                timeout=120, env=doctor_env)
        assert "ok    Sixth Agent installed and configured: sixth-agent 1.2.3" in doctor.stdout, doctor.stdout
        doctor = subprocess.run([sys.executable, str(root / "coda.py"), "doctor"], capture_output=True, text=True,
                                timeout=120, env={**doctor_env, "ENABLE_SIXTH": "false"})
        assert "Sixth Agent" not in doctor.stdout and "Codex installed and configured" in doctor.stdout
    finally:
        coda.stop()
        workspace.stop()


def readme_table(text, header):
    """The rows of the README table under `header`, as lists of cells."""
    lines = text[text.index(header):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_readme_says_what_the_rows_say():
    text = (ROOT / "README.md").read_text()
    settings = {cells[0]: cells for cells in readme_table(text, "| variable |")}
    for row in AGENT_ROWS:
        assert settings[f"`{row.model_variable}`"][1] == f"`{row.default_model}`", row.name
        if row.switch:
            assert settings[f"`{row.switch}`"][1] == "`true`", row.name
    agents = [cells for cells in readme_table(text, "| agent | config CoDA merges into |")
              if cells[0] != "Databricks CLI and SDK"]
    assert [cells[0] for cells in agents] == [row.label for row in AGENT_ROWS]
    for cells, row in zip(agents, AGENT_ROWS):
        assert f"`~/{row.config_file}`" in cells[1], row.name
    assert re.search(r"Type " + r",? (or )?".join(f"`{row.name}`" for row in AGENT_ROWS), text)
