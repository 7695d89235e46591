#!/usr/bin/env bash
# WordNet 3.0 for METEOR (omnivmed-eval), offline afterwards: the Debian package
# wordnet-base is downloaded (no root needed), unpacked into DEST (default
# .cache/wordnet), and the `lexnames` index that nltk's reader needs (Debian ships it only
# as a table in its lexnames(5WN) manual page) is written from that table.
# Then: export OMNIVMED_WORDNET=$DEST. Usage: bash scripts/fetch_wordnet.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=$(realpath -m "${1:-.cache/wordnet}")
if [ -f "$DEST/data.noun" ] && [ -f "$DEST/lexnames" ]; then echo "$DEST"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download wordnet-base >/dev/null 2>&1) \
  || { echo "apt-get download wordnet-base failed: METEOR stays unavailable" >&2; exit 1; }
dpkg -x "$work"/wordnet-base_*.deb "$work/x"
mkdir -p "$DEST"
cp "$work"/x/usr/share/wordnet/* "$DEST"/
# "NN<TAB>pos.name<TAB>description" rows of the manual's table -> "NN<TAB>pos.name<TAB>category"
zcat "$work"/x/usr/share/man/man5/lexnames.5WN.gz \
  | awk -F'\t' '/^[0-9][0-9]\t(adj|adv|noun|verb)\./ {
      name = $2; gsub(/ /, "", name); split(name, part, ".");
      cat = (part[1] == "noun") ? 1 : (part[1] == "verb") ? 2 : (part[1] == "adj") ? 3 : 4;
      printf "%s\t%s\t%d\n", $1, name, cat }' > "$DEST/lexnames"
count=$(wc -l < "$DEST/lexnames")
[ "$count" -eq 45 ] || { echo "lexnames has $count entries, WordNet 3.0 has 45" >&2; exit 1; }
echo "$DEST"
