"""coda.py's agent table (AGENT_ROWS, at the top of the file) as the tests read it: from the
source, without importing coda (which would build its configuration and load gevent), so the
tests never keep a copy of what an agent is."""

import ast
import collections
from pathlib import Path

CODA = Path(__file__).resolve().parent.parent / "coda.py"


def agent_rows(path=CODA):
    """The rows of AGENT_ROWS in `path`, as namedtuples with the fields coda.py's Agent has."""
    module = ast.parse(Path(path).read_text())
    assigned = {node.targets[0].id: node.value for node in module.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    call = assigned["Agent"]  # collections.namedtuple("Agent", [fields], defaults=(...))
    fields = ast.literal_eval(call.args[1])
    defaults = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "defaults"))
    row = collections.namedtuple("Agent", fields, defaults=defaults)
    return [row(*map(ast.literal_eval, each.args), **{k.arg: ast.literal_eval(k.value) for k in each.keywords})
            for each in assigned["AGENT_ROWS"].elts]


AGENT_ROWS = agent_rows()
BY_NAME = {row.name: row for row in AGENT_ROWS}
NPM_AGENTS = {row.name: row.package for row in AGENT_ROWS if row.kind == "npm"}
PYPI_AGENTS = {row.name: row.package for row in AGENT_ROWS if row.kind == "pypi"}
