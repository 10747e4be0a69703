#!/usr/bin/env python3
"""CoDA: coding agents in the browser.

Real terminals (xterm.js over PTYs) served by one process on gevent
greenlets, hosted as a Databricks App or run locally:

    python coda.py                 # http://127.0.0.1:8000/?token=...
    python coda.py --help          # flags and subcommands

The wire contract is PROTOCOL.md, beside this file; the README's security
section lists what is defended and how. This module is the whole backend; its
sections, in reading order:

Contents
  Part 1: The server. What runs inside it, so all that a reviewer of its
  attack surface must read, ending at a visible line.
     1. Configuration   every environment variable, in one frozen dataclass;
                        the secrets among them wiped from the process environment;
                        every path under HOME, derived once; PROCESS, the map of
                        the running server's objects
     2. Logging         one logger; a filter redacts anything token-shaped
     3. Access          who may pass: local token or Databricks owner, Origin/Host
                        (a browser refused at / gets a small HTML page, section 6)
     4. Output streams  the byte ring with offsets; UTF-8-safe text or base64 slices
     5. Sessions        PTY, process group, reader greenlet, flow control,
                        a bounded input queue and writer greenlet per session;
                        the manager with the cap, the idle reaper and shutdown;
                        the notice detector (bell, OSC 9, OSC 777) in the reader;
                        Keystrokes: beside the session typed into last, every
                        other reader gives way to its echo
     6. HTTP API        thin routes: validate, call the manager, answer JSON
                        (every error too, however malformed the request); a new
                        session may start an agent from the table in a folder
                        of ~/projects, both checked here; files out: list and
                        download under ~/projects and ~/uploads
     7. WebSocket       one handler per socket, one sender greenlet per session;
                        beside a session being typed into, the others send
                        only a budget past their acks (small nearby, one
                        round trip's worth on a distant link: pings time it)
     8. Databricks      owner, gateway discovery, PAT lifecycle, the models the
                        workspace serves (listed at token time and rotations);
                        optionally the log records also go to a Delta table
     9. Agents          one config writer per CLI, driven by a table; the model
                        each uses (its own if served, else its row's best
                        served); their MCP servers (the workspace's managed ones
                        at the proxy, the third-party ones marked as leaving it);
                        their tracing and notice hooks
    10. Setup           the step list and its runner (the saved-work restore,
                        served models, tracing, commit hook, MCP and restore
                        offer steps among them); which agents are ready, and
                        installing the missing ones on request; the state
                        keeper: the tabs' layout, and the saves of the work
                        (run by a `coda.py state save` worker) every few minutes
                        and at SIGTERM
    11. Local proxy     token-injecting, request-repairing proxy for every agent's
                        model calls and for the workspace's managed MCP servers
                        (/mcp); agents are pointed at it only once it holds its
                        port; it counts what each agent spends (GET /api/usage),
                        also from the gateway's usage table where that is readable
    12. Serving         wire(): the process's objects built and wired together in
                        one block (PROCESS, section 1, is their map); then
                        `python coda.py` starts the server, and shuts it down
  Part 2: Commands run by hooks and operators. Never inside the server.
    13. Tracing turns   `coda.py trace AGENT`: an agent's turn recorded in MLflow
    14. Workspace sync  `coda.py sync REPO` (git's post-commit hook runs it) and
                        `coda.py restore`; restart-proof state: `coda.py state
                        save|restore` (tabs, uncommitted work, agents' files)
    15. Command line    the subcommands: token, proxy-key, agents, doctor, skills,
                        restore, state, sync, trace, notify, download; without one,
                        serve. (`token`, `proxy-key`, `agents`, `notify`, `download` and
                        the trace hook's detach are answered at the top of the
                        file, before the heavy imports; serving runs the file again
                        as the module `coda`, which frees its syntax tree.)
"""

import collections
import sys

# The agents (section 9). Adding one is one function (its writer, in section 9) and one row here,
# plus its version pin in install/versions.env. Setup, doctor, install/agents.sh, the terminals'
# environment, tracing and the tests all read these rows. They are plain data, before any heavy
# import, so that `coda.py agents` (what agents.sh reads) and the trace fast path below answer
# with any python3, gevent or not; so a row names its functions, which come later in the file.
Agent = collections.namedtuple("Agent", [
    "name",            # its command, step id and install name
    "label",           # what setup and doctor show
    "kind",            # how install/agents.sh installs it: npm, or pypi (into its own virtual environment)
    "package",         # its npm or PyPI package
    "version_key",     # the install/versions.env variable that pins it
    "model_variable",  # the environment variable choosing its model (section 1 reads it) ...
    "default_model",   # ... and the model without it
    "config_file",     # the file doctor expects its writer to have written (under HOME)
    "writer",          # the section 9 function writing its config: writer(AgentContext)
    "environment",     # a section 9 function giving the variables its terminals need, or None
    "tracer",          # the section 13 function recording a turn (`coda.py trace NAME`), or None
    "switch",          # the environment variable that leaves it out when false (default true), or None
    "model_api",       # the API its model calls speak (a GATEWAY_PATHS key, section 8), or None: its model is not checked
    "models",          # the models it may use, best (newest) first: the choice when its own is not served (section 9)
    "memory",          # its conversations and memory under HOME, what a restart brings back (section 14); never
                       # its auth files (those sit beside these, not in them)
    "resume",          # its own command continuing the last conversation in the current folder
], defaults=(None, None, None, None, (), (), None))
AGENT_ROWS = (
    Agent("claude", "Claude Code", "npm", "@anthropic-ai/claude-code", "CLAUDE_CODE_VERSION",
          "ANTHROPIC_MODEL", "databricks-claude-opus-4-7", ".claude/settings.json", "configure_claude",
          tracer="trace_claude", model_api="anthropic",
          models=("databricks-claude-opus-4-7", "databricks-claude-opus-4-6", "databricks-claude-sonnet-4-6",
                  "databricks-claude-opus-4-5", "databricks-claude-sonnet-4-5", "databricks-claude-opus-4-1",
                  "databricks-claude-sonnet-4", "databricks-claude-haiku-4-5"),
          memory=(".claude/projects", ".claude/todos", ".claude/plans", ".claude/history.jsonl", ".claude/CLAUDE.md"),
          resume="claude --continue"),
    Agent("codex", "Codex", "npm", "@openai/codex", "CODEX_VERSION",
          "CODEX_MODEL", "databricks-gpt-5-5", ".codex/config.toml", "configure_codex",
          tracer="trace_codex", model_api="responses",
          models=("databricks-gpt-5-5", "databricks-gpt-5-4", "databricks-gpt-5-2", "databricks-gpt-5-1",
                  "databricks-gpt-5", "databricks-gpt-5-mini"),
          memory=(".codex/sessions", ".codex/archived_sessions", ".codex/session_index.jsonl", ".codex/history.jsonl",
                  ".codex/state_5.sqlite", ".codex/state_5.sqlite-wal", ".codex/thread_history_1.sqlite",
                  ".codex/thread_history_1.sqlite-wal", ".codex/memories_1.sqlite", ".codex/memories_1.sqlite-wal",
                  ".codex/memories"),
          resume="codex resume --last"),
    Agent("gemini", "Gemini CLI", "npm", "@google/gemini-cli", "GEMINI_CLI_VERSION",
          "GEMINI_MODEL", "databricks-gemini-2-5-pro", ".gemini/settings.json", "configure_gemini",
          environment="gemini_environment", tracer="trace_gemini", model_api="gemini",
          models=("databricks-gemini-3-1-pro", "databricks-gemini-3-pro", "databricks-gemini-2-5-pro",
                  "databricks-gemini-3-flash", "databricks-gemini-2-5-flash"),
          memory=(".gemini/tmp", ".gemini/projects.json", ".gemini/GEMINI.md"),
          resume="gemini --resume latest"),
    Agent("opencode", "OpenCode", "npm", "opencode-ai", "OPENCODE_VERSION",  # shares Hermes' HERMES_MODEL
          "HERMES_MODEL", "databricks-claude-opus-4-6", ".config/opencode/opencode.json", "configure_opencode",
          environment="opencode_environment", model_api="chat",  # any chat model; Claude first
          models=("databricks-claude-opus-4-7", "databricks-claude-opus-4-6", "databricks-claude-sonnet-4-6",
                  "databricks-claude-sonnet-4-5", "databricks-gpt-5-5", "databricks-gemini-3-pro",
                  "databricks-gemini-2-5-pro"),
          memory=(".local/share/opencode/storage", ".local/share/opencode/opencode.db",
                  ".local/share/opencode/opencode.db-wal"),
          resume="opencode --continue"),
    Agent("hermes", "Hermes Agent", "pypi", "hermes-agent[mcp]", "HERMES_AGENT_VERSION",  # [mcp]: its MCP client
          "HERMES_MODEL", "databricks-claude-opus-4-6", ".hermes/config.yaml", "configure_hermes",
          switch="ENABLE_HERMES", model_api="chat",  # any chat model; Claude first
          models=("databricks-claude-opus-4-7", "databricks-claude-opus-4-6", "databricks-claude-sonnet-4-6",
                  "databricks-claude-sonnet-4-5", "databricks-gpt-5-5", "databricks-gemini-3-pro",
                  "databricks-gemini-2-5-pro"),
          memory=(".hermes/sessions", ".hermes/state.db", ".hermes/state.db-wal", ".hermes/memories"),
          resume="hermes --continue"),
)

if __name__ == "__main__" and sys.argv[1:] == ["agents"]:
    for _agent in AGENT_ROWS:  # what install/agents.sh reads: name kind package version-key
        print(_agent.name, _agent.kind, _agent.package, _agent.version_key)
    sys.exit(0)

# Six fast paths, before any heavy import: `agents` (above), `token`, `proxy-key`, `notify AGENT` and
# `download FILE` are answered here, and `trace AGENT` only detaches here and runs in section 13.
# Section 15 lists every subcommand.


def read_databrickscfg():
    """(host, token) of ~/.databrickscfg's [DEFAULT] profile, as CoDA last wrote them.

    Defined before any heavy import: `coda.py token`, which Claude Code and
    Codex run to get the current token, answers in a few milliseconds.
    """
    import configparser
    import os

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(os.environ.get("HOME") or os.path.expanduser("~"), ".databrickscfg"))
    return parser["DEFAULT"].get("host", ""), parser["DEFAULT"].get("token", "")


def print_token():
    """`coda.py token`: the current Databricks token on stdout (exit 0), or why there is none (exit 1)."""
    token = read_databrickscfg()[1]
    print(token or "coda: no Databricks token is configured yet (paste one in the CoDA page)",
          file=sys.stdout if token else sys.stderr)
    return 0 if token else 1


if __name__ == "__main__" and sys.argv[1:] == ["token"]:
    sys.exit(print_token())


def agent_key(proxy_key, agent):
    """The key one agent holds for the local proxy: the proxy tells by it which agent made a call."""
    return f"{proxy_key}.{agent}"


def print_proxy_key(agent):
    """`coda.py proxy-key AGENT`: that agent's key for the local proxy (Claude Code and Codex run
    this, as they ran `token`), or why there is none (exit 1). A fast path, like `token`."""
    import os

    path = os.path.join(os.environ.get("HOME") or os.path.expanduser("~"), ".coda", "proxy-key")  # Paths.proxy_key_file
    try:
        with open(path) as file:
            key = file.read().strip()
    except OSError:
        key = ""
    if agent not in [a.name for a in AGENT_ROWS] or len(key) < 32:
        print("coda: no proxy key for " + repr(agent) + " (start CoDA; AGENT is one of "
              + ", ".join(a.name for a in AGENT_ROWS) + ")", file=sys.stderr)
        return 1
    print(agent_key(key, agent))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["proxy-key"] and len(sys.argv) == 3:
    sys.exit(print_proxy_key(sys.argv[2]))

if __name__ == "__main__" and sys.argv[1:3] in [["trace", a.name] for a in AGENT_ROWS if a.tracer]:
    # An agent waits on its hook: answer it now (exit 0) and write the trace from a detached
    # grandchild, before the imports below cost the agent a quarter of a second (section 13).
    import os

    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    _null = os.open(os.devnull, os.O_RDWR)
    _piped = sys.argv[2] != "codex" and not os.isatty(0)  # Claude Code and Gemini CLI pipe their JSON in
    for _fd in (1, 2) if _piped else (0, 1, 2):
        os.dup2(_null, _fd)


# Notices (issue 13). An agent's hook runs `coda.py notify AGENT` at the end of a turn and when it
# waits for the user; it writes an OSC 777 notification to its own terminal, where the server's one
# detector (section 5) finds it beside the bell and OSC 9 of every other program: so a hook's notice
# knows its session and needs no credentials. Answered here, in milliseconds, before the imports.
NOTICE_TITLES = {"claude": "Claude Code", "codex": "Codex", "gemini": "Gemini CLI"}


def notice_text(agent, event):
    """(title, body) for an agent's hook event: its own message when it waits, else the turn's end."""
    message = event.get("message") if isinstance(event, dict) else None
    if not isinstance(message, str) or not message.strip():
        message = "Finished its turn."
    clean = lambda text, limit: "".join(c if c.isprintable() and c != ";" else " " for c in text)[:limit]
    return clean(NOTICE_TITLES.get(agent, agent), 60), clean(message.strip(), 200)


def agent_terminal():
    """A descriptor writing to the terminal the agent runs in, or None outside one. Claude Code runs
    its hooks in a new session, without a controlling terminal: then the nearest ancestor's."""
    import os

    try:
        return os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        pass
    pid = os.getppid()
    for _ in range(8):  # the hook's shell, the agent, ...: a few levels at most
        for fd in (0, 1, 2):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/pts/"):
                    return os.open(target, os.O_WRONLY | os.O_NOCTTY)
            except OSError:
                continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])  # the field after the state: ppid
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1:
            return None
    return None


def notify_from_hook(agent, args):
    """`coda.py notify AGENT`: Claude Code and Gemini CLI pipe their event in; Codex runs its one notify
    program as `coda.py notify codex [--trace] [-- USER'S NOTIFY...] JSON`, so the user's own notify and
    CoDA's tracing are chained from here. Always exits 0: a notice must never fail the agent."""
    import json
    import os
    import select

    payload = args.pop() if agent == "codex" and args and args[-1].startswith("{") else None
    trace, user = args[:1] == ["--trace"], args[args.index("--") + 1:] if "--" in args else []
    try:
        if payload is None and not os.isatty(0) and select.select([0], [], [], 2)[0]:  # never hang on a silent pipe
            payload = os.read(0, 1 << 20).decode("utf-8", "replace")
        event = json.loads(payload or "{}")
    except (OSError, ValueError):
        event = {}
    title, body = notice_text(agent, event)
    terminal = agent_terminal()
    if terminal is not None:
        try:
            os.write(terminal, f"\x1b]777;notify;{title};{body}\x07".encode())
        except OSError:
            pass
        os.close(terminal)
    if user and payload is not None:
        import subprocess

        try:  # the user's own notify, as Codex would have run it; not waited for
            subprocess.Popen(user + [payload], stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            pass
    if trace and payload is not None:  # Codex's trace hook (section 13) detaches at the top of the file
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), "trace", "codex", payload])
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["notify"] and len(sys.argv) > 2:
    sys.exit(notify_from_hook(sys.argv[2], sys.argv[3:]))


def offer_downloads(names):
    """`coda.py download FILE...`: offer each file to the open pages, which show a button to download
    it (a click, never by itself). Only files under ~/projects and ~/uploads: the page fetches them
    from /api/download, which checks the path again; this only saves the user a trip to the panel."""
    import os
    import urllib.parse

    home = os.environ.get("HOME") or os.path.expanduser("~")
    roots = {name: os.path.realpath(os.path.join(home, name)) for name in ("projects", "uploads")}
    terminal, failed = agent_terminal(), 0
    for name in names:
        path = os.path.realpath(name)
        root = next((r for r, base in roots.items() if path.startswith(base + os.sep)), None)
        if root is None or not os.path.isfile(path):
            print(f"coda: {name}: only files under ~/projects and ~/uploads can be downloaded", file=sys.stderr)
            failed += 1
            continue
        relative = urllib.parse.quote(f"{root}/{os.path.relpath(path, roots[root])}")  # ASCII: any name fits
        if terminal is None:
            print("coda: not in a CoDA terminal", file=sys.stderr)
            return 1
        os.write(terminal, f"\x1b]777;coda-download;{relative}\x07".encode())
    return 1 if failed else 0


if __name__ == "__main__" and sys.argv[1:2] == ["download"] and len(sys.argv) > 2:
    sys.exit(offer_downloads(sys.argv[2:]))

if __name__ == "__main__" and __spec__ is None and __file__.endswith("/coda.py") \
        and (len(sys.argv) == 1 or sys.argv[1].startswith("-")):  # serving: no subcommand
    # Run as a module, not as a script: CPython keeps a script's whole syntax tree until the script
    # ends, 16 MiB for this file (a third of an idle server); a module's is freed once compiled,
    # and its bytecode is cached. The same process (exec keeps the pid), arguments, interpreter flags
    # and sys.path (this folder first, as for a script); runpy sets __spec__, so this runs once. (A copy
    # under another name runs as a script: `coda` is the module this imports.) Only to serve: the
    # second start costs some 0.1 s, which a short-lived subcommand would pay for nothing.
    import os

    _flags = sys.orig_argv[1:len(sys.orig_argv) - len(sys.argv)]
    _run = ("import runpy, sys; sys.path[0] = sys.argv[1]; del sys.argv[1]; "
            "runpy.run_module('coda', run_name='__main__', alter_sys=True)")
    os.execv(sys.executable, [sys.executable, *_flags, "-c", _run, sys.path[0], *sys.argv[1:]])

if __name__ == "__main__" and sys.argv[1:2] != ["trace"]:  # patch before anything imports socket or threading
    from gevent import monkey

    monkey.patch_all(subprocess=False)  # setup imports gevent.subprocess when it needs it

import argparse
import base64
import codecs
import collections
import dataclasses
import errno
import fcntl
import functools
import hashlib
import hmac
import html
import importlib
import io
import ipaddress
import itertools
import json
import json.scanner
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import termios
import time
import urllib.parse
from pathlib import Path

import bottle
import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent import monkey as _monkey
from gevent.pywsgi import WSGIHandler, WSGIServer
from geventwebsocket import handler as _ws_handler
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.websocket import Header, WebSocket

__version__ = "0.1.0"
HERE = Path(__file__).resolve().parent
PROGRAM = HERE / "coda.py"  # what agents' hooks and git's hook run, with the Python serving CoDA

# ===========================================================================
# 1. Configuration
# ===========================================================================

KIB, MIB = 1024, 1024 * 1024
# The skill packs CoDA users get, each (repository, pinned tag or commit, folder holding the skills).
DEFAULT_SKILLS = ("https://github.com/databricks-solutions/ai-dev-kit da17293d90c890b1f228a4b9dcaa9d55f63bdd3f "
                  "databricks-skills; https://github.com/obra/superpowers v6.1.1 skills")
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


def _env_seconds(env, name, default):
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1
    if value <= 0:
        CONFIG_WARNINGS.append(f"{name}={raw!r} is not a positive number of seconds; using {default}")
        return default
    return value


def _env_url(env, name):
    """A base URL without its trailing slash; https:// added when the scheme is missing."""
    raw = env.get(name, "").strip().rstrip("/")
    if raw and "://" not in raw:
        raw = "https://" + raw
    return raw


def _env_flag(env, name, default):
    raw = env.get(name, "").strip().lower()
    return default if not raw else raw not in ("0", "false", "no", "off")


# Databricks managed MCP servers, as Databricks documents their URLs: the workspace serves each
# under MANAGED_MCP_ROOT, and the local proxy (section 11) serves the same paths under
# MCP_PROXY_PREFIX, adding the current token. The one table of them: a row per setting, saying
# what one listed value is, the shape of each dot-separated part, how many parts it may have, and
# the server's name and path (the parts joined by "-" and "/"). Databricks SQL has no value.
MANAGED_MCP_ROOT = "/api/2.0/mcp"
MCP_PROXY_PREFIX = "/mcp"
MANAGED_MCP_NAME = "databricks-"  # every managed server's name starts so
UC_NAME = r"[A-Za-z0-9_][A-Za-z0-9_-]{0,254}"  # a Unity Catalog name CoDA accepts unquoted
MANAGED_MCP = (
    # (setting, what a value is, shape of a part, parts allowed, name prefix, path prefix)
    ("CODA_MCP_SQL", None, None, (), "databricks-sql", "/sql"),
    ("CODA_MCP_GENIE_SPACES", "a Genie space id (32 hexadecimal digits)", r"[0-9a-fA-F]{32}", (1,),
     "databricks-genie", "/genie"),
    ("CODA_MCP_UC_FUNCTIONS", "catalog.schema or catalog.schema.function", UC_NAME, (2, 3),
     "databricks-functions", "/functions"),
    ("CODA_MCP_VECTOR_SEARCH", "catalog.schema or catalog.schema.index", UC_NAME, (2, 3),
     "databricks-vector-search", "/vector-search"),
)


def _env_managed_mcp(env):
    """((name, path under MANAGED_MCP_ROOT), ...) from the MANAGED_MCP settings, and a sentence for
    each malformed value (which is left out: no agent gets a broken entry)."""
    servers, errors = {}, []
    for setting, what, shape, counts, name, path in MANAGED_MCP:
        if not counts:  # on or off
            if _env_flag(env, setting, True):
                servers[name] = path
            continue
        for value in filter(None, (part.strip() for part in env.get(setting, "").split(","))):
            parts = value.split(".")
            if len(parts) not in counts or not all(re.fullmatch(shape, part) for part in parts):
                errors.append(f"{setting}: {value!r} is not {what}; it was left out")
                continue
            servers["-".join((name, *parts))] = "/".join((path, *parts))
    return tuple(servers.items()), tuple(errors)


@dataclasses.dataclass(frozen=True)
class Config:
    port: int                  # DATABRICKS_APP_PORT, else PORT, else 8000
    host: str                  # CODA_HOST: address to bind (default 0.0.0.0 inside Databricks Apps, else 127.0.0.1)
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
    header_timeout: float      # CODA_HEADER_TIMEOUT: seconds a client has to send a request's line and headers (default 10)
    install: bool              # CODA_INSTALL: 0 skips the setup steps that install software (default: 1 in Apps, 0 locally)
    # Databricks (section 8)
    databricks_host: str       # DATABRICKS_HOST: the workspace URL (https:// added when missing)
    workspace_id: str          # DATABRICKS_WORKSPACE_ID: names the workspace's AI Gateway host
    client_id: str             # DATABRICKS_CLIENT_ID: the app's service principal (Apps injects it)
    client_secret: str         # DATABRICKS_CLIENT_SECRET: its secret; never reaches a child process
    bootstrap_token: str       # DATABRICKS_TOKEN: a token to start from, as if pasted
    gateway_host: str          # DATABRICKS_GATEWAY_HOST: the AI Gateway base, skipping discovery
    token_lifetime: int        # PAT_TOKEN_LIFETIME: seconds each minted token lives (default 900)
    rotation_interval: float   # PAT_ROTATION_INTERVAL: seconds between rotations (default 600)
    sdk_http_timeout: int      # CODA_SDK_HTTP_TIMEOUT: seconds databricks-sdk waits for one answer (default 20)
    sdk_retry_timeout: int     # CODA_SDK_RETRY_TIMEOUT: seconds it retries a failing call within (default 30)
    # Agents (section 9)
    # Each agent row (top of the file) names its model variable and switch; they are read here, like every other.
    models: dict               # agent name -> model: ANTHROPIC_MODEL, CODEX_MODEL, GEMINI_MODEL, HERMES_MODEL (Hermes
                               # Agent's and OpenCode's); the defaults are in the rows
    hermes_fallback_model: str # HERMES_FALLBACK_MODEL: Hermes' fallback model (default none)
    agents_off: frozenset      # names of the agents whose switch is false: ENABLE_HERMES (default true)
    disable_auto_memory: str   # CLAUDE_CODE_DISABLE_AUTO_MEMORY: passed to Claude Code when set
    mcp_servers: tuple         # third-party MCP servers, (name, URL): DEEPWIKI_MCP_URL, EXA_MCP_URL (empty removes),
                               # TEAM_MEMORY_MCP_URL; CODA_MCP_THIRD_PARTY=0 drops them all (default 1)
    managed_mcp: tuple         # Databricks managed MCP servers, (name, path): CODA_MCP_SQL (default 1),
                               # CODA_MCP_GENIE_SPACES, CODA_MCP_UC_FUNCTIONS, CODA_MCP_VECTOR_SEARCH (MANAGED_MCP)
    mcp_errors: tuple          # a sentence per malformed value among those (setup's MCP step fails with them)
    proxy_port: int            # CODA_PROXY_PORT: the local agent proxy on 127.0.0.1 (default 4000)
    proxy_timeout: float       # CODA_PROXY_TIMEOUT: seconds the proxy waits for the gateway's next byte (default 600)
    # Tracing (the setup step in section 10, the hooks' side in section 13)
    mlflow_tracing: bool       # MLFLOW_TRACING_ENABLED: trace Claude Code, Codex and Gemini CLI turns (default false)
    mlflow_experiment: str     # MLFLOW_EXPERIMENT_NAME: the experiment (default /Users/<user>/<DATABRICKS_APP_NAME or coda>)
    mlflow_tracking_uri: str   # MLFLOW_TRACKING_URI: where traces go (default databricks; any MLflow URI, e.g. sqlite:///...)
    # App logs to Delta (section 8)
    log_table: str             # CODA_LOG_TABLE: catalog.schema.table CoDA's own log records also go to (default: none)
    log_warehouse_id: str      # CODA_LOG_WAREHOUSE_ID: the SQL warehouse that writes them (both needed)
    # What each agent spends (section 11)
    prices: str                # CODA_PRICES: JSON (or a file holding it) of USD per million tokens, over the built-in table
    usage_warehouse_id: str    # CODA_USAGE_WAREHOUSE_ID: the SQL warehouse reading system.ai_gateway.usage
                               # (default CODA_LOG_WAREHOUSE_ID)
    # Setup (section 10)
    skills: str                # CODA_SKILLS: skill packs, 'repository ref folder' separated by ';'
    git_mirror: str            # CODA_GIT_MIRROR: replaces https://github.com for skill clones
    # Restart-proof state (sections 12 and 14)
    state: bool                # CODA_STATE: keep tabs, uncommitted work and agents' conversations in the workspace
                               # across restarts (default true; needs DATABRICKS_HOST)
    state_interval: float      # CODA_STATE_INTERVAL: seconds between saves while something changed (default 180)
    state_max_bytes: int       # CODA_STATE_MAX_BYTES: the largest one thing kept (an agent's files, a repository's
                               # snapshot, the shell history), compressed; larger ones are left out (default 64 MiB)

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
        managed_mcp, mcp_errors = _env_managed_mcp(env)
        return cls(
            port=port,
            host=env.get("CODA_HOST", "").strip() or ("0.0.0.0" if app_name else "127.0.0.1"),
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
            header_timeout=_env_seconds(env, "CODA_HEADER_TIMEOUT", 10.0),
            install=_env_flag(env, "CODA_INSTALL", bool(app_name)),
            databricks_host=_env_url(env, "DATABRICKS_HOST"),
            workspace_id=env.get("DATABRICKS_WORKSPACE_ID", "").strip(),
            client_id=env.get("DATABRICKS_CLIENT_ID", "").strip(),
            client_secret=env.get("DATABRICKS_CLIENT_SECRET", "").strip(),
            bootstrap_token=env.get("DATABRICKS_TOKEN", "").strip(),
            gateway_host=_env_url(env, "DATABRICKS_GATEWAY_HOST"),
            token_lifetime=_env_int(env, "PAT_TOKEN_LIFETIME", 900),
            rotation_interval=_env_seconds(env, "PAT_ROTATION_INTERVAL", 600.0),
            sdk_http_timeout=_env_int(env, "CODA_SDK_HTTP_TIMEOUT", 20),
            sdk_retry_timeout=_env_int(env, "CODA_SDK_RETRY_TIMEOUT", 30),
            models={a.name: env.get(a.model_variable, "").strip() or a.default_model for a in AGENT_ROWS},
            hermes_fallback_model=env.get("HERMES_FALLBACK_MODEL", "").strip(),
            agents_off=frozenset(a.name for a in AGENT_ROWS if a.switch and not _env_flag(env, a.switch, True)),
            disable_auto_memory=env.get("CLAUDE_CODE_DISABLE_AUTO_MEMORY", "").strip(),
            mcp_servers=tuple((name, url) for name, url in (
                ("deepwiki", env.get("DEEPWIKI_MCP_URL", "https://mcp.deepwiki.com/mcp").strip()),
                ("exa", env.get("EXA_MCP_URL", "https://mcp.exa.ai/mcp").strip()),
                ("team-memory", env.get("TEAM_MEMORY_MCP_URL", "").strip()))
                if url and _env_flag(env, "CODA_MCP_THIRD_PARTY", True)),
            managed_mcp=managed_mcp,
            mcp_errors=mcp_errors,
            proxy_port=_env_int(env, "CODA_PROXY_PORT", 4000),
            proxy_timeout=_env_seconds(env, "CODA_PROXY_TIMEOUT", 600.0),
            mlflow_tracing=_env_flag(env, "MLFLOW_TRACING_ENABLED", False),
            mlflow_experiment=env.get("MLFLOW_EXPERIMENT_NAME", "").strip(),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI", "").strip() or "databricks",
            log_table=env.get("CODA_LOG_TABLE", "").strip(),
            log_warehouse_id=env.get("CODA_LOG_WAREHOUSE_ID", "").strip(),
            prices=env.get("CODA_PRICES", "").strip(),
            usage_warehouse_id=(env.get("CODA_USAGE_WAREHOUSE_ID", "").strip()
                                or env.get("CODA_LOG_WAREHOUSE_ID", "").strip()),
            skills=env.get("CODA_SKILLS", DEFAULT_SKILLS),
            git_mirror=env.get("CODA_GIT_MIRROR", "").strip().rstrip("/"),
            state=_env_flag(env, "CODA_STATE", True),
            state_interval=_env_seconds(env, "CODA_STATE_INTERVAL", 180.0),
            state_max_bytes=_env_int(env, "CODA_STATE_MAX_BYTES", 64 * MIB),
        )


CONFIG = Config.from_env()


@dataclasses.dataclass(frozen=True)
class Paths:
    """Every file and folder CoDA keeps under HOME, derived once (the agents' own config files
    are named by their rows and writers)."""
    home: Path             # HOME
    projects: Path         # ~/projects: where terminals start; what is synced and restored
    uploads: Path          # ~/uploads: /api/upload's files
    local: Path            # ~/.local: where installs go, no root needed ...
    local_bin: Path        # ... and its bin, first on the terminals' PATH
    databrickscfg: Path    # ~/.databrickscfg: host and current token, for the CLI, SDK and `coda.py token`
    proxy_key_file: Path   # ~/.coda/proxy-key: the local proxy's key (0600)
    pat_status_file: Path  # ~/.coda/pat-status.json: /api/pat-status without the token, for doctor
    tracing_file: Path     # ~/.coda/tracing.json: tracking URI and experiment, for the trace hooks
    tracing_log: Path      # ~/.coda/tracing.log: what the trace hooks did
    usage_file: Path       # ~/.coda/usage.json: requests and tokens per day, agent and model (section 11)
    git_hooks: Path        # ~/.coda/git-hooks: the global core.hooksPath CoDA sets
    skill_sources: Path    # ~/.coda/skill-sources: checkouts of the skill packs ...
    skill_folders: tuple   # ... linked into ~/.claude/skills and ~/.agents/skills
    sync_log: Path         # ~/.sync.log: what the post-commit syncs did
    state_layout: Path     # ~/.coda/state-layout.json: the page's tabs with each session's label, folder and agent
    state_record: Path     # ~/.coda/state-record.json: the last save or restore (no token); saving waits for it
    state_restored: Path   # ~/.coda/state-restored.json: the tabs a restore brought back, for the page
    state_work: Path       # ~/.coda/state-work: a save's scratch folder

    @classmethod
    def under(cls, home):
        coda = home / ".coda"
        return cls(home=home, projects=home / "projects", uploads=home / "uploads", local=home / ".local",
                   local_bin=home / ".local" / "bin", databrickscfg=home / ".databrickscfg",
                   proxy_key_file=coda / "proxy-key", pat_status_file=coda / "pat-status.json",
                   tracing_file=coda / "tracing.json", tracing_log=coda / "tracing.log",
                   usage_file=coda / "usage.json",
                   git_hooks=coda / "git-hooks", skill_sources=coda / "skill-sources",
                   skill_folders=(home / ".claude" / "skills", home / ".agents" / "skills"),
                   sync_log=home / ".sync.log", state_layout=coda / "state-layout.json",
                   state_record=coda / "state-record.json", state_restored=coda / "state-restored.json",
                   state_work=coda / "state-work")


PATHS = Paths.under(CONFIG.home)


def write_private(path, text):
    """Write atomically (a temporary file renamed over the target) with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def read_json_object(path):
    """The JSON object a file of CoDA's own holds, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Process:
    """The objects that make up the running server, built and wired together in one place, wire()
    (section 12): a map of who talks to whom. Functions (routes, the proxy, setup steps) reach them
    here; the objects themselves get what they call passed in."""
    access = None        # Access (3): who may pass
    sessions = None      # Sessions (5): the terminals; at shutdown it tells every socket
    sockets = None       # set of TerminalSocket (7): every open WebSocket
    gateway = None       # Gateway (8): where the agents' model calls go
    models = None        # ServedModels (8): what the workspace serves; model_choice (9) picks from it
    pat = None           # Pat (8): the token; it tells the gateway, ~/.databrickscfg and setup
    delta_logs = None    # DeltaLogShipper (8), once serve starts it: app logs, sent with pat's token
    setup = None         # Setup (10): the steps; their token steps run whenever pat has a new token
    proxy_port = None    # ProxyPort (11): whether this process's proxy holds CODA_PROXY_PORT
    proxy_server = None  # the running local proxy (11), for shutdown
    usage = None         # UsageCounter (11): what each agent spent, counted by the proxy
    state = None         # StateKeeper (10): the tabs' layout, and the saves of the work to the workspace


PROCESS = Process()
SECRET_VARIABLES = ("CODA_TOKEN", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET")  # CONFIG holds them


def scrub_secrets_from_environment(names=SECRET_VARIABLES):
    """Wipe the secrets CONFIG now holds from this process's environment, where a terminal could read them.

    os.environ.pop alone leaves them in the block /proc/<pid>/environ shows (readable by the same
    user, and by root even from an undumpable process): libc's `environ` strings point into that
    block, so their values are overwritten in place first. Then no child inherits them either.
    """
    import ctypes

    prefixes = tuple(f"{name}=".encode() for name in names)
    try:
        entries = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
    except (OSError, ValueError):
        entries = [None]  # no C library environ to reach: os.environ is all there is
    index = 0
    while (entry := entries[index]) is not None:
        if entry.startswith(prefixes):
            address = ctypes.cast(entries, ctypes.POINTER(ctypes.c_void_p))[index]
            start = entry.index(b"=") + 1
            ctypes.memset(address + start, 0, len(entry) - start)
        index += 1
    for name in names:
        os.environ.pop(name, None)

# Limits of the wire contract.
MAX_INPUT_BYTES = 1 * MIB        # one /api/input or terminal_input
MAX_JSON_BODY = 8 * MIB          # a JSON body (1 MiB of input may escape to 6x)
MAX_WS_MESSAGE = 1 * MIB         # a client WebSocket message; larger closes with 1009
MAX_POLL_WAIT = 30.0             # seconds a long-poll may hold
POLL_SLICE = 1 * MIB             # bytes of output in one JSON answer
FRAME_SLICE = 64 * KIB           # bytes of output in one binary frame (an echo waits behind at most one)
READ_SIZE = 64 * KIB             # bytes gathered from the PTY before one append
TYPING_SECONDS = 1.0             # a session typed into this recently is interactive (Keystrokes)
PING_SECONDS = 25                # WebSocket keep-alive, under the contract's 30 s
CLOSE_GRACE = 2.0                # SIGHUP to SIGKILL
INPUT_QUEUE_BYTES = 4 * MIB      # input waiting for one session's program; beyond it input is refused (429)
EXITED_LINGER = 300              # an exited session stays readable this long

# Timeouts (seconds) of calls that leave the process, named once so tests can shrink them. The
# SDK's own and the proxy's upstream wait are settings (sdk_http_timeout, sdk_retry_timeout,
# proxy_timeout above).
PROBE_SECONDS = 3                # one HEAD probing a gateway generation (section 8)
PROXY_PROBE_SECONDS = 2          # the local proxy's /health challenge (setup's proxy step, doctor)
PROXY_SETTLE_SECONDS = 10        # waiting for the proxy to hold its port and answer (section 10)
PROXY_RESTART_PAUSE = 5          # before the supervised proxy server is started again (section 11)
VERSION_TIMEOUT = 60             # `agent --version`, proving an install runs (section 10)
GIT_CONFIG_TIMEOUT = 30          # one `git config` (section 10)
DOCTOR_HTTP_SECONDS = 10         # doctor's reachability check of the workspace

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
    for secret in tuple(SECRETS):  # a native thread's log record may race a rotation's update
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

LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


class Access:
    """Decides who may pass. HTTP routes and the WebSocket upgrade both ask `denied`."""

    def __init__(self, config):
        self.config = config
        self.apps_mode = bool(config.app_name)
        self.token = config.local_token
        if not self.apps_mode and self.token is None:
            self.token = secrets.token_urlsafe(24)
        if self.token:
            SECRETS.add(self.token)
        self.bind(config.host, config.port)
        self.owner = config.app_owner.lower() or None  # in Apps mode, filled from the Apps API otherwise
        self.owner_error = None if self.owner or not self.apps_mode else "app owner not resolved yet"

    def bind(self, host, port):
        """Where serve() listens. Cookies are not scoped by port, so the cookie carries a value
        derived from the token and this port, never the token, and its name says the port."""
        self.bound_host = host
        self.cookie_name = f"coda_{port}"
        self.cookie_value = hmac.new((self.token or "").encode(), f"coda cookie for port {port}".encode(),
                                     "sha256").hexdigest()

    def cookie(self):
        """The Set-Cookie value that trades a URL token for a session cookie."""
        return f"{self.cookie_name}={self.cookie_value}; HttpOnly; SameSite=Strict; Path=/"

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
        return offers_secret(environ, self.token, "token") or \
            hmac.compare_digest(_cookie(environ, self.cookie_name).encode(), self.cookie_value.encode())

    @staticmethod
    def _changes_state(environ):
        return environ.get("REQUEST_METHOD") not in ("GET", "HEAD", "OPTIONS") or \
            environ.get("HTTP_UPGRADE", "").lower() == "websocket"

    def _origin_ok(self, environ):
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            return True  # not a browser's cross-site request
        netloc = _netloc(origin)
        hosts = {environ.get("HTTP_HOST", "").lower()}
        if self.apps_mode:
            hosts.add(environ.get("HTTP_X_FORWARDED_HOST", "").lower())
        return bool(netloc and netloc in hosts) or origin.rstrip("/") in self.config.allowed_origins

    def _allowed_hosts(self):
        return {_hostname(_netloc(o)) for o in self.config.allowed_origins}


def offers_secret(environ, secret, query_name, *also):
    """Whether the request offers `secret`: as ?query_name=, a Bearer token, or one of `also`."""
    offered = [urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get(query_name, [""])[0], *also]
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if auth[:7].lower() == "bearer ":
        offered.append(auth[7:].strip())
    return any(o and hmac.compare_digest(o.encode(), secret.encode()) for o in offered)


def _netloc(url):
    """The lowercased host[:port] of a URL, or "" when it cannot be parsed (e.g. "http://[")."""
    try:
        return urllib.parse.urlsplit(url).netloc.lower()
    except ValueError:
        return ""


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

    def read_base64(self, since, limit=POLL_SLICE):
        """(base64 text, offset, next_offset, truncated): the exact bytes, for JSON
        answers that must carry output which is not valid UTF-8."""
        offset, data, truncated = self.read(since, limit)
        return base64.b64encode(data).decode("ascii"), offset, offset + len(data), truncated


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
_real_select = _monkey.get_original("select", "select")


class ApiError(Exception):
    """A request that cannot be served: the status and one clear sentence."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def is_ci_marker(name):
    """A browser terminal is interactive even when CoDA was started by a CI job;
    these variables make Gemini CLI and other Ink TUIs refuse interactive mode."""
    return name in ("CI", "CONTINUOUS_INTEGRATION") or name.startswith("CI_")


def shell_environment(config, agent_variables, base=os.environ):
    """The environment a terminal starts with: ours, minus every secret, plus the agents' variables."""
    env = {k: v for k, v in base.items()
           if k not in SECRET_NAMES and not k.upper().endswith(SECRET_SUFFIXES) and not is_ci_marker(k)}
    env.update(TERM="xterm-256color", COLORTERM="truecolor", HOME=str(PATHS.home),
               CODA_VERSION=__version__, **agent_variables)
    if not any(env.get(k) for k in ("LC_ALL", "LC_CTYPE", "LANG")):
        env["LANG"] = "C.UTF-8"
    local_bin = str(PATHS.local_bin)
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


# -- notices (issue 13) ---------------------------------------------------------------------------
# A program asks for attention with the bell (BEL outside an escape string), OSC 9 (iTerm2's notify)
# or OSC 777;notify;TITLE;BODY (urxvt's; the agents' hooks write it, section 9). Output is untrusted:
# the scan is a few C-speed regex passes per read, text is bounded and stripped of control
# characters, and each session gets at most NOTICE_BURST notices, then one per NOTICE_EVERY seconds.
NOTICE_OSC = re.compile(rb"\x1b\](9|777);([^\x07\x18\x1a\x1b]{0,1024})(?:\x07|\x1b\\)")
ESCAPE_STRING = re.compile(rb"\x1b\][^\x07\x18\x1a\x1b]*\x07?|\x1b[P_^X][^\x18\x1a\x1b]*")  # BEL inside is no bell
STRING_END = {b"]": re.compile(rb"[\x07\x18\x1a\x1b]"), b"P": re.compile(rb"[\x18\x1a\x1b]")}
NOTICE_CARRY = 4 * KIB   # an escape string still open at the end of a read is kept up to this, for the next
NOTICE_BURST, NOTICE_EVERY = 4, 2.0


class NoticeScanner:
    """Finds notices in a session's output, read by read, also when a sequence spans two reads."""

    def __init__(self):
        self.carry = b""
        self.tokens, self.refilled = NOTICE_BURST, time.monotonic()

    def scan(self, data):
        """[(kind, title, body)] in `data`, within the session's rate limit."""
        if not self.carry and b"\x07" not in data and b"\x1b" not in data:
            return []
        data = self.carry + data
        cut = open_string_start(data)
        data, self.carry = data[:cut], data[cut:]
        if len(self.carry) > NOTICE_CARRY:  # still inside the same string, whose text no longer matters
            self.carry = self.carry[:2] + b"-"
        found = [notice for match in itertools.islice(NOTICE_OSC.finditer(data), NOTICE_BURST)
                 if (notice := osc_notice(*match.groups()))]
        if b"\x07" in data and b"\x07" in ESCAPE_STRING.sub(b"", data):
            found.append(("bell", "", ""))
        return [notice for notice in found if self._allowed()]

    def _allowed(self):
        now = time.monotonic()
        self.tokens = min(NOTICE_BURST, self.tokens + (now - self.refilled) / NOTICE_EVERY)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def open_string_start(data):
    """Where an escape sequence still open at the end of `data` starts (len(data) when none is):
    an escape ends every string, so only the last one can be open."""
    esc = data.rfind(b"\x1b")
    if esc < 0:
        return len(data)
    if esc == len(data) - 1:
        return esc  # a lone ESC: the next read says what it starts
    kind = data[esc + 1:esc + 2]
    if kind not in (b"]", b"P", b"_", b"^", b"X"):
        return len(data)
    ended = STRING_END[b"]" if kind == b"]" else b"P"].search(data, esc + 2)
    return len(data) if ended else esc


def osc_notice(number, text):
    """(kind, title, body) for OSC 9 or OSC 777 text, or None for their other uses."""
    if number == b"9":
        if re.match(rb"\d+(;|$)", text):  # ConEmu's OSC 9;N (progress bars and the like), not a notice
            return None
        return "osc9", "", notice_clean(text, 300)
    if text.startswith(b"coda-download;"):  # `coda.py download`: an offer whose path /api/download checks
        path = download_offer_path(text[len(b"coda-download;"):])
        return path and ("download", "", path)
    if not text.startswith(b"notify;"):
        return None
    title, _, body = text[len(b"notify;"):].partition(b";")
    return "osc777", notice_clean(title, 100), notice_clean(body, 300)


FILE_ROOTS = ("projects", "uploads")  # what files out (section 6) serves, under HOME
MAX_FILE_PATH = 4096


def download_offer_path(quoted):
    """The path a download offer names, if it has the shape /api/download accepts, else None."""
    try:
        path = urllib.parse.unquote(quoted.decode("ascii"), errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    parts = path.split("/")
    if (len(path) > MAX_FILE_PATH or parts[0] not in FILE_ROOTS or len(parts) < 2
            or any(p in ("", ".", "..") for p in parts) or not path.isprintable()):
        return None
    return path


def _readable_now(fds):
    """Whether one of `fds` has something to read, without waiting (a closed one has not)."""
    try:
        return bool(_real_select(fds, (), (), 0)[0])
    except (OSError, ValueError):
        return False


def notice_clean(raw, limit):
    text = raw.decode("utf-8", "replace")
    return "".join(ch for ch in text if ch.isprintable()).strip()[:limit]


class Keystrokes:
    """Which session was typed into last, when, and the descriptors its echo comes through:
    its PTY and the socket that carried the keystroke. The event loop is one: a flood's
    reader spends about a millisecond on each turn's 64 KiB of PTY reads, and an echo needs
    three turns (the keystroke, the program's answer, its frame). So beside a session
    being typed into, every other reader lets what was woken before it go first, and ends
    its turn as soon as one of those descriptors has something (Session._pump)."""

    def __init__(self):
        self.session_id, self.at, self.fds = None, -TYPING_SECONDS, ()

    def typed(self, session_id, fds):
        self.session_id, self.at, self.fds = session_id, time.monotonic(), fds

    def seconds_left(self, session_id):
        """How long another session than this one stays interactive: 0 when none is."""
        if self.session_id in (None, session_id):
            return 0.0
        return max(0.0, self.at + TYPING_SECONDS - time.monotonic())

    def urgent_fds(self, session_id):
        """The descriptors to give way to, when another session than this is being typed into."""
        return self.fds if self.seconds_left(session_id) else ()


class Subscriber:
    """A reader joined to a session, for flow control: acked or sent offset."""

    def __init__(self, position):
        self.position = position
        self.acking = False
        self.acked = gevent.event.Event()  # set at each ack: a sender held to a budget waits on it
        self.sending = False  # its sender is inside a frame: stopping it now would cut the frame
        self.left = False     # the reader has gone: its sender ends after the frame it is in


class Session:
    """A shell on a PTY: its process group, its output stream and its reader."""

    def __init__(self, config, label, cols, rows, env, cwd=None, command=None, on_notice=None, keystrokes=None):
        self.config = config
        self.keystrokes = keystrokes or Keystrokes()  # the manager's, shared by every session
        self.on_notice = on_notice  # (notice) -> None: tell every page (section 7's sockets)
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
        self._input = collections.deque()  # input not yet written, in arrival order (WS and HTTP alike)
        self._input_bytes = 0
        self._input_waiting = gevent.event.Event()
        self.notices = collections.deque(maxlen=16)  # the latest notices, for the long-poll answers
        self._notice_scanner = NoticeScanner()
        projects = PATHS.projects
        projects.mkdir(parents=True, exist_ok=True)
        master, slave = os.openpty()
        try:
            _set_winsize(master, cols, rows)
            self.pid = spawn_on_terminal([config.shell], env, cwd or projects, slave)
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
        self._writer = gevent.spawn(self._write_forever)
        gevent.spawn(self._await_exit)
        if command:  # typed, not exec'd: when the agent ends, its shell is still there
            self.write(command.encode() + b"\r")

    # -- output ------------------------------------------------------------
    def _pump(self):
        """The reader greenlet: PTY to stream, pausing while every client lags."""
        hub = gevent.get_hub()
        while self.fd is not None:
            self._may_read.wait()
            urgent = self.keystrokes.urgent_fds(self.id)
            if urgent:
                gevent.sleep(0)  # the typed session's frame, woken in this loop turn, goes first
            data, ended = self._read_available(urgent)
            if data:
                self._notice(data)
                self.stream.append(data)
                self.update_flow()
            if ended:
                return
            if urgent or not data:  # beside typing, at once if there is more, but after every other ready descriptor
                hub.wait(self._readable)

    def _read_available(self, urgent_fds=()):
        """(bytes, ended): what the PTY has now, up to READ_SIZE, or less once one of
        `urgent_fds` is readable. The tty layer hands out about 4 KiB per read (some
        50 us each); gathering them makes one append and one wake-up."""
        parts, size = [], 0
        while size < READ_SIZE:
            if parts and urgent_fds and _readable_now(urgent_fds):
                break
            try:
                chunk = os.read(self.fd, READ_SIZE - size)
            except BlockingIOError:
                return b"".join(parts), False
            except (OSError, TypeError):
                return b"".join(parts), True  # EIO: every holder of the terminal has closed it
            if not chunk:
                return b"".join(parts), True
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts), False

    def _notice(self, data):
        """Tell every page of the notices in `data`; each is placed at the offset where `data` begins."""
        for kind, title, body in self._notice_scanner.scan(data):
            notice = {"type": "notify", "session_id": self.id, "kind": kind, "title": title, "body": body,
                      "offset": self.stream.end}
            self.notices.append(notice)
            if self.on_notice:
                gevent.spawn(self.on_notice, notice)  # never a slow socket's wait in the reader

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
        self.update_flow()  # one that joins caught up has nothing to send: its join is what resumes a pause
        return subscriber

    def unsubscribe(self, subscriber):
        self.subscribers.discard(subscriber)
        self.update_flow()

    # -- input -------------------------------------------------------------
    def write(self, data, socket_fd=None):
        """Write keystrokes to the PTY, queueing what it does not take now, and return at
        once: a program that reads nothing stalls only its own session, never the socket
        or request that carries them. With nothing queued they go in at once (a keystroke
        so skips the writer's turn of the event loop). `socket_fd`: the WebSocket that
        carried them, where the next keystrokes will arrive (Keystrokes)."""
        if self.fd is None:
            raise ApiError(404, "Session not found.")
        self.keystrokes.typed(self.id, (self.fd,) if socket_fd is None else (self.fd, socket_fd))
        if self._input_bytes + len(data) > INPUT_QUEUE_BYTES:
            raise ApiError(429, f"This session's program is not reading its input: with this, more than "
                                f"{INPUT_QUEUE_BYTES // MIB} MiB would be waiting for it, so this input was not sent.")
        if not self._input:
            try:
                data = data[os.write(self.fd, data):]
            except OSError:
                pass  # full: the writer waits for room; gone: the writer finds out
            if not data:
                return
        self._input.append(data)
        self._input_bytes += len(data)
        self._input_waiting.set()

    def _write_forever(self):
        """The writer greenlet: queued input to the PTY, in order."""
        while True:
            self._input_waiting.wait()
            self._input_waiting.clear()
            while self._input:
                if not self._write_all(self._input[0]):
                    self._input.clear()  # the terminal is gone; the exit notice follows
                    self._input_bytes = 0
                    break
                self._input_bytes -= len(self._input.popleft())

    def _write_all(self, data):
        """Write `data`, waiting while the PTY is full; False when the terminal is gone."""
        hub = gevent.get_hub()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                hub.wait(self._writable)
            except OSError:
                return False
        return True

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

    def busy(self):
        """Whether a program other than the shell holds the terminal (closing its pane would end it)."""
        try:
            return self.exit_code is None and os.tcgetpgrp(self.fd) != self.pid
        except (OSError, TypeError):
            return False

    def directory(self):
        """The foreground program's working directory, as ~/...; None when it cannot be read."""
        try:
            path = Path(os.readlink(f"/proc/{os.tcgetpgrp(self.fd)}/cwd"))
        except (OSError, TypeError):
            return None
        return "~/" + str(path.relative_to(PATHS.home)) if path.is_relative_to(PATHS.home) else str(path)

    def describe(self):
        now = time.time()
        return {"session_id": self.id, "label": self.label, "created_at": self.created_at,
                "last_activity": self.last_activity, "idle_seconds": round(now - self.last_activity, 1),
                "process": self.process_name(), "offset": self.stream.end,
                "exited": self.exit_code is not None, "busy": self.busy(), "cwd": self.directory()}

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
        self._writer.kill()
        self._input.clear()
        self._input_bytes = 0
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

    def __init__(self, config, environment, on_shutdown, on_notice):
        self.config = config
        self.environment = environment  # () -> a new terminal's environment
        self.on_shutdown = on_shutdown  # () -> None: tell every client, before the shells hang up
        self.on_notice = on_notice      # (notice) -> None: tell every client of a session's notice
        self.by_id = {}
        self.starting = 0
        self.shutting_down = gevent.event.Event()
        self.keystrokes = Keystrokes()

    def create(self, label, cols, rows, cwd=None, command=None):
        if self.shutting_down.is_set():
            raise ApiError(503, "CoDA is shutting down.")
        cap = self.config.max_sessions
        if self.running() + self.starting >= cap:
            raise ApiError(429, f"The limit of {cap} concurrent sessions is reached: close a session "
                                "or raise MAX_CONCURRENT_SESSIONS.")
        self.starting += 1
        try:
            session = Session(self.config, label or f"Shell {len(self.by_id) + 1}", cols, rows, self.environment(),
                              cwd, command, self.on_notice, self.keystrokes)
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

    def touch(self, session_ids):
        """Heartbeat: keep the listed live sessions from the idle reaper (unknown ids are ignored)."""
        for session_id in session_ids:
            if isinstance(session_id, str) and session_id in self.by_id:
                self.by_id[session_id].touch()

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
        self.on_shutdown()
        for session in self.by_id.values():
            session.stream.wake()
        closers = [gevent.spawn(self.close, sid) for sid in list(self.by_id)]
        gevent.joinall(closers, timeout=CLOSE_GRACE + 4)


# ===========================================================================
# 6. HTTP API
# ===========================================================================

app = bottle.Bottle()
SECURITY_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
     "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; worker-src 'self'; "
     "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]


MAX_SAFE_INTEGER = 2 ** 53 - 1  # the largest offset or count a client (JavaScript) can name exactly


def api(path, method="POST", body_limit=MAX_JSON_BODY):
    """Route decorator: JSON in (for POST; body_limit=None: the handler reads the body itself),
    JSON out (application/json, whatever the handler returns), ApiError to {"error"}."""

    def decorate(handler):
        def route(**kwargs):
            bottle.response.set_header("Cache-Control", "no-store")
            try:
                if method == "POST" and body_limit:
                    kwargs["body"] = _json_body(body_limit)
                answer = handler(**kwargs)
            except ApiError as error:
                bottle.response.status = error.status
                answer = {"error": str(error)}
            bottle.response.content_type = "application/json"
            return json.dumps(answer)

        app.route(path, method, route)
        return handler

    return decorate


def _json_body(limit):
    if bottle.request.content_length > limit:
        raise ApiError(413, "The request body is too large.")
    data = bottle.request.environ["wsgi.input"].read(limit + 1)  # bounded, chunked or not
    if len(data) > limit:
        raise ApiError(413, "The request body is too large.")
    body = parse_json(data or b"{}", "The request body")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _no_constant(name):
    raise ValueError(f"{name} is not a number")


def parse_json(data, what):
    """JSON as the wire contract has it: UTF-8, no NaN or Infinity (Python's json takes them)."""
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"{what} is not valid JSON.") from None


def field(body, name, kind, default=..., low=None, high=None):
    """body[name], checked to be of `kind` (and within low..high); ApiError(400) otherwise."""
    if name not in body or body[name] is None:
        if default is ...:
            raise ApiError(400, f"The field '{name}' is required.")
        return default
    value = body[name]
    number = kind in (int, float)
    if number and isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"The field '{name}' must be a finite number.")
    if number and isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_SAFE_INTEGER:
        raise ApiError(400, f"The field '{name}' is too large.")
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ApiError(400, f"The field '{name}' must be {'a number' if number else 'a ' + kind.__name__}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"The field '{name}' must be between {low} and {high}.")
    return value


MAX_LISTED_IDS = 256  # session ids in one batch or heartbeat


def id_list(body, name, default=...):
    """body[name] as a list of session ids (strings), at most MAX_LISTED_IDS of them."""
    ids = field(body, name, list, default)
    if ids is not None and (len(ids) > MAX_LISTED_IDS or not all(isinstance(i, str) for i in ids)):
        raise ApiError(400, f"The field '{name}' must be a list of at most {MAX_LISTED_IDS} session ids.")
    return ids


def input_bytes(body):
    """body["input"] as the bytes to write: UTF-8, a \\udcXX escape standing for the raw byte XX."""
    try:
        return field(body, "input", str).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside that range: not text, not a byte
        raise ApiError(400, "The field 'input' must be text (it holds a lone UTF-16 surrogate).") from None


def clean_label(text):
    return "".join(ch for ch in text if ch.isprintable())[:100]


def output_encoding(body):
    """How answers carry `output`: "text" (UTF-8, the default) or "base64" (the exact bytes)."""
    encoding = field(body, "encoding", str, "text")
    if encoding not in ("text", "base64"):
        raise ApiError(400, "The field 'encoding' must be \"text\" or \"base64\".")
    return encoding


def output_answer(session, since, limit=POLL_SLICE, encoding="text"):
    read = session.stream.read_base64 if encoding == "base64" else session.stream.read_text
    output, offset, next_offset, truncated = read(since, limit)
    return {"output": output, "offset": offset, "next_offset": next_offset, "truncated": truncated,
            "exited": session.exit_code is not None or session.closing, "exit_code": session.exit_code,
            "shutting_down": PROCESS.sessions.shutting_down.is_set()}


def _has_news(answer):
    return answer.get("output") or answer.get("exited") or answer.get("truncated") or "error" in answer


def wait_for_output(sessions_and_offsets, wait, encoding="text"):
    """Long-poll: answers for every (session, since) as soon as any has news, or after `wait` s."""
    deadline = time.monotonic() + wait
    while True:
        events = [s.stream.changed() for s, _ in sessions_and_offsets if s]
        answers = [output_answer(s, since, encoding=encoding) if s else {"error": "Session not found", "exited": True}
                   for s, since in sessions_and_offsets]
        remaining = deadline - time.monotonic()
        if any(map(_has_news, answers)) or remaining <= 0 or PROCESS.sessions.shutting_down.is_set():
            return answers
        gevent.wait(events + [PROCESS.sessions.shutting_down], timeout=remaining, count=1)


# The page and its files are asked again on every load (a 304 while unchanged): with no
# Cache-Control a browser may keep an old app.js for hours after an upgrade, beside a new server.
def page_file(path):
    answer = bottle.static_file(path, root=HERE / "static")
    answer.set_header("Cache-Control", "no-cache")
    return answer


@app.get("/")
def index():
    return page_file("index.html")


@app.get("/static/<path:path>")
def static(path):
    return page_file(path)


@app.get("/health")
def health():
    answer = {"status": "healthy", "version": __version__, "setup_status": PROCESS.setup.overall(),
              "active_sessions": len(PROCESS.sessions.by_id)}
    if PROCESS.access.owner_error:
        answer["owner_error"] = PROCESS.access.owner_error
    return answer


@api("/api/version", "GET")
def version():
    return {"version": __version__}


@api("/api/sessions", "GET")
def list_sessions():
    return [s.describe() for s in PROCESS.sessions.by_id.values()]


@api("/api/session")
def create_session(body):
    label = clean_label(field(body, "label", str, ""))
    cols = field(body, "cols", int, 80, 1, 1000)
    rows = field(body, "rows", int, 24, 1, 1000)
    command = launch_command(field(body, "agent", str, "shell"))
    project, cwd = field(body, "project", str, ""), field(body, "cwd", str, "")
    if project and cwd:
        raise ApiError(400, "Give a new session 'project' or 'cwd', not both.")
    session = PROCESS.sessions.create(label, cols, rows, project_path(project) or home_folder(cwd), command)
    return {"session_id": session.id, "label": session.label, "created_at": session.created_at}


# -- The launcher: what a new tab may start, and where ------------------------------------------
# A session starts a shell; with "agent" it types that agent's command into it, and with "project"
# it starts in that folder of ~/projects. Both are checked here: only names from the agent table
# (no other command reaches the shell this way), only a folder directly in ~/projects that stays
# inside it once its symbolic links are resolved.

def launch_command(name):
    """The command a new session types for `name` ("shell": none); ApiError(400) for any other name."""
    if name == "shell":
        return None
    agent = next((a for a in AGENT_ROWS if a.name == name), None)
    if agent is None:
        names = ", ".join(["shell", *(a.name for a in AGENT_ROWS)])
        raise ApiError(400, f"The field 'agent' must be one of {names}.")
    if agent.name in CONFIG.agents_off:
        raise ApiError(400, f"{agent.label} is switched off ({agent.switch}=false).")
    return agent.name


def project_path(name):
    """~/projects/NAME for a project folder ("": ~/projects itself); ApiError(400) for anything else."""
    if not name:
        return None
    root = PATHS.projects.resolve()
    if "/" in name or "\\" in name or name.startswith(".") or not name.isprintable() \
            or len(name.encode()) > 255:  # a longer name is no folder (and would fail the lookup itself)
        raise ApiError(400, "The field 'project' must name a folder in ~/projects.")
    path = (PATHS.projects / name).resolve()
    if path.parent != root or not path.is_dir():
        raise ApiError(400, f"~/projects/{name} is not a folder in ~/projects.")
    return path


@api("/api/projects", "GET")
def list_projects():
    """The folders a new tab may start in: ~/projects' own folders (hidden ones and links out left out)."""
    root = PATHS.projects.resolve()
    names = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.resolve().parent == root
                   and p.is_dir()) if root.is_dir() else []
    return {"root": "~/projects", "projects": names[:MAX_LISTED_PROJECTS]}


MAX_LISTED_PROJECTS = 500  # folders /api/projects lists


def home_folder(text):
    """`cwd` of a new session: a folder under HOME, given relative to it (as a restored tab names
    it) or absolute; None (~/projects) when empty."""
    if not text:
        return None
    home = PATHS.home.resolve()
    folder = (home / text).resolve()
    if home not in (folder, *folder.parents) or not folder.is_dir():
        raise ApiError(400, "The field 'cwd' must name an existing folder under HOME.")
    return folder


@api("/api/session/attach")
def attach_session(body):
    encoding = output_encoding(body)
    session = PROCESS.sessions.get(field(body, "session_id", str))
    since = field(body, "since", int, session.stream.start, 0)
    session.touch()
    answer = output_answer(session, since, CONFIG.scrollback_bytes, encoding)  # all that is kept, in one answer
    answer.update(session_id=session.id, label=session.label, created_at=session.created_at,
                  process=session.process_name())
    return answer


@api("/api/session/label")
def label_session(body):
    session = PROCESS.sessions.get(field(body, "session_id", str))
    session.label = clean_label(field(body, "label", str))
    return {"status": "ok"}


@api("/api/session/close")
def close_session(body):
    PROCESS.sessions.close(field(body, "session_id", str))
    return {"status": "ok"}


@api("/api/input")
def send_input(body):
    session = PROCESS.sessions.get(field(body, "session_id", str))
    data = input_bytes(body)
    if len(data) > MAX_INPUT_BYTES:
        raise ApiError(413, "Input is limited to 1 MiB per request.")
    session.touch()
    session.write(data)
    return {"status": "ok"}


@api("/api/resize")
def resize(body):
    session = PROCESS.sessions.get(field(body, "session_id", str))
    session.resize(field(body, "cols", int, ..., 1, 1000), field(body, "rows", int, ..., 1, 1000))
    return {"status": "ok"}


@api("/api/output")
def poll_output(body):
    session_id = field(body, "session_id", str)
    since = field(body, "since", int, None, 0)
    wait = min(field(body, "wait", float, 0.0, 0.0), MAX_POLL_WAIT)
    encoding = output_encoding(body)
    session = PROCESS.sessions.get(session_id)
    session.touch()
    [answer] = wait_for_output([(session, session.http_cursor if since is None else since)], wait, encoding)
    if since is None:
        session.http_cursor = answer["next_offset"]
    return with_notices(session, answer)


@api("/api/output-batch")
def poll_output_batch(body):
    ids = id_list(body, "session_ids")
    since = field(body, "since", dict, {})
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SAFE_INTEGER for v in since.values()):
        raise ApiError(400, "The field 'since' must map session ids to offsets.")
    wait = min(field(body, "wait", float, 0.0, 0.0), MAX_POLL_WAIT)
    encoding = output_encoding(body)
    wanted = []
    for session_id in ids:
        session = PROCESS.sessions.by_id.get(session_id)
        if session:
            session.touch()
        wanted.append((session, since.get(session_id, session.http_cursor if session else 0)))
    answers = wait_for_output(wanted, wait, encoding)
    for (session, offset), answer in zip(wanted, answers):
        if session and session.id not in since:
            session.http_cursor = answer["next_offset"]
        with_notices(session, answer)
    return {"outputs": dict(zip(ids, answers)), "shutting_down": PROCESS.sessions.shutting_down.is_set()}


def with_notices(session, answer):
    """`answer` with the session's notices that lie in its output (issue 13), so that a poll
    client hears each once, as a socket does; the field is there only when there are some."""
    if session and "next_offset" in answer:
        notices = [n for n in session.notices if answer["offset"] <= n["offset"] < answer["next_offset"]]
        if notices:
            answer["notices"] = notices
    return answer


@api("/api/heartbeat")
def heartbeat(body):
    ids = id_list(body, "session_ids", None)
    if ids is None:
        ids = [field(body, "session_id", str)]
    PROCESS.sessions.touch(ids)
    return {"status": "ok"}


UPLOAD_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@api("/api/upload", body_limit=None)  # multipart, read by _save_upload
def upload():
    return {"path": _save_upload()}


def size_text(size):
    return f"{size / MIB:.0f} MiB" if size >= MIB else f"{size / KIB:.0f} KiB" if size >= KIB else f"{size} bytes"


def _save_upload():
    limit = CONFIG.max_upload_bytes
    too_large = ApiError(413, f"Uploads are limited to {size_text(limit)} (CODA_MAX_UPLOAD_BYTES).")
    if bottle.request.content_length < 0:  # chunked: Bottle would spool all of it before we could count
        raise ApiError(411, "Send the upload with a Content-Length.")
    if bottle.request.content_length > limit + 64 * KIB:  # the file plus multipart framing
        raise too_large
    try:
        item = bottle.request.files.get("file")
    except (ValueError, bottle.HTTPError):
        item = None
    if item is None:
        raise ApiError(400, "Send the file as multipart form data in the field 'file'.")
    name = UPLOAD_NAME.sub("_", Path(item.raw_filename or "").name).lstrip("._")[:100] or "upload"
    folder = PATHS.uploads
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


# Files out (issue 13): the files panel lists and downloads under ~/projects and ~/uploads only.
# A path is relative to HOME and names its root first ("projects/app/main.py"). It is refused
# (JSON 4xx) when absolute, holding NUL, "." or "..", too long, or resolving (symlinks followed)
# outside its root; the opened file is checked again where it really is, against a swap of a folder
# for a symlink meanwhile. Only regular files, up to MAX_DOWNLOAD_BYTES, streamed in chunks.
MAX_DOWNLOAD_BYTES = 1024 * MIB
MAX_LISTING = 1000
DOWNLOAD_CHUNK = 256 * KIB


def requested_path():
    """The `path` query parameter, checked for shape: (root name, [segments])."""
    try:
        values = urllib.parse.parse_qs(bottle.request.query_string, errors="strict").get("path", [""])
    except UnicodeDecodeError:
        raise ApiError(400, "The path must be UTF-8.") from None
    text = values[0].strip("/") if len(values) == 1 else None
    if text is None:
        raise ApiError(400, "Send one 'path'.")
    if len(text) > MAX_FILE_PATH or any(len(part) > 255 for part in text.split("/")):
        raise ApiError(400, "The path is too long.")
    if "\x00" in text or values[0].startswith("/"):
        raise ApiError(400, "The path must be relative to your home folder, without NUL.")
    parts = text.split("/") if text else []
    if any(part in ("", ".", "..") for part in parts):
        raise ApiError(400, "The path must not hold empty, '.' or '..' parts.")
    if parts and parts[0] not in FILE_ROOTS:
        raise ApiError(403, "Only ~/projects and ~/uploads are offered.")
    return parts


def confined(parts):
    """(resolved path, resolved root) for checked `parts`, or ApiError when it leaves its root."""
    root = getattr(PATHS, parts[0])
    try:
        base = root.resolve(strict=True)
        path = root.joinpath(*parts[1:]).resolve(strict=True)
    except FileNotFoundError:
        raise ApiError(404, "No such file or folder.") from None
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        raise ApiError(400, "That path cannot be resolved.") from None
    if not is_within(path, base):
        raise ApiError(403, "That path leads outside ~/projects and ~/uploads.")
    return path, base


def is_within(path, base):
    return path == base or base in path.parents


@api("/api/files", "GET")
def list_files():
    parts = requested_path()
    if not parts:
        return {"path": "", "entries": [{"name": name, "type": "dir"} for name in FILE_ROOTS
                                        if getattr(PATHS, name).is_dir()], "truncated": False}
    folder, _ = confined(parts)
    if not folder.is_dir():
        raise ApiError(400, "That path is not a folder.")
    entries = []
    with os.scandir(folder) as listing:  # bounded: a huge folder shows its first MAX_LISTING
        for entry in itertools.islice(listing, MAX_LISTING + 1):
            try:
                info = entry.stat()
                kind = "dir" if entry.is_dir() else "file" if entry.is_file() else "other"
            except OSError:  # a dangling symlink
                info, kind = None, "other"
            entries.append({"name": entry.name, "type": kind, "size": info.st_size if info and kind == "file" else None,
                            "mtime": info.st_mtime if info else None})
    truncated = len(entries) > MAX_LISTING
    entries = sorted(entries[:MAX_LISTING], key=lambda e: (e["type"] != "dir", e["name"].lower()))
    return {"path": "/".join(parts), "entries": entries, "truncated": truncated}


@app.get("/api/download")
def download():
    bottle.response.set_header("Cache-Control", "no-store")
    try:
        parts = requested_path()
        if not parts:
            raise ApiError(400, "Name a file under projects/ or uploads/.")
        return download_answer(*confined(parts))
    except ApiError as error:
        bottle.response.status = error.status
        bottle.response.content_type = "application/json"
        return json.dumps({"error": str(error)})


def download_answer(path, base):
    """The file at `path` as an attachment, streamed; checked again as opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)  # a FIFO must not block
    except OSError:
        raise ApiError(403, "That file cannot be read.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ApiError(400, "Only regular files can be downloaded.")
        if not is_within(Path(os.readlink(f"/proc/self/fd/{fd}")), base):
            raise ApiError(403, "That path leads outside ~/projects and ~/uploads.")
        if info.st_size > MAX_DOWNLOAD_BYTES:
            raise ApiError(413, f"Downloads are limited to {size_text(MAX_DOWNLOAD_BYTES)}.")
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    name = path.name
    fallback = UPLOAD_NAME.sub("_", name).lstrip(".") or "download"
    bottle.response.content_type = "application/octet-stream"
    bottle.response.set_header("Content-Disposition", f"attachment; filename=\"{fallback}\"; "
                                                      f"filename*=UTF-8''{urllib.parse.quote(name, safe='')}")
    bottle.response.set_header("Content-Length", str(info.st_size))
    log.info("download: %d bytes", info.st_size)
    return file_chunks(file, info.st_size)


def file_chunks(file, size):
    """`size` bytes of `file` (what Content-Length promised, even if it grows meanwhile), in chunks."""
    with file:
        while size > 0 and (block := file.read(min(DOWNLOAD_CHUNK, size))):
            size -= len(block)
            yield block


ERROR_SENTENCES = {400: "The request is malformed.", 404: "Not found.", 405: "Method not allowed.",
                   413: "The request is too large.", 414: "The request line is too long.", 500: "Internal error."}


def error_body(status):
    """The JSON answer for an error Bottle or pywsgi answers itself: {"error": "<one sentence>"}."""
    return json.dumps({"error": ERROR_SENTENCES.get(status, "The request failed.")})


def http_error(error):
    """Bottle's own errors (no route, wrong method, a body it cannot parse) as {"error"}."""
    bottle.response.content_type = "application/json"
    return error_body(error.status_code)


app.default_error_handler = http_error
app.catchall = False  # an exception reaches coda_app, which logs one redacted line (Bottle would print a traceback)


def coda_app(environ, start_response):
    """The WSGI entry: security headers on every answer, access before any route."""

    def start(status, headers, exc_info=None):
        return start_response(status, headers + SECURITY_HEADERS, exc_info)

    try:
        return _admit(environ, start)
    except Exception as error:  # a bug, not the client's: one line, no traceback, a JSON 500
        log.error("internal error on %s %.200r: %s: %.300r", environ.get("REQUEST_METHOD"),
                  environ.get("PATH_INFO"), type(error).__name__, str(error))
        try:
            return _plain_json(start, "500 Internal Server Error", {"error": "Internal error."}, sys.exc_info())
        except Exception:
            return []  # the answer had begun: the connection just ends


def _admit(environ, start):
    if environ.get("PATH_INFO") != "/health":
        reason = PROCESS.access.denied(environ)
        if reason and environ.get("PATH_INFO") == "/" and environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return _refusal_page(start, reason)  # a person at a browser, not a client of the API
        if reason:
            return _plain_json(start, "403 Forbidden", {"error": reason})
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if "token" in query and environ.get("REQUEST_METHOD") == "GET" and PROCESS.access.token:
            # Trade the URL token for a cookie, so it leaves the address bar and history.
            rest = urllib.parse.urlencode({k: v for k, v in query.items() if k != "token"}, doseq=True)
            location = local_path(environ.get("PATH_INFO", "/")) + (f"?{rest}" if rest else "")
            start("303 See Other", [("Location", location), ("Set-Cookie", PROCESS.access.cookie()),
                                    ("Content-Length", "0")])
            return [b""]
    return app(environ, start)


def local_path(path):
    """`path` as a Location that stays on this server: "/" unless it starts with one "/" and has no
    backslash ("//evil.example/" and "/\\evil.example" are other hosts to a browser), percent-encoded."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return urllib.parse.quote(path.encode("latin-1", "replace"), safe="/!$&'()*+,;=:@-._~")


REFUSAL_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>CoDA: sign in</title></head>
<body style="font: 16px/1.5 system-ui, sans-serif; max-width: 36em; margin: 3em auto; padding: 0 1em">
<h1>CoDA needs its access token</h1>
<p>{reason}</p>
<p>{how}</p>
</body></html>
"""
LOCAL_TOKEN_HOW = ("CoDA printed the address to open, with its token, when it started: look for the line "
                   "<code>http://127.0.0.1:PORT/?token=&hellip;</code> in the terminal (or log) where "
                   "<code>python coda.py</code> runs, and open that address. With <code>CODA_TOKEN</code> "
                   "set, the token is that value.")


def _refusal_page(start, reason):
    """A small HTML page for a browser refused at `/`: why, and where the address with the token is."""
    how = LOCAL_TOKEN_HOW if not PROCESS.access.apps_mode else "Open this app from the Databricks workspace, signed in as its owner."
    body = REFUSAL_PAGE.format(reason=html.escape(reason), how=how).encode()
    start("403 Forbidden", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]


def _plain_json(start, status, payload, exc_info=None):
    body = json.dumps(payload).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], exc_info)
    return [body]


# ===========================================================================
# 7. WebSocket
# ===========================================================================

OUTPUT_FRAME = 0x01
BESIDE_TYPING = 96 * KIB  # unacked bytes another session on the socket may have in flight meanwhile ...
LINK_RATE = 10_000_000   # ... or, on a distant link, what one round trip carries at this many bytes/s


def tell_every_socket(message):
    for client in list(PROCESS.sockets):
        client.send_json(message)


class MessageTooBig(Exception):
    pass


class BoundedWebSocket(WebSocket):
    """gevent-websocket's socket with what it lacks: a message cap and one writer at a time."""

    def __init__(self, *args):
        super().__init__(*args)
        self.send_lock = gevent.lock.RLock()
        self.message_bytes = 0
        self.round_trips = collections.deque(maxlen=4)  # seconds, from our last pings' pongs

    def handle_pong(self, header, payload):
        """A pong echoes its ping's payload, our clock when we sent it: the link's round trip."""
        try:
            round_trip = (time.monotonic_ns() - int(payload)) / 1e9
        except ValueError:
            return
        if 0 <= round_trip <= 60:  # what a client makes up only sizes its own socket's budget
            self.round_trips.append(round_trip)

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
    """Upgrade only /ws, and only after the same access checks as HTTP. Also what pywsgi lacks:
    a deadline for the request line and headers, JSON for the errors it answers itself, and
    one redacted log line (never a traceback) for whatever goes wrong."""

    header_deadline = None

    def run_application(self):
        if self.environ.get("PATH_INFO") == "/ws" and PROCESS.access.denied(self.environ) is None \
                and _is_websocket_upgrade(self.environ, self.request_version):
            return super().run_application()
        return WSGIHandler.run_application(self)  # plain HTTP: coda_app answers (403 when denied)

    log_request = WSGIHandler.log_request  # gevent-websocket's would log every request line

    def handle(self):
        # pywsgi writes headers and body separately: without NODELAY a small answer
        # waits for the client's delayed ACK (~40 ms), and so does a small frame.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def handle_one_request(self):
        try:
            result = super().handle_one_request()
        except gevent.Timeout as timeout:
            if timeout is not self.header_deadline:
                raise
            return None  # too slow to say what it wants (slowloris): close, before any access check
        finally:
            if self.header_deadline:
                self.header_deadline.cancel()
        if isinstance(result, tuple):  # pywsgi's own answer (a request line over 64 KiB): as JSON
            return result[0], _raw_json_answer(int(result[0]))
        return result

    def read_requestline(self):
        # The deadline covers the wait for a request, its line and its headers, not the body or the
        # answer: a long-poll or a WebSocket may last as long as it needs.
        self.header_deadline = gevent.Timeout.start_new(CONFIG.header_timeout)
        return super().read_requestline()

    def read_request(self, raw_requestline):
        try:
            return super().read_request(raw_requestline)
        finally:
            self.header_deadline.cancel()

    def _handle_client_error(self, error):
        self.log_error("bad request from %s: %s", self.client_address[0], error)
        return "400", _raw_json_answer(400)

    def _send_error_response_if_possible(self, error_code):
        if self.response_length:
            self.close_connection = True
            return
        body = error_body(error_code).encode()
        try:
            self.start_response(f"{error_code} {'Bad Request' if error_code == 400 else 'Internal Server Error'}",
                                [("Content-Type", "application/json"), ("Connection", "close"),
                                 ("Content-Length", str(len(body)))])
            self.write(body)
        except OSError:
            self.close_connection = True

    def _log_error(self, kind, error, tb):
        if not issubclass(kind, gevent.GreenletExit):
            log.error("internal error serving a request: %s: %.300r", kind.__name__, str(error))

    def log_error(self, msg, *args):
        text = msg % args if args else msg
        log.warning("http: %.300r", text)  # repr: one line, whatever the client sent


def _is_websocket_upgrade(environ, version):
    """A well-formed RFC 6455 upgrade; gevent-websocket answers anything else in plain text (or crashes)."""
    try:
        key = base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)
    except ValueError:
        return False
    return (environ.get("HTTP_UPGRADE", "").lower() == "websocket" and version == "HTTP/1.1"
            and "upgrade" in environ.get("HTTP_CONNECTION", "").lower()
            and environ.get("HTTP_SEC_WEBSOCKET_VERSION") == "13" and len(key) == 16)


def _raw_json_answer(status):
    body = error_body(status).encode()
    head = f"HTTP/1.1 {status} Error\r\nConnection: close\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


class TerminalSocket:
    """One browser tab's socket: translates messages for the session manager."""

    def __init__(self, ws):
        self.ws = ws
        self.senders = {}  # session_id -> (greenlet, Subscriber)

    def serve(self):
        PROCESS.sockets.add(self)
        pinger = gevent.spawn(self._ping_forever)
        try:
            while (message := self.ws.receive()) is not None:
                self.dispatch(message)
        finally:
            PROCESS.sockets.discard(self)
            pinger.kill()
            for session_id in list(self.senders):
                self.leave(session_id)

    def dispatch(self, message):
        session_id = None
        try:
            if isinstance(message, (bytes, bytearray)):
                raise ApiError(400, "Send control messages as JSON text frames.")
            body = parse_json(message, "The message")
            if not isinstance(body, dict):
                raise ApiError(400, "The message must be a JSON object.")
            kind = body.get("type")
            if kind == "heartbeat":
                PROCESS.sessions.touch(id_list(body, "session_ids", []))
                return
            handler = self.HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ApiError(400, f"Unknown message type {str(kind)[:40]!r}.")
            session_id = field(body, "session_id", str)
            handler(self, PROCESS.sessions.get(session_id), body)
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
        # Joined at once: while `joined` waits its turn on a full socket, flow control holds the
        # program at this reader's offset (with no reader it would run on, and the ring drop it).
        subscriber = session.subscribe(offset)
        try:
            self._ping()  # output is about to flow: one more round trip, measured before it queues (and
            # sent before `joined`, so that a client reading up to `joined` has taken it: nothing is left to read)
            self.send_json({"type": "joined", "session_id": session.id, "offset": offset,
                            "truncated": since < session.stream.start})
        except BaseException:
            session.unsubscribe(subscriber)
            raise
        self.senders[session.id] = (gevent.spawn(self._send_output, session, subscriber), subscriber)

    def leave_message(self, session, body):
        self.leave(session.id)

    def leave(self, session_id):
        sender, subscriber = self.senders.pop(session_id, (None, None))
        if sender:
            subscriber.left = True
            if not subscriber.sending:  # else it ends at the frame's end: a cut frame kills the socket
                sender.kill()
            session = PROCESS.sessions.by_id.get(session_id)
            if session:
                session.unsubscribe(subscriber)

    def input(self, session, body):
        data = input_bytes(body)
        session.touch()
        session.write(data, self.ws.handler.socket.fileno())

    def resize(self, session, body):
        session.resize(field(body, "cols", int, ..., 1, 1000), field(body, "rows", int, ..., 1, 1000))

    def ack(self, session, body):
        entry = self.senders.get(session.id)
        if entry:
            subscriber = entry[1]
            subscriber.acking = True
            subscriber.position = min(field(body, "offset", int, ..., 0), session.stream.end)
            subscriber.acked.set()
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
                room, typing_left = self._room(session, subscriber, offset)
                if room <= 0:  # beside a session being typed into: wait for this one's acks
                    subscriber.acked.clear()
                    subscriber.acked.wait(typing_left)
                    continue
                start, data, _ = session.stream.read(offset, room)
                if data:
                    if not self._send_whole(subscriber, head + start.to_bytes(8, "big") + tag + data):
                        return
                    offset = start + len(data)
                    if not subscriber.acking:  # paced by TCP: what is sent counts as taken
                        subscriber.position = offset
                        session.update_flow()
                    continue
                if session.stream.closed:
                    self._send_whole(subscriber, json.dumps({"type": "session_closed", "session_id": session.id}))
                    return
                if session.exit_code is not None and not told_exit:
                    told_exit = True
                    if not self._send_whole(subscriber, json.dumps({
                            "type": "session_exited", "session_id": session.id, "exit_code": session.exit_code})):
                        return
                changed.wait()
        except WebSocketError:
            pass  # the socket is gone; serve() cleans up

    def _send_whole(self, subscriber, message):
        """Send one message of a sender greenlet, which leave() never stops inside it (a frame
        cut short would end the socket for every session on it); False once the reader has left."""
        with self.ws.send_lock:  # reentrant: ws.send takes it again; a sender waiting for it may be stopped
            if subscriber.left:
                return False  # it left while this waited its turn: a frame now would follow its `joined`
            subscriber.sending = True
            try:
                self.ws.send(message, binary=isinstance(message, bytes))
            finally:
                subscriber.sending = False
        return not subscriber.left

    def _room(self, session, subscriber, offset):
        """(bytes this session may send now, seconds until that may change). While another
        session on this socket is being typed into, an acking session keeps at most its
        budget unacked, so that session's echo never queues behind the flow-control
        window's worth of this one's output."""
        keystrokes = session.keystrokes  # the manager's, shared by every session
        typing_left = keystrokes.seconds_left(session.id)
        if subscriber.acking and typing_left and keystrokes.session_id in self.senders:
            budget = self._budget_beside_typing(session.config.flow_high)
            return min(FRAME_SLICE, subscriber.position + budget - offset), typing_left
        return FRAME_SLICE, None

    def _budget_beside_typing(self, window):
        """BESIDE_TYPING, or what one round trip of this socket's link carries at LINK_RATE
        when that is more (the least of the last pings' round trips, so a queue does not
        count as distance), within the flow-control window: nearby, the echo waits behind
        little; far away, a flood beside it still fills the link."""
        round_trip = min(self.ws.round_trips, default=0)
        return min(max(BESIDE_TYPING, int(round_trip * LINK_RATE)), window)

    def send_json(self, message):
        try:
            self.ws.send(json.dumps(message))
        except WebSocketError:
            pass

    def _ping_forever(self):
        while True:
            gevent.sleep(PING_SECONDS)
            if not self._ping():
                return

    def _ping(self):
        """A ping carrying our clock, for its pong to measure the round trip. False once the socket is gone."""
        try:
            self.ws.send_frame(str(time.monotonic_ns()), self.ws.OPCODE_PING)
        except WebSocketError:
            return False
        return True


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

# Each agent API under each generation of the AI Gateway: the workspace's
# gateway host, the workspace's own /ai-gateway routes, plain serving endpoints.
GATEWAY_GENERATIONS = ("the workspace's AI Gateway host", "the workspace's /ai-gateway routes",
                       "the workspace's serving endpoints")
GATEWAY_PATHS = {
    "anthropic": ("/anthropic", "/ai-gateway/anthropic", "/serving-endpoints/anthropic"),  # Claude Code
    "responses": ("/openai/v1", "/ai-gateway/codex/v1", "/serving-endpoints/openai/v1"),   # Codex
    "gemini": ("/gemini", "/ai-gateway/gemini", "/serving-endpoints/google"),               # Gemini CLI
    "chat": ("/mlflow/v1", "/ai-gateway/mlflow/v1", "/serving-endpoints"),                  # OpenCode, Hermes
}
# Minted tokens carry this process's own comment, so CoDA can prove which listed tokens are its own.
TOKEN_COMMENT = f"CoDA short-lived token {secrets.token_hex(6)} (rotated and revoked automatically)"


def import_off_loop(module):
    """Import a heavy module in a native thread, so terminals stay live meanwhile."""
    if module not in sys.modules:
        gevent.get_hub().threadpool.apply(importlib.import_module, (module,))


def workspace_client(token=None, host=None):
    """databricks-sdk's client with `token` alone (never another credential), or as the app's service principal."""
    import_off_loop("databricks.sdk")
    from databricks.sdk import WorkspaceClient  # lazy: a local user never pays for it
    from databricks.sdk.core import Config as SdkConfig

    common = dict(host=host or CONFIG.databricks_host, http_timeout_seconds=CONFIG.sdk_http_timeout,
                  retry_timeout_seconds=CONFIG.sdk_retry_timeout,
                  product="coda", product_version=__version__)
    if token:
        return WorkspaceClient(config=SdkConfig(token=token, auth_type="pat", **common))
    return WorkspaceClient(config=SdkConfig(client_id=CONFIG.client_id, client_secret=CONFIG.client_secret,
                                            auth_type="oauth-m2m", **common))


def reason(error):
    """One redacted line saying why something failed."""
    if isinstance(error, TimeoutError) and error.__cause__ is not None:  # databricks-sdk's retries gave up: on what
        return reason(error.__cause__)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.split(r"\.? (?:Config|Env): ", text)[0]  # databricks-sdk appends its whole configuration
    text = re.sub(r"HTTPS?ConnectionPool\([^)]*\): ", "", text)  # urllib3 names the pool, then the failure
    refused_connection = re.search(r"Failed to establish a new connection: (\[Errno -?\d+\] [^\"')]+)", text)
    text = refused_connection.group(1) if refused_connection else text
    return redact(text)[:300]


def is_refusal(error):
    """A definite no to the token (401/403), as opposed to an outage, a 5xx or a timeout."""
    from databricks.sdk.errors import PermissionDenied, Unauthenticated
    return isinstance(error, (Unauthenticated, PermissionDenied))


def is_outage(error):
    """The workspace is out of reach, timing out or failing (5xx), rather than answering no."""
    from databricks.sdk.errors import DatabricksError, DeadlineExceeded, InternalError, TemporarilyUnavailable
    return not isinstance(error, DatabricksError) or isinstance(
        error, (InternalError, TemporarilyUnavailable, DeadlineExceeded))


def utc_clock(epoch):
    return time.strftime("%H:%M UTC", time.gmtime(epoch))


def resolve_owner_forever():
    """Apps mode without APP_OWNER: the app's creator, read as the app's service principal, retried until known."""
    delay = 1.0
    while True:
        try:
            creator = workspace_client().apps.get(CONFIG.app_name).creator
            if not creator:
                raise ValueError("the Apps API names no creator for this app")
            PROCESS.access.owner, PROCESS.access.owner_error = creator.strip().lower(), None
            log.info("app owner resolved from the Apps API")
            for name in ("DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET"):
                os.environ.pop(name, None)  # no child process may inherit the service principal
            return
        except Exception as error:
            PROCESS.access.owner_error = f"the Apps API lookup of the app's owner (its creator) failed: {reason(error)}"
            log.warning("app owner unknown, nobody may enter (%s); retrying in %.0f s",
                        PROCESS.access.owner_error, delay)
            gevent.sleep(delay)
            delay = min(delay * 2, 300)


class Gateway:
    """Where the agents' model calls go: one origin and one generation of paths."""

    def __init__(self):
        self.origin = None
        self.generation = None
        self.reason = "not discovered yet: no token has been configured"

    def base(self, api):
        return self.origin + GATEWAY_PATHS[api][self.generation] if self.origin else None

    def discover(self, token):
        host = CONFIG.databricks_host
        gateway_host = f"https://{CONFIG.workspace_id}.ai-gateway.cloud.databricks.com"
        if CONFIG.gateway_host:
            choice = (CONFIG.gateway_host, 0, "DATABRICKS_GATEWAY_HOST is set")
        elif CONFIG.workspace_id and _answers(gateway_host + GATEWAY_PATHS["anthropic"][0], token):
            choice = (gateway_host, 0, "the workspace's AI Gateway host answered")
        elif _answers(host + GATEWAY_PATHS["anthropic"][1], token):
            choice = (host, 1, "the workspace's /ai-gateway routes answered")
        else:
            choice = (host, 2, "no AI Gateway answered a probe, so agents use serving endpoints")
        if choice[:2] != (self.origin, self.generation):
            self.origin, self.generation, self.reason = choice
            log.info("AI Gateway: %s at %s (%s)", GATEWAY_GENERATIONS[self.generation], self.origin, self.reason)

    def describe(self):
        return {"origin": self.origin, "kind": GATEWAY_GENERATIONS[self.generation] if self.origin else None,
                "reason": self.reason}


def _answers(url, token):
    import_off_loop("requests")
    import requests

    try:
        answer = requests.head(url, headers={"Authorization": f"Bearer {token}"}, timeout=PROBE_SECONDS,
                               allow_redirects=False)
    except requests.RequestException:
        return False
    return answer.status_code < 500 and answer.status_code != 404



# The models the workspace serves (GET /api/2.0/serving-endpoints), and which agent API each speaks.
# Databricks serves every chat model (task llm/v1/chat) through Chat Completions; a Claude model also
# through the Anthropic Messages API, a GPT-5 model through the Responses API and a Gemini model
# through the Gemini API. So an endpoint's task says whether it chats, and its served model's maker
# (a foundation model's name, or an external model's provider) which native API it adds. Embedding,
# completion, agent and custom-model endpoints are not for the coding agents; a model endpoint with a
# task CoDA does not know is "an unknown API": left out of the choice, and said so.
MODEL_API_LABELS = {"anthropic": "Anthropic Messages", "responses": "OpenAI Responses", "gemini": "Gemini",
                    "chat": "Chat Completions"}
MODEL_MAKER_APIS = ((r"claude", "anthropic"), (r"gpt-(?!oss)", "responses"), (r"gemini", "gemini"))
EXTERNAL_PROVIDER_APIS = {"anthropic": "anthropic", "openai": "responses", "google-cloud-vertex-ai": "gemini"}
TASKS_NOT_FOR_AGENTS = ("llm/v1/embeddings", "llm/v1/completions", "agent/v1/chat", "agent/v2/chat",
                        "agent/v1/responses")
MODELS_REFRESH_SECONDS = 300     # a listing is reused this long: a rotation within it lists nothing
KEEP_CONFIGURED = "so the agents keep their configured models"


def endpoint_apis(endpoint):
    """The agent APIs a listed endpoint speaks (a frozenset; empty: not a chat model), or None: an API CoDA does not know."""
    entities = (endpoint.config.served_entities if endpoint.config else None) or []
    models = [entity.foundation_model or entity.external_model for entity in entities
              if entity.foundation_model or entity.external_model]
    task = endpoint.task or next((entity.external_model.task for entity in entities if entity.external_model), None)
    if task != "llm/v1/chat":
        return frozenset() if task in TASKS_NOT_FOR_AGENTS or (task is None and not models) else None
    apis = {"chat"}
    for model in models:
        provider = getattr(model, "provider", None)  # an external model's
        apis.add(EXTERNAL_PROVIDER_APIS.get(provider.value if provider else None, "chat"))
        words = "-".join(filter(None, (model.name, getattr(model, "display_name", None)))).lower().replace(" ", "-")
        apis.update(api for pattern, api in MODEL_MAKER_APIS if re.search(pattern, words))
    return frozenset(apis)


def read_served_models(endpoints):
    """(apis, notice) from a listing: {endpoint: the agent APIs it speaks, or None for an API CoDA does
    not know} when it names a chat model, else None (the agents then keep their configured models);
    and one sentence on bad input."""
    apis = {endpoint.name: endpoint_apis(endpoint) for endpoint in endpoints}
    apis = {name: spoken for name, spoken in apis.items() if spoken is None or spoken}
    unknown = [name for name, spoken in apis.items() if spoken is None]
    named = ", ".join(f"{name} (task {next(e.task for e in endpoints if e.name == name) or 'none'})"
                      for name in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    if not endpoints:
        return None, f"The workspace lists no serving endpoints, {KEEP_CONFIGURED}."
    if not apis:
        return None, f"The workspace lists {len(endpoints)} serving endpoint(s) but no chat model, {KEEP_CONFIGURED}."
    if len(unknown) == len(apis):
        return None, f"The workspace names only endpoints with an API CoDA does not know ({named}), {KEEP_CONFIGURED}."
    if unknown:
        return apis, (f"The workspace names {len(unknown)} endpoint(s) with an API CoDA does not know ({named}); "
                      "they are left out of the choice (an agent set to one keeps it).")
    return apis, None


def list_served_models(client):
    """read_served_models of the workspace's listing, as `client` sees it; a failure is a notice too."""
    try:
        return read_served_models(list(client.serving_endpoints.list()))
    except Exception as error:
        if is_refusal(error):
            return None, f"The workspace refused to list its serving endpoints ({reason(error)}), {KEEP_CONFIGURED}."
        return None, f"Could not list the workspace's serving endpoints ({reason(error)}), {KEEP_CONFIGURED}."


def served_for(apis, api):
    """The models in a listing that speak `api`, by name."""
    return sorted(name for name, spoken in (apis or {}).items() if spoken and api in spoken)


class ServedModels:
    """What the workspace serves, listed with the current token at token time and at rotations (at
    most every MODELS_REFRESH_SECONDS), each listing in a greenlet of its own."""

    def __init__(self, relisted):
        self.relisted = relisted  # () -> None: a rotation's listing changed what is served
        self.apis = None          # endpoint name -> the agent APIs it speaks; None: not known
        self.notice = "No token has been configured yet, " + KEEP_CONFIGURED + "."  # one sentence, or None
        self.listed_at = None
        self.listing = None       # the greenlet of the latest listing

    def refresh(self, token, rotation=False):
        """List again (a rotation: only once the last listing is stale); the agents' steps wait for it."""
        fresh = self.listed_at is not None and time.time() - self.listed_at < MODELS_REFRESH_SECONDS
        if rotation and (fresh or (self.listing and not self.listing.dead)):
            return
        self.listing = gevent.spawn(self._list, token, rotation)

    def wait(self):
        if self.listing is not None:
            self.listing.join(timeout=CONFIG.sdk_http_timeout + CONFIG.sdk_retry_timeout)

    def _list(self, token, rotation):
        apis, notice = list_served_models(workspace_client(token))
        if gevent.getcurrent() is not self.listing:
            return  # a newer listing (a new token) was started meanwhile
        if apis is None and self.apis is not None and notice.startswith("Could not"):
            log.warning("%s (the last listing stays in use)", notice)  # an outage at a rotation
            return
        changed = (apis, notice) != (self.apis, self.notice)
        self.apis, self.notice, self.listed_at = apis, notice, time.time()
        if notice and changed:
            log.warning("%s", notice)
        log.info("served models listed: %s", "; ".join(
            f"{MODEL_API_LABELS[api]}: {len(served_for(apis, api))}" for api in MODEL_API_LABELS) if apis else "none known")
        if rotation and changed:
            gevent.spawn(self.relisted)  # after this listing ends: the steps it reruns wait for it

    def describe(self):
        """One line per API: what is served for it (the models step and doctor print these)."""
        return [f"{MODEL_API_LABELS[api]}: {', '.join(served_for(self.apis, api)) or 'none'}"
                for api in MODEL_API_LABELS] if self.apis is not None else []


class Pat:
    """The token CoDA works with: validated, exchanged for a short-lived one, rotated, the old one revoked.

    CoDA revokes only tokens it minted itself (it has their ids from token/create).
    A pasted token is never revoked: no Databricks API maps a token's value to
    its id, so CoDA cannot prove which listed token it is.

    Only a definite refusal (401/403) ends a token; an outage, a 5xx or a timeout
    is retried while the token is valid, and said in `error` meanwhile.
    """

    def __init__(self, gateway, models, save_token, token_configured):
        self.gateway = gateway                    # told the token, to discover where model calls go
        self.models = models                      # told each token, to list the served models (ServedModels)
        self.save_token = save_token              # (token) -> None: each minted token, for the CLI and SDK
        self.token_configured = token_configured  # () -> None: after each pasted token
        self.token = None          # the current token: a minted one, or the pasted one until a mint succeeds
        self.token_id = None       # its id, when CoDA minted it
        self.expires_at = None     # epoch seconds, when known
        self.refused = False       # the workspace refused the current token (401/403)
        self.minted = {}           # token_id -> (value, expires_at): minted here, maybe still live, so redacted
        self.user = None
        self.identity = None       # SCIM Me of the pasted token's user (git's identity comes from it)
        self.last_rotation = None
        self.error = None          # one sentence about the last failure, for /api/pat-status
        self.rotor = None
        self.lock = gevent.lock.Semaphore()  # one configure or rotation at a time

    def valid(self):
        return bool(self.token) and not self.refused and (self.expires_at is None or time.time() < self.expires_at)

    def current_token(self):
        return self.token if self.valid() else None

    def status(self):
        answer = {"configured": self.token is not None, "valid": self.valid(), "user": self.user,
                  "workspace_host": CONFIG.databricks_host or None, "expires_at": self.expires_at}
        error = self.error
        if self.token and not answer["valid"] and not self.refused:
            error = f"The token expired at {utc_clock(self.expires_at)} before it could be rotated; paste a new one."
        if error:
            answer["error"] = error
        return answer

    def report(self, error):
        """Set (or clear) the failure sentence; keep a token-free copy of the status for `coda.py doctor`."""
        if error:
            log.warning("%s", error)
        self.error = error
        try:
            write_private(PATHS.pat_status_file, json.dumps({**self.status(), "written_at": time.time(),
                                                             "gateway": self.gateway.base("anthropic")}) + "\n")
        except OSError as failure:
            log.warning("could not write %s: %s", PATHS.pat_status_file, reason(failure))

    def configure(self, token, replace=False):
        """Validate a pasted token with SCIM Me (that token alone), mint from it, configure the agents."""
        if not CONFIG.databricks_host:
            raise ApiError(400, "No Databricks workspace is configured: set DATABRICKS_HOST.")
        with self.lock:  # the 409 check and the change it guards are one decision
            if self.valid() and not replace:
                raise ApiError(409, 'A valid token is already configured; send "replace": true to replace it.')
            import_off_loop("databricks.sdk")
            from databricks.sdk.errors import DatabricksError

            try:
                me = workspace_client(token).current_user.me()
            except DatabricksError as error:
                raise ApiError(400, f"The workspace did not accept this token: {reason(error)}") from None
            except Exception as error:
                raise ApiError(400, f"The workspace at {CONFIG.databricks_host} could not be reached: {reason(error)}") from None
            SECRETS.add(token)  # a pasted token stays live (CoDA cannot revoke it), so it stays redacted
            self.user, self.token, self.token_id, self.expires_at, self.refused = me.user_name, token, None, None, False
            self.identity = me
            self.gateway.discover(token)
            try:
                self._mint()
                self.report(None)
            except Exception as error:
                self.report(f"Could not mint a short-lived token ({reason(error)}); using the pasted token meanwhile.")
            self.models.refresh(self.token)
        self.token_configured()
        if self.rotor is None or self.rotor.dead:
            self.rotor = gevent.spawn(self._rotate_forever)
        log.info("Databricks token configured for %s", self.user)
        return {"status": "ok", "user": self.user}

    def _mint(self):
        created = workspace_client(self.token).tokens.create(comment=TOKEN_COMMENT,
                                                             lifetime_seconds=CONFIG.token_lifetime)
        SECRETS.add(created.token_value)
        expiry = (created.token_info.expiry_time or 0) / 1000
        self.token, self.token_id = created.token_value, created.token_info.token_id
        self.expires_at = expiry if expiry > 0 else time.time() + CONFIG.token_lifetime
        self.minted[self.token_id] = (self.token, self.expires_at)
        self.last_rotation = time.time()
        self.save_token(self.token)
        self._revoke_old()

    def _revoke_old(self):
        """Revoke every other token this process minted: also one whose create timed out
        after the workspace had made it, and any whose revocation failed before."""
        client = workspace_client(self.token)
        alive = set(self.minted)  # until the workspace's list says otherwise
        try:
            alive = {info.token_id for info in client.tokens.list() if info.comment == TOKEN_COMMENT}
            for token_id in alive - {self.token_id}:
                client.tokens.delete(token_id)
                alive.discard(token_id)
        except Exception as error:
            log.warning("could not revoke old CoDA tokens yet (%s); will retry at the next rotation", reason(error))
        self._forget_dead(alive)

    def _forget_dead(self, alive):
        """Stop redacting minted tokens that can no longer be live (revoked, expired, or not listed),
        so SECRETS holds a bounded number of values however many rotations there have been."""
        now = time.time()
        for token_id, (value, expires_at) in list(self.minted.items()):
            if token_id != self.token_id and (token_id not in alive or expires_at < now):
                del self.minted[token_id]
                SECRETS.discard(value)

    def _rotate_forever(self):
        """Mint a fresh token every interval, also with no session open; back off on failure."""
        failures = 0
        while True:
            backoff = min(2.0 ** failures, 60.0, max(1.0, CONFIG.rotation_interval))
            gevent.sleep(CONFIG.rotation_interval if not failures else backoff)
            if not self.valid():
                self.report(self.status().get("error"))
                return
            with self.lock:
                try:
                    self._mint()
                    failures = 0
                    self.report(None)
                    self.models.refresh(self.token, rotation=True)
                except Exception as error:
                    failures += 1
                    if self._ends_token(error):
                        self.refused = True
                        self.report(f"The workspace refused the token ({reason(error)}); paste a new one.")
                        return
                    self.report(self._retrying(error))

    def _ends_token(self, error):
        """A refusal to mint is the token's end only if SCIM Me refuses it too (it may just lack the scope)."""
        if not is_refusal(error):
            return False
        try:
            workspace_client(self.token).current_user.me()
            return False
        except Exception as check:
            return is_refusal(check)

    def _retrying(self, error):
        until = (f"the current token is valid until {utc_clock(self.expires_at)}" if self.expires_at
                 else "the pasted token stays in use")
        if is_outage(error):
            return f"Could not reach the workspace to rotate the token ({reason(error)}); retrying, {until}."
        return f"Token rotation failed ({reason(error)}); retrying, {until}."

    def configure_from_environment(self):
        """A DATABRICKS_TOKEN given at start is treated like a pasted one."""
        try:
            self.configure(CONFIG.bootstrap_token)
        except ApiError as error:
            self.error = str(error)
            log.warning("DATABRICKS_TOKEN from the environment was not usable: %s", error)



@api("/api/pat-status", "GET")
def pat_status():
    return PROCESS.pat.status()


def mcp_server_list():
    """The MCP servers the agents get, for /api/app-state: a third-party one by its host alone (its
    URL may carry a key, as Exa's ?exaApiKey= does)."""
    return ([{"name": name, "leaves_workspace": False, "path": MANAGED_MCP_ROOT + path}
             for name, path in CONFIG.managed_mcp]
            + [{"name": name, "leaves_workspace": True, "host": urllib.parse.urlsplit(url).hostname or "?"}
               for name, url in CONFIG.mcp_servers])


@api("/api/app-state", "GET")
def app_state():
    return {"owner": PROCESS.access.owner, "workspace_host": CONFIG.databricks_host or None,
            "pat_configured": PROCESS.pat.token is not None, "last_rotation": PROCESS.pat.last_rotation,
            "gateway": PROCESS.gateway.describe(), "max_sessions": CONFIG.max_sessions,
            "apps_mode": PROCESS.access.apps_mode, "mcp_servers": mcp_server_list()}


@api("/api/configure-pat")
def configure_pat(body):
    token = field(body, "token", str).strip()
    if not token:
        raise ApiError(400, "The field 'token' is empty.")
    return PROCESS.pat.configure(token, replace=field(body, "replace", bool, False))


# App logs to Delta (optional): with CODA_LOG_TABLE and CODA_LOG_WAREHOUSE_ID,
# the records of the "coda" logger (never terminal content, which is never
# logged; never a token: each record passes the redacting filter first) are
# also inserted into a Delta table through the SQL Statement Execution API,
# with the owner's current token. Values only ever travel as named parameters;
# the table name is validated and backtick-quoted. The handler only appends to
# a bounded deque; one greenlet sends. While the table cannot be written, the
# oldest records fall off the deque, and how many is logged once it works again.
DELTA_QUEUE_BOUND = 5000          # records waiting at most; past it the oldest go (counted, reported)
DELTA_MAX_PARAMETERS = 256        # the Statement Execution API's limit of named parameters per statement
DELTA_ROWS_PER_STATEMENT = (DELTA_MAX_PARAMETERS - 2) // 4  # 4 per row, plus :app and :host: 63
DELTA_STATEMENT_BYTES = 1 * MIB   # parameter values in one statement (the API allows 16 MiB of text)
DELTA_MESSAGE_CHARS = 16 * KIB    # a longer message is cut
DELTA_FLUSH_SECONDS = 5.0         # a record waits at most this long for a batch to fill
DELTA_TICK = 0.5                  # how often the sender looks at the deque
DELTA_BACKOFF_FIRST = 2.0         # seconds before the first retry; doubled per failure ...
DELTA_BACKOFF_CAP = 300.0         # ... up to this
DELTA_POLL_SECONDS = 5.0          # polling a statement that waits for its warehouse to start ...
DELTA_PATIENCE = 600.0            # ... for at most this long before it is cancelled and retried
DELTA_COLUMNS = ("ts TIMESTAMP COMMENT 'when CoDA logged it', level STRING, "
                 "logger STRING, message STRING COMMENT 'redacted: never a token', "
                 "app STRING COMMENT 'DATABRICKS_APP_NAME, else coda', host STRING")
DeltaRow = collections.namedtuple("DeltaRow", "seq created level logger message")


def delta_table_name(text):
    """`catalog.schema.table` as a SQL identifier with each name backtick-quoted, else ValueError.

    Unity Catalog names hold no period, space, slash or control character;
    a name may be given in backticks already; a backtick inside one is doubled."""
    parts = text.strip().split(".")
    if len(parts) != 3:
        raise ValueError("is not catalog.schema.table")
    quoted = []
    for part in parts:
        if len(part) >= 2 and part[0] == part[-1] == "`":
            part = part[1:-1].replace("``", "`")
        if not part or len(part) > 255 or re.search(r"[\s/\x00-\x1f\x7f]", part):
            raise ValueError("has a name that is empty, too long, or holds a space, slash or control character")
        quoted.append("`" + part.replace("`", "``") + "`")
    return ".".join(quoted)


class DeltaLogHandler(logging.Handler):
    """Redacts each record and appends it to a bounded deque: no I/O, no lock, never waits."""

    def __init__(self, bound=None):
        super().__init__(logging.INFO)
        self.addFilter(RedactingFilter())
        self.pending = collections.deque(maxlen=bound or DELTA_QUEUE_BOUND)  # full: the oldest falls off
        self.numbers = itertools.count()  # gaps in the numbers are the records that fell off

    def handle(self, record):  # no handler lock: appending to a deque is atomic
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record):
        self.pending.append(DeltaRow(next(self.numbers), record.created, record.levelname, record.name,
                                     record.getMessage()[:DELTA_MESSAGE_CHARS]))


class StatementFailed(Exception):
    """The warehouse ran a statement and it ended FAILED, CANCELED or CLOSED."""


class DeltaLogShipper:
    """The greenlet that writes the handler's records to the table, one statement per batch."""

    def __init__(self, handler, table, warehouse_id, token_source):
        self.handler = handler
        self.token_source = token_source  # () -> the current valid token, or None
        self.table = table                # quoted by delta_table_name
        self.warehouse_id = warehouse_id
        self.app = CONFIG.app_name or "coda"
        self.host = os.uname().nodename
        self.table_ready = False          # CREATE TABLE IF NOT EXISTS ran (or an insert worked)
        self.next_seq = 0                 # the number of the first record not yet written
        self.dropped = 0                  # records that fell off before they were written, not yet reported
        self.failures = 0
        self.error = None                 # why the last try failed
        self.client, self.token = None, None
        self.greenlet = None
        self.sending = gevent.lock.Semaphore()  # held while a pass sends: shutdown waits for it

    def due(self):
        pending = self.handler.pending
        return len(pending) >= DELTA_ROWS_PER_STATEMENT or bool(
            pending) and time.time() - pending[0].created >= DELTA_FLUSH_SECONDS

    def run_forever(self):
        """Send when a batch is full or old enough; after a failure retry with backoff, doubling, capped."""
        while True:
            gevent.sleep(min(DELTA_BACKOFF_FIRST * 2 ** (self.failures - 1), DELTA_BACKOFF_CAP)
                         if self.failures else DELTA_TICK)
            if not self.failures and not self.due():
                continue
            try:
                with self.sending:
                    sent = self.send_pending()
            except Exception as error:
                self.failures, self.error = self.failures + 1, reason(error)
                if self.failures == 1:
                    log.warning("app logs could not be written to %s (%s); retrying with backoff, keeping "
                                "the newest %d records", self.table, self.error, self.handler.pending.maxlen)
                continue
            if sent and self.failures:
                log.info("app logs are written to %s again, after %d failed tries", self.table, self.failures)
                self.failures, self.error = 0, None

    def send_pending(self):
        """Write every pending record: True once written, False while there is no valid token yet.

        Raises on the first failure; what was not written stays pending."""
        if not self.handler.pending:
            return True
        token = self.token_source()
        if not token:
            return False
        if token != self.token:  # the current token: rotation replaces it
            self.client, self.token = workspace_client(token), token
        create_error = None
        if not self.table_ready:
            try:
                self.execute(f"CREATE TABLE IF NOT EXISTS {self.table} ({DELTA_COLUMNS}) USING DELTA "
                             "COMMENT 'CoDA app logs'")
                self.table_ready = True
            except StatementFailed as error:  # no right to create here, maybe: the table may exist already
                create_error = error
        while rows := self.take():
            try:
                self.execute(*self.insert(rows))
            except StatementFailed as error:
                raise StatementFailed(f"{error} (creating the table failed too: {create_error})"
                                      if create_error else str(error)) from None
            self.table_ready = True
            self.confirm(rows)
        if self.dropped:
            log.warning("%d app log records were dropped, the oldest first, before they could be written to %s",
                        self.dropped, self.table)
            self.dropped = 0
        return True

    def take(self):
        """The oldest pending records that fit one statement; counts those that fell off unwritten."""
        try:
            rows = list(itertools.islice(self.handler.pending, DELTA_ROWS_PER_STATEMENT))
        except RuntimeError:  # a native thread logged during the copy: take them next time
            return []
        if rows and rows[0].seq > self.next_seq:
            self.dropped += rows[0].seq - self.next_seq
            self.next_seq = rows[0].seq
        size = 0
        for count, row in enumerate(rows):
            size += len(row.message.encode()) + 64
            if count and size > DELTA_STATEMENT_BYTES:
                return rows[:count]
        return rows

    def confirm(self, rows):
        pending, last = self.handler.pending, rows[-1].seq
        while pending and pending[0].seq <= last:
            pending.popleft()
        self.next_seq = last + 1

    def insert(self, rows):
        """One INSERT with a VALUES row of named parameters per record: no value is ever in the SQL text."""
        from databricks.sdk.service.sql import StatementParameterListItem as Param

        values = []
        parameters = [Param(name="app", value=self.app), Param(name="host", value=self.host)]
        for i, row in enumerate(rows):
            values.append(f"(:ts_{i}, :level_{i}, :logger_{i}, :message_{i}, :app, :host)")
            whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(row.created))
            stamp = f"{whole}.{int(row.created % 1 * 1e6):06d}Z"  # UTC, to the microsecond
            parameters += [Param(name=f"ts_{i}", value=stamp, type="TIMESTAMP"),
                           Param(name=f"level_{i}", value=row.level), Param(name=f"logger_{i}", value=row.logger),
                           Param(name=f"message_{i}", value=row.message)]
        statement = f"INSERT INTO {self.table} (ts, level, logger, message, app, host) VALUES " + ", ".join(values)
        return statement, parameters

    def execute(self, statement, parameters=None):
        run_statement(self.client, self.warehouse_id, statement, parameters)

    def final_flush(self, seconds=3.0):
        """At shutdown: let a pass under way finish (nothing is sent twice), stop the greenlet,
        then one last try to write what is pending; all within `seconds`."""
        with gevent.Timeout(seconds, False), self.sending:
            if self.greenlet is not None:
                self.greenlet.kill()
            try:
                self.send_pending()
            except Exception as error:
                log.warning("the last app logs could not be written to %s (%s)", self.table, reason(error))


def run_statement(client, warehouse_id, statement, parameters=None, patience=None):
    """Run one statement on the warehouse, waiting (bounded: `patience`, else DELTA_PATIENCE) while
    the warehouse starts; its answer."""
    from databricks.sdk.service.sql import ExecuteStatementRequestOnWaitTimeout, StatementState

    run = client.statement_execution
    answer = run.execute_statement(statement=statement, warehouse_id=warehouse_id, parameters=parameters,
                                   wait_timeout="10s",  # under workspace_client's 20 s HTTP timeout
                                   on_wait_timeout=ExecuteStatementRequestOnWaitTimeout.CONTINUE)
    patience = DELTA_PATIENCE if patience is None else patience
    deadline = time.monotonic() + patience
    while answer.status.state in (StatementState.PENDING, StatementState.RUNNING):
        if time.monotonic() > deadline:
            try:
                run.cancel_execution(answer.statement_id)
            except Exception as error:  # best effort, as the API says of cancelling anyway
                log.info("could not cancel a waiting statement (%s)", reason(error))
            raise TimeoutError(f"the warehouse did not run the statement within {patience:.0f} s")
        gevent.sleep(DELTA_POLL_SECONDS)
        answer = run.get_statement(answer.statement_id)
    if answer.status.state != StatementState.SUCCEEDED:
        error = answer.status.error
        raise StatementFailed(f"the statement ended {answer.status.state.value}"
                              + (f": {error.message}" if error and error.message else ""))
    return answer


def start_delta_logs(config, token_source):
    """With CODA_LOG_TABLE and CODA_LOG_WAREHOUSE_ID set: CoDA's records also go to that table,
    sent with token_source's token (PROCESS.delta_logs, for shutdown)."""
    if not (config.log_table or config.log_warehouse_id) or PROCESS.delta_logs:
        return None
    if not (config.log_table and config.log_warehouse_id):
        log.warning("app logs to Delta need both CODA_LOG_TABLE and CODA_LOG_WAREHOUSE_ID; logs stay local")
        return None
    try:
        table = delta_table_name(config.log_table)
    except ValueError as error:
        log.warning("CODA_LOG_TABLE=%r %s; logs stay local", config.log_table, error)
        return None
    handler = DeltaLogHandler()
    log.addHandler(handler)
    shipper = DeltaLogShipper(handler, table, config.log_warehouse_id, token_source)
    shipper.greenlet = gevent.spawn(shipper.run_forever)
    PROCESS.delta_logs = shipper
    log.info("app logs also go to %s through SQL warehouse %s, once a token is configured",
             table, config.log_warehouse_id)
    return shipper


# ===========================================================================
# 9. Agents
# ===========================================================================

class ConfigError(Exception):
    """A user's file CoDA cannot merge into (it is left untouched)."""


def merge_json(path, merge):
    """Let `merge` change the user's JSON object in place (keeping every other key), then write it back."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        raise ConfigError(f"{path} is not valid JSON; CoDA left it alone (fix or remove it)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object; CoDA left it alone")
    merge(data)
    write_private(path, json.dumps(data, indent=2) + "\n")


def merge_toml(path, merge):
    """merge_json for TOML (Codex's config.toml)."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML ({error}); CoDA left it alone") from None
    merge(data)
    write_private(path, to_toml(data))


def nested(data, *keys):
    """data[k1][k2]..., creating dictionaries on the way."""
    for key in keys:
        value = data.get(key)
        if not isinstance(value, dict):
            value = data[key] = {}
        data = value
    return data


def merge_env_file(path, values):
    """Set KEY=value lines (unquoted), keeping the file's other lines."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.split("=", 1)[0].strip() not in values]
    write_private(path, "\n".join(kept + [f"{k}={v}" for k, v in values.items()]) + "\n")


OWNED_MARK = "coda-digest:"


def write_owned(path, text, comment="#"):
    """Write a file CoDA owns until the user edits it by hand: an edited file is left alone."""
    import hashlib

    if path.exists():
        current = path.read_text()
        head, _, body = current.partition("\n")
        if OWNED_MARK not in head or head.split(OWNED_MARK)[1].split()[0] != hashlib.sha256(body.encode()).hexdigest()[:16]:
            log.info("%s was edited by hand; CoDA leaves it alone", path)
            return
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    closing = " -->" if comment == "<!--" else ""
    write_private(path, f"{comment} Written by CoDA; edit freely (CoDA then leaves it alone). {OWNED_MARK} {digest}{closing}\n{text}")


def to_toml(table, path=(), array_item=False):
    """TOML for plain data: nested tables, arrays of tables, strings, numbers, booleans."""
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict) and not _table_array(v)]
    dotted = ".".join(_toml_key(k) for k in path)
    lines = []
    if path and (array_item or scalars or not table):
        lines.append(f"[[{dotted}]]" if array_item else f"[{dotted}]")
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += ["", to_toml(v, path + (k,))]
        elif _table_array(v):
            lines += [part for item in v for part in ("", to_toml(item, path + (k,), True))]
    text = "\n".join(lines).strip("\n")
    return text + "\n" if not path else text


def _table_array(value):
    return isinstance(value, list) and value and all(isinstance(x, dict) for x in value)


def _toml_key(key):
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(x) for x in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))  # a TOML basic string is written like a JSON string


AGENT_INSTRUCTIONS = """\
# Working in CoDA

You are running inside CoDA, a browser terminal hosted as a Databricks App.

- Projects live in `~/projects`, one folder per git repository. The app's disk
  does not survive a restart: commit your work.
- Every commit in a repository under `~/projects` is copied to the user's
  Databricks workspace, under `/Workspace/Users/<user>/projects/<repo>`, in the
  background. A commit never waits for it; `~/.sync.log` says what happened.
- Databricks is configured for the shell: the Python SDK (`databricks.sdk`)
  and the Databricks CLI read `~/.databrickscfg`, whose token CoDA rotates
  every few minutes. Read it fresh each time; never copy it into files.
- Model calls go through the workspace's AI Gateway. Do not ask for or store
  API keys.
- Uploaded files and pasted images are saved in `~/uploads`.
"""

# Databricks models the agents can pick, with their context and output limits as Databricks
# documents them (OpenCode needs them; Codex and Hermes Agent use the context window).
MODEL_LIMITS = {
    "databricks-claude-opus-4-7": (200_000, 32_000),
    "databricks-claude-opus-4-6": (200_000, 32_000),
    "databricks-claude-sonnet-4-5": (200_000, 64_000),
    "databricks-claude-haiku-4-5": (200_000, 64_000),
    "databricks-gpt-5-5": (400_000, 128_000),
    "databricks-gemini-2-5-pro": (1_000_000, 64_000),
}
DEFAULT_LIMITS = (128_000, 16_000)  # a model without a row: less than any of the above allows


def model_limits(name):
    return MODEL_LIMITS.get(name, DEFAULT_LIMITS)


def configured_models():
    """Every model CoDA names to an agent (an undeclared one makes OpenCode pick another provider's)."""
    fallback = hermes_fallback_choice()
    chosen = (*CONFIG.models.values(), *(model_choice(agent.name).model for agent in AGENTS),
              fallback.model if fallback else "")
    return list(dict.fromkeys(name for name in (*MODEL_LIMITS, *chosen) if name))


# Which model each agent uses (PROCESS.models, section 8, knows what is served): its own (its row's
# model_variable, else the row's default) when the workspace serves it for the agent's API; else the
# first of the row's `models` served for it, else any served for it; else its own, and its setup
# step fails saying so. While what is served is not known (no listing yet, a 403, an empty listing)
# every agent keeps its own. A choice's status: "served", "replaced" (a warning: its own is not
# served), "unserved" (nothing served fits) or "unknown".
ModelChoice = collections.namedtuple("ModelChoice", ["model", "why", "status"])
MODELS_NAMED = 6  # the alternatives a warning names, best first


def choose_model(variable, own, api, preferences, who, avoid=()):
    apis = PROCESS.models.apis
    if api is None:
        return ModelChoice(own, f"{variable} (its API is not checked)", "served")
    if apis is None:
        return ModelChoice(own, f"{variable} as set: what the workspace serves is not known", "unknown")
    if own in apis and apis[own] is None:
        return ModelChoice(own, f"{variable} {own} is served with an API CoDA does not know; kept as set", "served")
    if api in (apis.get(own) or ()):
        return ModelChoice(own, f"{variable} {own} is served here", "served")
    fitting = served_for(apis, api)  # the row's list first, then the rest by name (newer-looking first)
    ranked = [name for name in (*preferences, *sorted(fitting, reverse=True)) if name in fitting]
    ranked = [name for name in dict.fromkeys(ranked) if name not in avoid]
    if not ranked:
        return ModelChoice(own, f"the workspace serves no model for the {MODEL_API_LABELS[api]} API {who} "
                                f"needs; {variable} {own} kept", "unserved")
    served = ", ".join(ranked[:MODELS_NAMED]) + (", ..." if len(ranked) > MODELS_NAMED else "")
    return ModelChoice(ranked[0], f"{variable} {own} is not served here (served for {who}: {served})", "replaced")


def model_choice(name):
    """(model, why, status): the model agent `name` uses, and why (see above)."""
    agent = next(agent for agent in AGENTS if agent.name == name)
    return choose_model(agent.model_variable, CONFIG.models[name], agent.model_api, agent.models, agent.label)


def hermes_fallback_choice():
    """HERMES_FALLBACK_MODEL picked like a model, never Hermes' own; None when it is not set."""
    if not CONFIG.hermes_fallback_model:
        return None
    hermes = next(agent for agent in AGENTS if agent.name == "hermes")
    return choose_model("HERMES_FALLBACK_MODEL", CONFIG.hermes_fallback_model, hermes.model_api, hermes.models,
                        "Hermes Agent's fallback", avoid={model_choice("hermes").model})


def model_choices(name):
    """The agent's ModelChoice and, for Hermes Agent, its fallback's (else None): what its config is written with."""
    return model_choice(name), hermes_fallback_choice() if name == "hermes" else None


def describe_choice(label, choice):
    return f"{label}: {choice.model} \N{EM DASH} {choice.why}"


# Claude Code's smaller models: the first one served, else its own model; while what is served
# is not known, the last (long-served) one.
CLAUDE_SMALLER_MODELS = {
    "ANTHROPIC_DEFAULT_SONNET_MODEL": ("databricks-claude-sonnet-4-6", "databricks-claude-sonnet-4-5"),
    "ANTHROPIC_DEFAULT_HAIKU_MODEL": ("databricks-claude-haiku-4-5",),
}


def claude_smaller_model(names, own):
    apis = PROCESS.models.apis
    if apis is None:
        return names[-1]
    return next((name for name in names if "anthropic" in (apis.get(name) or ())), own)


class AgentContext:
    """What every writer needs: where things are, the proxy (every agent's calls go through it), the models."""

    def __init__(self):
        self.home = PATHS.home
        self.projects = PATHS.projects

    @property
    def proxy_key(self):
        PROCESS.proxy_port.require()  # never handed to whatever else holds the port
        return proxy_key()

    def agent_key(self, agent):
        """The proxy key for one agent: its calls are counted as its own (usage, section 11)."""
        return agent_key(self.proxy_key, agent)

    def key_command(self, agent):
        """What Claude Code and Codex run for their key: `coda.py proxy-key AGENT` (a fast path)."""
        self.proxy_key  # the same check: only once the port is this CoDA's proxy
        return [sys.executable, str(PROGRAM), "proxy-key", agent]

    def proxied(self, api):
        """The local proxy's address for `api`: it adds the current token to every call.
        ConfigError when the port is not this CoDA's proxy."""
        PROCESS.proxy_port.require()
        return f"http://127.0.0.1:{CONFIG.proxy_port}" + GATEWAY_PATHS[api][0]

    def mcp_servers(self):
        """Every MCP server the agents get, as (name, URL, headers): the managed ones at the local
        proxy with its key (never a workspace token), only while the port is this CoDA's; then
        the third-party ones, which leave the workspace."""
        managed = []
        if PROCESS.proxy_port.ours():
            key = {"Authorization": f"Bearer {self.proxy_key}"}
            managed = [(name, f"http://127.0.0.1:{CONFIG.proxy_port}{MCP_PROXY_PREFIX}{path}", key)
                       for name, path in CONFIG.managed_mcp]
        return managed + [(name, url, {}) for name, url in CONFIG.mcp_servers]


def configure_claude(ctx):
    """Claude Code: through the local proxy (which adds the current token and counts what it spends),
    with its proxy key from `coda.py proxy-key claude` (apiKeyHelper)."""
    def settings(data):
        env = nested(data, "env")
        model = model_choice("claude").model
        env.update(ANTHROPIC_BASE_URL=ctx.proxied("anthropic"), ANTHROPIC_MODEL=model, ANTHROPIC_DEFAULT_OPUS_MODEL=model,
                   **{key: claude_smaller_model(names, model) for key, names in CLAUDE_SMALLER_MODELS.items()},
                   ANTHROPIC_CUSTOM_HEADERS="x-databricks-use-coding-agent-mode: true",
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1",
                   CLAUDE_CODE_API_KEY_HELPER_TTL_MS="60000")
        if CONFIG.disable_auto_memory:
            env["CLAUDE_CODE_DISABLE_AUTO_MEMORY"] = CONFIG.disable_auto_memory
        data["apiKeyHelper"] = shlex.join(ctx.key_command("claude"))
        claude_trace_hook(data)
        notice_hooks(data, "claude")

    def state(data):
        data["hasCompletedOnboarding"] = True
        forget_old_trust(data.get("projects"), str(ctx.projects), "hasTrustDialogAccepted", True)
        merge_mcp(nested(data, "mcpServers"), ctx, lambda url, headers: {"type": "http", "url": url, "headers": headers})

    merge_json(ctx.home / ".claude" / "settings.json", settings)
    merge_json(ctx.home / ".claude.json", state)
    write_owned(ctx.home / ".claude" / "CLAUDE.md", AGENT_INSTRUCTIONS, "<!--")


CODEX_MCP_GRACE_MS = 10_000  # how long codex waits for an MCP server's tools before a turn (unless the user set it)


def configure_codex(ctx):
    """Codex: a `databricks` provider on the Responses API at the local proxy, whose key comes from
    `coda.py proxy-key codex`."""
    def settings(data):
        model = model_choice("codex").model
        data.update(model=model, model_provider="databricks", web_search="disabled",
                    model_context_window=model_limits(model)[0])
        command, *args = ctx.key_command("codex")
        nested(data, "model_providers")["databricks"] = {
            "name": "Databricks AI Gateway", "base_url": ctx.proxied("responses"), "wire_api": "responses",
            "auth": {"command": command, "args": args, "refresh_interval_ms": 5_000}}
        nested(data, "features")["daemon_auto_start"] = False  # else app-server daemons outlive the session
        merge_mcp(nested(data, "mcp_servers"), ctx, lambda url, headers: {"url": url, "http_headers": headers})
        # Codex gives an MCP server 1 s to list its tools, then runs the turn without them; the workspace's
        # answer through the proxy can take longer, so its tools would be missing from a first turn.
        data.setdefault("mcp_optional_startup_grace_ms", CODEX_MCP_GRACE_MS)
        forget_old_trust(data.get("projects"), str(ctx.projects), "trust_level", "trusted")
        codex_notify(data)

    merge_toml(ctx.home / ".codex" / "config.toml", settings)
    write_owned(ctx.home / ".codex" / "AGENTS.md", AGENT_INSTRUCTIONS, "<!--")


def configure_gemini(ctx):
    """Gemini CLI: through the local proxy, which adds the current token to every call."""
    def settings(data):
        nested(data, "security", "auth")["selectedType"] = "gemini-api-key"
        nested(data, "model")["name"] = model_choice("gemini").model
        nested(data, "privacy")["usageStatisticsEnabled"] = False
        gemini_trace_hook(data)
        notice_hooks(data, "gemini")
        nested(data, "general").update(enableAutoUpdate=False, enableAutoUpdateNotification=False)
        merge_mcp(nested(data, "mcpServers"), ctx, lambda url, headers: {"httpUrl": url, "headers": headers})

    def trusted_folders(data):
        for folder in (str(ctx.projects), str(ctx.home)):
            if data.get(folder) == "TRUST_FOLDER":
                del data[folder]

    merge_json(ctx.home / ".gemini" / "settings.json", settings)
    merge_env_file(ctx.home / ".gemini" / ".env", gemini_environment(ctx))
    merge_json(ctx.home / ".gemini" / "trustedFolders.json", trusted_folders)
    write_owned(ctx.home / ".gemini" / "GEMINI.md", AGENT_INSTRUCTIONS, "<!--")


def gemini_environment(ctx):
    return {"GOOGLE_GEMINI_BASE_URL": ctx.proxied("gemini"), "GEMINI_API_KEY": ctx.agent_key("gemini"),
            "GEMINI_API_KEY_AUTH_MECHANISM": "bearer"}


def opencode_environment(ctx):
    return {"OPENCODE_DISABLE_MODELS_FETCH": "1"}


def configure_opencode(ctx):
    """OpenCode: an OpenAI-compatible provider at the local proxy (which also repairs its requests)."""
    model = model_choice("opencode").model

    def settings(data):
        data["$schema"] = "https://opencode.ai/config.json"
        nested(data, "provider")["databricks"] = {
            "npm": "@ai-sdk/openai-compatible", "name": "Databricks AI Gateway",
            "options": {"baseURL": ctx.proxied("chat")},
            "models": {name: {"name": name, "limit": dict(zip(("context", "output"), model_limits(name)))}
                       for name in configured_models()}}
        data.update(model=f"databricks/{model}", small_model=f"databricks/{model}", autoupdate=False,
                    share="disabled")
        # Only the providers named here load: no fallback to one CoDA did not set up (a user's own stay).
        enabled = data.get("enabled_providers") if isinstance(data.get("enabled_providers"), list) else []
        data["enabled_providers"] = list(dict.fromkeys([*enabled, "databricks"]))
        merge_mcp(nested(data, "mcp"), ctx,
                  lambda url, headers: {"type": "remote", "url": url, "enabled": True, "headers": headers})

    merge_json(ctx.home / ".config" / "opencode" / "opencode.json", settings)
    merge_json(ctx.home / ".local" / "share" / "opencode" / "auth.json",
               lambda data: data.update(databricks={"type": "api", "key": ctx.agent_key("opencode")}))
    write_owned(ctx.home / ".config" / "opencode" / "AGENTS.md", AGENT_INSTRUCTIONS, "<!--")


def configure_hermes(ctx):
    """Hermes Agent: a custom provider at the local proxy; a config.yaml edited by hand is left alone."""
    provider = {"provider": "custom", "base_url": ctx.proxied("chat"), "api_key": ctx.agent_key("hermes")}
    model, fallback = model_choice("hermes").model, hermes_fallback_choice()
    config = {"model": {**provider, "default": model, "context_length": model_limits(model)[0]},
              "mcp_servers": {name: {"url": url, "headers": headers} for name, url, headers in ctx.mcp_servers()},
              "skills": {"external_dirs": [str(ctx.home / ".claude" / "skills")]}}
    if fallback:
        config["fallback_model"] = {**provider, "model": fallback.model,
                                    "context_length": model_limits(fallback.model)[0]}
    write_owned(ctx.home / ".hermes" / "config.yaml", json.dumps(config, indent=2) + "\n")  # JSON is YAML
    write_owned(ctx.projects / "HERMES.md", AGENT_INSTRUCTIONS, "<!--")


# Folder trust. Claude Code, Codex and Gemini CLI ask before they let a folder's own settings
# and hooks run; CoDA answers only for the projects it restored itself (trust_folder). Measured
# with the CLIs (Claude Code 2.1, Codex 0.171, Gemini CLI 0.61): a trusted folder covers its
# subfolders in Claude Code (up to the root of the git repository they are in) and in Gemini CLI
# (all of them), and only itself, or the repository it is the root of, in Codex. So trusting
# ~/projects or $HOME, as earlier CoDA versions did, trusted every repository a user cloned.
# Those exact entries (~/projects in all three, $HOME in Gemini CLI's) are removed at every
# start; every other entry is the user's and stays (a user who accepted a prompt for ~/projects
# itself answers it again).
def forget_old_trust(entries, folder, key, value):
    """Take `key` out of entries[folder] where it holds the `value` an earlier CoDA wrote."""
    entry = entries.get(folder) if isinstance(entries, dict) else None
    if isinstance(entry, dict) and entry.get(key) == value:
        del entry[key]
        if not entry:
            del entries[folder]


def trust_folder(folder):
    """Let Claude Code, Codex and Gemini CLI open `folder` (a project CoDA restored) without asking."""
    path = str(folder.resolve())
    home = PATHS.home
    merge_json(home / ".claude.json", lambda data: nested(data, "projects", path).update(hasTrustDialogAccepted=True))
    merge_toml(home / ".codex" / "config.toml", lambda data: nested(data, "projects", path).update(trust_level="trusted"))
    merge_json(home / ".gemini" / "trustedFolders.json", lambda data: data.update({path: "TRUST_FOLDER"}))


def write_databrickscfg(token):
    """~/.databrickscfg [DEFAULT] host and token for the CLI and SDK; other profiles kept."""
    import configparser

    path = PATHS.databrickscfg
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as error:
        raise ConfigError(f"{path} cannot be parsed ({reason(error)}); CoDA left it alone") from None
    parser["DEFAULT"].update(host=CONFIG.databricks_host, token=token)
    text = io.StringIO()
    parser.write(text)
    write_private(path, text.getvalue())


MCP_NAMES = ("deepwiki", "exa", "team-memory")  # the third-party servers CoDA writes (section 1)
CODA_MCP_URL = re.compile(r"http://127\.0\.0\.1:[0-9]+" + re.escape(MCP_PROXY_PREFIX) + "/")


def is_coda_mcp_entry(name, entry):
    """An MCP entry CoDA wrote: a third-party one by its name, a managed one by its name and its
    URL at a local proxy (a user's own databricks-* server elsewhere is theirs)."""
    if name in MCP_NAMES:
        return True
    urls = [entry.get(key) for key in ("url", "httpUrl")] if isinstance(entry, dict) else []
    return name.startswith(MANAGED_MCP_NAME) and any(isinstance(u, str) and CODA_MCP_URL.match(u) for u in urls)


def merge_mcp(servers, ctx, shape):
    """An agent's map of MCP servers with CoDA's old entries replaced by its current ones (in the
    agent's format: shape(url, headers)); the user's own entries stay."""
    for name in [name for name, entry in servers.items() if is_coda_mcp_entry(name, entry)]:
        del servers[name]
    servers.update({name: shape(url, headers) for name, url, headers in ctx.mcp_servers()})


def describe_mcp_servers():
    """One line per MCP server the agents get, saying where its calls go (setup's step and doctor)."""
    lines = [f"{server['name']}: LEAVES THE WORKSPACE (to {server['host']}; CODA_MCP_THIRD_PARTY=0 drops it)"
             if server["leaves_workspace"] else
             f"{server['name']}: in the workspace ({server['path']}, with the user's current token)"
             for server in mcp_server_list()]
    return lines or ["none"]


AGENTS = AGENT_ROWS  # the rows at the top of the file; a row names its functions, found here by name


def agent_function(name):
    """The function a row names (the rows come before the functions they name)."""
    return globals()[name]


def enabled_agents():
    return [agent for agent in AGENTS if agent.name not in CONFIG.agents_off]


def agent_environment():
    """Variables the terminals get for the agents (a project's own .env must not hide Gemini's)."""
    server = {"CODA_SERVER_PID": str(os.getpid())}  # doctor, run in a terminal, checks this CoDA's proxy
    if not PROCESS.pat.token or not PROCESS.proxy_port.ours():
        return server  # the proxy's address and key only where the port is this CoDA's
    ctx = AgentContext()
    return {**server, **{key: value for agent in enabled_agents() if agent.environment
                         for key, value in agent_function(agent.environment)(ctx).items()}}


def terminal_environment():
    """What a terminal, or a setup command, starts with: shell_environment plus the agents' variables."""
    return shell_environment(CONFIG, agent_environment())


@functools.cache
def proxy_key():
    """The local proxy's key, kept in a 0600 file so configs written before a restart stay valid;
    read once (the proxy asks on every request)."""
    path = PATHS.proxy_key_file
    try:
        key = path.read_text().strip()
    except OSError:
        key = ""
    if len(key) < 32:
        key = "coda-proxy-" + secrets.token_hex(24)
        write_private(path, key + "\n")
    return key


def proxy_proof(challenge, pid):
    """What only a holder of this HOME's proxy key can answer to a challenge: the checker sends a
    fresh nonce, never the key. The pid tells two CoDAs that share a HOME (and a key) apart."""
    message = f"coda-proxy-health {challenge} {pid}".encode()
    return hmac.new(proxy_key().encode(), message, "sha256").hexdigest()


# Tracing hooks in the agents' configs (MLFLOW_TRACING_ENABLED): each agent's end-of-turn
# hook runs `coda.py trace AGENT` (section 13), with tracing on; off, CoDA's hook goes.
TRACE_COMMAND = [sys.executable, str(PROGRAM), "trace"]


def tracing_hook(agent):
    """The hook command for `agent`, or None with tracing off (whose stale settings go too)."""
    if not CONFIG.mlflow_tracing:
        PATHS.tracing_file.unlink(missing_ok=True)
        return None
    return TRACE_COMMAND + [agent]


def _is_ours(agent):
    """A hook entry CoDA wrote for `agent`, wherever coda.py lived then."""
    suffix = f" trace {agent}"
    return lambda hook: (isinstance(hook, dict) and isinstance(hook.get("command"), str)
                         and hook["command"].endswith(suffix) and "coda" in hook["command"])


def merge_hook(data, event, entry, ours):
    """settings["hooks"][event] (Claude Code's and Gemini CLI's shape: groups of {"hooks": [...]}) with
    every entry `ours` removed, then `entry` added once when given; everything else is kept."""
    hooks = data.get("hooks", {})
    if not isinstance(hooks, dict) or not isinstance(hooks.get(event, []), list):
        log.warning("the hooks in an agent's settings are not in a shape CoDA knows; left alone")
        return
    groups = []
    for group in hooks.get(event, []):
        if isinstance(group, dict) and isinstance(group.get("hooks"), list):
            inner = [hook for hook in group["hooks"] if not ours(hook)]
            if not inner:
                continue  # a group that held only ours
            group = {**group, "hooks": inner}
        groups.append(group)
    if entry:
        groups.append({"hooks": [entry]})
    if groups:
        hooks[event] = groups
    else:
        hooks.pop(event, None)
    if hooks:
        data["hooks"] = hooks
    else:
        data.pop("hooks", None)


def claude_trace_hook(data):
    """For configure_claude's settings(data): CoDA's Stop hook while tracing is on, none when off."""
    command = tracing_hook("claude")
    entry = command and {"type": "command", "command": shlex.join(command), "timeout": 30}
    merge_hook(data, "Stop", entry, _is_ours("claude"))


def gemini_trace_hook(data):
    """For configure_gemini's settings(data): CoDA's AfterAgent hook while tracing is on, none when off."""
    command = tracing_hook("gemini")
    entry = command and {"type": "command", "name": "MLflow tracing",  # shown for a moment after each turn
                         "command": shlex.join(command)}
    merge_hook(data, "AfterAgent", entry, _is_ours("gemini"))


def codex_notify(data):
    """For configure_codex, on the parsed config.toml. Codex has one notify program: it is
    `coda.py notify codex`, which tells the page (notice_hooks), runs CoDA's tracer while tracing is
    on (--trace), and then the user's own notify command, kept after "--"."""
    current = data.get("notify")
    if current is not None and not (isinstance(current, list) and all(isinstance(a, str) for a in current)):
        log.warning("%s has a notify CoDA cannot read; left alone", PATHS.home / ".codex" / "config.toml")
        return
    user = current or []
    text = " ".join(user)
    if "coda" in text and (user[-2:] == ["trace", "codex"] or " notify codex" in text):  # ours, of any version
        user = user[user.index("--") + 1:] if "--" in user else []
    data["notify"] = (NOTIFY_COMMAND + ["codex"] + (["--trace"] if tracing_hook("codex") else [])
                      + (["--", *user] if user else []))
    tui = nested(data, "tui")  # approvals have no notify event: Codex's TUI tells its terminal with OSC 9
    tui.setdefault("notifications", ["approval-requested"])
    tui.setdefault("notification_method", "osc9")


# Notice hooks (issue 13): Claude Code and Gemini CLI run `coda.py notify AGENT` (answered at the
# top of the file) when a turn ends and when they wait for the user, beside the user's own hooks
# and tracing; Codex's notify is codex_notify above. Always written: the page has the switch.
NOTIFY_COMMAND = [sys.executable, str(PROGRAM), "notify"]
NOTICE_EVENTS = {"claude": ("Stop", "Notification"), "gemini": ("AfterAgent", "Notification")}


def notice_hooks(data, agent):
    """For the agents' settings(data): CoDA's notice hook on each of NOTICE_EVENTS[agent], once."""
    suffix = f" notify {agent}"
    ours = lambda hook: (isinstance(hook, dict) and isinstance(hook.get("command"), str)
                         and hook["command"].endswith(suffix) and "coda" in hook["command"])
    entry = {"type": "command", "command": shlex.join(NOTIFY_COMMAND + [agent]), "timeout": 10}
    if agent == "gemini":
        entry = {"type": "command", "name": "CoDA notice", "command": entry["command"]}
    for event in NOTICE_EVENTS[agent]:
        merge_hook(data, event, entry, ours)


# ===========================================================================
# 10. Setup
# ===========================================================================

INSTALL_SCRIPTS = HERE / "install"


class StepFailed(Exception):
    """A step that did not do its job: the message is the one-line reason shown in the page."""


class Step:
    """One setup step and what /api/setup-status says of it."""

    def __init__(self, step_id, label, run, kind, timeout=900):
        self.id, self.label, self.run, self.kind, self.timeout = step_id, label, run, kind, timeout
        self.status, self.error, self.started_at, self.finished_at = "pending", None, None, None
        self.output = collections.deque(maxlen=20)  # the tail of what it printed
        self.detail = None  # one line the page shows under the step, whatever its status (an agent's model)

    def describe(self):
        return {"id": self.id, "label": self.label, "status": self.status, "error": self.error,
                "started_at": self.started_at, "finished_at": self.finished_at, "output": list(self.output),
                "detail": self.detail}

    def execute(self):
        """Run once, recording state, duration and a one-line error; never raises."""
        self.status, self.error, self.started_at, self.finished_at = "running", None, time.time(), None
        self.detail = None
        try:
            with gevent.Timeout(self.timeout, StepFailed(f"timed out after {self.timeout} s")):
                self.run(self)
            if self.status == "running":  # a step may have decided to skip itself
                self.status = "complete"
        except StepFailed as error:
            self.status, self.error = "failed", redact(str(error))
        except Exception as error:
            self.status, self.error = "failed", reason(error)
        self.finished_at = time.time()
        log.info("setup: %s %s in %.1f s%s", self.label, self.status, self.finished_at - self.started_at,
                 f" ({self.error})" if self.error else "")

    def skip(self, why):
        self.status, self.error = "skipped", why


def run_command(step, argv, env=None, timeout=None):
    """Run a command for a step in its own process group, keeping the tail of its output."""
    from gevent import subprocess  # lazy: only setup starts programs

    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**terminal_environment(), **(env or {})}, start_new_session=True,
                               cwd=str(PATHS.home))
    try:
        for line in process.stdout:
            text = redact(line.decode(errors="replace").rstrip())
            if text:
                step.output.append(text[-300:])
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if code != 0:
        last = step.output[-1] if step.output else f"exit status {code}"
        raise StepFailed(last)


def installed_version(binary):
    """The first line `binary --version` prints, or StepFailed: an install is complete only if it runs."""
    from gevent import subprocess

    env = terminal_environment()
    path = shutil.which(binary, path=env["PATH"]) or PATHS.local_bin / binary
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, timeout=VERSION_TIMEOUT, env=env,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise StepFailed(f"{binary} does not run: {reason(error)}") from None
    if done.returncode != 0:
        raise StepFailed(f"{binary} --version failed with exit status {done.returncode}")
    return (done.stdout or done.stderr).decode(errors="replace").strip().splitlines()[0]


def install_step(step_id, label, script, binary, *args, env=None):
    def run(step):
        run_command(step, ["bash", str(INSTALL_SCRIPTS / script), "--prefix", str(PATHS.local), *args], env=env)
        step.output.append(installed_version(binary))
    return Step(step_id, label, run, "install")


def proxy_health():
    """The local proxy's /health answer, proven to come from a holder of this HOME's proxy key (the
    challenge sends a nonce, never the key). OSError when nothing answers; StepFailed when what
    answers is not CoDA's proxy. Setup's proxy step and doctor ask it."""
    import http.client  # not requests: this runs at every boot, and requests is heavy

    challenge = secrets.token_hex(16)
    connection = http.client.HTTPConnection("127.0.0.1", CONFIG.proxy_port, timeout=PROXY_PROBE_SECONDS)
    try:
        connection.request("GET", f"/health?challenge={challenge}")
        answer = connection.getresponse()
        body = answer.read(64 * 1024)
    finally:
        connection.close()
    try:
        health = json.loads(body) if answer.status == 200 else None
    except ValueError:
        health = None
    proof = health.get("proof") if isinstance(health, dict) else None
    if not isinstance(proof, str) or not hmac.compare_digest(proof, proxy_proof(challenge, health.get("pid"))):
        raise StepFailed(f"127.0.0.1:{CONFIG.proxy_port} is held by another program (not this CoDA's proxy; it "
                         f"answered HTTP {answer.status} without the proxy key's proof): "
                         "set CODA_PROXY_PORT to a free port")
    return health


def check_proxy(step):
    """This process's proxy holds the port (its own server bound it) and answers its challenge."""
    try:
        PROCESS.proxy_port.require(wait=PROXY_SETTLE_SECONDS)
    except ConfigError as error:
        raise StepFailed(str(error)) from None
    deadline = time.time() + PROXY_SETTLE_SECONDS
    while True:
        try:
            proxy_health()
            return
        except OSError as error:
            if time.time() > deadline:
                raise StepFailed(f"the local proxy on 127.0.0.1:{CONFIG.proxy_port} does not answer: {reason(error)}")
        gevent.sleep(0.2)


def agent_config_step(agent):
    def run(step):
        # settled first: a writer that needs the proxy fails if the port is not ours
        PROCESS.proxy_port.ours(wait=PROXY_SETTLE_SECONDS)
        PROCESS.models.wait()  # the listing this token started: the model is chosen from it
        choice, fallback = step.models = model_choices(agent.name)
        step.detail = describe_choice(agent.label, choice)
        said = [(step.detail, choice)]
        if fallback:
            said.append((describe_choice("Hermes Agent's fallback", fallback), fallback))
            step.output.append(said[-1][0])
        for line, each in said:
            if each.status == "replaced":
                log.warning("%s", line)  # a model the user set is not served: said, never silent
        try:
            agent_function(agent.writer)(AgentContext())
        except ConfigError as error:
            raise StepFailed(str(error)) from None
        if choice.status == "unserved":  # written with its own model all the same; the others go on
            raise StepFailed(step.detail)
    step = Step(f"configure-{agent.name}", f"Configure {agent.label}", run, "token", timeout=60)
    step.models = None  # the model_choices its config was last written with
    return step


def list_models_step(step):
    """Setup step (token): what the workspace serves for each agent API, or the one sentence on why
    that is not known (the agents then keep their configured models)."""
    PROCESS.models.wait()
    step.output.extend(PROCESS.models.describe())
    served = PROCESS.models.apis
    step.detail = PROCESS.models.notice or ", ".join(
        f"{len(served_for(served, api))} for {MODEL_API_LABELS[api]}" for api in MODEL_API_LABELS) + " served"


def mcp_step():
    """The MCP servers the agents get. Its label says which leave the workspace (as the page's own
    card and doctor do); it fails, naming each, on a malformed setting, or when the managed servers cannot be given
    (the local proxy, which adds the token, is not this CoDA's)."""
    leaving = [name for name, _ in CONFIG.mcp_servers]
    label = "MCP servers" + (f" ({', '.join(leaving)} leave the workspace)" if leaving else "")

    def run(step):
        step.output.extend(describe_mcp_servers())
        problems = list(CONFIG.mcp_errors)
        if CONFIG.managed_mcp and not PROCESS.proxy_port.ours(wait=PROXY_SETTLE_SECONDS):
            problems.append(f"the Databricks MCP servers were not given to the agents: {PROCESS.proxy_port.error}")
        if problems:
            raise StepFailed("; ".join(problems))
    return Step("mcp", label, run, "token", timeout=60)


def configure_databricks(step):
    """~/.databrickscfg for the CLI and SDK, and git's identity from SCIM Me when the user has none."""
    write_databrickscfg(PROCESS.pat.token)
    me = PROCESS.pat.identity
    if me is None:
        return
    for key, value in (("user.name", me.display_name or me.user_name), ("user.email", me.user_name)):
        if value and not git_config(key):
            git_config(key, value)


def git_config(key, value=None):
    from gevent import subprocess

    argv = ["git", "config", "--global", key] + ([value] if value is not None else [])
    done = subprocess.run(argv, capture_output=True, env=terminal_environment(), timeout=GIT_CONFIG_TIMEOUT)
    if value is not None and done.returncode != 0:
        raise StepFailed(f"git config {key} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode().strip()


def parse_skill_sources(text):
    """CODA_SKILLS: sources separated by ';', each 'repository ref folder'."""
    sources = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        parts = entry.split()
        if len(parts) != 3:
            raise StepFailed(f"CODA_SKILLS entry {entry!r} is not 'repository ref folder'")
        sources.append(tuple(parts))
    return sources


# Claude Code reads ~/.claude/skills; Codex and Gemini CLI both read ~/.agents/skills;
# Hermes reads ~/.claude/skills through skills.external_dirs in its config.


def install_skills(step):
    """Shallow-clone each source at its pinned ref and link its skills where every agent looks."""
    failures = []
    for repository, ref, folder in parse_skill_sources(CONFIG.skills):
        try:
            count = fetch_skill_source(step, repository, ref, folder)
            step.output.append(f"{repository} {ref}: {count} skills")
        except StepFailed as error:
            failures.append(f"{repository}: {error}")
            step.output.append(failures[-1])
    if failures:
        raise StepFailed("; ".join(failures))


def fetch_skill_source(step, repository, ref, folder):
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", repository.rstrip("/").split("/")[-1].removesuffix(".git"))
    checkout = PATHS.skill_sources / name
    mirror = CONFIG.git_mirror
    git = ["git"] + (["-c", f"url.{mirror}/.insteadOf=https://github.com/"] if mirror else [])
    if not (checkout / ".git").exists():
        checkout.mkdir(parents=True, exist_ok=True)
        run_command(step, git + ["-C", str(checkout), "init", "-q"])
    run_command(step, git + ["-C", str(checkout), "fetch", "-q", "--depth", "1", repository, ref])
    run_command(step, git + ["-C", str(checkout), "checkout", "-q", "--force", "FETCH_HEAD"])
    root, source = checkout.resolve(), (checkout / folder).resolve()
    if not source.is_dir() or (source != root and root not in source.parents):
        raise StepFailed(f"{ref} has no folder {folder!r}")
    skills = [d for d in sorted(source.iterdir()) if (d / "SKILL.md").is_file()]
    for target in PATHS.skill_folders:
        target.mkdir(parents=True, exist_ok=True)
        for skill in skills:
            link = target / skill.name
            if link.is_symlink() or not link.exists():  # a skill the user made there is kept
                link.unlink(missing_ok=True)
                link.symlink_to(skill)
    return len(skills)


# The tracing step: `coda.py trace prepare` (section 13) in a child process creates the
# experiment and writes ~/.coda/tracing.json for the hooks; the server never imports mlflow.
TRACING_READY = {}       # (tracking URI, experiment name) -> experiment id, resolved once per server


def experiment_name():
    """MLFLOW_EXPERIMENT_NAME, else /Users/<user>/<app name or coda>; None while nobody is known."""
    if CONFIG.mlflow_experiment:
        return CONFIG.mlflow_experiment
    user = PROCESS.pat.user or PROCESS.access.owner  # the token's own user first: its folder is the one it may write
    return f"/Users/{user}/{CONFIG.app_name or 'coda'}" if user else None


def prepare_tracing(step):
    """Setup step (only with tracing on): the experiment, created if missing, and ~/.coda/tracing.json
    for the hooks, in a child process so the server never imports mlflow."""
    name = experiment_name()
    if not name:
        step.skip("no owner or user is known to name the MLflow experiment (set MLFLOW_EXPERIMENT_NAME)")
        return
    uri = CONFIG.mlflow_tracking_uri
    if (uri, name) in TRACING_READY and PATHS.tracing_file.exists():
        step.output.append(f"experiment {name} (id {TRACING_READY[uri, name]})")
        return
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": name}
    if uri.startswith("databricks"):  # the child's own credentials; never on its command line
        env.update(DATABRICKS_HOST=CONFIG.databricks_host, DATABRICKS_TOKEN=PROCESS.pat.token or "")
    run_command(step, TRACE_COMMAND + ["prepare"], env=env, timeout=150)
    TRACING_READY[uri, name] = read_tracing_file().get("experiment_id")


def read_tracing_file():
    return read_json_object(PATHS.tracing_file)


# The commit hook step: a global core.hooksPath whose post-commit starts `coda.py sync`
# (section 14) for repositories under ~/projects.
# Hooks that pass through to the repository's own: with core.hooksPath set globally, git
# looks nowhere else. Left out, because merely existing changes what git does:
# push-to-checkout, proc-receive, fsmonitor-watchman and the p4-* hooks.
GIT_HOOK_NAMES = ("applypatch-msg", "pre-applypatch", "post-applypatch", "pre-commit", "pre-merge-commit",
                  "prepare-commit-msg", "commit-msg", "post-checkout", "post-merge", "pre-push", "pre-rebase",
                  "post-rewrite", "pre-auto-gc", "reference-transaction", "post-index-change",
                  "sendemail-validate", "pre-receive", "update", "post-receive", "post-update")

PASS_THROUGH_HOOK = """\
#!/bin/sh
# Written by CoDA at every start. A global core.hooksPath hides each repository's
# own hooks, so this runs the repository's hook of the same name, if it has one.
common=$(git rev-parse --git-common-dir 2>/dev/null) || exit 0
hook="$common/hooks/${0##*/}"
if [ -x "$hook" ] && ! [ "$hook" -ef "$0" ]; then exec "$hook" "$@"; fi
exit 0
"""

POST_COMMIT_HOOK = """\
#!/bin/sh
# Written by CoDA at every start. Runs the repository's own post-commit, then copies
# the commit to the Databricks workspace in the background (~/.sync.log says how it
# went), for repositories under ~/projects only. Never fails or slows a commit.
common=$(git rev-parse --git-common-dir 2>/dev/null) || exit 0
own="$common/hooks/post-commit"
if [ -x "$own" ] && ! [ "$own" -ef "$0" ]; then "$own" "$@"; fi
top=$(git rev-parse --show-toplevel 2>/dev/null) && top=$(cd "$top" && pwd -P) || exit 0
projects=$(cd "$HOME/projects" 2>/dev/null && pwd -P) || exit 0
case "$top/" in
    "$projects"/?*) ;;
    *) exit 0 ;;
esac
# Its own session: closing the terminal (SIGHUP, then SIGKILL to the session) must not end it.
detach=nohup
command -v setsid >/dev/null 2>&1 && detach=setsid
unset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE GIT_PREFIX
$detach @PYTHON@ @PROGRAM@ sync "$top" >>"$HOME/.sync.log" 2>&1 </dev/null &
exit 0
"""


def install_commit_hook(step):
    """Setup step: point git's global core.hooksPath at CoDA's hooks (rewritten at every start,
    so they always name this Python and this coda.py). A hooksPath of the user's own is kept."""
    if not CONFIG.databricks_host:  # nothing to sync to: leave a local user's git alone
        step.skip("no Databricks workspace is configured (DATABRICKS_HOST)")
        return
    current = git_config("core.hooksPath")
    if current and Path(current).expanduser().resolve() != PATHS.git_hooks.resolve():
        raise StepFailed(f"git's core.hooksPath is already {current}: CoDA leaves it alone, so commits are "
                         "not copied to the workspace (unset it and restart CoDA to have them copied)")
    for name in GIT_HOOK_NAMES:
        write_hook(PATHS.git_hooks / name, PASS_THROUGH_HOOK)
    write_hook(PATHS.git_hooks / "post-commit", POST_COMMIT_HOOK.replace("@PYTHON@", shlex.quote(sys.executable))
               .replace("@PROGRAM@", shlex.quote(str(PROGRAM))))
    if not current:
        git_config("core.hooksPath", str(PATHS.git_hooks))
    step.output.append(f"commits under {PATHS.projects} are copied to the workspace; repositories' own hooks still run")


def write_hook(path, text):
    write_private(path, text)
    path.chmod(0o700)


# The restore offer: what `coda.py restore` (section 14) would bring back.
WORKSPACE_PREFIX = "/Workspace"


def projects_folder(user):
    return f"{WORKSPACE_PREFIX}/Users/{user}/projects"


def offer_restore(step):
    """Setup step (token): the app's disk does not survive a restart, so when ~/projects holds no
    project and the workspace does, say how to bring them back. The user decides: no download here."""
    if local_projects():
        return
    names = workspace_projects(workspace_client(PROCESS.pat.token), PROCESS.pat.user)
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        message = (f"~/projects is empty but your workspace holds {len(names)} project(s) ({shown}): "
                   f"run `{shlex.quote(sys.executable)} {shlex.quote(str(PROGRAM))} restore` to download them")
        log.info("%s", message)
        step.output.append(message)


def local_projects():
    projects = PATHS.projects
    return [p for p in projects.iterdir() if p.is_dir() and not p.name.startswith(".")] if projects.is_dir() else []


def workspace_projects(client, user):
    """Names of the project folders in the user's workspace (none when the folder does not exist)."""
    from databricks.sdk.errors import NotFound
    from databricks.sdk.service.workspace import ObjectType

    try:
        return sorted(item.path.rstrip("/").rsplit("/", 1)[1] for item in client.workspace.list(projects_folder(user))
                      if item.object_type == ObjectType.DIRECTORY)
    except NotFound:
        return []


class Setup:
    """The step list and its runner: boot steps in order, then the install group in parallel;
    token steps whenever a token is configured."""

    def __init__(self):
        self.boot = [
            Step("git-hooks", "Git hooks: workspace sync on commit", install_commit_hook, "config", timeout=30),
            install_step("micro", "micro editor", "micro.sh", "micro"),
            install_step("gh", "GitHub CLI", "gh.sh", "gh"),
            install_step("databricks-cli", "Databricks CLI", "databricks.sh", "databricks"),
            Step("proxy", "Local agent proxy", check_proxy, "config", timeout=30),
        ]
        self.parallel = [install_step(agent.name, agent.label, "agents.sh", agent.name, agent.name,
                                      env={"CODA_PYTHON": sys.executable})  # agents.sh asks it for the rows
                         for agent in enabled_agents()]
        self.parallel.append(Step("skills", "Agent skills", install_skills, "install", timeout=600))
        self.token = [Step("databricks-config", "Databricks CLI configuration and git identity",
                           configure_databricks, "token", timeout=60)]
        self.token.append(Step("restore-state", "Restore saved work", restore_saved_state, "token",
                               timeout=STATE_RESTORE_TIMEOUT + 30))
        self.token.append(Step("models", "Models the workspace serves", list_models_step, "token", timeout=120))
        self.token += [agent_config_step(agent) for agent in enabled_agents()]
        self.token.append(mcp_step())
        if CONFIG.mlflow_tracing:
            self.token.append(Step("tracing", "MLflow tracing", prepare_tracing, "token", timeout=180))
        self.token.append(Step("restore-offer", "Projects saved in the workspace", offer_restore, "token", timeout=60))
        self.steps = self.boot + self.parallel + self.token

    def overall(self):
        states = {step.status for step in self.steps}
        for state in ("failed", "running", "pending"):
            if state in states:
                return state
        return "complete"

    def run_at_boot(self):
        started = time.time()
        if not CONFIG.databricks_host:
            for step in self.token:
                step.skip("no Databricks workspace is configured (DATABRICKS_HOST)")
        for step in self.boot:
            self._run_or_skip(step)
        group = [gevent.spawn(self._run_or_skip, step) for step in self.parallel]
        gevent.joinall(group)
        log.info("setup: install steps done in %.1f s", time.time() - started)

    def _run_or_skip(self, step):
        if step.kind == "install" and not CONFIG.install:
            step.skip("CODA_INSTALL=0")
        else:
            step.execute()

    def run_token_steps(self):
        """Write every agent's configuration for the current token, all at once (each its own files),
        once the CLI's configuration is written and the saved work is back (it names files the agents'
        writers merge into)."""
        first = [step for step in self.token if step.id in ("databricks-config", "restore-state")]
        for step in first:
            step.execute()
        gevent.joinall([gevent.spawn(step.execute) for step in self.token if step not in first])

    def rewrite_changed_models(self):
        """A rotation's listing changed what is served: rewrite (merging, as ever) the configs of the
        agents whose chosen model is not the one their config was written with."""
        steps = [step for step in self.token if step.id == "models"]
        steps += [step for step in self.token if getattr(step, "models", None) and step.status != "running"
                  and step.models != model_choices(step.id.removeprefix("configure-"))]
        for step in steps[1:]:
            log.info("the served models changed: rewriting %s", step.label)
        gevent.joinall([gevent.spawn(step.execute) for step in steps])


@api("/api/setup-status", "GET")
def setup_status():
    return {"status": PROCESS.setup.overall(), "steps": [step.describe() for step in PROCESS.setup.steps]}


# -- The agents the launcher offers: ready or not, why, and what to do ------------------------------

@api("/api/agents", "GET")
def list_agents():
    """The shell, then every agent row, each with whether it is ready (and if not, why and what to do);
    and which missing agents the page may offer to install (locally, with CODA_INSTALL=0)."""
    shell = {"name": "shell", "label": "Shell", "ready": True, "reason": None, "action": None, "model": None,
             "model_why": None, "installed": True, "enabled": True}
    return {"agents": [shell, *(agent_readiness(agent) for agent in AGENT_ROWS)], "install_offer": install_offer()}


def agent_readiness(agent):
    """{"name","label","ready","reason","action","model","model_why","installed","enabled"}: ready means installed,
    configured and with a token (one without a token still starts: it may sign itself in)."""
    reason, action = agent_problem(agent)
    model = model_choice(agent.name)
    return {"name": agent.name, "label": agent.label, "ready": reason is None, "reason": reason, "action": action,
            "model": model.model, "model_why": model.why, "installed": is_installed(agent.name),
            "enabled": agent.name not in CONFIG.agents_off}


def agent_problem(agent):
    """(reason, what to do) for an agent that is not ready, (None, None) for one that is."""
    steps = {step.id: step for step in PROCESS.setup.steps}
    install, configure = steps.get(agent.name), steps.get(f"configure-{agent.name}")
    if agent.name in CONFIG.agents_off:
        return "switched off", f"Set {agent.switch}=true in CoDA's environment and restart it."
    if not is_installed(agent.name):
        if install and install.status == "failed":
            return f"setup failed: {install.error}", "Read the setup card; restarting CoDA tries the install again."
        if install and install.status in ("pending", "running") and (CONFIG.install or install.started_at):
            return "being installed", "Wait for setup to finish."
        if not CONFIG.install:
            return "not installed", "Install it into ~/.local with the welcome card's \"Install them into ~/.local\"."
        return "not installed", "Restart CoDA to run its install step again."
    if configure and configure.status == "failed":
        return f"setup failed: {configure.error}", "Replace the token from the status bar to write its configuration again."
    if PROCESS.pat.token is None:
        if CONFIG.databricks_host:
            return "no token yet", "Paste a Databricks token in the first pane."
        return "no token yet", "Set DATABRICKS_HOST and paste a Databricks token, or sign the agent in yourself."
    return None, None


def is_installed(binary):
    return shutil.which(binary, path=shell_environment(CONFIG, {})["PATH"]) is not None


def install_offer():
    """The enabled agents the page may install into ~/.local: only where setup does not (CODA_INSTALL=0)."""
    if CONFIG.install:
        return []
    return [agent.name for agent in enabled_agents() if not is_installed(agent.name)]


@api("/api/setup/install-agents")
def install_agents(body):
    """Run the skipped install steps of the missing agents (install/agents.sh into ~/.local), in the
    background: their progress is /api/setup-status's, like any step's."""
    missing = set(install_offer())
    steps = [step for step in PROCESS.setup.parallel if step.id in missing and step.status != "running"]
    for step in steps:
        step.status, step.error = "pending", None
        gevent.spawn(step.execute)
    return {"status": "started", "agents": [step.id for step in steps]}
# -- Restart-proof state: the server's side -----------------------------------------
# The page reports its tabs (POST /api/layout); every few seconds each session's folder and the
# agent in its foreground are looked at; the two make ~/.coda/state-layout.json. `coda.py state
# save` (section 14, a child process: git, tar and uploads never hold this loop) runs every
# CODA_STATE_INTERVAL while a session printed something or the layout changed, and once more at
# SIGTERM, given up at STATE_FINAL_SECONDS. Setup's first token step runs `coda.py state restore`;
# until a restore has run (or found nothing), nothing is saved, so a new empty disk never
# overwrites the saved work.
MAX_LAYOUT_TABS = 20          # tabs the page may report (its own cap is lower)
STATE_SAMPLE_SECONDS = 5      # how often each session's folder and foreground agent are looked at
STATE_SAVE_TIMEOUT = 300      # one periodic save; past it the save is stopped (the last one stays whole)
STATE_FINAL_SECONDS = 8.0     # after SIGTERM, the last save is given up by then (the process is gone by 10 s)
STATE_RESTORE_TIMEOUT = 600   # setup's restore step
STATE_COMMAND = [sys.executable, str(PROGRAM), "state"]


def state_enabled():
    return CONFIG.state and bool(CONFIG.databricks_host)


def read_state_record():
    """~/.coda/state-record.json: the last save or restore, written by `coda.py state` (never a token)."""
    return read_json_object(PATHS.state_record)


def foreground_agent(session):
    """The agent (a row's name) running in the session's foreground, if one is: the program or
    script its foreground process group leader was started as (`node .../bin/claude`)."""
    try:
        with open(f"/proc/{os.tcgetpgrp(session.fd)}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")[:2]
    except (OSError, TypeError):
        return None
    names = {os.path.basename(arg.decode(errors="replace")).rsplit(".", 1)[0] for arg in argv}
    return next((agent.name for agent in AGENTS if agent.name in names), None)


class StateKeeper:
    """What the tabs look like, kept in ~/.coda/state-layout.json, and the runs of `coda.py state save`."""

    def __init__(self, sessions):
        self.sessions = sessions
        self.layout = None      # the page's last report: {"active", "tabs": [{"name", "split", "sessions"}]}
        self.places = {}        # session id -> {"cwd", "agent"}: its folder, and the last agent seen in it
        self.written = None     # what the layout file holds
        self.frozen = False     # at SIGTERM: the sessions hang up, the layout stays as it was
        self.saved_mark = None  # the sessions' output offsets and the layout at the last save
        self.worker = None      # `coda.py state save` waiting for its next save
        self.saving = gevent.lock.Semaphore()  # one save at a time
        self.final_mark = None  # mark() at SIGTERM

    def report(self, layout):
        self.layout = layout
        self.write()

    def sample(self):
        if self.frozen:
            return
        for session in list(self.sessions.by_id.values()):
            place = self.places.setdefault(session.id, {"cwd": None, "agent": None})
            try:
                place["cwd"] = os.readlink(f"/proc/{session.pid}/cwd")
            except OSError:
                pass
            place["agent"] = foreground_agent(session) or place["agent"]
        for gone in set(self.places) - set(self.sessions.by_id):
            del self.places[gone]
        self.write()

    def describe(self):
        """The page's tabs (one per session before it reports), each pane's label, folder (relative to HOME) and agent."""
        live = self.sessions.by_id
        tabs = self.layout["tabs"] if self.layout else [{"name": s.label, "split": 50, "sessions": [s.id]}
                                                        for s in live.values()]
        described = []
        for tab in tabs:
            panes = [self.pane(live[sid]) for sid in tab["sessions"] if sid in live]
            if panes:
                described.append({"name": tab["name"], "split": tab["split"], "panes": panes})
        return {"active": self.layout["active"] if self.layout else 0, "tabs": described}

    def pane(self, session):
        place = self.places.get(session.id, {})
        home, cwd = str(PATHS.home.resolve()), place.get("cwd") or ""
        folder = os.path.relpath(cwd, home) if cwd == home or cwd.startswith(home + "/") else "projects"
        return {"label": session.label, "cwd": folder, "agent": place.get("agent")}

    def write(self):
        if self.frozen:
            return
        content = self.describe()
        if content != self.written:
            try:
                write_private(PATHS.state_layout, json.dumps(content) + "\n")
                self.written = content
            except OSError as error:
                log.warning("could not write %s: %s", PATHS.state_layout, reason(error))

    def mark(self):
        return {s.id: s.stream.end for s in self.sessions.by_id.values()}, self.written

    def may_save(self):
        return state_enabled() and PROCESS.pat.valid() and bool(read_state_record().get("may_save"))

    def sample_forever(self):
        while not self.frozen:
            gevent.sleep(STATE_SAMPLE_SECONDS)
            self.sample()

    def save_forever(self):
        last = time.time()
        while not self.frozen:
            gevent.sleep(min(STATE_SAMPLE_SECONDS, CONFIG.state_interval))
            if not self.may_save():
                continue
            if self.worker is None:
                self.start_worker()  # it loads databricks-sdk now: seconds the last save at SIGTERM lacks
            if time.time() - last < CONFIG.state_interval:
                continue
            last = time.time()
            self.sample()
            mark = self.mark()
            if not self.frozen and mark != self.saved_mark:
                with self.saving:
                    if self.run_save(time.time() + STATE_SAVE_TIMEOUT) == 0:
                        self.saved_mark = mark

    def start_worker(self):
        """`coda.py state save` as a worker in its own session (a signal to CoDA's group does not reach
        it; its log lines join ours): one save per line it reads, each answered `done CODE`."""
        from gevent import subprocess

        self.worker = subprocess.Popen(STATE_COMMAND + ["save"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       start_new_session=True, cwd=str(PATHS.home),
                                       env={**terminal_environment(), "CODA_STATE_WORKER": "1"})

    def run_save(self, deadline):
        """One save by the worker: its exit code, or None if it failed or was stopped at `deadline`
        (what it uploaded then is named by no manifest: the saved state stays whole)."""
        if self.worker is None or self.worker.poll() is not None:
            self.start_worker()
        worker = self.worker
        try:
            with gevent.Timeout(max(0.1, deadline - time.time())):
                worker.stdin.write(b"go\n")
                worker.stdin.flush()
                answer = worker.stdout.readline().split()
            return int(answer[1]) if answer[:1] == [b"done"] else None
        except gevent.Timeout:
            log.warning("the state save did not finish in time: stopped; the last saved state stays whole")
        except (OSError, ValueError, IndexError):
            log.warning("the state saver ended unexpectedly; the last saved state stays whole")
        self.stop_worker()
        return None

    def stop_worker(self):
        worker, self.worker = self.worker, None
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()

    def freeze(self):
        """At SIGTERM, before the shells hang up: one last look, then the layout stays as it is."""
        self.sample()
        self.final_mark = self.mark()
        self.frozen = True

    def final_save(self, deadline):
        """After the shells hung up (and wrote their history): one last save, given up at `deadline`
        (after a periodic one running now, which the worker finishes first)."""
        sessions_hung_up = bool(self.final_mark[0])  # their shells write their history as they exit
        if not self.may_save() or (self.final_mark == self.saved_mark and not sessions_hung_up):
            self.stop_worker()
            return
        log.info("saving the state before exiting")
        if self.saving.acquire(timeout=max(0.0, deadline - time.time())):
            if self.run_save(deadline) == 0:
                log.info("state saved before exiting")
        else:
            log.warning("the state save did not finish in time: stopped; the last saved state stays whole")
        self.stop_worker()


def restore_saved_state(step):
    """Setup step (token, first): bring back what the last CoDA saved, before the agents are
    configured and the page reopens its tabs."""
    if not CONFIG.state:
        step.skip("CODA_STATE=0: nothing is saved or restored")
        return
    if read_state_record().get("may_save"):
        step.skip("this disk keeps its own state")
        return
    try:
        run_command(step, STATE_COMMAND + ["restore"], timeout=STATE_RESTORE_TIMEOUT)
    except StepFailed as error:
        raise StepFailed(read_state_record().get("error") or str(error)) from None
    size = read_state_record().get("bytes") or 0
    step.label = f"Restore saved work ({size_text(size)})" if size else "Restore saved work (none saved)"


def clean_layout(body):
    """The page's layout report, checked and bounded: {"active", "tabs": [{"name", "split", "sessions"}]}."""
    tabs = field(body, "tabs", list)
    if len(tabs) > MAX_LAYOUT_TABS or not all(isinstance(tab, dict) for tab in tabs):
        raise ApiError(400, f"The field 'tabs' must be a list of at most {MAX_LAYOUT_TABS} tabs.")
    cleaned = []
    for tab in tabs:
        sessions = id_list(tab, "sessions")
        if len(sessions) > 2:
            raise ApiError(400, "A tab holds at most two sessions.")
        cleaned.append({"name": clean_label(field(tab, "name", str, "")), "split": field(tab, "split", float, 50.0, 0, 100),
                        "sessions": sessions})
    return {"active": field(body, "active", int, 0, -1, MAX_LAYOUT_TABS), "tabs": cleaned}


@api("/api/layout")
def report_layout(body):
    PROCESS.state.report(clean_layout(body))
    return {"status": "ok"}


@api("/api/layout", "GET")
def saved_layout():
    """Whether state is kept, the last save, and the tabs a restore brought back (with each agent's resume command)."""
    step = next((s for s in PROCESS.setup.token if s.id == "restore-state"), None)
    restored = read_json_object(PATHS.state_restored) or None
    agents = {agent.name: agent for agent in AGENTS}
    for tab in (restored or {}).get("tabs", []):
        for pane in tab.get("panes", []):
            agent = agents.get(pane.get("agent"))
            pane.update(resume=agent and agent.resume, agent_label=agent and agent.label)
    record = read_state_record()
    token_coming = PROCESS.pat.token or (CONFIG.bootstrap_token and not PROCESS.pat.error)
    return {"enabled": state_enabled(), "restoring": bool(step and step.status in ("pending", "running") and
                                                          token_coming), "restored": restored,
            "last_save": {k: record.get(k) for k in ("saved_at", "bytes", "error", "left_out")}}


# ===========================================================================
# 11. Local proxy
# ===========================================================================

# What Databricks rejects, and what the evidence is:
# - Empty or whitespace-only text: "messages: text content blocks must be
#   non-empty" (Anthropic-backed endpoints; OpenCode sends them after streaming,
#   /compact and model switches, and one bad turn breaks every later request).
# - An assistant turn with tool calls but no text: some Claude endpoints on
#   Databricks (opus) reject a missing, null or "" content there the same way;
#   Databricks' own client (databricks-ai-bridge PR #333,
#   _fix_empty_assistant_content_in_messages) sends a single space instead, and
#   runs that against every FMAPI chat model in its integration tests.
# - A tool call without its result right after it, and a result whose call is
#   not in the assistant turn right before it (Anthropic: "`tool_use` ids were
#   found without `tool_result` blocks immediately after" / "unexpected
#   `tool_use_id` found in `tool_result` blocks").
# - Roles: "Chat message input roles must alternate (user -> assistant -> u ->
#   a -> ...) with an optional system at the start. Tool messages are optional
#   and must follow a preceding assistant message containing tool calls."
#   (Databricks' own 400 text.) So, minimally:
#     1. system messages only at the start: a later one becomes a user message
#        (where it stood, which is how Claude reads mid-conversation notes);
#     2. nothing but system messages before the first user message: a history
#        that opens with an assistant turn (a compaction summary, a history
#        rebuilt after a model switch; Hermes has met both) gets a short user
#        turn in front, rather than losing that turn or its tool pairing;
#     3. no two user or two assistant messages in a row: they are merged.
#   A user message right after tool results is left alone: the results
#   become a user turn upstream, and consecutive user turns are combined.
# - Gemini rejects JSON-Schema-only keywords in tool parameters (its schema is
#   an OpenAPI 3.0 subset) and `stream_options`; Claude and GPT ignore both, so
#   they are removed for every model rather than guessing the model from a name.
EMPTY_ASSISTANT_CONTENT = " "  # what Databricks' own client sends beside tool calls
EMPTY_TOOL_RESULT = "(no output)"  # a result is never dropped for being empty: its call would go too
LEADING_USER_TURN = "(continuing an earlier conversation)"
REQUEST_KEYS_REJECTED = ("stream_options",)
SCHEMA_KEYS_REJECTED = frozenset({"$schema", "$ref", "$defs", "$id", "$comment", "additionalProperties",
                                  "definitions"})  # draft 7's $defs, inlined the same way
# JSON Schema keywords whose value holds schemas, by shape; every other value
# (enum, const, default, examples, ...) is data and is never walked into.
SCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties")
SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_MAP = ("properties", "patternProperties", "dependentSchemas")


def repair_chat_request(body):
    """A copy of a Chat Completions request body with what Databricks rejects repaired."""
    if not isinstance(body, dict):
        return body
    body = {key: value for key, value in body.items() if key not in REQUEST_KEYS_REJECTED}
    messages = body.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        body["messages"] = repair_messages(messages)
    if isinstance(body.get("tools"), list):
        budget = SchemaBudget()
        body["tools"] = [_tool_with_clean_schema(tool, budget) for tool in body["tools"]]
    return body


def repair_messages(messages):
    """Apply every message repair until none changes anything: one repair can
    expose work for another (a dropped result orphans its call, a dropped turn
    leaves two user turns side by side)."""
    for _ in range(MESSAGE_REPAIR_PASSES):
        repaired = messages
        for repair in MESSAGE_REPAIRS:
            repaired = repair(repaired)
        if repaired == messages:
            break
        messages = repaired
    return opening_with_a_user_turn(messages)  # last: it never makes work for the others


def without_blank_text(messages):
    """Drop empty/whitespace text; a message left with nothing to say goes too."""
    out = []
    for message in messages:
        content = _non_blank(message.get("content"))
        role = message.get("role")
        if role == "assistant" and "tool_calls" in message and not message["tool_calls"]:
            message = {k: v for k, v in message.items() if k != "tool_calls"}  # [] is rejected too
        if role == "assistant" and message.get("tool_calls"):
            content = content if content is not None else EMPTY_ASSISTANT_CONTENT
        elif role == "tool":
            content = content if content is not None else EMPTY_TOOL_RESULT
        elif content is None:
            continue
        out.append(message if content == message.get("content") else {**message, "content": content})
    return out


def _non_blank(content):
    """The content without blank text, or None when nothing is left."""
    if isinstance(content, str):
        return content if content.strip() else None
    if isinstance(content, list):
        kept = [part for part in content if not _is_blank_text_part(part)]
        return kept or None
    return content


def _is_blank_text_part(part):
    if not isinstance(part, dict) or part.get("type") != "text":
        return False
    text = part.get("text")
    return not (isinstance(text, str) and text.strip())


def tool_calls_paired(messages):
    """Keep a tool call only with its result, and a result only right after its call.

    The results of an assistant turn are the run of tool messages directly after
    it; a result elsewhere, for a call that turn did not make, or answering a
    call twice is dropped, and a call with no result is removed from the turn.
    """
    out = []
    i = 0
    while i < len(messages):
        message = messages[i]
        i += 1
        if message.get("role") == "tool":
            continue  # not in the run right after an assistant turn (those are taken below)
        out.append(message)
        end = i
        while end < len(messages) and messages[end].get("role") == "tool":
            end += 1
        results, i = messages[i:end], end
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not isinstance(calls, list) or not calls:
            continue  # results after a turn that called nothing answer nothing
        call_ids = {call.get("id") for call in calls if isinstance(call, dict) and call.get("id")}
        answered = {}
        for result in results:
            if result.get("tool_call_id") in call_ids:
                answered.setdefault(result.get("tool_call_id"), result)
        kept = [call for call in calls if isinstance(call, dict) and call.get("id") in answered]
        if kept != calls:
            out[-1] = {**message, "tool_calls": kept}  # an empty list goes in without_blank_text
        out.extend(result for result in results if answered.get(result.get("tool_call_id")) is result)
    return out


def roles_alternating(messages):
    """System messages only first, and no role twice in a row."""
    out = []
    seen_other = False
    for message in messages:
        if message.get("role") == "system" and seen_other:
            message = {"role": "user", "content": message.get("content")}
        seen_other = seen_other or message.get("role") != "system"
        out.append(message)
    merged = []
    for message in out:
        previous = merged[-1] if merged else None
        if previous and message.get("role") in ("user", "assistant") and previous.get("role") == message.get("role") \
                and not previous.get("tool_calls"):
            merged[-1] = _merged(previous, message)
        else:
            merged.append(message)
    return merged


def opening_with_a_user_turn(messages):
    """A user turn first after the system messages, if the history has any user turn at all."""
    first = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    if first == len(messages) or messages[first].get("role") == "user" \
            or not any(m.get("role") == "user" for m in messages):
        return messages  # fine as it is, or no user turn anywhere to lead into (none is invented)
    return [*messages[:first], {"role": "user", "content": LEADING_USER_TURN}, *messages[first:]]


def _merged(first, second):
    """One message saying what two consecutive ones of the same role said."""
    merged = dict(first)
    a, b = _non_blank(first.get("content")), _non_blank(second.get("content"))
    if a is None or b is None:
        merged["content"] = a if b is None else b
    elif isinstance(a, str) and isinstance(b, str):
        merged["content"] = a + "\n\n" + b
    else:
        merged["content"] = _as_parts(a) + _as_parts(b)
    if second.get("tool_calls"):
        merged["tool_calls"] = second["tool_calls"]
    return merged


def _as_parts(content):
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


MESSAGE_REPAIRS = (without_blank_text, tool_calls_paired, roles_alternating)
# Every history tried (tens of thousands, by hypothesis) settles within two changing passes; the cap
# keeps a hostile one linear (a pass is O(n), and n passes of a 100k-message body would be minutes).
MESSAGE_REPAIR_PASSES = 4


def _tool_with_clean_schema(tool, budget):
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("parameters"), dict):
        return tool
    parameters = function["parameters"]
    return {**tool, "function": {**function, "parameters": clean_schema(parameters, parameters, budget)}}


# Tool schemas come from MCP servers, third-party ones included: untrusted. Inlining a DAG of
# references is exponential (each $def using the one before twice doubles it), so the inlining
# one request may do is bounded, and so is the depth; past either, the schema is left open ({}),
# as a recursive type already is: still valid for every model, just less precise.
SCHEMA_MAX_DEPTH = 64
SCHEMA_INLINE_CHARACTERS = MIB  # JSON that $ref inlining may add to one request, all tools together


class SchemaBudget:
    """What $ref inlining may still add to one request."""

    def __init__(self, characters=SCHEMA_INLINE_CHARACTERS):
        self.left = characters

    def spend(self, target):
        """Whether target may be inlined once more. Measuring costs what it measures, so it is
        paid for even when it does not fit: an exhausted budget measures nothing more."""
        if self.left <= 0:
            return False
        self.left -= len(json.dumps(target))
        return self.left >= 0


def clean_schema(schema, root, budget=None, expanding=()):
    """The schema without the keywords Gemini rejects, at every depth.

    A local `$ref` (to `#/$defs/...` and the like) is replaced by what it points
    to before `$defs` goes, so a tool keeps its nested shapes; a reference back
    into itself (a recursive type) stops there and becomes an open schema, and
    so does one past the budget or SCHEMA_MAX_DEPTH. Names inside `properties`
    are property names, not keywords: they stay.
    """
    budget = budget or SchemaBudget()
    if not isinstance(schema, dict):
        return schema
    if len(expanding) >= SCHEMA_MAX_DEPTH:
        return {}
    ref = schema.get("$ref")
    target = _local_ref(root, ref) if isinstance(ref, str) and ref not in expanding else None
    if target is not None and budget.spend(target):
        inlined = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return clean_schema(inlined, root, budget, expanding + (ref,))
    inner = expanding + (None,)  # one level deeper (None is never a $ref)
    clean = {}
    for key, value in schema.items():
        if key in SCHEMA_KEYS_REJECTED:
            continue
        if key in SCHEMA_MAP and isinstance(value, dict):
            value = {name: clean_schema(sub, root, budget, inner) for name, sub in value.items()}
        elif key in SCHEMA_LIST and isinstance(value, list):
            value = [clean_schema(sub, root, budget, inner) for sub in value]
        elif key in SCHEMA_ONE:
            value = ([clean_schema(sub, root, budget, inner) for sub in value] if isinstance(value, list)
                     else clean_schema(value, root, budget, inner))
        clean[key] = value
    return clean


def _local_ref(root, ref):
    """The schema a `#/...` JSON pointer names inside root, or None."""
    if not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, dict) else None


def describe_chat_request(body):
    """The request's shape for the log: roles, sizes, tool names; never content."""
    if not isinstance(body, dict):
        return f"not a JSON object ({type(body).__name__})"
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    names = [str(t["function"].get("name", "?")) for t in tools
             if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    parts = [f"model={body.get('model')}", "keys=" + ",".join(sorted(k for k in body if k not in DESCRIBED)),
             f"messages={len(messages)}:", *map(_describe_message, messages[:DESCRIBE_MESSAGES])]
    if len(messages) > DESCRIBE_MESSAGES:
        parts.append(f"... {len(messages) - DESCRIBE_MESSAGES} more")
    parts.append(f"tools={len(tools)}" + (": " + ",".join(names[:DESCRIBE_TOOLS]) if names else ""))
    if len(names) > DESCRIBE_TOOLS:
        parts.append(f"... {len(names) - DESCRIBE_TOOLS} more")
    return " ".join(parts)


DESCRIBED = ("messages", "tools", "model")  # shown in detail; other keys by name only
DESCRIBE_MESSAGES = 200  # a long history is still one readable log line
DESCRIBE_TOOLS = 60


def _describe_message(message):
    """role(characters of text[+other part types][;called tools]), e.g. assistant(0;bash,read)."""
    if not isinstance(message, dict):
        return f"?{type(message).__name__}"
    content = message.get("content")
    if isinstance(content, str):
        size = str(len(content))
    elif isinstance(content, list):
        texts = sum(len(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                    and isinstance(p.get("text") or "", str))
        others = sorted({str(p.get("type")) for p in content if isinstance(p, dict) and p.get("type") != "text"})
        size = f"{texts}[{len(content)} parts{''.join('+' + o for o in others)}]"
    else:
        size = "null" if content is None else type(content).__name__
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    names = ",".join(str(c["function"].get("name", "?")) if isinstance(c.get("function"), dict) else "?"
                     for c in calls if isinstance(c, dict))
    return f"{message.get('role')}({size}{';' + names if calls else ''})"


def is_chat_completions(path):
    """Whether a proxied path is an OpenAI-compatible Chat Completions call."""
    return path.split("?", 1)[0].rstrip("/").endswith("/chat/completions")


# Answers: the Server-Sent Events stream

# The gateway has been seen to answer a tool call as a call to a tool named
# `databricks-tool-call` whose arguments carry the real name beside the real
# arguments: {"name": "bash", "command": "ls"} means bash({"command": "ls"})
# (seen with OpenCode, which would otherwise call a tool that does not exist).
# Streamed, the first delta has the fake name and the arguments come in pieces,
# so the real name is known only once the arguments are complete JSON: the
# events from that first delta on are held (in order) until then, and no
# longer. Everything else passes as soon as its event is complete.
HIDDEN_TOOL_NAME = "databricks-tool-call"
HIDDEN_NAME_KEY = "name"
SSE_LINE_END = re.compile(r"\r\n|\r|\n")
SSE_LINE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|$)")  # a line and its ending


class ChatStreamRepair:
    """Filter for one Chat Completions SSE answer: feed() the upstream bytes as
    they come and send on what it returns; close() at the end."""

    def __init__(self):
        # surrogateescape: bytes that are not UTF-8 still come out exactly as they went in
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._text = ""      # decoded, not yet a complete event
        self._scanned = 0    # where in _text the next unscanned line starts
        self._held = []      # events waiting for a hidden tool name, in order
        self._calls = {}     # (choice, call index) -> a hidden call still being streamed
        self._with_tool_calls = set()  # choices that made tool calls

    def feed(self, chunk):
        self._text += self._decoder.decode(chunk)
        return self._encode(self._complete_events(final=False))

    def close(self):
        """Everything still held, and any incomplete last event as it came."""
        self._text += self._decoder.decode(b"", final=True)
        out = self._complete_events(final=True)
        self._calls.clear()
        out += self._release()
        out.append(self._text)
        self._text, self._scanned = "", 0
        return self._encode(out)

    @staticmethod
    def _encode(texts):
        return "".join(texts).encode("utf-8", "surrogateescape")

    def _complete_events(self, final):
        """Cut complete events (ended by an empty line) off _text and repair them."""
        out = []
        while True:
            end = SSE_LINE_END.search(self._text, self._scanned)
            if end is None or (end.group() == "\r" and end.end() == len(self._text) and not final):
                return out  # a lone CR at the end may be half of a CRLF
            empty_line = end.start() == self._scanned
            self._scanned = end.end()
            if empty_line:
                event, self._text, self._scanned = self._text[:self._scanned], self._text[self._scanned:], 0
                out += self._on_event(event)

    def _on_event(self, text):
        event = {"text": text, "data": None, "changed": False}
        payload = _sse_data(text)
        if payload is not None and payload.strip() == "[DONE]":
            self._calls.clear()  # the answer is over: hidden calls stay as they came
        elif payload is not None:
            try:
                event["data"] = json.loads(payload)
            except ValueError:
                pass
        if isinstance(event["data"], dict) and isinstance(event["data"].get("choices"), list):
            self._repair_chunk(event)
        self._held.append(event)
        return [] if self._calls else self._release()

    def _repair_chunk(self, event):
        for choice in event["data"]["choices"]:
            if not isinstance(choice, dict):
                continue
            number = _index(choice.get("index"), 0)
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            calls = delta.get("tool_calls") if isinstance(delta.get("tool_calls"), list) else []
            for position, call in enumerate(calls):
                if isinstance(call, dict):
                    self._with_tool_calls.add(number)
                    self._follow_call(event, (number, _index(call.get("index"), position)), call)
            if choice.get("finish_reason") is not None:  # unfinished arguments will never finish now
                self._calls = {key: call for key, call in self._calls.items() if key[0] != number}
            if choice.get("finish_reason") == "stop" and number in self._with_tool_calls:
                choice["finish_reason"] = "tool_calls"
                event["changed"] = True

    def _follow_call(self, event, key, call):
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        if function.get("name"):  # a call starts at this key (ending any before it there)
            self._calls.pop(key, None)
            if function["name"] == HIDDEN_TOOL_NAME:
                self._calls[key] = {"arguments": "", "pieces": []}
        hidden = self._calls.get(key)
        if hidden is None:
            return
        hidden["pieces"].append((event, function))
        hidden["arguments"] += function.get("arguments") or ""
        try:
            arguments = json.loads(hidden["arguments"])
        except ValueError:
            return  # not complete yet
        del self._calls[key]  # complete: named or not, nothing more to wait for
        name = arguments.pop(HIDDEN_NAME_KEY, None) if isinstance(arguments, dict) else None
        if not isinstance(name, str) or not name:
            return  # arguments that name no tool: the call goes on as the gateway sent it
        for piece_event, piece in hidden["pieces"]:
            piece["arguments"] = ""
            piece_event["changed"] = True
        hidden["pieces"][0][1].update(name=name, arguments=json.dumps(arguments, ensure_ascii=False))

    def _release(self):
        held, self._held = self._held, []
        return [_render(event) for event in held]


def _index(value, default):
    return value if isinstance(value, int) else default


def _sse_data(text):
    """The event's data (its data lines joined by newlines), or None without any."""
    data = [value for name, value in map(_field, SSE_LINE_END.split(text)) if name == "data"]
    return "\n".join(data) if data else None


def _field(line):
    """An SSE line's field name and value: "data: {...}" -> ("data", "{...}")."""
    name, colon, value = line.partition(":")
    return name, value.removeprefix(" ") if colon else ""


def _render(event):
    """The event as it came, or with its data lines replaced by the repaired JSON."""
    if not event["changed"]:
        return event["text"]
    out = []
    written = False
    for line, ending in SSE_LINE.findall(event["text"]):
        if _field(line)[0] != "data":
            out.append(line + ending)
        elif not written:
            out.append("data: " + json.dumps(event["data"], ensure_ascii=False, separators=(",", ":")) + ending)
            written = True
    return "".join(out)


# The proxy serves each API at the gateway host's path and forwards it to the
# base discovery chose, with the current token: agents that keep a key in
# memory (Gemini CLI, OpenCode, Hermes) hold only the proxy's key, so a
# rotation never strands them.
PROXY_ROUTES = {paths[0]: api for api, paths in GATEWAY_PATHS.items()}
# The Databricks managed MCP servers (section 1's MANAGED_MCP): MCP_PROXY_PREFIX + path goes to the
# workspace's MANAGED_MCP_ROOT + path. Streamable HTTP passes as any other call: every method
# (POST answered with JSON or SSE, GET's SSE stream, DELETE ending a session), Mcp-Session-Id
# both ways, each chunk sent as it arrives.
PROXY_ROUTES[MCP_PROXY_PREFIX] = "mcp"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length", "authorization", "x-api-key",
              "x-goog-api-key", "accept-encoding", "content-encoding"}
PROXY_MAX_BODY = 32 * MIB


# What goes upstream is the route's base plus the rest of the path exactly as checked: plain
# segments only, so neither requests (urllib3 removes dot segments) nor the upstream can
# normalise a path out of the base (/mlflow/v1/../../api/2.0/token/create would mint tokens
# with the proxy key). PATH_INFO is already percent-decoded once: a '%' left in it is double
# encoding, and an encoded slash or backslash is a plain one now, so neither passes either.
PROXY_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_~:@+,=-][A-Za-z0-9_.~:@+,=-]*")  # no "", ".", ".."


def proxy_route(path):
    """The route prefix `path` is under, when the rest of it is plain segments; else None."""
    for prefix in PROXY_ROUTES:
        if path == prefix:
            return prefix
        if path.startswith(prefix + "/"):
            rest = path[len(prefix) + 1:].split("/")
            return prefix if all(PROXY_PATH_SEGMENT.fullmatch(segment) for segment in rest) else None
    return None


def proxy_app(environ, start_response):
    """WSGI app of the local proxy: check the key, pick the route, forward, stream back."""
    path = environ.get("PATH_INFO", "")
    if path == "/health":
        health = {"status": "healthy", "token": PROCESS.pat.valid(), "pid": os.getpid()}
        challenge = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("challenge", [""])[0]
        if 0 < len(challenge) <= 64:
            health["proof"] = proxy_proof(challenge, os.getpid())
        return _plain_json(start_response, "200 OK", health)
    caller = proxy_caller(environ)
    if caller is None:
        return _plain_json(start_response, "401 Unauthorized", {"error": "This proxy needs CoDA's proxy key."})
    prefix = proxy_route(path)
    if prefix is None:
        return _plain_json(start_response, "404 Not Found",
                           {"error": "No such route on the CoDA proxy (it forwards only plain paths under its routes)."})
    base = proxy_base(PROXY_ROUTES[prefix])
    if not base or not PROCESS.pat.valid():
        return _plain_json(start_response, "503 Service Unavailable",
                           {"error": "CoDA has no valid Databricks token: paste one in the CoDA page."})
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length > PROXY_MAX_BODY:
        return _plain_json(start_response, "413 Payload Too Large", {"error": "The request body is too large."})
    body = environ["wsgi.input"].read(length) if length else b""
    query = urllib.parse.urlencode([(k, v) for k, v in urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""),
                                    keep_blank_values=True) if k != "key"])  # a key in the URL is ours, not theirs
    url = base + path[len(prefix):] + (f"?{query}" if query else "")
    repair = None
    if is_chat_completions(path):
        body, repair = _repaired_chat_body(body), ChatStreamRepair()
    meter = UsageMeter.for_call(caller, path, body)  # None unless it is a model call
    return _forward(environ["REQUEST_METHOD"], url, _upstream_headers(environ), body, start_response, repair, meter)


def proxy_caller(environ):
    """Whose key the request offers: an agent's name, "other" for the plain proxy key, None for neither."""
    offered = (environ.get("HTTP_X_API_KEY", ""), environ.get("HTTP_X_GOOG_API_KEY", ""))
    for name, key in [("other", proxy_key()), *((a.name, agent_key(proxy_key(), a.name)) for a in AGENTS)]:
        if offers_secret(environ, key, "key", *offered):
            return name
    return None


def proxy_base(api):
    """Where a proxy route's calls go: the workspace's MCP root, or the gateway's base for the API."""
    if api == "mcp":
        return CONFIG.databricks_host and CONFIG.databricks_host + MANAGED_MCP_ROOT
    return PROCESS.gateway.base(api)


def _repaired_chat_body(body):
    """A JSON chat request, repaired; anything else passes unchanged.

    A large body is seconds of CPU (32 MiB of small objects: parse, repair, serialise), so the
    work is done in a native thread, where Python code yields the loop every few milliseconds.
    The C parser and serialiser never yield: they are used only for bodies small enough to take a
    few milliseconds whatever they hold, and larger ones go through json's pure-Python twins
    (which still read and write strings in C: a large body of long texts stays fast).
    """
    small = len(body) <= PROXY_FAST_JSON_BYTES
    repaired, description = gevent.get_hub().threadpool.apply(_repair_chat_body, (body, small))
    if description:
        log.info("proxy: chat request %s", description)  # here: logging's locks are the loop's
    return repaired


PROXY_FAST_JSON_BYTES = 256 * 1024  # the C parser takes ~10 ms on that much of the smallest objects


def _repair_chat_body(body, small):
    decoder, encoder = json.JSONDecoder(), json.JSONEncoder()
    if not small:
        decoder.scan_once = json.scanner.py_make_scanner(decoder)  # iterencode below is pure Python already
    try:
        repaired = repair_chat_request(decoder.decode(body.decode()))
        if small:
            text = encoder.encode(repaired)
        else:  # piece by piece: one "".join of millions of pieces would hold the loop too
            out = io.StringIO()
            for piece in encoder.iterencode(repaired):
                out.write(piece)
            text = out.getvalue()
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested deeper than Python goes
        return body, None
    return text.encode(), describe_chat_request(repaired)


def _upstream_headers(environ):
    headers = {name[5:].replace("_", "-").title(): value for name, value in environ.items()
               if name.startswith("HTTP_") and name[5:].replace("_", "-").lower() not in HOP_BY_HOP}
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    headers["Authorization"] = f"Bearer {PROCESS.pat.token}"
    headers["Accept-Encoding"] = "identity"  # stream bytes through exactly as they come
    return headers


def _forward(method, url, headers, body, start_response, repair=None, meter=None):
    import_off_loop("requests")
    import requests

    logged = urllib.parse.urlsplit(url).path  # the log gets the path alone
    try:
        upstream = requests.request(method, url, headers=headers, data=body, stream=True,
                                    timeout=(10, CONFIG.proxy_timeout), allow_redirects=False)
    except requests.Timeout:
        log.warning("proxy: %s %s timed out", method, logged)
        return _plain_json(start_response, "504 Gateway Timeout", {"error": "The AI Gateway did not answer in time."})
    except requests.RequestException as error:
        log.warning("proxy: %s %s failed: %s", method, logged, reason(error))
        return _plain_json(start_response, "502 Bad Gateway", {"error": "The AI Gateway could not be reached."})
    log.info("proxy: %s %s -> %d", method, logged, upstream.status_code)
    headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP]
    start_response(f"{upstream.status_code} {upstream.reason}", headers)
    streaming = repair and "text/event-stream" in upstream.headers.get("Content-Type", "")
    return _stream(upstream, repair if streaming else None, meter if upstream.status_code < 300 else None)


def _stream(upstream, repair, meter=None):
    """Yield the answer as it arrives; each chunk is sent at once (server-sent events stay live).
    The meter reads each chunk's usage fields on the way past (it never raises)."""
    try:
        for chunk in upstream.iter_content(chunk_size=None):
            if meter:
                meter.feed(chunk)
            chunk = repair.feed(chunk) if repair else chunk
            if chunk:
                yield chunk
        if repair:
            yield repair.close()
    except Exception as error:  # the upstream broke off mid-answer: end ours, say why in the log
        log.warning("proxy: the upstream answer broke off: %s", reason(error))
    finally:
        upstream.close()
        if meter:
            meter.finish()


class ProxyPort:
    """Whether this process's own proxy server holds CODA_PROXY_PORT. Agents are pointed at the
    proxy only when it does: whatever else holds the port (another user's program, a second CoDA)
    would get their prompts and the proxy key, and could answer with tool calls they run."""

    def __init__(self):
        self.tried = gevent.event.Event()  # the first bind has been tried
        self.error = None                  # why the port is not ours, in one sentence

    def bind(self, server):
        """Bind server's socket now, recording whether the port is ours; False when it is not."""
        try:
            server.init_socket()
            self.error = None
        except OSError as error:
            self.error = (f"127.0.0.1:{CONFIG.proxy_port} is held by another program (not this CoDA's proxy): "
                          "set CODA_PROXY_PORT to a free port") if error.errno == errno.EADDRINUSE else (
                f"the local proxy cannot listen on 127.0.0.1:{CONFIG.proxy_port} ({reason(error)}): "
                "set CODA_PROXY_PORT to a free port")
        self.tried.set()
        return self.error is None

    def ours(self, wait=0):
        """The port is held by this process's proxy (waiting up to `wait` s for the first bind)."""
        return self.tried.wait(wait) and self.error is None

    def require(self, wait=0):
        """ConfigError (its sentence says what to set) unless the port is ours."""
        if not self.ours(wait):
            raise ConfigError(self.error or f"the local proxy has not started on 127.0.0.1:{CONFIG.proxy_port}")



def run_proxy_forever():
    """The supervised second server: restarted (after a pause) whenever it stops. A port that
    another program holds is tried again, but said only once."""
    said = None
    while not PROCESS.sessions.shutting_down.is_set():
        proxy = WSGIServer(("127.0.0.1", CONFIG.proxy_port), proxy_app, log=None,
                           error_log=logging.getLogger("coda.proxy"))
        try:
            if PROCESS.proxy_port.bind(proxy):
                PROCESS.proxy_server = proxy
                proxy.serve_forever()
            elif PROCESS.proxy_port.error != said:
                log.warning("local proxy: %s", PROCESS.proxy_port.error)
            said = PROCESS.proxy_port.error
        except Exception as error:
            log.warning("local proxy on 127.0.0.1:%d stopped (%s); restarting in %d s", CONFIG.proxy_port,
                        reason(error), PROXY_RESTART_PAUSE)
        gevent.sleep(PROXY_RESTART_PAUSE)


# What each agent spends. Every agent's model calls pass the proxy, under its own key
# (agent_key), so the proxy counts requests and tokens per UTC day, agent and model from the
# answers themselves, whatever the API and with or without tracing. The usage objects are found
# by their key as the bytes pass ("usage" in Anthropic Messages, OpenAI Responses and chat
# completions; "usageMetadata" in Gemini), each parsed alone: Anthropic streams the input in
# message_start and the output so far in each message_delta, Gemini repeats usageMetadata in
# every chunk, Responses sends it in response.completed, chat completions in the last chunk when
# the gateway sends one (CoDA does not ask for it: stream_options is stripped, Gemini rejects
# it). The last value of each field wins. An answer without usage counts a request and nothing else.
USAGE_KEY = re.compile(rb'"(?:usage|usageMetadata)"\s*:\s*')
USAGE_OBJECT_BYTES = 4 * KIB      # a usage object is parsed from at most this much after its key
USAGE_KEY_TAIL = 64               # bytes kept from a chunk's end: a key cut in two by chunking
USAGE_MAX_TOKENS = 10 ** 9        # a field beyond this is not a real count
USAGE_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",  # Anthropic
                      "prompt_tokens", "promptTokenCount")  # (Responses' input_tokens holds its cached ones)
USAGE_OUTPUT_FIELDS = ("output_tokens", "completion_tokens", "candidatesTokenCount", "thoughtsTokenCount")
MODEL_CALL = re.compile(r"(/v1/messages|/responses|/chat/completions|/invocations|:generateContent"
                        r"|:streamGenerateContent)$")
MODEL_NAME = r"[A-Za-z0-9._:@+-]{1,128}"
REQUEST_MODEL = re.compile(rb'"model"\s*:\s*"(' + MODEL_NAME.encode() + rb')"')
REQUEST_MODEL_WINDOW = 1 * MIB    # the model is looked for this far into a request body and from its end
REQUEST_MODEL_TRIES = 16          # "model" keys tried in each window
PATH_MODEL = re.compile(r"/models/(" + MODEL_NAME + r"):\w+$|/serving-endpoints/(" + MODEL_NAME + r")/invocations$")
USAGE_SAVE_SECONDS = 10.0         # the file is written at most this often while calls are counted
USAGE_DAYS_KEPT = 92              # days the file keeps
USAGE_MODELS_PER_DAY = 64         # models one agent is counted under in one day; more go to "other"
usage_log = log.getChild("usage")  # its records are the Delta table's usage records


class UsageMeter:
    """The usage of one model call's answer: feed() each chunk as it passes, finish() at its end."""

    def __init__(self, agent, model, counter):
        self.agent, self.model, self.counter = agent, model, counter
        self.fields = {}
        self.pending = b""
        self.decoder = json.JSONDecoder()

    @classmethod
    def for_call(cls, agent, path, body):
        """A meter when `path` is a model call and a counter runs, else None."""
        if PROCESS.usage is None or not MODEL_CALL.search(path):
            return None
        named = PATH_MODEL.search(path)
        model = (named.group(1) or named.group(2)) if named else request_model(body) or "unknown"
        return cls(agent, model, PROCESS.usage)

    def feed(self, chunk):
        try:
            self._scan(self.pending + chunk)
        except Exception as error:  # never the stream's problem
            self.pending = b""
            log.info("usage: an answer could not be read (%s)", reason(error))

    def _scan(self, data):
        position = 0
        while found := USAGE_KEY.search(data, position):
            text = data[found.end():found.end() + USAGE_OBJECT_BYTES]
            try:
                value = self.decoder.raw_decode(text.decode("utf-8", "replace"))[0]
            except (ValueError, RecursionError):
                if len(text) < USAGE_OBJECT_BYTES and found.end() + len(text) == len(data):
                    self.pending = data[found.start():]  # cut off by the chunk's end, maybe: wait for more
                    return
                value = None
            self._take(value)
            position = found.end()
        self.pending = data[max(position, len(data) - USAGE_KEY_TAIL):]

    def _take(self, usage):
        if not isinstance(usage, dict):
            return
        for name in (*USAGE_INPUT_FIELDS, *USAGE_OUTPUT_FIELDS):
            value = usage.get(name)
            if type(value) is int and 0 <= value < USAGE_MAX_TOKENS:
                self.fields[name] = value

    def finish(self):
        self.counter.add(self.agent, self.model, sum(self.fields.get(f, 0) for f in USAGE_INPUT_FIELDS),
                         sum(self.fields.get(f, 0) for f in USAGE_OUTPUT_FIELDS))


def request_model(body):
    """The request's "model", found near its start (where Claude Code, Codex and OpenCode put it) or its
    end (after the messages, where Hermes puts it): a bounded search, however large the body."""
    for start, end in ((0, REQUEST_MODEL_WINDOW), (max(REQUEST_MODEL_WINDOW, len(body) - REQUEST_MODEL_WINDOW),
                                                   len(body))):
        position = body.find(b'"model"', start, end)
        for _ in range(REQUEST_MODEL_TRIES):
            if position < 0:
                break
            found = REQUEST_MODEL.match(body, position)
            if found and body[position - 1:position] != b"\\":  # a key, not a quote inside a string
                return found.group(1).decode()
            position = body.find(b'"model"', position + 1, end)
    return None


def utc_day(epoch=None):
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


COUNTS = ("requests", "input_tokens", "output_tokens")


class UsageCounter:
    """Requests and tokens per UTC day, agent and model, in ~/.coda/usage.json (written atomically, at
    most every USAGE_SAVE_SECONDS, and at shutdown) so they survive a restart; and since this process
    started (the session). Each save also logs a usage record per changed (day, agent, model): with
    CODA_LOG_TABLE set, the Delta log shipper writes them to that table."""

    def __init__(self, path):
        self.path = path
        self.days = self.load()  # day -> agent -> model -> {requests, input_tokens, output_tokens}
        self.session = {}        # agent -> model -> the same, since this process started
        self.started = time.time()
        self.changed = set()     # (day, agent, model) counted since the last save
        self.saver = None        # the greenlet that will save, while one is due

    def load(self):
        """The counts in the file; a file that is not CoDA's counts is set aside (never lost) and counting starts afresh."""
        try:
            data = json.loads(self.path.read_text())
            return {day: {agent: {model: {name: int(row[name]) for name in COUNTS} for model, row in models.items()}
                          for agent, models in agents.items()} for day, agents in data["days"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            aside = self.path.with_name(self.path.name + ".unreadable")
            log.warning("usage: %s is not CoDA's usage counts (%s); moved to %s, counting afresh",
                        self.path, reason(error), aside.name)
            try:
                os.replace(self.path, aside)
            except OSError:
                pass  # unreadable and immovable: it is overwritten at the next save
            return {}

    def add(self, agent, model, input_tokens, output_tokens):
        day = utc_day()
        models = self.days.setdefault(day, {}).setdefault(agent, {})
        if model not in models and len(models) >= USAGE_MODELS_PER_DAY:
            model = "other"
        for row in (models.setdefault(model, dict.fromkeys(COUNTS, 0)),
                    self.session.setdefault(agent, {}).setdefault(model, dict.fromkeys(COUNTS, 0))):
            row["requests"] += 1
            row["input_tokens"] += input_tokens
            row["output_tokens"] += output_tokens
        self.changed.add((day, agent, model))
        if self.saver is None:
            self.saver = gevent.spawn_later(USAGE_SAVE_SECONDS, self.save)

    def save(self):
        """Write the file now (and log a usage record per changed count)."""
        self.saver = None
        changed, self.changed = self.changed, set()
        for day in sorted(self.days)[:-USAGE_DAYS_KEPT]:
            del self.days[day]
        try:
            write_private(self.path, json.dumps({"version": 1, "days": self.days}, sort_keys=True) + "\n")
        except OSError as error:
            log.warning("usage: could not write %s (%s)", self.path, reason(error))
        for day, agent, model in sorted(changed):
            row = self.days.get(day, {}).get(agent, {}).get(model)
            if row:  # the day's running total: the latest record of a (day, agent, model) is the count
                usage_log.info("%s", json.dumps({"day": day, "agent": agent, "model": model, **row}))

    def stop(self):
        if self.saver is not None:
            self.saver.kill()
            self.save()


# Estimated cost: USD per million input and output tokens, the model makers' list prices for the
# models CoDA names (Databricks bills in DBUs; this is an estimate). CODA_PRICES adds or replaces
# rows: {"databricks-claude-opus-4-7": {"input": 5, "output": 25}}, inline or in a file.
USAGE_PRICES = {
    "databricks-claude-opus-4-7": (5.0, 25.0),
    "databricks-claude-opus-4-6": (5.0, 25.0),
    "databricks-claude-sonnet-4-5": (3.0, 15.0),
    "databricks-claude-haiku-4-5": (1.0, 5.0),
    "databricks-gpt-5-5": (1.25, 10.0),
    "databricks-gemini-2-5-pro": (1.25, 10.0),
}
PRICES_MAX_BYTES = 256 * KIB


def parse_prices(text):
    """The price table with CODA_PRICES over the built-in one; ValueError saying what is wrong."""
    prices = dict(USAGE_PRICES)
    if not text:
        return prices
    if text[0] not in "{[":  # not inline JSON: a file's path
        try:
            with open(os.path.expanduser(text), "rb") as file:
                raw = file.read(PRICES_MAX_BYTES + 1)
        except OSError as error:
            raise ValueError(f"names the file {text}, which cannot be read ({reason(error)})") from None
        if len(raw) > PRICES_MAX_BYTES:
            raise ValueError(f"names the file {text}, which is larger than {PRICES_MAX_BYTES // KIB} KiB")
        text = raw.decode("utf-8", "replace")
    try:
        table = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise ValueError("is not valid JSON") from None
    if not isinstance(table, dict):
        raise ValueError('must be a JSON object: {"model": {"input": USD, "output": USD}} per million tokens')
    for model, price in table.items():
        if not re.fullmatch(MODEL_NAME, model):
            raise ValueError(f"names the model {model[:80]!r}, which is not a model name")
        if not isinstance(price, dict) or set(price) != {"input", "output"} or not all(
                type(price[k]) in (int, float) and 0 <= price[k] < 1e6 for k in price):
            raise ValueError(f'gives {model} {json.dumps(price)[:80]}, not {{"input": USD, "output": USD}} '
                             "per million tokens (numbers from 0)")
        prices[model] = (float(price["input"]), float(price["output"]))
    return prices


@functools.cache
def usage_prices():
    """(price table, None), or (None, the sentence saying why CODA_PRICES is unusable); read once."""
    try:
        return parse_prices(CONFIG.prices), None
    except ValueError as error:
        return None, f"CODA_PRICES {error}; costs are not estimated until it is fixed."


def priced(row, model, prices):
    """A count with its estimated cost (None when the model has no price)."""
    price = prices.get(model) if prices else None
    cost = round((row["input_tokens"] * price[0] + row["output_tokens"] * price[1]) / 1e6, 6) if price else None
    return {**row, "cost": cost}


def summed(rows):
    """The sum of priced counts; its cost is the sum of the known costs."""
    total = {name: sum(row[name] for row in rows) for name in COUNTS}
    costs = [row["cost"] for row in rows if row["cost"] is not None]
    return {**total, "cost": round(sum(costs), 6) if costs else None}


def usage_view(periods, prices):
    """{"models": [...], "total"} for {period: {model: counts}}: each model's counts per period, priced."""
    zero = dict.fromkeys(COUNTS, 0)
    models = sorted({model for counts in periods.values() for model in counts})
    rows = [{"model": model, **{period: priced(counts.get(model, zero), model, prices)
                                for period, counts in periods.items()}} for model in models]
    return {"models": rows, "total": {period: summed([row[period] for row in rows]) for period in periods}}


def usage_answer(counter):
    """GET /api/usage (and doctor): per agent and model, today and this session, with estimated costs."""
    prices, price_error = usage_prices()
    today = counter.days.get(utc_day(), {})
    names = [a.name for a in enabled_agents()]
    names += sorted((set(today) | set(counter.session)) - set(names))
    labels = {a.name: a.label for a in AGENTS}
    agents = [{"agent": name, "label": labels.get(name, "Other callers of the proxy"),
               **usage_view({"today": today.get(name, {}), "session": counter.session.get(name, {})}, prices)}
              for name in names]
    answer = {"source": "proxy", "day": utc_day(), "session_started": counter.started, "currency": "USD",
              "prices": "CODA_PRICES over CoDA's table" if CONFIG.prices else "CoDA's table", "agents": agents,
              "total": {period: summed([a["total"][period] for a in agents]) for period in ("today", "session")},
              "unpriced_models": sorted({m["model"] for a in agents for m in a["models"]
                                         if m["today"]["cost"] is None and m["session"]["cost"] is None
                                         and (m["today"]["requests"] or m["session"]["requests"])})}
    if price_error:
        answer["price_error"] = price_error
    return answer


# The AI Gateway's own usage table, where the workspace lets the user read it (by default only
# account and metastore admins may): the user's own rows, per endpoint, today and the last 7 days,
# read with CODA_USAGE_WAREHOUSE_ID. It cannot tell the agents apart: all use the user's token.
GATEWAY_USAGE_TABLE = "system.ai_gateway.usage"
GATEWAY_USAGE_DAYS = 7
GATEWAY_USAGE_PATIENCE = 30.0     # seconds a reading waits for the warehouse
GATEWAY_USAGE_QUERY = (
    "SELECT CAST(to_date(event_time) AS STRING) AS day, endpoint_name AS model, COUNT(*) AS requests, "
    "COALESCE(SUM(input_tokens), 0) AS input_tokens, COALESCE(SUM(output_tokens), 0) AS output_tokens "
    f"FROM {GATEWAY_USAGE_TABLE} WHERE requester = :requester AND event_time >= :since GROUP BY 1, 2")


def workspace_usage(token, user, warehouse_id, host=None):
    """The same view from the gateway's usage table, or {"readable": false, "reason"} in one sentence."""
    answer = {"source": "workspace", "table": GATEWAY_USAGE_TABLE, "day": utc_day(), "currency": "USD"}
    why = ("no SQL warehouse is configured: set CODA_USAGE_WAREHOUSE_ID" if not warehouse_id else
           "there is no valid Databricks token: paste one in the CoDA page" if not (token and user) else None)
    if why:
        return {**answer, "readable": False, "reason": f"{GATEWAY_USAGE_TABLE} cannot be read: {why}."}
    from databricks.sdk.service.sql import StatementParameterListItem as Param

    since = utc_day(time.time() - (GATEWAY_USAGE_DAYS - 1) * 86400) + "T00:00:00Z"
    try:
        result = run_statement(workspace_client(token, host), warehouse_id, GATEWAY_USAGE_QUERY,
                               [Param(name="requester", value=user),
                                Param(name="since", value=since, type="TIMESTAMP")], GATEWAY_USAGE_PATIENCE)
    except Exception as error:
        return {**answer, "readable": False, "reason": gateway_usage_unreadable(error)}
    today, week = {}, {}
    for day, model, *numbers in (result.result.data_array if result.result else None) or []:
        counts = dict(zip(COUNTS, (int(n or 0) for n in numbers)))
        for period, keep in ((today, day == utc_day()), (week, True)):
            if keep:
                row = period.setdefault(model or "unknown", dict.fromkeys(COUNTS, 0))
                for name in COUNTS:
                    row[name] += counts[name]
    prices, price_error = usage_prices()
    answer.update(readable=True, user=user, **usage_view({"today": today, "week": week}, prices))
    if price_error:
        answer["price_error"] = price_error
    return answer


def gateway_usage_unreadable(error):
    """Why the usage table could not be read, in one sentence that says what to do."""
    text = reason(error)
    if "TABLE_OR_VIEW_NOT_FOUND" in text or "SCHEMA_NOT_FOUND" in text:
        return f"{GATEWAY_USAGE_TABLE} does not exist in this workspace (usage tracking is not enabled): {text}."
    if is_refusal(error) or "PERMISSION" in text.upper():
        return (f"{GATEWAY_USAGE_TABLE} is not readable with your token (by default only account and metastore "
                f"admins may read it; ask one for SELECT, or for CAN USE on the warehouse): {text}.")
    return f"{GATEWAY_USAGE_TABLE} could not be read: {text}."


@api("/api/usage", "GET")
def usage():
    source = bottle.request.query.get("source", "proxy")
    if source == "workspace":
        return workspace_usage(PROCESS.pat.current_token(), PROCESS.pat.user, CONFIG.usage_warehouse_id)
    if source != "proxy":
        raise ApiError(400, "The query parameter 'source' is 'proxy' (the default) or 'workspace'.")
    return usage_answer(PROCESS.usage)



# ===========================================================================
# 12. Serving
# ===========================================================================

def wire(config):
    """Build the objects that make up the running server and hand each what it calls: who talks
    to whom, in one screen. Run once, at import; a test that wants another configuration loads
    a fresh module."""
    PROCESS.access = Access(config)
    PROCESS.sockets = set()
    PROCESS.sessions = Sessions(config, terminal_environment,
                                on_shutdown=functools.partial(tell_every_socket, {"type": "shutting_down"}),
                                on_notice=tell_every_socket)
    PROCESS.gateway = Gateway()
    PROCESS.setup = Setup()
    PROCESS.models = ServedModels(relisted=PROCESS.setup.rewrite_changed_models)
    PROCESS.pat = Pat(PROCESS.gateway, PROCESS.models, save_token=write_databrickscfg,
                      token_configured=PROCESS.setup.run_token_steps)
    PROCESS.proxy_port = ProxyPort()
    PROCESS.usage = UsageCounter(PATHS.usage_file)
    PROCESS.state = StateKeeper(PROCESS.sessions)


wire(CONFIG)


def release_import_memory():
    """Hand the heap that imports left behind back to the OS (glibc keeps it otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


MAX_CONNECTIONS = 128  # open HTTP connections at once: a few tabs' sockets, polls and uploads fit many times


def is_loopback(host):
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_undumpable():
    """A second layer beside scrub_secrets_from_environment: another process of the same user
    (a terminal's) may not read this one's memory or /proc files. Root still may."""
    import ctypes

    PR_SET_DUMPABLE = 4
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux


def serve(host, port):
    if not PROCESS.access.apps_mode and not PROCESS.access.token and not is_loopback(host):
        sys.exit(f"coda: refusing to serve {host} with CODA_TOKEN empty: anyone who can reach it would get a "
                 "shell. Set a CODA_TOKEN (or leave it unset for a generated one), or bind 127.0.0.1.")
    scrub_secrets_from_environment()
    make_undumpable()
    setup_logging()
    start_delta_logs(CONFIG, PROCESS.pat.current_token)
    server = WSGIServer((host, port), coda_app, handler_class=CodaHandler, log=None,
                        error_log=logging.getLogger("coda.http"), spawn=gevent.pool.Pool(MAX_CONNECTIONS))

    def on_sigterm():
        stopping = time.time()
        gevent.spawn_later(9.0, os._exit, 1)  # the contract: gone within 10 s, whatever hangs
        PROCESS.state.freeze()
        PROCESS.sessions.shutdown()
        PROCESS.state.final_save(stopping + STATE_FINAL_SECONDS)
        if PROCESS.proxy_server:
            PROCESS.proxy_server.stop(timeout=0.5)
        server.stop(timeout=0.5)

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(on_sigterm))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(on_sigterm))
    gevent.spawn(PROCESS.sessions.reap_forever)
    gevent.spawn(run_proxy_forever)
    gevent.spawn(PROCESS.setup.run_at_boot)
    if state_enabled():
        gevent.spawn(PROCESS.state.sample_forever)
        gevent.spawn(PROCESS.state.save_forever)
    if PROCESS.access.apps_mode and not PROCESS.access.owner:
        gevent.spawn(resolve_owner_forever)
    if CONFIG.bootstrap_token and CONFIG.databricks_host:
        gevent.spawn(PROCESS.pat.configure_from_environment)
    server.start()
    PROCESS.access.bind(host, server.server_port)  # before the loop runs a handler: the cookie names the real port
    release_import_memory()
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{shown}:{server.server_port}/"
    if PROCESS.access.apps_mode:
        log.info("CoDA %s serving on %s:%d (Databricks Apps mode)", __version__, host, server.server_port)
    elif PROCESS.access.token and CONFIG.local_token is None:
        print(f"CoDA {__version__}: open {url}?token={PROCESS.access.token}", flush=True)
    else:
        print(f"CoDA {__version__}: open {url}", flush=True)
        if not PROCESS.access.token:
            log.warning("CODA_TOKEN is set but empty: local access needs no token")
    server.serve_forever()
    log.info("stopped")
    PROCESS.usage.stop()  # its last records, before the log shipper's last flush
    if PROCESS.delta_logs:
        PROCESS.delta_logs.final_flush()



# ###########################################################################
# Part 2: Commands run by hooks and operators
# ###########################################################################
# Nothing below runs inside the server: agents' end-of-turn hooks, git's post-commit hook and
# the operator run these as `coda.py COMMAND` (section 15 reads the command line). The server's
# whole attack surface is above this line.

# ===========================================================================
# 13. Tracing turns
# ===========================================================================

# MLflow tracing (MLFLOW_TRACING_ENABLED). The server never imports mlflow: a
# setup step runs `coda.py trace prepare`, which creates the experiment if it
# is missing and writes ~/.coda/tracing.json (tracking URI and experiment; no
# token: with the `databricks` URI MLflow reads ~/.databrickscfg, which CoDA
# keeps current). Each agent's end-of-turn hook runs `coda.py trace AGENT`,
# which answers the agent at once (the top of this file forks before the heavy
# imports) and writes the trace from the detached grandchild; what happened
# goes to ~/.coda/tracing.log. What each hook is given (measured):
#   Claude Code 2.1  Stop hook, stdin {session_id, transcript_path, cwd, hook_event_name,
#                    last_assistant_message, ...}: MLflow's own transcript processing builds
#                    the AGENT, LLM and TOOL spans.
#   Codex 0.171      notify, one argument {"type": "agent-turn-complete", "thread-id", "turn-id",
#                    "cwd", "client", "input-messages", "last-assistant-message"}; Codex does not
#                    wait for it. The spans come from the turn's lines in the session rollout,
#                    ~/.codex/sessions/YYYY/MM/DD/rollout-<time>-<thread-id>.jsonl.
#   Gemini CLI 0.61  AfterAgent hook (once per prompt, after the tool rounds), stdin {session_id,
#                    transcript_path, cwd, prompt, prompt_response, ...}; the spans come from its
#                    chat recording (JSON lines; a record written again under its id replaces it).
TRACE_TIMEOUT = 300      # seconds a detached trace writer may take before it is killed
HOOK_INPUT_WAIT = 5.0    # seconds to wait for a hook's JSON on stdin
# What keeps MLflow off the network beyond the tracking store: no model-price catalogue
# (seconds of retries offline), no usage telemetry; and one synchronous export, since the
# process ends right after.
MLFLOW_QUIET = {"MLFLOW_MODEL_CATALOG_URI": "", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                "MLFLOW_DISABLE_AGENT_HINT": "1",
                "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false"}


class NotTraced(Exception):
    """A turn that is rightly not recorded: the message says why, in the tracing log."""


def prepare_experiment():
    """`coda.py trace prepare`: get or create the experiment, then write what the hooks need."""
    os.environ.update(MLFLOW_QUIET)
    import mlflow

    uri, name = CONFIG.mlflow_tracking_uri, CONFIG.mlflow_experiment
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: hooks run elsewhere
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name)
        except mlflow.exceptions.MlflowException:  # made meanwhile by someone else
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment is not None:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":  # traces to a deleted experiment are refused
            client.restore_experiment(experiment_id)
    write_private(PATHS.tracing_file, json.dumps({"tracking_uri": uri, "experiment_id": experiment_id,
                                            "experiment_name": name}) + "\n")
    print(f"MLflow experiment {name} (id {experiment_id}) at {uri}")
    return 0


def tracing_check():
    """For `coda.py doctor`: `coda.py trace check` in a child process (under gevent's patch, importing
    mlflow deadlocks: its telemetry runs `uname -p` from a fork while the import lock is held)."""
    from gevent import subprocess

    done = subprocess.run(TRACE_COMMAND + ["check"], capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    said = done.stdout.decode(errors="replace").strip().splitlines() or [f"exit status {done.returncode}"]
    if done.returncode:
        raise StepFailed(said[-1])
    return said[-1]


def check_tracing():
    """`coda.py trace check`: one line on whether the tracking store holds the experiment the hooks use."""
    settings = read_tracing_file()
    if not CONFIG.mlflow_tracing:
        print("off (MLFLOW_TRACING_ENABLED is not set)")
        return 0
    if not settings.get("experiment_id"):
        print(f"{PATHS.tracing_file} is missing: paste a token in the CoDA page, whose setup creates the experiment")
        return 1
    os.environ.update(MLFLOW_QUIET)
    import mlflow

    try:
        experiment = mlflow.MlflowClient(settings["tracking_uri"]).get_experiment(settings["experiment_id"])
    except Exception as error:
        print(f"{settings['tracking_uri']} does not answer ({reason(error)}): check MLFLOW_TRACKING_URI and that "
              "the token may use MLflow")
        return 1
    if experiment.lifecycle_stage != "active":
        print(f"the experiment {experiment.name} was deleted: restore it, or restart CoDA to create it again")
        return 1
    print(f"experiment {experiment.name} at {settings['tracking_uri']}")
    return 0


def trace_command(agent, payload=None):
    """`coda.py trace claude|codex|gemini [JSON]`: an agent's end-of-turn hook. It runs detached already
    (the top of this file), so it may take its time: the agent has had its answer.
    `coda.py trace prepare` (setup) and `coda.py trace check` (doctor) run in the foreground."""
    if agent in ("prepare", "check"):
        return prepare_experiment() if agent == "prepare" else check_tracing()
    if agent not in TRACERS:
        print("usage: coda.py trace claude|codex|gemini [JSON] | prepare | check", file=sys.stderr)
        return 2
    signal.alarm(TRACE_TIMEOUT)  # a hung tracking store must not leave writers behind
    trace_log()
    try:
        hook = json.loads(payload or read_hook_input())
        settings = read_tracing_file()
        if not settings.get("experiment_id"):
            raise NotTraced(f"tracing is not set up ({PATHS.tracing_file} is missing)")
        os.environ.update(MLFLOW_QUIET, MLFLOW_TRACKING_URI=settings["tracking_uri"],
                          MLFLOW_EXPERIMENT_ID=str(settings["experiment_id"]))
        trace_id = TRACERS[agent](hook)
        log.info("%s turn traced: %s in experiment %s", agent, trace_id, settings.get("experiment_name"))
    except NotTraced as why:
        log.info("%s turn not traced: %s", agent, why)
    except Exception as error:
        log.warning("%s turn not traced: %s", agent, reason(error))
    return 0


def trace_log():
    """~/.coda/tracing.log (0600, one old generation kept past 1 MiB) as this process's stderr and log."""
    PATHS.tracing_log.parent.mkdir(parents=True, exist_ok=True)
    try:
        if PATHS.tracing_log.stat().st_size > MIB:
            os.replace(PATHS.tracing_log, PATHS.tracing_log.with_name(PATHS.tracing_log.name + ".1"))
    except OSError:
        pass
    fd = os.open(PATHS.tracing_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)  # MLflow's own warnings land there too
    os.close(fd)
    setup_logging()


def read_hook_input():
    """The hook's JSON on stdin (a pipe the agent writes, then closes), read with a deadline."""
    import select

    if os.isatty(0):
        return "{}"
    data, deadline = b"", time.time() + HOOK_INPUT_WAIT
    while len(data) < 8 * MIB and select.select([0], [], [], max(0.0, deadline - time.time()))[0]:
        chunk = os.read(0, 64 * 1024)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace") or "{}"


def trace_claude(hook):
    """Claude Code: MLflow's own transcript processing, on a copy taken now (a next prompt may follow)."""
    transcript = snapshot(hook["transcript_path"])
    from mlflow.claude_code import tracing

    try:
        cwd = os.getcwd()  # the agent's, recorded as the trace's working directory
        os.chdir(PATHS.tracing_log.parent)
        tracing.get_logger()  # it logs to ./.claude/mlflow/claude_tracing.log: not in the user's project
        os.chdir(cwd)
        trace = tracing.process_transcript(str(transcript), hook.get("session_id"))
    finally:
        transcript.unlink(missing_ok=True)
    if trace is None:
        raise RuntimeError(f"MLflow could not read the transcript (see {PATHS.tracing_log.parent}/.claude/mlflow/)")
    return trace.info.trace_id


def snapshot(path):
    copy = PATHS.tracing_log.parent / f".transcript-{os.getpid()}.jsonl"
    write_private(copy, Path(path).read_text(errors="replace"))
    return copy


def trace_codex(hook):
    """Codex: one trace per completed turn, with LLM and tool spans from the session rollout."""
    if hook.get("type") != "agent-turn-complete":
        raise NotTraced(f"Codex notified {hook.get('type')!r}, not a completed turn")
    thread, turn = str(hook.get("thread-id", "")), str(hook.get("turn-id", ""))
    lines = codex_turn_lines(thread, turn)
    if lines is None:  # Codex keeps a rollout for every thread of the user's, none for its helpers
        raise NotTraced(f"thread {thread} has no session rollout: a Codex helper (such as its title writer)")
    steps, model, start, end = codex_steps(lines)
    return record_turn("codex_turn", "\n".join(map(str, hook.get("input-messages") or [])),
                       hook.get("last-assistant-message") or "", steps, session=thread, start=start, end=end,
                       attributes={"model": model, "turn_id": turn, "cwd": hook.get("cwd", "")})


def codex_turn_lines(thread, turn):
    """The rollout lines from the turn's task_started to its task_complete (waited for a few seconds);
    None when the thread has no rollout."""
    home = Path(os.environ.get("CODEX_HOME") or PATHS.home / ".codex")
    deadline = time.time() + 5
    while True:
        lines, inside = [], False
        found = sorted((home / "sessions").glob(f"*/*/*/rollout-*{thread}.jsonl")) if re.fullmatch(r"[\w-]+", thread) else []
        for line in found[-1].read_text(errors="replace").splitlines() if found else []:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            payload = item.get("payload") if isinstance(item.get("payload"), dict) else {}
            if item.get("type") == "event_msg" and payload.get("turn_id") == turn:
                if payload.get("type") == "task_started":
                    lines, inside = [], True
                elif payload.get("type") == "task_complete":
                    return lines + [item]
            if inside:
                lines.append(item)
        if time.time() > deadline:
            return lines if found else None
        time.sleep(0.5)


def codex_steps(lines):
    """LLM spans (one per model response: Codex records its usage after each) and tool spans."""
    steps, calls, inputs, outputs, usage = [], {}, [], [], None
    model, start = None, None
    turn_start = end = _ns(lines[0].get("timestamp")) if lines else None
    for item in lines:
        payload, at = item.get("payload") or {}, _ns(item.get("timestamp"))
        end = at or end
        kind = payload.get("type")
        if item.get("type") == "turn_context":
            model = payload.get("model") or model
        elif item.get("type") == "token_usage_record":
            usage = payload.get("usage")
            steps.append(_llm_step(model, inputs, outputs, start or turn_start, at, usage))
            inputs, outputs, start = [], [], at
        elif item.get("type") != "response_item":
            continue
        elif kind == "message" and payload.get("role") in ("user", "assistant"):
            text = "".join(part.get("text", "") for part in payload.get("content") or [] if isinstance(part, dict))
            (outputs if payload["role"] == "assistant" else inputs).append({"role": payload["role"], "content": text})
            if payload["role"] == "user":
                start = at
        elif kind in ("function_call", "custom_tool_call", "local_shell_call"):
            arguments = payload.get("arguments") or payload.get("input") or payload.get("action")
            outputs.append({"type": "tool_call", "name": payload.get("name", kind), "arguments": arguments})
            calls[payload.get("call_id")] = {"kind": "TOOL", "name": f"tool_{payload.get('name', kind)}",
                                             "start": at, "end": at, "inputs": _maybe_json(arguments),
                                             "outputs": {}, "attributes": {"tool_name": payload.get("name", kind),
                                                                           "tool_id": payload.get("call_id")}}
            steps.append(calls[payload.get("call_id")])
        elif kind in ("function_call_output", "custom_tool_call_output"):
            inputs.append({"role": "tool", "tool_call_id": payload.get("call_id"), "content": payload.get("output")})
            start = at
            if payload.get("call_id") in calls:
                calls[payload["call_id"]].update(end=at, outputs={"result": payload.get("output")})
    if outputs:  # a last response without a usage record
        steps.append(_llm_step(model, inputs, outputs, start or turn_start, end, None))
    return steps, model, turn_start, end


def trace_gemini(hook):
    """Gemini CLI: one trace per prompt, with LLM and tool spans from its chat recording."""
    records = gemini_records(hook.get("transcript_path") or "")
    prompt = str(hook.get("prompt") or "")
    turn = [i for i, r in enumerate(records) if r.get("type") == "user" and _gemini_text(r) == prompt.strip()]
    records = records[turn[-1]:] if turn else []
    steps, inputs, answer, model = [], [], None, None
    start = _ns(records[0].get("timestamp")) if records else None
    previous = start
    for record in records:
        at = _ns(record.get("timestamp"))
        if record.get("type") == "user":
            inputs.append({"role": "user", "content": record.get("content")})
            previous = at
        elif record.get("type") == "gemini":
            model = record.get("model") or model
            text = _gemini_text(record)
            answer = text or answer
            calls = [c for c in record.get("toolCalls") or [] if isinstance(c, dict)]
            tokens = record.get("tokens") or {}
            usage = {"input_tokens": tokens.get("input", 0), "output_tokens": tokens.get("output", 0)}
            outputs = ([{"role": "assistant", "content": text}] if text else []) + \
                      [{"type": "tool_call", "name": c.get("name"), "arguments": c.get("args")} for c in calls]
            steps.append(_llm_step(model, inputs, outputs, previous, at, usage))
            inputs, previous = [], at
            for call in calls:
                done = _ns(call.get("timestamp")) or at
                steps.append({"kind": "TOOL", "name": f"tool_{call.get('name')}", "start": at, "end": done,
                              "inputs": call.get("args"), "outputs": {"result": _gemini_result(call)},
                              "attributes": {"tool_name": call.get("name"), "tool_id": call.get("id")}})
                previous = max(previous or 0, done or 0) or None
    answer = answer or str(hook.get("prompt_response") or "")
    return record_turn("gemini_turn", prompt, answer, steps, session=str(hook.get("session_id", "")),
                       start=start, end=previous, attributes={"model": model, "cwd": hook.get("cwd", "")})


def gemini_records(path):
    """The chat recording's messages in order, each as last written."""
    records = {}
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("id") and record.get("type"):
            records[record["id"]] = record  # an update keeps its first place
    return list(records.values())


def _gemini_text(record):
    content = record.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict)).strip()
    return str(content or "").strip()


def _gemini_result(call):
    for part in call.get("result") or []:
        response = part.get("functionResponse", {}).get("response") if isinstance(part, dict) else None
        if isinstance(response, dict):
            return response.get("output", response)
    return call.get("resultDisplay")


def _llm_step(model, inputs, outputs, start, end, usage):
    attributes = {"model": model or "unknown"}
    if usage:
        used_in, used_out = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
        attributes["mlflow.chat.tokenUsage"] = {"input_tokens": used_in, "output_tokens": used_out,
                                                "total_tokens": used_in + used_out}
    return {"kind": "LLM", "name": "llm", "start": start, "end": end, "attributes": attributes,
            "inputs": {"model": model or "unknown", "messages": inputs}, "outputs": {"content": outputs}}


def record_turn(name, prompt, answer, steps, session, start, end, attributes):
    """One trace: an AGENT span for the turn, and under it an LLM or TOOL span per step."""
    import mlflow

    metadata = {"mlflow.trace.session": session, "mlflow.trace.user": os.environ.get("USER", "")}
    root = mlflow.start_span_no_context(name=name, span_type="AGENT", inputs={"prompt": prompt},
                                        attributes={k: v for k, v in attributes.items() if v},
                                        metadata=metadata, start_time_ns=start)
    last = root.start_time_ns
    for step in steps:
        begin = max(step["start"] or last, root.start_time_ns)
        span = mlflow.start_span_no_context(name=step["name"], span_type=step["kind"], parent_span=root,
                                            inputs=step["inputs"], attributes=step["attributes"],
                                            start_time_ns=begin)
        span.set_outputs(step["outputs"])
        last = max(begin, step["end"] or begin)
        span.end(end_time_ns=last)
    root.set_outputs({"response": answer})
    root.end(end_time_ns=max(end or last, last))
    return root.trace_id


def _ns(timestamp):
    """An ISO 8601 time ("...Z") as nanoseconds since the epoch, or None."""
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(timestamp).replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        return None


def _maybe_json(text):
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


TRACERS = {agent.name: agent_function(agent.tracer) for agent in AGENTS if agent.tracer}


# ===========================================================================
# 14. Workspace sync and restore
# ===========================================================================

# Workspace sync: a global post-commit hook starts `coda.py sync <repo>` in the
# background for every repository under ~/projects. The sync copies the commit's
# tree (tracked files only, never the working tree) to
# /Workspace/Users/<user>/projects/<repo>: only what changed since the last
# synced commit, deletions included. What the workspace holds is recorded per
# repository in <git dir>/coda-sync.json (paths, blob ids, workspace names), so
# a sync needs neither the old commit (amended, rebased away) nor a listing. A
# sync that fails leaves the record alone: the next commit retries it all.
SYNC_STATE = "coda-sync.json"     # in the repository's git dir
SYNC_LOCK = "coda-sync.lock"
NOTEBOOK_HEADERS = {  # extension: first line of a Databricks source notebook, its language
    ".py": ("# Databricks notebook source", "PYTHON"),
    ".sql": ("-- Databricks notebook source", "SQL"),
    ".scala": ("// Databricks notebook source", "SCALA"),
    ".r": ("# Databricks notebook source", "R"),
}
NOTEBOOK_EXTENSIONS = {"PYTHON": ".py", "SQL": ".sql", "SCALA": ".scala", "R": ".r"}  # restored notebooks
# CoDA's own git commands in a restored folder: no fsmonitor command and no hooks, whatever a config says.
RESTORE_GIT = ("-c", "core.fsmonitor=", "-c", "core.hooksPath=/dev/null")


class SyncError(Exception):
    """Why a sync cannot go on: one line for ~/.sync.log."""


# -- the sync subcommand --------------------------------------------------------

def sync_repository(repository):
    """`coda.py sync REPO` (the post-commit hook runs it): copy REPO's last commit to the workspace.
    One sync per repository at a time: one that finds another running leaves its commit to that one,
    which goes again when HEAD moved meanwhile."""
    sync_logging()
    try:
        repo = Path(git(Path(repository).resolve(), "rev-parse", "--show-toplevel").decode().strip())
        folder = project_folder(repo)
        git_dir = Path(git(repo, "rev-parse", "--absolute-git-dir").decode().strip())
    except SyncError as error:
        log.warning("sync of %s skipped: %s", repository, error)
        return 1
    with open(git_dir / SYNC_LOCK, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s: a sync is already running; it copies this commit too", folder)
                return 0
            try:
                synced = sync_once(repo, folder, git_dir)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            if synced is None:
                return 1
            if head_commit(repo) == synced:
                return 0


def sync_logging():
    """A subcommand's log goes to ~/.sync.log (and to the terminal of a user who runs it by hand),
    through the same redacting filter as the server's."""
    root = logging.getLogger()
    root.handlers[:] = []
    handlers = [logging.FileHandler(PATHS.sync_log)] + ([logging.StreamHandler()] if sys.stderr.isatty() else [])
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("databricks").setLevel(logging.WARNING)


def git(repo, *args, env=None, check=True, input=None):
    """What `git -C repo args` prints (bytes), or SyncError with git's own words (check=False: no error)."""
    from gevent import subprocess

    stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=300,
                          env={**os.environ, **env} if env else None, **stdin)
    if check and done.returncode != 0:
        raise SyncError(f"git {args[0]} failed: {done.stderr.decode(errors='replace').strip()[:300]}")
    return done.stdout


def head_commit(repo):
    """HEAD's commit id, or None in a repository without commits."""
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", "HEAD^{commit}").decode().strip() or None
    except SyncError:
        return None


def project_folder(repo):
    """The repository's path under ~/projects, which is also its folder in the workspace."""
    projects = PATHS.projects.resolve()
    if projects not in repo.resolve().parents:
        raise SyncError(f"{repo} is not under {PATHS.projects}")
    return repo.resolve().relative_to(projects).as_posix()


def sync_once(repo, folder, git_dir):
    """Bring the workspace copy from the recorded state to HEAD: the commit copied, or None."""
    commit = head_commit(repo)
    if commit is None:
        log.warning("sync of %s skipped: it has no commit yet", folder)
        return None
    state_path = git_dir / SYNC_STATE
    state = read_sync_state(state_path)
    short = commit[:12]
    try:
        host, token = saved_credentials()
        if (state.get("commit"), state.get("folder"), state.get("host")) == (commit, folder, host):
            return commit  # already there (a sync that went again for a commit it had copied)
        started = time.time()
        client, me = workspace_session(host, token)
        root = f"{projects_folder(me.user_name)}/{folder}"
        known = state.get("files", {}) if (state.get("root"), state.get("host")) == (root, host) else {}
        if known and not workspace_exists(client, root):
            known = {}  # the folder was deleted in the workspace: copy everything again
        files, counts = apply_commit(client, repo, root, known, committed_files(repo, commit))
        write_private(state_path, json.dumps({"commit": commit, "folder": folder, "host": host, "root": root,
                                              "files": files}) + "\n")
    except Exception as error:
        log.warning("sync of %s at %s failed (%s); the next commit tries again", folder, short, reason(error))
        return None
    log.info("synced %s at %s to %s: %d uploaded, %d deleted%s in %.1f s", folder, short, root, counts["uploaded"],
             counts["deleted"], f", {counts['refused']} refused" if counts["refused"] else "", time.time() - started)
    return commit


def read_sync_state(path):
    """The record of what the workspace holds; {} (copy everything) when missing or not as written."""
    try:
        state = json.loads(path.read_text())
        if all(entry.keys() >= {"blob", "remote", "notebook"} for entry in state["files"].values()):
            return state
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {}


def saved_credentials():
    """The host and token CoDA keeps in ~/.databrickscfg (terminals, hence hooks, never get DATABRICKS_HOST)."""
    host, token = read_databrickscfg()
    host = host or CONFIG.databricks_host
    if not host or not token:
        raise SyncError("no Databricks token is configured yet (paste one in the CoDA page)")
    SECRETS.add(token)
    return host, token


def workspace_session(host, token):
    """A client with the saved token alone, and the user it belongs to (SCIM Me)."""
    client = workspace_client(token, host=host)
    return client, client.current_user.me()


def workspace_exists(client, path):
    from databricks.sdk.errors import NotFound

    try:
        client.workspace.get_status(path)
        return True
    except NotFound:
        return False


def committed_files(repo, commit):
    """{path: blob id} of the commit's regular files (symbolic links and submodules stay out, and
    so does anything in a folder git would take for its own, which a crafted tree can hold)."""
    files = {}
    for entry in git(repo, "ls-tree", "-r", "-z", "--full-tree", commit).split(b"\0"):
        if entry:
            meta, path = entry.split(b"\t", 1)
            mode, _, blob = meta.split()
            path = path.decode(errors="surrogateescape")
            if mode in (b"100644", b"100755") and holds_git_name(path):
                log.warning("left out %s: git's own files are never copied to the workspace", path)
            elif mode in (b"100644", b"100755"):
                files[path] = blob.decode()
    return files


def holds_git_name(path):
    """Whether a component of the /-separated `path` names git's own folder, as git reads names:
    .git in any case, also with the trailing dots, spaces or :stream NTFS ignores, or NTFS's short
    name git~1. Such paths are never restored (a planted .git/config or hook runs at the next git
    command) and never uploaded; git refuses to track them anyway."""
    return any(part.split(":")[0].rstrip(" .").lower() in (".git", "git~1") for part in path.split("/"))


def apply_commit(client, repo, root, known, tree):
    """Delete what went, upload what is new or changed. Returns the new record and the counts.

    The workspace refusing one object for good (too large, a name or type clash) does not stop
    the sync: it is logged and left out of the record, so the next sync tries it again. Anything
    else (offline, an expired token, a server error) stops it, and the record stays as it was."""
    from databricks.sdk.errors import BadRequest, ResourceConflict

    counts = {"uploaded": 0, "deleted": 0, "refused": 0}
    files = {path: entry for path, entry in known.items() if tree.get(path) == entry["blob"]}
    uploads = {path: (blob, *planned_form(repo, path, blob)) for path, blob in tree.items() if path not in files}
    after = {(e["remote"], e["notebook"]) for e in files.values()} | {(u[1], u[2] != "AUTO") for u in uploads.values()}
    # An old object goes unless one of the same name and kind is there afterwards (kept, or overwritten).
    going = {e["remote"] for p, e in known.items() if p not in files and (e["remote"], e["notebook"]) not in after}
    for remote in outermost(going, remote_folders(remote for remote, _ in after)):
        try:
            delete_object(client, f"{root}/{remote}")
            counts["deleted"] += 1
        except (BadRequest, ResourceConflict) as error:
            log.warning("the workspace refused to delete %s/%s: %s", root, remote, reason(error))
            counts["refused"] += 1
            inside = f"{remote}/"  # what stays recorded is deleted again by the next sync
            files.update({p: e for p, e in known.items() if p not in tree and f"{e['remote']}/".startswith(inside)})
    made = remote_folders(e["remote"] for e in files.values()) | ({""} if known else set())
    for path, (blob, remote, form, language) in sorted(uploads.items()):
        try:
            upload_object(client, root, remote, git(repo, "cat-file", "blob", blob), form, language, made)
        except (BadRequest, ResourceConflict) as error:
            log.warning("the workspace refused %s/%s: %s", root, remote, reason(error))
            counts["refused"] += 1
            continue
        files[path] = {"blob": blob, "remote": remote, "notebook": form != "AUTO"}
        counts["uploaded"] += 1
    return files, counts


def planned_form(repo, path, blob):
    """workspace_form, reading the content only where it decides (a possible notebook)."""
    extension = os.path.splitext(path)[1].lower()
    maybe_notebook = extension in NOTEBOOK_HEADERS or extension == ".ipynb"
    return workspace_form(path, git(repo, "cat-file", "blob", blob) if maybe_notebook else b"")


def workspace_form(path, content):
    """Where and how a committed file goes: (workspace path under the project, format, language).
    Databricks source notebooks and .ipynb become notebooks, named without their extension as
    Databricks names them; everything else is a file under its own name."""
    stem, extension = os.path.splitext(path)
    if extension.lower() == ".ipynb":
        language = jupyter_language(content)
        if language:
            return stem, "JUPYTER", language
    header = NOTEBOOK_HEADERS.get(extension.lower())
    first_line = content.split(b"\n", 1)[0].removeprefix(b"\xef\xbb\xbf").strip()
    if header and first_line == header[0].encode():
        return stem, "SOURCE", header[1]
    return path, "AUTO", None


def jupyter_language(content):
    """A notebook's language from its metadata (PYTHON when it names none), or None if not a notebook."""
    try:
        metadata = json.loads(content).get("metadata") or {}
        name = (metadata.get("kernelspec") or {}).get("language") or (metadata.get("language_info") or {}).get("name")
    except (ValueError, AttributeError):
        return None
    return {"r": "R", "scala": "SCALA", "sql": "SQL"}.get(str(name or "").lower(), "PYTHON")


def remote_folders(remotes):
    """Every folder the given workspace paths sit in ("a/b/c" -> "a", "a/b")."""
    folders = set()
    for remote in remotes:
        parts = remote.split("/")[:-1]
        folders.update("/".join(parts[:n]) for n in range(1, len(parts) + 1))
    return folders


def outermost(going, staying_folders):
    """What to delete: a folder left with nothing in it goes in one recursive delete, not file by file."""
    targets = set()
    for remote in going:
        parts = remote.split("/")
        emptied = ["/".join(parts[:n]) for n in range(1, len(parts)) if "/".join(parts[:n]) not in staying_folders]
        targets.add(emptied[0] if emptied else remote)
    return sorted(targets)


def delete_object(client, path):
    from databricks.sdk.errors import NotFound

    try:
        client.workspace.delete(path, recursive=True)
    except NotFound:
        pass  # already gone: deleted in the workspace by hand


def upload_object(client, root, remote, content, form, language, made):
    """Import one object, creating its folder first (once per sync) and again if it was deleted meanwhile."""
    from databricks.sdk.errors import NotFound
    from databricks.sdk.service.workspace import ImportFormat, Language

    folder = remote.rpartition("/")[0]
    path = f"{root}/{remote}"
    if folder not in made:
        client.workspace.mkdirs(f"{root}/{folder}".rstrip("/"))
        made.update(remote_folders([remote]) | {"", folder})
    upload = lambda: client.workspace.upload(path, content, format=ImportFormat[form], overwrite=True,  # noqa: E731
                                             language=Language[language] if language else None)
    try:
        upload()
    except NotFound:
        client.workspace.mkdirs(f"{root}/{folder}".rstrip("/"))
        upload()


# -- restore ----------------------------------------------------------------------

def restore_projects():
    """`coda.py restore`: download each project the workspace holds and ~/projects lacks, as a new git
    repository with one commit (the workspace keeps files, not history). Existing folders stay untouched."""
    setup_logging()
    try:
        host, token = saved_credentials()
        client, me = workspace_session(host, token)
        names = workspace_projects(client, me.user_name)
    except Exception as error:
        log.error("restore failed: %s", reason(error))
        return 1
    for name in [name for name in names if holds_git_name(name)]:
        log.warning("skipped the workspace folder projects/%s: git's own files are never restored", name)
    missing = [name for name in names if not holds_git_name(name) and not (PATHS.projects / name).exists()]
    log.info("the workspace holds %d project(s) under %s; %d missing from %s", len(names),
             projects_folder(me.user_name), len(missing), PATHS.projects)
    failed = 0
    for name in missing:
        try:
            restore_project(client, me, host, name)
        except Exception as error:
            failed += 1
            log.error("could not restore %s: %s", name, reason(error))
    return 1 if failed else 0


def restore_project(client, me, host, name):
    """Download into a hidden folder, commit, then rename: a half-restored project never looks whole.
    The repository is made first, by git itself, so nothing downloaded can become its config."""
    root = f"{projects_folder(me.user_name)}/{name}"
    staging = PATHS.projects / f".{name}.restoring"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        git(staging, *RESTORE_GIT, "init", "-q")
        remotes = download_tree(client, root, staging)
        commit = commit_restored(staging, me)
        files = {path: {"blob": blob, "remote": remotes[path][0], "notebook": remotes[path][1]}
                 for path, blob in committed_files(staging, commit).items() if path in remotes}
        git_dir = Path(git(staging, "rev-parse", "--absolute-git-dir").decode().strip())
        write_private(git_dir / SYNC_STATE, json.dumps({"commit": commit, "folder": name, "host": host,
                                                        "root": root, "files": files}) + "\n")
        staging.rename(PATHS.projects / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        trust_folder(PATHS.projects / name)  # the user's own project, as synced: the agents open it without asking
    except ConfigError as error:
        log.warning("restored %s, but the agents will ask before they trust it: %s", name, error)
    log.info("restored %s: %d files, committed as %s", name, len(remotes), commit[:12])


def download_tree(client, root, into):
    """Export every notebook (as source, with its language's extension) and file under `root`,
    except git's own folders and files (not even listed). Returns {local path: (workspace path,
    notebook or not)}, paths relative."""
    from databricks.sdk.service.workspace import ExportFormat, ObjectType

    remotes = {}
    folders = collections.deque([root])
    while folders:
        for item in client.workspace.list(folders.popleft()):
            remote = relative_path(item.path, root)
            if holds_git_name(remote):
                log.warning("skipped %s: git's own files are never restored", item.path)
                continue
            if item.object_type == ObjectType.DIRECTORY:
                folders.append(item.path)
                continue
            if item.object_type == ObjectType.NOTEBOOK and item.language:
                local, form = remote + NOTEBOOK_EXTENSIONS[item.language.value], ExportFormat.SOURCE
            elif item.object_type == ObjectType.FILE:
                local, form = remote, None
            else:
                log.info("skipped %s: a %s is not a file", item.path, item.object_type.value.lower())
                continue
            target = into / local
            if local in remotes or target.exists():
                log.warning("skipped %s: %s is taken by another object", item.path, local)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.workspace.download(item.path, format=form).read())
            remotes[local] = (remote, item.object_type == ObjectType.NOTEBOOK)
    return remotes


def relative_path(path, root):
    """`path` below `root`, either written with or without /Workspace; never outside it."""
    path, root = (p.removeprefix(WORKSPACE_PREFIX) for p in (path, root))
    relative = path.removeprefix(root.rstrip("/") + "/")
    if relative == path or any(part in ("", ".", "..") for part in relative.split("/")):
        raise SyncError(f"the workspace listed {path}, which is not a plain path under {root}")
    return relative


def commit_restored(repo, me):
    """One commit of everything, with the user's git identity (from SCIM Me if git has none).
    Hooks are off for it (a post-commit would upload everything right back), and so is fsmonitor."""
    git(repo, *RESTORE_GIT, "add", "--all", "--force")  # all: what .gitignore names was tracked, or it would not be here
    identity = []
    if not git_identity_set(repo):
        identity = ["-c", f"user.name={me.display_name or me.user_name}", "-c", f"user.email={me.user_name}"]
    git(repo, *identity, *RESTORE_GIT, "commit", "-q", "--allow-empty", "--no-verify",
        "-m", "Restored from the Databricks workspace")
    return head_commit(repo)


def git_identity_set(repo):
    try:
        return bool(git(repo, "config", "user.email").strip())
    except SyncError:
        return False


# -- restart-proof state ----------------------------------------------------------
# A Databricks App's disk is new at every restart, so CoDA keeps the user's work in a folder of
# their own workspace, /Workspace/Users/<user>/.coda/state, written with their current token:
#   current.json   the manifest: the page's tabs (each session's label, folder and agent), and the
#                  blobs below with their sizes and sha256; written last, so it always names whole blobs
#   blobs/         immutable, named by their content: one archive per agent (its conversations and
#                  memory, the row's `memory` paths) and one for the shell history, text redacted like
#                  log lines; one git bundle per repository in ~/projects, its branches plus a commit
#                  of the working tree (made with a temporary index: the user's branch, index and stash
#                  are never touched); each split in parts the workspace's import API takes
#   README.md      what this folder is
# A save uploads only blobs the folder lacks, then the manifest, then deletes the blobs neither it
# nor the one before names: a save that fails or is cut short leaves the last one whole. Never
# kept: ~/.databrickscfg, the proxy key, the agents' auth files and config (none is on a `memory`
# path), a file holding a token it knows or one of a token's shapes, anything over
# CODA_STATE_MAX_BYTES (left out, and said so in the manifest). The server runs `state save`;
# setup's first token step runs `state restore`, which downloads and checks everything before it
# changes anything, and never overwrites a file that exists.
STATE_FORMAT = 1                       # the manifest's format; a newer one is never read nor overwritten
STATE_PART_BYTES = 8 * MIB             # one workspace object (the import API takes at most 10 MB)
SHELL_HISTORY = (".bash_history", ".zsh_history", ".python_history")
SNAPSHOT_IDENTITY = {"GIT_AUTHOR_NAME": "CoDA", "GIT_AUTHOR_EMAIL": "coda@localhost",
                     "GIT_COMMITTER_NAME": "CoDA", "GIT_COMMITTER_EMAIL": "coda@localhost",
                     # a fixed date: the same working tree makes the same commit, so an unchanged
                     # repository is neither bundled nor uploaded again
                     "GIT_AUTHOR_DATE": "1970-01-01T00:00:01Z", "GIT_COMMITTER_DATE": "1970-01-01T00:00:01Z"}
BINARY_TOKEN_SHAPES = re.compile(rb"dapi[0-9a-f]{16,}|dkea[0-9a-f]{16,}|dose[0-9a-f]{16,}"
                                 rb"|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}|sk-[A-Za-z0-9_-]{16,}")
STATE_README = """\
# CoDA's saved work

CoDA (coding agents in the browser) keeps what a restart of the app would lose here, so that
it comes back: the open tabs with their folders, uncommitted work in ~/projects (git bundles),
the agents' conversations and memory, and the shell history. It never keeps tokens, keys or
the agents' login files. Only you (and workspace admins) can read this folder, like the rest
of /Users/<you>. Delete it to forget everything; set CODA_STATE=0 in the app to stop saving.
"""


class StateError(Exception):
    """Why a save or restore cannot go on: one sentence for setup, doctor and the log."""


def state_folder(user):
    return f"{WORKSPACE_PREFIX}/Users/{user}/.coda/state"


def state_command(action):
    """`coda.py state save|restore` (the server runs them; never inside it)."""
    setup_logging()
    logging.getLogger("databricks").setLevel(logging.WARNING)
    if action not in ("save", "restore"):
        log.error("coda.py state: say save or restore")
        return 2
    if action == "save" and os.environ.get("CODA_STATE_WORKER"):
        import_off_loop("databricks.sdk")  # the slow part, done before a save is asked for
        for _ in sys.stdin:  # one save per line; the end of its input (the server is gone) ends it
            print(f"done {run_state(action)}", flush=True)
        return exit_now(0)
    return exit_now(run_state(action))


def run_state(action):
    """One save or restore with the token ~/.databrickscfg holds now (a rotation may have replaced it)."""
    started = time.time()
    try:
        host, token = saved_credentials()
        SECRETS.add(proxy_key())
        client, me = workspace_session(host, token)
        (save_state if action == "save" else restore_state)(client, state_folder(me.user_name), me, started)
        return 0
    except (StateError, SyncError) as error:
        message = str(error)
    except Exception as error:
        message = f"the workspace could not be {'written' if action == 'save' else 'read'}: {reason(error)}"
    log.error("state %s failed: %s", action, message)
    note_state(**{"error": f"{'Saving' if action == 'save' else 'Restoring'} failed: {message}",
                  "error_at": time.time()})
    return 1


def exit_now(code):
    """Exit without the interpreter's teardown, which takes seconds after databricks-sdk (its
    threads): the server's last save has no seconds to spare."""
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def note_state(**changes):
    """Update ~/.coda/state-record.json (the server, setup and doctor read it; it holds no token)."""
    record = {**read_state_record(), **changes}
    write_private(PATHS.state_record, json.dumps(record) + "\n")


def read_manifest(client, folder):
    """The saved manifest, None when nothing is saved; StateError when it is damaged or newer than this CoDA."""
    from databricks.sdk.errors import NotFound

    try:
        raw = client.workspace.download(f"{folder}/current.json").read()
    except NotFound:
        return None
    try:
        manifest = json.loads(raw)
        version = manifest["format"]
        if not isinstance(version, int) or not all(isinstance(manifest.get(k), dict) for k in ("blobs", "layout")):
            raise ValueError("missing fields")
    except (ValueError, KeyError, TypeError) as error:
        raise StateError(f"the saved state in {folder} is damaged (current.json: {reason(error)}); nothing "
                         "was changed, and saving is paused so it is not overwritten: delete the folder to "
                         "start afresh") from None
    if version > STATE_FORMAT:
        raise StateError(f"the saved state in {folder} was written by a newer CoDA (format {version}; this one "
                         f"reads {STATE_FORMAT}); nothing was changed, and saving is paused so it is not "
                         "overwritten: update CoDA to bring it back")
    return manifest


# -- saving -----------------------------------------------------------------------

def save_state(client, folder, me, started):
    """Pack what changed, upload the blobs the folder lacks, then the manifest, then tidy up."""
    if not read_state_record().get("may_save"):
        raise StateError("saving waits until the saved state has been restored (paste a token in the CoDA page)")
    previous = read_manifest(client, folder)
    shutil.rmtree(PATHS.state_work, ignore_errors=True)
    PATHS.state_work.mkdir(parents=True, mode=0o700)
    try:
        manifest, files = pack_state(previous)
        if previous and all(previous.get(k) == manifest[k] for k in ("blobs", "layout", "left_out")):
            note_state(checked_at=time.time(), error=None)
            log.info("state unchanged since %s", utc_clock(previous.get("saved_at", 0)))
            return
        uploaded = upload_blobs(client, folder, manifest["blobs"], files)
        upload_file(client, f"{folder}/current.json", json.dumps(manifest, indent=1).encode())
        if previous is None:
            upload_file(client, f"{folder}/README.md", STATE_README.encode())
        forget_blobs(client, folder, manifest, previous)
    finally:
        shutil.rmtree(PATHS.state_work, ignore_errors=True)
    size = sum(blob["bytes"] for blob in manifest["blobs"].values())
    note_state(saved_at=manifest["saved_at"], bytes=size, folder=folder, error=None, left_out=manifest["left_out"])
    log.info("state saved to %s: %s (%s uploaded) in %.1f s", folder, size_text(size), size_text(uploaded),
             time.time() - started)


def pack_state(previous):
    """(manifest, {blob name: local file}): archives of the agents' files and the shell history, a
    bundle per repository (reused from `previous` when its snapshot is the same)."""
    blobs, files, left_out = {}, {}, []
    packs = [(f"agent-{agent.name}", agent.memory) for agent in AGENTS] + [("shell-history", SHELL_HISTORY)]
    for item, paths in packs:
        packed = pack_files(item, paths, left_out)
        if packed:
            blobs[item] = packed[0]
            files[packed[0]["name"]] = packed[1]
    earlier = (previous or {}).get("blobs", {})
    for repo in project_repositories():
        try:
            packed = snapshot_repository(repo, earlier.get(f"repo-{repo.name}"))
        except SyncError as error:
            left_out.append(f"~/projects/{repo.name}: {error}")
            continue
        if packed[0]["bytes"] > CONFIG.state_max_bytes:
            left_out.append(f"~/projects/{repo.name}: {size_text(packed[0]['bytes'])} is over "
                            f"CODA_STATE_MAX_BYTES ({size_text(CONFIG.state_max_bytes)})")
            continue
        blobs[f"repo-{repo.name}"] = packed[0]
        if packed[1]:
            files[packed[0]["name"]] = packed[1]
    for note in left_out:
        log.warning("state: left out %s", note)
    manifest = {"format": STATE_FORMAT, "coda": __version__, "saved_at": time.time(), "home": str(PATHS.home),
                "layout": read_layout_file(), "blobs": blobs, "left_out": left_out}
    return manifest, files


def read_layout_file():
    return read_json_object(PATHS.state_layout) or {"tabs": []}


def pack_files(item, paths, left_out):
    """A gzipped tar of the regular files under HOME/`paths` (in name order, fixed ownership and
    gzip time, so the same files make the same bytes), text redacted; None when there are none."""
    import gzip
    import tarfile

    members = []
    for relative in paths:
        top = PATHS.home / relative
        found = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        members += [p for p in found if not p.is_symlink()]
    if not members:
        return None
    target = PATHS.state_work / f"{item}.tgz"
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as zipped, \
            tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in members:
            name = path.relative_to(PATHS.home).as_posix()
            try:
                data = kept_content(path)
            except OSError as error:
                left_out.append(f"~/{name}: {reason(error)}")
                continue
            if data is None:
                left_out.append(f"~/{name}: it holds a token")
                continue
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(path.stat().st_mtime)
            archive.addfile(info, io.BytesIO(data))
    size = target.stat().st_size
    if size > CONFIG.state_max_bytes:
        left_out.append(f"{item}: {size_text(size)} is over CODA_STATE_MAX_BYTES ({size_text(CONFIG.state_max_bytes)})")
        return None
    return blob_entry(item, target, ".tgz"), target


def kept_content(path):
    """The file as it is kept: text redacted like a log line; binary as it is, or None if it holds a token."""
    data = path.read_bytes()
    try:
        text = data.decode()
    except UnicodeDecodeError:
        secrets_held = any(secret.encode() in data for secret in tuple(SECRETS) if len(secret) >= 8)
        return None if secrets_held or BINARY_TOKEN_SHAPES.search(data) else data
    return redact(text).encode()


def blob_entry(item, path, suffix):
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(MIB), b""):
            digest.update(block)
    size = path.stat().st_size
    return {"name": f"{item}-{digest.hexdigest()[:32]}{suffix}", "bytes": size, "sha256": digest.hexdigest(),
            "parts": max(1, math.ceil(size / STATE_PART_BYTES))}


def project_repositories():
    """The git repositories directly in ~/projects."""
    return sorted(p for p in local_projects() if (p / ".git").exists())


def snapshot_repository(repo, earlier):
    """(blob entry, bundle file or None when `earlier` is the same snapshot): a bundle of the
    repository's branches and tags plus a commit of its working tree, untracked files included,
    made with a temporary copy of the index and a scratch repository borrowing its objects."""
    git_dir = Path(git(repo, "rev-parse", "--absolute-git-dir").decode().strip())
    common = Path(git(repo, "rev-parse", "--git-common-dir").decode().strip())
    common = common if common.is_absolute() else (repo / common).resolve()
    head = head_commit(repo)
    branch = git(repo, "symbolic-ref", "--quiet", "--short", "HEAD", check=False).decode().strip() or None
    index = PATHS.state_work / f"{repo.name}.index"
    if (git_dir / "index").exists():
        shutil.copyfile(git_dir / "index", index)
    env = {"GIT_INDEX_FILE": str(index), **SNAPSHOT_IDENTITY}
    git(repo, *RESTORE_GIT, "add", "--all", env=env)
    tree = git(repo, "write-tree", env=env).decode().strip()
    work = git(repo, "commit-tree", tree, *(["-p", head] if head else []), "-m", "CoDA: the working tree",
               env=env).decode().strip()
    refs = git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads", "refs/tags").decode()
    remotes = {}
    for line in git(repo, "config", "--get-regexp", r"^remote\..*\.url$", check=False).decode().splitlines():
        key, _, url = line.partition(" ")
        remotes[key.removeprefix("remote.").removesuffix(".url")] = without_credentials(url)
    key = hashlib.sha256(f"{work}\n{refs}\n{branch}\n{head}\n{sorted(remotes.items())}".encode()).hexdigest()
    described = {"repository": repo.name, "branch": branch, "head": head, "work": work, "remotes": remotes,
                 "snapshot": key}
    if earlier and earlier.get("snapshot") == key:
        return earlier, None
    scratch = PATHS.state_work / f"{repo.name}.git"
    git(PATHS.state_work, "init", "-q", "--bare", str(scratch))
    (scratch / "objects" / "info" / "alternates").write_text(str(common / "objects") + "\n")
    updates = "".join(f"update {name} {sha}\n" for sha, name in (line.split(" ", 1) for line in refs.splitlines()))
    git(scratch, "update-ref", "--stdin", input=(updates + f"update refs/coda/work {work}\n").encode())
    bundle = PATHS.state_work / f"{repo.name}.bundle"
    git(scratch, "bundle", "create", "-q", str(bundle), "--all")
    return {**blob_entry(f"repo-{repo.name}", bundle, ".bundle"), **described}, bundle


def without_credentials(url):
    """A remote's URL without a user:password@ (a token often sits there)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme and "@" in parsed.netloc:
        return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.rpartition("@")[2]))
    return url


def upload_file(client, path, content):
    from databricks.sdk.service.workspace import ImportFormat

    client.workspace.upload(path, io.BytesIO(content), format=ImportFormat.AUTO, overwrite=True)


def blob_names(client, folder):
    from databricks.sdk.errors import NotFound

    try:
        return {item.path.rsplit("/", 1)[1] for item in client.workspace.list(f"{folder}/blobs")}
    except NotFound:
        return set()


def part_names(blob):
    return [f"{blob['name']}.{n}" for n in range(blob["parts"])]


def upload_blobs(client, folder, blobs, files):
    """Upload the parts the folder lacks; returns the bytes sent."""
    present = blob_names(client, folder)
    client.workspace.mkdirs(f"{folder}/blobs")
    sent = 0
    for blob in blobs.values():
        missing = [n for n, name in enumerate(part_names(blob)) if name not in present]
        if not missing:
            continue
        with open(files[blob["name"]], "rb") as source:
            for n in missing:
                source.seek(n * STATE_PART_BYTES)
                content = source.read(STATE_PART_BYTES)
                upload_file(client, f"{folder}/blobs/{blob['name']}.{n}", content)
                sent += len(content)
    return sent


def forget_blobs(client, folder, manifest, previous):
    """Delete the parts neither this manifest nor the one before it names (a restore reading the
    previous one while this save ran still finds all of its parts)."""
    keep = {name for m in (manifest, previous or {}) for blob in m.get("blobs", {}).values()
            if isinstance(blob, dict) and "name" in blob and isinstance(blob.get("parts"), int)
            for name in part_names(blob)}
    for name in sorted(blob_names(client, folder) - keep):
        delete_object(client, f"{folder}/blobs/{name}")


# -- restoring --------------------------------------------------------------------

def restore_state(client, folder, me, started):
    """Download every blob and check its sha256, then bring back the repositories (and the other
    projects, as `coda.py restore` does), the agents' files, the shell history and the tabs."""
    if read_state_record().get("may_save"):
        log.info("this HOME keeps its own state (%s): nothing restored", PATHS.state_record)
        return
    manifest = read_manifest(client, folder)
    if manifest is None:
        log.info("no saved state in %s", folder)
        note_state(may_save=True, restored_at=time.time(), bytes=0, error=None)
        return
    shutil.rmtree(PATHS.state_work, ignore_errors=True)
    PATHS.state_work.mkdir(parents=True, mode=0o700)
    try:
        files = download_blobs(client, folder, manifest["blobs"])
        for item, blob in sorted(manifest["blobs"].items()):
            if item.startswith("repo-"):
                restore_repository(files[item], blob)
        restore_projects_too()
        allowed = {f"agent-{agent.name}": agent.memory for agent in AGENTS} | {"shell-history": SHELL_HISTORY}
        for item, blob in sorted(manifest["blobs"].items()):
            if item in allowed:
                unpack_files(files[item], allowed[item])
    finally:
        shutil.rmtree(PATHS.state_work, ignore_errors=True)
    write_private(PATHS.state_restored, json.dumps(restored_layout(manifest["layout"], manifest["saved_at"])) + "\n")
    size = sum(blob["bytes"] for blob in manifest["blobs"].values())
    note_state(may_save=True, restored_at=time.time(), saved_at=manifest.get("saved_at"), bytes=size, error=None)
    log.info("state restored from %s (saved %s): %s in %.1f s", folder, utc_clock(manifest.get("saved_at", 0)),
             size_text(size), time.time() - started)
    print(f"restored {size}", flush=True)  # setup's step shows the size


def download_blobs(client, folder, blobs):
    """{item: local file}, each checked against its sha256 before anything is changed."""
    files = {}
    for item, blob in blobs.items():
        try:
            name, parts, expected = blob["name"], blob["parts"], blob["sha256"]
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not isinstance(parts, int) or not 0 < parts < 10_000:
                raise ValueError(name)
        except (KeyError, TypeError, ValueError):
            raise StateError(f"the saved state in {folder} is damaged (its entry for {item} is not as written); "
                             "nothing was changed, and saving is paused so it is not overwritten") from None
        target = PATHS.state_work / name
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            for n in range(parts):
                content = client.workspace.download(f"{folder}/blobs/{name}.{n}").read()
                digest.update(content)
                out.write(content)
        if digest.hexdigest() != expected:
            raise StateError(f"the saved state in {folder} is damaged ({name} does not match its checksum); "
                             "nothing was changed, and saving is paused so it is not overwritten")
        files[item] = target
    return files


def restore_repository(bundle, blob):
    """Clone a saved repository from its bundle into ~/projects (unless the folder exists): its
    branches, its HEAD, and the working tree as it was, the changes unstaged."""
    name = blob.get("repository")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or holds_git_name(name):
        log.warning("skipped a saved repository named %r: not a plain folder name", name)
        return
    target, staging = PATHS.projects / name, PATHS.projects / f".{name}.restoring"
    if target.exists():
        log.info("kept ~/projects/%s as it is (it exists); its saved snapshot is not applied", name)
        return
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        git(staging, *RESTORE_GIT, "init", "-q")
        git(staging, *RESTORE_GIT, "fetch", "-q", "--update-head-ok", str(bundle), "refs/*:refs/*")
        branch, head, work = blob.get("branch"), blob.get("head"), blob.get("work")
        if branch:
            git(staging, "check-ref-format", f"refs/heads/{branch}")
            git(staging, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
        elif head:
            git(staging, "update-ref", "--no-deref", "HEAD", head)
        git(staging, *RESTORE_GIT, "read-tree", work)
        git(staging, *RESTORE_GIT, "checkout-index", "--all", "--force")
        git(staging, *RESTORE_GIT, "read-tree", *([head] if head else ["--empty"]))
        git(staging, "update-ref", "-d", "refs/coda/work")
        for remote, url in (blob.get("remotes") or {}).items():
            git(staging, "remote", "add", remote, url, check=False)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        trust_folder(target)  # the user's own project: the agents open it without asking, as before
    except ConfigError as error:
        log.warning("restored %s, but the agents will ask before they trust it: %s", name, error)
    log.info("restored ~/projects/%s at %s with its uncommitted work", name, (head or "no commit")[:12])


def restore_projects_too():
    """The projects the workspace sync holds that no bundle brought back, as `coda.py restore` does."""
    try:
        host, token = saved_credentials()
        client, me = workspace_session(host, token)
        names = workspace_projects(client, me.user_name)
    except Exception as error:
        log.warning("could not list the workspace's projects: %s", reason(error))
        return
    for name in names:
        if not holds_git_name(name) and not (PATHS.projects / name).exists():
            try:
                restore_project(client, me, host, name)
            except Exception as error:
                log.warning("could not restore %s: %s", name, reason(error))


def unpack_files(archive_path, paths):
    """Put back the archive's regular files that lie on `paths` and do not exist yet (0600)."""
    import tarfile

    home = PATHS.home.resolve()
    with tarfile.open(archive_path, "r:gz") as archive:
        for member in archive:
            name = member.name
            if not member.isfile() or name.startswith("/") or ".." in name.split("/") or not any(
                    name == p or name.startswith(p + "/") for p in paths):
                log.warning("skipped %s in the saved state: not one of the files it may hold", name)
                continue
            target = home / name
            if target.exists() or target.is_symlink():
                continue
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            folder = target.parent.resolve()
            if folder != home and home not in folder.parents:  # a linked folder on the way leads elsewhere
                log.warning("skipped %s in the saved state: its folder leads out of HOME", name)
                continue
            with archive.extractfile(member) as source, open(
                    os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as out:
                shutil.copyfileobj(source, out)
            os.utime(target, (member.mtime, member.mtime))


def restored_layout(layout, saved_at):
    """The saved tabs for the page, each pane's folder back under this HOME (or ~/projects if it is gone)."""
    tabs = []
    for tab in layout.get("tabs", [])[:MAX_LAYOUT_TABS] if isinstance(layout.get("tabs"), list) else []:
        panes = []
        for pane in tab.get("panes", [])[:2] if isinstance(tab, dict) and isinstance(tab.get("panes"), list) else []:
            if not isinstance(pane, dict):
                continue
            folder = pane.get("cwd") if isinstance(pane.get("cwd"), str) else ""
            path = (PATHS.home / folder).resolve()
            if PATHS.home.resolve() not in (path, *path.parents) or not path.is_dir():
                folder = "projects"
            agent = pane.get("agent") if pane.get("agent") in {a.name for a in AGENTS} else None
            panes.append({"label": clean_label(str(pane.get("label") or ""))[:100], "cwd": folder, "agent": agent})
        if panes:
            tabs.append({"name": clean_label(str(tab.get("name") or ""))[:100], "panes": panes,
                         "split": tab.get("split") if isinstance(tab.get("split"), (int, float)) else 50})
    return {"saved_at": saved_at, "tabs": tabs, "active": layout.get("active", 0)}


# ===========================================================================
# 15. Command line
# ===========================================================================

def doctor():
    """`coda.py doctor`: check what CoDA set up, and say in plain words how to fix what is broken."""
    import requests

    host, token = read_databrickscfg()
    signed_in = {}  # the user, once token_valid has seen who the token is

    def workspace():
        if not host:
            raise StepFailed("~/.databrickscfg names no workspace: open CoDA in the browser and paste a token")
        try:
            requests.get(host, timeout=DOCTOR_HTTP_SECONDS)
        except requests.RequestException as error:
            raise StepFailed(f"{host} cannot be reached ({reason(error)}): check the network or DATABRICKS_HOST") from None
        return host

    def token_valid():
        try:
            signed_in["user"] = workspace_client(token, host).current_user.me().user_name
            return f"signed in as {signed_in['user']}"
        except Exception as error:
            if is_refusal(error):
                raise StepFailed(f"the workspace refuses the token ({reason(error)}): paste a new one in the CoDA page") from None
            raise StepFailed(f"could not ask the workspace about the token ({reason(error)}): try again shortly") from None

    def rotation():
        try:
            status = json.loads(PATHS.pat_status_file.read_text())
        except (OSError, ValueError):
            raise StepFailed("the server has not reported on the token yet: paste a token in the CoDA page") from None
        expires_at = status.get("expires_at")
        if status.get("error") or (expires_at and expires_at < time.time()):
            raise StepFailed(status.get("error") or f"the token expired at {utc_clock(expires_at)}: paste a new one")
        return f"valid until {utc_clock(expires_at)}" if expires_at else "the pasted token is in use"

    def can_mint():
        client = workspace_client(token, host)
        try:
            created = client.tokens.create(comment="CoDA doctor check", lifetime_seconds=60)
            client.tokens.delete(created.token_info.token_id)
        except Exception as error:
            raise StepFailed(f"the token cannot create tokens ({reason(error)}), so CoDA cannot rotate it: "
                             "paste a token with the right to manage tokens") from None
        return "a short-lived token was created and revoked"

    def gateway():
        try:
            base = json.loads(PATHS.pat_status_file.read_text())["gateway"]  # what the proxy forwards to
        except (OSError, ValueError, KeyError, TypeError):
            base = None
        if not base:
            raise StepFailed("no gateway is configured yet: paste a token in the CoDA page")
        if not _answers(base, token):
            raise StepFailed(f"{base} does not answer: set DATABRICKS_GATEWAY_HOST or ask an admin to enable AI Gateway")
        return base

    def proxy():
        try:
            health = proxy_health()
        except OSError as error:
            raise StepFailed(f"nothing answers on 127.0.0.1:{CONFIG.proxy_port} ({type(error).__name__}): "
                             "restart the app") from None
        server = os.environ.get("CODA_SERVER_PID")  # set in CoDA's terminals: which CoDA doctor checks for
        if server and str(health.get("pid")) != server:
            raise StepFailed(f"127.0.0.1:{CONFIG.proxy_port} is held by another CoDA (pid {health.get('pid')}), "
                             "not this one: set CODA_PROXY_PORT to a free port")
        if not health.get("token"):
            raise StepFailed("the local proxy has no valid token: paste one in the CoDA page")
        return f"127.0.0.1:{CONFIG.proxy_port}"

    def agent(name, config_path):
        def check():
            version = installed_version(name)
            if not config_path.exists():
                raise StepFailed(f"{config_path} is missing: paste a token in the CoDA page to write it")
            return version
        return check

    def served_models():
        """What the workspace serves, per agent API (doctor's own listing, with the saved token)."""
        if not token:
            raise UserWarning("no token is saved yet to list them with: paste one in the CoDA page")
        PROCESS.models.apis, PROCESS.models.notice = list_served_models(workspace_client(token, host))
        if PROCESS.models.apis is None:
            raise UserWarning(PROCESS.models.notice)
        lines = [f"{len([s for s in PROCESS.models.apis.values() if s])} chat model(s)"]
        lines += [f"      {line}" for line in PROCESS.models.describe()]
        if PROCESS.models.notice:
            lines.append(f"      {PROCESS.models.notice}")
        return "\n".join(lines)

    def model(choose):
        def check():
            choice = choose()
            text = f"{choice.model} \N{EM DASH} {choice.why}"
            if choice.status == "unserved":
                raise StepFailed(text)
            if choice.status != "served":
                raise UserWarning(text)
            return text
        return check

    def mcp():
        if CONFIG.mcp_errors:
            raise StepFailed("; ".join(CONFIG.mcp_errors))
        leaving = len(CONFIG.mcp_servers)
        return (f"{len(CONFIG.managed_mcp)} in the workspace, {leaving} leaving it"
                + "".join(f"\n        {line}" for line in describe_mcp_servers()))

    chain = [("workspace reachable", workspace), ("token valid", token_valid), ("token can mint", can_mint),
             ("AI Gateway", gateway)]  # each needs the one before it
    checks = [("token rotation", rotation), ("local proxy", proxy), ("MLflow tracing", tracing_check),
              ("MCP servers", mcp), ("saved work", state_check)]
    checks += [(f"{each.label} installed and configured", agent(each.name, PATHS.home / each.config_file))
               for each in enabled_agents()]
    model_checks = [("served models", served_models)]  # the ones after it read its listing
    model_checks += [(f"{each.label} model", model(functools.partial(model_choice, each.name)))
                     for each in enabled_agents() if each.model_api]
    if CONFIG.hermes_fallback_model and "hermes" not in CONFIG.agents_off:
        model_checks.append(("Hermes Agent fallback model", model(hermes_fallback_choice)))

    def run(label, check):
        try:
            print(f"ok    {label}: {check()}")
            return True
        except UserWarning as warning:  # worth knowing, but the agent works
            print(f"warn  {label}: {warning}")
            return True
        except Exception as error:
            print(f"FAIL  {label}: {error if isinstance(error, StepFailed) else reason(error)}")
            return False

    failed, passed = 0, 0
    for position, (label, check) in enumerate(chain):
        if not run(label, check):
            failed += 1
            for later, _ in chain[position + 1:]:
                print(f"skip  {later}: needs the check above")
            break
        passed += 1
    failed += sum(not run(label, check) for label, check in checks)
    for label, check in model_checks:  # they need the workspace and the token (the chain's first two)
        if passed >= 2:
            failed += not run(label, check)
        else:
            print(f"skip  {label}: needs a reachable workspace and a valid token (see above)")
    print_usage(host, token, signed_in.get("user"))
    print("all good" if not failed else f"{failed} problem(s) found")
    return 1 if failed else 0


def print_usage(host, token, user):
    """doctor's account of what the agents spent today: from the proxy's counts, and from the
    gateway's usage table where the workspace lets the user read it."""
    counts = usage_answer(UsageCounter(PATHS.usage_file))
    print(f"usage today ({counts['day']} UTC), counted by the local proxy:")
    for line in usage_lines(counts["agents"], "agent", counts["total"]):
        print("      " + line)
    if counts.get("price_error"):
        print("      " + counts["price_error"])
    table = workspace_usage(token, user, CONFIG.usage_warehouse_id, host)
    if not table["readable"]:
        print(f"note  {table['reason']}")
        return
    print(f"usage today from {table['table']} (your rows):")
    for line in usage_lines(table["models"], "model", table["total"]):
        print("      " + line)


def usage_lines(rows, key, total):
    """One line per row with requests today (agents: their label), then the total."""
    def line(name, today):
        cost = f", about ${today['cost']:.4f}" if today["cost"] is not None else ""
        return (f"{name}: {today['requests']} requests, {today['input_tokens']} input and "
                f"{today['output_tokens']} output tokens{cost}")

    lines = [line(row.get("label", row[key]), row["total"]["today"] if "total" in row else row["today"])
             for row in rows if (row["total"]["today"] if "total" in row else row["today"])["requests"]]
    return [*lines, line("total", total["today"])] if lines else ["no model calls yet today"]


def state_check():
    """Doctor: the last save of the work to the workspace (CODA_STATE), its size, or why it fails."""
    if not CONFIG.state:
        return "off (CODA_STATE=0)"
    if not (CONFIG.databricks_host or read_databrickscfg()[0]):  # a terminal's doctor has no DATABRICKS_HOST
        return "off: no Databricks workspace is configured"
    record = read_state_record()
    if record.get("error"):
        raise StepFailed(f"{record['error']} (at {utc_clock(record.get('error_at') or 0)})")
    if record.get("saved_at"):
        left_out = f"; left out: {'; '.join(record['left_out'])}" if record.get("left_out") else ""
        return (f"last saved at {utc_clock(record['saved_at'])}, {size_text(record.get('bytes') or 0)}, to "
                f"{record.get('folder') or 'the workspace'}{left_out}")
    if record.get("may_save"):
        return "nothing saved yet (CoDA saves every few minutes while something changes, and when it stops)"
    raise StepFailed("nothing is saved until a token is pasted in the CoDA page (the saved work is restored first)")


def refresh_skills():
    """`coda.py skills`: fetch the skill packs again (CODA_SKILLS) and link them for every agent."""
    step = Step("skills", "Agent skills", install_skills, "install")
    step.execute()
    for line in step.output:
        print(line)
    return 0 if step.status == "complete" else 1


COMMANDS = {  # subcommand: (function, help, positional arguments)
    "trace": (trace_command, "record an agent's turn in MLflow (its hooks run this; `trace prepare` at setup, "
              "`trace check` for doctor)", ("agent", "payload?")),
    "sync": (sync_repository, "copy a repository's last commit to the workspace (the post-commit hook runs this)",
             ("repository",)),
    "restore": (restore_projects, "download the projects your workspace holds and ~/projects lacks", ()),
    "state": (state_command, "save the tabs, uncommitted work and agents' conversations to the workspace, or restore "
              "them (the server runs this: `state save`, `state restore`)", ("action",)),
    "token": (print_token, "print the current Databricks token (answered before any heavy import)", ()),
    "proxy-key": (print_proxy_key, "print an agent's key for the local proxy (Claude Code and Codex call this; "
                  "answered before any heavy import)", ("agent",)),
    "agents": (None, "list the agents, one line each: name, kind (npm or pypi), package, version key "
               "(install/agents.sh reads it; answered before any heavy import)", ()),
    "notify": (None, "tell the open pages that an agent finished its turn or waits for you (its hooks run this; "
               "answered before any heavy import)", ("agent",)),
    "download": (None, "offer files under ~/projects or ~/uploads for download in the open pages (answered before "
                 "any heavy import)", ("file",)),
    "doctor": (doctor, "check the workspace, token, gateway, agents and proxy, and say how to fix problems", ()),
    "skills": (refresh_skills, "fetch the agent skill packs again", ()),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="coda.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=CONFIG.host, help=f"address to bind (default {CONFIG.host})")
    parser.add_argument("--port", type=int, default=CONFIG.port, help=f"port (default {CONFIG.port})")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", help="without one, serve")
    for name, (_, text, arguments) in COMMANDS.items():
        command = commands.add_parser(name, help=text)
        for argument in arguments:
            command.add_argument(argument.rstrip("?"), nargs="?" if argument.endswith("?") else None)
    args = parser.parse_args(argv)
    if args.command:
        function, _, arguments = COMMANDS[args.command]
        sys.exit(function(*(getattr(args, a.rstrip("?")) for a in arguments)))
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
