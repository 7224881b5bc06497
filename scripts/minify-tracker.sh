#!/bin/sh
# Regenerate cadence/api/static/cadence.min.js from cadence.js with terser (npm).
# The first line records the SHA-256 of the source it was built from; a test fails
# when cadence.js changed and this script was not run again.
#   TERSER=/path/to/terser scripts/minify-tracker.sh   (default: npx --yes terser@5)
set -eu
cd "$(dirname "$0")/../cadence/api/static"
hash=$(sha256sum cadence.js | cut -d' ' -f1)
if [ -n "${TERSER:-}" ]; then run="$TERSER"; else run="npx --yes terser@5"; fi
{
    printf '/*! cadence.js (minified from source sha256 %s) - source and docs: /sdk/cadence.js, docs/tracker.md */\n' "$hash"
    $run cadence.js --compress --mangle --comments false
    printf '\n'
} > cadence.min.js.tmp
mv cadence.min.js.tmp cadence.min.js
echo "cadence.min.js: $(wc -c < cadence.min.js) bytes (cadence.js: $(wc -c < cadence.js) bytes)"
