#!/usr/bin/env bash
# Builds the Kubernetes binaries of the bed from the pinned Go modules into a cache outside the work tree,
# keyed by the versions and go.sum, so that only the first run on a machine pays for the build (many
# minutes on 2 cores). Prints the directory holding the binaries. One module and one version for all of
# them: etcd, kube-apiserver and kubectl (the control plane), kube-scheduler and kube-controller-manager
# (what makes it a cluster), kubelet and kube-proxy (the node of testbed/node.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/versions.env"
key="k8s-${KUBERNETES_VERSION}-etcd-${ETCD_VERSION}-$(cat "$0" "$here/go.mod" "$here/go.sum" "$here"/*/main.go | sha256sum | cut -c1-12)"
out="${VMOP_CACHE:-$HOME/.cache/vmop}/controlplane/$key"
binaries=(etcd kube-apiserver kubectl kube-scheduler kube-controller-manager kubelet kube-proxy)
built=yes
for binary in "${binaries[@]}"; do [ -x "$out/$binary" ] || built=no; done
if [ "$built" = yes ]; then
  echo "$out"; exit 0
fi
# Go's own installer puts it under /usr/local/go; a PATH without that is common in non-login shells.
command -v go >/dev/null || PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "build.sh: Go is not on PATH (nor in /usr/local/go/bin); the control plane is built from Go modules" >&2; exit 1; }
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
echo "building etcd ${ETCD_VERSION} and Kubernetes ${KUBERNETES_VERSION} (${binaries[*]}) into $out (first run only; many minutes)" >&2
# Stamp the versions as Kubernetes' own build does: kubectl and the API server report them, and version
# skew checks read them.
minor="${KUBERNETES_VERSION#1.}"; minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $pkg.gitVersion=v${KUBERNETES_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
  ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
(cd "$here" && go build -trimpath -ldflags="$ldflags" -o "$tmp/" "${binaries[@]/#/./}") >&2
mv "$tmp" "$out"
trap - EXIT
echo "$out"
