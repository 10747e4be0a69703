"""Setup at boot: the real install/ scripts pointed at local sources, honest step states,
skills from local git repositories, and the parallel group really running in parallel;
the local proxy proving its port (PROTOCOL: The local proxy, Proof)."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from agent_table import NPM_AGENTS
from conftest import ROOT, free_port
from test_install import Mirror, publish

AGENTS = Path(os.environ.get("CODA_TEST_AGENTS", Path.home() / ".cache" / "coda-test" / "agents"))


def skill_repo(root, name, skills, tag="v1.0"):
    """A git repository with skill folders under skills/, tagged."""
    repo = root / name
    (repo / "skills").mkdir(parents=True)
    for skill in skills:
        (repo / "skills" / skill).mkdir()
        (repo / "skills" / skill / "SKILL.md").write_text(f"---\nname: {skill}\n---\nDo {skill}.\n")
    (repo / "skills" / "not-a-skill").mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "HOME": str(root)}
    for argv in (["init", "-q"], ["add", "."], ["commit", "-qm", "skills"], ["tag", tag]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, env=env, capture_output=True)
    return f"file://{repo}"


def seed_installed_agents(home):
    """Link the agents the test command installed into this HOME's ~/.local, as a previous setup would have."""
    local = home / ".local"
    (local / "bin").mkdir(parents=True)
    for name, package in NPM_AGENTS.items():
        target = local / "lib" / "node_modules" / package
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(AGENTS / "lib" / "node_modules" / package)
        (local / "bin" / name).symlink_to(AGENTS / "bin" / name)


def step_states(server):
    answer = server.get("/api/setup-status").json()
    return answer, {step["id"]: step for step in answer["steps"]}


def wait_settled(server, ids, timeout=240):
    deadline = time.time() + timeout
    while True:
        answer, steps = step_states(server)
        if all(steps[i]["status"] not in ("pending", "running") for i in ids):
            return answer, steps
        assert time.time() < deadline, f"setup did not settle: {steps}"
        time.sleep(0.3)


def test_without_installs_the_install_steps_are_skipped(coda_server):
    answer, steps = wait_settled(coda_server, ["micro", "gh", "databricks-cli", "proxy", "claude", "skills"])
    assert answer["status"] == "complete"
    for step_id in ("micro", "gh", "databricks-cli", "claude", "codex", "skills"):
        assert steps[step_id]["status"] == "skipped" and steps[step_id]["error"] == "CODA_INSTALL=0"
    assert steps["proxy"]["status"] == "complete"
    assert steps["configure-claude"]["status"] == "skipped"  # no workspace configured locally
    assert steps["git-hooks"]["status"] == "skipped"  # nothing to sync to: a local user's git is left alone
    assert not (coda_server.home / ".gitconfig").exists()
    for step in answer["steps"]:
        assert set(step) >= {"id", "label", "status", "error", "started_at", "finished_at"}


# --- the local proxy's port: CoDA points agents only at a proxy it proves is its own ------------

HELD = "is held by another program (not this CoDA's proxy"
PROXIED_AGENTS = ("claude", "codex", "gemini", "opencode", "hermes")  # all reach the gateway through the proxy


class Squatter:
    """Another program on the proxy port: answers a CoDA-shaped /health, or echoes anything back."""

    def __init__(self, echo):
        self.requests = []
        squatter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                squatter.requests.append((self.path, dict(self.headers)))
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                answer = {"status": "healthy", "token": True}
                if echo:  # whatever was asked comes back, in every field a checker might read
                    answer.update(pid=1, path=self.path, headers=dict(self.headers),
                                  **{k: v[0] for k, v in query.items()}, proof=query.get("challenge", [""])[0])
                body = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def doctor(home, port, **env):
    """doctor's line on the local proxy, run outside any CoDA terminal unless env says otherwise."""
    outside = {k: v for k, v in os.environ.items() if k != "CODA_SERVER_PID"}
    done = subprocess.run([sys.executable, str(ROOT / "coda.py"), "doctor"], capture_output=True, text=True,
                          timeout=120, env={**outside, "HOME": str(home), "CODA_PROXY_PORT": str(port), **env})
    return next((line for line in done.stdout.splitlines() if "local proxy" in line), done.stdout + done.stderr)


def proxy_key(home):
    path = home / ".coda" / "proxy-key"
    return path.read_text().strip() if path.exists() else None  # made when first needed


def assert_no_agent_points_at(home, port):
    key = proxy_key(home)
    for written in (".claude/settings.json", ".codex/config.toml", ".gemini/.env", ".config/opencode/opencode.json",
                    ".local/share/opencode/auth.json", ".hermes/config.yaml"):
        path = home / written
        assert not path.exists() or f":{port}" not in path.read_text() and (key or "-") not in path.read_text(), written


def proxy_steps_settled(server):
    return wait_settled(server, ["proxy", *(f"configure-{agent}" for agent in PROXIED_AGENTS)], timeout=90)[1]


def coda_env(workspace, port):
    return {"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
            "CODA_PROXY_PORT": str(port), "PAT_ROTATION_INTERVAL": "3600"}


@pytest.mark.parametrize("echo", [False, True], ids=["coda-shaped-health", "echoes-anything"])
def test_a_squatter_on_the_proxy_port_gets_no_agent_and_no_key(start_coda, workspace, echo):
    squatter = Squatter(echo)
    try:
        coda = start_coda(coda_env(workspace, squatter.port))
        coda.api("/api/configure-pat", {"token": workspace.add_token()})
        steps = proxy_steps_settled(coda)
        sentence = f"127.0.0.1:{squatter.port} {HELD}): set CODA_PROXY_PORT to a free port"
        for step_id in ("proxy", *(f"configure-{agent}" for agent in PROXIED_AGENTS)):
            assert steps[step_id]["status"] == "failed" and steps[step_id]["error"] == sentence, steps[step_id]
        assert_no_agent_points_at(coda.home, squatter.port)
        session = coda.new_session()
        coda.type(session, "echo KEY=${GEMINI_API_KEY:-none} URL=${GOOGLE_GEMINI_BASE_URL:-none}\r")
        coda.read_until(session, "KEY=none URL=none")  # the terminals are not pointed at it either
        line = doctor(coda.home, squatter.port)
        assert line.startswith("FAIL") and HELD in line and "CODA_PROXY_PORT" in line, line
        assert squatter.requests, "doctor asked"  # a nonce, never the key: no proxy key was ever sent
        assert not any("coda-proxy-" in path + json.dumps(headers) for path, headers in squatter.requests)
    finally:
        squatter.close()


@pytest.mark.parametrize("same_home", [False, True], ids=["other-home", "same-home"])
def test_two_codas_given_one_proxy_port_never_share_it(start_coda, workspace, tmp_path, same_home):
    port = free_port()
    first = start_coda(coda_env(workspace, port))
    first.api("/api/configure-pat", {"token": workspace.add_token()})
    assert proxy_steps_settled(first)["proxy"]["status"] == "complete"
    second = start_coda(coda_env(workspace, port), home=first.home if same_home else tmp_path / "second")
    second.api("/api/configure-pat", {"token": workspace.add_token()})
    steps = proxy_steps_settled(second)
    sentence = f"127.0.0.1:{port} {HELD}): set CODA_PROXY_PORT to a free port"
    for step_id in ("proxy", *(f"configure-{agent}" for agent in PROXIED_AGENTS)):
        assert steps[step_id]["status"] == "failed" and steps[step_id]["error"] == sentence, steps[step_id]
    if not same_home:
        assert_no_agent_points_at(second.home, port)
        line = doctor(second.home, port)
        assert line.startswith("FAIL") and HELD in line, line
    else:  # the same key: the proof holds, but the proxy's pid is the first CoDA's, not this terminal's
        session = second.new_session()
        second.type(session, f"{sys.executable} {ROOT / 'coda.py'} doctor 2>&1 | grep 'local proxy'\r")
        text, _ = second.read_until(session, "free port", timeout=90)
        assert f"FAIL  local proxy: 127.0.0.1:{port} is held by another CoDA (pid {first.proc.pid})" in text, text
    assert doctor(first.home, port, CODA_SERVER_PID=str(first.proc.pid)).startswith("ok"), "the first keeps its own"
    assert proxy_steps_settled(first)["configure-gemini"]["status"] == "complete"


@pytest.mark.skipif(not (AGENTS / "bin" / "claude").exists(), reason="the agent CLIs are installed by tests/run.sh")
def test_setup_runs_the_real_installers_and_reports_honestly(start_coda, tmp_path):
    mirror_root = tmp_path / "mirror"
    mirror_root.mkdir()
    mirror = Mirror(mirror_root)
    try:
        publish(mirror_root, "micro", "x86_64", checksum="wrong")  # the deliberately broken step
        publish(mirror_root, "gh", "x86_64")
        publish(mirror_root, "databricks", "x86_64")
        sources = tmp_path / "sources"
        good = skill_repo(sources, "pack", ["brainstorming", "debugging"])
        skills = f"{good} v1.0 skills; file://{sources}/missing v1.0 skills"
        home = tmp_path / "home"
        seed_installed_agents(home)
        server = start_coda({"CODA_INSTALL": "1", "CODA_RELEASE_MIRROR": mirror.url, "ENABLE_HERMES": "false",
                             "CODA_SKILLS": skills, "CODA_PROXY_PORT": str(free_port())}, home=home)
        ids = ["micro", "gh", "databricks-cli", "proxy", *NPM_AGENTS, "skills"]
        answer, steps = wait_settled(server, ids)
    finally:
        mirror.close()

    assert steps["micro"]["status"] == "failed" and "checksum" in steps["micro"]["error"]
    assert not (home / ".local" / "bin" / "micro").exists()
    for step_id in ("gh", "databricks-cli", "proxy", *NPM_AGENTS):
        assert steps[step_id]["status"] == "complete", steps[step_id]
    assert (home / ".local" / "bin" / "gh").exists() and (home / ".local" / "bin" / "databricks").exists()
    assert any("already installed" in line for line in steps["claude"]["output"])
    assert steps["skills"]["status"] == "failed" and "missing" in steps["skills"]["error"]
    for folder in (home / ".claude" / "skills", home / ".agents" / "skills"):  # Claude; Codex and Gemini CLI
        assert sorted(p.name for p in folder.iterdir()) == ["brainstorming", "debugging"]
    assert answer["status"] == "failed"
    assert "hermes" not in steps
    # The parallel group started together, not one after another.
    starts = [steps[i]["started_at"] for i in (*NPM_AGENTS, "skills")]
    assert max(starts) - min(starts) < 1.0
    log = server.log()
    assert "setup: micro editor failed" in log and "setup: install steps done in" in log


def test_skills_command_refreshes_and_keeps_the_users_own(tmp_path):
    sources = tmp_path / "sources"
    first = skill_repo(sources, "one", ["alpha"], tag="v2")
    home = tmp_path / "home"
    (home / ".claude" / "skills" / "mine").mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "CODA_SKILLS": f"{first} v2 skills"}
    coda = Path(__file__).resolve().parent.parent / "coda.py"
    done = subprocess.run([os.sys.executable, str(coda), "skills"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (home / ".claude" / "skills").iterdir()) == ["alpha", "mine"]
    assert ((home / ".claude" / "skills" / "alpha" / "SKILL.md")).read_text().startswith("---")
    bad = subprocess.run([os.sys.executable, str(coda), "skills"], env={**env, "CODA_SKILLS": "just-one-field"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
