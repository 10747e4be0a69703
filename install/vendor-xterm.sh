#!/usr/bin/env bash
# Refresh static/lib/ with xterm.js and its addons exactly as the npm registry
# ships them: the UMD build (lib/*.js), xterm's stylesheet, and each package's
# LICENSE, unmodified. Versions are pinned below; bump them here and re-run.
# Honours NPM_CONFIG_REGISTRY (and the rest of npm's config) for mirrors.
set -euo pipefail

PACKAGES=(
  "@xterm/xterm@6.0.0"
  "@xterm/addon-fit@0.11.0"
  "@xterm/addon-search@0.16.0"
  "@xterm/addon-web-links@0.12.0"
  "@xterm/addon-clipboard@0.2.0"
  "@xterm/addon-image@0.9.0"
  "@xterm/addon-unicode11@0.9.0"
  "@xterm/addon-webgl@0.19.0"
)
# The terminal fonts the page offers, so each one renders wherever the page is opened:
# the latin subset, regular and bold, with each package's stylesheet and licence.
FONTS=(
  "@fontsource/jetbrains-mono@5.3.0"
  "@fontsource/fira-code@5.3.0"
  "@fontsource/cascadia-code@5.3.0"
  "@fontsource/source-code-pro@5.3.0"
)

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lib="$here/static/lib"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

command -v npm >/dev/null || { echo "vendor-xterm: npm is required" >&2; exit 1; }

rm -rf "$lib"
mkdir -p "$lib"
{
  echo "# Vendored browser libraries"
  echo
  echo "Copied unmodified from the npm registry by \`install/vendor-xterm.sh\`"
  echo "(the UMD build, xterm's stylesheet and each LICENSE). Do not edit these"
  echo "files; change the pinned versions in the script and re-run it."
  echo
  echo "| package | version | licence | files |"
  echo "|---|---|---|---|"
} > "$work/VERSIONS.md"

for spec in "${PACKAGES[@]}"; do
  name="${spec%@*}"          # @xterm/addon-fit
  short="${name#@xterm/}"    # addon-fit, or xterm
  mkdir -p "$work/$short"
  tarball="$(cd "$work" && npm pack --silent "$spec" | tail -n 1)"
  tar -xzf "$work/$tarball" -C "$work/$short" --strip-components=1
  pkg="$work/$short"
  version="$(node -p "require('$pkg/package.json').version")"
  licence="$(node -p "require('$pkg/package.json').license")"
  mkdir -p "$lib/$short"
  cp "$pkg/lib/$short.js" "$pkg/LICENSE" "$lib/$short/"
  files="$short/$short.js"
  if [[ -f "$pkg/css/xterm.css" ]]; then
    cp "$pkg/css/xterm.css" "$lib/$short/"
    files="$files, $short/xterm.css"
  fi
  echo "| \`$name\` | $version | $licence | $files, $short/LICENSE |" >> "$work/VERSIONS.md"
done

for spec in "${FONTS[@]}"; do
  name="${spec%@*}"              # @fontsource/fira-code
  short="${name#@fontsource/}"   # fira-code
  mkdir -p "$work/fonts/$short"
  tarball="$(cd "$work" && npm pack --silent "$spec" | tail -n 1)"
  tar -xzf "$work/$tarball" -C "$work/fonts/$short" --strip-components=1
  pkg="$work/fonts/$short"
  version="$(node -p "require('$pkg/package.json').version")"
  licence="$(node -p "require('$pkg/package.json').license")"
  mkdir -p "$lib/fonts/$short/files"
  files=""
  for weight in 400 700; do
    cp "$pkg/latin-$weight.css" "$lib/fonts/$short/"
    cp "$pkg/files/$short-latin-$weight-normal.woff2" "$pkg/files/$short-latin-$weight-normal.woff" "$lib/fonts/$short/files/"
    files="$files fonts/$short/latin-$weight.css,"
  done
  cp "$pkg/LICENSE" "$lib/fonts/$short/"
  echo "| \`$name\` | $version | $licence |$files fonts/$short/files/ (woff2, woff), fonts/$short/LICENSE |" >> "$work/VERSIONS.md"
done

cat >> "$work/VERSIONS.md" <<'NOTE'

`@xterm/addon-clipboard` bundles its dependency `js-base64` (BSD-3-Clause)
inside `addon-clipboard.js`.

`@xterm/addon-image` decodes Sixel with WebAssembly, which a CSP of
`script-src 'self'` blocks unless it also allows `'wasm-unsafe-eval'`; iTerm
inline images do not need it. `app.js` reads the page's CSP and turns Sixel on
only where WebAssembly is allowed.

The `@fontsource` packages are the fonts' own files under the SIL Open Font
License 1.1 (each LICENSE beside them); only the latin subset, regular and
bold, is copied. The page lists exactly these fonts and the system's monospace.
NOTE

cp "$work/VERSIONS.md" "$lib/VERSIONS.md"
echo "vendor-xterm: refreshed $lib"
