"""Shared fixtures: the real coda.py in a subprocess on 127.0.0.1.

`coda_server` is one server for a whole test module; `start_coda(**env)`
starts a private one for tests that need their own settings or kill it.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import websocket

from fake_workspace import FakeWorkspace

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789abcdef"


def free_port():
    return free_ports(1)[0]


def free_ports(count):
    """`count` distinct free ports: held open together while they are picked, so that two picks
    in a row never name the same port (a CoDA whose proxy port was its own port answered 403)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for(condition, timeout=20, step=0.05, what="the condition"):
    """The first truthy value of condition(), polled for at most `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Coda:
    """A running coda.py, with small helpers that speak PROTOCOL.md."""

    def __init__(self, home, env=None, args=()):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port, proxy_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = TOKEN
        environment = {k: v for k, v in os.environ.items()
                       if not k.startswith(("DATABRICKS_", "CODA_", "APP_", "MLFLOW_"))}
        environment.update(HOME=str(self.home), CODA_TOKEN=TOKEN, CODA_INSTALL="0", PYTHONUNBUFFERED="1",
                           CODA_PROXY_PORT=str(proxy_port))
        environment.update(env or {})
        if environment.get("CODA_TOKEN") is None:
            environment.pop("CODA_TOKEN")
        self.proxy_port = int(environment["CODA_PROXY_PORT"])
        self.log_path = self.home / "coda.log"
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "coda.py"), "--host", "127.0.0.1", "--port", str(self.port), *args],
                                     env=environment, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT))
        try:
            self.wait_healthy()
        except BaseException:
            self.proc.kill()  # never leave a server behind a failed start
            self.proc.wait()
            raise

    def wait_healthy(self, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coda.py exited early:\n{self.log()}")
            try:
                requests.get(self.url + "/health", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"coda.py did not answer /health:\n{self.log()}")

    def log(self):
        return self.log_path.read_text(errors="replace")

    @property
    def headers(self):
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path, **kw):
        kw.setdefault("headers", self.headers)
        return requests.get(self.url + path, timeout=kw.pop("timeout", 40), **kw)

    def post(self, path, body=None, **kw):
        kw.setdefault("headers", self.headers)
        return requests.post(self.url + path, json=body, timeout=kw.pop("timeout", 40), **kw)

    def api(self, path, body=None):
        answer = self.post(path, body)
        assert answer.status_code == 200, (path, answer.status_code, answer.text)
        return answer.json()

    def new_session(self, **body):
        return self.api("/api/session", body)["session_id"]

    def type(self, session_id, text):
        self.api("/api/input", {"session_id": session_id, "input": text})

    def read_until(self, session_id, marker, since=0, timeout=15):
        """Long-poll output from `since` until `marker` appears; returns (text, next_offset)."""
        text, offset, deadline = "", since, time.time() + timeout
        while marker not in text:
            assert time.time() < deadline, f"{marker!r} not seen in {text[-2000:]!r}"
            answer = self.api("/api/output", {"session_id": session_id, "since": offset, "wait": 2})
            text += answer["output"]
            offset = answer["next_offset"]
        return text, offset

    def wait_prompt(self, session_id, since=0):
        """Run a marker command and return the offset after its output."""
        self.type(session_id, "echo READY$((40+2))\r")
        return self.read_until(session_id, "READY42\r\n", since=since)[1]

    def close_session(self, session_id):
        self.api("/api/session/close", {"session_id": session_id})

    def websocket(self, **kw):
        return Socket(self, **kw)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


class Socket:
    """A /ws client: JSON control messages out, binary frames and JSON events in."""

    def __init__(self, coda, headers=None, **kw):
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{coda.port}/ws", timeout=kw.pop("timeout", 20),
            header=headers if headers is not None else [f"Authorization: Bearer {coda.token}"], **kw)
        self.events = []

    def send(self, **message):
        self.ws.send(json.dumps(message))

    def receive(self, pings=False):
        """('output', session_id, offset, payload) or ('event', dict); with pings, also ('ping',)
        (answered already): for a caller that saw the socket readable and must not block then."""
        opcode, data = self.ws.recv_data(control_frame=pings)
        if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
            return ("ping",)
        if opcode == websocket.ABNF.OPCODE_BINARY:
            assert data[0] == 0x01
            offset = struct.unpack(">Q", data[1:9])[0]
            n = data[9]
            return "output", data[10:10 + n].decode(), offset, data[10 + n:]
        return "event", json.loads(data)

    def join(self, session_id, since=None):
        message = {"type": "join_session", "session_id": session_id}
        if since is not None:
            message["since"] = since
        self.send(**message)
        while True:
            item = self.receive()
            if item[0] == "event" and item[1].get("type") == "joined":
                return item[1]
            self.events.append(item)

    def collect(self, session_id, marker, timeout=20, ack=False, start=None):
        """Output bytes of one session until `marker` appears (checking offsets are contiguous)."""
        data, expected, deadline = bytearray(), start, time.time() + timeout
        self.ws.settimeout(timeout)
        acked = 0
        while marker not in data[-len(marker) - 256 * 1024:] if len(data) > 1_000_000 else marker not in data:
            assert time.time() < deadline, f"{marker!r} not seen; got {bytes(data[-300:])!r}"
            item = self.receive()
            if item[0] != "output" or item[1] != session_id:
                self.events.append(item)
                continue
            _, _, offset, payload = item
            if expected is not None:
                assert offset == expected, f"offset gap: expected {expected}, got {offset}"
            expected = offset + len(payload)
            data += payload
            if ack and expected - acked >= 64 * 1024:
                self.send(type="ack", session_id=session_id, offset=expected)
                acked = expected
        return bytes(data), expected

    def close(self):
        self.ws.close()


@pytest.fixture
def workspace():
    """A fake Databricks workspace on 127.0.0.1 for one test (tests/fake_workspace.py)."""
    fake = FakeWorkspace().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def coda_server(tmp_path_factory):
    server = Coda(tmp_path_factory.mktemp("home"), {"MAX_CONCURRENT_SESSIONS": "100"})
    yield server
    server.stop()


@pytest.fixture
def start_coda(tmp_path):
    started = []

    def start(env=None, args=(), home=None):
        server = Coda(home or tmp_path / f"home{len(started)}", env, args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL)
