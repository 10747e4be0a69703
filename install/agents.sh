#!/usr/bin/env bash
# Install the pinned agent CLIs that CoDA users run in their terminals.
#
#   install/agents.sh [--prefix DIR] [claude] [codex] [gemini] [opencode] [hermes]
#
# With no agent named, all five are installed. PREFIX (environment) sets the
# default prefix; --prefix wins. Versions come from
# install/versions.env (the one place they are pinned). npm packages go into
# DIR (bin/ and lib/node_modules/), Hermes Agent into its own virtual
# environment DIR/lib/hermes-venv (it ships generic top-level modules such as
# `agent`, `tools`, `utils`), exposed as DIR/bin/hermes.
#
# Idempotent: an agent already installed at its pinned version is skipped.
# Registries: npm honours NPM_CONFIG_REGISTRY, pip honours PIP_INDEX_URL (and
# UV_INDEX_URL is passed on to pip as its index when PIP_INDEX_URL is unset).
# HERMES_PYTHON chooses the interpreter for Hermes' venv (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
versions_file="$here/versions.env"

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

log() { printf 'agents.sh: %s\n' "$*" >&2; }
# die TOOL MESSAGE: the last line on stderr is "<tool>: error: <message>",
# as for the other install/ scripts.
die() { printf '%s: error: %s\n' "$1" "$2" >&2; exit 1; }

prefix="${PREFIX:-$HOME/.local}"
wanted=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --prefix) [ "$#" -ge 2 ] || die agents.sh "--prefix needs a directory"; prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        claude|codex|gemini|opencode|hermes) wanted+=("$1"); shift ;;
        *) die agents.sh "unknown argument '$1' (agents: claude codex gemini opencode hermes)" ;;
    esac
done
[ "${#wanted[@]}" -gt 0 ] || wanted=(claude codex gemini opencode hermes)

[ -f "$versions_file" ] || die agents.sh "missing $versions_file"
# shellcheck source-path=SCRIPTDIR source=versions.env
. "$versions_file"

mkdir -p "$prefix/bin" "$prefix/lib"
prefix="$(cd "$prefix" && pwd)"

# name -> npm package and pinned version
npm_package() {
    case "$1" in
        claude) echo "@anthropic-ai/claude-code" ;;
        codex) echo "@openai/codex" ;;
        gemini) echo "@google/gemini-cli" ;;
        opencode) echo "opencode-ai" ;;
    esac
}
pinned_version() {
    case "$1" in
        claude) echo "${CLAUDE_CODE_VERSION:?not set in versions.env}" ;;
        codex) echo "${CODEX_VERSION:?not set in versions.env}" ;;
        gemini) echo "${GEMINI_CLI_VERSION:?not set in versions.env}" ;;
        opencode) echo "${OPENCODE_VERSION:?not set in versions.env}" ;;
        hermes) echo "${HERMES_AGENT_VERSION:?not set in versions.env}" ;;
    esac
}

# Version of an npm package installed under the prefix, or empty.
installed_npm_version() {
    local pj="$prefix/lib/node_modules/$1/package.json"
    [ -f "$pj" ] || return 0
    node -e 'try { process.stdout.write(require(process.argv[1]).version || "") } catch (e) {}' "$pj"
}

install_npm_agent() {
    local name="$1" pkg version have
    pkg="$(npm_package "$name")"
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

install_hermes() {
    local version venv python have index=()
    version="$(pinned_version hermes)"
    venv="$prefix/lib/hermes-venv"
    python="${HERMES_PYTHON:-python3}"
    have=""
    if [ -x "$venv/bin/python" ]; then
        have="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("hermes-agent"))' 2>/dev/null || true)"
    fi
    if [ "$have" != "$version" ]; then
        command -v "$python" >/dev/null || die hermes "$python not found"
        if [ ! -x "$venv/bin/python" ]; then
            log "hermes: creating virtual environment $venv"
            "$python" -m venv "$venv" || die hermes "could not create the virtual environment $venv"
        fi
        if [ -z "${PIP_INDEX_URL:-}" ] && [ -n "${UV_INDEX_URL:-}" ]; then
            index=(--index-url "$UV_INDEX_URL")
        fi
        log "hermes: installing hermes-agent==$version into $venv${have:+ (was $have)}"
        if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
                ${index[@]+"${index[@]}"} "hermes-agent==$version" >&2; then
            die hermes "pip install hermes-agent==$version failed (index: ${PIP_INDEX_URL:-${UV_INDEX_URL:-the default}})"
        fi
    else
        log "hermes $version is already installed"
    fi
    [ -x "$venv/bin/hermes" ] || die hermes "$venv/bin/hermes missing after install"
    # A symlink keeps the venv's own interpreter (its shebang) and nothing else
    # of the venv leaks into the user's PATH.
    ln -sfn "$venv/bin/hermes" "$prefix/bin/hermes"
    log "hermes: ok ($prefix/bin/hermes)"
}

for name in "${wanted[@]}"; do
    case "$name" in
        hermes) install_hermes ;;
        *) install_npm_agent "$name" ;;
    esac
done
log "done: ${wanted[*]} in $prefix/bin"
