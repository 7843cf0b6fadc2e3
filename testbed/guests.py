"""Guest images for the libvirt test bed: Debian's own kernel plus tiny busybox initramfs images.

The guests exist to exercise the operator's shutdown paths for real: a guest that honours the ACPI power
button (optionally only after ignoring a few presses, or after a delay) and one that never does. The
cooperative guest can also power itself off unasked, a given time after it is ready or after a key press,
and it carries Debian's own QEMU guest agent, which the kernel command line turns on, hangs or makes
ignore its shutdown command (see `coop_cmdline`). Building them from a Debian kernel package, the
qemu-guest-agent package, busybox-static and the host's C library needs nothing beyond Debian's package
registry, and the result is cached because downloading and unpacking a 70 MB kernel package on every run
would dominate the test time.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
"""busybox-static: a static binary, so the initramfs needs no C library or loader."""

_APPLETS = (
    "sh",
    "mount",
    "insmod",
    "sleep",
    "poweroff",
    "acpid",
    "echo",
    "cat",
    "readlink",
    "mkdir",
    "rmdir",
    "dd",
)

_MODULES = ("drivers/input/evdev.ko", "drivers/acpi/button.ko")
"""The power button reaches user space only through these two: Debian builds both as modules
(CONFIG_ACPI_BUTTON=m, CONFIG_INPUT_EVDEV=m), uncompressed and without dependencies, so busybox insmod
loads them as they are."""

_AGENT_MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/char/virtio_console.ko",
)
"""The agent's channel is a port of a virtio-serial PCI device: virtio_console over the virtio PCI
transport, all modules in Debian's kernel, loaded in this order. The package carries no modules.dep
(depmod writes it on installation), so the build checks each module's own `depends=` instead."""

AGENT_CHANNEL = "org.qemu.guest_agent.0"
"""The name of the guest agent's virtio-serial port, as libvirt and qemu-ga expect it."""

POWEROFF_FROM = ("ready", "key")
"""What `vmop.poweroff_after=S` counts from (`vmop.poweroff_from=`): ready, the guest's GUEST-READY line;
key, the first key press on its PS/2 keyboard after that, which libvirt's virDomainSendKey delivers (a
starting pistol from the host that neither vmop nor libvirt's shutdown machinery takes part in, for
guests that must power themselves off at the same moment however far apart they booted)."""

KEYBOARD = "AT Translated Set 2 keyboard"
"""The input device of QEMU's PS/2 keyboard, which every x86 domain has (the i8042 controller is part of
the machine, and libvirt adds the keyboard of its own accord); Debian builds its drivers into the kernel."""

AGENT_MODES = ("absent", "ok", "hung", "ignore")
"""absent: nothing opens the agent's port. ok: qemu-ga serves it and guest-shutdown powers the guest off.
hung: the port is held open but never read, so every agent command times out. ignore: qemu-ga serves it,
but the guest's /sbin/shutdown does nothing."""

_AGENT_PACKAGE = "qemu-guest-agent"
_AGENT_BINARY = "usr/sbin/qemu-ga"

_MOUNTS = """\
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
"""

# Readiness is announced only once acpid holds the power button's event device open: busybox acpid
# opens the devices only after it has started, so a press sent
# between "acpid started" and "device opened" would be lost, and tests would flake on it.
_COOP_INIT = f"""\
#!/bin/sh
{_MOUNTS}
fail() {{
  echo "GUEST-ERROR $*" > /dev/ttyS0
  while :; do sleep 3600; done
}}
# holds_open PID FILE NAME LOG: wait until the process has FILE open, so that what it serves is ready.
holds_open() {{
  held=""
  while [ -z "$held" ]; do
    for fd in /proc/$1/fd/*; do
      [ "$(readlink "$fd")" = "$2" ] && held=yes
    done
    [ -d /proc/$1 ] || fail "$3 exited: $(cat "$4" 2>/dev/null)"
    [ -n "$held" ] || sleep 0.05
  done
}}
mkdir -p /etc/vmop
ignore=0
delay=0
poweroff_after=""
poweroff_from=ready
suspend_after=""
agent=absent
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmop.ignore=*) ignore="${{arg#vmop.ignore=}}" ;;
    vmop.delay=*) delay="${{arg#vmop.delay=}}" ;;
    vmop.poweroff_after=*) poweroff_after="${{arg#vmop.poweroff_after=}}" ;;
    vmop.poweroff_from=*) poweroff_from="${{arg#vmop.poweroff_from=}}" ;;
    vmop.suspend_after=*) suspend_after="${{arg#vmop.suspend_after=}}" ;;
    vmop.agent=*) agent="${{arg#vmop.agent=}}" ;;
  esac
done
case "$agent" in
  {"|".join(AGENT_MODES)}) ;;
  *) fail "unknown vmop.agent=$agent" ;;
esac
case "$poweroff_from" in
  {"|".join(POWEROFF_FROM)}) ;;
  *) fail "unknown vmop.poweroff_from=$poweroff_from" ;;
esac
echo "$ignore" > /etc/vmop/ignore
echo "$delay" > /etc/vmop/delay
echo "$agent" > /etc/vmop/agent
echo 0 > /tmp/presses

insmod /lib/modules/evdev.ko
insmod /lib/modules/button.ko
if [ "$agent" != absent ]; then
  for module in {" ".join(Path(m).stem for m in _AGENT_MODULES)}; do
    insmod "/lib/modules/$module.ko" || fail "insmod $module failed"
  done
fi
button=""
tries=0
while [ -z "$button" ]; do
  for dev in /sys/class/input/event*; do
    if [ "$(cat "$dev/device/name" 2>/dev/null)" = "Power Button" ] && [ -e "/dev/input/${{dev##*/}}" ]; then
      button="/dev/input/${{dev##*/}}"
    fi
  done
  tries=$((tries + 1))
  [ -n "$button" ] || [ "$tries" -le 200 ] || fail "no power button input device"
  [ -n "$button" ] || sleep 0.05
done

acpid -f -c /etc/acpi -l /tmp/acpid.log &
holds_open $! "$button" acpid /tmp/acpid.log

# The key that starts the power-off timer: read as one input event (24 bytes on x86_64) by a reader that
# holds the keyboard open before GUEST-READY, so that a key sent after that line is never lost.
if [ -n "$poweroff_after" ] && [ "$poweroff_from" = key ]; then
  keyboard=""
  tries=0
  while [ -z "$keyboard" ]; do
    for dev in /sys/class/input/event*; do
      if [ "$(cat "$dev/device/name" 2>/dev/null)" = "{KEYBOARD}" ] && [ -e "/dev/input/${{dev##*/}}" ]; then
        keyboard="/dev/input/${{dev##*/}}"
      fi
    done
    tries=$((tries + 1))
    [ -n "$keyboard" ] || [ "$tries" -le 200 ] || fail "no keyboard input device"
    [ -n "$keyboard" ] || sleep 0.05
  done
  dd if="$keyboard" of=/dev/null bs=24 count=1 2>/tmp/key.log &
  key_reader=$!
  holds_open $key_reader "$keyboard" "the key reader" /tmp/key.log
fi

# No udev here: the agent's port is the vportNpM whose name is the channel's, and devtmpfs has its node.
if [ "$agent" != absent ]; then
  port=""
  tries=0
  while [ -z "$port" ]; do
    for dir in /sys/class/virtio-ports/*; do
      if [ "$(cat "$dir/name" 2>/dev/null)" = {AGENT_CHANNEL} ] && [ -e "/dev/${{dir##*/}}" ]; then
        port="/dev/${{dir##*/}}"
      fi
    done
    tries=$((tries + 1))
    [ -n "$port" ] || [ "$tries" -le 200 ] || fail "no virtio port {AGENT_CHANNEL} (does the domain have the channel?)"
    [ -n "$port" ] || sleep 0.05
  done
  if [ "$agent" = hung ]; then
    # held by init itself, so it is open before the line below and stays open while the guest runs
    exec 3<>"$port"
  else
    /usr/sbin/qemu-ga --method=virtio-serial --path="$port" --statedir=/tmp \
      --logfile=/tmp/qemu-ga.log &
    holds_open $! "$port" qemu-ga /tmp/qemu-ga.log
  fi
  echo "GUEST-AGENT-READY mode=$agent port=$port uptime=$(cat /proc/uptime)" > /dev/ttyS0
fi
echo "GUEST-READY coop uptime=$(cat /proc/uptime)" > /dev/ttyS0
if [ -n "$poweroff_after" ]; then
  if [ "$poweroff_from" = key ]; then
    wait $key_reader
    echo "GUEST-POWEROFF-KEY in $poweroff_after s uptime=$(cat /proc/uptime)" > /dev/ttyS0
  fi
  sleep "$poweroff_after"
  echo "GUEST-POWEROFF by itself uptime=$(cat /proc/uptime)" > /dev/ttyS0
  poweroff -f
fi
if [ -n "$suspend_after" ]; then
  sleep "$suspend_after"
  echo "GUEST-SUSPEND to RAM" > /dev/ttyS0
  echo mem > /sys/power/state
  echo "GUEST-RESUMED from RAM" > /dev/ttyS0
fi
while :; do sleep 3600; done
"""

# acpid starts one handler per press without waiting for the previous one, so the press counter is
# guarded by a mkdir lock (the one atomic primitive busybox sh offers).
_COOP_POWER_HANDLER = """\
#!/bin/sh
while ! mkdir /tmp/presses.lock 2>/dev/null; do sleep 0.01; done
n=$(($(cat /tmp/presses) + 1))
echo "$n" > /tmp/presses
rmdir /tmp/presses.lock
if [ "$n" -le "$(cat /etc/vmop/ignore)" ]; then
  echo "GUEST-POWERBUTTON-IGNORED n=$n" > /dev/ttyS0
  exit 0
fi
echo "GUEST-POWERBUTTON accepted n=$n" > /dev/ttyS0
sleep "$(cat /etc/vmop/delay)"
poweroff -f
"""

# What Debian's qemu-ga runs for guest-shutdown: `/sbin/shutdown -h -P +0 "hypervisor initiated shutdown"`
# (-H for halt, -r for reboot), with its standard streams on /dev/null, hence the explicit console. The
# agent answers nothing when the command exits 0; libvirt then waits for the guest's poweroff instead.
_COOP_SHUTDOWN = """\
#!/bin/sh
if [ "$(cat /etc/vmop/agent)" = ignore ]; then
  echo "GUEST-AGENT-SHUTDOWN-IGNORED args=$*" > /dev/ttyS0
  exit 0
fi
echo "GUEST-AGENT-SHUTDOWN args=$*" > /dev/ttyS0
poweroff -f
"""

_STUBBORN_INIT = f"""\
#!/bin/sh
{_MOUNTS}
echo "GUEST-READY stubborn uptime=$(cat /proc/uptime)" > /dev/ttyS0
while :; do sleep 3600; done
"""

_BASE_CMDLINE = "console=ttyS0 panic=-1 quiet"
STUBBORN_CMDLINE: str = _BASE_CMDLINE


def _decimal(seconds: float) -> str:
    """busybox sleep takes a plain decimal, never an exponent."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    return f"{seconds:.3f}".rstrip("0").rstrip(".") or "0"


def coop_cmdline(
    *,
    ignore_presses: int = 0,
    shutdown_delay: float = 0.0,
    poweroff_after: float | None = None,
    poweroff_from: str = "ready",
    suspend_after: float | None = None,
    agent: str = "absent",
) -> str:
    """Kernel command line for the cooperative guest; the knobs travel there because the initramfs is
    shared by every cooperative guest and only the command line differs per domain.

    poweroff_after (`vmop.poweroff_after=`): the guest powers itself off unasked (`poweroff -f`, the ACPI
    power-off its power button handler uses too, so libvirt says SHUTOFF_SHUTDOWN) this many seconds after
    it printed GUEST-READY, or with poweroff_from="key" after the first key press that follows (see
    POWEROFF_FROM); it prints GUEST-POWEROFF just before (and GUEST-POWEROFF-KEY on the key). Under
    restartPolicy Always that is a crash loop. suspend_after: it suspends itself to RAM (ACPI S3) this long
    after it is ready.
    agent (`vmop.agent=`, see AGENT_MODES): what answers on the guest agent's channel, which the domain
    must then have; any mode but absent prints GUEST-AGENT-READY before GUEST-READY.
    """
    if ignore_presses < 0:
        raise ValueError(f"ignore_presses must be >= 0, got {ignore_presses}")
    if agent not in AGENT_MODES:
        raise ValueError(f"agent must be one of {AGENT_MODES}, got {agent!r}")
    if poweroff_from not in POWEROFF_FROM:
        raise ValueError(f"poweroff_from must be one of {POWEROFF_FROM}, got {poweroff_from!r}")
    if poweroff_from != "ready" and poweroff_after is None:
        raise ValueError(f"poweroff_from={poweroff_from!r} needs poweroff_after: it says what the timer counts from")
    line = f"{_BASE_CMDLINE} vmop.ignore={ignore_presses} vmop.delay={_decimal(shutdown_delay)}"
    if agent != "absent":
        line += f" vmop.agent={agent}"
    if poweroff_after is not None:
        line += f" vmop.poweroff_after={_decimal(poweroff_after)}"
        if poweroff_from != "ready":
            line += f" vmop.poweroff_from={poweroff_from}"
    if suspend_after is not None:
        line += f" vmop.suspend_after={_decimal(suspend_after)}"
    return line


@dataclass(frozen=True)
class GuestImages:
    kernel: Path
    coop_initrd: Path
    stubborn_initrd: Path


class GuestBuildError(RuntimeError):
    """The images could not be built; the message names the missing tool or failing step."""


def cache_root() -> Path:
    """The project's cache, shared by all parts of the test bed, so that one variable relocates it."""
    env = os.environ.get("VMOP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vmop"


def _run(argv: list[str], *, cwd: Path | None = None, stdin: bytes | None = None, allow_failure: bool = False) -> bytes:
    if shutil.which(argv[0]) is None:
        raise GuestBuildError(f"{argv[0]} not found on PATH; it is needed to build the guest images")
    proc = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, check=False)
    if proc.returncode != 0 and not allow_failure:
        raise GuestBuildError(
            f"{' '.join(argv)} failed with exit code {proc.returncode}:\n{proc.stderr.decode(errors='replace')[-2000:]}"
        )
    return proc.stdout


@dataclass(frozen=True)
class _Packages:
    kernel: str
    kernel_version: str
    agent_version: str


def _packages() -> _Packages:
    """The concrete kernel package behind linux-image-amd64 and its version, and qemu-guest-agent's version.

    The metapackage's own record pins the kernel (`Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)`),
    which saves a second apt-cache call, and one call shows both records; each costs about 0.5 s here
    because apt's binary cache is disabled. apt-cache answers from the local lists, which are empty on a
    fresh machine: only then is an `apt-get update` worth its time.
    """
    for attempt in range(2):
        show = _run(["apt-cache", "show", "--no-all-versions", "linux-image-amd64", _AGENT_PACKAGE], allow_failure=True)
        kernel: tuple[str, str] | None = None
        agent_version: str | None = None
        for record in show.decode().split("\n\n"):
            fields = dict(
                line.split(": ", 1) for line in record.splitlines() if ": " in line and not line.startswith(" ")
            )
            if fields.get("Package") == _AGENT_PACKAGE:
                agent_version = fields.get("Version")
            elif fields.get("Package") == "linux-image-amd64":
                for dep in fields.get("Depends", "").split(","):
                    match = re.fullmatch(r"\s*(linux-image-\d\S*-amd64)\s+\(=\s*(\S+)\)\s*", dep)
                    if match:
                        kernel = match.group(1), match.group(2)
        if kernel is not None and agent_version is not None:
            return _Packages(kernel=kernel[0], kernel_version=kernel[1], agent_version=agent_version)
        if attempt == 0:
            _run(["apt-get", "update"])
    raise GuestBuildError(
        f"apt-cache shows no pinned linux-image-*-amd64 behind linux-image-amd64 or no {_AGENT_PACKAGE}, "
        "even after apt-get update"
    )


def _recipe_hash(agent_version: str) -> str:
    """Everything that shapes the images besides the kernel, so that changing any of it rebuilds them.

    The host's shared libraries that qemu-ga runs with are not part of it: they are copied together with
    the binary, so a cached image stays consistent when the host's change later.
    """
    if not BUSYBOX.is_file():
        raise GuestBuildError(f"{BUSYBOX} not found; install the Debian package busybox-static")
    digest = hashlib.sha256()
    for part in (
        _COOP_INIT,
        _COOP_POWER_HANDLER,
        _COOP_SHUTDOWN,
        _STUBBORN_INIT,
        *_APPLETS,
        *_MODULES,
        *_AGENT_MODULES,
        _AGENT_BINARY,
        agent_version,
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    return digest.hexdigest()[:12]


def _download(package: str, version: str, debs: Path, *, stale: str) -> Path:
    """The .deb stays cached so that a recipe change rebuilds without downloading 70 MB again; older
    versions (matching the glob `stale`) are removed."""
    debs.mkdir(parents=True, exist_ok=True)
    deb_name = f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    deb = debs / deb_name
    if deb.is_file():
        return deb
    for old in debs.glob(stale):
        old.unlink()
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        _run(["apt-get", "download", f"{package}={version}"], cwd=Path(tmp))
        downloaded = Path(tmp) / deb_name
        if not downloaded.is_file():
            raise GuestBuildError(f"apt-get download {package}={version} did not produce {deb_name}")
        downloaded.rename(deb)
    return deb


def _extract(deb: Path, wanted: dict[str, Path]) -> None:
    """Pull the named files (`./path` as in the package's data archive) out of a package.

    Streaming the archive through tarfile keeps only these files on disk instead of the 400 MB that
    `dpkg-deb -x` would unpack for the kernel.
    """
    for path in wanted.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                target = wanted.get(member.name)
                if target is None or not member.isfile():
                    continue
                source = tar.extractfile(member)
                assert source is not None
                with source, target.open("wb") as out:
                    shutil.copyfileobj(source, out)
                target.chmod(member.mode & 0o755)
    missing = [name for name, path in wanted.items() if not path.is_file()]
    if proc.returncode != 0 or missing:
        raise GuestBuildError(f"{deb.name}: dpkg-deb exit code {proc.returncode}, missing {missing}")


def _check_load_order(modules: list[Path]) -> None:
    """Each module may depend only on modules loaded before it, as its .modinfo's `depends=` says; a new
    dependency in a later kernel then fails the build, not the guest's boot."""
    loaded: set[str] = set()
    for module in modules:
        match = re.search(rb"\0depends=([^\0]*)\0", module.read_bytes())
        if match is None:
            raise GuestBuildError(f"{module.name} has no depends= in its .modinfo")
        depends = {name.decode() for name in match.group(1).split(b",") if name}
        if not depends <= loaded:
            raise GuestBuildError(f"{module.name} depends on {sorted(depends - loaded)}, not loaded before it")
        loaded.add(module.stem)


_LDD_LINE = re.compile(r"\s*(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)")


def _with_libraries(binary: Path, rel: str) -> dict[str, Path]:
    """The binary and every shared library it loads, including the dynamic loader, each at the path the
    host's loader finds it at (initramfs path to host file); the initramfs has no ld.so.cache, and the
    loader's built-in search path covers these directories."""
    out = _run(["ldd", str(binary)]).decode()
    if "not found" in out:
        raise GuestBuildError(f"{rel} needs libraries this host lacks:\n{out}")
    files = {rel: binary}
    for line in out.splitlines():
        match = _LDD_LINE.fullmatch(line)
        if match:
            files[match.group(1).lstrip("/")] = Path(match.group(1))
        elif "linux-vdso" not in line:
            raise GuestBuildError(f"unexpected ldd output for {rel}: {line!r}")
    return files


def _initramfs(
    root: Path,
    out: Path,
    *,
    init: str,
    files: dict[str, str],
    modules: list[Path],
    binaries: dict[str, Path] | None = None,
) -> None:
    for sub in ("bin", "proc", "sys", "dev", "tmp", "lib/modules", "etc/acpi/PWRF"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in _APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for module in modules:
        shutil.copy2(module, root / "lib" / "modules" / module.name)
    for rel, source in (binaries or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / rel)
        (root / rel).chmod(0o755)
    for rel, text in {"init": init, **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = _run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root, stdin="\n".join(names).encode())
    # level 9 takes 1.6 s for the coop image, which carries qemu-ga and its C library, for 0.4 % less
    out.write_bytes(gzip.compress(archive, compresslevel=6, mtime=0))


def _images_in(directory: Path) -> GuestImages:
    return GuestImages(
        kernel=directory / "vmlinuz",
        coop_initrd=directory / "coop.cpio.gz",
        stubborn_initrd=directory / "stubborn.cpio.gz",
    )


def build_images(cache_dir: Path | None = None) -> GuestImages:
    """Build the images unless the cache already holds them for this kernel and recipe.

    Each build happens in a private directory renamed into place at the end, so concurrent test beds
    never see half-written images and the loser of a race simply discards its copy.
    """
    guests = (cache_dir or cache_root()) / "guests"
    packages = _packages()
    kver = packages.kernel.removeprefix("linux-image-")
    key = f"{kver}_{packages.kernel_version.replace(':', '%3a')}_{_recipe_hash(packages.agent_version)}"
    final = guests / key
    images = _images_in(final)
    if final.is_dir():
        return images
    kernel_deb = _download(packages.kernel, packages.kernel_version, guests / "debs", stale="linux-image-*.deb")
    agent_deb = _download(_AGENT_PACKAGE, packages.agent_version, guests / "debs", stale=f"{_AGENT_PACKAGE}_*.deb")
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp.", dir=guests))
    try:
        modules = {
            f"./lib/modules/{kver}/kernel/{m}": tmp / "modules" / Path(m).name for m in _MODULES + _AGENT_MODULES
        }
        _extract(kernel_deb, {f"./boot/vmlinuz-{kver}": tmp / "vmlinuz", **modules})
        _check_load_order(list(modules.values()))
        agent = tmp / "agent" / Path(_AGENT_BINARY).name
        _extract(agent_deb, {f"./{_AGENT_BINARY}": agent})
        built = _images_in(tmp)
        _initramfs(
            tmp / "root-coop",
            built.coop_initrd,
            init=_COOP_INIT,
            files={"etc/acpi/PWRF/00000080": _COOP_POWER_HANDLER, "sbin/shutdown": _COOP_SHUTDOWN},
            modules=list(modules.values()),
            binaries=_with_libraries(agent, _AGENT_BINARY),
        )
        _initramfs(tmp / "root-stubborn", built.stubborn_initrd, init=_STUBBORN_INIT, files={}, modules=[])
        for scratch in ("modules", "agent", "root-coop", "root-stubborn"):
            shutil.rmtree(tmp / scratch)
        # readable by the unprivileged daemons that boot them
        tmp.chmod(0o755)
        for path in (built.kernel, built.coop_initrd, built.stubborn_initrd):
            path.chmod(0o644)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return images


def main() -> None:
    images = build_images()
    for path in (images.kernel, images.coop_initrd, images.stubborn_initrd):
        print(path)


if __name__ == "__main__":
    main()
