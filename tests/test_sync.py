"""Workspace sync on commit, against the fake workspace: the real CoDA configured with a
token, real git commits in a temporary HOME (git's global config lives there too), the
post-commit hook CoDA installs, and the background `sync` it starts.
"""

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, wait_for
from fake_workspace import FakeWorkspace

PROGRAM = ROOT / "coda.py"

NOTEBOOK = "# Databricks notebook source\nprint('hello')\n\n# COMMAND ----------\n\nprint(2)\n"
IPYNB = json.dumps({"cells": [{"cell_type": "code", "source": ["print(1)"], "metadata": {}, "outputs": [],
                               "execution_count": None}],
                    "metadata": {"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}},
                    "nbformat": 4, "nbformat_minor": 5})


@pytest.fixture
def workspace():
    fake = FakeWorkspace(port=free_port()).start()  # a fixed port: one test stops and restarts it
    yield fake
    fake.stop()


class Home:
    """A CoDA user's HOME: the real server with a configured token; git runs with HOME here only."""

    def __init__(self, server, workspace):
        self.server, self.workspace, self.path = server, workspace, server.home
        self.env = {"PATH": os.environ["PATH"], "HOME": str(self.path), "LANG": "C.UTF-8", "GIT_CONFIG_NOSYSTEM": "1"}
        self.projects = self.path / "projects"
        self.log_path = self.path / ".sync.log"
        if not self.run("git", "config", "--global", "user.email", check=False).stdout.strip():
            self.run("git", "config", "--global", "user.email", "tester@example.com")
            self.run("git", "config", "--global", "user.name", "Tester")

    def run(self, *argv, cwd=None, check=True, env=None, timeout=120, input=None):
        done = subprocess.run(argv, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, input=input)
        assert not check or done.returncode == 0, (argv, done.returncode, done.stdout, done.stderr)
        return done

    def coda(self, *args, check=True):
        """`python coda.py ARGS`."""
        return self.run(sys.executable, str(PROGRAM), *args, check=check,
                        env={"DATABRICKS_HOST": self.workspace.url})  # only the runner's offer-restore reads it

    def install_hooks(self):
        """The server's boot step that installs the hooks; its answer."""
        return wait_for(lambda: step(self.server, "git-hooks", settled=True), timeout=60)

    def git(self, repo, *args, check=True):
        return self.run("git", "-C", str(repo), *args, check=check)

    def repository(self, name, files, under=None):
        repo = (under or self.projects) / name
        repo.mkdir(parents=True, exist_ok=True)
        self.git(repo, "init", "-q")
        return repo, self.commit(repo, "first", files)

    def commit(self, repo, message, files=(), remove=()):
        """Write and add files, remove paths, commit; returns the commit id, having checked git was quick."""
        for name, text in dict(files).items():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text(text)
        if remove:
            self.git(repo, "rm", "-r", "-q", *remove)
        if files:
            self.git(repo, "add", "--force", "--", *dict(files))  # named files only, even if ignored
        started = time.time()
        self.git(repo, "commit", "-q", "-m", message)
        assert time.time() - started < 5, "the commit waited for something"
        return self.git(repo, "rev-parse", "HEAD").stdout.strip()

    def log(self):
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, *needles, timeout=60):
        return wait_for(lambda: next((line for line in self.log().splitlines() if all(n in line for n in needles)),
                                     None), timeout)

    def wait_synced(self, commit, timeout=60):
        line = self.wait_log(f" at {commit[:12]}", timeout=timeout)
        assert "synced" in line, line
        return line

    def remote(self, project, path=""):
        return f"/Workspace/Users/{self.workspace.user_name}/projects/{project}" + (f"/{path}" if path else "")

    def remote_paths(self, project):
        root = self.remote(project) + "/"
        return {p[len(root):]: o for p, o in self.workspace.files.items() if p.startswith(root)}


def step(server, step_id, settled=False):
    [found] = [s for s in server.get("/api/setup-status").json()["steps"] if s["id"] == step_id]
    return found if not settled or found["status"] not in ("pending", "running") else None


def sync_state(repo):
    return json.loads((repo / ".git" / "coda-sync.json").read_text())


def imports(workspace):
    return sum(r["path"] == "/api/2.0/workspace/import" for r in workspace.requests)


@pytest.fixture
def home(start_coda, workspace):
    return make_home(start_coda, workspace)


def make_home(start_coda, workspace, home=None):
    server = start_coda({"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url,
                         "CODA_INSTALL": "0"}, home=home)
    server.api("/api/configure-pat", {"token": workspace.add_token()})
    user = Home(server, workspace)
    assert user.install_hooks()["status"] == "complete"
    return user


def test_a_commit_copies_the_committed_tree(home, workspace):
    (home.projects / "demo").mkdir(parents=True)
    (home.projects / "demo" / "untracked.txt").write_text("never committed\n")
    (home.projects / "demo" / "secret.env").write_text("KEY=ignored\n")
    repo, commit = home.repository("demo", {"README.md": "# Demo\n", "src/app.py": "print('app')\n",
                                            "data/deep/notes.txt": "notes\n", ".gitignore": "secret.env\n"})
    (repo / "README.md").write_text("edited after the commit, not committed\n")  # the working tree is not copied
    home.wait_synced(commit)

    assert {p for p, o in home.remote_paths("demo").items() if o["object_type"] == "FILE"} == \
        {"README.md", "src/app.py", "data/deep/notes.txt", ".gitignore"}
    assert workspace.read_file(home.remote("demo", "README.md")) == b"# Demo\n"
    assert workspace.read_file(home.remote("demo", "data/deep/notes.txt")) == b"notes\n"
    state = sync_state(repo)
    assert state["commit"] == commit and state["root"] == home.remote("demo")
    assert home.git(repo, "status", "--porcelain").stdout.strip()  # the hook left the working tree alone


def test_a_second_commit_uploads_only_its_changes(home, workspace):
    repo, first = home.repository("demo", {"a.txt": "a\n", "b.txt": "b\n", "c/d.txt": "d\n"})
    home.wait_synced(first)
    before = {p: o["modified_at"] for p, o in home.remote_paths("demo").items() if "modified_at" in o}
    count = imports(workspace)

    second = home.commit(repo, "second", {"a.txt": "a, changed\n", "new/e.txt": "e\n"})
    assert "2 uploaded, 0 deleted" in home.wait_synced(second)
    assert imports(workspace) - count == 2
    after = {p: o["modified_at"] for p, o in home.remote_paths("demo").items() if "modified_at" in o}
    assert after["b.txt"] == before["b.txt"] and after["c/d.txt"] == before["c/d.txt"]
    assert workspace.read_file(home.remote("demo", "a.txt")) == b"a, changed\n"
    assert workspace.read_file(home.remote("demo", "new/e.txt")) == b"e\n"


def test_deletions_and_renames_reach_the_workspace(home, workspace):
    repo, first = home.repository("demo", {"keep.txt": "k\n", "gone.txt": "g\n", "old/name.txt": "moved\n",
                                           "dir/a.txt": "a\n", "dir/sub/b.txt": "b\n"})
    home.wait_synced(first)
    home.git(repo, "mv", "old/name.txt", "renamed.txt")
    second = home.commit(repo, "delete and rename", remove=["gone.txt", "dir"])
    home.wait_synced(second)

    assert set(home.remote_paths("demo")) == {"keep.txt", "renamed.txt"}  # emptied folders go too
    assert workspace.read_file(home.remote("demo", "renamed.txt")) == b"moved\n"


def test_notebooks_are_imported_as_notebooks(home, workspace):
    repo, first = home.repository("demo", {
        "etl.py": NOTEBOOK, "query.sql": "-- Databricks notebook source\nSELECT 1\n",
        "Job.scala": "// Databricks notebook source\nprintln(1)\n", "report.r": "# Databricks notebook source\n1\n",
        "analysis.ipynb": IPYNB, "plain.py": "print('a module, not a notebook')\n"})
    home.wait_synced(first)
    objects = {p: (o["object_type"], o.get("language")) for p, o in home.remote_paths("demo").items()}
    assert objects == {"etl": ("NOTEBOOK", "PYTHON"), "query": ("NOTEBOOK", "SQL"), "Job": ("NOTEBOOK", "SCALA"),
                       "report": ("NOTEBOOK", "R"), "analysis": ("NOTEBOOK", "PYTHON"), "plain.py": ("FILE", None)}
    assert workspace.read_file(home.remote("demo", "etl")) == NOTEBOOK.encode()

    second = home.commit(repo, "etl.py is a plain module now", {"etl.py": "print('etl')\n"})
    home.wait_synced(second)
    objects = {p: o["object_type"] for p, o in home.remote_paths("demo").items()}
    assert "etl" not in objects and objects["etl.py"] == "FILE"


def test_a_failed_sync_keeps_the_commit_and_the_next_commit_catches_up(home, workspace):
    repo, first = home.repository("demo", {"one.txt": "1\n"})
    home.wait_synced(first)
    workspace.inject("workspace/import", status=500, count=1000)
    second = home.commit(repo, "second", {"two.txt": "2\n"})
    line = home.wait_log(f" at {second[:12]}")
    assert "failed" in line and "the next commit tries again" in line
    assert home.git(repo, "log", "-1", "--format=%H").stdout.strip() == second
    assert sync_state(repo)["commit"] == first  # not advanced
    assert "two.txt" not in home.remote_paths("demo")

    workspace.clear_faults()
    third = home.commit(repo, "third", {"three.txt": "3\n"})
    assert "2 uploaded" in home.wait_synced(third)
    assert {"one.txt", "two.txt", "three.txt"} <= set(home.remote_paths("demo"))


def test_a_file_the_workspace_refuses_does_not_stall_later_syncs(home, workspace):
    repo, first = home.repository("demo", {"a.txt": "a\n"})
    home.wait_synced(first)
    workspace.inject("workspace/import", status=400, count=1, message="File too large")
    second = home.commit(repo, "too big", {"big.bin": "pretend this is huge\n"})
    assert "0 uploaded, 0 deleted, 1 refused" in home.wait_synced(second)
    assert "refused" in home.log() and "File too large" in home.log()
    assert sync_state(repo)["commit"] == second  # later commits are not held up
    third = home.commit(repo, "third", {"c.txt": "c\n"})
    assert "2 uploaded" in home.wait_synced(third)  # and the refused file is tried again
    assert {"a.txt", "big.bin", "c.txt"} <= set(home.remote_paths("demo"))


def test_rewritten_history_and_a_folder_deleted_in_the_workspace(home, workspace):
    repo, first = home.repository("demo", {"a.txt": "a\n", "b.txt": "b\n"})
    home.wait_synced(first)
    home.git(repo, "rm", "-q", "b.txt")
    home.git(repo, "commit", "-q", "--amend", "-m", "first, without b")  # the synced commit is gone
    amended = home.git(repo, "rev-parse", "HEAD").stdout.strip()
    home.wait_synced(amended)
    assert set(home.remote_paths("demo")) == {"a.txt"}

    with workspace.lock:  # someone deletes the folder in the workspace
        for path in [p for p in workspace.files if p.startswith(home.remote("demo"))]:
            del workspace.files[path]
    again = home.commit(repo, "again", {"c.txt": "c\n"})
    assert "2 uploaded" in home.wait_synced(again)  # everything, not just c.txt
    assert set(home.remote_paths("demo")) == {"a.txt", "c.txt"}


def test_an_unreachable_workspace_never_holds_up_a_commit(home, workspace):
    repo, first = home.repository("demo", {"one.txt": "1\n"})
    home.wait_synced(first)
    workspace.stop()
    second = home.commit(repo, "offline", {"two.txt": "2\n"})  # asserts the commit was quick
    assert home.git(repo, "log", "-1", "--format=%H").stdout.strip() == second
    time.sleep(4)  # the sync meets the outage: it takes about 1.5 s to reach its first request
    workspace.start()  # back within the SDK's retry time (30 s): the same sync finishes the job
    line = home.wait_synced(second)
    assert float(line.rsplit(" in ", 1)[1].split()[0]) > 2.5, line  # it did wait for the workspace
    assert workspace.read_file(home.remote("demo", "two.txt")) == b"2\n"


def test_the_repositorys_own_hooks_still_run(home, workspace):
    repo = home.projects / "demo"
    repo.mkdir(parents=True)
    home.git(repo, "init", "-q")
    hooks = repo / ".git" / "hooks"
    for name, body in {
        "pre-commit": "git diff --cached | grep -q DO-NOT-COMMIT && { echo refused >&2; exit 1; }\nexit 0\n",
        "commit-msg": 'printf "\\nChecked-by: commit-msg hook\\n" >> "$1"\n',
        "post-commit": 'git rev-parse HEAD >> "$(git rev-parse --git-dir)/own-post-commit"\n',
    }.items():
        (hooks / name).write_text("#!/bin/sh\n" + body)
        (hooks / name).chmod(0o755)

    (repo / "bad.txt").write_text("DO-NOT-COMMIT\n")
    home.git(repo, "add", "--all")
    refused = home.git(repo, "commit", "-q", "-m", "bad", check=False)
    assert refused.returncode != 0 and "refused" in refused.stderr
    commit = home.commit(repo, "good", {"bad.txt": "fine\n"})
    assert "Checked-by: commit-msg hook" in home.git(repo, "log", "-1", "--format=%B").stdout
    assert (repo / ".git" / "own-post-commit").read_text().split() == [commit]
    home.wait_synced(commit)


def test_repositories_outside_projects_are_ignored(home, workspace):
    outside, ignored = home.repository("elsewhere", {"x.txt": "x\n"}, under=home.path / "work")
    inside, synced = home.repository("demo", {"y.txt": "y\n"})
    home.wait_synced(synced)
    time.sleep(1)
    assert ignored[:12] not in home.log() and "elsewhere" not in home.log()
    assert not [p for p in workspace.files if "elsewhere" in p or "x.txt" in p]
    assert not (outside / ".git" / "coda-sync.json").exists()


def test_the_sync_log_never_holds_a_token(home, workspace):
    repo, first = home.repository("demo", {"a.txt": "a\n"})
    home.wait_synced(first)
    for token in workspace.live_tokens():
        workspace.revoke_token(token.value)  # the next sync is refused: its error is logged too
    second = home.commit(repo, "second", {"b.txt": "b\n"})
    assert "failed" in home.wait_log(f" at {second[:12]}")
    text = home.log()
    assert "dapi" not in text
    assert not [t for t in workspace.tokens if t.value in text]


def test_a_users_own_hooks_path_is_left_alone(start_coda, workspace, tmp_path):
    user_home = tmp_path / "own-hooks"
    user_home.mkdir()
    (user_home / ".gitconfig").write_text("[core]\n\thooksPath = /opt/my-hooks\n")
    server = start_coda({"DATABRICKS_HOST": workspace.url, "DATABRICKS_GATEWAY_HOST": workspace.gateway_url},
                        home=user_home)
    answer = Home(server, workspace).install_hooks()
    assert answer["status"] == "failed" and "/opt/my-hooks" in answer["error"] and "leaves it alone" in answer["error"]
    assert "hooksPath = /opt/my-hooks" in (user_home / ".gitconfig").read_text()
    assert not (user_home / ".coda" / "git-hooks" / "post-commit").exists()


def test_one_sync_at_a_time(home, workspace):
    repo, first = home.repository("demo", {"a.txt": "a\n"})
    home.wait_synced(first)
    with open(repo / ".git" / "coda-sync.lock", "a") as lock:  # as a running sync holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        (repo / "b.txt").write_text("b\n")
        home.git(repo, "add", "b.txt")
        home.git(repo, "-c", "core.hooksPath=/dev/null", "commit", "-q", "-m", "no hook")
        started = time.time()
        home.coda("sync", str(repo))
        assert time.time() - started < 20
        assert "a sync is already running" in home.log()
        assert sync_state(repo)["commit"] == first
    commits = [home.commit(repo, f"burst {n}", {f"burst/{n}.txt": f"{n}\n"}) for n in range(5)]
    wait_for(lambda: sync_state(repo)["commit"] == commits[-1], timeout=60)
    assert {f"burst/{n}.txt" for n in range(5)} | {"a.txt", "b.txt"} <= set(home.remote_paths("demo"))


def test_restore_after_a_fresh_start(start_coda, workspace, tmp_path):
    first = make_home(start_coda, workspace, tmp_path / "before")
    repo, commit = first.repository("demo", {"README.md": "# Demo\n", "etl.py": NOTEBOOK, "src/lib.py": "x = 1\n",
                                             ".gitignore": "*.log\n", "keep.log": "tracked though ignored\n"})
    first.wait_synced(commit)
    _, other = first.repository("other", {"o.txt": "o\n"})
    first.wait_synced(other)

    fresh = make_home(start_coda, workspace, tmp_path / "after")  # the app's disk after a restart
    offer = wait_for(lambda: step(fresh.server, "restore-offer", settled=True), timeout=60)
    assert offer["status"] == "complete"
    assert any("2 project(s) (demo, other)" in line and "restore" in line for line in offer["output"]), offer

    (fresh.projects / "other").mkdir(parents=True)
    (fresh.projects / "other" / "mine.txt").write_text("local work\n")
    fresh.coda("restore")
    assert [p.name for p in (fresh.projects / "other").iterdir()] == ["mine.txt"]  # never touched
    restored = fresh.projects / "demo"
    assert (restored / "etl.py").read_text() == NOTEBOOK
    assert (restored / "src" / "lib.py").read_text() == "x = 1\n"
    assert (restored / "keep.log").read_text() == "tracked though ignored\n"
    assert fresh.git(restored, "log", "--format=%s").stdout.split("\n")[0] == "Restored from the Databricks workspace"
    assert fresh.git(restored, "status", "--porcelain").stdout == ""
    assert not [p for p in fresh.projects.iterdir() if p.name.startswith(".")]
    assert "demo" not in fresh.log()  # the restore's own commit started no sync

    change = fresh.commit(restored, "after the restore", {"src/lib.py": "x = 2\n"})
    assert "1 uploaded, 0 deleted" in fresh.wait_synced(change)  # the restore recorded what is there
    assert workspace.read_file(fresh.remote("demo", "src/lib.py")) == b"x = 2\n"


def plant(workspace, path, content):
    """Put a file into the fake workspace as anyone who can edit the user's folder could."""
    path = f"/Workspace/Users/{workspace.user_name}/projects/{path}"
    with workspace.lock:
        workspace._mkdirs(path.rsplit("/", 1)[0])
        workspace.files[path] = {"object_type": "FILE", "content": content, "language": None,
                                 "created_at": 0, "modified_at": 0}


def test_restore_never_writes_gits_own_files(start_coda, workspace, tmp_path):
    marker = tmp_path / "planted-code-ran"
    script = tmp_path / "planted.sh"
    script.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\nexit 1\n")
    script.chmod(0o755)
    config = f"[core]\n\tfsmonitor = {script}\n\thooksPath = hooks\n".encode()
    hook = f"#!/bin/sh\nexec {script} hook\n".encode()
    planted = {"demo/.git/config": config, "demo/.git/hooks/pre-commit": hook, "demo/.git/hooks/post-commit": hook,
               "demo/.GIT/config": config, "demo/sub/.git/config": config, "demo/sub/.Git/hooks/post-checkout": hook,
               "demo/.git. /config": config, "demo/git~1/config": config, "demo/x/.git:y": config,
               ".git/config": config, ".git/hooks/pre-commit": hook}  # a "project" named .git: ~/projects/.git
    ordinary = {"README.md": b"# Demo\n", "sub/code.py": b"x = 1\n", ".gitignore": b"*.log\n", ".github/ci.yml": b"on: push\n"}
    for path, content in {**planted, **{f"demo/{p}": c for p, c in ordinary.items()}}.items():
        plant(workspace, path, content)

    fresh = make_home(start_coda, workspace, tmp_path / "home")
    done = fresh.coda("restore")
    restored = fresh.projects / "demo"
    files = {p.relative_to(restored).as_posix() for p in restored.rglob("*") if p.is_file()
             and ".git" not in p.relative_to(restored).parts}
    assert files == set(ordinary), done.stderr
    assert not marker.exists()
    assert not (fresh.projects / ".git").exists()
    assert str(script) not in (restored / ".git" / "config").read_text()
    assert not [p.name for p in (restored / ".git" / "hooks").iterdir() if not p.name.endswith(".sample")]
    assert not (restored / "sub" / ".git").exists() and not (restored / ".GIT").exists()
    said = done.stdout + done.stderr
    for skipped in ("demo/.git", "demo/.GIT", "demo/sub/.git", "demo/sub/.Git", "demo/.git. ", "demo/git~1",
                    "demo/x/.git:y", "projects/.git"):
        assert f"{skipped}: git's own files are never restored" in said, (skipped, said)
    assert fresh.git(restored, "status", "--porcelain").stdout == ""

    change = fresh.commit(restored, "the user's next commit", {"sub/code.py": "x = 2\n"})  # runs git's hooks
    fresh.wait_synced(change)
    assert not marker.exists()


def test_a_crafted_tree_never_uploads_gits_own_files(home, workspace):
    repo, first = home.repository("demo", {"ok.txt": "ok\n"})
    home.wait_synced(first)
    blob = home.run("git", "hash-object", "-w", "--stdin", cwd=repo, input="[core]\n\tfsmonitor = evil\n").stdout.strip()
    inner = home.run("git", "mktree", cwd=repo, input=f"100644 blob {blob}\tconfig\n").stdout.strip()
    tree = home.git(repo, "rev-parse", "HEAD^{tree}").stdout.strip()
    listing = home.git(repo, "ls-tree", tree).stdout + "".join(
        f"040000 tree {inner}\t{name}\n" for name in (".git", ".GIT", "git~1"))
    crafted = home.run("git", "mktree", cwd=repo, input=listing).stdout.strip()
    commit = home.git(repo, "commit-tree", "-p", first, "-m", "crafted", crafted).stdout.strip()
    home.git(repo, "update-ref", "HEAD", commit)
    home.coda("sync", str(repo))
    assert "synced" in home.wait_log(f" at {commit[:12]}")
    assert set(home.remote_paths("demo")) == {"ok.txt"}
    assert "left out .GIT/config" in home.log() and "left out git~1/config" in home.log()
