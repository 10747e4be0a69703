#!/usr/bin/env bash
# Install the pinned agent CLIs that CoDA users run in their terminals.
#
#   install/agents.sh [--prefix DIR] [AGENT ...]
#
# The agents are the rows of coda.py's agent table (`coda.py agents` lists
# them: name, npm or pypi, package, version key); with none named, all are
# installed. PREFIX (environment) sets the default prefix; --prefix wins.
# Versions come from install/versions.env (the one place they are pinned).
# npm packages go into DIR (bin/ and lib/node_modules/), a PyPI agent into its
# own virtual environment DIR/lib/NAME-venv (Hermes Agent ships generic
# top-level modules such as `agent`, `tools`), exposed as DIR/bin/NAME.
#
# Idempotent: an agent already installed at its pinned version is skipped.
# Registries: npm honours NPM_CONFIG_REGISTRY, pip honours PIP_INDEX_URL (and
# UV_INDEX_URL is passed on to pip as its index when PIP_INDEX_URL is unset).
# CODA_PYTHON runs coda.py for the table (default: python3; setup passes its
# own). HERMES_PYTHON chooses the interpreter for the venvs (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
versions_file="$here/versions.env"

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

log() { printf 'agents.sh: %s\n' "$*" >&2; }
# die TOOL MESSAGE: the last line on stderr is "<tool>: error: <message>",
# as for the other install/ scripts.
die() { printf '%s: error: %s\n' "$1" "$2" >&2; exit 1; }

case " $* " in *" -h "*|*" --help "*) usage; exit 0 ;; esac

# The agent table, one "name kind package version-key" line per agent.
python="${CODA_PYTHON:-python3}"
table="$("$python" "$here/../coda.py" agents)" ||
    die agents.sh "could not read the agent table from $here/../coda.py with $python (set CODA_PYTHON)"
names="$(printf '%s\n' "$table" | cut -d' ' -f1 | tr '\n' ' ')"
names="${names% }"

# agent_field NAME N: field N (2 kind, 3 package, 4 version key) of NAME's row.
agent_field() {
    printf '%s\n' "$table" | awk -v name="$1" -v n="$2" '$1 == name { print $n }'
}

prefix="${PREFIX:-$HOME/.local}"
wanted=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --prefix) [ "$#" -ge 2 ] || die agents.sh "--prefix needs a directory"; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        *)
            [ -n "$1" ] && [ -n "$(agent_field "$1" 1)" ] ||
                die agents.sh "unknown argument '$1' (agents: $names)"
            wanted+=("$1"); shift ;;
    esac
done
# shellcheck disable=SC2206  # the names are single words
[ "${#wanted[@]}" -gt 0 ] || wanted=($names)

[ -f "$versions_file" ] || die agents.sh "missing $versions_file"
# shellcheck source-path=SCRIPTDIR source=versions.env
. "$versions_file"

mkdir -p "$prefix/bin" "$prefix/lib"
prefix="$(cd "$prefix" && pwd)"

# The version versions.env pins for NAME (its row names the key).
pinned_version() {
    local key
    key="$(agent_field "$1" 4)"
    [ -n "${!key:-}" ] || die "$1" "$key is not set in versions.env"
    printf '%s\n' "${!key}"
}

# Version of an npm package installed under the prefix, or empty.
installed_npm_version() {
    local pj="$prefix/lib/node_modules/$1/package.json"
    [ -f "$pj" ] || return 0
    node -e 'try { process.stdout.write(require(process.argv[1]).version || "") } catch (e) {}' "$pj"
}

install_npm_agent() {
    local name="$1" pkg version have
    pkg="$(agent_field "$name" 3)"
    version="$(pinned_version "$name")"
    have="$(installed_npm_version "$pkg")"
    if [ "$have" = "$version" ] && [ -e "$prefix/bin/$name" ]; then
        log "$name $version is already installed"
        return 0
    fi
    command -v npm >/dev/null || die "$name" "npm not found (Node.js is needed)"
    log "$name: installing $pkg@$version into $prefix${have:+ (was $have)}"
    if ! npm install -g --prefix "$prefix" --no-fund --no-audit --loglevel=error \
            "$pkg@$version" >&2; then
        die "$name" "npm install $pkg@$version failed (registry: ${NPM_CONFIG_REGISTRY:-the default})"
    fi
    have="$(installed_npm_version "$pkg")"
    [ "$have" = "$version" ] || die "$name" "npm finished but $pkg is at '${have:-nothing}', not $version"
    [ -e "$prefix/bin/$name" ] || die "$name" "npm finished but $prefix/bin/$name is missing"
    log "$name: ok"
}

install_pypi_agent() {
    local name="$1" pkg version venv python have index=()
    pkg="$(agent_field "$name" 3)"
    version="$(pinned_version "$name")"
    venv="$prefix/lib/$name-venv"
    python="${HERMES_PYTHON:-python3}"
    have=""
    if [ -x "$venv/bin/python" ]; then
        # the distribution's version, and each extra's packages there too (a row may name extras: pkg[mcp])
        have="$("$venv/bin/python" - "$pkg" 2>/dev/null <<'PY' || true
import importlib.metadata as m, re, sys
name, _, extras = sys.argv[1].rstrip("]").partition("[")
wanted = {e.strip() for e in extras.split(",") if e.strip()}
needed = [re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in m.requires(name) or []
          if any(re.search(rf"extra == ['\"]{e}['\"]", r) for e in wanted)]
for requirement in needed:
    m.version(requirement)  # raises when an extra's package is missing: install again
print(m.version(name))
PY
)"
    fi
    if [ "$have" != "$version" ]; then
        command -v "$python" >/dev/null || die "$name" "$python not found"
        if [ ! -x "$venv/bin/python" ]; then
            log "$name: creating virtual environment $venv"
            "$python" -m venv "$venv" || die "$name" "could not create the virtual environment $venv"
        fi
        if [ -z "${PIP_INDEX_URL:-}" ] && [ -n "${UV_INDEX_URL:-}" ]; then
            index=(--index-url "$UV_INDEX_URL")
        fi
        log "$name: installing $pkg==$version into $venv${have:+ (was $have)}"
        if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                ${index[@]+"${index[@]}"} "$pkg==$version" >&2; then
            die "$name" "pip install $pkg==$version failed (index: ${PIP_INDEX_URL:-${UV_INDEX_URL:-the default}})"
        fi
    else
        log "$name $version is already installed"
    fi
    [ -x "$venv/bin/$name" ] || die "$name" "$venv/bin/$name missing after install"
    # A symlink keeps the venv's own interpreter (its shebang) and nothing else
    # of the venv leaks into the user's PATH.
    ln -sfn "$venv/bin/$name" "$prefix/bin/$name"
    log "$name: ok ($prefix/bin/$name)"
}

for name in "${wanted[@]}"; do
    "install_$(agent_field "$name" 2)_agent" "$name"
done
log "done: ${wanted[*]} in $prefix/bin"
