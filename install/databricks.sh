#!/usr/bin/env bash
# Install the Databricks CLI from its GitHub release into PREFIX/bin (default
# ~/.local/bin), verified against the release's databricks_cli_<version>_SHA256SUMS.
#
#   install/databricks.sh [--prefix DIR]
#
# The version is DATABRICKS_CLI_VERSION in install/versions.env. Re-running
# is a no-op once PREFIX/bin/databricks reports that version. See lib.sh for
# the mirror, CA bundle and ENTERPRISE_MODE settings.
set -euo pipefail
CODA_TOOL=databricks
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_common_args "$@"
enterprise_warnings

version="$(pinned_version DATABRICKS_CLI_VERSION)"
already_installed databricks "$version" && exit 0

detect_platform
case "$ARCH" in
    amd64 | arm64) ;;
    *) die "the Databricks CLI publishes no build for $OS/$ARCH" ;;
esac

base="https://github.com/databricks/cli/releases/download/v$version"
install_release databricks "$version" \
    "$base/databricks_cli_${version}_${OS}_${ARCH}.zip" \
    "$base/databricks_cli_${version}_SHA256SUMS" \
    databricks
