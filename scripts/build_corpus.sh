#!/usr/bin/env bash
# Rebuild the public-domain English training corpus (the King James Bible, 4.3 MB of text) from
# Debian's bible-kjv and bible-kjv-text packages, without installing them: download, unpack into
# a temporary folder, and dump every verse with the package's own reader.
#   scripts/build_corpus.sh [OUT]   (default: data/kjv.txt)
set -euo pipefail
out=${1:-data/kjv.txt}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download bible-kjv bible-kjv-text >/dev/null 2>&1)
for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/root"; done
mkdir -p "$(dirname "$out")"
"$tmp/root/usr/bin/bible" -p "$tmp/root/usr/lib" "Gen1:1-Rev22:21" > "$out"
echo "wrote $out ($(wc -c < "$out") bytes)"
