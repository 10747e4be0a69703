"""App logs to Delta (issue 6): CoDA's own log records, batched into a table
through the SQL Statement Execution API, against the fake workspace.

The send pass is called directly here (no monkey patching in this process);
the greenlet's loop runs in a gevent-patched subprocess (`RUNNER`).
"""

import dataclasses
import datetime
import json
import logging
import os
import re
import subprocess
import sys
import time
import types

import pytest

from conftest import ROOT, free_port, wait_for
from fake_workspace import FakeWorkspace

sys.path.insert(0, str(ROOT))
import coda  # noqa: E402  (imported, not run: no monkey patching, no server)

delta = coda

TABLE = "`main`.`ops`.`coda_logs`"
WAREHOUSE = "wh-0123456789abcdef"
INSERT_SHAPE = re.compile(
    r"INSERT INTO `main`\.`ops`\.`coda_logs` \(ts, level, logger, message, app, host\) VALUES "
    r"\(:ts_(\d+), :level_\1, :logger_\1, :message_\1, :app, :host\)"
    r"(, \(:ts_(\d+), :level_\3, :logger_\3, :message_\3, :app, :host\))*")
FAST = {"DELTA_TICK": 0.02, "DELTA_FLUSH_SECONDS": 0.05, "DELTA_BACKOFF_FIRST": 0.2, "DELTA_BACKOFF_CAP": 0.4,
        "DELTA_POLL_SECONDS": 0.01}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def statements(fw, kind):
    return [s for s in fw.sql_statements if s["statement"].startswith(kind)]


def delivered(fw):
    """Every row the table received, in order: dicts of column -> value (from the parameters)."""
    rows = []
    for s in statements(fw, "INSERT"):
        if s["state"] != "SUCCEEDED":
            continue
        values = {p["name"]: p.get("value") for p in s["parameters"]}
        for i in sorted(int(name[3:]) for name in values if name.startswith("ts_")):
            rows.append({"ts": values[f"ts_{i}"], "level": values[f"level_{i}"], "logger": values[f"logger_{i}"],
                         "message": values[f"message_{i}"], "app": values["app"], "host": values["host"]})
    return rows


def messages(fw):
    return [row["message"] for row in delivered(fw)]


@pytest.fixture
def fw():
    fake = FakeWorkspace().start()
    yield fake
    fake.stop()


@pytest.fixture
def shipping(fw, monkeypatch):
    """A handler on the "coda" logger and a shipper pointed at the fake, with a live token."""
    config = dataclasses.replace(coda.CONFIG, databricks_host=fw.url)
    monkeypatch.setattr(coda, "CONFIG", config)
    monkeypatch.setattr(coda.PROCESS.pat, "token", fw.add_token())
    monkeypatch.setattr(coda.PROCESS.pat, "expires_at", None)
    for name, value in FAST.items():
        monkeypatch.setattr(delta, name, value)
    level = coda.log.level
    coda.log.setLevel(logging.INFO)
    made = []

    def make(bound=None):
        handler = delta.DeltaLogHandler(bound)
        coda.log.addHandler(handler)
        made.append(handler)
        return delta.DeltaLogShipper(handler, TABLE, WAREHOUSE, coda.PROCESS.pat.current_token)

    yield make
    for handler in made:
        coda.log.removeHandler(handler)
    coda.log.setLevel(level)


# ---------------------------------------------------------------------------
# The table's name
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, quoted", [
    ("main.ops.coda_logs", "`main`.`ops`.`coda_logs`"),
    ("  main.ops.coda_logs ", "`main`.`ops`.`coda_logs`"),
    ("`main`.`my-ops`.`coda logs`".replace(" ", "_"), "`main`.`my-ops`.`coda_logs`"),
    ("cat.sch.we`ird", "`cat`.`sch`.`we``ird`"),
    ("cat.sch.`we``ird`", "`cat`.`sch`.`we``ird`"),
    ("Ünïcode.sch.t", "`Ünïcode`.`sch`.`t`"),
])
def test_table_names_are_quoted_safely(text, quoted):
    assert delta.delta_table_name(text) == quoted


@pytest.mark.parametrize("text", [
    "", "logs", "ops.logs", "a.b.c.d", "a..c", "a.b.", "a.b.c d", "a.b.c/d", "a.b.c\nd", "a.b.c\x00",
    "a.b.``", "a.b.`c`; DROP TABLE x", "a.b." + "x" * 256,
])
def test_table_names_that_are_not_three_names_are_refused(text):
    with pytest.raises(ValueError):
        delta.delta_table_name(text)


# ---------------------------------------------------------------------------
# Batches, parameters, the table
# ---------------------------------------------------------------------------

def test_records_arrive_batched_as_parameters_never_inlined(fw, shipping):
    shipper = shipping()
    tricky = "it's \"quoted\"; DROP TABLE x; -- :ts_0 `y` \\ ü 日本"
    started = time.time()
    for i in range(150):
        coda.log.info("record %d %s", i, tricky)
    assert shipper.send_pending() is True
    assert len(statements(fw, "CREATE")) == 1
    inserts = statements(fw, "INSERT")
    assert len(inserts) == 3  # 63 + 63 + 24: the API's 256-parameter limit splits them
    for s in fw.sql_statements:
        # The fake fails a statement whose markers are not all bound or whose values do not cast.
        assert s["state"] == "SUCCEEDED" and s["warehouse_id"] == WAREHOUSE, s
    for s in inserts:
        assert INSERT_SHAPE.fullmatch(s["statement"]), s["statement"][:300]  # markers only: no value in the text
        assert len(s["parameters"]) <= 256
        assert "record" not in s["statement"] and "DROP" not in s["statement"]
    rows = delivered(fw)
    assert [row["message"] for row in rows] == [f"record {i} {tricky}" for i in range(150)]
    assert {(row["level"], row["logger"], row["app"], row["host"]) for row in rows} == {
        ("INFO", "coda", coda.CONFIG.app_name or "coda", os.uname().nodename)}
    stamps = {p["type"] for s in inserts for p in s["parameters"] if p["name"].startswith("ts_")}
    assert stamps == {"TIMESTAMP"}
    first = datetime.datetime.fromisoformat(rows[0]["ts"].replace("Z", "+00:00"))
    assert started - 1 <= first.timestamp() <= time.time()
    assert not shipper.handler.pending


def test_the_table_is_created_once_with_its_columns(fw, shipping):
    shipper = shipping()
    for round_ in range(3):
        coda.log.warning("round %d", round_)
        assert shipper.send_pending()
    (create,) = statements(fw, "CREATE")
    assert create["statement"].startswith(f"CREATE TABLE IF NOT EXISTS {TABLE} (ts TIMESTAMP")
    for column in ("level STRING", "logger STRING", "message STRING", "app STRING", "host STRING"):
        assert column in create["statement"]
    assert "USING DELTA" in create["statement"] and not create.get("parameters")
    assert messages(fw) == ["round 0", "round 1", "round 2"]


def test_a_table_that_cannot_be_created_but_exists_still_gets_rows(fw, shipping, monkeypatch):
    shipper = shipping()
    real = delta.DeltaLogShipper.execute

    def execute(self, statement, parameters=None):
        if statement.startswith("CREATE"):  # as for a user with MODIFY on the table but no CREATE on the schema
            raise delta.StatementFailed("the statement ended FAILED: [INSUFFICIENT_PERMISSIONS]")
        return real(self, statement, parameters)

    monkeypatch.setattr(delta.DeltaLogShipper, "execute", execute)
    coda.log.info("still written")
    assert shipper.send_pending() and shipper.table_ready
    assert messages(fw) == ["still written"]


def test_batches_are_split_by_size_and_long_messages_cut(fw, shipping, monkeypatch):
    monkeypatch.setattr(delta, "DELTA_STATEMENT_BYTES", 40 * 1024)
    shipper = shipping()
    for i in range(7):
        coda.log.info("%d:%s", i, "x" * 100_000)
    assert shipper.send_pending()
    inserts = statements(fw, "INSERT")
    assert len(inserts) == 4  # 16 KiB per message, two per 40 KiB statement
    for s in inserts:
        assert sum(len(p.get("value", "").encode()) for p in s["parameters"]) <= 40 * 1024 + 1024
    assert [m[:2] for m in messages(fw)] == [f"{i}:" for i in range(7)]
    assert {len(m) for m in messages(fw)} == {delta.DELTA_MESSAGE_CHARS}


def test_batched_by_count_and_by_time(shipping, monkeypatch):
    monkeypatch.setattr(delta, "DELTA_FLUSH_SECONDS", 0.5)  # wide enough for a loaded machine
    shipper = shipping()
    coda.log.info("one")
    assert not shipper.due()  # fresh and alone
    time.sleep(delta.DELTA_FLUSH_SECONDS + 0.05)
    assert shipper.due()  # old enough
    shipper.handler.pending.clear()
    for i in range(delta.DELTA_ROWS_PER_STATEMENT):
        coda.log.info("r%d", i)
    assert shipper.due()  # a full statement


# ---------------------------------------------------------------------------
# Redaction, tokens
# ---------------------------------------------------------------------------

def test_token_shaped_strings_are_redacted_in_what_is_sent(fw, shipping, monkeypatch):
    shipper = shipping()
    pat = "dapi" + "0123456789abcdef" * 2
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlc2lnbmF0dXJl"
    plain_secret = "correct-horse-battery-staple"
    monkeypatch.setattr(coda, "SECRETS", coda.SECRETS | {plain_secret})
    coda.log.info("pasted %s", pat)
    coda.log.warning("Authorization: Bearer %s", jwt)
    coda.log.info("the local token is %s", plain_secret)
    try:
        raise RuntimeError(f"the workspace refused {pat}")
    except RuntimeError:
        coda.log.exception("mint failed")
    assert shipper.send_pending()
    sent = json.dumps(fw.sql_statements)
    for secret in (pat, jwt, plain_secret, coda.PROCESS.pat.token):
        assert secret not in sent
    assert messages(fw) == ["pasted [REDACTED]", "Authorization: [REDACTED]", "the local token is [REDACTED]",
                            "mint failed (RuntimeError: the workspace refused [REDACTED])"]
    assert "Traceback" not in sent


def test_waits_for_a_token_and_uses_the_current_one(fw, shipping, monkeypatch):
    shipper = shipping()
    monkeypatch.setattr(coda.PROCESS.pat, "token", None)
    coda.log.info("before any token")
    assert shipper.send_pending() is False
    assert not fw.sql_statements and len(shipper.handler.pending) == 1
    first = fw.add_token()
    monkeypatch.setattr(coda.PROCESS.pat, "token", first)
    assert shipper.send_pending()
    second = fw.add_token()
    monkeypatch.setattr(coda.PROCESS.pat, "token", second)  # a rotation: the old token is revoked
    fw.revoke_token(first)
    coda.log.info("after the rotation")
    assert shipper.send_pending() and shipper.token == second
    monkeypatch.setattr(coda.PROCESS.pat, "expires_at", time.time() - 1)  # expired: wait for a new one
    coda.log.info("token expired")
    assert shipper.send_pending() is False
    assert messages(fw) == ["before any token", "after the rotation"]


# ---------------------------------------------------------------------------
# Failures: outages, failed statements, waiting warehouses, drops
# ---------------------------------------------------------------------------

def test_an_outage_keeps_the_records_until_they_are_written(fw, shipping):
    shipper = shipping()
    for i in range(5):
        coda.log.info("kept %d", i)
    fw.inject("sql/statements", status=500, count=2)
    for _ in range(2):
        with pytest.raises(Exception):
            shipper.send_pending()
        assert len(shipper.handler.pending) == 5
    assert shipper.send_pending()
    assert messages(fw) == [f"kept {i}" for i in range(5)]


def test_a_failed_statement_is_a_failure_and_is_retried(fw, shipping):
    shipper = shipping()
    coda.log.info("retried")
    fw.sql_failure = ("BAD_REQUEST", "[INSUFFICIENT_PERMISSIONS] User does not have MODIFY on Table")
    with pytest.raises(delta.StatementFailed, match="FAILED: .INSUFFICIENT_PERMISSIONS.*creating the table failed"):
        shipper.send_pending()
    fw.sql_failure = None
    assert shipper.send_pending()
    assert messages(fw) == ["retried"]
    assert len([s for s in statements(fw, "CREATE") if s["state"] == "SUCCEEDED"]) == 1


def test_a_statement_waiting_for_its_warehouse_is_polled_not_resent(fw, shipping):
    shipper = shipping()
    fw.sql_running_polls = 3
    coda.log.info("slow warehouse")
    assert shipper.send_pending()
    assert messages(fw) == ["slow warehouse"] and len(fw.sql_statements) == 2
    polls = [r for r in fw.requests if r["method"] == "GET" and r["path"].startswith("/api/2.0/sql/statements/")]
    assert len(polls) == 2 * 4


def test_a_statement_waiting_too_long_is_cancelled_and_retried(fw, shipping, monkeypatch):
    monkeypatch.setattr(delta, "DELTA_PATIENCE", 0.2)
    shipper = shipping()
    fw.sql_running_polls = 10_000
    coda.log.info("patient")
    with pytest.raises(TimeoutError):
        shipper.send_pending()
    assert [s["state"] for s in fw.sql_statements] == ["CANCELED"]
    fw.sql_running_polls = 0
    assert shipper.send_pending()
    assert messages(fw) == ["patient"]


def test_a_long_outage_drops_the_oldest_past_the_bound_and_says_how_many(fw, shipping):
    shipper = shipping(bound=50)
    for i in range(120):
        coda.log.info("r%d", i)
    assert len(shipper.handler.pending) == 50  # memory stays bounded
    fw.inject("sql/statements", status=500, count=1)
    with pytest.raises(Exception):
        shipper.send_pending()
    assert shipper.send_pending()
    assert messages(fw) == [f"r{i}" for i in range(70, 120)]  # the newest 50
    assert shipper.send_pending()  # the report is a later record
    assert messages(fw)[-1] == (f"70 app log records were dropped, the oldest first, before they could be "
                                f"written to {TABLE}")


# ---------------------------------------------------------------------------
# The greenlet, in a gevent-patched process
# ---------------------------------------------------------------------------

RUNNER = r"""
from gevent import monkey
monkey.patch_all(subprocess=False)
import json, logging, sys, time
import gevent

args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"])
import coda
delta = coda
for name, value in args["constants"].items():
    setattr(delta, name, value)
coda.log.setLevel(logging.INFO)
coda.PROCESS.pat.token = args["token"]
handler = delta.DeltaLogHandler(args["bound"])
coda.log.addHandler(handler)
shipper = delta.DeltaLogShipper(handler, args["table"], args["warehouse"], coda.PROCESS.pat.current_token)
shipper.greenlet = gevent.spawn(shipper.run_forever)
if args["scenario"] == "burst":
    for i in range(args["records"]):
        coda.log.info("record %d", i)
elif args["scenario"] == "shutdown":  # the last flush while a pass is under way
    for i in range(args["records"]):
        coda.log.info("record %d", i)
    while shipper.client is None:
        gevent.sleep(0.01)
    gevent.sleep(args["settle"])
    coda.log.info("late record")
    shipper.final_flush(10.0)
    print(json.dumps({"pending": len(handler.pending), "dead": shipper.greenlet.dead}), flush=True)
else:  # "hang": log while the shipper waits on a hanging workspace
    coda.log.info("before the hang")
    while shipper.client is None:  # the SDK's import and first client take a moment
        gevent.sleep(0.01)
    gevent.sleep(args["settle"])  # now inside its first statement
    durations, started = [], time.time()
    for i in range(args["records"]):
        before = time.perf_counter()
        coda.log.info("record %d", i)
        durations.append(time.perf_counter() - before)
    print(json.dumps({"started": started, "ended": time.time(), "max": max(durations), "total": sum(durations),
                      "pending": len(handler.pending), "maxlen": handler.pending.maxlen}), flush=True)
gevent.sleep(120)
"""


@pytest.fixture
def run_greenlet(fw, tmp_path):
    started = []

    def run(scenario, records, bound=None, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "CODA_", "APP_"))}
        env.update(DATABRICKS_HOST=fw.url, HOME=str(tmp_path), CODA_TOKEN="")
        args = dict(root=str(ROOT), constants=FAST, token=fw.add_token(), bound=bound, table=TABLE,
                    warehouse=WAREHOUSE, scenario=scenario, records=records, **extra)
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(args)], env=env, stdout=subprocess.PIPE,
                                stderr=open(tmp_path / f"runner{len(started)}.log", "wb"), text=True)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.kill()
        proc.wait()


def test_the_greenlet_backs_off_exponentially_then_delivers(fw, run_greenlet):
    fw.inject("sql/statements", status=500, count=5)
    run_greenlet("burst", 10)
    recovered = wait_for(lambda: [m for m in messages(fw) if "written to" in m and "again" in m])
    assert recovered == [f"app logs are written to {TABLE} again, after 5 failed tries"]
    texts = messages(fw)
    assert texts[:10] == [f"record {i}" for i in range(10)]
    assert sum("could not be written" in m for m in texts) == 1  # said once, not per retry
    tries = [r["time"] for r in fw.requests if r["method"] == "POST" and r["path"] == "/api/2.0/sql/statements"]
    gaps = [b - a for a, b in zip(tries, tries[1:6])]  # five failures, then the first success
    assert len(gaps) == 5
    for gap, expected in zip(gaps, (0.2, 0.4, 0.4, 0.4, 0.4)):  # doubling, capped (uncapped: 0.8, 1.6, 3.2)
        assert expected * 0.9 <= gap <= expected + 0.6, gaps


def test_emit_never_blocks_while_the_workspace_hangs(fw, run_greenlet):
    fw.inject("sql/statements", status=None, delay=4.0, count=1)  # the first statement hangs 4 s, then answers
    proc = run_greenlet("hang", 20_000, settle=0.3)
    result = json.loads(proc.stdout.readline())
    hung = next(r for r in fw.requests if r["path"] == "/api/2.0/sql/statements")
    assert hung["time"] < result["started"] and result["ended"] < hung["time"] + 4.0  # all logged meanwhile
    # Each emit takes microseconds; the bounds leave room for a loaded machine, far below the 4 s hang.
    assert result["max"] < 0.5 and result["total"] < 3.0, result
    assert result["pending"] == result["maxlen"] == delta.DELTA_QUEUE_BOUND  # bounded while it hangs
    report = wait_for(lambda: [m for m in messages(fw) if "were dropped" in m], timeout=30)
    dropped = int(report[0].split()[0])
    kept = [t for t in messages(fw) if t.startswith("record ")]  # the newest, in order
    assert kept == [f"record {i}" for i in range(20_000 - len(kept), 20_000)]
    assert dropped + len(kept) == 20_001  # with "before the hang", the oldest of all


def test_the_last_flush_waits_for_a_pass_under_way_and_sends_nothing_twice(fw, run_greenlet):
    fw.inject("sql/statements", status=None, delay=1.0, count=1)  # the pass under way is slow
    proc = run_greenlet("shutdown", 3, settle=0.3)
    assert json.loads(proc.stdout.readline()) == {"pending": 0, "dead": True}
    assert messages(fw) == ["record 0", "record 1", "record 2", "late record"]


# ---------------------------------------------------------------------------
# Configuration and wiring
# ---------------------------------------------------------------------------

def test_start_needs_both_variables_and_a_valid_table(monkeypatch, caplog):
    monkeypatch.setattr(coda.PROCESS, "delta_logs", None)
    base = {f.name: getattr(coda.CONFIG, f.name) for f in dataclasses.fields(coda.CONFIG)}

    def start(table, warehouse):
        config = types.SimpleNamespace(**{**base, "log_table": table, "log_warehouse_id": warehouse})
        return delta.start_delta_logs(config, coda.PROCESS.pat.current_token)

    with caplog.at_level(logging.INFO, logger="coda"):
        assert start("", "") is None and not caplog.records
        assert start("main.ops.logs", "") is None
        assert start("", WAREHOUSE) is None
        assert start("ops.logs", WAREHOUSE) is None
        assert [r.getMessage() for r in caplog.records] == [
            "app logs to Delta need both CODA_LOG_TABLE and CODA_LOG_WAREHOUSE_ID; logs stay local",
            "app logs to Delta need both CODA_LOG_TABLE and CODA_LOG_WAREHOUSE_ID; logs stay local",
            "CODA_LOG_TABLE='ops.logs' is not catalog.schema.table; logs stay local"]
        shipper = start("main.ops.logs", WAREHOUSE)
    try:
        assert shipper.table == "`main`.`ops`.`logs`" and shipper.warehouse_id == WAREHOUSE
        assert shipper.handler in coda.log.handlers and coda.PROCESS.delta_logs is shipper
        assert start("main.ops.logs", WAREHOUSE) is None  # once
        logging.getLogger("urllib3").warning("not CoDA's")
        coda.log.warning("CoDA's")
        assert [row.message for row in shipper.handler.pending][-1] == "CoDA's"
        assert all(row.logger.startswith("coda") for row in shipper.handler.pending)
    finally:
        shipper.greenlet.kill()
        coda.log.removeHandler(shipper.handler)


def test_coda_writes_its_own_log_lines_to_the_table(start_coda, fw):
    server = start_coda({"DATABRICKS_HOST": fw.url, "DATABRICKS_GATEWAY_HOST": fw.gateway_url,
                         "CODA_PROXY_PORT": str(free_port()), "CODA_LOG_TABLE": "main.ops.coda_logs",
                         "CODA_LOG_WAREHOUSE_ID": WAREHOUSE})
    pasted = fw.add_token(comment="pasted by the user")
    server.api("/api/configure-pat", {"token": pasted})
    session = server.new_session()
    server.type(session, "echo TERMINAL-ONLY-$((6*7))\r")
    server.read_until(session, "TERMINAL-ONLY-42")
    wait_for(lambda: any("Databricks token configured for alice@example.com" in m for m in messages(fw)), timeout=30)
    texts = messages(fw)
    assert any(m.startswith(f"app logs also go to {TABLE}") for m in texts)  # logged before any token: kept
    assert len(statements(fw, "CREATE")) == 1
    for s in statements(fw, "INSERT"):
        assert INSERT_SHAPE.fullmatch(s["statement"]) and s["warehouse_id"] == WAREHOUSE
    sent = json.dumps(fw.sql_statements)
    assert "TERMINAL-ONLY" not in sent
    for token in [pasted, *fw.live_token_values()]:
        assert token not in sent
    assert {row["app"] for row in delivered(fw)} == {"coda"}
    server.stop()  # SIGTERM: the last records are written on the way out, and nothing twice
    texts = messages(fw)
    assert texts[-1] == "stopped" and texts.count("Databricks token configured for alice@example.com") == 1
