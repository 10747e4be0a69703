"""CoDA started exactly as app.yaml says, with the environment Databricks Apps injects
(pointed at the fake workspace), reaches a working terminal as the owner."""

import os
import re
import subprocess
import sys
import time

import requests
import websocket
import yaml

from conftest import ROOT, free_port, wait_for
from fake_workspace import FakeWorkspace

SECRET_SHAPED = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY)$")


def app_yaml():
    return yaml.safe_load((ROOT / "app.yaml").read_text())


def test_app_yaml_runs_coda_and_holds_no_secrets():
    spec = app_yaml()
    assert spec["command"] == ["python", "coda.py"]
    for item in spec["env"]:
        assert set(item) == {"name", "value"}
        assert not SECRET_SHAPED.search(item["name"]), item["name"]
        assert not re.search(r"dapi[0-9a-f]{8}", item["value"])


def test_started_as_a_databricks_app_the_owner_gets_a_working_terminal(tmp_path):
    workspace = FakeWorkspace(app_name="coda-e2e", app_creator="Owner@Example.com").start()
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    injected = {  # what the platform sets, pointed at the fake
        "DATABRICKS_APP_NAME": "coda-e2e", "DATABRICKS_APP_PORT": str(port),
        "DATABRICKS_HOST": workspace.url, "DATABRICKS_WORKSPACE_ID": workspace.workspace_id,
        "DATABRICKS_CLIENT_ID": workspace.client_id, "DATABRICKS_CLIENT_SECRET": workspace.client_secret,
    }
    # Two changes for a test machine: bind loopback only, and install nothing.
    local = {"CODA_HOST": "127.0.0.1", "CODA_INSTALL": "0", "CODA_PROXY_PORT": str(free_port()),
             "DATABRICKS_GATEWAY_HOST": workspace.gateway_url}
    env = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "HOME": str(home), "LANG": "C.UTF-8",
           **{item["name"]: item["value"] for item in app_yaml()["env"]}, **injected, **local}
    log = open(tmp_path / "coda.log", "wb")
    process = subprocess.Popen(app_yaml()["command"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    owner = {"X-Forwarded-Email": "owner@example.com", "X-Forwarded-Host": "coda-e2e.example.com"}
    try:
        wait_for(lambda: _ok(base + "/health"), timeout=20)
        wait_for(lambda: requests.get(base + "/", headers=owner, timeout=5).status_code == 200, timeout=30)
        assert requests.get(base + "/", headers={"X-Forwarded-Email": "mallory@example.com"}).status_code == 403
        page = requests.get(base + "/", headers=owner).text
        assert '<script src="static/app.js"' in page or "static/app.js" in page
        assert requests.get(base + "/api/pat-status", headers=owner).json()["valid"] is False

        answer = requests.post(base + "/api/configure-pat", json={"token": workspace.add_token()}, headers=owner)
        assert answer.json() == {"status": "ok", "user": workspace.user_name}

        sid = requests.post(base + "/api/session", json={}, headers=owner).json()["session_id"]
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=20,
                                         header=[f"X-Forwarded-Email: {owner['X-Forwarded-Email']}",
                                                 f"X-Forwarded-Host: {owner['X-Forwarded-Host']}"],
                                         origin="https://coda-e2e.example.com",
                                         host="internal.local")
        ws.send('{"type": "join_session", "session_id": "%s", "since": 0}' % sid)
        ws.send('{"type": "terminal_input", "session_id": "%s", "input": "python3 %s/coda.py doctor; echo DOC$((1))TOR\\r"}'
                % (sid, ROOT))
        output, deadline = b"", time.time() + 120
        while b"DOC1TOR" not in output:
            assert time.time() < deadline, output[-2000:]
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_BINARY:
                output += data[10 + data[9]:]
        text = output.decode(errors="replace")
        assert "ok    token valid: signed in as alice@example.com" in text
        assert "ok    token can mint" in text and "ok    local proxy" in text
        ws.close()
    finally:
        process.terminate()
        process.wait(15)
        log.close()
        workspace.stop()


def _ok(url):
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False
