"""The release-download installers in install/: micro.sh, gh.sh, databricks.sh.

Each test runs a real script with bash against a release server on 127.0.0.1
that serves archives built here, laid out under the same paths as the real
GitHub release URLs. The archives hold small shell scripts standing in for
the real executables. A fake `uname` on PATH picks the platform, so the
asset names for Linux (x86_64, aarch64, armv7) and macOS (x86_64, arm64)
are checked on any machine. Proxies
point at a closed port and CODA_RELEASE_MIRROR is always set, so nothing here
can reach the internet.
"""

import functools
import hashlib
import http.server
import io
import os
import re
import select
import shutil
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "install"
TOOLS = ("micro", "gh", "databricks")


def read_versions(path=INSTALL / "versions.env"):
    versions = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Z_]+)=(\S+)", line)
        if match:
            versions[match[1]] = match[2]
    return versions


VERSIONS = read_versions()
VERSION_KEY = {"micro": "MICRO_VERSION", "gh": "GH_VERSION", "databricks": "DATABRICKS_CLI_VERSION"}

# Each publisher's own name for a platform (`uname -s`, `uname -m`), from
# their release pages; None where they publish no build.
PLATFORMS = {
    ("Linux", "x86_64"): {"micro": "linux64", "gh": "linux_amd64.tar.gz", "databricks": "linux_amd64"},
    ("Linux", "aarch64"): {"micro": "linux-arm64", "gh": "linux_arm64.tar.gz", "databricks": "linux_arm64"},
    ("Linux", "armv7l"): {"micro": "linux-arm", "gh": "linux_armv6.tar.gz", "databricks": None},
    ("Darwin", "x86_64"): {"micro": "osx", "gh": "macOS_amd64.zip", "databricks": "darwin_amd64"},
    ("Darwin", "arm64"): {"micro": "macos-arm64", "gh": "macOS_arm64.zip", "databricks": "darwin_arm64"},
}


# ---------------------------------------------------------------- fake executables

def fake_executable(tool, version):
    """A shell script that answers --version the way the real tool does."""
    banner = {
        "micro": f"Version: {version}\\nCommit hash: 0000000\\nCompiled on November 1, 2026",
        "gh": f"gh version {version} (2026-09-30)\\nhttps://github.com/cli/cli/releases/tag/v{version}",
        "databricks": f"Databricks CLI v{version}",
    }[tool]
    # The fake gh logs every other call, its GH_TOKEN and any token it is fed.
    return (
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then printf "{banner}\\n"; exit 0; fi\n'
        'if [ -n "${FAKE_LOG:-}" ]; then\n'
        '  echo "args: $*" >> "$FAKE_LOG"\n'
        '  echo "GH_TOKEN=${GH_TOKEN:-}" >> "$FAKE_LOG"\n'
        '  case "$*" in *--with-token*) echo "stdin: $(cat)" >> "$FAKE_LOG";; esac\n'
        "fi\n"
    ).encode()


def tar_gz(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o755 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def publish(mirror_dir, tool, machine, version=None, reports=None, checksum="right", kernel="Linux"):
    """Put one release of `tool` on the mirror, laid out like GitHub's.

    version: the release (default: the pinned one); reports: what its
    executable prints for --version (default: version); checksum: "right",
    "wrong" (a valid-looking but wrong hash) or "missing" (no line for the
    archive). Returns the URL paths of the archive and the checksum file.
    """
    version = version or VERSIONS[VERSION_KEY[tool]]
    binary = fake_executable(tool, reports or version)
    platform = PLATFORMS[kernel, machine][tool]
    if tool == "micro":
        base = f"micro-editor/micro/releases/download/v{version}"
        name = f"micro-{version}-{platform}.tar.gz"
        archive = tar_gz({f"micro-{version}/micro": binary, f"micro-{version}/LICENSE": b"MIT\n"})
        sums_name = name + ".sha"
        other_lines = []
    elif tool == "gh":
        base = f"cli/cli/releases/download/v{version}"
        name = f"gh_{version}_{platform}"
        folder = name.removesuffix(".zip").removesuffix(".tar.gz")
        pack = zip_bytes if name.endswith(".zip") else tar_gz
        archive = pack({f"{folder}/bin/gh": binary, f"{folder}/LICENSE": b"MIT\n"})
        sums_name = f"gh_{version}_checksums.txt"
        other_lines = [f"{'1' * 64}  gh_{version}_linux_386.tar.gz", f"{'2' * 64}  gh_{version}_macOS_arm64.zip"]
    else:
        base = f"databricks/cli/releases/download/v{version}"
        name = f"databricks_cli_{version}_{platform}.zip"
        archive = zip_bytes({"databricks": binary, "README.md": b"readme\n", "LICENSE": b"license\n"})
        sums_name = f"databricks_cli_{version}_SHA256SUMS"
        other_lines = [f"{'3' * 64}  databricks_cli_{version}_darwin_arm64.zip"]

    digest = {"right": sha256(archive), "wrong": sha256(archive + b"tampered"), "missing": None}[checksum]
    lines = list(other_lines)
    if digest:
        lines.insert(len(lines) // 2, f"{digest}  {name}")
    directory = mirror_dir / base
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(archive)
    (directory / sums_name).write_text("\n".join(lines) + "\n")
    return f"/{base}/{name}", f"/{base}/{sums_name}"


# ---------------------------------------------------------------- release server

class Mirror:
    def __init__(self, root, context=None):
        self.root = root
        self.requests = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        scheme = "http"
        if context:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    root.mkdir()
    server = Mirror(root)
    yield server
    server.close()


# ---------------------------------------------------------------- running the scripts

@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return path


def fake_uname_dir(tmp_path, machine, kernel="Linux"):
    directory = tmp_path / f"uname-{kernel}-{machine}"
    directory.mkdir(exist_ok=True)
    script = directory / "uname"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$1" in -m) echo {machine};; *) echo {kernel};; esac\n'
    )
    script.chmod(0o755)
    return directory


def script_env(tmp_path, home, mirror_url, machine="x86_64", kernel="Linux", path=None, **extra):
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    dead_proxy = "http://127.0.0.1:9"
    env = {
        "PATH": f"{fake_uname_dir(tmp_path, machine, kernel)}:{path or os.environ['PATH']}",
        "HOME": str(home),
        "TMPDIR": str(temp),
        "LANG": "C.UTF-8",
        "CODA_RELEASE_MIRROR": mirror_url,
        "http_proxy": dead_proxy, "https_proxy": dead_proxy, "all_proxy": dead_proxy,
        "HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy, "ALL_PROXY": dead_proxy,
        "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
    }
    env.update({key: str(value) for key, value in extra.items()})
    return env


def run(tool, env, *args, stdin=None):
    return subprocess.run(
        ["bash", str(INSTALL / f"{tool}.sh"), *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=120,
    )


def version_of(binary):
    return subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout


def leftovers(tmp_path):
    return sorted(p.name for p in (tmp_path / "tmp").iterdir())


# ---------------------------------------------------------------- versions file

def test_versions_file_pins_the_three_release_tools():
    for key in VERSION_KEY.values():
        assert re.fullmatch(r"\d+\.\d+\.\d+", VERSIONS.get(key, "")), key


# ---------------------------------------------------------------- installing

@pytest.mark.parametrize("kernel, machine", PLATFORMS)
@pytest.mark.parametrize("tool", TOOLS)
def test_installs_the_pinned_release_and_it_runs(tool, kernel, machine, tmp_path, home, mirror):
    env = script_env(tmp_path, home, mirror.url, machine, kernel)
    if PLATFORMS[kernel, machine][tool] is None:
        result = run(tool, env)
        assert result.returncode != 0
        assert "publishes no build for" in result.stderr
        assert mirror.requests == []
        return
    archive_path, sums_path = publish(mirror.root, tool, machine, kernel=kernel)
    result = run(tool, env)
    assert result.returncode == 0, result.stderr
    binary = home / ".local" / "bin" / tool
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert VERSIONS[VERSION_KEY[tool]] in version_of(binary)
    assert mirror.requests == [archive_path, sums_path]
    assert "checksum ok" in result.stdout
    assert leftovers(tmp_path) == []  # the work directory is cleaned up


@pytest.mark.parametrize("tool", TOOLS)
def test_rerun_is_a_no_op(tool, tmp_path, home, mirror):
    publish(mirror.root, tool, "x86_64")
    env = script_env(tmp_path, home, mirror.url)
    assert run(tool, env).returncode == 0
    binary = home / ".local" / "bin" / tool
    before = (binary.stat().st_mtime_ns, binary.stat().st_ino, len(mirror.requests))

    again = run(tool, env)
    assert again.returncode == 0, again.stderr
    assert "already installed" in again.stdout
    assert (binary.stat().st_mtime_ns, binary.stat().st_ino, len(mirror.requests)) == before


@pytest.mark.parametrize("tool", TOOLS)
def test_another_installed_version_is_replaced(tool, tmp_path, home, mirror):
    publish(mirror.root, tool, "x86_64")
    bin_dir = home / ".local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / tool).write_bytes(fake_executable(tool, "0.0.1"))
    (bin_dir / tool).chmod(0o755)
    result = run(tool, script_env(tmp_path, home, mirror.url))
    assert result.returncode == 0, result.stderr
    assert VERSIONS[VERSION_KEY[tool]] in version_of(bin_dir / tool)


def test_a_longer_version_is_not_taken_for_the_pinned_one(tmp_path, home, mirror):
    # micro 2.0.150 installed must not pass for the pinned 2.0.15 (or the like).
    publish(mirror.root, "micro", "x86_64")
    pinned = VERSIONS["MICRO_VERSION"]
    bin_dir = home / ".local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "micro").write_bytes(fake_executable("micro", pinned + "0"))
    (bin_dir / "micro").chmod(0o755)
    result = run("micro", script_env(tmp_path, home, mirror.url))
    assert result.returncode == 0, result.stderr
    assert "already installed" not in result.stdout
    assert f"Version: {pinned}\n" in version_of(bin_dir / "micro")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_prefix_chooses_where_it_goes(how, tmp_path, home, mirror):
    publish(mirror.root, "databricks", "x86_64")
    prefix = tmp_path / "opt" / "coda"
    if how == "env":
        result = run("databricks", script_env(tmp_path, home, mirror.url, PREFIX=prefix))
    else:
        result = run("databricks", script_env(tmp_path, home, mirror.url), "--prefix", str(prefix))
    assert result.returncode == 0, result.stderr
    assert (prefix / "bin" / "databricks").is_file()
    assert not (home / ".local").exists()


def test_versions_come_from_the_versions_file(tmp_path, home, mirror):
    other = tmp_path / "versions.env"
    other.write_text("GH_VERSION=2.50.1\n")
    paths = publish(mirror.root, "gh", "x86_64", version="2.50.1")
    result = run("gh", script_env(tmp_path, home, mirror.url, CODA_VERSIONS_FILE=other))
    assert result.returncode == 0, result.stderr
    assert mirror.requests == list(paths)
    assert "gh version 2.50.1 " in version_of(home / ".local" / "bin" / "gh")


def test_mirror_base_may_have_a_path_and_a_trailing_slash(tmp_path, home, mirror):
    archive_path, sums_path = publish(mirror.root / "github", "micro", "x86_64")
    result = run("micro", script_env(tmp_path, home, mirror.url + "/github/"))
    assert result.returncode == 0, result.stderr
    assert mirror.requests == ["/github" + archive_path, "/github" + sums_path]


# ---------------------------------------------------------------- refusing

@pytest.mark.parametrize("tool", TOOLS)
def test_wrong_checksum_fails_and_installs_nothing(tool, tmp_path, home, mirror):
    publish(mirror.root, tool, "x86_64", checksum="wrong")
    result = run(tool, script_env(tmp_path, home, mirror.url))
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr
    assert "nothing installed" in result.stderr
    assert not (home / ".local" / "bin" / tool).exists()
    assert leftovers(tmp_path) == []


def test_wrong_checksum_leaves_the_installed_version_alone(tmp_path, home, mirror):
    publish(mirror.root, "gh", "x86_64", checksum="wrong")
    bin_dir = home / ".local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "gh").write_bytes(fake_executable("gh", "2.0.0"))
    (bin_dir / "gh").chmod(0o755)
    result = run("gh", script_env(tmp_path, home, mirror.url))
    assert result.returncode != 0
    assert "gh version 2.0.0 " in version_of(bin_dir / "gh")
    assert sorted(p.name for p in bin_dir.iterdir()) == ["gh"]


@pytest.mark.parametrize("tool", TOOLS)
def test_archive_missing_from_checksum_file_is_refused(tool, tmp_path, home, mirror):
    publish(mirror.root, tool, "x86_64", checksum="missing")
    result = run(tool, script_env(tmp_path, home, mirror.url))
    assert result.returncode != 0
    assert "no checksum for" in result.stderr
    assert not (home / ".local" / "bin" / tool).exists()


def test_a_download_that_is_not_there_fails_clearly(tmp_path, home, mirror):
    result = run("databricks", script_env(tmp_path, home, mirror.url))
    assert result.returncode != 0
    assert "download failed: " + mirror.url + "/databricks/cli/releases/download/" in result.stderr
    assert not (home / ".local" / "bin").exists()


def test_an_executable_that_reports_another_version_is_not_installed(tmp_path, home, mirror):
    publish(mirror.root, "databricks", "x86_64", reports="0.18.0")
    result = run("databricks", script_env(tmp_path, home, mirror.url))
    assert result.returncode != 0
    assert "does not report version" in result.stderr
    assert not (home / ".local" / "bin" / "databricks").exists()


@pytest.mark.parametrize("tool", TOOLS)
def test_unsupported_architecture_is_named(tool, tmp_path, home, mirror):
    result = run(tool, script_env(tmp_path, home, mirror.url, machine="sparc64"))
    assert result.returncode != 0
    assert "unsupported CPU architecture 'sparc64'" in result.stderr
    assert mirror.requests == []


@pytest.mark.parametrize("tool", TOOLS)
def test_unsupported_operating_system_is_named(tool, tmp_path, home, mirror):
    result = run(tool, script_env(tmp_path, home, mirror.url, kernel="FreeBSD"))
    assert result.returncode != 0
    assert "unsupported operating system 'FreeBSD'" in result.stderr
    assert mirror.requests == []


def test_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    scripts = ["lib.sh", "micro.sh", "gh.sh", "databricks.sh", "gh-login"]
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=INSTALL,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------- checksum file formats

def verify_in_lib(tmp_path, sums_text, name="tool_1.0_linux_amd64.tar.gz"):
    archive = tmp_path / name
    archive.write_bytes(b"the archive")
    sums = tmp_path / "SUMS"
    sums.write_bytes(sums_text.encode())
    return subprocess.run(["bash", "-c", f'. "{INSTALL}/lib.sh"; verify_sha256 "$1" "$2" "$3"', "-",
                           str(archive), str(sums), name],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("line", [
    "{digest}  {name}\n",                     # sha256sum, text mode
    "{digest} *{name}\n",                     # sha256sum, binary mode
    "{digest}  dist/{name}\n",                # with the build directory
    "{upper}  {name}\r\n",                   # capitals and CRLF
    "{other}  {name}.sig\n{digest}  {name}\n",  # a longer name first
])
def test_checksum_line_formats_are_understood(line, tmp_path):
    digest = sha256(b"the archive")
    name = "tool_1.0_linux_amd64.tar.gz"
    text = line.format(digest=digest, upper=digest.upper(), other="0" * 64, name=name)
    result = verify_in_lib(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "checksum ok" in result.stdout


def test_a_similar_name_is_not_taken_for_the_archive(tmp_path):
    digest = sha256(b"the archive")
    result = verify_in_lib(tmp_path, f"{digest}  tool_1.0_linux_amd64.tar.gz.sbom\n")
    assert result.returncode != 0
    assert "no checksum for tool_1.0_linux_amd64.tar.gz" in result.stderr


# ---------------------------------------------------------------- gh-login

@pytest.fixture
def gh_installed(tmp_path, home, mirror):
    publish(mirror.root, "gh", "x86_64")
    env = script_env(tmp_path, home, mirror.url)
    result = run("gh", env)
    assert result.returncode == 0, result.stderr
    return home / ".local" / "bin"


def test_gh_login_signs_in_with_a_token_and_sets_up_git(tmp_path, gh_installed):
    log = tmp_path / "gh.log"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"),
           "FAKE_LOG": str(log), "GH_TOKEN": "from-the-environment"}
    result = subprocess.run([str(gh_installed / "gh-login")], input="ghp_example123\n",
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[:3] == [
        "args: auth login --hostname github.com --git-protocol https --with-token",
        "GH_TOKEN=",  # an environment token would make `gh auth login` refuse
        "stdin: ghp_example123",
    ]
    assert "args: auth setup-git --hostname github.com" in calls
    assert "args: auth status --hostname github.com" in calls


def test_gh_login_asks_plainly_in_a_terminal_and_hides_the_token(tmp_path, gh_installed):
    log = tmp_path / "gh.log"
    env = {"PATH": os.environ["PATH"], "FAKE_LOG": str(log), "TERM": "xterm"}
    controller, terminal = os.openpty()
    proc = subprocess.Popen([str(gh_installed / "gh-login")], stdin=terminal, stdout=terminal,
                            stderr=terminal, env=env, start_new_session=True)
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while b"Paste the token" not in seen and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                seen += os.read(controller, 4096)
        assert b"Paste the token" in seen
        os.write(controller, b"ghp_typed456\n")
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([controller], [], [], 0.2)[0]:
                try:
                    seen += os.read(controller, 4096)
                except OSError:
                    break
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    assert b"ghp_typed456" not in seen  # no echo
    calls = log.read_text().splitlines()
    assert calls[0] == "args: auth login --hostname github.com --git-protocol https --with-token"
    assert "stdin: ghp_typed456" in calls


def test_gh_login_without_a_token_changes_nothing(tmp_path, gh_installed):
    log = tmp_path / "gh.log"
    env = {"PATH": os.environ["PATH"], "FAKE_LOG": str(log)}
    result = subprocess.run([str(gh_installed / "gh-login")], input="",
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "no token given" in result.stderr
    assert not log.exists()


def test_gh_login_web_uses_the_device_code_flow(tmp_path, gh_installed):
    log = tmp_path / "gh.log"
    env = {"PATH": os.environ["PATH"], "FAKE_LOG": str(log), "GH_HOST": "github.example.com"}
    result = subprocess.run([str(gh_installed / "gh-login"), "--web"], input="",
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "args: auth login --hostname github.example.com --git-protocol https --web"
    assert "args: auth setup-git --hostname github.example.com" in calls


def test_gh_rerun_restores_a_missing_gh_login(tmp_path, home, mirror, gh_installed):
    (gh_installed / "gh-login").unlink()
    result = run("gh", script_env(tmp_path, home, mirror.url))
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stdout
    assert os.access(gh_installed / "gh-login", os.X_OK)


# ---------------------------------------------------------------- enterprise settings

MIRROR_VARIABLES = ("NPM_CONFIG_REGISTRY", "PIP_INDEX_URL", "UV_INDEX_URL", "CODA_RELEASE_MIRROR",
                    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")


def lib_warnings(**env):
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    result = subprocess.run(["bash", "-c", f'. "{INSTALL}/lib.sh"; enterprise_warnings'],
                            env=clean, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_enterprise_mode_warns_about_each_unset_mirror():
    warnings = lib_warnings(ENTERPRISE_MODE="true")
    for name in ("NPM_CONFIG_REGISTRY", "PIP_INDEX_URL", "CODA_RELEASE_MIRROR", "CA bundle"):
        assert name in warnings
    assert warnings.count("warning:") == 4


def test_enterprise_mode_is_quiet_when_everything_is_set(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    warnings = lib_warnings(ENTERPRISE_MODE="true", NPM_CONFIG_REGISTRY="https://npm.corp",
                            UV_INDEX_URL="https://pypi.corp/simple", CODA_RELEASE_MIRROR="https://gh.corp",
                            NODE_EXTRA_CA_CERTS=str(bundle))
    assert warnings == ""


def test_no_warnings_outside_enterprise_mode():
    assert lib_warnings() == ""
    assert lib_warnings(ENTERPRISE_MODE="false") == ""


def test_install_script_prints_the_enterprise_warnings(tmp_path, home, mirror):
    publish(mirror.root, "micro", "x86_64")
    result = run("micro", script_env(tmp_path, home, mirror.url, ENTERPRISE_MODE="true"))
    assert result.returncode == 0, result.stderr
    assert "NPM_CONFIG_REGISTRY is unset" in result.stderr
    assert "PIP_INDEX_URL and UV_INDEX_URL are unset" in result.stderr
    assert "no CA bundle is set" in result.stderr
    assert "CODA_RELEASE_MIRROR is unset" not in result.stderr  # the test sets it


# ---------------------------------------------------------------- CA bundle over HTTPS

@pytest.fixture
def https_mirror(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    root = tmp_path / "https-mirror"
    root.mkdir()
    server = Mirror(root, context)
    server.cert = cert
    yield server
    server.close()


def test_https_mirror_is_refused_without_its_ca(tmp_path, home, https_mirror):
    publish(https_mirror.root, "databricks", "x86_64")
    result = run("databricks", script_env(tmp_path, home, https_mirror.url))
    assert result.returncode != 0
    assert "download failed" in result.stderr
    assert not (home / ".local" / "bin" / "databricks").exists()


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"])
def test_https_mirror_works_with_a_custom_ca_bundle(variable, tmp_path, home, https_mirror):
    publish(https_mirror.root, "databricks", "x86_64")
    env = script_env(tmp_path, home, https_mirror.url, **{variable: https_mirror.cert})
    result = run("databricks", env)
    assert result.returncode == 0, result.stderr
    assert (home / ".local" / "bin" / "databricks").is_file()


def test_a_ca_bundle_that_is_not_a_file_is_named(tmp_path, home, mirror):
    publish(mirror.root, "micro", "x86_64")
    result = run("micro", script_env(tmp_path, home, mirror.url, REQUESTS_CA_BUNDLE=tmp_path / "nope.pem"))
    assert result.returncode != 0
    assert "REQUESTS_CA_BUNDLE points to" in result.stderr
    assert mirror.requests == []


# ---------------------------------------------------------------- without curl, unzip, sha256sum

def minimal_path(tmp_path):
    """A PATH with the usual tools but no curl, unzip, sha256sum or shasum."""
    directory = tmp_path / "minimal-bin"
    directory.mkdir()
    for name in ("bash", "sh", "sed", "awk", "tail", "grep", "cut", "tar", "gzip", "mktemp",
                 "rm", "cp", "mv", "chmod", "mkdir", "dirname", "basename", "cat", "env"):
        found = shutil.which(name)
        assert found, name
        (directory / name).symlink_to(found)
    (directory / "python3").symlink_to(Path(sys.executable).resolve())
    return str(directory)


@pytest.mark.parametrize("tool", TOOLS)
def test_python_stands_in_for_missing_download_tools(tool, tmp_path, home, mirror):
    paths = publish(mirror.root, tool, "x86_64")
    env = script_env(tmp_path, home, mirror.url, path=minimal_path(tmp_path))
    result = run(tool, env)
    assert result.returncode == 0, result.stderr
    assert mirror.requests == list(paths)
    assert VERSIONS[VERSION_KEY[tool]] in version_of(home / ".local" / "bin" / tool)


def test_python_download_also_checks_the_checksum(tmp_path, home, mirror):
    publish(mirror.root, "databricks", "x86_64", checksum="wrong")
    env = script_env(tmp_path, home, mirror.url, path=minimal_path(tmp_path))
    result = run("databricks", env)
    assert result.returncode != 0
    assert "checksum mismatch" in result.stderr
    assert not (home / ".local" / "bin" / "databricks").exists()
