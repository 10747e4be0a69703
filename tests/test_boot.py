"""How `python coda.py` starts: as the module `coda`, from cached bytecode where the folder allows it
(a script's syntax tree would stay in memory for as long as the server runs), with its arguments and
the interpreter's flags kept."""

import os
import shutil
import subprocess
import sys

from conftest import ROOT


def run_coda(folder, home, *args, python_flags=(), **env):
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("DATABRICKS_", "CODA_", "APP_")) and k != "PYTHONDONTWRITEBYTECODE"}
    environment.update(HOME=str(home), CODA_INSTALL="0", **env)
    return subprocess.run([sys.executable, *python_flags, str(folder / "coda.py"), *args], cwd=str(home),
                          env=environment, capture_output=True, text=True, timeout=60)


def app_folder(tmp_path):
    folder = tmp_path / "app"
    folder.mkdir()
    shutil.copy(ROOT / "coda.py", folder / "coda.py")
    return folder


def test_coda_py_runs_from_its_cached_bytecode(tmp_path):
    folder, home = app_folder(tmp_path), tmp_path / "home"
    home.mkdir()
    for _ in range(2):  # the first run writes the bytecode, the second runs from it
        done = run_coda(folder, home, "--version")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "0.1.0"
    assert list((folder / "__pycache__").glob("coda.*.pyc")), "no cached bytecode of coda.py"


def test_coda_py_runs_where_no_bytecode_can_be_written(tmp_path):
    folder, home = app_folder(tmp_path), tmp_path / "home"
    home.mkdir()
    done = run_coda(folder, home, "--version", PYTHONDONTWRITEBYTECODE="1")
    assert (done.returncode, done.stdout.strip()) == (0, "0.1.0"), done.stderr
    assert not (folder / "__pycache__").exists()


def test_the_interpreter_flags_and_arguments_reach_coda(tmp_path):
    folder, home = app_folder(tmp_path), tmp_path / "home"
    home.mkdir()
    done = run_coda(folder, home, "--port", "notaport", python_flags=("-X", "importtime"))
    assert done.returncode == 2 and "invalid int value: 'notaport'" in done.stderr  # argparse saw the arguments
    assert "| gevent" in done.stderr  # -X importtime still held when the heavy imports ran


def test_a_copy_under_another_name_still_runs(tmp_path):
    folder, home = app_folder(tmp_path), tmp_path / "home"
    home.mkdir()
    (folder / "coda.py").rename(folder / "coda-server.py")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "CODA_", "APP_"))}
    done = subprocess.run([sys.executable, str(folder / "coda-server.py"), "--version"], cwd=str(home),
                          env={**environment, "HOME": str(home), "CODA_INSTALL": "0"},
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "0.1.0"), done.stderr


def test_a_subcommand_runs_as_the_script_it_is(tmp_path):
    """Only serving runs the file a second time, as a module: a short-lived command would pay the
    second start for nothing."""
    folder, home = app_folder(tmp_path), tmp_path / "home"
    home.mkdir()
    done = run_coda(folder, home, "no-such-command")
    assert done.returncode == 2 and "invalid choice: 'no-such-command'" in done.stderr
    assert not (folder / "__pycache__").exists()
