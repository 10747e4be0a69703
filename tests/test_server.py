"""The terminal server against PROTOCOL.md: the real coda.py, real PTYs, real sockets."""

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import websocket

from conftest import ROOT, TOKEN, Coda, free_port, wait_for

UTF8_LINE = "é漢🙂 ascii \x1b[31mred\x1b[0m ü ß 日本語 👍🏽\n"


def session_ids_of(server):
    return [s["session_id"] for s in server.get("/api/sessions").json()]


def processes():
    """(pid, state, parent, session) of every process, from /proc."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            yield int(name), fields[0], int(fields[1]), int(fields[3])


def server_children(pid):
    return [(child, state) for child, state, parent, _ in processes() if parent == pid]


def processes_in_session(sid):
    return [pid for pid, state, _, session in processes() if session == sid and state != "Z"]


def shell_pid(server, session_id):
    server.type(session_id, "echo PID=$$ END$((6+1))\r")
    text, _ = server.read_until(session_id, "END7")
    return int(re.findall(r"PID=(\d+) END7", text)[-1])


# --- PROTOCOL: Start, Access ------------------------------------------------------

def test_health_needs_no_token_and_reports_state(coda_server):
    answer = requests.get(coda_server.url + "/health").json()
    assert answer["status"] == "healthy"
    assert answer["version"] == coda_server.get("/api/version").json()["version"]
    assert isinstance(answer["active_sessions"], int)
    assert answer["setup_status"] in ("pending", "running", "complete", "failed")


def test_version_and_databricks_endpoints_have_their_empty_shapes(coda_server):
    assert coda_server.get("/api/version").json() == {"version": requests.get(coda_server.url + "/health").json()["version"]}
    pat = coda_server.get("/api/pat-status").json()
    assert pat == {"configured": False, "valid": False, "user": None, "workspace_host": None, "expires_at": None}
    state = coda_server.get("/api/app-state").json()
    assert set(state) >= {"owner", "workspace_host", "pat_configured", "last_rotation"}
    setup = coda_server.get("/api/setup-status").json()
    assert set(setup) == {"status", "steps"}


def test_every_route_but_health_needs_the_token(coda_server):
    for path in ("/", "/api/sessions", "/api/version", "/static/app.js"):
        assert requests.get(coda_server.url + path).status_code == 403, path
        assert requests.get(coda_server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 403
    answer = requests.post(coda_server.url + "/api/session", json={})
    assert answer.status_code == 403 and "token" in answer.json()["error"]


def test_the_page_and_its_files_are_revalidated_on_every_load(coda_server):
    """After an upgrade a browser must not run yesterday's app.js beside today's server."""
    for path in ("/", "/static/app.js", "/static/lib/xterm/xterm.js"):
        answer = coda_server.get(path)
        assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-cache", path
        again = coda_server.get(path, headers={**coda_server.headers, "If-None-Match": answer.headers["ETag"]})
        assert again.status_code == 304 and not again.content, path
    assert coda_server.get("/static/no-such-file.js").status_code == 404


def test_url_token_becomes_an_httponly_cookie_and_a_redirect(coda_server):
    answer = requests.get(coda_server.url + f"/?token={TOKEN}", allow_redirects=False)
    assert answer.status_code == 303 and answer.headers["Location"] == "/"
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    with requests.Session() as browser:
        assert browser.get(coda_server.url + f"/?token={TOKEN}").status_code == 200
        assert browser.get(coda_server.url + "/api/sessions").status_code == 200
        assert TOKEN not in browser.get(coda_server.url + "/").text


def test_foreign_host_and_origin_are_refused(coda_server):
    headers = dict(coda_server.headers)
    assert requests.get(coda_server.url + "/api/version", headers={**headers, "Host": "evil.example"}).status_code == 403
    evil = requests.post(coda_server.url + "/api/session", json={}, headers={**headers, "Origin": "http://evil.example"})
    assert evil.status_code == 403
    same = requests.post(coda_server.url + "/api/heartbeat", json={"session_ids": []},
                         headers={**headers, "Origin": f"http://127.0.0.1:{coda_server.port}"})
    assert same.status_code == 200
    forwarded = requests.get(coda_server.url + "/api/version",
                             headers={**headers, "Host": "evil.example", "X-Forwarded-Host": f"127.0.0.1:{coda_server.port}"})
    assert forwarded.status_code == 403  # never trusted locally


def test_websocket_upgrade_runs_the_same_checks(coda_server):
    url = f"ws://127.0.0.1:{coda_server.port}/ws"
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, timeout=5)
    assert refused.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, timeout=5, header=[f"Authorization: Bearer {TOKEN}"], origin="http://evil.example")
    assert refused.value.status_code == 403
    cookie = session_cookie(coda_server)
    ok = websocket.create_connection(url, timeout=5, header=[f"Cookie: {cookie}"],
                                     origin=f"http://127.0.0.1:{coda_server.port}")
    ok.close()


def session_cookie(server):
    """The name=value the server sets in exchange for ?token=."""
    answer = requests.get(server.url + f"/?token={TOKEN}", allow_redirects=False)
    return answer.headers["Set-Cookie"].split(";")[0]


def test_the_cookie_holds_a_value_derived_from_the_token_for_this_port(coda_server, start_coda):
    cookie = session_cookie(coda_server)
    name, value = cookie.split("=", 1)
    assert TOKEN not in cookie and str(coda_server.port) in name
    assert requests.get(coda_server.url + "/api/version", headers={"Cookie": cookie}).status_code == 200
    for name_tried in (name, "coda_token"):  # the token itself is taken as ?token= or Bearer, never as a cookie
        answer = requests.get(coda_server.url + "/api/version", headers={"Cookie": f"{name_tried}={TOKEN}"})
        assert answer.status_code == 403
    other = start_coda()  # the same token on another port: its cookie differs, and this one is refused there
    other_cookie = session_cookie(other)
    assert other_cookie.split("=")[0] != name and other_cookie.split("=")[1] != value
    assert requests.get(other.url + "/api/version", headers={"Cookie": cookie}).status_code == 403


@pytest.mark.parametrize("path", ["//evil.example/", "/\\evil.example/", "/%5Cevil.example/", "/%2F/evil.example/",
                                  "/%0d%0aSet-Cookie:x=y", "/%09/evil.example/"])
def test_token_exchange_redirects_only_to_a_local_path(coda_server, path):
    answer = requests.get(coda_server.url + path + f"?token={TOKEN}&x=1", allow_redirects=False)
    assert answer.status_code == 303
    location = answer.headers["Location"]
    assert location.startswith("/") and not location.startswith("//") and "\\" not in location
    assert not re.search(r"[\x00-\x20]", location) and "x=y" not in answer.headers.get("Set-Cookie", "")
    assert location.endswith("?x=1")


def test_every_json_answer_is_application_json(coda_server):
    sid = coda_server.new_session(label="<b>x</b>")
    other = coda_server.new_session()
    gets = ["/api/sessions", "/api/version", "/api/pat-status", "/api/app-state", "/api/setup-status", "/health",
            "/api/nope", "/ws"]
    posts = [("/api/session/attach", {"session_id": sid}),
             ("/api/session/label", {"session_id": sid, "label": "y"}), ("/api/input", {"session_id": sid, "input": ""}),
             ("/api/resize", {"session_id": sid, "cols": 80, "rows": 24}), ("/api/output", {"session_id": sid}),
             ("/api/output-batch", {"session_ids": [sid]}), ("/api/heartbeat", {"session_id": sid}),
             ("/api/configure-pat", {}), ("/api/upload", None), ("/api/session/close", {"session_id": sid}),
             ("/api/session/close", {"session_id": other}), ("/api/version", {})]
    answers = [coda_server.get(path) for path in gets] + [coda_server.post(path, body) for path, body in posts]
    for answer in answers:
        assert answer.headers["Content-Type"].split(";")[0] == "application/json", (answer.url, answer.status_code)
        answer.json()
    assert isinstance(answers[0].json(), list)  # /api/sessions: the list itself, not a string of it
    created = coda_server.post("/api/session", {})
    assert created.headers["Content-Type"] == "application/json"
    coda_server.close_session(created.json()["session_id"])


def raw_exchange(server, request, timeout=10):
    """Send raw bytes; the answer's bytes up to its Content-Length (or until the server closes)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            head, found, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if found and length and len(body) >= int(length[1]):
                break
    return answer


CLOSE = b"Connection: close\r\n"


@pytest.mark.parametrize("request_bytes", [
    b"GET /%0d%0aX:y HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer TOKEN\r\n" + CLOSE + b"\r\n",
    b"POST /api/session HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://[\r\nAuthorization: Bearer TOKEN\r\n"
    b"Content-Length: 2\r\n" + CLOSE + b"\r\n{}",
    b"GARBAGE\r\n" + CLOSE + b"\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: abc\r\n" + CLOSE + b"\r\n",
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer TOKEN\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: !!!\r\n\r\n",
    b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\n",  # over pywsgi's 8 KiB: its own 414, whole-line so no reset
    b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n" + CLOSE + b"\r\n",
])
def test_malformed_requests_get_a_json_4xx_and_one_log_line(coda_server, request_bytes):
    before = coda_server.log()
    answer = raw_exchange(coda_server, request_bytes.replace(b"TOKEN", TOKEN.encode()))
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert 400 <= status < 500, answer[:300]
    assert b"application/json" in head and json.loads(body)["error"]
    time.sleep(0.2)
    new = coda_server.log()[len(before):]
    assert "Traceback" not in new and TOKEN not in new and len(new.splitlines()) <= 1, new


@pytest.mark.parametrize("wait", ["NaN", "Infinity", "1e999", "-1", "1e300"])
def test_a_wait_that_is_not_a_sane_number_is_refused_or_capped(coda_server, wait):
    sid = coda_server.new_session()
    beyond = 10 ** 9  # past the end: no news, so only the wait (capped at the contract's 30 s) ends the poll
    for path, body in (("/api/output", f'{{"session_id": "{sid}", "since": {beyond}, "wait": {wait}}}'),
                       ("/api/output-batch", f'{{"session_ids": ["{sid}"], "since": {{"{sid}": {beyond}}}, "wait": {wait}}}')):
        answer = requests.post(coda_server.url + path, headers=coda_server.headers, timeout=35, data=body)
        assert answer.status_code in (200, 400), answer.text
        if answer.status_code == 400:
            assert answer.json()["error"].endswith(".")
    coda_server.close_session(sid)


@pytest.mark.parametrize("body", [{"since": 10 ** 30}, {"since": 1e300}, {"since": float("nan")}])
def test_huge_or_non_finite_offsets_are_refused(coda_server, body):
    sid = coda_server.new_session()
    for path in ("/api/output", "/api/session/attach"):
        data = json.dumps({"session_id": sid, **body})
        answer = requests.post(coda_server.url + path, headers=coda_server.headers, data=data)
        assert answer.status_code == 400 and answer.json()["error"].endswith("."), (path, answer.text)
    batch = requests.post(coda_server.url + "/api/output-batch", headers=coda_server.headers,
                          data=json.dumps({"session_ids": [sid], "since": {sid: body["since"]}}))
    assert batch.status_code == 400
    coda_server.close_session(sid)


def test_a_client_that_never_finishes_its_headers_is_dropped(start_coda):
    server = start_coda({"CODA_HEADER_TIMEOUT": "1"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
        started = time.time()
        assert sock.recv(100) == b""  # closed by the server, not by our timeout
        assert time.time() - started < 8
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # a dribbling one too
        started = time.time()
        with pytest.raises(OSError):
            for _ in range(80):
                sock.sendall(b"X")
                time.sleep(0.1)
        assert time.time() - started < 8
    # a long-poll and a WebSocket outlive the header deadline
    sid = server.new_session()
    answer = server.post("/api/output", {"session_id": sid, "since": 10 ** 6, "wait": 2.5})
    assert answer.status_code == 200
    ws = server.websocket()
    time.sleep(2.5)
    ws.send(type="heartbeat", session_ids=[sid])
    ws.join(sid)
    ws.close()


def test_empty_token_on_a_network_address_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "CODA_"))}
    env.update(HOME=str(tmp_path), CODA_TOKEN="", CODA_INSTALL="0")
    done = subprocess.run([sys.executable, "coda.py", "--host", "0.0.0.0", "--port", "0"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "CODA_TOKEN" in done.stderr and "refusing" in done.stderr


def test_token_subcommand_after_flags(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    (tmp_path / ".databrickscfg").write_text("[DEFAULT]\nhost = https://x\ntoken = dapi-from-cfg\n")
    done = subprocess.run([sys.executable, "coda.py", "--host", "127.0.0.1", "token"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout.strip()) == (0, "dapi-from-cfg"), done.stderr


def test_secrets_are_gone_from_the_servers_environment(start_coda, tmp_path):
    secrets = {"DATABRICKS_TOKEN": "dapi" + "0123456789abcdef" * 2, "DATABRICKS_CLIENT_SECRET": "dose-secret-" + "9" * 20}
    server = start_coda({**secrets, "DATABRICKS_HOST": f"http://127.0.0.1:{free_port()}"})
    values = [TOKEN.encode(), *(v.encode() for v in secrets.values())]
    environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes()
    assert not any(v in environ for v in values)
    sid = server.new_session()
    server.type(sid, f"cat /proc/{server.proc.pid}/environ /proc/$PPID/environ | od -c | tail -3; "
                     "env; echo DONE$((1+1))\r")
    text, _ = server.read_until(sid, "DONE2")
    assert not any(v.decode() in text for v in values)
    assert requests.get(server.url + "/api/version", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert requests.get(server.url + "/api/version", headers={"Authorization": "Bearer x" + TOKEN}).status_code == 403


def test_security_headers_on_every_answer(coda_server):
    for answer in (coda_server.get("/"), coda_server.get("/api/version"), coda_server.get("/nope"),
                   requests.get(coda_server.url + "/api/version"), requests.get(coda_server.url + "/health")):
        csp = answer.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"]


def test_apps_mode_admits_only_the_owner(start_coda):
    server = start_coda({"DATABRICKS_APP_NAME": "coda-test", "APP_OWNER": "Owner@Example.com", "CODA_TOKEN": None})
    url = server.url + "/api/version"
    assert requests.get(url, headers={"X-Forwarded-Email": "owner@example.COM"}).status_code == 200
    assert requests.get(url, headers={"X-Forwarded-Email": "someone@example.com"}).status_code == 403
    assert requests.get(url).status_code == 403
    assert requests.get(server.url + "/health").status_code == 200
    proxied = {"X-Forwarded-Email": "owner@example.com", "Host": "internal:8000",
               "X-Forwarded-Host": "coda-test.example.com", "Origin": "https://coda-test.example.com"}
    assert requests.post(server.url + "/api/heartbeat", json={"session_ids": []}, headers=proxied).status_code == 200
    proxied["Origin"] = "https://evil.example"
    assert requests.post(server.url + "/api/heartbeat", json={"session_ids": []}, headers=proxied).status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws", timeout=5,
                                    header=["X-Forwarded-Email: intruder@example.com"])


def test_apps_mode_without_an_owner_fails_closed(start_coda):
    server = start_coda({"DATABRICKS_APP_NAME": "coda-test", "CODA_TOKEN": None})
    answer = requests.get(server.url + "/api/version", headers={"X-Forwarded-Email": "anyone@example.com"})
    assert answer.status_code == 403
    assert "owner" in requests.get(server.url + "/health").json()["owner_error"]


def test_empty_coda_token_switches_local_auth_off_with_a_warning(start_coda):
    server = start_coda({"CODA_TOKEN": ""})
    assert requests.get(server.url + "/api/version").status_code == 200
    assert "CODA_TOKEN is set but empty" in server.log()


def test_generated_token_is_printed_once_as_a_url(start_coda):
    server = start_coda({"CODA_TOKEN": None})
    line = next(l for l in server.log().splitlines() if "?token=" in l)
    token = line.split("?token=")[1].strip()
    assert len(token) >= 24
    assert requests.get(server.url + "/api/version", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert server.log().count(token) == 1


# --- PROTOCOL: Errors -------------------------------------------------------------

@pytest.mark.parametrize("path,body,status", [
    ("/api/session", "not json", 400),
    ("/api/session", "[1, 2]", 400),
    ("/api/session", {"cols": "wide"}, 400),
    ("/api/session", {"cols": 0}, 400),
    ("/api/session", {"rows": 1001}, 400),
    ("/api/input", {"input": "x"}, 400),
    ("/api/input", {"session_id": 7, "input": "x"}, 400),
    ("/api/input", {"session_id": "nope", "input": "x"}, 404),
    ("/api/resize", {"session_id": "nope", "cols": 10, "rows": 10}, 404),
    ("/api/output", {"session_id": "nope"}, 404),
    ("/api/output", {"session_id": "nope", "since": -1}, 400),
    ("/api/output", {"session_id": "nope", "encoding": "hex"}, 400),
    ("/api/session/attach", {"session_id": "nope", "encoding": 64}, 400),
    ("/api/session/attach", {"session_id": "nope"}, 404),
    ("/api/session/close", {}, 400),
    ("/api/session/label", {"session_id": "nope", "label": "x"}, 404),
    ("/api/output-batch", {"session_ids": "abc"}, 400),
    ("/api/output-batch", {"session_ids": [], "encoding": "utf-16"}, 400),
])
def test_bad_requests_get_their_status_and_one_sentence(coda_server, path, body, status):
    data = body if isinstance(body, str) else json.dumps(body)
    answer = requests.post(coda_server.url + path, data=data, headers=coda_server.headers)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error.endswith(".") and "Traceback" not in error


def test_shape_is_checked_before_the_session_lookup(coda_server):
    sid = coda_server.new_session()
    answer = coda_server.post("/api/resize", {"session_id": sid, "cols": 0, "rows": 10})
    assert answer.status_code == 400
    coda_server.close_session(sid)


def test_oversized_bodies_are_refused(coda_server):
    sid = coda_server.new_session()
    big = coda_server.post("/api/input", {"session_id": sid, "input": "x" * (1024 * 1024 + 1)})
    assert big.status_code == 413
    # Refused from Content-Length alone: the body is never sent.
    headers = {**coda_server.headers, "Content-Length": str(64 * 1024 * 1024), "Content-Type": "application/json"}
    import socket
    with socket.create_connection(("127.0.0.1", coda_server.port), timeout=5) as raw:
        raw.sendall(f"POST /api/input HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() +
                    "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 413")
    coda_server.close_session(sid)


def test_unknown_route_is_json_404(coda_server):
    answer = coda_server.get("/api/nothing-here")
    assert answer.status_code == 404 and answer.json()["error"]


# --- PROTOCOL: HTTP endpoints (sessions) ------------------------------------------

def test_create_list_label_and_close(coda_server):
    sid = coda_server.api("/api/session", {"label": "build", "cols": 100, "rows": 30})["session_id"]
    [entry] = [s for s in coda_server.get("/api/sessions").json() if s["session_id"] == sid]
    assert entry["label"] == "build" and entry["exited"] is False
    assert set(entry) == {"session_id", "label", "created_at", "last_activity", "idle_seconds", "process", "offset", "exited",
                          "busy", "cwd"}
    coda_server.api("/api/session/label", {"session_id": sid, "label": "tests\x1b[31m\x07 " + "x" * 200})
    [entry] = [s for s in coda_server.get("/api/sessions").json() if s["session_id"] == sid]
    assert entry["label"].startswith("tests[31m ") and len(entry["label"]) == 100
    coda_server.close_session(sid)
    assert sid not in session_ids_of(coda_server)
    assert coda_server.post("/api/session/close", {"session_id": sid}).status_code == 404


def test_concurrent_closes_both_succeed(coda_server):
    sid = coda_server.new_session()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: coda_server.post("/api/session/close", {"session_id": sid}), range(4)))
    assert sorted(a.status_code for a in answers)[0] == 200
    assert all(a.status_code in (200, 404) for a in answers)
    assert sid not in session_ids_of(coda_server)


def test_shell_environment_is_clean_and_ready(start_coda):
    server = start_coda({"DATABRICKS_TOKEN": "dapi0123456789abcdef0123456789abcdef", "DATABRICKS_HOST": "https://x",
                         "DATABRICKS_CLIENT_SECRET": "s3cr3t-value", "MY_API_KEY": "k-value-1", "DB_PASSWORD": "pw-value-1",
                         "CLAUDECODE": "1", "GITHUB_TOKEN": "gh-value-1", "HARMLESS": "kept", "LANG": "", "LC_ALL": "", "LC_CTYPE": "",
                         "CI": "true", "CONTINUOUS_INTEGRATION": "1", "CI_JOB_ID": "7"})
    sid = server.new_session()
    server.type(sid, "env | sort; echo CWD=$(pwd) CHARMAP=$(locale charmap); echo END$((1))ENV\r")
    text, _ = server.read_until(sid, "END1ENV\r\n")
    for name in ("DATABRICKS_TOKEN", "DATABRICKS_HOST", "DATABRICKS_CLIENT_SECRET", "MY_API_KEY", "DB_PASSWORD",
                 "CLAUDECODE", "GITHUB_TOKEN", "CODA_TOKEN", "CI", "CONTINUOUS_INTEGRATION", "CI_JOB_ID"):
        assert f"\n{name}=" not in text, name  # CI markers turn agent TUIs non-interactive
    for secret in ("dapi0123", "s3cr3t", "k-value", "pw-value", "gh-value", TOKEN):
        assert secret not in text
    assert "HARMLESS=kept" in text and "TERM=xterm-256color" in text and "COLORTERM=truecolor" in text
    assert "CHARMAP=UTF-8" in text
    assert f"PATH={server.home}/.local/bin:" in text
    assert f"CWD={server.home}/projects" in text


def test_signals_are_reset_even_when_coda_started_with_sigint_ignored(tmp_path):
    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    original = subprocess.Popen
    server = None
    try:
        subprocess.Popen = lambda *a, **kw: original(*a, preexec_fn=ignore_sigint, **kw)
        server = Coda(tmp_path / "home")
    finally:
        subprocess.Popen = original
    try:
        sid = server.new_session()
        server.type(sid, "grep SigIgn /proc/self/status; echo DONE$((1))\r")
        text, offset = server.read_until(sid, "DONE1\r\n")
        ignored = int(text.split("SigIgn:")[-1].split()[0], 16)
        assert not ignored & (1 << (signal.SIGINT - 1))
        server.type(sid, "sleep 30; echo AFTER-$((1+1))\r")
        time.sleep(0.5)
        started = time.time()
        server.type(sid, "\x03")
        server.type(sid, "echo INTER$((2+3))\r")
        text, _ = server.read_until(sid, "INTER5", since=offset, timeout=5)
        assert time.time() - started < 5 and "AFTER-2" not in text
    finally:
        server.stop()


def test_job_control_ctrl_z_and_fg(coda_server):
    sid = coda_server.new_session()
    coda_server.type(sid, "sleep 30\r")
    time.sleep(0.5)
    coda_server.type(sid, "\x1a")
    text, offset = coda_server.read_until(sid, "Stopped")
    coda_server.type(sid, "jobs; kill %1; echo JOB$((4*4))\r")
    coda_server.read_until(sid, "JOB16", since=offset)
    coda_server.close_session(sid)


def test_exit_code_is_reported_on_both_transports(coda_server):
    sid = coda_server.new_session()
    sock = coda_server.websocket()
    sock.join(sid)
    coda_server.type(sid, "exit 3\r")
    deadline = time.time() + 10
    while True:
        assert time.time() < deadline
        item = sock.receive()
        if item[0] == "event" and item[1]["type"] == "session_exited":
            assert item[1] == {"type": "session_exited", "session_id": sid, "exit_code": 3}
            break
    answer = coda_server.api("/api/output", {"session_id": sid, "since": 0})
    assert answer["exited"] is True and answer["exit_code"] == 3
    assert [s for s in coda_server.get("/api/sessions").json() if s["session_id"] == sid][0]["exited"]
    sock.close()
    coda_server.close_session(sid)


def test_resize_shows_in_stty_size(coda_server):
    sid = coda_server.new_session(cols=90, rows=20)
    coda_server.type(sid, "stty size\r")
    _, offset = coda_server.read_until(sid, "20 90")
    coda_server.api("/api/resize", {"session_id": sid, "cols": 132, "rows": 43})
    coda_server.type(sid, "stty size\r")
    coda_server.read_until(sid, "43 132", since=offset)
    sock = coda_server.websocket()
    sock.join(sid)
    sock.send(type="terminal_resize", session_id=sid, cols=70, rows=11)
    sock.send(type="terminal_input", session_id=sid, input="stty size\r")
    sock.collect(sid, b"11 70")
    sock.close()
    coda_server.close_session(sid)


def test_session_cap_is_race_safe(start_coda):
    server = start_coda({"MAX_CONCURRENT_SESSIONS": "5"})
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: server.post("/api/session", {}), range(20)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 5 + [429] * 15
    assert "MAX_CONCURRENT_SESSIONS" in [a for a in answers if a.status_code == 429][0].json()["error"]


def test_bad_cap_falls_back_to_five_with_a_log_line(start_coda):
    server = start_coda({"MAX_CONCURRENT_SESSIONS": "lots"})
    codes = [server.post("/api/session", {}).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    assert "MAX_CONCURRENT_SESSIONS" in server.log()


def test_no_fd_leak_and_no_zombies_after_200_cycles(start_coda):
    server = start_coda({"MAX_CONCURRENT_SESSIONS": "3"})
    fds = lambda: len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    # Setup at boot opens descriptors of its own (the proxy check's connection): count after it.
    wait_for(lambda: server.get("/health").json()["setup_status"] in ("complete", "failed"))
    warm = server.new_session()
    server.close_session(warm)
    time.sleep(0.2)
    baseline = fds()
    for _ in range(200):
        server.close_session(server.new_session())
    deadline = time.time() + 5  # a connection still closing may take a moment; a leak never goes
    while fds() > baseline and time.time() < deadline:
        time.sleep(0.1)
    assert fds() <= baseline  # one leaked descriptor per cycle would show as +200
    assert [p for p, state in server_children(server.proc.pid) if state == "Z"] == []
    assert server_children(server.proc.pid) == []


def test_close_kills_the_whole_terminal_session(coda_server):
    sid = coda_server.new_session()
    pid = shell_pid(coda_server, sid)
    coda_server.type(sid, "sleep 300 & trap '' HUP; (trap '' HUP; sleep 301) & echo B$((1))G\r")
    coda_server.read_until(sid, "B1G\r\n")
    assert len(processes_in_session(pid)) >= 3
    coda_server.close_session(sid)
    assert processes_in_session(pid) == []


def test_idle_reaper_closes_abandoned_sessions_but_spares_heartbeats(start_coda):
    server = start_coda({"SESSION_TIMEOUT_SECONDS": "2"})
    chatty = server.new_session()   # output alone must not keep it alive
    kept = server.new_session()
    server.type(chatty, "while :; do echo tick; sleep 0.2; done\r")
    deadline = time.time() + 6
    while time.time() < deadline:
        server.api("/api/heartbeat", {"session_ids": [kept]})
        time.sleep(0.3)
    ids = session_ids_of(server)
    assert kept in ids and chatty not in ids


# --- PROTOCOL: Offsets (both transports) ------------------------------------------

def make_utf8_file(home, repeat=5000):
    path = Path(home) / "utf8.txt"
    path.write_text(UTF8_LINE * repeat)
    return path, (UTF8_LINE * repeat).replace("\n", "\r\n")


def test_multibyte_utf8_arrives_intact_over_both_transports(coda_server):
    path, expected = make_utf8_file(coda_server.home)
    sid = coda_server.new_session()
    sock = coda_server.websocket()
    joined = sock.join(sid, since=0)
    coda_server.type(sid, f"stty -echo; echo BE$((1))GIN; cat {path}; echo E$((1))ND\r")
    data, _ = sock.collect(sid, b"E1ND\r\n", start=joined["offset"])
    ws_text = data.decode("utf-8")  # strict: a split character would fail here
    assert expected in ws_text
    polled, offset = coda_server.read_until(sid, "E1ND\r\n", since=0)
    assert expected in polled and "\ufffd" not in polled
    sock.close()
    coda_server.close_session(sid)


def make_binary_file(home, size=1_500_000):
    """Bytes that are not UTF-8 (invalid bytes, cut characters) between 3- and 4-byte
    characters, so that 1 MiB answers and 64 KiB frames cut characters in two."""
    rng = random.Random(52)
    tokens = [b"\xff", b"\xfe\xfd", b"\xc0", b"\xe2\x82", "€".encode(), "🙂".encode(), b"\x1b[31m", b"\x00\x07",
              b"ascii ", bytes(range(256))]
    data = bytearray()
    while len(data) < size:
        data += rng.choice(tokens)
    path = Path(home) / "binary.bin"
    path.write_bytes(bytes(data))
    return path, bytes(data)


def poll_bytes(server, sid, since, marker=None, timeout=30):
    """Long-poll base64 output from `since` until `marker` appears (or one answer without
    a marker), checking that every answer starts exactly where the last ended."""
    data, offset, deadline = b"", since, time.time() + timeout
    while True:
        answer = server.api("/api/output", {"session_id": sid, "since": offset, "wait": 2, "encoding": "base64"})
        piece = base64.b64decode(answer["output"], validate=True)
        assert answer["offset"] == offset and answer["next_offset"] == offset + len(piece)
        assert answer["truncated"] is False
        data, offset = data + piece, answer["next_offset"]
        if marker is None or marker in data:
            return data, offset
        assert time.time() < deadline, f"{marker!r} not seen in {data[-300:]!r}"


def test_binary_output_arrives_byte_exact_over_base64_polls_attach_and_the_socket(coda_server):
    path, expected = make_binary_file(coda_server.home)
    sid = coda_server.new_session()
    sock = coda_server.websocket()
    sock.join(sid, since=0)
    # Raw mode: the terminal passes the bytes through untranslated (no \n -> \r\n).
    coda_server.type(sid, f"stty raw -echo; echo BE$((1))GIN; cat {path}; echo E$((1))ND; stty sane\r")
    polled, end = poll_bytes(coda_server, sid, 0, b"E1ND\n")
    start = polled.index(b"BE1GIN\n") + len(b"BE1GIN\n")
    assert polled[start:polled.rindex(b"E1ND\n")] == expected
    # Offsets are exact byte offsets: a `since` inside a character starts right there,
    # and a 1 MiB answer that cuts a character continues with its remaining bytes.
    emoji = start + expected.index("🙂".encode())
    # `polled` ends at the marker; what the shell printed after it (its prompt) may come too.
    for since in (emoji + 1, emoji + 3, start + 1):
        again = poll_bytes(coda_server, sid, since)[0][:len(polled) - since]
        assert again == polled[since:since + 1024 * 1024]
    emoji_after_a_mib = polled.index("🙂".encode(), start + 1024 * 1024)
    cut = emoji_after_a_mib + 2 - 1024 * 1024   # a 1 MiB answer from here ends inside that 🙂
    first, middle = poll_bytes(coda_server, sid, cut)
    second, _ = poll_bytes(coda_server, sid, middle)
    assert middle == cut + 1024 * 1024 and first.endswith("🙂".encode()[:2]) and second.startswith("🙂".encode()[2:])
    assert (first + second)[:len(polled) - cut] == polled[cut:cut + len(first) + len(second)]
    attached = coda_server.api("/api/session/attach", {"session_id": sid, "since": start, "encoding": "base64"})
    assert attached["offset"] == start
    assert base64.b64decode(attached["output"]).startswith(expected + b"E1ND\n")
    streamed, _ = sock.collect(sid, b"E1ND\n", start=0)
    assert streamed[start:streamed.rindex(b"E1ND\n")] == expected
    # Without `encoding` the answer stays text, as before.
    assert "\ufffd" in coda_server.api("/api/output", {"session_id": sid, "since": start})["output"]
    sock.close()
    coda_server.close_session(sid)


def test_switching_from_websocket_to_long_poll_loses_and_repeats_nothing(coda_server):
    sid = coda_server.new_session()
    sock = coda_server.websocket()
    sock.join(sid, since=0)
    coda_server.type(sid, "stty -echo; for i in $(seq 1 3000); do echo line-$i; done; echo DO$((0))NE\r")
    head, offset = sock.collect(sid, b"line-1000\r\n", start=0)
    sock.close()
    rest, deadline = b"", time.time() + 30
    while b"DO0NE\r\n" not in head + rest:  # the socket may have carried it all already
        assert time.time() < deadline, "DO0NE never came"
        answer = coda_server.api("/api/output", {"session_id": sid, "since": offset, "wait": 2})
        assert answer["offset"] == offset
        rest += answer["output"].encode()
        offset = answer["next_offset"]
    whole = (head + rest).decode()
    assert re.findall(r"line-\d+", whole) == [f"line-{i}" for i in range(1, 3001)]
    coda_server.close_session(sid)


def test_two_readers_each_get_the_whole_stream(coda_server):
    sid = coda_server.new_session()
    first, second = coda_server.websocket(), coda_server.websocket()
    first.join(sid, since=0)
    second.join(sid, since=0)
    coda_server.type(sid, "stty -echo; seq 1 20000; echo F$((1))N\r")
    a, _ = first.collect(sid, b"F1N\r\n", start=0)
    b, _ = second.collect(sid, b"F1N\r\n", start=0)
    polled, _ = coda_server.read_until(sid, "F1N\r\n", since=0)
    upto = lambda data: data[:data.index(b"F1N\r\n")]  # the prompt after it may come in a later read
    assert upto(a) == upto(b) == upto(polled.encode())
    assert b"\r\n".join(str(i).encode() for i in range(1, 20001)) in a
    first.close()
    second.close()
    coda_server.close_session(sid)


def test_small_scrollback_truncates_and_says_so(start_coda):
    server = start_coda({"CODA_SCROLLBACK_BYTES": "4096"})
    sid = server.new_session()
    server.type(sid, "seq 1 20000; echo MA$((1))RK\r")
    _, end = server.read_until(sid, "MA1RK\r\n", since=0)
    answer = server.api("/api/session/attach", {"session_id": sid, "since": 0})
    assert answer["truncated"] is True
    assert answer["next_offset"] >= end  # the prompt may have followed
    assert answer["next_offset"] - 4096 <= answer["offset"] <= answer["next_offset"] - 4096 + 3
    assert len(answer["output"].encode()) <= 4096
    assert "20000\r\nMA1RK\r\n" in answer["output"]
    sock = server.websocket()
    joined = sock.join(sid, since=0)
    assert joined["truncated"] is True and joined["offset"] > 0
    sock.close()


def test_attach_returns_kept_output_and_join_without_since_is_live_only(coda_server):
    sid = coda_server.new_session()
    coda_server.type(sid, "echo OLD-$((5*5))\r")
    _, end = coda_server.read_until(sid, "OLD-25")
    answer = coda_server.api("/api/session/attach", {"session_id": sid})
    assert "OLD-25" in answer["output"] and answer["offset"] == 0 and answer["truncated"] is False
    assert set(answer) >= {"session_id", "label", "created_at", "process", "exited", "output", "offset", "next_offset", "truncated"}
    sock = coda_server.websocket()
    joined = sock.join(sid)
    assert joined["offset"] >= end
    coda_server.type(sid, "echo NEW-$((6*6))\r")
    data, _ = sock.collect(sid, b"NEW-36")
    assert b"OLD-25" not in data
    sock.close()
    coda_server.close_session(sid)


def test_long_poll_without_since_uses_the_server_cursor(coda_server):
    sid = coda_server.new_session()
    coda_server.type(sid, "echo ONE-$((1))\r")
    seen = ""
    deadline = time.time() + 10
    while "ONE-1" not in seen:
        assert time.time() < deadline
        seen += coda_server.api("/api/output", {"session_id": sid, "wait": 1})["output"]
    coda_server.type(sid, "echo TWO-$((2))\r")
    later = ""
    while "TWO-2" not in later:
        assert time.time() < deadline
        later += coda_server.api("/api/output", {"session_id": sid, "wait": 1})["output"]
    assert "ONE-1" not in later.replace("echo ONE", "")
    coda_server.close_session(sid)


def test_long_poll_waits_then_answers_empty(coda_server):
    sid = coda_server.new_session()
    offset = coda_server.wait_prompt(sid)
    time.sleep(0.3)
    offset = coda_server.api("/api/session/attach", {"session_id": sid})["next_offset"]
    started = time.time()
    answer = coda_server.api("/api/output", {"session_id": sid, "since": offset + 0, "wait": 1})
    assert answer["output"] == "" and time.time() - started >= 0.9
    assert answer["next_offset"] == offset
    coda_server.close_session(sid)


def test_output_batch_answers_when_any_session_has_output(coda_server):
    a, b = coda_server.new_session(), coda_server.new_session()
    end_a, end_b = coda_server.wait_prompt(a), coda_server.wait_prompt(b)
    time.sleep(0.3)
    end_a = coda_server.api("/api/session/attach", {"session_id": a})["next_offset"]

    def type_later():
        time.sleep(0.5)
        coda_server.type(b, "echo BATCH-$((3*3))\r")

    threading.Thread(target=type_later).start()
    answer = {"outputs": {}}
    text = ""
    deadline = time.time() + 10
    while "BATCH-9" not in text:
        assert time.time() < deadline
        answer = coda_server.api("/api/output-batch", {"session_ids": [a, b, "missing"],
                                                       "since": {a: end_a, b: end_b}, "wait": 5})
        text += answer["outputs"][b]["output"]
        end_b = answer["outputs"][b]["next_offset"]
    assert answer["outputs"]["missing"] == {"error": "Session not found", "exited": True}
    assert answer["shutting_down"] is False and answer["outputs"][a]["output"] == ""
    coda_server.close_session(a)
    coda_server.close_session(b)


# --- PROTOCOL: WebSocket, Input, Flow control -------------------------------------

def test_bad_messages_get_errors_and_the_socket_stays_open(coda_server):
    sock = coda_server.websocket()
    for message in ("not json", "[1]", json.dumps({"type": "dance"}), json.dumps({"type": "terminal_input"}),
                    json.dumps({"type": "terminal_input", "session_id": "nope", "input": "x"})):
        sock.ws.send(message)
        kind, event = sock.receive()
        assert event["type"] == "error" and event["message"]
    sock.ws.send_binary(b"\x00\x01")
    assert sock.receive()[1]["type"] == "error"
    sid = coda_server.new_session()
    sock.join(sid)
    sock.close()
    coda_server.close_session(sid)


def test_messages_over_one_mebibyte_close_with_1009(coda_server):
    sock = coda_server.websocket()
    sock.ws.send(json.dumps({"type": "heartbeat", "session_ids": ["x" * (1024 * 1024)]}))
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        while True:
            opcode, data = sock.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                assert int.from_bytes(data[:2], "big") == 1009
                raise websocket.WebSocketConnectionClosedException()


def test_closing_a_session_tells_joined_sockets(coda_server):
    sid = coda_server.new_session()
    sock = coda_server.websocket()
    sock.join(sid)
    coda_server.close_session(sid)
    deadline = time.time() + 10
    while True:
        assert time.time() < deadline
        item = sock.receive()
        if item[0] == "event" and item[1]["type"] == "session_closed":
            assert item[1]["session_id"] == sid
            break
    sock.close()


def test_non_acking_client_gets_all_of_a_20_mb_cat(coda_server):
    path = coda_server.home / "big.bin"
    rng = random.Random(7)
    lines = [f"{i:08d} {'x' * rng.randint(0, 120)}\n" for i in range(240000)]
    content = "".join(lines)
    while len(content) < 20 * 1024 * 1024:
        content += content[:20 * 1024 * 1024 - len(content)]
    path.write_text(content)
    expected = content.replace("\n", "\r\n").encode()
    sid = coda_server.new_session()
    sock = coda_server.websocket()
    joined = sock.join(sid, since=0)
    coda_server.type(sid, f"stty -echo; echo BE$((1))GIN; cat {path}; echo E$((1))ND\r")
    data, _ = sock.collect(sid, b"E1ND\r\n", start=joined["offset"], timeout=120)
    body = data.split(b"BE1GIN\r\n", 1)[1].rsplit(b"E1ND\r\n", 1)[0]
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest()
    sock.close()
    coda_server.close_session(sid)


def test_a_client_that_stops_acking_pauses_the_producer_and_ctrl_c_still_works(start_coda):
    server = start_coda({"CODA_FLOW_HIGH": str(256 * 1024), "CODA_FLOW_LOW": str(64 * 1024)})
    sid = server.new_session()
    sock = server.websocket()
    sock.join(sid, since=0)
    sock.send(type="ack", session_id=sid, offset=0)
    sock.send(type="terminal_input", session_id=sid, input="yes\r")
    offset = lambda: [s for s in server.get("/api/sessions").json() if s["session_id"] == sid][0]["offset"]
    deadline = time.time() + 10
    while offset() < 256 * 1024:
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    paused_at = offset()
    time.sleep(1.0)
    assert offset() == paused_at, "the PTY kept being read although the client stopped acking"
    assert paused_at < 256 * 1024 + 2 * 256 * 1024
    sock.send(type="terminal_input", session_id=sid, input="\x03")
    sock.send(type="terminal_input", session_id=sid, input="echo STOP$((7*6))\r")
    # Acking again lets the reader catch up with what Ctrl+C left behind.
    received, acked, deadline = 0, 0, time.time() + 20
    tail = b""
    while b"STOP42" not in tail:
        assert time.time() < deadline
        item = sock.receive()
        if item[0] == "output":
            end = item[2] + len(item[3])
            tail = (tail + item[3])[-4096:]
            sock.send(type="ack", session_id=sid, offset=end)
    sock.close()


def test_a_reader_joining_at_the_end_resumes_a_session_another_reader_paused(start_coda):
    """The pause follows the furthest reader: one that joins caught up (a new tab, a rejoin
    at the end) lets the program go on at once, however far behind the other stays. It
    joins with nothing to send, so its join itself must count (the soak test found it)."""
    server = start_coda({"CODA_FLOW_HIGH": str(256 * 1024), "CODA_FLOW_LOW": str(64 * 1024)})
    sid = server.new_session()
    stalled = server.websocket()
    stalled.join(sid, since=0)
    stalled.send(type="ack", session_id=sid, offset=0)   # acking, and never again: it lags for good
    server.type(sid, "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo GO$((40+2))\r")
    offset = lambda: [s for s in server.get("/api/sessions").json() if s["session_id"] == sid][0]["offset"]
    wait_for(lambda: offset() > 256 * 1024, what="the flood to reach the window")

    def settled():
        before = offset()
        time.sleep(0.5)
        return before if offset() == before else None

    paused_at = wait_for(settled, what="the PTY to pause")
    assert paused_at < 3_000_000
    fresh = server.websocket()
    joined = fresh.join(sid)   # at the end: nothing to send until the program goes on
    fresh.collect(sid, b"GO42", ack=True, start=joined["offset"])   # the rest of the flood, then the marker
    stalled.close()
    fresh.close()


def test_leaving_or_rejoining_under_a_flood_never_cuts_a_frame(coda_server):
    """A sender stopped while the kernel is full was stopped inside a frame: the rest of
    the socket read as garbage ("Illegal frame") and every session on it was lost."""
    sid = coda_server.new_session()
    sock = coda_server.websocket(sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    sock.join(sid)
    coda_server.type(sid, "base64 -w 200 /dev/zero\r")
    expected = None
    for _ in range(25):
        time.sleep(0.05)  # the flood fills the socket: the server's sender waits inside a frame
        sock.send(type="join_session", session_id=sid)
        for _ in range(40):
            item = sock.receive()   # a cut frame raises here
            if item[0] == "event" and item[1].get("type") == "joined":
                expected = item[1]["offset"]
            elif item[0] == "output" and expected is not None:
                assert item[2] == expected, "after `joined`, output starts at its offset and has no gap"
                expected += len(item[3])
    sock.send(type="terminal_input", session_id=sid, input="\x03")
    sock.close()
    coda_server.close_session(sid)


def test_input_is_not_held_back_by_output_on_the_same_socket(coda_server):
    flood, quiet = coda_server.new_session(), coda_server.new_session()
    sock = coda_server.websocket()
    sock.join(flood, since=0)
    sock.join(quiet, since=0)
    sock.send(type="terminal_input", session_id=flood, input="yes | head -c 30000000\r")
    sock.send(type="terminal_input", session_id=quiet, input="echo QUIET$((9*9))\r")
    seen, acks, deadline = b"", {}, time.time() + 30
    while b"QUIET81\r\n" not in seen:
        assert time.time() < deadline
        item = sock.receive()
        if item[0] != "output":
            continue
        _, session_id, offset, payload = item
        if session_id == quiet:
            seen += payload
        else:
            sock.send(type="ack", session_id=flood, offset=offset + len(payload))
    sock.close()
    coda_server.close_session(flood)
    coda_server.close_session(quiet)



BESIDE_TYPING = 96 * 1024  # coda.BESIDE_TYPING
FLOW_HIGH = 512 * 1024     # the default CODA_FLOW_HIGH


class FloodBesideTyping:
    """One socket, two sessions: `yes` floods one (acked as it comes) until the other is typed
    into; from then on the flood is not acked, so what it sends is its budget beside typing."""

    def __init__(self, server, pong_delay=0.0):
        self.server = server
        self.flood, self.quiet = server.new_session(), server.new_session()
        self.sock = sock = server.websocket()
        if pong_delay:  # a distant link: every pong arrives that much later
            answer = sock.ws.pong
            sock.ws.pong = lambda payload: threading.Timer(pong_delay, answer, (payload,)).start()
        self.flood_end, self.quiet_seen, self.deadline = 0, b"", time.time() + 20
        sock.join(self.flood, since=0)
        sock.join(self.quiet, since=0)
        sock.send(type="ack", session_id=self.flood, offset=0)
        sock.send(type="terminal_input", session_id=self.flood, input="yes\r")

    def take(self):
        assert time.time() < self.deadline
        item = self.sock.receive()
        if item[0] == "output" and item[1] == self.flood:
            self.flood_end = item[2] + len(item[3])
        elif item[0] == "output":
            self.quiet_seen += item[3]

    def unacked_while_typing(self):
        while self.flood_end < 1024 * 1024:  # flowing, acked as it comes
            self.take()
            self.sock.send(type="ack", session_id=self.flood, offset=self.flood_end)
        self.sock.send(type="terminal_input", session_id=self.quiet, input="TYPED")  # the terminal echoes it
        while b"TYPED" not in self.quiet_seen:
            self.take()
            self.sock.send(type="ack", session_id=self.flood, offset=self.flood_end)
        self.acked = self.flood_end  # from here on the flood is not acked, while typing goes on
        self.sock.ws.settimeout(0.2)
        for _ in range(6):
            self.sock.send(type="terminal_input", session_id=self.quiet, input=" ")
            with contextlib.suppress(websocket.WebSocketTimeoutException):
                while True:
                    self.take()
        return self.flood_end - self.acked

    def close(self):
        self.sock.close()
        self.server.close_session(self.flood)
        self.server.close_session(self.quiet)


def test_beside_a_session_being_typed_into_a_flood_keeps_little_unacked(coda_server):
    """Fair sharing of one socket: while a session is typed into, another session's output
    waits for its acks past a small budget instead of filling the flow-control window, so
    the typed session's echo never queues behind hundreds of KiB; once typing stops, the
    flood has its whole window again."""
    run = FloodBesideTyping(coda_server)
    assert run.unacked_while_typing() <= BESIDE_TYPING, "the flood filled its window beside a typed session"
    run.deadline = time.time() + 10
    run.sock.ws.settimeout(5)
    while run.flood_end - run.acked <= BESIDE_TYPING:  # typing stopped: the flood has its whole window again
        run.take()
    run.close()


def test_on_a_distant_link_the_budget_beside_typing_grows_with_the_round_trip(coda_server):
    """The server pings at each join (and every 25 s); a client whose pongs come
    200 ms late has a distant link, and a flood beside its typing may keep what that
    round trip carries unacked (more than the nearby budget, within the window), so it
    still fills the link."""
    run = FloodBesideTyping(coda_server, pong_delay=0.2)
    unacked = run.unacked_while_typing()
    assert BESIDE_TYPING < unacked <= FLOW_HIGH + 64 * 1024, unacked
    run.close()


def wait_for_sleep(server, session_id, marker):
    """Start `stty raw -echo; sleep 8` (a program that reads nothing) once the shell has shown `marker`."""
    server.type(session_id, f"echo {marker}$((1+1)); stty raw -echo; sleep 8\r")
    server.read_until(session_id, f"{marker}2")
    wait_for(lambda: [s for s in server.get("/api/sessions").json() if s["session_id"] == session_id][0]["process"] == "sleep",
             what="sleep in the foreground")


def test_a_session_that_reads_nothing_stalls_only_itself_on_the_socket(coda_server):
    stuck, quiet = coda_server.new_session(), coda_server.new_session()
    sock = coda_server.websocket()
    sock.join(quiet, since=0)
    wait_for_sleep(coda_server, stuck, "STUCK")
    sock.send(type="terminal_input", session_id=stuck, input="x" * 600 * 1024)
    started = time.time()
    sock.send(type="terminal_input", session_id=quiet, input="echo QUIET$((9*9))\r")
    sock.collect(quiet, b"QUIET81\r\n", timeout=3)  # the stuck session's sleep lasts 8 s
    assert time.time() - started < 3

    errors = []
    for _ in range(10):  # 4 MiB may wait for a session: the 7th paste of 600 KiB is one too many
        sock.send(type="terminal_input", session_id=stuck, input="y" * 600 * 1024)
        sock.send(type="dance")  # answered with an error once every message before it is handled
        while True:
            item = sock.receive()
            if item[0] == "event" and item[1]["type"] == "error":
                if "dance" in item[1]["message"]:
                    break
                errors.append(item[1])
        if errors:
            break
    [error] = errors
    assert error["session_id"] == stuck and "not reading its input" in error["message"]
    sock.send(type="terminal_input", session_id=quiet, input="echo AFTER$((6*7))\r")
    sock.collect(quiet, b"AFTER42\r\n", timeout=3)
    sock.close()
    coda_server.close_session(stuck)
    coda_server.close_session(quiet)


def test_long_poll_input_is_queued_not_written_and_overflow_is_429(coda_server):
    stuck, quiet = coda_server.new_session(), coda_server.new_session()
    gate = coda_server.home / f"gate-{stuck}"
    accepted = 6 * 600 * 1024  # 4 MiB may wait for a session: the 7th paste of 600 KiB is one too many
    coda_server.type(stuck, f"stty raw -echo; echo GATE$((1+1)); until [ -e {gate} ]; do sleep 0.1; done; "
                            f"head -c {accepted} | md5sum\r")
    coda_server.read_until(stuck, "GATE2")
    pastes, statuses = [], []
    for letter in "abcdefghij":
        paste = letter * 600 * 1024
        started = time.time()
        answer = coda_server.post("/api/input", {"session_id": stuck, "input": paste}, timeout=5)
        assert time.time() - started < 3  # it is queued, not written to a PTY nobody reads
        statuses.append(answer.status_code)
        if answer.status_code != 200:
            break
        pastes.append(paste)
    assert statuses == [200] * 6 + [429]
    assert "not reading its input" in answer.json()["error"]
    coda_server.wait_prompt(quiet)  # the other session is unaffected
    gate.touch()  # now the program reads: what was queued arrives whole and in order
    coda_server.read_until(stuck, hashlib.md5("".join(pastes).encode()).hexdigest(), timeout=30)
    coda_server.close_session(stuck)
    coda_server.close_session(quiet)


def test_input_keeps_its_order_across_websocket_and_long_poll(coda_server):
    sid = coda_server.new_session()
    sock = coda_server.websocket()
    coda_server.type(sid, "echo GO$((1+1)); stty raw -echo; sleep 1; head -c 2000000 | md5sum\r")
    coda_server.read_until(sid, "GO2")
    chunks = [(f"{i:06d}" * 20000)[:100000] for i in range(20)]
    for i, chunk in enumerate(chunks):
        if i % 2:
            coda_server.type(sid, chunk)
        else:
            sock.send(type="terminal_input", session_id=sid, input=chunk)
            sock.send(type="dance")  # its error answer says the input before it is queued
            while not (lambda item: item[0] == "event" and "dance" in item[1].get("message", ""))(sock.receive()):
                pass
    digest = hashlib.md5("".join(chunks).encode()).hexdigest()
    coda_server.read_until(sid, digest, timeout=30)
    sock.close()
    coda_server.close_session(sid)

# --- PROTOCOL: HTTP endpoints (upload) --------------------------------------------

def test_upload_stays_in_uploads_with_a_clean_name(coda_server):
    answer = coda_server.post("/api/upload", files={"file": ("../../etc/passwd", b"root:x:0:0")}, headers=coda_server.headers)
    assert answer.status_code == 200
    path = Path(answer.json()["path"])
    assert path.parent == coda_server.home / "uploads" and path.name.endswith("_passwd")
    assert path.read_bytes() == b"root:x:0:0" and oct(path.stat().st_mode & 0o777) == "0o600"
    image = coda_server.post("/api/upload", files={"file": ("shot 1.png", b"\x89PNG...")}, headers=coda_server.headers)
    assert Path(image.json()["path"]).name.endswith("_shot_1.png")
    missing = coda_server.post("/api/upload", data=b"x", headers=coda_server.headers)
    assert missing.status_code == 400


def test_upload_over_the_limit_is_413(start_coda):
    server = start_coda({"CODA_MAX_UPLOAD_BYTES": "1000"})
    answer = server.post("/api/upload", files={"file": ("a.bin", b"x" * 2000)}, headers=server.headers)
    assert answer.status_code == 413
    assert answer.json()["error"] == "Uploads are limited to 1000 bytes (CODA_MAX_UPLOAD_BYTES)."
    big = server.post("/api/upload", files={"file": ("a.bin", b"x" * 200_000)}, headers=server.headers)
    assert big.status_code == 413
    assert not (server.home / "uploads").exists() or list((server.home / "uploads").glob("*")) == []


# --- PROTOCOL: Shutdown -----------------------------------------------------------

def test_sigterm_tells_clients_and_leaves_no_process_behind(start_coda):
    server = start_coda()
    sid = server.new_session()
    pid = shell_pid(server, sid)
    server.type(sid, "sleep 400 & (trap '' HUP; sleep 401) & echo B$((1))G\r")
    server.read_until(sid, "B1G\r\n")
    sock = server.websocket()
    sock.join(sid)
    _, offset = server.read_until(sid, "B1G\r\n")
    poll_result = {}

    def poll():
        poll_result["answer"] = server.api("/api/output", {"session_id": sid, "since": offset + 10**6, "wait": 20})

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    events = []
    try:
        while True:
            item = sock.receive()
            if item[0] == "event":
                events.append(item[1]["type"])
                if "shutting_down" in events:
                    break
    except websocket.WebSocketException:
        pass
    assert "shutting_down" in events
    poller.join(15)
    assert poll_result["answer"]["shutting_down"] is True
    server.proc.wait(12)
    assert time.time() - started < 10
    assert processes_in_session(pid) == []
    assert server.proc.returncode == 0


def test_no_token_in_logs(coda_server):
    coda_server.get(f"/?token={TOKEN}")
    assert TOKEN not in coda_server.log()


def test_open_connections_are_capped(start_coda):
    server = start_coda()
    fds = lambda: len(os.listdir(f"/proc/{server.proc.pid}/fd"))
    before = fds()
    cap = 128  # coda.MAX_CONNECTIONS
    sockets = []
    try:
        for _ in range(cap + 60):  # each sends half a request and waits
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /api/version HTTP/1.1\r\n")
            sockets.append(sock)
        wait_for(lambda: fds() - before >= cap - 10, timeout=8, what="the server to take its fill of connections")
        time.sleep(0.5)
        assert fds() - before <= cap + 10  # the rest wait in the kernel's backlog (10: other files come and go)
    finally:
        for sock in sockets:
            sock.close()
    assert server.get("/api/version").status_code == 200
