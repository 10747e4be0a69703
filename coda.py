#!/usr/bin/env python3
"""CoDA: coding agents in the browser.

Real terminals (xterm.js over PTYs) served by one process on gevent
greenlets, hosted as a Databricks App or run locally:

    python coda.py                 # http://127.0.0.1:8000/?token=...
    python coda.py --help          # flags and subcommands

The wire contract is PROTOCOL.md (kept beside the project, summarised in the
README). This module is the whole backend; its sections, in reading order:

Contents
     1. Configuration   every environment variable, in one frozen dataclass
     2. Logging         one logger; a filter redacts anything token-shaped
     3. Access          who may pass: local token or Databricks owner, Origin/Host
     4. Output streams  the byte ring with offsets and UTF-8-safe text slices
     5. Sessions        PTY, process group, reader greenlet, flow control;
                        the manager with the cap, the idle reaper and shutdown
     6. HTTP API        thin routes: validate, call the manager, answer JSON
     7. WebSocket       one handler per socket, one sender greenlet per session
     8. Databricks      owner, gateway discovery, PAT lifecycle
     9. Agents          one config writer per CLI, driven by a table
    10. Setup           the step list and its runner
    11. Local proxy     token-injecting, request-repairing proxy for agents
    12. Tracing, sync   MLflow hooks; post-commit workspace sync
    13. Command line    `python coda.py` serves; subcommands for hooks
"""

if __name__ == "__main__":  # patch before anything imports socket or threading
    from gevent import monkey

    monkey.patch_all(subprocess=False)  # setup imports gevent.subprocess when it needs it

import argparse
import collections
import dataclasses
import errno
import fcntl
import hmac
import json
import logging
import os
import re
import secrets
import signal
import struct
import sys
import termios
import time
import urllib.parse
from pathlib import Path

import bottle
import gevent
import gevent.event
import gevent.lock
from gevent import monkey as _monkey
from gevent.pywsgi import WSGIHandler, WSGIServer
from geventwebsocket import handler as _ws_handler
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.websocket import Header, WebSocket

__version__ = "0.1.0"
HERE = Path(__file__).resolve().parent

# ===========================================================================
# 1. Configuration
# ===========================================================================

KIB, MIB = 1024, 1024 * 1024
CONFIG_WARNINGS = []  # logged once logging exists


def _env_int(env, name, default, low=1):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low:
        CONFIG_WARNINGS.append(f"{name}={raw!r} is not a whole number >= {low}; using {default}")
        return default
    return value


def _env_flag(env, name, default):
    raw = env.get(name, "").strip().lower()
    return default if not raw else raw not in ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Config:
    port: int                  # DATABRICKS_APP_PORT, else PORT, else 8000
    host: str                  # 0.0.0.0 inside Databricks Apps, else 127.0.0.1
    app_name: str              # DATABRICKS_APP_NAME: set means Databricks Apps mode
    app_owner: str             # APP_OWNER: the one user allowed in, overriding the app's creator
    local_token: str | None    # CODA_TOKEN: None = make one up; "" = local auth off
    allowed_origins: tuple     # CODA_ALLOWED_ORIGINS: extra origins (comma list) allowed to POST/upgrade
    home: Path                 # HOME: where projects, uploads and agent configs live
    shell: str                 # CODA_SHELL: the terminal's shell (default /bin/bash, else /bin/sh)
    scrollback_bytes: int      # CODA_SCROLLBACK_BYTES: output kept per session (default 2 MiB)
    max_sessions: int          # MAX_CONCURRENT_SESSIONS: live sessions at once (default 5)
    session_timeout: int       # SESSION_TIMEOUT_SECONDS: idle time before a session is closed (default 1 day)
    flow_high: int             # CODA_FLOW_HIGH: lag at which a PTY stops being read (default 512 KiB)
    flow_low: int              # CODA_FLOW_LOW: lag at which it is read again (default 128 KiB)
    max_upload_bytes: int      # CODA_MAX_UPLOAD_BYTES: largest upload (default 32 MiB)
    install: bool              # CODA_INSTALL: 0 skips the setup steps that install software

    @classmethod
    def from_env(cls, env=os.environ):
        app_name = env.get("DATABRICKS_APP_NAME", "").strip()
        port = _env_int(env, "DATABRICKS_APP_PORT", 0) or _env_int(env, "PORT", 8000)
        shell = env.get("CODA_SHELL", "").strip() or "/bin/bash"
        if not os.access(shell, os.X_OK):
            CONFIG_WARNINGS.append(f"CODA_SHELL {shell} is not executable; using /bin/sh")
            shell = "/bin/sh"
        low = _env_int(env, "CODA_FLOW_LOW", 128 * KIB)
        high = _env_int(env, "CODA_FLOW_HIGH", 512 * KIB)
        if low >= high:
            CONFIG_WARNINGS.append("CODA_FLOW_LOW must be below CODA_FLOW_HIGH; using 128 KiB and 512 KiB")
            low, high = 128 * KIB, 512 * KIB
        return cls(
            port=port,
            host="0.0.0.0" if app_name else "127.0.0.1",
            app_name=app_name,
            app_owner=env.get("APP_OWNER", "").strip(),
            local_token=env.get("CODA_TOKEN"),
            allowed_origins=tuple(o.strip().rstrip("/") for o in env.get("CODA_ALLOWED_ORIGINS", "").split(",") if o.strip()),
            home=Path(env.get("HOME") or Path.home()),
            shell=shell,
            scrollback_bytes=_env_int(env, "CODA_SCROLLBACK_BYTES", 2 * MIB, low=1024),
            max_sessions=_env_int(env, "MAX_CONCURRENT_SESSIONS", 5),
            session_timeout=_env_int(env, "SESSION_TIMEOUT_SECONDS", 86400),
            flow_high=high,
            flow_low=low,
            max_upload_bytes=_env_int(env, "CODA_MAX_UPLOAD_BYTES", 32 * MIB),
            install=_env_flag(env, "CODA_INSTALL", True),
        )


CONFIG = Config.from_env()

# Limits of the wire contract.
MAX_INPUT_BYTES = 1 * MIB        # one /api/input or terminal_input
MAX_JSON_BODY = 8 * MIB          # a JSON body (1 MiB of input may escape to 6x)
MAX_WS_MESSAGE = 1 * MIB         # a client WebSocket message; larger closes with 1009
MAX_POLL_WAIT = 30.0             # seconds a long-poll may hold
POLL_SLICE = 1 * MIB             # bytes of output in one JSON answer
FRAME_SLICE = 256 * KIB          # bytes of output in one binary frame
READ_SIZE = 256 * KIB            # one PTY read
PING_SECONDS = 25                # WebSocket keep-alive, under the contract's 30 s
CLOSE_GRACE = 2.0                # SIGHUP to SIGKILL
EXITED_LINGER = 300              # an exited session stays readable this long

# ===========================================================================
# 2. Logging
# ===========================================================================

log = logging.getLogger("coda")
SECRETS = set()  # exact values to redact: the local token, minted tokens, ...

_TOKEN_SHAPES = re.compile(
    r"(dapi[0-9a-f]{16,}(-\d+)?"                          # Databricks PAT
    r"|dkea[0-9a-f]{16,}|dose[0-9a-f]{16,}"                # other Databricks tokens
    r"|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}"                 # JWT (OAuth access tokens)
    r"|sk-[A-Za-z0-9_-]{16,}"                              # API keys
    r"|(?i:bearer)\s+[\w.~+/=-]{8,}"                       # Authorization values
    r"|(?i:token|secret|password|api_key)=[^&\s\"']{4,})"  # query strings, env dumps
)


def redact(text):
    for secret in SECRETS:
        if len(secret) >= 8:  # shorter ones would shred ordinary words
            text = text.replace(secret, "[REDACTED]")
    return _TOKEN_SHAPES.sub("[REDACTED]", text)


class RedactingFilter(logging.Filter):
    """Rewrites every record so no token reaches a log line."""

    def filter(self, record):
        record.msg, record.args = redact(record.getMessage()), ()
        if record.exc_info:  # one line, never a traceback
            kind, error = record.exc_info[:2]
            record.msg += f" ({kind.__name__}: {redact(str(error))})"
            record.exc_info = record.exc_text = None
        return True


def setup_logging():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for warning in CONFIG_WARNINGS:
        log.warning(warning)


# ===========================================================================
# 3. Access
# ===========================================================================

COOKIE = "coda_token"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


class Access:
    """Decides who may pass. HTTP routes and the WebSocket upgrade both ask `denied`."""

    def __init__(self, config):
        self.config = config
        self.apps_mode = bool(config.app_name)
        self.bound_host = config.host  # serve() sets what --host chose
        self.token = config.local_token
        if not self.apps_mode and self.token is None:
            self.token = secrets.token_urlsafe(24)
        if self.token:
            SECRETS.add(self.token)
        self.owner = config.app_owner.lower() or None  # in Apps mode, filled from the Apps API otherwise
        self.owner_error = None if self.owner or not self.apps_mode else "app owner not resolved yet"

    def denied(self, environ):
        """Why this request may not pass, or None when it may."""
        if self.apps_mode:
            if not self.owner:
                return f"Access is closed until the app owner is known ({self.owner_error})."
            user = environ.get("HTTP_X_FORWARDED_EMAIL", "").strip().lower()
            if user != self.owner:
                return "Only the owner of this app may use it."
        else:
            host = _hostname(environ.get("HTTP_HOST", ""))
            if host not in LOCAL_HOSTS | {self.bound_host} | self._allowed_hosts():
                return "This host name is not allowed."
            if self.token and not self._token_ok(environ):
                return "A valid access token is required."
        if self._changes_state(environ) and not self._origin_ok(environ):
            return "Cross-origin requests are not allowed."
        return None

    def _token_ok(self, environ):
        offered = [urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("token", [""])[0]]
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip())
        offered.append(_cookie(environ, COOKIE))
        return any(o and hmac.compare_digest(o.encode(), self.token.encode()) for o in offered)

    @staticmethod
    def _changes_state(environ):
        return environ.get("REQUEST_METHOD") not in ("GET", "HEAD", "OPTIONS") or \
            environ.get("HTTP_UPGRADE", "").lower() == "websocket"

    def _origin_ok(self, environ):
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            return True  # not a browser's cross-site request
        netloc = urllib.parse.urlsplit(origin).netloc.lower()
        hosts = {environ.get("HTTP_HOST", "").lower()}
        if self.apps_mode:
            hosts.add(environ.get("HTTP_X_FORWARDED_HOST", "").lower())
        return (netloc and netloc in hosts) or origin.rstrip("/") in self.config.allowed_origins

    def _allowed_hosts(self):
        return {_hostname(urllib.parse.urlsplit(o).netloc) for o in self.config.allowed_origins}


def _hostname(host_header):
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


def _cookie(environ, name):
    for part in environ.get("HTTP_COOKIE", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


ACCESS = Access(CONFIG)

# ===========================================================================
# 4. Output streams
# ===========================================================================

CHUNK_BYTES = 64 * KIB  # small appends coalesce into chunks of about this size


class Stream:
    """One session's output: the last `limit` bytes, addressed by absolute offsets.

    Appends wake every waiter; readers keep their own offsets, so no reader
    ever drains another.
    """

    def __init__(self, limit):
        self.limit = limit
        self.chunks = collections.deque()  # [offset, bytearray], oldest first
        self.start = 0   # offset of the oldest kept byte
        self.end = 0     # offset just after the newest byte
        self.closed = False
        self._changed = gevent.event.Event()

    def append(self, data):
        if not data:
            return
        if self.chunks and len(self.chunks[-1][1]) < CHUNK_BYTES:
            self.chunks[-1][1] += data
        else:
            self.chunks.append([self.end, bytearray(data)])
        self.end += len(data)
        self.start = max(self.start, self.end - self.limit)
        while self.chunks[0][0] + len(self.chunks[0][1]) <= self.start:
            self.chunks.popleft()
        self.wake()

    def close(self):
        self.closed = True
        self.wake()

    def wake(self):
        """Wake everyone waiting on `changed()`."""
        event, self._changed = self._changed, gevent.event.Event()
        event.set()

    def changed(self):
        """An event set at the next append or close: take it before reading."""
        return self._changed

    def read(self, since, limit):
        """(offset, bytes, truncated): up to `limit` kept bytes from `since`."""
        truncated = since < self.start
        since = min(max(since, self.start), self.end)
        index = len(self.chunks) - 1
        while index > 0 and self.chunks[index][0] > since:
            index -= 1
        parts, wanted = [], min(limit, self.end - since)
        position = since
        while wanted > 0:
            chunk_start, chunk = self.chunks[index]
            piece = chunk[position - chunk_start:position - chunk_start + wanted]
            parts.append(piece)
            position += len(piece)
            wanted -= len(piece)
            index += 1
        return since, b"".join(parts), truncated

    def read_text(self, since, limit=POLL_SLICE):
        """(text, offset, next_offset, truncated), never splitting a UTF-8 character.

        A `since` inside a character starts at the next boundary; an
        incomplete character at the end waits for its remaining bytes.
        """
        offset, data, truncated = self.read(since, limit)
        skip = 0
        while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
            skip += 1
        cut = len(data) if self.closed else _complete_length(data)
        cut = max(cut, skip)
        return data[skip:cut].decode("utf-8", "replace"), offset + skip, offset + cut, truncated


def _complete_length(data):
    """Length of `data` without a trailing incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: keep looking for the lead
        needed = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
        return len(data) - back if needed > back else len(data)
    return len(data)


# ===========================================================================
# 5. Sessions
# ===========================================================================

SECRET_NAMES = {"DATABRICKS_TOKEN", "DATABRICKS_HOST", "DATABRICKS_CLIENT_ID",
                "DATABRICKS_CLIENT_SECRET", "CODA_TOKEN", "CLAUDECODE", "CLAUDE_CODE_SESSION"}
SECRET_SUFFIXES = ("_TOKEN", "_SECRET", "_PASSWORD", "_API_KEY")
_real_signal = _monkey.get_original("signal", "signal")


class ApiError(Exception):
    """A request that cannot be served: the status and one clear sentence."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def shell_environment(config, base=os.environ):
    """The environment a terminal starts with: ours, minus every secret."""
    env = {k: v for k, v in base.items()
           if k not in SECRET_NAMES and not k.upper().endswith(SECRET_SUFFIXES)}
    env.update(TERM="xterm-256color", COLORTERM="truecolor", HOME=str(config.home),
               CODA_VERSION=__version__)
    if not any(env.get(k) for k in ("LC_ALL", "LC_CTYPE", "LANG")):
        env["LANG"] = "C.UTF-8"
    local_bin = str(config.home / ".local" / "bin")
    path = [p for p in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":") if p and p != local_bin]
    env["PATH"] = ":".join([local_bin] + path)
    return env


def spawn_on_terminal(argv, env, cwd, slave):
    """Fork and exec `argv` as the leader of a new Unix session whose controlling
    terminal is `slave`, with every signal at its default. Returns the pid.

    gevent's fork watches the child, so os.waitpid on it waits cooperatively.
    """
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: no Python beyond this block, exec or exit
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    _real_signal(sig, signal.SIG_DFL)  # an ignored SIGINT would survive exec
                except (OSError, ValueError):
                    pass
        os.chdir(cwd)
        os.execve(argv[0], argv, env)
    except BaseException as error:
        os.write(2, f"coda: cannot start {argv[0]}: {error}\r\n".encode())
    finally:
        os._exit(127)


def _set_winsize(fd, cols, rows):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _session_members(sid):
    """PIDs of every process in the Unix session `sid` (Linux /proc), else just sid."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return [sid]
    members = []
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid:
                members.append(int(name))
    return members


def _signal_session(sid, sig):
    for pid in _session_members(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Subscriber:
    """A reader joined to a session, for flow control: acked or sent offset."""

    def __init__(self, position):
        self.position = position
        self.acking = False


class Session:
    """A shell on a PTY: its process group, its output stream and its reader."""

    def __init__(self, config, label, cols, rows):
        self.config = config
        self.id = secrets.token_hex(8)
        self.label = label
        self.created_at = self.last_activity = time.time()
        self.stream = Stream(config.scrollback_bytes)
        self.exit_code = None
        self.exited = gevent.event.Event()   # the shell has been reaped
        self.closing = False
        self.closed = gevent.event.Event()
        self.subscribers = set()
        self.http_cursor = 0          # /api/output without `since` continues here
        self._may_read = gevent.event.Event()
        self._may_read.set()
        self._write_lock = gevent.lock.Semaphore()
        projects = config.home / "projects"
        projects.mkdir(parents=True, exist_ok=True)
        master, slave = os.openpty()
        try:
            _set_winsize(master, cols, rows)
            self.pid = spawn_on_terminal([config.shell], shell_environment(config), projects, slave)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.fd = master
        hub = gevent.get_hub()
        self._readable = hub.loop.io(master, 1)
        self._writable = hub.loop.io(master, 2)
        self._reader = gevent.spawn(self._pump)
        gevent.spawn(self._await_exit)

    # -- output ------------------------------------------------------------
    def _pump(self):
        """The reader greenlet: PTY to stream, pausing while every client lags."""
        hub = gevent.get_hub()
        while self.fd is not None:
            self._may_read.wait()
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                hub.wait(self._readable)
                continue
            except (OSError, TypeError):
                return  # EIO: every holder of the terminal has closed it
            if not data:
                return
            self.stream.append(data)
            self.update_flow()

    def _await_exit(self):
        _, status = os.waitpid(self.pid, 0)
        self.exited.set()
        self._reader.join(timeout=1.0)  # the last output before the exit notice
        self.exit_code = os.waitstatus_to_exitcode(status)
        if self.exit_code < 0:  # killed by a signal: report it the way shells do
            self.exit_code = 128 - self.exit_code
        log.info("session %s exited with code %s", self.id, self.exit_code)
        self.stream.wake()

    def update_flow(self):
        """Pause reading while every subscriber lags past the high mark; resume under the low one."""
        if not self.subscribers:
            self._may_read.set()
            return
        lag = self.stream.end - max(s.position for s in self.subscribers)
        if self._may_read.is_set() and lag > self.config.flow_high:
            self._may_read.clear()
        elif not self._may_read.is_set() and lag < self.config.flow_low:
            self._may_read.set()

    def subscribe(self, position):
        subscriber = Subscriber(position)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber):
        self.subscribers.discard(subscriber)
        self.update_flow()

    # -- input -------------------------------------------------------------
    def write(self, data):
        """Keystrokes to the PTY, in order, waiting (not queueing) when it is full."""
        hub = gevent.get_hub()
        with self._write_lock:
            view = memoryview(data)
            while view:
                if self.fd is None:
                    raise ApiError(404, "Session not found.")
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:
                    hub.wait(self._writable)
                except OSError:
                    return  # the terminal is gone; the exit notice follows

    def resize(self, cols, rows):
        if self.fd is not None:
            _set_winsize(self.fd, cols, rows)

    # -- state -------------------------------------------------------------
    def touch(self):
        self.last_activity = time.time()

    def process_name(self):
        try:
            pgid = os.tcgetpgrp(self.fd)
            with open(f"/proc/{pgid}/comm") as f:
                return f.read().strip()
        except (OSError, TypeError):
            return Path(self.config.shell).name

    def describe(self):
        now = time.time()
        return {"session_id": self.id, "label": self.label, "created_at": self.created_at,
                "last_activity": self.last_activity, "idle_seconds": round(now - self.last_activity, 1),
                "process": self.process_name(), "offset": self.stream.end,
                "exited": self.exit_code is not None}

    # -- close -------------------------------------------------------------
    def close(self):
        """SIGHUP to the terminal's session, SIGKILL after a grace period, reap, close the fd once."""
        if self.closing:
            self.closed.wait()
            return
        self.closing = True
        _signal_session(self.pid, signal.SIGHUP)
        self.exited.wait(timeout=CLOSE_GRACE)
        _signal_session(self.pid, signal.SIGKILL)
        self.exited.wait()
        fd, self.fd = self.fd, None
        hub = gevent.get_hub()
        for watcher in (self._readable, self._writable):
            hub.cancel_wait(watcher, OSError(errno.EBADF, "session closed"))
            watcher.close()
        self._may_read.set()
        self._reader.kill()
        os.close(fd)
        self.stream.close()
        self.closed.set()


class Sessions:
    """The manager: owns every session's lifetime, the cap, the reaper and shutdown."""

    def __init__(self, config):
        self.config = config
        self.by_id = {}
        self.starting = 0
        self.shutting_down = gevent.event.Event()

    def create(self, label, cols, rows):
        if self.shutting_down.is_set():
            raise ApiError(503, "CoDA is shutting down.")
        cap = self.config.max_sessions
        if self.running() + self.starting >= cap:
            raise ApiError(429, f"The limit of {cap} concurrent sessions is reached: close a session "
                                "or raise MAX_CONCURRENT_SESSIONS.")
        self.starting += 1
        try:
            session = Session(self.config, label or f"Shell {len(self.by_id) + 1}", cols, rows)
        finally:
            self.starting -= 1
        self.by_id[session.id] = session
        log.info("session %s started (%d live)", session.id, len(self.by_id))
        return session

    def running(self):
        return sum(1 for s in self.by_id.values() if s.exit_code is None)

    def get(self, session_id):
        session = self.by_id.get(session_id)
        if session is None:
            raise ApiError(404, "Session not found.")
        return session

    def close(self, session_id):
        session = self.get(session_id)
        session.close()
        self.by_id.pop(session_id, None)
        log.info("session %s closed (%d live)", session_id, len(self.by_id))

    def reap_forever(self):
        """Close sessions nobody has touched within the timeout (exited ones sooner)."""
        timeout = self.config.session_timeout
        linger = min(timeout, EXITED_LINGER)
        while True:
            gevent.sleep(max(0.2, min(30.0, timeout / 4)))
            now = time.time()
            for session in list(self.by_id.values()):
                idle = now - session.last_activity
                if idle > timeout or (session.exit_code is not None and idle > linger):
                    log.info("session %s idle for %d s: closing", session.id, idle)
                    gevent.spawn(self.close, session.id)

    def shutdown(self):
        """SIGTERM: tell every client, refuse new sessions, hang up every shell."""
        if self.shutting_down.is_set():
            return
        log.info("shutting down: closing %d sessions", len(self.by_id))
        self.shutting_down.set()
        for client in list(SOCKETS):
            client.send_json({"type": "shutting_down"})
        for session in self.by_id.values():
            session.stream.wake()
        closers = [gevent.spawn(self.close, sid) for sid in list(self.by_id)]
        gevent.joinall(closers, timeout=CLOSE_GRACE + 4)


SESSIONS = Sessions(CONFIG)

# ===========================================================================
# 6. HTTP API
# ===========================================================================

app = bottle.Bottle()
SECURITY_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
     "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; worker-src 'self'; "
     "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]


def api(path, method="POST", body_limit=MAX_JSON_BODY):
    """Route decorator: JSON in (for POST), JSON out, ApiError to {"error"}."""

    def decorate(handler):
        def route(**kwargs):
            bottle.response.set_header("Cache-Control", "no-store")
            try:
                if method == "POST":
                    kwargs["body"] = _json_body(body_limit)
                return handler(**kwargs)
            except ApiError as error:
                bottle.response.status = error.status
                return {"error": str(error)}

        app.route(path, method, route)
        return handler

    return decorate


def _json_body(limit):
    if bottle.request.content_length > limit:
        raise ApiError(413, "The request body is too large.")
    data = bottle.request.body.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "The request body is too large.")
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def field(body, name, kind, default=..., low=None, high=None):
    """body[name], checked to be of `kind` (and within low..high); ApiError(400) otherwise."""
    if name not in body or body[name] is None:
        if default is ...:
            raise ApiError(400, f"The field '{name}' is required.")
        return default
    value = body[name]
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ApiError(400, f"The field '{name}' must be {'a number' if kind in (int, float) else 'a ' + kind.__name__}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"The field '{name}' must be between {low} and {high}.")
    return value


def clean_label(text):
    return "".join(ch for ch in text if ch.isprintable())[:100]


def output_answer(session, since):
    text, offset, next_offset, truncated = session.stream.read_text(since)
    return {"output": text, "offset": offset, "next_offset": next_offset, "truncated": truncated,
            "exited": session.exit_code is not None or session.closing, "exit_code": session.exit_code,
            "shutting_down": SESSIONS.shutting_down.is_set()}


def _has_news(answer):
    return answer.get("output") or answer.get("exited") or answer.get("truncated") or "error" in answer


def wait_for_output(sessions_and_offsets, wait):
    """Long-poll: answers for every (session, since) as soon as any has news, or after `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        events = [s.stream.changed() for s, _ in sessions_and_offsets if s]
        answers = [output_answer(s, since) if s else {"error": "Session not found", "exited": True}
                   for s, since in sessions_and_offsets]
        remaining = deadline - time.monotonic()
        if any(map(_has_news, answers)) or remaining <= 0 or SESSIONS.shutting_down.is_set():
            return answers
        gevent.wait(events + [SESSIONS.shutting_down], timeout=remaining, count=1)


@app.get("/")
def index():
    return bottle.static_file("index.html", root=HERE / "static")


@app.get("/static/<path:path>")
def static(path):
    return bottle.static_file(path, root=HERE / "static")


@app.get("/health")
def health():
    answer = {"status": "healthy", "version": __version__, "setup_status": SETUP.overall(),
              "active_sessions": len(SESSIONS.by_id)}
    if ACCESS.owner_error:
        answer["owner_error"] = ACCESS.owner_error
    return answer


@api("/api/version", "GET")
def version():
    return {"version": __version__}


@api("/api/sessions", "GET")
def list_sessions():
    return json.dumps([s.describe() for s in SESSIONS.by_id.values()])


@api("/api/session")
def create_session(body):
    label = clean_label(field(body, "label", str, ""))
    cols = field(body, "cols", int, 80, 1, 1000)
    rows = field(body, "rows", int, 24, 1, 1000)
    session = SESSIONS.create(label, cols, rows)
    return {"session_id": session.id, "label": session.label, "created_at": session.created_at}


@api("/api/session/attach")
def attach_session(body):
    session = SESSIONS.get(field(body, "session_id", str))
    since = field(body, "since", int, session.stream.start, 0)
    session.touch()
    answer = output_answer(session, since)
    text, offset, next_offset, truncated = session.stream.read_text(since, CONFIG.scrollback_bytes)
    answer.update(output=text, offset=offset, next_offset=next_offset, truncated=truncated,
                  session_id=session.id, label=session.label, created_at=session.created_at,
                  process=session.process_name())
    return answer


@api("/api/session/label")
def label_session(body):
    session = SESSIONS.get(field(body, "session_id", str))
    session.label = clean_label(field(body, "label", str))
    return {"status": "ok"}


@api("/api/session/close")
def close_session(body):
    SESSIONS.close(field(body, "session_id", str))
    return {"status": "ok"}


@api("/api/input")
def send_input(body):
    session = SESSIONS.get(field(body, "session_id", str))
    data = field(body, "input", str).encode("utf-8", "surrogateescape")
    if len(data) > MAX_INPUT_BYTES:
        raise ApiError(413, "Input is limited to 1 MiB per request.")
    session.touch()
    session.write(data)
    return {"status": "ok"}


@api("/api/resize")
def resize(body):
    session = SESSIONS.get(field(body, "session_id", str))
    session.resize(field(body, "cols", int, ..., 1, 1000), field(body, "rows", int, ..., 1, 1000))
    return {"status": "ok"}


@api("/api/output")
def poll_output(body):
    session_id = field(body, "session_id", str)
    since = field(body, "since", int, None, 0)
    wait = min(field(body, "wait", float, 0.0, 0.0), MAX_POLL_WAIT)
    session = SESSIONS.get(session_id)
    session.touch()
    [answer] = wait_for_output([(session, session.http_cursor if since is None else since)], wait)
    if since is None:
        session.http_cursor = answer["next_offset"]
    return answer


@api("/api/output-batch")
def poll_output_batch(body):
    ids = field(body, "session_ids", list)
    if not all(isinstance(i, str) for i in ids):
        raise ApiError(400, "The field 'session_ids' must be a list of strings.")
    since = field(body, "since", dict, {})
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in since.values()):
        raise ApiError(400, "The field 'since' must map session ids to offsets.")
    wait = min(field(body, "wait", float, 0.0, 0.0), MAX_POLL_WAIT)
    wanted = []
    for session_id in ids:
        session = SESSIONS.by_id.get(session_id)
        if session:
            session.touch()
        wanted.append((session, since.get(session_id, session.http_cursor if session else 0)))
    answers = wait_for_output(wanted, wait)
    for (session, offset), answer in zip(wanted, answers):
        if session and session.id not in since:
            session.http_cursor = answer["next_offset"]
    return {"outputs": dict(zip(ids, answers)), "shutting_down": SESSIONS.shutting_down.is_set()}


@api("/api/heartbeat")
def heartbeat(body):
    ids = field(body, "session_ids", list, None)
    if ids is None:
        ids = [field(body, "session_id", str)]
    for session_id in ids:
        if isinstance(session_id, str) and session_id in SESSIONS.by_id:
            SESSIONS.by_id[session_id].touch()
    return {"status": "ok"}


UPLOAD_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@app.post("/api/upload")
def upload():
    bottle.response.set_header("Cache-Control", "no-store")
    try:
        return {"path": _save_upload()}
    except ApiError as error:
        bottle.response.status = error.status
        return {"error": str(error)}


def _save_upload():
    limit = CONFIG.max_upload_bytes
    too_large = ApiError(413, f"Uploads are limited to {limit // MIB} MiB (CODA_MAX_UPLOAD_BYTES).")
    if bottle.request.content_length > limit + 64 * KIB:  # the file plus multipart framing
        raise too_large
    try:
        item = bottle.request.files.get("file")
    except (ValueError, bottle.HTTPError):
        item = None
    if item is None:
        raise ApiError(400, "Send the file as multipart form data in the field 'file'.")
    name = UPLOAD_NAME.sub("_", Path(item.raw_filename or "").name).lstrip("._")[:100] or "upload"
    folder = CONFIG.home / "uploads"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}_{name}"
    size = 0
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        while block := item.file.read(MIB):
            size += len(block)
            if size > limit:
                break
            out.write(block)
    if size > limit:
        path.unlink()
        raise too_large
    log.info("upload saved: %s (%d bytes)", path.name, size)
    return str(path)


@app.error(404)
@app.error(405)
@app.error(500)
def http_error(error):
    bottle.response.content_type = "application/json"
    if error.status_code == 500:
        log.error("internal error on %s", bottle.request.path, exc_info=(type(error.exception), error.exception, None)
                  if error.exception else None)
    messages = {404: "Not found.", 405: "Method not allowed.", 500: "Internal error."}
    return json.dumps({"error": messages.get(error.status_code, "Request failed.")})


def coda_app(environ, start_response):
    """The WSGI entry: security headers on every answer, access before any route."""

    def start(status, headers, exc_info=None):
        return start_response(status, headers + SECURITY_HEADERS, exc_info)

    if environ.get("PATH_INFO") != "/health":
        reason = ACCESS.denied(environ)
        if reason:
            return _plain_json(start, "403 Forbidden", {"error": reason})
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if "token" in query and environ.get("REQUEST_METHOD") == "GET" and ACCESS.token:
            # Trade the URL token for a cookie, so it leaves the address bar and history.
            rest = urllib.parse.urlencode({k: v for k, v in query.items() if k != "token"}, doseq=True)
            cookie = f"{COOKIE}={ACCESS.token}; HttpOnly; SameSite=Strict; Path=/"
            location = environ.get("PATH_INFO", "/") + (f"?{rest}" if rest else "")
            start("303 See Other", [("Location", location), ("Set-Cookie", cookie), ("Content-Length", "0")])
            return [b""]
    return app(environ, start)


def _plain_json(start, status, payload):
    body = json.dumps(payload).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


# ===========================================================================
# 7. WebSocket
# ===========================================================================

SOCKETS = set()  # every open TerminalSocket, for the shutdown notice
OUTPUT_FRAME = 0x01


class MessageTooBig(Exception):
    pass


class BoundedWebSocket(WebSocket):
    """gevent-websocket's socket with what it lacks: a message cap and one writer at a time."""

    def __init__(self, *args):
        super().__init__(*args)
        self.send_lock = gevent.lock.RLock()
        self.message_bytes = 0

    def read_message(self):
        self.message_bytes = 0
        return super().read_message()

    def read_frame(self):
        header = Header.decode_header(self.stream)
        if header.flags:
            raise ProtocolError("reserved bits set")
        self.message_bytes += header.length
        if self.message_bytes > MAX_WS_MESSAGE:
            raise MessageTooBig()
        payload = self.raw_read(header.length) if header.length else b""
        if len(payload) != header.length:
            raise WebSocketError("Unexpected EOF reading frame payload")
        if header.mask and payload:  # unmask a word at a time, not byte by byte
            mask = (header.mask * (len(payload) // 4 + 1))[:len(payload)]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(len(payload), "big")
        return header, payload

    def receive(self):
        try:
            return super().receive()
        except MessageTooBig:
            sock = self.handler.socket
            self.close(1009, b"message too big")
            _drain(sock)
            return None
        except WebSocketError:
            return None

    def send_frame(self, message, opcode):
        with self.send_lock:
            super().send_frame(message, opcode)

    def close(self, code=1000, message=b""):
        """Close with a real status code (the library's close frame leaves it out)."""
        with self.send_lock:
            if not self.closed:
                try:
                    self.send_frame(struct.pack("!H", code) + (message or b""), self.OPCODE_CLOSE)
                except WebSocketError:
                    pass
            self.closed = True
            self.stream = self.raw_write = self.raw_read = self.environ = None


def _drain(sock, limit=4 * MIB, seconds=1.0):
    """Read what a client is still sending, briefly, so that closing the socket
    does not reset the connection before the client has read our close frame."""
    taken = 0
    with gevent.Timeout(seconds, False):
        while taken < limit and (data := sock.recv(64 * KIB)):
            taken += len(data)


_ws_handler.WebSocket = BoundedWebSocket  # the handler builds its sockets by this name


class CodaHandler(_ws_handler.WebSocketHandler):
    """Upgrade only /ws, and only after the same access checks as HTTP."""

    def run_application(self):
        if self.environ.get("PATH_INFO") == "/ws" and ACCESS.denied(self.environ) is None:
            return super().run_application()
        return WSGIHandler.run_application(self)  # plain HTTP: coda_app answers (403 when denied)

    log_request = WSGIHandler.log_request  # gevent-websocket's would log every request line


class TerminalSocket:
    """One browser tab's socket: translates messages for the session manager."""

    def __init__(self, ws):
        self.ws = ws
        self.senders = {}  # session_id -> (greenlet, Subscriber)

    def serve(self):
        SOCKETS.add(self)
        pinger = gevent.spawn(self._ping_forever)
        try:
            while (message := self.ws.receive()) is not None:
                self.dispatch(message)
        finally:
            SOCKETS.discard(self)
            pinger.kill()
            for session_id in list(self.senders):
                self.leave(session_id)

    def dispatch(self, message):
        session_id = None
        try:
            if isinstance(message, (bytes, bytearray)):
                raise ApiError(400, "Send control messages as JSON text frames.")
            try:
                body = json.loads(message)
            except ValueError:
                raise ApiError(400, "The message is not valid JSON.") from None
            if not isinstance(body, dict):
                raise ApiError(400, "The message must be a JSON object.")
            kind = body.get("type")
            if kind == "heartbeat":
                for sid in field(body, "session_ids", list, []):
                    if isinstance(sid, str) and sid in SESSIONS.by_id:
                        SESSIONS.by_id[sid].touch()
                return
            handler = self.HANDLERS.get(kind)
            if handler is None:
                raise ApiError(400, f"Unknown message type {str(kind)[:40]!r}.")
            session_id = field(body, "session_id", str)
            handler(self, SESSIONS.get(session_id), body)
        except ApiError as error:
            reply = {"type": "error", "message": str(error)}
            if session_id:
                reply["session_id"] = session_id
            self.send_json(reply)

    def join(self, session, body):
        since = field(body, "since", int, session.stream.end, 0)
        self.leave(session.id)
        session.touch()
        offset = min(max(since, session.stream.start), session.stream.end)
        self.send_json({"type": "joined", "session_id": session.id, "offset": offset,
                        "truncated": since < session.stream.start})
        subscriber = session.subscribe(offset)
        self.senders[session.id] = (gevent.spawn(self._send_output, session, subscriber), subscriber)

    def leave_message(self, session, body):
        self.leave(session.id)

    def leave(self, session_id):
        sender, subscriber = self.senders.pop(session_id, (None, None))
        if sender:
            sender.kill()
            session = SESSIONS.by_id.get(session_id)
            if session:
                session.unsubscribe(subscriber)

    def input(self, session, body):
        data = field(body, "input", str).encode("utf-8", "surrogateescape")
        session.touch()
        session.write(data)

    def resize(self, session, body):
        session.resize(field(body, "cols", int, ..., 1, 1000), field(body, "rows", int, ..., 1, 1000))

    def ack(self, session, body):
        entry = self.senders.get(session.id)
        if entry:
            subscriber = entry[1]
            subscriber.acking = True
            subscriber.position = min(field(body, "offset", int, ..., 0), session.stream.end)
            session.update_flow()

    HANDLERS = {"join_session": join, "leave_session": leave_message, "terminal_input": input,
                "terminal_resize": resize, "ack": ack}

    def _send_output(self, session, subscriber):
        """The sender greenlet: stream to binary frames at this socket's own offset."""
        offset, told_exit = subscriber.position, False
        head = bytes([OUTPUT_FRAME])
        tag = bytes([len(session.id)]) + session.id.encode()
        try:
            while True:
                changed = session.stream.changed()
                start, data, _ = session.stream.read(offset, FRAME_SLICE)
                if data:
                    self.ws.send(head + start.to_bytes(8, "big") + tag + data, binary=True)
                    offset = start + len(data)
                    if not subscriber.acking:  # paced by TCP: what is sent counts as taken
                        subscriber.position = offset
                        session.update_flow()
                    continue
                if session.stream.closed:
                    self.send_json({"type": "session_closed", "session_id": session.id})
                    return
                if session.exit_code is not None and not told_exit:
                    told_exit = True
                    self.send_json({"type": "session_exited", "session_id": session.id,
                                    "exit_code": session.exit_code})
                changed.wait()
        except WebSocketError:
            pass  # the socket is gone; serve() cleans up

    def send_json(self, message):
        try:
            self.ws.send(json.dumps(message))
        except WebSocketError:
            pass

    def _ping_forever(self):
        while True:
            gevent.sleep(PING_SECONDS)
            try:
                self.ws.send_frame(b"", self.ws.OPCODE_PING)
            except WebSocketError:
                return


@app.get("/ws")
def websocket():
    ws = bottle.request.environ.get("wsgi.websocket")
    if ws is None:
        bottle.response.status = 400
        return {"error": "This endpoint needs a WebSocket upgrade."}
    TerminalSocket(ws).serve()
    return ""


# ===========================================================================
# 8. Databricks
# ===========================================================================

@api("/api/pat-status", "GET")
def pat_status():
    return {"configured": False, "valid": False, "user": None, "workspace_host": None, "expires_at": None}


@api("/api/app-state", "GET")
def app_state():
    return {"owner": ACCESS.owner, "workspace_host": None, "pat_configured": False, "last_rotation": None}


@api("/api/configure-pat")
def configure_pat(body):
    field(body, "token", str)
    raise ApiError(400, "No Databricks workspace is configured: set DATABRICKS_HOST.")


# ===========================================================================
# 10. Setup
# ===========================================================================

class Setup:
    """The setup steps and their states, as /api/setup-status reports them."""

    def __init__(self):
        self.steps = []

    def overall(self):
        states = {step["status"] for step in self.steps}
        if "failed" in states:
            return "failed"
        if "running" in states:
            return "running"
        if "pending" in states:
            return "pending"
        return "complete"


SETUP = Setup()


@api("/api/setup-status", "GET")
def setup_status():
    return {"status": SETUP.overall(), "steps": SETUP.steps}


# ===========================================================================
# 13. Command line
# ===========================================================================

def release_import_memory():
    """Hand the heap that imports left behind back to the OS (glibc keeps it otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def serve(host, port):
    setup_logging()
    ACCESS.bound_host = host
    server = WSGIServer((host, port), coda_app, handler_class=CodaHandler, log=None,
                        error_log=logging.getLogger("coda.http"))

    def on_sigterm():
        gevent.spawn_later(9.0, os._exit, 1)  # the contract: gone within 10 s, whatever hangs
        SESSIONS.shutdown()
        server.stop(timeout=0.5)

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(on_sigterm))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(on_sigterm))
    gevent.spawn(SESSIONS.reap_forever)
    server.start()
    release_import_memory()
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{shown}:{server.server_port}/"
    if ACCESS.apps_mode:
        log.info("CoDA %s serving on %s:%d (Databricks Apps mode)", __version__, host, server.server_port)
    elif ACCESS.token and CONFIG.local_token is None:
        print(f"CoDA {__version__}: open {url}?token={ACCESS.token}", flush=True)
    else:
        print(f"CoDA {__version__}: open {url}", flush=True)
        if not ACCESS.token:
            log.warning("CODA_TOKEN is set but empty: local access needs no token")
    server.serve_forever()
    log.info("stopped")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="coda.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=CONFIG.host, help=f"address to bind (default {CONFIG.host})")
    parser.add_argument("--port", type=int, default=CONFIG.port, help=f"port (default {CONFIG.port})")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
