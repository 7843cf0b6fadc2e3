#!/usr/bin/env bash
# Builds the kstatus probe (main.go: Flux's health computation over VirtualMachines) into a cache outside
# the work tree, keyed by the content of this directory's sources, so that only the first run on a machine
# pays for the module download and build. Prints the path of the binary.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
key="$(cat "$0" "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-12)"
out="${VMOP_CACHE:-$HOME/.cache/vmop}/kstatus/$key"
if [ -x "$out/kstatus" ]; then
  echo "$out/kstatus"; exit 0
fi
# Go's own installer puts it under /usr/local/go; a PATH without that is common in non-login shells.
command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "build.sh: Go is not on PATH (nor in /usr/local/go/bin); kstatus is built from Go modules" >&2; exit 1; }
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
echo "building kstatus into $out (first run only)" >&2
(cd "$here" && go build -trimpath -ldflags="-s -w" -o "$tmp/kstatus" .) >&2
mv "$tmp" "$out"
trap - EXIT
echo "$out/kstatus"
