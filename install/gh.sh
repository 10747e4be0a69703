#!/usr/bin/env bash
# Install the GitHub CLI from its GitHub release into PREFIX/bin (default
# ~/.local/bin), verified against the release's gh_<version>_checksums.txt,
# plus PREFIX/bin/gh-login: a plain sign-in that avoids gh's arrow-key menus.
#
#   install/gh.sh [--prefix DIR]
#
# The version is GH_VERSION in install/versions.env. Re-running is a no-op
# once PREFIX/bin/gh reports that version. See lib.sh for the mirror, CA
# bundle and ENTERPRISE_MODE settings.
set -euo pipefail
CODA_TOOL=gh
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_common_args "$@"
enterprise_warnings

install_login_wrapper() {
    mkdir -p "$BIN_DIR"
    cp "$CODA_INSTALL_DIR/gh-login" "$BIN_DIR/.gh-login.new.$$"
    chmod 755 "$BIN_DIR/.gh-login.new.$$"
    mv -f "$BIN_DIR/.gh-login.new.$$" "$BIN_DIR/gh-login"
}

version="$(pinned_version GH_VERSION)"
if already_installed gh "$version"; then
    install_login_wrapper
    exit 0
fi

detect_platform
case "$OS/$ARCH" in
    linux/arm) name="gh_${version}_linux_armv6" ext=tar.gz ;;
    linux/*) name="gh_${version}_linux_$ARCH" ext=tar.gz ;;
    darwin/amd64 | darwin/arm64) name="gh_${version}_macOS_$ARCH" ext=zip ;;
    *) die "the GitHub CLI publishes no build for $OS/$ARCH" ;;
esac

base="https://github.com/cli/cli/releases/download/v$version"
install_release gh "$version" "$base/$name.$ext" "$base/gh_${version}_checksums.txt" "$name/bin/gh"
install_login_wrapper
log "installed gh-login at $BIN_DIR/gh-login (sign in with a token, no menus)"
