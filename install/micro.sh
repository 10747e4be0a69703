#!/usr/bin/env bash
# Install the micro text editor from its GitHub release into PREFIX/bin
# (default ~/.local/bin), verified against the release's own .sha file.
#
#   install/micro.sh [--prefix DIR]
#
# The version is MICRO_VERSION in install/versions.env. Re-running is a
# no-op once PREFIX/bin/micro reports that version. See lib.sh for the
# mirror, CA bundle and ENTERPRISE_MODE settings.
set -euo pipefail
CODA_TOOL=micro
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_common_args "$@"
enterprise_warnings

version="$(pinned_version MICRO_VERSION)"
already_installed micro "$version" && exit 0

# micro names its builds by platform rather than by Go's OS/arch pair.
detect_platform
case "$OS/$ARCH" in
    linux/amd64) platform=linux64 ;;
    linux/arm64) platform=linux-arm64 ;;
    linux/386) platform=linux32 ;;
    linux/arm) platform=linux-arm ;;
    darwin/amd64) platform=osx ;;
    darwin/arm64) platform=macos-arm64 ;;
    *) die "micro publishes no build for $OS/$ARCH" ;;
esac

archive="micro-$version-$platform.tar.gz"
base="https://github.com/micro-editor/micro/releases/download/v$version"
install_release micro "$version" "$base/$archive" "$base/$archive.sha" "micro-$version/micro"
