"""A real Kubernetes node on this machine: containerd, kubelet and kube-proxy, pods on a bridge of the bed's own.

Two steps, because the API server must listen where pods can reach it, which is an address of the node's
bridge, and that bridge must exist before the API server binds it:

    node = Node.create()                                    # the bridge and its /24, the machine-wide lock
    cp = ControlPlane.start(address=node.ip, cluster=True)
    node.start(cp)                                          # returns once the Node is Ready
    ...
    cp.stop()
    node.stop()                                             # after cp.stop(): see below

containerd and kubelet write to paths nobody can configure (/var/lib/kubelet/device-plugins, /var/lib/cni,
/run/containerd, /run/netns, /var/log/containers, ...) and kubelet sets six kernel sysctls (panic on oops,
overcommit, ...) unless they already hold its values. Both therefore run in a mount namespace of the node's
own, where those directories are private tmpfs and those sysctls read as kubelet wants them: the machine keeps
its settings, and every mount of the node (kubelet's, the pods' volumes, the netns files) disappears with the
last process of that namespace, so a crashed bed cannot leave mounts behind. Every process of the node runs
under a subreaper of testbed/reaper.py, so that containerd's shims and the containers, which leave their
parents, are still killed by PID at stop() or when the bed dies.

The control plane stops first: its shutdown requests go to its own address, which is the bridge's, and once
the bridge is gone they would follow the default route off the machine (and time out).

What remains machine-wide: kube-proxy's nftables tables, whose names are fixed ("kube-proxy" in ip and ip6),
and the kubelet's pod cgroups (under a cgroup root named after the node). One node per machine, then: a lock
in the cache directory says which bed has it.

A bed that is killed (SIGKILL, a session that ends under it) loses its processes, which die with it, but not
what the kernel keeps: the tables, the bridge, the cgroups, the mount points, the work dir. The lock file
therefore holds a record of what the node has made on the machine, and stop() empties it; the next
Node.create() that finds a record in a lock nobody holds clears what it lists, once no process of that node
is left. Without that, one killed run would fail every later run on the machine with "another kube-proxy".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import ipaddress
import json
import os
import platform
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import kubernetes.client
import yaml

from testbed.controlplane import ControlPlane
from testbed.processes import alive, free_ports, tail_file
from testbed.reaper import Reaper, ReaperError
from testbed.wait import WaitTimeout, wait_until

CACHE_DIR = Path(os.environ.get("VMOP_CACHE", Path.home() / ".cache" / "vmop")) / "node"
LOCK_FILE = CACHE_DIR / "node.lock"
POD_NETWORKS = ipaddress.IPv4Network("10.244.0.0/16")
PAUSE_IMAGE = "vmop.test/pause:1"
BUSYBOX_IMAGE = "vmop.test/busybox:1"
_NAMESPACE = "k8s.io"
# The only system tools the node's daemons find (with /usr/bin): kubelet would otherwise find iptables and add
# KUBE-* chains to the machine's tables; without it, it says "no iptables support" and carries on.
_SBIN_TOOLS = ("runc", "nft", "conntrack")
# Written by kubelet, containerd, runc or the CNI plugins whatever their configuration says; each becomes a
# private tmpfs in the node's mount namespace, created as an empty mount point first if the machine lacks it.
_FIXED_DIRS = (
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/run/netns",
    "/usr/libexec/kubernetes",
)
# What kubelet's setupKernelTunables writes unless protectKernelDefaults, which instead refuses to start.
_KUBELET_SYSCTLS = {
    "vm/overcommit_memory": 1,
    "vm/panic_on_oom": 0,
    "kernel/panic": 10,
    "kernel/panic_on_oops": 1,
    "kernel/keys/root_maxkeys": 1000000,
    "kernel/keys/root_maxbytes": 25000000,
}
_PROXY_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))
_PAUSE_C = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""


class NodeError(RuntimeError):
    """The node could not be created, started or driven; the message says what a person needs to act."""


# ---- images: nothing can be pulled here, so the bed makes the few it needs


ImageFile = tuple[str, bytes | str, int]
"""A file of an image: its path (relative), its content or, as a str, the target of a symlink, and its mode."""


def _architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _layer(files: Iterable[ImageFile]) -> bytes:
    """An uncompressed layer of (path, content or symlink target, mode); fixed owners and times, so that the
    same files give the same digest and the cache key holds."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path, content, mode in files:
            for parent in reversed(Path(path).parents[:-1]):
                if str(parent) not in dirs:
                    dirs.add(str(parent))
                    info = tarfile.TarInfo(str(parent))
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.mode = mode
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _write_oci_archive(dest: Path, name: str, layer: bytes, config: dict[str, Any]) -> None:
    """An OCI image layout as a tar, which `ctr images import` takes; the annotation names the image."""
    blobs: dict[str, bytes] = {}

    def blob(media_type: str, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer_desc = blob("application/vnd.oci.image.layer.v1.tar", layer)
    image_config = {
        "architecture": _architecture(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob("application/vnd.oci.image.config.v1+json", json.dumps(image_config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = blob("application/vnd.oci.image.manifest.v1+json", json.dumps(manifest).encode())
    manifest_desc["platform"] = {"architecture": _architecture(), "os": "linux"}
    manifest_desc["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
    members = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
        **{f"blobs/sha256/{digest.removeprefix('sha256:')}": data for digest, data in blobs.items()},
    }
    with tarfile.open(dest, "w") as tar:
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _cached_archive(stem: str, key: bytes, build: Callable[[Path], None]) -> Path:
    """The archive for key from the cache, built first if missing; written aside and renamed, so that a
    concurrent or interrupted build never leaves a half archive under the final name."""
    path = CACHE_DIR / f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}.tar"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp.{os.getpid()}")
        try:
            build(partial)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def pause_image() -> Path:
    """The sandbox image: a static C pause that reaps its children and ends on SIGTERM, as Kubernetes' does."""
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout

    def build(dest: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="vmop-pause-") as tmp:
            source, binary = Path(tmp) / "pause.c", Path(tmp) / "pause"
            source.write_text(_PAUSE_C)
            _run(["gcc", "-static", "-Os", "-s", "-o", str(binary), str(source)])
            layer = _layer([("pause", binary.read_bytes(), 0o755)])
        _write_oci_archive(dest, PAUSE_IMAGE, layer, {"Entrypoint": ["/pause"]})

    return _cached_archive("pause", (_PAUSE_C + gcc).encode(), build)


def image_archive(name: str, files: Iterable[ImageFile], config: dict[str, Any]) -> Path:
    """An image archive for Node.import_image with these files as its one layer and this OCI image config
    ("Env", "Cmd", ...); cached by content, so the same files give the same archive without writing it again."""
    layer = _layer(files)
    key = layer + name.encode() + json.dumps(config, sort_keys=True).encode()
    return _cached_archive("image", key, lambda dest: _write_oci_archive(dest, name, layer, config))


def busybox_files(busybox: Path = Path("/bin/busybox")) -> list[ImageFile]:
    """The machine's static busybox (Debian's busybox-static) as /bin/busybox, a link per applet, and /tmp."""
    if not busybox.is_file():
        raise NodeError(f"{busybox} is missing: install the busybox-static package")
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout
    files: list[ImageFile] = [("bin/busybox", busybox.read_bytes(), 0o755)]
    files += [(f"bin/{applet}", "busybox", 0o777) for applet in applets.split() if applet != "busybox"]
    files.append(("tmp/.keep", b"", 0o644))
    return files


def busybox_image() -> Path:
    """BUSYBOX_IMAGE: busybox_files() and PATH=/bin."""
    return image_archive(BUSYBOX_IMAGE, busybox_files(), {"Env": ["PATH=/bin"], "Cmd": ["sh"]})


# ---- the machine: addresses, interfaces, tables


def _ip_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return list(json.loads(out or "[]"))


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination routed and every address configured here: a pod /24 must overlap none."""
    used: list[ipaddress.IPv4Network] = []
    for route in _ip_json("-4", "route", "show", "table", "all"):
        dst = route.get("dst", "default")
        if dst != "default":
            used.append(ipaddress.IPv4Network(dst, strict=False))
    for link in _ip_json("-4", "addr"):
        for addr in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return used


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _networks_in_use()
    candidates = list(POD_NETWORKS.subnets(new_prefix=24))
    random.shuffle(candidates)
    for candidate in candidates:
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NodeError(f"every /24 of {POD_NETWORKS} is already routed or addressed on this machine")


def _run(argv: list[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _nft_table_exists(family: str, table: str) -> bool:
    return _run(["nft", "list", "table", family, table], check=False).returncode == 0


def _nft_tables() -> set[str]:
    """ "family name" of every nftables table (iptables-nft's included) in this network namespace."""
    lines = _run(["nft", "list", "tables"]).stdout.splitlines()
    return {line.removeprefix("table ").strip() for line in lines if line.startswith("table ")}


def _quietly(check: Callable[[Path], bool], proc: Path) -> bool:
    """check(proc), False if the process went away meanwhile (or was never readable)."""
    try:
        return check(proc)
    except (OSError, ValueError):
        return False


def _cgroup_hierarchies() -> list[Path]:
    """Every cgroup file system mounted under /sys/fs/cgroup (v1 hierarchies and a v2 one, if any)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2") and fields[4].startswith("/sys/fs/cgroup/"):
            found.append(Path(fields[4]))
    return found


def _unix_socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _overlay_works(directory: Path) -> bool:
    """containerd's overlayfs snapshotter needs overlay mounts on the file system of its root."""
    for sub in ("lower", "upper", "work", "merged"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={directory / 'lower'},upperdir={directory / 'upper'},workdir={directory / 'work'}"
    # In a throwaway mount namespace, so nothing needs unmounting whatever happens.
    works = _run(
        ["unshare", "--mount", "mount", "-t", "overlay", "overlay", "-o", opts, str(directory / "merged")], check=False
    )
    shutil.rmtree(directory, ignore_errors=True)
    return works.returncode == 0


class _Lock:
    """The machine's one node slot: kube-proxy's nftables tables have fixed names, so two nodes would fight.

    The file holds the holder's record (JSON, see Node._record) while it is held; a record found by the
    next holder is what a killed bed left behind (`dead`).
    """

    def __init__(self) -> None:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = LOCK_FILE.open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "an unknown process"
            self._file.close()
            raise NodeError(
                f"another test-bed node runs on this machine ({holder}; lock {LOCK_FILE}): only one node per "
                "machine, since kube-proxy's nftables tables have fixed names"
            ) from None
        self._file.seek(0)
        left = self._file.read().strip()
        try:
            self.dead: dict[str, Any] | None = json.loads(left) if left else None
        except json.JSONDecodeError:
            self.dead = None
            print(f"{LOCK_FILE} held {left!r}, not a node record: nothing to clear", file=sys.stderr)

    def record(self, record: dict[str, Any]) -> None:
        """Say who holds the slot and what it has made, for another bed's message and for clearing."""
        self._file.truncate(0)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.truncate(0)
            self._file.close()  # closing drops the flock


class Node:
    """One node (containerd, kubelet, kube-proxy) with its bridge; make it with `Node.create()`, then start()."""

    def __init__(self, workdir: Path, lock: _Lock, subnet: ipaddress.IPv4Network, suffix: str) -> None:
        self.workdir = workdir
        self.name = f"vmop-node-{suffix}"
        self.bridge = f"vmopbr{suffix}"
        self.subnet = subnet
        self.ip = str(subnet.network_address + 1)
        self.log_dir = workdir / "logs"
        self.containerd_socket = workdir / "containerd.sock"
        self.snapshotter = "overlayfs"
        self._lock = lock
        self._cgroup_root = f"vmop-{suffix}"
        self._made_dirs: list[Path] = []
        self._adopted: list[Path] = []
        self._reapers: dict[str, Reaper] = {}
        self._pids: set[int] = set()
        self._mount_ns: int | None = None
        self._containerd_pid = 0
        self._stopped_at: int | None = None
        """When stop() had ended every process of the node, in clock ticks since boot as /proc/PID/stat says."""
        self._tables_ours = False
        self._tables_before: set[str] = set()
        self._stopped = False
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # ---- lifecycle

    @classmethod
    def create(cls, workdir: Path | None = None) -> Node:
        """Take the machine's node slot and make the bridge with the node's address (a free /24 of
        10.244.0.0/16, the host at .1); nothing runs yet. workdir (a new directory by default) belongs to
        the node from then on and is deleted by stop()."""
        lock = _Lock()
        try:
            if lock.dead is not None:
                cls._clear_dead(lock, lock.dead)
        except BaseException:
            lock.release()
            raise
        suffix = secrets.token_hex(2)  # short: a bridge name has at most 15 characters
        try:
            subnet = _pick_subnet()
            if workdir is None:
                workdir = Path(tempfile.mkdtemp(prefix=f"vmop-node-{suffix}-", dir="/var/tmp"))
            else:
                workdir.mkdir(parents=True, exist_ok=True)
            node = cls(workdir, lock, subnet, suffix)
            node._record()
        except BaseException:
            lock.release()
            raise
        try:
            _run(["ip", "link", "add", "name", node.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{node.ip}/{node.subnet.prefixlen}", "dev", node.bridge])
            _run(["ip", "link", "set", node.bridge, "up"])
        except BaseException:
            node.stop(keep_logs=True)
            raise
        return node

    def _record(self) -> None:
        """Written before each thing is made, so that a bed killed at any point leaves a record of it all."""
        self._lock.record(
            {
                "pid": os.getpid(),
                "workdir": str(self.workdir),
                "subnet": str(self.subnet),
                "suffix": self.name.removeprefix("vmop-node-"),
                "made_dirs": [str(d) for d in self._made_dirs],
                "adopted": [str(p) for p in self._adopted],
                "tables": self._tables_ours,
            }
        )

    @classmethod
    def _clear_dead(cls, lock: _Lock, record: dict[str, Any]) -> None:
        """Clear what the node of a killed bed left, as stop() would have; refuse while any of its processes
        lives (they die with the bed, but a reaper that was itself killed leaves its daemon running)."""
        dead = cls(Path(record["workdir"]), lock, ipaddress.IPv4Network(record["subnet"]), record["suffix"])
        dead._made_dirs = [Path(d) for d in record["made_dirs"]]
        dead._adopted = [Path(p) for p in record["adopted"]]
        dead._tables_ours = bool(record["tables"])
        remaining = [proc.name for proc in dead._processes()]
        if remaining:
            raise NodeError(
                f"node {dead.name} of a bed that died (pid {record['pid']}) still has processes {', '.join(remaining)}:"
                f" stop them by PID, and the next bed clears the rest (record in {LOCK_FILE})"
            )
        left = dead.leftovers()
        dead._clear_machine()
        shutil.rmtree(dead.workdir, ignore_errors=True)
        print(
            f"node {dead.name} of a bed that died (pid {record['pid']}) had left: {'; '.join(left) or 'nothing'};"
            f" cleared, and now left: {'; '.join(dead.leftovers()) or 'nothing'}",
            file=sys.stderr,
        )

    def adopt(self, path: Path) -> None:
        """path, a directory made on the machine for the node's pods (a hostPath the kubelet created), goes
        with the node: at stop(), or when the next bed clears a killed one."""
        self._adopted.append(path)
        self._record()

    def __enter__(self) -> Node:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(keep_logs=exc is not None)

    def start(self, control_plane: ControlPlane, *, timeout: float = 120) -> None:
        """Start containerd, kubelet (registering as self.name) and kube-proxy against control_plane, which
        must have been started with address=self.ip and cluster=True; return once the Node is Ready and
        kube-proxy has programmed the Services. On failure everything is stopped, the logs are kept, and
        the error quotes their tails and says where they are."""
        try:
            self._start(control_plane, timeout)
        except BaseException as exc:
            kept = self.stop(keep_logs=True)
            if isinstance(exc, NodeError | WaitTimeout):
                raise NodeError(f"{exc}\nfull node logs kept in {kept}") from exc
            raise

    def _start(self, cp: ControlPlane, timeout: float) -> None:
        if cp.address != self.ip or not cp.cluster:
            raise NodeError(f"the control plane must be started with address={self.ip!r} and cluster=True")
        self._tables_before = _nft_tables()
        for family, table in _PROXY_TABLES:
            if f"{family} {table}" in self._tables_before:
                raise NodeError(f"nftables table {family} {table} exists: another kube-proxy runs on this machine")
        pause = pause_image()
        self._make_cgroup_root()
        for fixed in map(Path, _FIXED_DIRS):
            if not fixed.exists():
                self._made_dirs.append(fixed)
                self._record()
                fixed.mkdir(parents=True)
        if not _overlay_works(self.workdir / "overlay-probe"):
            self.snapshotter = "native"
        self._start_containerd(timeout)
        self.import_image(pause)
        self._start_kubelet(cp)
        self._wait_ready(cp, timeout)
        self._start_proxy(cp, timeout)

    def _make_cgroup_root(self) -> None:
        """kubelet requires its cgroup root to exist; a new cpuset cgroup has no CPUs until given some."""
        for hierarchy in _cgroup_hierarchies():
            root = hierarchy / self._cgroup_root
            root.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (hierarchy / name).exists():
                    (root / name).write_text((hierarchy / name).read_text())

    def _daemon(self, name: str, argv: list[str]) -> int:
        tools = self.workdir / "bin"
        if not tools.exists():
            tools.mkdir()
            for tool in _SBIN_TOOLS:
                found = shutil.which(tool, path="/usr/local/sbin:/usr/sbin:/sbin")
                if found is None:
                    raise NodeError(f"{tool} is missing; the node needs runc, nftables and conntrack")
                (tools / tool).symlink_to(found)
        env = {"PATH": f"{tools}:/usr/local/bin:/usr/bin", "LC_ALL": "C"}
        reaper = Reaper(argv, env=env, log_path=self.log_dir / f"{name}.log")
        self._reapers[name] = reaper
        self._pids.add(reaper.pid)
        try:
            pid = reaper.start_daemon()
        except ReaperError as error:
            raise NodeError(f"{name} could not be started: {error}") from None
        self._pids.add(pid)
        return pid

    def _check_running(self) -> None:
        for name, reaper in self._reapers.items():
            code = reaper.daemon_returncode()
            if code is not None:
                raise NodeError(f"{name} exited with {code} while the node started\n{self._log_tails()}")

    def _log_tails(self) -> str:
        return "\n".join(
            f"--- last lines of {name}.log ---\n{tail_file(self.log_dir / f'{name}.log', 25)}" for name in self._reapers
        )

    def _start_containerd(self, timeout: float) -> None:
        config = self.workdir / "containerd.toml"
        config.write_text(self._containerd_config())
        cni_dir = self.workdir / "cni"
        cni_dir.mkdir()
        (cni_dir / "10-vmop.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        sysctl_dir = self.workdir / "sysctl"
        sysctl_dir.mkdir()
        lines = ["set -e"]
        for fixed in _FIXED_DIRS:
            lines.append(f"mount -t tmpfs -o mode=0755 vmop-node {fixed}")
        for key, value in _KUBELET_SYSCTLS.items():
            (sysctl_dir / key.replace("/", ".")).write_text(f"{value}\n")
            lines.append(f"mount --bind {sysctl_dir / key.replace('/', '.')} /proc/sys/{key}")
        lines.append(f"exec containerd --config {config}")
        script = self.workdir / "mount-namespace.sh"
        script.write_text("\n".join(lines) + "\n")
        pid = self._daemon("containerd", ["unshare", "--mount", "--propagation", "private", "sh", str(script)])

        def answers() -> bool:
            self._check_running()
            return _unix_socket_answers(self.containerd_socket)

        wait_until(
            answers, timeout=timeout, interval=0.1, message=lambda: f"containerd did not answer\n{self._log_tails()}"
        )
        self._mount_ns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        self._containerd_pid = pid

    def _containerd_config(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""\
version = 2
root = "{self.workdir / "containerd"}"
state = "{self.workdir / "containerd-state"}"
# the ones that would probe kernel modules or devices this node never uses
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{self.containerd_socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.workdir / "opt"}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE, so it cannot lower a container's oom_score_adj below its own
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{cri}.containerd]
  snapshotter = "{self.snapshotter}"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{self.workdir / "cni"}"
  max_conf_num = 1
"""

    def _cni_config(self) -> dict[str, Any]:
        """The host address is put on the bridge by create(), so the plugin is not the gateway: isGateway
        would also switch on the machine's IP forwarding. Pods need none: the host, the API server and the
        Services that lead to them are local to it, and nothing may be routed off the machine."""
        return {
            "cniVersion": "0.4.0",
            "name": self.bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": False,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet), "gateway": self.ip}]],
                        "routes": [{"dst": "0.0.0.0/0", "gw": self.ip}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _start_kubelet(self, cp: ControlPlane) -> None:
        (self.workdir / "manifests").mkdir()
        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self._cgroup_root}",
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "staticPodPath": str(self.workdir / "manifests"),
            "podCIDR": str(self.subnet),
            "address": self.ip,
            "port": free_ports(1)[0],
            "readOnlyPort": 0,
            "healthzPort": 0,
            "volumePluginDir": str(self.workdir / "volume-plugins"),
            "podLogsDir": str(self.workdir / "pod-logs"),
            # the API server's client certificate for logs and exec, nothing anonymous; any such client may
            # do anything, which a test node can afford
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(cp.ca_file)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            # a shared machine's disk and memory say nothing about the node under test: no eviction, no
            # image garbage collection (the bed's images cannot be pulled again)
            "evictionHard": {"memory.available": "0%", "nodefs.available": "0%", "imagefs.available": "0%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
        }
        config = self.workdir / "kubelet.yaml"
        config.write_text(yaml.safe_dump(kubelet_config))
        self._daemon(
            "kubelet",
            [
                "nsenter",
                f"--mount=/proc/{self._containerd_pid}/ns/mnt",
                "--",
                str(cp.bin_dir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={cp.node_kubeconfig(self.name)}",
                f"--root-dir={self.workdir / 'kubelet'}",
                f"--hostname-override={self.name}",
                f"--node-ip={self.ip}",
            ],
        )

    def _wait_ready(self, cp: ControlPlane, timeout: float) -> None:
        last: list[str] = ["not registered"]

        def ready() -> bool:
            self._check_running()
            with cp.api_client() as api:
                try:
                    node = kubernetes.client.CoreV1Api(api).read_node(self.name)
                except kubernetes.client.ApiException as exc:
                    if exc.status == 404:
                        return False
                    raise
            conditions = (node.status and node.status.conditions) or []
            last[:] = [f"{c.type}={c.status} ({c.reason}: {c.message})" for c in conditions]
            return any(c.type == "Ready" and c.status == "True" for c in conditions)

        wait_until(
            ready,
            timeout=timeout,
            interval=0.2,
            message=lambda: f"Node {self.name} did not become Ready: {'; '.join(last)}\n{self._log_tails()}",
        )

    def _start_proxy(self, cp: ControlPlane, timeout: float) -> None:
        healthz, metrics = free_ports(2)
        self._tables_ours = True
        self._record()
        self._daemon(
            "kube-proxy",
            [
                str(cp.bin_dir / "kube-proxy"),
                f"--kubeconfig={cp.user_kubeconfig('system:kube-proxy')}",
                "--proxy-mode=nftables",
                f"--hostname-override={self.name}",
                f"--cluster-cidr={self.subnet}",
                # NodePorts on the node's address alone, never on the machine's own interfaces
                f"--nodeport-addresses={self.ip}/32",
                # 0: leave the machine's conntrack sysctls as they are
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                f"--healthz-bind-address=127.0.0.1:{healthz}",
                f"--metrics-bind-address=127.0.0.1:{metrics}",
            ],
        )

        def synced() -> bool:
            self._check_running()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{healthz}/healthz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:  # 503 until the first sync, or not listening yet
                return False

        wait_until(
            synced, timeout=timeout, interval=0.2, message=lambda: f"kube-proxy did not sync\n{self._log_tails()}"
        )

    def stop(self, keep_logs: bool = False, logs_dest: Path | None = None) -> Path | None:
        """Take the node down and leave the machine as create() found it; safe to call twice.

        kube-proxy and its tables first (so no rule outlives it), then kubelet (so it restarts nothing),
        then containerd and, by the reapers, every shim and container left. Their mount namespace dies with
        the last of them, and with it every mount of the node; then the pod cgroups, the mount points made
        for it, the bridge, the work dir and the lock go. With keep_logs the logs are first copied to
        logs_dest (or a new temporary directory), whose path is printed and returned. Problems are printed,
        not raised, so that clean-up goes on; leftovers() says whether anything stayed.
        """
        if self._stopped:
            return None
        self._stopped = True
        for name in ("kube-proxy", "kubelet", "containerd"):
            reaper = self._reapers.get(name)
            if reaper is None:
                continue
            try:
                killed = reaper.close()
            except ReaperError as error:
                print(f"node {self.name}: {name}: {error}", file=sys.stderr)
            else:
                if killed:
                    print(f"node {self.name}: killed what {name} left behind: {killed}", file=sys.stderr)
            if name == "kube-proxy":
                self._delete_tables()
        self._stopped_at = int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))
        self._clear_machine()
        kept: Path | None = None
        if keep_logs:
            kept = logs_dest or Path(tempfile.mkdtemp(prefix="vmop-node-logs-"))
            shutil.copytree(self.log_dir, kept, dirs_exist_ok=True)
            print(f"node logs kept in {kept}", file=sys.stderr)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._lock.release()
        return kept

    def _delete_tables(self) -> None:
        if self._tables_ours:
            for family, table in _PROXY_TABLES:
                if _nft_table_exists(family, table):
                    _run(["nft", "delete", "table", family, table], check=False)

    def _clear_machine(self) -> None:
        """What the kernel keeps of the node once its processes are gone, but the work dir."""
        self._delete_tables()
        self._remove_cgroups()
        for directory in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()
        for path in self._adopted:
            shutil.rmtree(path, ignore_errors=True)
        self._remove_bridge()

    def _remove_cgroups(self) -> None:
        """Bottom-up, and retried for a moment: a killed task leaves its cgroup only once it is reaped."""

        def removed() -> bool:
            for hierarchy in _cgroup_hierarchies():
                root = hierarchy / self._cgroup_root
                if not root.exists():
                    continue
                for directory, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
                    with contextlib.suppress(OSError):
                        os.rmdir(directory)
            return not any((hierarchy / self._cgroup_root).exists() for hierarchy in _cgroup_hierarchies())

        try:
            wait_until(removed, timeout=10, interval=0.1, message="pod cgroups are still in use")
        except WaitTimeout as error:
            print(f"node {self.name}: {error}", file=sys.stderr)

    def _remove_bridge(self) -> None:
        """A pod's veth goes with its network namespace, which went with the node's processes; wait for that
        rather than delete veths that might still be named in a namespace about to free them."""
        ports = Path(f"/sys/class/net/{self.bridge}/brif")
        try:
            wait_until(lambda: not ports.exists() or not any(ports.iterdir()), timeout=10, message="veths remain")
        except WaitTimeout:
            for port in ports.iterdir():
                _run(["ip", "link", "del", port.name], check=False)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _run(["ip", "link", "del", self.bridge], check=False)

    def _is_ours(self, proc: Path) -> bool:
        """Named after the work dir (containerd, shims, kubelet), in the pods' cgroups (containers), or in
        the node's mount namespace. A namespace's inode number is reused once it is freed, so only a process
        that started before stop() can be in ours."""
        if str(self.workdir).encode() in (proc / "cmdline").read_bytes():
            return True
        if f":/{self._cgroup_root}/" in (proc / "cgroup").read_text():
            return True
        if self._mount_ns is None or os.stat(proc / "ns" / "mnt").st_ino != self._mount_ns:
            return False
        started = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[19])
        return self._stopped_at is None or started <= self._stopped_at

    def _processes(self) -> list[Path]:
        """The /proc entries of this node's processes still running."""
        return [proc for proc in Path("/proc").iterdir() if proc.name.isdigit() and _quietly(self._is_ours, proc)]

    def leftovers(self) -> list[str]:
        """What of this node is still on the machine; empty after a clean stop(), which is what tests check."""
        found: list[str] = []
        if Path(f"/sys/class/net/{self.bridge}").exists():
            found.append(f"bridge {self.bridge}")
        for pid in sorted(self._pids):
            if alive(pid):
                found.append(f"process {pid}")
        for proc in self._processes():
            with contextlib.suppress(OSError):
                found.append(f"process {proc.name}: {(proc / 'cmdline').read_bytes().replace(bytes(1), b' ')!r}")
        found += [f"cgroup {h / self._cgroup_root}" for h in _cgroup_hierarchies() if (h / self._cgroup_root).exists()]
        found += [f"directory {d}" for d in [*self._made_dirs, *self._adopted] if d.exists()]
        if self.workdir.exists():
            found.append(f"work dir {self.workdir}")
        if self._mount_ns is not None:
            # another program's new table would show here too, but nothing else on a test machine makes tables
            found += [f"nftables table {table}" for table in sorted(_nft_tables() - self._tables_before)]
        elif self._tables_ours:  # a killed bed's node: its tables are whatever kube-proxy's are
            found += [f"nftables table {f} {t}" for f, t in _PROXY_TABLES if _nft_table_exists(f, t)]
        mounts = Path("/proc/self/mountinfo").read_text()
        if str(self.workdir) in mounts:
            found.append(f"mounts under {self.workdir}")
        return found

    # ---- using it

    def ctr(
        self, *args: str, input: bytes | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """containerd's own client on this node's containerd, in the namespace the kubelet's pods live in."""
        argv = ["ctr", "--address", str(self.containerd_socket), "--namespace", _NAMESPACE, *args]
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise NodeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
        return proc

    def import_image(self, archive: Path) -> None:
        """Make an OCI or Docker image archive available to pods (imagePullPolicy Never or IfNotPresent)."""
        self.ctr("images", "import", "--snapshotter", self.snapshotter, str(archive))
