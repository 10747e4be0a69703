"""Hostile input for every HTTP route and WebSocket message type (hypothesis; PROTOCOL: Errors).

The bar: no 5xx, every error a JSON {"error": "<one sentence>"}, the socket kept
open for a bad (but well-framed) message, and a server log with no traceback,
no internal error and nothing token-shaped. One server for the module, whose
terminals run `cat` so random input cannot run commands.
"""

import json
import re
import socket
import time
import urllib.parse

import pytest
import requests
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TOKEN, Coda

FAKE_PAT = "dapi" + "0123456789abcdef" * 2  # sent in odd places: must never reach the log
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    coda = Coda(tmp_path_factory.mktemp("fuzz"), {"CODA_SHELL": "/bin/cat", "MAX_CONCURRENT_SESSIONS": "20"})
    coda.known = [coda.new_session(label="fuzz") for _ in range(2)]
    yield coda
    coda.stop()
    log = coda.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert TOKEN not in log and FAKE_PAT not in log


@pytest.fixture(scope="module")
def http(server):
    with requests.Session() as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        yield client


# --- values -----------------------------------------------------------------------

HOSTILE_NUMBERS = st.sampled_from([float("nan"), float("inf"), float("-inf"), -1, -1e308, 1e308, 2 ** 53, 2 ** 63,
                                   10 ** 40, -(10 ** 40), 0.5, -0.0, True, False])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=40),
                    HOSTILE_NUMBERS, st.just(FAKE_PAT))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                    st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                    max_leaves=12)


def session_ids(server):
    return st.one_of(st.sampled_from(server.known), st.text(max_size=80), JSON)


def body_for(fields, server):
    """A JSON object with some of `fields`, each a plausible or a hostile value, and maybe a stray key."""
    values = {"session_id": session_ids(server), "session_ids": st.one_of(st.lists(session_ids(server), max_size=4), JSON),
              "since": st.one_of(st.integers(-5, 10 ** 7), HOSTILE_NUMBERS, JSON),
              "wait": st.one_of(st.sampled_from([0, 0.01, None]), HOSTILE_NUMBERS, st.text(max_size=5)),
              "cols": st.one_of(st.integers(-5, 2000), HOSTILE_NUMBERS, JSON),
              "rows": st.one_of(st.integers(-5, 2000), HOSTILE_NUMBERS, JSON),
              "label": st.one_of(st.text(max_size=200), JSON),
              "input": st.one_of(st.text(max_size=50), st.just("\ud800"), st.just("\udcff"), JSON),
              "token": st.one_of(st.just(FAKE_PAT), st.text(max_size=20), JSON),
              "replace": st.one_of(st.booleans(), JSON),
              "agent": st.one_of(st.sampled_from(["shell", "claude", "hermes", "nope"]), st.text(max_size=300), JSON),
              "project": st.one_of(st.sampled_from(["", ".", "..", "../x", "a/b", "\u00e9" * 200]), st.text(max_size=300), JSON)}
    chosen = st.fixed_dictionaries({}, optional={name: values[name] for name in fields})
    return st.tuples(chosen, st.dictionaries(st.text(max_size=8), JSON, max_size=2)).map(lambda t: {**t[1], **t[0]})


def raw_bodies():
    return st.one_of(st.binary(max_size=200), st.sampled_from([
        b"", b"null", b"[]", b"NaN", b'{"wait": NaN}', b'{"since": Infinity}', b"\xff\xfe{}", b'{"a": "\xff"}',
        b"[" * 100000 + b"]" * 100000, b'{"session_id": "' + b"x" * 100 + b'"', b"1e99999"]))


def check_answer(answer):
    """No 5xx; JSON with application/json; an error is one sentence."""
    assert answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert answer.headers.get("Content-Type", "").split(";")[0] == "application/json", answer.headers
    data = answer.json()
    if answer.status_code >= 400:
        assert isinstance(data.get("error"), str) and data["error"].endswith("."), data
    return data


# --- HTTP routes ------------------------------------------------------------------

ROUTES = {  # path: the fields its body may carry
    "/api/session/attach": ("session_id", "since"),
    "/api/session/label": ("session_id", "label"),
    "/api/session/close": ("session_id",),
    "/api/input": ("session_id", "input"),
    "/api/resize": ("session_id", "cols", "rows"),
    "/api/output": ("session_id", "since", "wait"),
    "/api/output-batch": ("session_ids", "since", "wait"),
    "/api/heartbeat": ("session_id", "session_ids"),
    "/api/configure-pat": ("token", "replace"),
}


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_json_routes_survive_hostile_bodies(server, http, path):
    @FUZZ
    @given(body=body_for(ROUTES[path], server), form=st.sampled_from(["json", "json", "raw"]), raw=raw_bodies())
    def run(body, form, raw):
        if path == "/api/session/close" and body.get("session_id") in server.known:
            body["session_id"] += "-not"  # keep the module's sessions
        data = json.dumps(body, allow_nan=True).encode() if form == "json" else raw
        check_answer(http.post(server.url + path, data=data, timeout=40))

    run()


def test_session_creation_survives_hostile_bodies(server, http):
    @settings(FUZZ, max_examples=60)
    @given(body=body_for(("label", "cols", "rows", "agent", "project"), server))
    def run(body):
        data = check_answer(http.post(server.url + "/api/session", data=json.dumps(body, allow_nan=True), timeout=40))
        if "session_id" in data:
            check_answer(http.post(server.url + "/api/session/close", json={"session_id": data["session_id"]}))

    run()


def test_upload_survives_hostile_forms(server, http):
    @settings(FUZZ, max_examples=60)
    @given(name=st.text(max_size=120), content=st.binary(max_size=300), field=st.sampled_from(["file", "other"]),
           content_type=st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=", "text/plain",
                                         "application/json", "multipart/form-data; boundary=x"]),
           raw=st.binary(max_size=300), form=st.booleans())
    def run(name, content, field, content_type, raw, form):
        if form:
            answer = http.post(server.url + "/api/upload", files={field: (name, content)}, timeout=40)
        else:
            answer = http.post(server.url + "/api/upload", data=raw, headers={"Content-Type": content_type}, timeout=40)
        data = check_answer(answer)
        if answer.status_code == 200:
            assert data["path"].startswith(str(server.home / "uploads"))

    run()


def test_get_routes_and_wrong_methods(server, http):
    for path in ("/api/sessions", "/api/version", "/api/pat-status", "/api/app-state", "/api/setup-status", "/health"):
        check_answer(http.get(server.url + path))
        for method in ("PUT", "DELETE", "PATCH"):
            assert http.request(method, server.url + path).status_code == 405
    for path in ROUTES:
        answer = http.get(server.url + path)
        check_answer(answer)
        assert answer.status_code == 405


def raw_request(server, request, timeout=15):
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # it answered, then closed on the rest of a request it would not read
    return answer


HEADER_NAMES = st.sampled_from(["Origin", "Host", "Cookie", "Authorization", "Content-Length", "Transfer-Encoding",
                                "Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "X-Forwarded-Host",
                                "X-Forwarded-Email", "Content-Type", "X-Odd"])
HEADER_VALUES = st.one_of(st.text(st.characters(min_codepoint=32, max_codepoint=255, blacklist_characters="\x7f"),
                                  max_size=60),
                          st.sampled_from(["http://[", "http://127.0.0.1:1", "websocket", "Upgrade", "chunked", "-1",
                                           "99999999999999999999", f"Bearer {FAKE_PAT}", f"coda_1={FAKE_PAT}", "13"]))
PATHS = st.one_of(
    st.sampled_from(["/", "/ws", "/health", "//evil.example/", "/\\evil", "/%0d%0a", "/%00", "/%ff%fe", "/static/../coda.py",
                     "/static/%2e%2e/coda.py", "/api/../health", f"/?token={FAKE_PAT}", "/api/sessions?x=%zz", "*"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(lambda p: "/" + p),
    st.binary(max_size=30).map(lambda b: "/" + "".join(f"%{x:02x}" for x in b)))


@settings(FUZZ, max_examples=200)
@given(method=st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PUT", "BREW", "G\x00T"]), path=PATHS,
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1", "HTTP/2.0", "HTTP/x", ""]),
       headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4), authorized=st.booleans(),
       body=st.binary(max_size=50))
def test_odd_request_lines_paths_and_headers(server, method, path, version, headers, authorized, body):
    lines = [f"{method} {path} {version}".rstrip(), "Host: 127.0.0.1"]
    if authorized:
        lines.append(f"Authorization: Bearer {TOKEN}")
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in ("connection", "content-length")]
    lines += ["Connection: close", f"Content-Length: {len(body)}"]
    answer = raw_request(server, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    if not answer:
        return  # closed without an answer (nothing could be parsed): acceptable
    if not answer.startswith(b"HTTP/"):
        return  # an HTTP/0.9 request gets a bare body, no status line
    head, _, content = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert status < 500, answer[:400]
    if status == 403 and method == "GET" and urllib.parse.urlsplit(path).path == "/" and not authorized:
        assert b"text/html" in head.lower() and TOKEN.encode() not in answer  # a browser's refusal page
        return
    if status >= 400 and method != "HEAD" and status != 426:
        assert b"application/json" in head.lower(), answer[:400]
        assert json.loads(content)["error"].endswith(".")


# --- WebSocket --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ws(server):
    sock = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws", timeout=20,
                                       header=[f"Authorization: Bearer {TOKEN}"])
    yield sock
    sock.close()


def replies_until_sync(ws, marker):
    """The JSON replies up to the error that answers our marker (output frames are skipped)."""
    replies = []
    while True:
        opcode, data = ws.recv_data()
        assert opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY), (opcode, data)
        if opcode == websocket.ABNF.OPCODE_BINARY:
            continue
        reply = json.loads(data)
        if marker in reply.get("message", ""):
            return replies
        replies.append(reply)


WS_TYPES = st.one_of(st.sampled_from(["join_session", "leave_session", "terminal_input", "terminal_resize", "ack",
                                      "heartbeat", "nope"]), JSON)


@settings(FUZZ, max_examples=300)
@given(kind=WS_TYPES, form=st.sampled_from(["json", "json", "json", "text", "binary"]),
       raw=st.one_of(st.text(max_size=100), st.sampled_from(["NaN", '{"type": "ack", "offset": NaN}', "[" * 5000,
                                                             '{"type": {"a": 1}}', "null", "1e99999"])),
       data=st.data())
def test_websocket_messages_survive_and_keep_the_socket(server, ws, kind, form, raw, data):
    fields = data.draw(body_for(("session_id", "session_ids", "since", "input", "cols", "rows"), server))
    if "offset" not in fields and data.draw(st.booleans()):
        fields["offset"] = data.draw(st.one_of(st.integers(-5, 10 ** 7), HOSTILE_NUMBERS, JSON))
    message = {**fields, "type": kind}
    if form == "json":
        ws.send(json.dumps(message, allow_nan=True))
    elif form == "text":
        ws.send(raw)
    else:
        ws.send_binary(raw.encode())
    marker = f"sync-{time.monotonic_ns()}"
    ws.send(json.dumps({"type": marker}))
    for reply in replies_until_sync(ws, marker):
        assert isinstance(reply.get("type"), str), reply
        if reply["type"] == "error":
            assert isinstance(reply["message"], str) and reply["message"].endswith("."), reply


def test_invalid_utf8_and_oversized_frames_close_cleanly(server):
    sock = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws", timeout=20,
                                       header=[f"Authorization: Bearer {TOKEN}"])
    sock.send(b"{\"type\": \"\xff\"}", opcode=websocket.ABNF.OPCODE_TEXT)
    opcode, data = sock.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1007
    sock.close()
    sock = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws", timeout=20,
                                       header=[f"Authorization: Bearer {TOKEN}"])
    sock.send("x" * (1024 * 1024 + 1))
    opcode, data = sock.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == 1009
    sock.close()
    assert requests.get(server.url + "/health").status_code == 200


def test_oversized_bodies_are_refused_without_being_read_whole(server, http):
    big = b'{"input": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    for body in (big, iter([big[i:i + 65536] for i in range(0, len(big), 65536)])):  # sized, then chunked
        answer = http.post(server.url + "/api/input", data=body, timeout=40)
        assert answer.status_code == 413 and check_answer(answer)["error"]
    chunked = http.post(server.url + "/api/upload", data=iter([b"--x\r\n"] * 10), timeout=40,
                        headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 411 and check_answer(chunked)["error"]
