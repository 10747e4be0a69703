"""A fake Databricks workspace and AI Gateway, speaking real HTTP on 127.0.0.1.

Used by CoDA's tests (and runnable by hand) so that the real databricks-sdk and
the real agent CLIs can be pointed at something that behaves like Databricks:

* the workspace origin (``fw.url``): host metadata, OIDC discovery and the
  OAuth M2M token endpoint, SCIM Me, personal access tokens (create, list,
  delete, with expiry and revocation enforced on every route), the Apps API,
  workspace files and SQL statements, plus the AI Gateway routes that live on
  the workspace origin (``/ai-gateway/...`` and ``/serving-endpoints/...``);
* a second origin (``fw.gateway_url``, its own port) standing in for the
  ``https://<workspace_id>.ai-gateway.cloud.databricks.com`` gateway host
  (``/anthropic``, ``/openai/v1``, ``/gemini``, ``/mlflow/v1``).

Every gateway route accepts only live tokens and answers in the streaming
shape the agent CLIs parse: Anthropic Messages SSE, OpenAI Responses SSE
(ending in ``response.completed``), Chat Completions SSE (``finish_reason`` and
``[DONE]``) and Gemini ``streamGenerateContent?alt=sse``. Replies read
``FAKE-REPLY-<api>: <last line the user typed>``; a last user message that
contains ``USE_TOOL`` is answered with a call to the shell tool the client
offered (running ``fw.tool_command``, or CMD for ``USE_TOOL[CMD]``), and the
turn carrying the tool's result
is answered ``FAKE-REPLY-<api> tool said: <the result's line carrying
FAKE-TOOL, else its last line>``.

Use from pytest::

    fw = FakeWorkspace().start()
    pat = fw.add_token(comment="pasted by the user")
    ...  # point the code under test at fw.url / fw.gateway_url
    assert fw.gateway_requests[-1]["token"] in fw.live_token_values()
    fw.stop()

API (all plain attributes/methods of ``FakeWorkspace``):

* life: ``start()`` (returns self) / ``stop()`` / context manager; ``url``
  (workspace origin), ``gateway_url`` (gateway-host origin), ``port``,
  ``gateway_port``; constructor: ``user_name``, ``display_name``, ``app_name``,
  ``app_creator``, ``client_id``/``client_secret`` (the app's service
  principal for OAuth M2M), ``workspace_id``, ``models``, ``verbose``.
* tokens: ``add_token(comment, lifetime_seconds, can_mint, value)`` (a PAT as
  if pasted by the user), ``find_token(value_or_id)`` -> ``TokenRecord``
  (``value, token_id, principal, kind "pat"|"oauth", comment, creation_time,
  expiry_time, revoked, minted``), ``expire_token(x)``, ``revoke_token(x)``,
  ``live_tokens(kind="pat", comment_contains=None)``, ``live_token_values()``,
  ``revoked_tokens()``, ``minted_tokens()`` (made by token/create).
* knobs: ``inject(route, status=503, count=1, delay=0)`` (5xx, timeouts),
  ``disconnect()`` / ``reconnect()`` (the workspace port refuses connections meanwhile),
  ``max_token_lifetime_seconds`` (admin cap), ``token_quota``,
  ``refuse_within_seconds`` (refuse tokens close to expiry),
  ``invalid_token_status`` (403), ``gateway_auth_failure_status`` (401; Codex
  refreshes its token only on 401), ``disabled_generations`` (a set of
  "host", "ai-gateway", "serving-endpoints": those answer 404),
  ``stream_delay``, ``tool_command``, ``failing_models`` ({model: status},
  e.g. to exercise a fallback model), ``sql_running_polls`` (statements
  answer PENDING, then RUNNING to that many polls: a warehouse starting;
  ``POST .../cancel`` ends them CANCELED),
  ``sql_failure`` ((error_code, message): statements answer state FAILED,
  as a warehouse does on an SQL error), ``serving_endpoints`` (what ``GET
  /api/2.0/serving-endpoints`` lists: by default a pay-per-token chat endpoint
  per model plus an embeddings and a custom model; ``[]`` lists none; build
  others with ``serving_endpoint(name, task, display_name, provider,
  entity_name)``, e.g. an unknown ``task``), ``serving_endpoints_status``
  (e.g. 403: the listing is refused), ``ai_gateway_usage`` (the rows of
  system.ai_gateway.usage CoDA's usage query reads; None: the table is
  missing), ``ai_gateway_usage_denied`` (reading it fails for want of
  privileges), ``chat_stream_usage`` (streamed chat answers end with a usage
  chunk even when the request did not ask for one).
* inspection: ``gateway_requests`` (dicts: time, origin, generation, method,
  path, query (key= redacted), base, api "anthropic"|"responses"|"chat"|
  "gemini"|"models"|"probe"|..., model, token, token_id, token_live, auth_via,
  headers (lower-case keys), body, status), ``gateway_requests_for(api,
  generation)``, ``wait_for_gateway(api, status, since, timeout, token)``,
  ``requests`` (every request: origin, method, path, status, principal),
  ``files`` / ``read_file(path)`` (workspace files), ``sql_statements``
  (request bodies plus statement_id, principal, state; checked as the real
  API checks them: warehouse_id required, at most 256 parameters, 16 MiB of
  text, every ``:name`` marker bound, typed values castable),
  ``public_state()`` (token-free summary, also ``GET /_fake/state``).

Standalone: ``python tests/fake_workspace.py --port 8765 --token-file /tmp/pat``.

Tokens are never written to a log line by this module; they are kept in
memory for the tests to inspect.
"""

import argparse
import base64
import datetime
import email.parser
import email.policy
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MODELS = [
    "databricks-claude-opus-4-7",
    "databricks-claude-opus-4-6",
    "databricks-claude-sonnet-4-5",
    "databricks-claude-haiku-4-5",
    "databricks-gpt-5-5",
    "databricks-gemini-2-5-pro",
    "databricks-gemini-2-5-flash",
]
# What GET /api/2.0/serving-endpoints lists besides a pay-per-token endpoint per model: an
# embeddings model and a custom (MLflow) model, as a real workspace has them; neither is for agents.
OTHER_SERVING_ENDPOINTS = [
    {"name": "databricks-gte-large-en", "task": "llm/v1/embeddings", "display_name": "GTE Large (En)"},
    {"name": "churn-model", "task": None, "entity_name": "main.ml.churn", "entity_version": "3"},
]
# Tool names the fake prefers when a request asks it (via USE_TOOL) to call a
# shell tool, in order; otherwise any tool with a required "command" property.
SHELL_TOOL_NAMES = [
    "Bash", "bash", "shell", "shell_command", "exec_command", "local_shell",
    "run_shell_command", "terminal", "execute_command", "run_command",
]
# The managed MCP servers (Databricks SQL, Genie, UC functions, vector search) live under this
# path; the fake offers each one tool: Databricks SQL's is FAKE_MCP_TOOL, which a prompt asking for
# USE_MCP makes the fake gateway call (its result quotes FAKE_MCP_RESULT).
MCP_ROOT = "/api/2.0/mcp"
FAKE_MCP_TOOL = "execute_sql"
FAKE_MCP_RESULT = "FAKE-TOOL-MCP-RESULT"
MCP_PROTOCOL = "2025-06-18"
# Gateway-host prefixes (the workspace-id gateway origin).
GATEWAY_HOST_PREFIXES = ["/anthropic", "/openai/v1", "/gemini", "/mlflow/v1"]
# Base paths answering a plain GET/HEAD (reachability probes); other unknown
# paths under a gateway are 404, as clients' own probes (Hermes asks for
# /props, /api/tags, /version...) must not look like a llama.cpp or Ollama server.
KNOWN_BASES = set(GATEWAY_HOST_PREFIXES) | {
    "/ai-gateway/anthropic", "/ai-gateway/codex/v1", "/ai-gateway/openai/v1",
    "/ai-gateway/gemini", "/ai-gateway/mlflow/v1",
    "/serving-endpoints", "/serving-endpoints/anthropic", "/serving-endpoints/openai/v1",
    "/serving-endpoints/google",
}
# The Statement Execution API's limits: query text, and named parameters (its
# answer past that: "Parameterized query has too many parameters: N parameters
# were given but the limit is 256.").
SQL_MAX_STATEMENT_BYTES = 16 * 1024 * 1024
SQL_MAX_PARAMETERS = 256
# A parameter marker (:name) outside string literals, quoted identifiers and
# comments; `::` is a cast, not a marker.
SQL_SKIPPED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`]|``)*`|--[^\n]*|/\*.*?\*/", re.S)
SQL_MARKER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class ApiError(Exception):
    """An error answered as Databricks REST does: {"error_code", "message"}."""

    def __init__(self, status, error_code, message):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def serving_endpoint(name, task="llm/v1/chat", display_name=None, provider=None, entity_name=None,
                     entity_version=None):
    """One endpoint as GET /api/2.0/serving-endpoints lists it: a pay-per-token foundation model
    (the default), an external model (``provider``, e.g. "anthropic"), or a custom model
    (``entity_name``). ``task`` may be anything, e.g. an unknown one."""
    entity = {"name": name}
    if entity_name:
        entity.update(entity_name=entity_name, entity_version=entity_version or "1")
        kind = "CUSTOM_MODEL"
    elif provider:
        entity["external_model"] = {"provider": provider, "name": display_name or name, "task": task}
        kind = "EXTERNAL_MODEL"
    else:
        entity["foundation_model"] = {"name": name, "display_name": display_name or name,
                                      "docs": "https://docs.databricks.com/machine-learning/foundation-model-apis",
                                      "description": f"{display_name or name}, served by Databricks."}
        kind = "FOUNDATION_MODEL_API"
    endpoint = {"name": name, "id": secrets.token_hex(16), "creator": "", "creation_timestamp": 1735689600000,
                "last_updated_timestamp": 1735689600000, "endpoint_type": kind,
                "state": {"ready": "READY", "config_update": "NOT_UPDATING"},
                "config": {"served_entities": [entity]}, "permission_level": "CAN_QUERY", "route_optimized": False}
    if task is not None:
        endpoint["task"] = task
    return endpoint


def default_serving_endpoints(models):
    """A realistic listing: each model's pay-per-token chat endpoint, then OTHER_SERVING_ENDPOINTS."""
    return [serving_endpoint(m) for m in models] + [serving_endpoint(**e) for e in OTHER_SERVING_ENDPOINTS]


def _now_ms():
    return int(time.time() * 1000)


class TokenRecord:
    """One access token the fake knows: a PAT or an OAuth access token."""

    def __init__(self, value, principal, kind, comment="", lifetime_seconds=None,
                 can_mint=True):
        self.value = value
        self.token_id = secrets.token_hex(32)
        self.principal = principal  # a user name or a service principal client id
        self.kind = kind  # "pat" or "oauth"
        self.comment = comment
        self.creation_time = _now_ms()
        self.expiry_time = (-1 if not lifetime_seconds
                            else self.creation_time + int(lifetime_seconds) * 1000)
        self.revoked = False
        self.revoked_at = None
        self.can_mint = can_mint
        self.minted = False  # made through POST /api/2.0/token/create

    def expired(self, margin_seconds=0.0):
        if self.expiry_time < 0:
            return False
        return _now_ms() + margin_seconds * 1000 >= self.expiry_time

    def live(self, margin_seconds=0.0):
        return not self.revoked and not self.expired(margin_seconds)

    def info(self):
        return {
            "token_id": self.token_id,
            "creation_time": self.creation_time,
            "expiry_time": self.expiry_time,
            "comment": self.comment,
        }

    def __repr__(self):  # never the value
        state = "revoked" if self.revoked else ("expired" if self.expired() else "live")
        return f"<TokenRecord {self.kind} {self.token_id[:8]} {self.principal} {state}>"


class FakeWorkspace:
    """A fake workspace + gateway. ``start()`` binds two free ports on 127.0.0.1."""

    def __init__(self, *, port=0, gateway_port=0,
                 user_name="alice@example.com", display_name="Alice Example",
                 app_name="coda", app_creator=None,
                 client_id="fake-sp-client-id", client_secret="fake-sp-secret",
                 workspace_id="1234567890123456", models=None, verbose=False):
        self.host = "127.0.0.1"  # loopback only, always
        self._want_port = port
        self._want_gateway_port = gateway_port
        self.user_name = user_name
        self.display_name = display_name
        self.user_id = str(10 ** 15 + secrets.randbelow(10 ** 15))
        self.app_name = app_name
        self.app_creator = app_creator or user_name
        self.client_id = client_id
        self.client_secret = client_secret
        self.workspace_id = workspace_id
        self.models = list(models or DEFAULT_MODELS)
        self.verbose = verbose

        # Knobs (plain attributes; set them from a test).
        self.invalid_token_status = 403     # workspace API answer to a dead token
        self.gateway_auth_failure_status = 401  # gateway answer to a dead token
        self.refuse_within_seconds = 0.0    # treat tokens this close to expiry as dead
        self.max_token_lifetime_seconds = None  # admin cap on token/create
        self.token_quota = 600              # live PATs per principal
        self.oauth_token_lifetime_seconds = 3600
        self.stream_delay = 0.0             # seconds between SSE events
        self.tool_command = "echo FAKE-TOOL-OUTPUT"
        self.disabled_generations = set()   # of "host", "ai-gateway", "serving-endpoints"
        self.failing_models = {}            # model name -> HTTP status its calls get
        self.sql_running_polls = 0          # polls a statement answers PENDING/RUNNING before SUCCEEDED
        self.sql_failure = None             # (error_code, message): statements end FAILED with it
        self.serving_endpoints = default_serving_endpoints(self.models)  # what the listing answers; [] = none
        self.serving_endpoints_status = None  # e.g. 403: the listing is refused (PERMISSION_DENIED)
        self.mcp_answer = "auto"            # MCP POST answers: "json", "sse", or "auto" (SSE for tools/call)
        self.ai_gateway_usage = []          # rows of system.ai_gateway.usage (dicts); None: the table is missing
        self.ai_gateway_usage_denied = False  # reading it ends FAILED with INSUFFICIENT_PERMISSIONS
        self.chat_stream_usage = False      # streamed chat answers end with a usage chunk even unasked

        # Inspection (read from a test; guarded by self.lock while mutated).
        self.lock = threading.RLock()
        self.tokens = []            # TokenRecord, in creation order
        self.gateway_requests = []  # dicts, see _record_gateway
        self.requests = []          # every request: origin, method, path, status, principal
        self.files = {"/": {"object_type": "DIRECTORY"}}
        self.sql_statements = []
        self.mcp_requests = []      # dicts, see _mcp: one per HTTP request to MCP_ROOT
        self.mcp_sessions = {}      # Mcp-Session-Id -> server path
        self._faults = []
        self._servers = []
        self._threads = []
        self._stopping = threading.Event()
        self.url = None
        self.gateway_url = None
        self._mkdirs(f"/Users/{user_name}")

    # ------------------------------------------------------------------ life
    def start(self):
        ws = _Server((self.host, self._want_port), _Handler, self, "workspace")
        gw = _Server((self.host, self._want_gateway_port), _Handler, self, "gateway")
        self._servers = [ws, gw]
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                 name=f"fake-{srv.origin}", daemon=True)
            t.start()
            self._threads.append(t)
        self.url = f"http://{self.host}:{ws.server_address[1]}"
        self.gateway_url = f"http://{self.host}:{gw.server_address[1]}"
        return self

    def stop(self):
        self._stopping.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def disconnect(self):
        """Close the workspace origin's port: clients get "connection refused" (an outage)
        until ``reconnect()``, which listens on the same port again with every token kept."""
        ws = self._servers[0]
        ws.shutdown()
        ws.server_close()

    def reconnect(self):
        ws = _Server((self.host, self.port), _Handler, self, "workspace")
        self._servers[0] = ws
        t = threading.Thread(target=ws.serve_forever, kwargs={"poll_interval": 0.1},
                             name="fake-workspace", daemon=True)
        t.start()
        self._threads.append(t)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1])

    @property
    def gateway_port(self):
        return int(self.gateway_url.rsplit(":", 1)[1])

    # ---------------------------------------------------------------- tokens
    def add_token(self, comment="created in the UI", lifetime_seconds=None, principal=None,
                  can_mint=True, value=None):
        """Register a PAT as if the user had made it in the workspace UI; returns its value.

        ``can_mint=False`` makes token/create with it fail with 403 (a token
        lacking the scope to mint)."""
        rec = TokenRecord(value or ("dapi" + secrets.token_hex(16)), principal or self.user_name,
                          "pat", comment, lifetime_seconds, can_mint)
        with self.lock:
            self.tokens.append(rec)
        return rec.value

    def find_token(self, value_or_id):
        with self.lock:
            for rec in self.tokens:
                if value_or_id in (rec.value, rec.token_id):
                    return rec
        return None

    def expire_token(self, value_or_id):
        """Make a token expire now."""
        rec = self._need_token(value_or_id)
        with self.lock:
            rec.expiry_time = _now_ms() - 1

    def revoke_token(self, value_or_id):
        rec = self._need_token(value_or_id)
        with self.lock:
            rec.revoked, rec.revoked_at = True, time.time()

    def _need_token(self, value_or_id):
        rec = self.find_token(value_or_id)
        if rec is None:
            raise KeyError("no such token")
        return rec

    def live_tokens(self, kind="pat", comment_contains=None):
        with self.lock:
            return [t for t in self.tokens
                    if t.live() and (kind is None or t.kind == kind)
                    and (comment_contains is None or comment_contains in t.comment)]

    def live_token_values(self, kind=None):
        return {t.value for t in self.live_tokens(kind=kind)}

    def revoked_tokens(self, kind="pat"):
        with self.lock:
            return [t for t in self.tokens if t.revoked and (kind is None or t.kind == kind)]

    def minted_tokens(self):
        """Tokens made through POST /api/2.0/token/create, in order."""
        with self.lock:
            return [t for t in self.tokens if t.kind == "pat" and t.minted]

    # ---------------------------------------------------------------- faults
    def inject(self, route, status=503, count=1, delay=0.0, message="injected failure"):
        """The next ``count`` requests to ``route`` sleep ``delay`` seconds and then
        answer ``status`` (``status=None``: answer normally after the delay, which
        makes a client with a shorter timeout time out).

        Routes: "well-known", "oidc-discovery", "oidc-token", "scim-me",
        "token/create", "token/list", "token/delete", "apps/get",
        "workspace/<op>", "sql/statements", "gateway" (any gateway request)."""
        with self.lock:
            self._faults.append({"route": route, "status": status, "count": int(count),
                                 "delay": float(delay), "message": message})

    def clear_faults(self):
        with self.lock:
            self._faults.clear()

    def _take_fault(self, route):
        with self.lock:
            for f in self._faults:
                if f["route"] == route and f["count"] > 0:
                    f["count"] -= 1
                    return dict(f)
        return None

    # ----------------------------------------------------------- inspection
    def gateway_requests_for(self, api=None, generation=None):
        with self.lock:
            return [r for r in self.gateway_requests
                    if (api is None or r["api"] == api)
                    and (generation is None or r["generation"] == generation)]

    def wait_for_gateway(self, api=None, status=None, since=0, timeout=30.0, token=None):
        """Wait (bounded) for a gateway request matching api/status/token among
        ``gateway_requests[since:]``; returns it, or None after ``timeout`` s.
        Use ``since=len(fw.gateway_requests)`` taken before the action."""
        deadline = time.time() + timeout
        while True:
            with self.lock:
                for r in self.gateway_requests[since:]:
                    if ((api is None or r["api"] == api)
                            and (status is None or r["status"] == status)
                            and (token is None or r["token"] == token)):
                        return r
            if time.time() >= deadline or self._stopping.is_set():
                return None
            time.sleep(0.05)

    def wait_for_mcp(self, rpc=None, status=None, since=0, timeout=30.0):
        """wait_for_gateway for ``mcp_requests[since:]``, matching the JSON-RPC method."""
        deadline = time.time() + timeout
        while True:
            with self.lock:
                for r in self.mcp_requests[since:]:
                    if (rpc is None or r["rpc"] == rpc) and (status is None or r["status"] == status):
                        return r
            if time.time() >= deadline or self._stopping.is_set():
                return None
            time.sleep(0.05)

    def clear_requests(self):
        with self.lock:
            self.gateway_requests.clear()
            self.requests.clear()

    def public_state(self):
        """A JSON-safe summary without token values (served at /_fake/state)."""
        with self.lock:
            return {
                "url": self.url,
                "gateway_url": self.gateway_url,
                "tokens": [dict(t.info(), kind=t.kind, principal=t.principal,
                                live=t.live(), revoked=t.revoked) for t in self.tokens],
                "gateway_requests": [
                    {k: v for k, v in r.items() if k not in ("token", "headers", "body")}
                    | {"headers": _redact_headers(r["headers"])}
                    for r in self.gateway_requests],
                "requests": list(self.requests),
            }

    # ------------------------------------------------------------- identity
    def principal_for(self, token_value):
        """The TokenRecord for a live token, or raise ApiError."""
        rec = self.find_token(token_value) if token_value else None
        if rec is None or not rec.live(self.refuse_within_seconds):
            raise ApiError(self.invalid_token_status, "PERMISSION_DENIED"
                           if self.invalid_token_status == 403 else "UNAUTHENTICATED",
                           "Invalid access token.")
        return rec

    def _me(self, rec):
        if rec.principal == self.client_id:
            return {
                "id": "7" + self.user_id[1:],
                "userName": self.client_id,
                "displayName": f"app-{self.app_name}",
                "active": True,
                "emails": [],
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            }
        return {
            "id": self.user_id,
            "userName": rec.principal,
            "displayName": self.display_name if rec.principal == self.user_name else rec.principal,
            "active": True,
            "name": {"givenName": self.display_name.split(" ")[0],
                     "familyName": self.display_name.split(" ")[-1]},
            "emails": [{"value": rec.principal, "type": "work", "primary": True}],
            "groups": [{"display": "users", "value": "1"}],
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        }

    # ------------------------------------------------------ workspace files
    def _mkdirs(self, path):
        path = _norm_ws_path(path)
        parts = [p for p in path.split("/") if p]
        cur = ""
        for p in parts:
            cur += "/" + p
            obj = self.files.get(cur)
            if obj is None:
                self.files[cur] = {"object_type": "DIRECTORY"}
            elif obj["object_type"] != "DIRECTORY":
                raise ApiError(400, "RESOURCE_ALREADY_EXISTS",
                               f"{cur} already exists and is not a directory")

    def _status(self, path):
        obj = self.files[path]
        out = {"path": path, "object_type": obj["object_type"],
               "object_id": abs(hash(path)) % (10 ** 15)}
        if obj["object_type"] != "DIRECTORY":
            out["size"] = len(obj.get("content", b""))
            out["modified_at"] = obj.get("modified_at", 0)
            out["created_at"] = obj.get("created_at", 0)
        if obj.get("language"):
            out["language"] = obj["language"]
        return out

    def read_file(self, path):
        """Content (bytes) of a workspace object imported into the fake."""
        with self.lock:
            return self.files[_norm_ws_path(path)]["content"]


def _norm_ws_path(path):
    if not isinstance(path, str) or not path.startswith("/"):
        raise ApiError(400, "INVALID_PARAMETER_VALUE", "Path must be absolute.")
    path = "/" + "/".join(p for p in path.split("/") if p)
    if "/../" in path + "/" or "/./" in path + "/":
        raise ApiError(400, "INVALID_PARAMETER_VALUE", "Path must be normalised.")
    return path


def _redact_headers(headers):
    secret = {"authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie"}
    return {k: ("<redacted>" if k in secret else v) for k, v in headers.items()}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, fake, origin):
        self.fake = fake
        self.origin = origin
        super().__init__(addr, handler)


def _sql_parameter_error(statement, params):
    """The warehouse's error for unbound markers or values its type cannot cast, else None."""
    names = {p["name"] for p in params}
    unbound = sorted(set(SQL_MARKER.findall(SQL_SKIPPED.sub(" ", statement))) - names)
    if unbound:
        return {"error_code": "BAD_REQUEST",
                "message": f"[UNBOUND_SQL_PARAMETER] Found the unbound parameter: {unbound[0]}."}
    for p in params:
        kind, value = (p.get("type") or "STRING").upper(), p.get("value")
        if value is None or _castable(kind, value):
            continue
        return {"error_code": "BAD_REQUEST", "message": f"[CAST_INVALID_INPUT] The value '{str(value)[:40]}' of the "
                                                        f"type \"STRING\" cannot be cast to \"{kind}\"."}
    return None


def _castable(kind, value):
    try:
        if kind == "TIMESTAMP":
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif kind == "DATE":
            datetime.date.fromisoformat(value)
        elif kind in ("INT", "BIGINT", "SMALLINT", "TINYINT"):
            int(value)
        elif kind in ("DOUBLE", "FLOAT"):
            float(value)
        elif kind == "BOOLEAN":
            return value.lower() in ("true", "false")
        return isinstance(value, str)
    except (ValueError, AttributeError):
        return False


def _sql_answer(sid, state, error, result=None):
    status = {"state": state}
    if error:
        status["error"] = error
    answer = {"statement_id": sid, "status": status}
    if state == "SUCCEEDED":
        columns, rows = result or ([], [])
        answer.update(manifest={"format": "JSON_ARRAY", "total_row_count": len(rows),
                                "schema": {"column_count": len(columns), "columns": [
                                    {"name": name, "type_name": kind, "position": i}
                                    for i, (name, kind) in enumerate(columns)]}},
                      result={"row_count": len(rows), "data_array": rows})
    return answer


AI_GATEWAY_USAGE_COLUMNS = [("day", "STRING"), ("model", "STRING"), ("requests", "LONG"),
                            ("input_tokens", "LONG"), ("output_tokens", "LONG")]


def _ai_gateway_usage(fake, params):
    """CoDA's query of system.ai_gateway.usage: the rows of :requester since :since, per day and
    endpoint, as (error, (columns, rows)); values come as strings, as the JSON_ARRAY format has them.
    Row dicts: event_time (ISO, UTC), endpoint_name, requester, input_tokens, output_tokens."""
    if fake.ai_gateway_usage is None:
        return {"error_code": "BAD_REQUEST", "message": "[TABLE_OR_VIEW_NOT_FOUND] The table or view "
                "`system`.`ai_gateway`.`usage` cannot be found."}, None
    if fake.ai_gateway_usage_denied:
        return {"error_code": "PERMISSION_DENIED", "message": "[INSUFFICIENT_PERMISSIONS] Insufficient "
                "privileges: User does not have USE SCHEMA on Schema 'system.ai_gateway'."}, None
    values = {p["name"]: p.get("value") for p in params}
    since = datetime.datetime.fromisoformat(values["since"].replace("Z", "+00:00"))
    groups = {}
    for row in fake.ai_gateway_usage:
        when = datetime.datetime.fromisoformat(row["event_time"].replace("Z", "+00:00"))
        if row["requester"] != values["requester"] or when < since:
            continue
        group = groups.setdefault((when.date().isoformat(), row["endpoint_name"]), [0, 0, 0])
        group[0] += 1
        group[1] += row.get("input_tokens") or 0
        group[2] += row.get("output_tokens") or 0
    rows = [[day, model, *map(str, counts)] for (day, model), counts in sorted(groups.items())]
    return None, (AI_GATEWAY_USAGE_COLUMNS, rows)


# --------------------------------------------------------------------------
# Reply synthesis shared by the four APIs.
# --------------------------------------------------------------------------

def _text_of(content):
    """Plain text of a message content in any of the four APIs' shapes."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    out = []
    for part in content:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, dict):
            for key in ("text", "input_text", "output_text"):
                if isinstance(part.get(key), str):
                    out.append(part[key])
                    break
            else:
                if isinstance(part.get("content"), (str, list)):
                    out.append(_text_of(part["content"]))
                elif isinstance(part.get("output"), str):
                    out.append(part["output"])
    return "\n".join(out)


def _last_line(text):
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    line = re.sub(r"[^A-Za-z0-9 _.,:;!?=+/#@()-]", "", line)
    return line[:80]


def _result_line(text):
    """The line of a tool result to quote: the first one carrying the FAKE-TOOL
    marker (clients wrap output in their own metadata, e.g. Codex's "Chunk ID",
    "Wall time", "Output:"), else the last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    marked = [ln for ln in lines if "FAKE-TOOL" in ln]
    line = marked[0] if marked else (lines[-1] if lines else "")
    return re.sub(r"[^A-Za-z0-9 _.,:;!?=+/#@()-]", "", line)[:80]


def _sample_from_schema(schema, depth=0):
    """A small value that satisfies a JSON schema (for structured-output calls)."""
    if not isinstance(schema, dict) or depth > 6:
        return None
    typ = schema.get("type")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "string")
    typ = (typ or "").lower() if isinstance(typ, str) else typ
    if "enum" in schema and schema["enum"]:
        return "user" if "user" in schema["enum"] else schema["enum"][0]
    if typ == "object" or "properties" in schema:
        return {k: _sample_from_schema(v, depth + 1)
                for k, v in (schema.get("properties") or {}).items()}
    if typ == "array":
        return []
    if typ == "boolean":
        return False
    if typ in ("integer", "number"):
        return 0
    return "FAKE"


def _shell_args(schema, command):
    """Arguments for a shell-like tool from its JSON schema."""
    props = (schema or {}).get("properties") or {}
    required = (schema or {}).get("required") or []
    args = {}
    for name in ("command", "cmd"):
        if name in props:
            typ = props[name].get("type")
            args[name] = ["bash", "-lc", command] if typ == "array" else command
            break
    else:
        args["command"] = command
    for name in required:
        if name in args:
            continue
        spec = props.get(name) or {}
        if name in ("description", "justification", "reason"):
            args[name] = "fake tool call"
        else:
            args[name] = _sample_from_schema(spec)
    return args


def _pick_shell_tool(tools):
    """tools: list of (name, schema). Returns (name, schema) or None."""
    by_name = {name: schema for name, schema in tools}
    for name in SHELL_TOOL_NAMES:
        if name in by_name:
            return name, by_name[name]
    for name, schema in tools:
        if "command" in ((schema or {}).get("required") or []):
            return name, schema
    return None


def _pick_mcp_tool(tools):
    """The fake Databricks SQL server's tool, however the agent prefixed its name
    (mcp__databricks-sql__execute_sql, databricks-sql_execute_sql, ...)."""
    return next(((name, schema) for name, schema in tools
                 if isinstance(name, str) and name.endswith(FAKE_MCP_TOOL)), None)


class Turn:
    """What the last message of a request asks for."""

    def __init__(self, user_text="", tool_result=None, tools=(), schema=None, deferred=(), history=""):
        self.deferred = list(deferred)  # tools named in the request but not loaded (Claude Code's ToolSearch)
        self.history = history          # the request's conversation as JSON text
        self.user_text = user_text
        self.tool_result = tool_result  # text of the tool result ending the request, or None
        self.tools = list(tools)        # (name, schema)
        self.schema = schema            # structured output requested

    def _mcp_step(self):
        """The next call towards the MCP tool: the tool itself when offered and it has not
        answered yet; when it is only named as deferred, a ToolSearch for it (Claude Code then
        offers it). None once it has answered, or after a tool result that led nowhere."""
        if FAKE_MCP_RESULT in (self.tool_result or "") or FAKE_MCP_RESULT in self.history:
            return None
        picked = _pick_mcp_tool(self.tools)
        if picked and f'"name": "{picked[0].rpartition("/")[2]}"' in self.history:
            return None  # called once already (and it failed): no second try
        if picked:
            return "tool", picked[0], {**(_sample_from_schema(picked[1]) or {}), "query": "SELECT 1 AS fake"}
        named = [name for name in self.deferred if name.endswith(FAKE_MCP_TOOL)]
        if self.tool_result is None and named and any(name == "ToolSearch" for name, _ in self.tools):
            return "tool", "ToolSearch", {"query": f"select:{named[0]}"}
        return None if self.tool_result is not None else ("text", "FAKE-REPLY: no MCP tool was offered")

    def decide(self, api, command):
        """("text", str) or ("tool", name, args)."""
        if self.schema is not None:
            return "text", json.dumps(_sample_from_schema(self.schema))
        asked = "USE_MCP" in self.user_text or (self.tool_result is not None and "USE_MCP" in self.history)
        mcp = self._mcp_step() if asked else None
        if mcp:
            return mcp
        if self.tool_result is not None:
            return "text", f"FAKE-REPLY-{api} tool said: {_result_line(self.tool_result)}"
        if "USE_TOOL" in self.user_text:
            picked = _pick_shell_tool(self.tools)
            asked = re.search(r"USE_TOOL\[([^\]\n]+)\]", self.user_text)
            if picked:
                return "tool", picked[0], _shell_args(picked[1], asked.group(1) if asked
                                                      else command)
            return "text", f"FAKE-REPLY-{api}: no shell tool was offered"
        return "text", f"FAKE-REPLY-{api}: {_last_line(self.user_text)}"


def _turn_anthropic(body):
    msgs = body.get("messages") or []
    last = msgs[-1] if msgs else {}
    content = last.get("content")
    tool_result = None
    if isinstance(content, list):
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if results:
            tool_result = _text_of(results[-1].get("content"))
    texts = [b for b in (content if isinstance(content, list) else [content])
             if isinstance(b, str) or (isinstance(b, dict) and b.get("type") == "text")]
    user_text = _text_of(texts[-1]) if texts else ""
    tools = [(t["name"], t.get("input_schema")) for t in body.get("tools") or []
             if isinstance(t, dict) and "name" in t and "input_schema" in t]
    fmt = (body.get("output_format") or {})
    schema = fmt.get("schema") if fmt.get("type") == "json_schema" else None
    history = json.dumps(msgs)
    return Turn(user_text, tool_result, tools, schema, re.findall(r"mcp__[A-Za-z0-9_-]+", history), history)


def _turn_responses(body):
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    items = items or []
    last = items[-1] if items else {}
    tool_result = None
    if last.get("type") in ("function_call_output", "custom_tool_call_output",
                            "local_shell_call_output"):
        out = last.get("output")
        tool_result = out if isinstance(out, str) else _text_of(out)
        if isinstance(out, str):
            try:  # older Codex wraps the output as JSON {"output": ..., "metadata": ...}
                parsed = json.loads(out)
                if isinstance(parsed, dict) and isinstance(parsed.get("output"), str):
                    tool_result = parsed["output"]
            except ValueError:
                pass
    user_msgs = [i for i in items if i.get("role") == "user"]
    user_text = _text_of(user_msgs[-1].get("content")) if user_msgs else ""
    tools = []
    for t in body.get("tools") or []:
        if t.get("type") == "function" and "name" in t:
            tools.append((t["name"], t.get("parameters")))
        elif t.get("type") == "namespace":  # Codex groups each MCP server's tools so: "namespace/name"
            tools += [(f"{t.get('name')}/{inner['name']}", inner.get("parameters")) for inner in t.get("tools") or []
                      if isinstance(inner, dict) and inner.get("type") == "function" and "name" in inner]
    fmt = ((body.get("text") or {}).get("format") or {})
    schema = fmt.get("schema") if fmt.get("type") == "json_schema" else None
    return Turn(user_text, tool_result, tools, schema, history=json.dumps(items))


def _turn_chat(body):
    msgs = body.get("messages") or []
    last = msgs[-1] if msgs else {}
    tool_result = _text_of(last.get("content")) if last.get("role") == "tool" else None
    users = [m for m in msgs if m.get("role") == "user"]
    user_text = _text_of(users[-1].get("content")) if users else ""
    tools = []
    for t in body.get("tools") or []:
        fn = t.get("function") or {}
        if "name" in fn:
            tools.append((fn["name"], fn.get("parameters")))
    fmt = body.get("response_format") or {}
    schema = ((fmt.get("json_schema") or {}).get("schema")
              if fmt.get("type") == "json_schema" else None)
    return Turn(user_text, tool_result, tools, schema, history=json.dumps(msgs))


def _turn_gemini(body):
    contents = body.get("contents") or []
    last = contents[-1] if contents else {}
    parts = last.get("parts") or []
    tool_result = None
    responses = [p["functionResponse"] for p in parts
                 if isinstance(p, dict) and "functionResponse" in p]
    if responses:
        resp = responses[-1].get("response") or {}
        tool_result = resp.get("output") if isinstance(resp.get("output"), str) else json.dumps(resp)
    texts = [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]
    user_text = texts[-1] if texts else ""
    tools = []
    for t in body.get("tools") or []:
        for fd in t.get("functionDeclarations") or []:
            tools.append((fd.get("name"), fd.get("parametersJsonSchema") or fd.get("parameters")))
    cfg = body.get("generationConfig") or {}
    schema = cfg.get("responseJsonSchema") or cfg.get("responseSchema")
    return Turn(user_text, tool_result, tools, schema, history=json.dumps(contents))


# --------------------------------------------------------------------------
# The HTTP handler.
# --------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeDatabricks/1.0"

    # -- plumbing ----------------------------------------------------------
    @property
    def fake(self):
        return self.server.fake

    def log_message(self, fmt, *args):  # access log without query strings
        if self.fake.verbose:
            sys.stderr.write(f"[fake {self.server.origin}] {self.command} "
                             f"{self.path.split('?', 1)[0]} {fmt % args}\n")

    def log_request(self, code="-", size="-"):
        self.log_message("%s", getattr(code, "value", code))

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            for _ in range(1_000_000):  # bounded: at most a million chunks
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise ApiError(413, "REQUEST_LIMIT_EXCEEDED", "Body too large.")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ApiError(413, "REQUEST_LIMIT_EXCEEDED", "Body too large.")
        return self.rfile.read(length) if length else b""

    def _json_body(self):
        if not self.raw_body:
            return {}
        try:
            body = json.loads(self.raw_body)
        except ValueError:
            raise ApiError(400, "MALFORMED_REQUEST", "Request body is not JSON.")
        if not isinstance(body, dict):
            raise ApiError(400, "MALFORMED_REQUEST", "Request body must be a JSON object.")
        return body

    def _send(self, status, body=b"", content_type="application/json", headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self._set_status(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _set_status(self, status):
        """Record the answer's status before any byte of it leaves, so a client
        that has its answer always finds the request recorded."""
        self._status = status
        with self.fake.lock:
            for entry in (self._entry, self._gateway_entry):
                if entry is not None:
                    entry["status"] = status
                    entry["principal"] = entry.get("principal") or self.principal

    def _start_stream(self, content_type="text/event-stream"):
        self._set_status(200)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data):
        if isinstance(data, str):
            data = data.encode()
        if not data:
            return
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
        if self.fake.stream_delay:
            self.fake._stopping.wait(self.fake.stream_delay)

    def _end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _bearer(self):
        auth = self.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip(), "authorization"
        for h in ("x-api-key", "x-goog-api-key", "api-key"):
            if self.headers.get(h):
                return self.headers[h].strip(), h
        key = urllib.parse.parse_qs(self.query).get("key")
        if key:
            return key[0], "query"
        return None, None

    def _dispatch(self):
        self._status = None
        self._gateway_entry = None
        self.parsed = urllib.parse.urlsplit(self.path)
        self.route_path = urllib.parse.unquote(self.parsed.path)
        self.query = self.parsed.query
        self.principal = None
        self._entry = {"origin": self.server.origin, "method": self.command,
                       "path": self.route_path, "status": None, "principal": None,
                       "time": time.time()}
        with self.fake.lock:
            self.fake.requests.append(self._entry)
        try:
            self.raw_body = self._read_body()
            if self.route_path.startswith("/_fake/"):
                self._fake_control()
            elif self.server.origin == "gateway":
                self._gateway("host")
            elif self.route_path.startswith("/ai-gateway/"):
                self._gateway("ai-gateway")
            elif self.route_path == "/serving-endpoints" or self.route_path.startswith("/serving-endpoints/"):
                self._gateway("serving-endpoints")
            else:
                self._workspace()
        except ApiError as e:
            self._send(e.status, {"error_code": e.error_code, "message": e.message})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in the fake: say so, loudly
            sys.stderr.write(f"[fake] internal error on {self.command} {self.route_path}: {e!r}\n")
            if self._status is None:
                self._send(500, {"error_code": "INTERNAL_ERROR", "message": repr(e)})
            self.close_connection = True

    def _apply_fault(self, route):
        fault = self.fake._take_fault(route)
        if fault is None:
            return
        if fault["delay"]:
            self.fake._stopping.wait(fault["delay"])
        if fault["status"] is not None:
            raise ApiError(fault["status"], "TEMPORARILY_UNAVAILABLE"
                           if fault["status"] >= 500 else "INJECTED", fault["message"])

    # -- test control ------------------------------------------------------
    def _fake_control(self):
        if self.route_path == "/_fake/state" and self.command == "GET":
            return self._send(200, self.fake.public_state())
        raise ApiError(404, "ENDPOINT_NOT_FOUND", "No such fake control endpoint.")

    # -- workspace REST ----------------------------------------------------
    def _auth(self):
        token, _ = self._bearer()
        if not token:
            raise ApiError(401, "UNAUTHENTICATED",
                           "Credential was not sent or was of an unsupported type for this API.")
        rec = self.fake.principal_for(token)
        self.principal = rec.principal
        return rec

    def _workspace(self):
        fake, path, method = self.fake, self.route_path, self.command
        qs = urllib.parse.parse_qs(self.query)

        if path == "/.well-known/databricks-config" and method == "GET":
            self._apply_fault("well-known")
            return self._send(200, {"oidc_endpoint": f"{fake.url}/oidc",
                                    "workspace_id": fake.workspace_id, "cloud": "aws"})
        if path == "/oidc/.well-known/oauth-authorization-server" and method == "GET":
            self._apply_fault("oidc-discovery")
            return self._send(200, {
                "issuer": f"{fake.url}/oidc",
                "authorization_endpoint": f"{fake.url}/oidc/v1/authorize",
                "token_endpoint": f"{fake.url}/oidc/v1/token",
                "grant_types_supported": ["client_credentials", "authorization_code",
                                          "refresh_token"],
            })
        if path == "/oidc/v1/token" and method == "POST":
            self._apply_fault("oidc-token")
            return self._oidc_token()
        if path == "/api/2.0/preview/scim/v2/Me" and method == "GET":
            rec = self._auth()
            self._apply_fault("scim-me")
            return self._send(200, fake._me(rec))
        if path == "/api/2.0/token/create" and method == "POST":
            rec = self._auth()
            self._apply_fault("token/create")
            return self._token_create(rec)
        if path == "/api/2.0/token/list" and method == "GET":
            rec = self._auth()
            self._apply_fault("token/list")
            with fake.lock:
                infos = [t.info() for t in fake.tokens
                         if t.kind == "pat" and t.principal == rec.principal and t.live()]
            return self._send(200, {"token_infos": infos} if infos else {})
        if path == "/api/2.0/token/delete" and method == "POST":
            rec = self._auth()
            self._apply_fault("token/delete")
            body = self._json_body()
            token_id = body.get("token_id")
            if not isinstance(token_id, str):
                raise ApiError(400, "INVALID_PARAMETER_VALUE", "token_id is required.")
            with fake.lock:
                target = next((t for t in fake.tokens if t.token_id == token_id and t.kind == "pat"
                               and t.principal == rec.principal and not t.revoked), None)
                if target is None:
                    raise ApiError(404, "RESOURCE_DOES_NOT_EXIST",
                                   f"Token with id {token_id} does not exist.")
                target.revoked, target.revoked_at = True, time.time()
            return self._send(200, {})
        m = re.fullmatch(r"/api/2\.0/apps/([^/]+)", path)
        if m and method == "GET":
            self._auth()
            self._apply_fault("apps/get")
            if m.group(1) != fake.app_name:
                raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"App {m.group(1)} does not exist.")
            return self._send(200, {
                "name": fake.app_name,
                "creator": fake.app_creator,
                "service_principal_client_id": fake.client_id,
                "service_principal_name": f"app-{fake.app_name}",
                "url": f"https://{fake.app_name}-{fake.workspace_id}.aws.databricksapps.com",
                "app_status": {"state": "RUNNING", "message": "App is running"},
                "compute_status": {"state": "ACTIVE", "message": "App compute is active."},
                "create_time": "2026-01-01T00:00:00Z",
            })
        m = re.fullmatch(r"/api/2\.0/workspace/(import|export|mkdirs|delete|get-status|list)", path)
        if m:
            self._auth()
            self._apply_fault("workspace/" + m.group(1))
            return self._workspace_files(m.group(1), method, qs)
        if path == "/api/2.0/serving-endpoints" and method == "GET":
            self._auth()
            self._apply_fault("serving-endpoints")
            return self._serving_endpoints()
        if path == "/api/2.0/sql/statements" and method == "POST":
            rec = self._auth()
            self._apply_fault("sql/statements")
            return self._sql_execute(rec, self._json_body())
        m = re.fullmatch(r"/api/2\.0/sql/statements/([^/]+)", path)
        if m and method == "GET":
            self._auth()
            return self._sql_poll(m.group(1))
        m = re.fullmatch(r"/api/2\.0/sql/statements/([^/]+)/cancel", path)
        if m and method == "POST":
            self._auth()
            return self._sql_cancel(m.group(1))
        if path == MCP_ROOT or path.startswith(MCP_ROOT + "/"):
            return self._mcp()
        raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")

    def _serving_endpoints(self):
        """GET /api/2.0/serving-endpoints: the ``serving_endpoints`` knob, or its refusal."""
        status = self.fake.serving_endpoints_status
        if status:
            raise ApiError(status, "PERMISSION_DENIED" if status == 403 else "INVALID_STATE",
                           "User does not have permission to list serving endpoints.")
        with self.fake.lock:
            endpoints = [dict(e) for e in self.fake.serving_endpoints]
        return self._send(200, {"endpoints": endpoints} if endpoints else {})

    def _sql_execute(self, rec, body):
        """POST /api/2.0/sql/statements: a bad request is 400; an SQL error is 200 with state FAILED."""
        fake = self.fake
        statement, params = body.get("statement"), body.get("parameters") or []
        if not isinstance(statement, str):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "statement is required.")
        if not isinstance(body.get("warehouse_id"), str) or not body["warehouse_id"]:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "warehouse_id is required.")
        if len(statement.encode()) > SQL_MAX_STATEMENT_BYTES:
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "The statement exceeds the maximum query text size (16 MiB).")
        if not isinstance(params, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in params):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "Each parameter needs a name.")
        if len(params) > SQL_MAX_PARAMETERS:
            raise ApiError(400, "BAD_REQUEST", f"Parameterized query has too many parameters: {len(params)} "
                                               f"parameters were given but the limit is {SQL_MAX_PARAMETERS}.")
        error = _sql_parameter_error(statement, params) or (
            {"error_code": fake.sql_failure[0], "message": fake.sql_failure[1]} if fake.sql_failure else None)
        result = None
        if not error and "system.ai_gateway.usage" in statement:
            error, result = _ai_gateway_usage(fake, params)
        sid = "01f0" + secrets.token_hex(14)
        state = "FAILED" if error else "PENDING" if fake.sql_running_polls else "SUCCEEDED"
        with fake.lock:
            fake.sql_statements.append(dict(body, statement_id=sid, principal=rec.principal, state=state,
                                            polls_left=fake.sql_running_polls, result=result))
        return self._send(200, _sql_answer(sid, state, error, result))

    def _sql_record(self, sid):
        record = next((s for s in self.fake.sql_statements if s["statement_id"] == sid), None)
        if record is None:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", "No such statement.")
        return record

    def _sql_cancel(self, sid):
        """A statement still PENDING or RUNNING ends CANCELED; a finished one is left as it is."""
        with self.fake.lock:
            record = self._sql_record(sid)
            if record["state"] in ("PENDING", "RUNNING"):
                record["state"] = "CANCELED"
        return self._send(200, {})

    def _sql_poll(self, sid):
        with self.fake.lock:
            record = self._sql_record(sid)
            if record["state"] in ("PENDING", "RUNNING"):
                record["state"] = "RUNNING" if record["polls_left"] > 0 else "SUCCEEDED"
                record["polls_left"] -= 1
            state = record["state"]
        return self._send(200, _sql_answer(sid, state, None, record.get("result")))

    # -- managed MCP servers (streamable HTTP) -------------------------------
    def _mcp(self):
        """One MCP request: POST carries JSON-RPC (initialize, notifications, tools/list,
        tools/call, ping), answered as JSON or SSE; GET (no server stream here) is 405; DELETE
        ends the session. Only a live token passes; each request is recorded with its token."""
        fake, method = self.fake, self.command
        server = self.route_path[len(MCP_ROOT):] or "/"
        token, _ = self._bearer()
        rec = fake.find_token(token) if token else None
        live = bool(rec and rec.live(fake.refuse_within_seconds))
        try:
            body = json.loads(self.raw_body) if method == "POST" and self.raw_body else None
        except ValueError:
            body = None
        messages = body if isinstance(body, list) else [body] if isinstance(body, dict) else []
        first = messages[0] if messages else {}
        params = first.get("params") if isinstance(first.get("params"), dict) else {}
        session = self.headers.get("Mcp-Session-Id")
        entry = {"time": time.time(), "method": method, "server": server, "rpc": first.get("method"),
                 "tool": params.get("name") if first.get("method") == "tools/call" else None,
                 "arguments": params.get("arguments"), "token": token, "token_live": live,
                 "session": session, "status": None}
        with fake.lock:
            fake.mcp_requests.append(entry)
        self._gateway_entry = entry  # its status is set with the answer's
        if not live:
            raise ApiError(401, "UNAUTHENTICATED", "Invalid access token.")
        if method == "DELETE":
            with fake.lock:
                known = fake.mcp_sessions.pop(session, None)
            return self._send(200 if known else 404, {})
        if method != "POST":
            return self._send(405, {"error_code": "METHOD_NOT_ALLOWED", "message": "No server stream."},
                              headers={"Allow": "POST, DELETE"})
        if not messages or not all(isinstance(m, dict) for m in messages):
            return self._send(400, {"jsonrpc": "2.0", "id": None,
                                    "error": {"code": -32700, "message": "Parse error"}})
        headers = {}
        if first.get("method") == "initialize":
            session = secrets.token_hex(16)
            with fake.lock:
                fake.mcp_sessions[session] = server
            headers["Mcp-Session-Id"] = session
        else:
            with fake.lock:
                known = fake.mcp_sessions.get(session)
            if known != server:
                return self._send(404 if session else 400, {"jsonrpc": "2.0", "id": first.get("id"),
                                  "error": {"code": -32001, "message": "Unknown or missing Mcp-Session-Id."}})
        answers = [self._mcp_answer(server, m) for m in messages if "id" in m and "method" in m]
        if not answers:  # notifications and responses only
            return self._send(202, b"", headers=headers)
        payload = answers[0] if isinstance(body, dict) else answers
        sse = "text/event-stream" in self.headers.get("Accept", "") and (
            fake.mcp_answer == "sse" or (fake.mcp_answer == "auto" and first.get("method") == "tools/call"))
        if not sse:
            return self._send(200, payload, headers=headers)
        self._set_status(200)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self._chunk(": the answer follows\n\n")  # a first piece before the event: streamed, not buffered
        self._chunk(f"event: message\ndata: {json.dumps(payload)}\n\n")
        self._end_stream()

    def _mcp_answer(self, server, message):
        rpc, ident = message.get("method"), message.get("id")
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        tool = FAKE_MCP_TOOL if server == "/sql" else "lookup"
        if rpc == "initialize":
            result = {"protocolVersion": params.get("protocolVersion") or MCP_PROTOCOL,
                      "capabilities": {"tools": {"listChanged": False}},
                      "serverInfo": {"name": "fake-databricks-mcp" + server.replace("/", "-"), "version": "1.0"}}
        elif rpc == "ping":
            result = {}
        elif rpc == "tools/list":
            result = {"tools": [{"name": tool, "description": f"Fake managed MCP tool of {server}.",
                                 "inputSchema": {"type": "object", "required": ["query"],
                                                 "properties": {"query": {"type": "string"}}}}]}
        elif rpc == "tools/call" and params.get("name") == tool:
            query = (params.get("arguments") or {}).get("query", "")
            result = {"content": [{"type": "text", "text": f"{FAKE_MCP_RESULT} from {server}: {query}"}],
                      "isError": False}
        else:
            return {"jsonrpc": "2.0", "id": ident, "error": {"code": -32601, "message": f"No method {rpc}"}}
        return {"jsonrpc": "2.0", "id": ident, "result": result}

    def _oidc_token(self):
        fake = self.fake
        form = urllib.parse.parse_qs(self.raw_body.decode("latin-1"))
        client_id = (form.get("client_id") or [None])[0]
        client_secret = (form.get("client_secret") or [None])[0]
        auth = self.headers.get("Authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(auth[6:].strip()).decode()
                client_id, _, client_secret = decoded.partition(":")
                client_id = urllib.parse.unquote(client_id)
                client_secret = urllib.parse.unquote(client_secret)
            except ValueError:
                pass
        grant = (form.get("grant_type") or [None])[0]
        if grant != "client_credentials":
            return self._send(400, {"error": "unsupported_grant_type",
                                    "error_description": "Only client_credentials is supported."})
        if client_id != fake.client_id or client_secret != fake.client_secret:
            return self._send(401, {"error": "invalid_client",
                                    "error_description": "Client authentication failed."})
        rec = TokenRecord("eyJfake." + secrets.token_urlsafe(32), fake.client_id, "oauth",
                          "oauth m2m", fake.oauth_token_lifetime_seconds)
        with fake.lock:
            fake.tokens.append(rec)
        self.principal = fake.client_id
        return self._send(200, {"access_token": rec.value, "token_type": "Bearer",
                                "expires_in": fake.oauth_token_lifetime_seconds,
                                "scope": (form.get("scope") or ["all-apis"])[0]})

    def _token_create(self, rec):
        fake = self.fake
        body = self._json_body()
        lifetime = body.get("lifetime_seconds")
        comment = body.get("comment") or ""
        if lifetime is not None and (not isinstance(lifetime, int) or isinstance(lifetime, bool)):
            raise ApiError(400, "INVALID_PARAMETER_VALUE", "lifetime_seconds must be an integer.")
        if not rec.can_mint:
            raise ApiError(403, "PERMISSION_DENIED",
                           "This token does not have the scope required to create tokens.")
        cap = fake.max_token_lifetime_seconds
        if cap is not None and (lifetime is None or lifetime <= 0 or lifetime > cap):
            raise ApiError(400, "INVALID_PARAMETER_VALUE",
                           f"Token lifetime exceeds the maximum lifetime of {cap} seconds "
                           "set by the workspace administrator.")
        with fake.lock:
            live = [t for t in fake.tokens
                    if t.kind == "pat" and t.principal == rec.principal and t.live()]
            if len(live) >= fake.token_quota:
                raise ApiError(400, "QUOTA_EXCEEDED",
                               f"Cannot create more than {fake.token_quota} tokens.")
            new = TokenRecord("dapi" + secrets.token_hex(16), rec.principal, "pat", comment,
                              lifetime if lifetime and lifetime > 0 else None)
            new.minted = True
            fake.tokens.append(new)
        return self._send(200, {"token_value": new.value, "token_info": new.info()})

    def _workspace_files(self, op, method, qs):
        fake = self.fake
        if op in ("get-status", "list", "export"):
            if method != "GET":
                raise ApiError(405, "METHOD_NOT_ALLOWED", f"Use GET for workspace/{op}.")
            params = {k: v[0] for k, v in qs.items()}
        else:
            if method != "POST":
                raise ApiError(405, "METHOD_NOT_ALLOWED", f"Use POST for workspace/{op}.")
            params = self._multipart() if op == "import" and self.headers.get(
                "Content-Type", "").startswith("multipart/") else self._json_body()
        path = _norm_ws_path(params.get("path"))
        with fake.lock:
            obj = fake.files.get(path)
            if op == "get-status":
                if obj is None:
                    raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Path ({path}) doesn't exist.")
                return self._send(200, fake._status(path))
            if op == "list":
                if obj is None:
                    raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Path ({path}) doesn't exist.")
                if obj["object_type"] != "DIRECTORY":
                    return self._send(200, {"objects": [fake._status(path)]})
                prefix = path.rstrip("/") + "/"
                kids = sorted(p for p in fake.files
                              if p.startswith(prefix) and "/" not in p[len(prefix):] and p != "/")
                return self._send(200, {"objects": [fake._status(p) for p in kids]} if kids else {})
            if op == "export":
                if obj is None or obj["object_type"] == "DIRECTORY":
                    raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Path ({path}) doesn't exist.")
                if str(params.get("direct_download", "")).lower() == "true":
                    return self._send(200, obj["content"], "application/octet-stream")
                return self._send(200, {"content": base64.b64encode(obj["content"]).decode(),
                                        "file_type": path.rsplit(".", 1)[-1] if "." in path else ""})
            if op == "mkdirs":
                fake._mkdirs(path)
                return self._send(200, {})
            if op == "delete":
                if obj is None:
                    raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Path ({path}) doesn't exist.")
                prefix = path.rstrip("/") + "/"
                kids = [p for p in fake.files if p.startswith(prefix)]
                if kids and not params.get("recursive"):
                    raise ApiError(400, "DIRECTORY_NOT_EMPTY", f"Folder ({path}) is not empty.")
                if path == "/":
                    raise ApiError(400, "INVALID_PARAMETER_VALUE", "Cannot delete the root.")
                for p in kids + [path]:
                    fake.files.pop(p, None)
                return self._send(200, {})
            # import
            parent = path.rsplit("/", 1)[0] or "/"
            if fake.files.get(parent, {}).get("object_type") != "DIRECTORY":
                raise ApiError(404, "RESOURCE_DOES_NOT_EXIST",
                               f"The parent folder ({parent}) does not exist.")
            overwrite = str(params.get("overwrite", "")).lower() in ("true", "1")
            if obj is not None and (not overwrite or obj["object_type"] == "DIRECTORY"):
                raise ApiError(400, "RESOURCE_ALREADY_EXISTS", f"Path ({path}) already exists.")
            content = params.get("content", b"")
            if isinstance(content, str):
                try:
                    content = base64.b64decode(content, validate=True)
                except ValueError:
                    raise ApiError(400, "INVALID_PARAMETER_VALUE", "content must be base64.")
            fmt = (params.get("format") or "SOURCE").upper()
            language = params.get("language")
            kind = "NOTEBOOK" if fmt in ("SOURCE", "JUPYTER", "DBC") and language else "FILE"
            if fmt == "AUTO" and content.startswith(b"# Databricks notebook source"):
                kind = "NOTEBOOK"
            now = _now_ms()
            fake.files[path] = {"object_type": kind, "content": content, "language": language,
                                "created_at": (obj or {}).get("created_at", now),
                                "modified_at": now}
            return self._send(200, {})

    def _multipart(self):
        head = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.raw_body)
        if not msg.is_multipart():
            raise ApiError(400, "MALFORMED_REQUEST", "Bad multipart body.")
        out = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not name:
                continue
            data = part.get_payload(decode=True) or b""
            out[name] = data if name == "content" else data.decode("utf-8", "replace")
        return out

    # -- the AI Gateway ----------------------------------------------------
    def _record_gateway(self, generation, api, base, model, token, via, body):
        fake = self.fake
        rec = fake.find_token(token) if token else None
        entry = {
            "time": time.time(), "origin": self.server.origin, "generation": generation,
            "method": self.command, "path": self.route_path,
            "query": re.sub(r"(^|&)key=[^&]*", r"\1key=<redacted>", self.query),
            "base": base, "api": api, "model": model,
            "token": token, "token_id": rec.token_id if rec else None,
            "token_live": bool(rec and rec.live(fake.refuse_within_seconds)),
            "auth_via": via, "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body, "status": None,
        }
        with fake.lock:
            fake.gateway_requests.append(entry)
        self._gateway_entry = entry
        return entry

    def _gateway(self, generation):
        fake, path, method = self.fake, self.route_path, self.command
        if generation in fake.disabled_generations:
            raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")
        if generation == "host" and not any(path == p or path.startswith(p + "/")
                                            for p in GATEWAY_HOST_PREFIXES):
            raise ApiError(404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}'")

        api, base, model = "probe", path, None
        m = re.fullmatch(r"(.*)/(v1beta|v1alpha|v1)/models/([^/:]+):(\w+)", path)
        if m and method == "POST":
            base, model = m.group(1), m.group(3)
            api = {"streamGenerateContent": "gemini", "generateContent": "gemini",
                   "countTokens": "gemini-count"}.get(m.group(4), "unknown")
        elif method == "POST" and path.endswith("/v1/messages"):
            api, base = "anthropic", path[:-len("/v1/messages")]
        elif method == "POST" and path.endswith("/v1/messages/count_tokens"):
            api, base = "anthropic-count", path[:-len("/v1/messages/count_tokens")]
        elif method == "POST" and path.endswith("/responses"):
            api, base = "responses", path[:-len("/responses")]
        elif method == "POST" and path.endswith("/chat/completions"):
            api, base = "chat", path[:-len("/chat/completions")]
        elif method == "POST" and path.endswith("/invocations"):
            api, base = "chat", path[:-len("/invocations")]
            model = path.rsplit("/", 2)[-2]
        elif method == "GET" and re.search(r"/models(/[^/]+)?$", path):
            api = "models"
            base = re.sub(r"(/v1beta|/v1)?/models(/[^/]+)?$", "", path)
        elif method in ("HEAD", "GET") and path.rstrip("/") in KNOWN_BASES:
            api = "probe"
        else:
            api = "unknown"

        body = {}
        if method == "POST":
            try:
                body = self._json_body()
            except ApiError:
                body = {"_raw": self.raw_body[:2000].decode("utf-8", "replace")}
        model = model or body.get("model")
        token, via = self._bearer()
        entry = self._record_gateway(generation, api, base, model, token, via, body)
        self._gateway_answer(entry, api, body)

    def _gateway_error(self, api, status, message):
        if api.startswith("anthropic"):
            kind = {401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error"}.get(status, "api_error")
            return self._send(status, {"type": "error", "error": {"type": kind, "message": message}})
        if api.startswith("gemini"):
            code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                    429: "RESOURCE_EXHAUSTED"}.get(status, "UNAVAILABLE")
            return self._send(status, {"error": {"code": status, "message": message, "status": code}})
        return self._send(status, {"error": {"message": message, "type": "invalid_request_error"
                                             if status < 500 else "server_error",
                                             "code": str(status)}})

    def _gateway_answer(self, entry, api, body):
        fake = self.fake
        if self.command == "HEAD" and api == "probe":  # a reachability check, without auth
            return self._send(200, b"", "text/plain")
        if not entry["token_live"]:
            return self._gateway_error(api, fake.gateway_auth_failure_status,
                                       "Invalid access token." if entry["token"]
                                       else "Missing access token.")
        self.principal = fake.find_token(entry["token"]).principal
        fault = fake._take_fault("gateway")
        if fault:
            if fault["delay"]:
                fake._stopping.wait(fault["delay"])
            if fault["status"] is not None:
                return self._gateway_error(api, fault["status"], fault["message"])
        if entry["model"] in fake.failing_models:
            return self._gateway_error(api, fake.failing_models[entry["model"]],
                                       f"Model {entry['model']} is failing (fake knob).")
        if api == "probe":
            return self._send(200, {"status": "ok"})
        if api == "unknown":
            return self._gateway_error(api, 404, f"No route for {self.command} {self.route_path}")
        if api == "models":
            return self._models(entry)
        if api == "anthropic-count":
            return self._send(200, {"input_tokens": 42})
        if api == "gemini-count":
            return self._send(200, {"totalTokens": 42})
        if api == "anthropic":
            return self._anthropic(body, _turn_anthropic(body).decide("anthropic", fake.tool_command))
        if api == "responses":
            return self._responses(body, _turn_responses(body).decide("responses", fake.tool_command))
        if api == "chat":
            return self._chat(body, entry["model"],
                              _turn_chat(body).decide("chat", fake.tool_command))
        if api == "gemini":
            stream = self.route_path.endswith(":streamGenerateContent")
            return self._gemini(entry["model"], stream,
                                _turn_gemini(body).decide("gemini", fake.tool_command))
        return self._gateway_error(api, 404, "No such route.")

    def _models(self, entry):
        models, base = self.fake.models, entry["base"]
        if "gemini" in base or "google" in base:
            return self._send(200, {"models": [
                {"name": f"models/{m}", "displayName": m, "inputTokenLimit": 1048576,
                 "outputTokenLimit": 65536,
                 "supportedGenerationMethods": ["generateContent", "countTokens"]}
                for m in models]})
        if "anthropic" in base:
            data = [{"id": m, "type": "model", "display_name": m,
                     "created_at": "2026-01-01T00:00:00Z"} for m in models]
            return self._send(200, {"data": data, "has_more": False,
                                    "first_id": models[0], "last_id": models[-1]})
        one = re.search(r"/models/([^/]+)$", self.route_path)
        if one:
            return self._send(200, {"id": one.group(1), "object": "model", "created": 0,
                                    "owned_by": "databricks"})
        return self._send(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "databricks"}
            for m in models]})

    @staticmethod
    def _pieces(text):
        """Split a reply into a few deltas, to exercise clients' accumulation."""
        n = max(1, min(3, len(text) // 8))
        step = -(-len(text) // n)
        return [text[i:i + step] for i in range(0, len(text), step)] or [""]

    def _anthropic(self, body, decision):
        model = body.get("model") or "unknown"
        msg_id = "msg_fake" + secrets.token_hex(8)
        usage = {"input_tokens": 42, "output_tokens": 7,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        if decision[0] == "tool":
            block = {"type": "tool_use", "id": "toolu_fake" + secrets.token_hex(8),
                     "name": decision[1], "input": decision[2]}
            stop = "tool_use"
        else:
            block = {"type": "text", "text": decision[1]}
            stop = "end_turn"
        if not body.get("stream"):
            return self._send(200, {"id": msg_id, "type": "message", "role": "assistant",
                                    "model": model, "content": [block], "stop_reason": stop,
                                    "stop_sequence": None, "usage": usage})

        def ev(name, data):
            self._chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n")

        self._start_stream()
        ev("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": dict(usage, output_tokens=1)}})
        if block["type"] == "text":
            ev("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})
            ev("ping", {"type": "ping"})
            for piece in self._pieces(block["text"]):
                ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": piece}})
        else:
            ev("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": dict(block, input={})})
            ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "input_json_delta",
                                                 "partial_json": json.dumps(block["input"])}})
        ev("content_block_stop", {"type": "content_block_stop", "index": 0})
        ev("message_delta", {"type": "message_delta",
                             "delta": {"stop_reason": stop, "stop_sequence": None},
                             "usage": {"output_tokens": 7}})
        ev("message_stop", {"type": "message_stop"})
        self._end_stream()

    def _responses(self, body, decision):
        model = body.get("model") or "unknown"
        resp_id = "resp_fake" + secrets.token_hex(8)
        created = int(time.time())
        usage = {"input_tokens": 42, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": 49}
        if decision[0] == "tool":
            namespace, _, name = decision[1].rpartition("/")
            item = {"type": "function_call", "id": "fc_fake" + secrets.token_hex(8),
                    "call_id": "call_fake" + secrets.token_hex(8), "name": name,
                    "arguments": json.dumps(decision[2]), "status": "completed",
                    **({"namespace": namespace} if namespace else {})}
        else:
            item = {"type": "message", "id": "msg_fake" + secrets.token_hex(8),
                    "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": decision[1], "annotations": []}]}
        base = {"id": resp_id, "object": "response", "created_at": created, "model": model,
                "status": "in_progress", "output": [], "usage": None}
        done = dict(base, status="completed", output=[item], usage=usage)
        if body.get("stream") is False:
            return self._send(200, done)
        seq = iter(range(1000))

        def ev(name, data):
            data = dict(data, type=name, sequence_number=next(seq))
            self._chunk(f"event: {name}\ndata: {json.dumps(data)}\n\n")

        self._start_stream()
        ev("response.created", {"response": base})
        ev("response.in_progress", {"response": base})
        if item["type"] == "message":
            text = decision[1]
            ev("response.output_item.added", {"output_index": 0, "item": dict(
                item, status="in_progress", content=[])})
            ev("response.content_part.added", {"item_id": item["id"], "output_index": 0,
                                               "content_index": 0, "part": {
                                                   "type": "output_text", "text": "",
                                                   "annotations": []}})
            for piece in self._pieces(text):
                ev("response.output_text.delta", {"item_id": item["id"], "output_index": 0,
                                                  "content_index": 0, "delta": piece})
            ev("response.output_text.done", {"item_id": item["id"], "output_index": 0,
                                             "content_index": 0, "text": text})
            ev("response.content_part.done", {"item_id": item["id"], "output_index": 0,
                                              "content_index": 0, "part": item["content"][0]})
        else:
            ev("response.output_item.added", {"output_index": 0, "item": dict(
                item, status="in_progress", arguments="")})
            ev("response.function_call_arguments.delta", {"item_id": item["id"],
                                                          "output_index": 0,
                                                          "delta": item["arguments"]})
            ev("response.function_call_arguments.done", {"item_id": item["id"],
                                                         "output_index": 0,
                                                         "arguments": item["arguments"]})
        ev("response.output_item.done", {"output_index": 0, "item": item})
        ev("response.completed", {"response": done})
        self._end_stream()

    def _chat(self, body, model, decision):
        model = model or "unknown"
        cid = "chatcmpl-fake" + secrets.token_hex(8)
        created = int(time.time())
        usage = {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}
        if decision[0] == "tool":
            call = {"id": "call_fake" + secrets.token_hex(8), "type": "function",
                    "function": {"name": decision[1], "arguments": json.dumps(decision[2])}}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": decision[1]}
            finish = "stop"
        if not body.get("stream"):
            return self._send(200, {"id": cid, "object": "chat.completion", "created": created,
                                    "model": model, "choices": [{"index": 0, "message": message,
                                                                 "finish_reason": finish}],
                                    "usage": usage})

        def chunk(delta, finish_reason=None, **extra):
            data = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": 0, "delta": delta,
                                                 "finish_reason": finish_reason}]}
            data.update(extra)
            self._chunk(f"data: {json.dumps(data)}\n\n")

        self._start_stream()
        chunk({"role": "assistant", "content": ""})
        if finish == "stop":
            for piece in self._pieces(message["content"]):
                chunk({"content": piece})
        else:
            call = message["tool_calls"][0]
            chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                   "function": {"name": call["function"]["name"],
                                                "arguments": ""}}]})
            chunk({"tool_calls": [{"index": 0, "function": {
                "arguments": call["function"]["arguments"]}}]})
        chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage") or self.fake.chat_stream_usage:
            self._chunk("data: " + json.dumps({"id": cid, "object": "chat.completion.chunk",
                                               "created": created, "model": model,
                                               "choices": [], "usage": usage}) + "\n\n")
        self._chunk("data: [DONE]\n\n")
        self._end_stream()

    def _gemini(self, model, stream, decision):
        usage = {"promptTokenCount": 42, "candidatesTokenCount": 7, "totalTokenCount": 49}
        if decision[0] == "tool":
            parts = [{"functionCall": {"name": decision[1], "args": decision[2]}}]
        else:
            parts = [{"text": decision[1]}]

        def candidate(ps, finish=None):
            c = {"content": {"role": "model", "parts": ps}, "index": 0}
            if finish:
                c["finishReason"] = finish
            return {"candidates": [c], "usageMetadata": usage, "modelVersion": model,
                    "responseId": "fake" + secrets.token_hex(6)}

        if not stream:
            return self._send(200, candidate(parts, "STOP"))
        if "alt=sse" not in self.query:  # without alt=sse the API streams one JSON array
            return self._send(200, [candidate(parts, "STOP")])
        self._start_stream()
        if decision[0] == "text":
            pieces = self._pieces(decision[1])
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                self._chunk("data: " + json.dumps(candidate([{"text": piece}],
                                                            "STOP" if last else None)) + "\r\n\r\n")
        else:
            self._chunk("data: " + json.dumps(candidate(parts, "STOP")) + "\r\n\r\n")
        self._end_stream()


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run a fake Databricks workspace + AI Gateway.")
    ap.add_argument("--port", type=int, default=0, help="workspace port (default: a free one)")
    ap.add_argument("--gateway-port", type=int, default=0,
                    help="gateway-host port (default: a free one)")
    ap.add_argument("--token-file", help="write a fresh bootstrap PAT here (mode 0600)")
    ap.add_argument("--token-value", help="register this value as a bootstrap PAT")
    ap.add_argument("--user", default="alice@example.com")
    ap.add_argument("--app-name", default="coda")
    ap.add_argument("--client-id", default="fake-sp-client-id")
    ap.add_argument("--client-secret", default="fake-sp-secret")
    ap.add_argument("--quiet", action="store_true", help="no access log on stderr")
    args = ap.parse_args(argv)
    fw = FakeWorkspace(port=args.port, gateway_port=args.gateway_port, user_name=args.user,
                       app_name=args.app_name, client_id=args.client_id,
                       client_secret=args.client_secret, verbose=not args.quiet).start()
    if args.token_value:
        fw.add_token(comment="bootstrap (command line)", value=args.token_value)
    if args.token_file:
        value = fw.add_token(comment="bootstrap (token file)")
        fd = os.open(args.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
    print(f"FAKE_WORKSPACE_URL={fw.url}", flush=True)
    print(f"FAKE_GATEWAY_URL={fw.gateway_url}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()  # until SIGTERM or Ctrl+C
    fw.stop()


if __name__ == "__main__":
    main()
