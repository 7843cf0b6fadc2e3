#!/usr/bin/env bash
# Installs everything `make test`, `make demo` and `make bench` need on a fresh Debian 12 machine
# (root, no systemd): Debian packages, the project's virtual environment, the control plane built
# from Go modules, and the guest images. Idempotent: a second run checks and returns in seconds.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export DEBIAN_FRONTEND=noninteractive

# libvirt-daemon-system is deliberately absent: it pulls in systemd-sysv, which would replace init.
# The node of the bed (testbed/node.py): Debian's containerd, runc and CNI plugins, and nftables for
# kube-proxy's nftables mode. The operator's image (testbed/image.py): buildah, and mmdebstrap for the
# Debian base image no registry can give us here. promtool (package prometheus) checks the alert rules.
debs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils libvirt-dev pkg-config
      gcc python3-venv python3-dev busybox-static cpio gzip openssl iproute2 lua5.1
      containerd runc containernetworking-plugins nftables conntrack buildah mmdebstrap prometheus)
missing=()
for deb in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing+=("$deb")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The privileged QEMU driver looks this user up before reading any configuration; the unprivileged
# daemons of the test bed run as it, so nothing the bed starts runs QEMU as root.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

python=$(command -v python3.11 || command -v python3)
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

testbed/controlplane/build.sh >/dev/null
testbed/kstatus/build.sh >/dev/null
.venv/bin/python -m testbed.guests >/dev/null
echo "setup: ready"
