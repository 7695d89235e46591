#!/usr/bin/env bash
# A headless Chromium for the web viewer's browser test, from the OS's packages without
# root: Debian's chromium-headless-shell and the libraries this machine lacks are
# downloaded and unpacked into DEST (default .cache/chromium); DEST/chromium runs it.
# Prints DEST/chromium. Usage: bash scripts/fetch_chromium.sh [DEST]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=$(realpath -m "${1:-.cache/chromium}")
if [ -x "$DEST/chromium" ] && "$DEST/chromium" --version >/dev/null 2>&1; then echo "$DEST/chromium"; exit 0; fi
mkdir -p "$DEST/debs"
cd "$DEST/debs"
# The package and, transitively, every dependency that is not installed here.
queue=(chromium-headless-shell)
declare -A seen=()
while [ ${#queue[@]} -gt 0 ]; do
  pkg=${queue[0]}; queue=("${queue[@]:1}")
  [ -n "${seen[$pkg]:-}" ] && continue
  seen[$pkg]=1
  apt-get download "$pkg" >/dev/null 2>&1 || { echo "apt-get download $pkg failed" >&2; exit 1; }
  for dep in $(apt-cache depends "$pkg" 2>/dev/null | awk '$1 == "Depends:" && $2 !~ /^</ {print $2}'); do
    dpkg -s "$dep" >/dev/null 2>&1 || queue+=("$dep")
  done
done
for f in *.deb; do dpkg -x "$f" "$DEST/root"; done
libs="$DEST/root/usr/lib/x86_64-linux-gnu:$DEST/root/usr/lib/x86_64-linux-gnu/pulseaudio:$DEST/root/usr/lib/chromium"
cat > "$DEST/chromium" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$DEST/root/usr/lib/chromium/chromium-headless-shell" --no-sandbox --disable-gpu "\$@"
WRAP
chmod +x "$DEST/chromium"
"$DEST/chromium" --version >/dev/null 2>&1 || { echo "the unpacked Chromium does not start" >&2; exit 1; }
echo "$DEST/chromium"
