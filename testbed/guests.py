"""Guest images for the libvirt test bed: Debian's own kernel plus tiny busybox initramfs images.

The guests exist to exercise the operator's shutdown paths for real: a guest that honours the ACPI power
button (optionally only after ignoring a few presses, or after a delay) and one that never does. Building
them from a Debian kernel package and busybox-static needs nothing beyond Debian's package registry, and
the result is cached because downloading and unpacking a 70 MB kernel package on every run would dominate
the test time.
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
)

_MODULES = ("drivers/input/evdev.ko", "drivers/acpi/button.ko")
"""The power button reaches user space only through these two: Debian builds both as modules
(CONFIG_ACPI_BUTTON=m, CONFIG_INPUT_EVDEV=m), uncompressed and without dependencies, so busybox insmod
loads them as they are."""

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
mkdir -p /etc/vmop
ignore=0
delay=0
poweroff_after=""
suspend_after=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmop.ignore=*) ignore="${{arg#vmop.ignore=}}" ;;
    vmop.delay=*) delay="${{arg#vmop.delay=}}" ;;
    vmop.poweroff_after=*) poweroff_after="${{arg#vmop.poweroff_after=}}" ;;
    vmop.suspend_after=*) suspend_after="${{arg#vmop.suspend_after=}}" ;;
  esac
done
echo "$ignore" > /etc/vmop/ignore
echo "$delay" > /etc/vmop/delay
echo 0 > /tmp/presses

insmod /lib/modules/evdev.ko
insmod /lib/modules/button.ko
button=""
tries=0
while [ -z "$button" ]; do
  for dev in /sys/class/input/event*; do
    if [ "$(cat "$dev/device/name" 2>/dev/null)" = "Power Button" ] && [ -e "/dev/input/${{dev##*/}}" ]; then
      button="/dev/input/${{dev##*/}}"
    fi
  done
  tries=$((tries + 1))
  if [ -z "$button" ] && [ "$tries" -gt 200 ]; then
    echo "GUEST-ERROR no power button input device" > /dev/ttyS0
    while :; do sleep 3600; done
  fi
  [ -n "$button" ] || sleep 0.05
done

acpid -f -c /etc/acpi -l /tmp/acpid.log &
acpid_pid=$!
listening=""
while [ -z "$listening" ]; do
  for fd in /proc/$acpid_pid/fd/*; do
    [ "$(readlink "$fd")" = "$button" ] && listening=yes
  done
  if [ ! -d /proc/$acpid_pid ]; then
    echo "GUEST-ERROR acpid exited" > /dev/ttyS0
    while :; do sleep 3600; done
  fi
  [ -n "$listening" ] || sleep 0.05
done
echo "GUEST-READY coop uptime=$(cat /proc/uptime)" > /dev/ttyS0
if [ -n "$poweroff_after" ]; then
  sleep "$poweroff_after"
  echo "GUEST-POWEROFF by itself" > /dev/ttyS0
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
    suspend_after: float | None = None,
) -> str:
    """Kernel command line for the cooperative guest; the knobs travel there because the initramfs is
    shared by every cooperative guest and only the command line differs per domain.

    poweroff_after: the guest powers itself off this long after it is ready (a crash loop under
    restartPolicy Always). suspend_after: it suspends itself to RAM (ACPI S3) this long after it is ready.
    """
    if ignore_presses < 0:
        raise ValueError(f"ignore_presses must be >= 0, got {ignore_presses}")
    line = f"{_BASE_CMDLINE} vmop.ignore={ignore_presses} vmop.delay={_decimal(shutdown_delay)}"
    if poweroff_after is not None:
        line += f" vmop.poweroff_after={_decimal(poweroff_after)}"
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


def _kernel_package() -> tuple[str, str]:
    """Name and version of the concrete kernel package behind linux-image-amd64.

    The metapackage's own record pins both (`Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)`), which
    saves a second apt-cache call; each costs about 0.5 s here because apt's binary cache is disabled.
    apt-cache answers from the local lists, which are empty on a fresh machine: only then is an
    `apt-get update` worth its time.
    """
    for attempt in range(2):
        show = _run(["apt-cache", "show", "--no-all-versions", "linux-image-amd64"], allow_failure=True)
        for line in show.decode().splitlines():
            if not line.startswith("Depends: "):
                continue
            for dep in line.removeprefix("Depends: ").split(","):
                match = re.fullmatch(r"\s*(linux-image-\d\S*-amd64)\s+\(=\s*(\S+)\)\s*", dep)
                if match:
                    return match.group(1), match.group(2)
        if attempt == 0:
            _run(["apt-get", "update"])
    raise GuestBuildError(
        "apt-cache shows no pinned linux-image-*-amd64 behind linux-image-amd64, even after apt-get update"
    )


def _recipe_hash() -> str:
    """Everything that shapes the images besides the kernel, so that changing any of it rebuilds them."""
    if not BUSYBOX.is_file():
        raise GuestBuildError(f"{BUSYBOX} not found; install the Debian package busybox-static")
    digest = hashlib.sha256()
    for part in (_COOP_INIT, _COOP_POWER_HANDLER, _STUBBORN_INIT, *_APPLETS, *_MODULES):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    return digest.hexdigest()[:12]


def _download(package: str, version: str, debs: Path) -> Path:
    """The .deb stays cached so that a recipe change rebuilds without downloading 70 MB again."""
    debs.mkdir(parents=True, exist_ok=True)
    deb_name = f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    deb = debs / deb_name
    if deb.is_file():
        return deb
    for old in debs.glob("linux-image-*.deb"):
        old.unlink()
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        _run(["apt-get", "download", f"{package}={version}"], cwd=Path(tmp))
        downloaded = Path(tmp) / deb_name
        if not downloaded.is_file():
            raise GuestBuildError(f"apt-get download {package}={version} did not produce {deb_name}")
        downloaded.rename(deb)
    return deb


def _extract_kernel(deb: Path, kver: str, dest: Path) -> None:
    """Pull the kernel and the two modules out of the package's data archive.

    Streaming the archive through tarfile keeps only three files on disk instead of the 400 MB that
    `dpkg-deb -x` would unpack.
    """
    wanted = {
        f"./boot/vmlinuz-{kver}": dest / "vmlinuz",
        **{f"./lib/modules/{kver}/kernel/{m}": dest / "modules" / Path(m).name for m in _MODULES},
    }
    (dest / "modules").mkdir(parents=True)
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
    missing = [name for name, path in wanted.items() if not path.is_file()]
    if proc.returncode != 0 or missing:
        raise GuestBuildError(f"{deb.name}: dpkg-deb exit code {proc.returncode}, missing {missing}")


def _initramfs(root: Path, out: Path, *, init: str, files: dict[str, str], modules: list[Path]) -> None:
    for sub in ("bin", "proc", "sys", "dev", "tmp", "lib/modules", "etc/acpi/PWRF"):
        (root / sub).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in _APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for module in modules:
        shutil.copy2(module, root / "lib" / "modules" / module.name)
    for rel, text in {"init": init, **files}.items():
        path = root / rel
        path.write_text(text)
        path.chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = _run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root, stdin="\n".join(names).encode())
    out.write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))


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
    package, version = _kernel_package()
    key = f"{package.removeprefix('linux-image-')}_{version.replace(':', '%3a')}_{_recipe_hash()}"
    final = guests / key
    images = _images_in(final)
    if final.is_dir():
        return images
    deb = _download(package, version, guests / "debs")
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp.", dir=guests))
    try:
        _extract_kernel(deb, package.removeprefix("linux-image-"), tmp)
        modules = [tmp / "modules" / Path(m).name for m in _MODULES]
        built = _images_in(tmp)
        _initramfs(
            tmp / "root-coop",
            built.coop_initrd,
            init=_COOP_INIT,
            files={"etc/acpi/PWRF/00000080": _COOP_POWER_HANDLER},
            modules=modules,
        )
        _initramfs(tmp / "root-stubborn", built.stubborn_initrd, init=_STUBBORN_INIT, files={}, modules=[])
        for scratch in ("modules", "root-coop", "root-stubborn"):
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
