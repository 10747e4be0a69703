#!/usr/bin/env bash
# Install everything the tests need, then run them:  bash tests/run.sh [pytest args]
#   - Python packages from requirements.lock (hash-checked) into .venv
#   - Debian's chromium for the browser tests (Playwright drives it; no browser download)
#   - the pinned agent CLIs into a cache folder, for the end-to-end agent tests
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${CODA_TEST_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r requirements.lock

if ! [ -x /usr/bin/chromium ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

export CODA_TEST_AGENTS=${CODA_TEST_AGENTS:-$HOME/.cache/coda-test/agents}
bash install/agents.sh --prefix "$CODA_TEST_AGENTS"

exec "$venv/bin/python" -m pytest "$@"
