"""install/agents.sh with stand-in `npm` and `python3` on PATH: the pinned
versions from versions.env are asked for, a subset installs only itself, a
second run installs nothing, failures end with "<tool>: error: ...". The agents
are coda.py's rows (agent_table), the same ones the script reads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent_table import AGENT_ROWS, BY_NAME, NPM_AGENTS, PYPI_AGENTS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "install" / "agents.sh"
PINS = dict(re.findall(r"^([A-Z_]+)=(\S+)$", (ROOT / "install" / "versions.env").read_text(), re.M))
NPM_BINS = {package: name for name, package in NPM_AGENTS.items()}
PIP_BINS = {package: name for name, package in PYPI_AGENTS.items()}


def pinned(name):
    return PINS[BY_NAME[name].version_key]

# npm stand-in: logs its arguments, "installs" name@version under --prefix.
FAKE_NPM = r'''#!PYTHON
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("npm " + " ".join(args) + "\n")
if os.environ.get("FAKE_NPM_FAIL"):
    sys.exit(1)
prefix = args[args.index("--prefix") + 1]
bins = json.loads(os.environ["FAKE_NPM_BINS"])
for spec in [a for a in args if "@" in a.lstrip("@")]:
    name, _, version = spec.rpartition("@")
    pkg = os.path.join(prefix, "lib", "node_modules", name)
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, "package.json"), "w") as f:
        json.dump({"name": name, "version": version}, f)
    os.makedirs(os.path.join(prefix, "bin"), exist_ok=True)
    exe = os.path.join(prefix, "bin", bins[name])
    with open(exe, "w") as f:
        f.write(f"#!/bin/sh\necho {name} {version}\n")  # what `--version` says
    os.chmod(exe, 0o755)
'''

# python3 stand-in for the PyPI agents: `-m venv DIR` makes DIR/bin/python (this
# same script); in a venv, `-m pip install PACKAGE==V` records V and makes the
# agent's bin/NAME, and `-c ...` or `- <script` prints the recorded version.
FAKE_PYTHON = r'''#!PYTHON
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("python " + " ".join(args) + "\n")
here = os.path.dirname(os.path.abspath(sys.argv[0]))
if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    shutil.copy(sys.argv[0], os.path.join(args[2], "bin", "python"))
elif args[:3] == ["-m", "pip", "install"]:
    package, version = [a for a in args if "==" in a][0].split("==")
    with open(os.path.join(here, "version"), "w") as f:
        f.write(version)
    exe = os.path.join(here, json.loads(os.environ["FAKE_PIP_BINS"])[package])
    with open(exe, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(exe, 0o755)
elif args[:1] in (["-c"], ["-"]):  # the installed version (asked with a script on stdin)
    try:
        print(open(os.path.join(here, "version")).read())
    except FileNotFoundError:
        sys.exit(1)
'''


@pytest.fixture
def stand_ins(tmp_path):
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, text in (("npm", FAKE_NPM), ("python3", FAKE_PYTHON)):
        # an absolute interpreter: `env python3` would find the stand-in itself
        (tools / name).write_text(text.replace("PYTHON", sys.executable, 1))
        (tools / name).chmod(0o755)
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NPM_CONFIG", "PIP_", "UV_", "PREFIX"))}
    env.update(PATH=f"{tools}:{os.environ['PATH']}", FAKE_LOG=str(log), CODA_PYTHON=sys.executable,
               FAKE_NPM_BINS=json.dumps(NPM_BINS), FAKE_PIP_BINS=json.dumps(PIP_BINS), HOME=str(tmp_path / "home"))
    return tmp_path, env, log


def run(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_all_agents_at_their_pinned_versions_then_nothing(stand_ins):
    tmp, env, log = stand_ins
    prefix = tmp / "agents"
    r = run(env, "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    npm = [c for c in calls if c.startswith("npm ")]
    assert sorted(c.split()[-1] for c in npm) == sorted(f"{package}@{pinned(name)}" for name, package in NPM_AGENTS.items())
    assert all(f"--prefix {prefix}" in c and " -g " in c for c in npm)
    for name, package in PYPI_AGENTS.items():
        assert any(c.endswith(f"{package}=={pinned(name)}") for c in calls), name
        assert (prefix / "bin" / name).is_symlink()
        assert (prefix / "bin" / name).resolve() == prefix / "lib" / f"{name}-venv" / "bin" / name
    for row in AGENT_ROWS:
        assert os.access(prefix / "bin" / row.name, os.X_OK), row.name

    log.write_text("")
    r = run(env, "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    assert [c for c in log.read_text().splitlines() if "install" in c] == []
    for row in AGENT_ROWS:
        assert f"{row.name} {pinned(row.name)} is already installed" in r.stderr


def test_subset_and_prefix_from_environment(stand_ins):
    tmp, env, log = stand_ins
    env["PREFIX"] = str(tmp / "p")
    r = run(env, "codex", "hermes")
    assert r.returncode == 0, r.stderr
    calls = log.read_text()
    assert f"@openai/codex@{pinned('codex')}" in calls
    assert "claude-code" not in calls and "gemini-cli" not in calls and "opencode-ai" not in calls
    assert (tmp / "p" / "bin" / "codex").exists() and (tmp / "p" / "bin" / "hermes").exists()
    assert not (tmp / "p" / "bin" / "claude").exists()


def test_a_changed_pin_reinstalls(stand_ins):
    tmp, env, log = stand_ins
    prefix = tmp / "agents"
    pj = prefix / "lib" / "node_modules" / "opencode-ai" / "package.json"
    pj.parent.mkdir(parents=True)
    pj.write_text('{"version": "0.0.1"}')
    (prefix / "bin").mkdir()
    (prefix / "bin" / "opencode").write_text("")
    r = run(env, "--prefix", str(prefix), "opencode")
    assert r.returncode == 0, r.stderr
    assert f"opencode-ai@{pinned('opencode')}" in log.read_text()
    assert "(was 0.0.1)" in r.stderr


def test_failures_end_with_one_clear_line(stand_ins):
    tmp, env, log = stand_ins
    env["FAKE_NPM_FAIL"] = "1"
    env["NPM_CONFIG_REGISTRY"] = "http://127.0.0.1:9/"
    r = run(env, "--prefix", str(tmp / "x"), "gemini")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        f"gemini: error: npm install @google/gemini-cli@{pinned('gemini')} failed "
        "(registry: http://127.0.0.1:9/)")
    r = run(env, "--prefix", str(tmp / "x"), "nonsense")
    names = " ".join(row.name for row in AGENT_ROWS)
    assert r.returncode != 0
    assert r.stderr.splitlines()[-1] == f"agents.sh: error: unknown argument 'nonsense' (agents: {names})"
    r = run(env, "--prefix")
    assert r.returncode != 0 and r.stderr.strip().endswith("--prefix needs a directory")


def test_shellcheck_clean():
    import shutil
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", "-x", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_the_script_reads_coda_agents_which_answers_without_gevent(stand_ins):
    """`coda.py agents` is answered before the heavy imports: a python3 without gevent runs it."""
    code = ("import sys; sys.modules['gevent'] = None; sys.argv = ['coda.py', 'agents']; "
            f"exec(compile(open({str(ROOT / 'coda.py')!r}).read(), 'coda.py', 'exec'), {{'__name__': '__main__'}})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{r.name} {r.kind} {r.package} {r.version_key}" for r in AGENT_ROWS]
    tmp, env, log = stand_ins
    env["CODA_PYTHON"] = str(tmp / "missing-python")
    r = run(env, "--prefix", str(tmp / "x"))
    assert r.returncode != 0 and "could not read the agent table" in r.stderr.splitlines()[-1]
    r = run(env, "--help")
    assert r.returncode == 0 and "install/agents.sh [--prefix DIR] [AGENT ...]" in r.stdout
