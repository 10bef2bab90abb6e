#!/usr/bin/env bash
# Renders an HTML report with headless Chromium and saves a screenshot (a render check).
# Usage: scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
  exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1400,3000}
[ -f "$report" ] || { echo "no such report: $report" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "Chromium not found (Debian: apt-get install -y chromium)" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --screenshot="$out" --window-size="$size" \
  "file://$report" 2>/dev/null
[ -s "$out" ] || { echo "Chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
