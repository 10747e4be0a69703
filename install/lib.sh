# shellcheck shell=bash
# Helpers shared by the release-download installers (micro.sh, gh.sh,
# databricks.sh). Source it; it does nothing on its own.
#
# Environment it honours:
#   PREFIX                 install root (default ~/.local); binaries go to PREFIX/bin
#   CODA_RELEASE_MIRROR    base URL that replaces https://github.com in release
#                          downloads, e.g. https://artifactory.example.com/github
#                          (the mirror keeps GitHub's paths below it)
#   REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, SSL_CERT_FILE
#                          a CA bundle for HTTPS downloads (first one set wins)
#   ENTERPRISE_MODE=true   warn about every mirror setting left unset
#   CODA_VERSIONS_FILE     pinned versions (default: versions.env next to this file)

CODA_INSTALL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CODA_VERSIONS_FILE="${CODA_VERSIONS_FILE:-$CODA_INSTALL_DIR/versions.env}"
CODA_TOOL="${CODA_TOOL:-install}"
PREFIX="${PREFIX:-$HOME/.local}"
BIN_DIR="$PREFIX/bin"

# ---------------------------------------------------------------- messages

log() { printf '%s: %s\n' "$CODA_TOOL" "$*"; }
warn() { printf '%s: warning: %s\n' "$CODA_TOOL" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$CODA_TOOL" "$*" >&2
    exit 1
}

# --prefix DIR on the command line overrides PREFIX.
parse_common_args() {
    while [ "$#" -gt 0 ]; do
        case "$1" in
            --prefix) [ "$#" -ge 2 ] || die "--prefix needs a directory"; PREFIX="$2"; shift 2 ;;
            --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
            -h | --help)
                echo "usage: $0 [--prefix DIR]   (default: \$PREFIX or ~/.local)"
                exit 0
                ;;
            *) die "unknown argument '$1' (try --help)" ;;
        esac
    done
    BIN_DIR="$PREFIX/bin"
}

# ---------------------------------------------------------------- versions

# pinned_version KEY: the value of KEY=... in versions.env.
pinned_version() {
    local key="$1" value
    [ -f "$CODA_VERSIONS_FILE" ] || die "versions file not found: $CODA_VERSIONS_FILE"
    value="$(sed -n "s/^${key}=//p" "$CODA_VERSIONS_FILE" | tail -n 1)"
    value="${value%%#*}"
    value="${value//\"/}"
    value="${value//\'/}"
    value="${value//[[:space:]]/}"
    [ -n "$value" ] || die "$key is not set in $CODA_VERSIONS_FILE"
    [[ "$value" =~ ^[0-9A-Za-z][0-9A-Za-z._+-]*$ ]] ||
        die "$key in $CODA_VERSIONS_FILE is not a version: '$value'"
    printf '%s\n' "$value"
}

# ---------------------------------------------------------------- platform

# Sets OS (linux, darwin) and ARCH (amd64, arm64, 386, arm): the Go names
# that gh and the Databricks CLI use. micro.sh maps them to its own names.
# shellcheck disable=SC2034  # OS and ARCH are read by the sourcing script
detect_platform() {
    local kernel machine
    kernel="$(uname -s)"
    machine="$(uname -m)"
    case "$kernel" in
        Linux) OS=linux ;;
        Darwin) OS=darwin ;;
        *) die "unsupported operating system '$kernel' (Linux and macOS are supported)" ;;
    esac
    case "$machine" in
        x86_64 | amd64) ARCH=amd64 ;;
        aarch64 | arm64) ARCH=arm64 ;;
        i386 | i486 | i586 | i686) ARCH=386 ;;
        armv6* | armv7*) ARCH=arm ;;
        *) die "unsupported CPU architecture '$machine'" ;;
    esac
}

# ---------------------------------------------------------------- downloads

# The CA bundle to trust for HTTPS, or nothing for the system default.
ca_bundle() {
    local name
    for name in REQUESTS_CA_BUNDLE CURL_CA_BUNDLE SSL_CERT_FILE; do
        if [ -n "${!name:-}" ]; then
            [ -f "${!name}" ] || die "$name points to '${!name}', which is not a file"
            printf '%s\n' "${!name}"
            return
        fi
    done
}

# release_url URL: URL with its https://github.com prefix replaced by the mirror.
release_url() {
    local url="$1" mirror="${CODA_RELEASE_MIRROR:-}"
    mirror="${mirror%/}"
    if [ -n "$mirror" ] && [[ "$url" == https://github.com/* ]]; then
        url="$mirror/${url#https://github.com/}"
    fi
    printf '%s\n' "$url"
}

# fetch URL DEST: download URL to DEST (curl, or Python when curl is missing).
fetch() {
    local url="$1" dest="$2" ca
    ca="$(ca_bundle)"
    if command -v curl >/dev/null 2>&1; then
        local args=(--fail --location --silent --show-error --retry 2
            --connect-timeout 20 --max-time 600 --output "$dest")
        [ -z "$ca" ] || args+=(--cacert "$ca")
        curl "${args[@]}" "$url" || die "download failed: $url"
    else
        python3 - "$url" "$dest" "$ca" <<'PY' || die "download failed: $url"
import shutil, ssl, sys, urllib.request
url, dest, ca = sys.argv[1:4]
context = ssl.create_default_context(cafile=ca or None)
try:
    with urllib.request.urlopen(url, context=context, timeout=60) as answer, open(dest, "wb") as out:
        shutil.copyfileobj(answer, out)
except Exception as error:
    sys.exit(f"{url}: {error}")
PY
    fi
}

# ---------------------------------------------------------------- checksums

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d ' ' -f 1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d ' ' -f 1
    else
        python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
    fi
}

# verify_sha256 FILE SUMS NAME: FILE's SHA-256 must be the one SUMS lists for
# NAME (lines "<hex>  <name>" or "<hex> *<name>", as sha256sum writes them;
# a directory before the name and CRLF line ends are tolerated).
verify_sha256() {
    local file="$1" sums="$2" name="$3" expected actual
    expected="$(awk -v n="$name" '
        { sub(/\r$/, ""); f = $2; sub(/^\*/, "", f); sub(/.*\//, "", f) }
        f == n { print tolower($1); exit }' "$sums")"
    [ -n "$expected" ] || die "no checksum for $name in $(basename "$sums"); refusing to install"
    actual="$(sha256_of "$file")"
    if [ "$actual" != "$expected" ]; then
        die "checksum mismatch for $name: expected $expected, got $actual; nothing installed"
    fi
    log "checksum ok: $name"
}

# ---------------------------------------------------------------- archives

# extract ARCHIVE DIR: unpack a .tar.gz or .zip into DIR.
extract() {
    local archive="$1" dir="$2"
    mkdir -p "$dir"
    case "$archive" in
        *.tar.gz | *.tgz) tar -xzf "$archive" -C "$dir" || die "cannot unpack $(basename "$archive")" ;;
        *.zip)
            if command -v unzip >/dev/null 2>&1; then
                unzip -q -o "$archive" -d "$dir" || die "cannot unpack $(basename "$archive")"
            else
                python3 -m zipfile -e "$archive" "$dir" || die "cannot unpack $(basename "$archive")"
            fi
            ;;
        *) die "unknown archive type: $archive" ;;
    esac
}

# ---------------------------------------------------------------- installing

# reports_version BINARY VERSION: BINARY --version mentions VERSION as a whole
# version (2.0.15 does not match 2.0.150).
reports_version() {
    local binary="$1" version="$2" output
    [ -x "$binary" ] || return 1
    if command -v timeout >/dev/null 2>&1; then
        output="$(timeout 30 "$binary" --version 2>&1 </dev/null)" || return 1
    else
        output="$("$binary" --version 2>&1 </dev/null)" || return 1
    fi
    printf '%s\n' "$output" | grep -Eq "(^|[^0-9.])${version//./\\.}([^0-9.]|$)"
}

# already_installed TOOL VERSION: true (and says so) when PREFIX/bin/TOOL
# already reports VERSION.
already_installed() {
    if reports_version "$BIN_DIR/$1" "$2"; then
        log "$1 $2 is already installed at $BIN_DIR/$1"
        return 0
    fi
    return 1
}

# install_release TOOL VERSION ARCHIVE_URL SUMS_URL MEMBER
# Downloads the archive and the publisher's checksum file (both through the
# mirror), verifies the archive, unpacks it, checks that MEMBER (the path of
# the executable inside the archive) runs and reports VERSION, and only then
# moves it to PREFIX/bin/TOOL. On any failure nothing is installed.
install_release() {
    local tool="$1" version="$2" archive_url sums_url member="$5"
    archive_url="$(release_url "$3")"
    sums_url="$(release_url "$4")"
    local archive_name="${archive_url##*/}" sums_name="${sums_url##*/}"

    CODA_WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/coda-$tool.XXXXXX")"
    trap 'rm -rf "$CODA_WORK_DIR"' EXIT
    local work="$CODA_WORK_DIR"

    log "downloading $archive_url"
    fetch "$archive_url" "$work/$archive_name"
    fetch "$sums_url" "$work/$sums_name"
    verify_sha256 "$work/$archive_name" "$work/$sums_name" "$archive_name"

    extract "$work/$archive_name" "$work/unpacked"
    local binary="$work/unpacked/$member"
    [ -f "$binary" ] || die "$archive_name has no $member"
    chmod 755 "$binary"
    reports_version "$binary" "$version" ||
        die "the downloaded $tool does not report version $version; nothing installed"

    mkdir -p "$BIN_DIR" || die "cannot create $BIN_DIR"
    cp "$binary" "$BIN_DIR/.$tool.new.$$" || die "cannot write to $BIN_DIR"
    mv -f "$BIN_DIR/.$tool.new.$$" "$BIN_DIR/$tool"
    log "installed $tool $version at $BIN_DIR/$tool"
    case ":$PATH:" in
        *":$BIN_DIR:"*) ;;
        *) log "note: $BIN_DIR is not on PATH" ;;
    esac
}

# ---------------------------------------------------------------- enterprise

# With ENTERPRISE_MODE=true, warn about each mirror setting left unset: in a
# locked-down network an unset one means a download from the public internet.
enterprise_warnings() {
    [ "${ENTERPRISE_MODE:-}" = true ] || return 0
    [ -n "${NPM_CONFIG_REGISTRY:-}" ] ||
        warn "ENTERPRISE_MODE=true but NPM_CONFIG_REGISTRY is unset: npm packages come from registry.npmjs.org"
    [ -n "${PIP_INDEX_URL:-}${UV_INDEX_URL:-}" ] ||
        warn "ENTERPRISE_MODE=true but PIP_INDEX_URL and UV_INDEX_URL are unset: Python packages come from pypi.org"
    [ -n "${CODA_RELEASE_MIRROR:-}" ] ||
        warn "ENTERPRISE_MODE=true but CODA_RELEASE_MIRROR is unset: release downloads come from github.com"
    [ -n "${REQUESTS_CA_BUNDLE:-}${CURL_CA_BUNDLE:-}${SSL_CERT_FILE:-}${NODE_EXTRA_CA_CERTS:-}" ] ||
        warn "ENTERPRISE_MODE=true but no CA bundle is set (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, SSL_CERT_FILE, NODE_EXTRA_CA_CERTS): only the system's certificate authorities are trusted"
    return 0
}
