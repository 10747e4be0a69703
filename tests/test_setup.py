"""Setup at boot: the real install/ scripts pointed at local sources, honest step states,
skills from local git repositories, and the parallel group really running in parallel."""

import os
import subprocess
import sys
import time
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


def test_a_proxy_port_held_by_another_program_fails_the_step_with_its_answer(start_coda, tmp_path):
    (tmp_path / "empty").mkdir()
    squatter = Mirror(tmp_path / "empty")  # a file server with nothing to serve: /health is a 404
    try:
        port = str(squatter.server.server_address[1])
        coda = start_coda({"CODA_PROXY_PORT": port})
        _, steps = wait_settled(coda, ["proxy"], timeout=60)
        assert steps["proxy"]["status"] == "failed"
        assert "HTTP 404" in steps["proxy"]["error"] and "CODA_PROXY_PORT" in steps["proxy"]["error"]
        doctor = subprocess.run([sys.executable, str(ROOT / "coda.py"), "doctor"], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "HOME": str(coda.home), "CODA_PROXY_PORT": port})
        assert "is not CoDA's proxy (HTTP 404)" in doctor.stdout, doctor.stdout + doctor.stderr
    finally:
        squatter.close()


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
