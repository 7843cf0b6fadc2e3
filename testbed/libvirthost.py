"""A private, unprivileged libvirtd with real QEMU guests, one per test bed.

Each bed runs its own session daemon as the libvirt-qemu user with all state under its own work
directory, so several beds (parallel CI jobs, a developer's run next to the demo) share one machine
without seeing each other's domains, and nothing of the host's /etc or system daemon is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import TracebackType
from typing import Literal, cast, get_args

import libvirt

from testbed.guests import (
    AGENT_CHANNEL,
    STUBBORN_CMDLINE,
    GuestImages,
    build_images,
    cache_root,
    coop_cmdline,
)
from testbed.processes import alive, tail_file
from testbed.reaper import Reaper, ReaperError
from testbed.wait import wait_until

GuestKind = Literal["coop", "stubborn", "firmware"]
DomainType = Literal["kvm", "qemu"]

DAEMON_USER = "libvirt-qemu"


@dataclass(frozen=True)
class DaemonLimits:
    """libvirtd's limits on calls at once: in all (max_workers) and per client connection (max_client_requests)."""

    max_workers: int
    max_client_requests: int


STOCK_LIMITS = DaemonLimits(max_workers=20, max_client_requests=5)
"""libvirt's defaults (libvirtd.conf, virtqemud.conf), as a host that was never tuned runs them."""
TUNED_LIMITS = DaemonLimits(max_workers=128, max_client_requests=128)
"""The bed's default: as many calls at once as the operator's default --libvirt-workers."""
CONFIG_DIR = Path(__file__).with_name("libvirt")

_MEMORY_MIB: dict[GuestKind, int] = {"coop": 128, "stubborn": 96, "firmware": 16}
"""96 MiB is the smallest that boots the Debian kernel with its 1 MB initramfs (64-80 MiB reset or panic);
the cooperative guest gets a margin because it runs more; SeaBIOS alone is content with 16."""

_TB_CACHE_MIB: dict[GuestKind, int] = {"coop": 16, "stubborn": 8, "firmware": 4}
"""TCG's translation cache defaults to a size that makes each guest ~40 MB bigger; these suffice."""

_KVM_PROBE_TIMEOUT = 20.0
_DAEMON_STOP_TIMEOUT = 15.0

# The guest agent's channel socket, $XDG_CONFIG_HOME/libvirt/qemu/channel/target/domain-<id>-<20 chars>/
# org.qemu.guest_agent.0, is the longest socket path the daemon creates (longer than QEMU's monitor
# socket); AF_UNIX paths end at 107 bytes. Hence the short work directory name below.
_MAX_WORKDIR_LEN = 107 - len("/c/libvirt/qemu/channel/target/domain-99999-12345678901234567890/org.qemu.guest_agent.0")

_PREREQUISITES = {
    "libvirtd": "libvirt-daemon",
    "qemu-system-x86_64": "qemu-system-x86",
    "setpriv": "util-linux",
    "cpio": "cpio",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
}
_QEMU_DRIVER = Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")


class LibvirtHostError(RuntimeError):
    """The daemon could not be started or probed; the message carries what a reader needs to fix it."""


class GuestNotReady(AssertionError):
    """A guest stopped or reported an error before GUEST-READY; an AssertionError so pytest shows a failure."""


def missing_prerequisites() -> list[str]:
    """What this machine lacks for a bed, phrased as what to install, so a failure says how to fix it."""
    missing = [
        f"{binary} (Debian package {package})" for binary, package in _PREREQUISITES.items() if not shutil.which(binary)
    ]
    if not Path("/bin/busybox").is_file():
        missing.append("/bin/busybox (Debian package busybox-static)")
    if not _QEMU_DRIVER.is_file():
        missing.append(f"{_QEMU_DRIVER} (Debian package libvirt-daemon-driver-qemu)")
    try:
        pwd.getpwnam(DAEMON_USER)
    except KeyError:
        missing.append(f"user {DAEMON_USER} (created by scripts/setup.sh)")
    return missing


def _unix_socket_answers(path: Path) -> bool:
    """A plain connect instead of libvirt.open: a failing open prints to stderr on every poll."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class LibvirtHost:
    """One running session libvirtd and the paths its guests use; create it with `LibvirtHost.start()`."""

    def __init__(
        self, workdir: Path, images: GuestImages, *, socket_perms: int = 0o700, limits: DaemonLimits = TUNED_LIMITS
    ) -> None:
        self.workdir = workdir
        self.socket_perms = socket_perms
        self.limits = limits
        self.storage_dir = workdir / "storage"
        self.console_dir = workdir / "console"
        self.log_dir = workdir / "logs"
        self.daemon_log = self.log_dir / "libvirtd.log"
        self.qemu_log_dir = workdir / "cache" / "libvirt" / "qemu" / "log"
        self.runtime_dir = workdir / "run"
        self._config_home = workdir / "c"  # short: see _MAX_WORKDIR_LEN
        self.uri = f"qemu+unix:///session?socket={self.runtime_dir}/libvirt/libvirt-sock"
        self.images = GuestImages(
            kernel=self.storage_dir / images.kernel.name,
            coop_initrd=self.storage_dir / images.coop_initrd.name,
            stubborn_initrd=self.storage_dir / images.stubborn_initrd.name,
        )
        self._source_images = images
        self.domain_type: DomainType = "qemu"
        self._reaper: Reaper | None = None
        self._daemon_pid: int | None = None
        self._conn: libvirt.virConnect | None = None

    # ---- lifecycle

    @classmethod
    def start(
        cls, workdir: Path | None = None, *, socket_perms: int = 0o700, limits: DaemonLimits = TUNED_LIMITS
    ) -> LibvirtHost:
        """Start a daemon in workdir (a fresh directory under /var/tmp by default) and probe KVM.

        The work directory belongs to the host from then on: stop() removes it. /var/tmp rather than the
        cache because root's home is 0700 and the daemon runs as another user. socket_perms are the
        client socket's: 0o777 for an operator in a pod, whose root has no capabilities.
        """
        missing = missing_prerequisites()
        if missing:
            raise LibvirtHostError("the libvirt test bed needs: " + "; ".join(missing))
        images = build_images()
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="vl-", dir="/var/tmp"))
        if len(str(workdir)) > _MAX_WORKDIR_LEN:
            raise LibvirtHostError(f"work directory {workdir} is too long for QEMU's monitor socket path")
        host = cls(workdir, images, socket_perms=socket_perms, limits=limits)
        try:
            host._prepare()
            host._launch()
            host.domain_type = host._decide_domain_type()
        except BaseException:
            host.stop(keep=True)
            raise
        return host

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(keep=exc_type is not None)

    def _prepare(self) -> None:
        user = pwd.getpwnam(DAEMON_USER)
        dirs = [
            self.workdir,
            self.storage_dir,
            self.console_dir,
            self.log_dir,
            self.runtime_dir,
            self._config_home,
            self._config_home / "libvirt",
            self.workdir / "home",
            self.workdir / "cache",
            self.workdir / "data",
        ]
        for directory in dirs:
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chown(directory, user.pw_uid, user.pw_gid)
        config = self._config_home / "libvirt"
        self._write_daemon_config()
        shutil.copyfile(CONFIG_DIR / "qemu.conf", config / "qemu.conf")
        for source, target in zip(
            (self._source_images.kernel, self._source_images.coop_initrd, self._source_images.stubborn_initrd),
            (self.images.kernel, self.images.coop_initrd, self.images.stubborn_initrd),
            strict=True,
        ):
            # a hard link costs nothing; the cache may sit on another file system, then copy
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
                target.chmod(0o644)

    def _write_daemon_config(self) -> None:
        template = Template((CONFIG_DIR / "libvirtd.conf.in").read_text())
        (self._config_home / "libvirt" / "libvirtd.conf").write_text(
            template.substitute(
                log_file=self.daemon_log,
                socket_perms=f"{self.socket_perms:04o}",
                max_workers=self.limits.max_workers,
                max_client_requests=self.limits.max_client_requests,
            )
        )

    def _launch(self) -> None:
        """Have the bed's reaper run libvirtd as the daemon user, starting the reaper on the first call.

        The reaper is a child subreaper that outlives every libvirtd it runs (see testbed/reaper.py): QEMU is
        double-forked by libvirtd, and PID 1 on these machines reaps orphans about 2 s late, which libvirt
        waits for on every destroy and guest poweroff, also for guests started by an earlier daemon.
        """
        if self._reaper is None:
            env = {
                "HOME": str(self.workdir / "home"),
                "XDG_RUNTIME_DIR": str(self.runtime_dir),
                "XDG_CONFIG_HOME": str(self._config_home),
                "XDG_CACHE_HOME": str(self.workdir / "cache"),
                "XDG_DATA_HOME": str(self.workdir / "data"),
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "LC_ALL": "C",
            }
            argv = [
                "setpriv",
                f"--reuid={DAEMON_USER}",
                f"--regid={DAEMON_USER}",
                "--clear-groups",
                "libvirtd",
                "--config",
                str(self._config_home / "libvirt" / "libvirtd.conf"),
                "--pid-file",
                str(self.runtime_dir / "libvirtd.pid"),
            ]
            self._reaper = Reaper(argv, env=env, log_path=self.log_dir / "libvirtd.stdout")
        reaper = self._reaper
        try:
            self._daemon_pid = reaper.start_daemon()
        except ReaperError as error:
            raise LibvirtHostError(f"libvirtd could not be started: {error}") from None
        socket_path = self.runtime_dir / "libvirt" / "libvirt-sock"

        def answered() -> bool:
            returncode = reaper.daemon_returncode()
            if returncode is not None:
                self._daemon_pid = None
                raise LibvirtHostError(f"libvirtd exited with {returncode}:\n{self._daemon_tail()}")
            # The previous daemon's socket file stays behind; only a connect tells whether this one listens.
            return _unix_socket_answers(socket_path)

        wait_until(
            answered, timeout=30.0, message=lambda: f"libvirtd did not answer on {socket_path}:\n{self._daemon_tail()}"
        )
        self._conn = libvirt.open(self.uri)
        self._wait_guests_taken_over(self._conn)

    def _wait_guests_taken_over(self, conn: libvirt.virConnect) -> None:
        """Return once the daemon has reconnected to every guest it found running.

        It answers clients while its reconnect threads still hold each guest's job (a few tens of ms); a
        destroy in that window kills the guest yet fails with "domain is not running", and the guest is
        recorded as shut off by the daemon. A bed that returned then would make every test after a restart
        race libvirt instead of testing its own subject. Control state OK means no job holds the guest.
        """
        states: dict[str, tuple[int, int]] = {}

        def taken_over() -> bool:
            states.clear()
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    state, details, _ = dom.controlInfo()
                    states[dom.name()] = (state, details)
                except libvirt.libvirtError:
                    continue  # stopped meanwhile: nothing left to take over
            return all(state == libvirt.VIR_DOMAIN_CONTROL_OK for state, _ in states.values())

        wait_until(
            taken_over,
            timeout=30.0,
            interval=0.01,
            message=lambda: f"libvirtd did not take over its running guests (control state, details): {states}",
        )

    def _daemon_tail(self) -> str:
        return f"--- {self.daemon_log}\n{tail_file(self.daemon_log, 30)}\n--- stdout/stderr\n{tail_file(self.log_dir / 'libvirtd.stdout', 30)}"

    def stop(self, *, keep: bool = False) -> None:
        """Take down every guest, then the daemon, then the reaper, then (unless keep) the work directory.

        Guests go first and through the API: a session daemon's QEMU processes are not its children and
        would keep running, with 100+ MB each, after the daemon is gone. The reaper then kills whatever
        is left (guests the API could not destroy, or all of them if the daemon was down), by PID.
        """
        if self._conn is not None:
            self._remove_domains(self._conn)
        try:
            self.stop_daemon()
        except ReaperError as error:
            # the reaper's quit below tries again, and kills what is left either way
            print(f"libvirt test bed: {error}", file=sys.stderr)
        if self._reaper is not None:
            reaper, self._reaper = self._reaper, None
            try:
                killed = reaper.close()
            except ReaperError as error:
                print(f"libvirt test bed: {error}", file=sys.stderr)
            else:
                if killed:
                    print(f"libvirt test bed: killed processes left behind {killed}", file=sys.stderr)
            # only finds something if the reaper failed, whose orphans went to PID 1
            self._kill_leftover_guests()
        if keep:
            print(
                f"libvirt test bed kept in {self.workdir}: daemon log {self.daemon_log}, "
                f"guest consoles {self.console_dir}, QEMU logs {self.qemu_log_dir}",
                file=sys.stderr,
            )
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def daemon_pid(self) -> int | None:
        """The running libvirtd's PID (None while stopped): lets a test tell a restarted daemon from the old one."""
        return self._daemon_pid

    def stop_daemon(self) -> None:
        """Stop libvirtd alone and leave its guests running: what a libvirtd crash or upgrade looks like to
        its clients. `start_daemon` brings it back, and it finds its running guests again.

        SIGTERM, then SIGKILL to libvirtd's process group if it hangs; that group holds only libvirtd and its
        helpers, since QEMU sets up a session of its own. Connections from `connect()` break; the guests
        stay children of the bed's reaper."""
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None
        if self._reaper is not None and self._daemon_pid is not None:
            self._daemon_pid = None
            self._reaper.stop_daemon(_DAEMON_STOP_TIMEOUT)

    def start_daemon(self) -> None:
        """Start libvirtd again after `stop_daemon`, under the same reaper; returns once it accepts clients
        and has taken over the guests left running."""
        if self._daemon_pid is not None:
            raise LibvirtHostError(f"libvirtd (pid {self._daemon_pid}) is already running")
        self._launch()

    def restart_daemon(self, limits: DaemonLimits | None = None) -> None:
        """Stop libvirtd and start a new one with the guests left running: the new daemon must take over
        guests it did not start, as after a libvirtd upgrade. Clients must reconnect (`connect()`).
        With limits, the new daemon runs with those, as after an administrator's change of libvirtd.conf."""
        self.stop_daemon()
        if limits is not None:
            self.limits = limits
            self._write_daemon_config()
        self.start_daemon()

    def _remove_domains(self, conn: libvirt.virConnect) -> None:
        # failures are reported, not raised: the daemon goes next anyway, and leftover QEMU processes
        # are killed after it
        try:
            names = [dom.name() for dom in conn.listAllDomains()]
        except libvirt.libvirtError as error:
            print(f"libvirt test bed: could not list guests: {error}", file=sys.stderr)
            return
        for name in names:
            try:
                self.remove_guest(name)
            except libvirt.libvirtError as error:
                print(f"libvirt test bed: could not remove guest {name}: {error}", file=sys.stderr)

    def _kill_leftover_guests(self) -> None:
        """The backstop for a reaper that failed: a QEMU it could not kill went to PID 1 with it and would
        outlive everything else. Only PIDs from this bed's own pidfiles, and only if that PID is still a QEMU
        whose command line names this work directory."""
        leftovers: list[int] = []
        for pidfile in (self.runtime_dir / "libvirt" / "qemu" / "run").glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if b"qemu-system" in cmdline and str(self.workdir).encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                leftovers.append(pid)
        if leftovers:
            print(f"libvirt test bed: killed leftover QEMU processes {leftovers}", file=sys.stderr)
            wait_until(
                lambda: not any(alive(pid) for pid in leftovers),
                timeout=10.0,
                message=f"QEMU processes {leftovers} did not die",
            )

    def save_logs(self, dest: Path) -> None:
        """Copy what explains a failed run (daemon log, consoles, QEMU logs) out of the work directory."""
        dest.mkdir(parents=True, exist_ok=True)
        for log in self.log_dir.iterdir():
            shutil.copy2(log, dest / log.name)
        for subdir, source in (("console", self.console_dir), ("qemu", self.qemu_log_dir)):
            if source.is_dir():
                shutil.copytree(source, dest / subdir, dirs_exist_ok=True)

    # ---- KVM or TCG

    def _decide_domain_type(self) -> DomainType:
        """KVM only where a KVM guest really boots: on these machines /dev/kvm exists, libvirt's system
        daemon offers kvm, and yet the guest resets at once. The verdict holds until the next reboot."""
        override = os.environ.get("VMOP_DOMAIN_TYPE")
        if override:
            if override not in get_args(DomainType):
                raise LibvirtHostError(f"VMOP_DOMAIN_TYPE must be one of {get_args(DomainType)}, got {override!r}")
            return cast(DomainType, override)
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        verdict_file = cache_root() / "libvirt" / "domain-type.json"
        try:
            cached = json.loads(verdict_file.read_text())
            if cached["boot_id"] == boot_id and cached["domain_type"] in get_args(DomainType):
                return cast(DomainType, cached["domain_type"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        verdict: DomainType = "kvm" if self._kvm_boots() else "qemu"
        verdict_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=verdict_file.parent, delete=False) as tmp:
            json.dump({"boot_id": boot_id, "domain_type": verdict}, tmp)
        Path(tmp.name).replace(verdict_file)
        return verdict

    def _kvm_boots(self) -> bool:
        """The daemon's capabilities list kvm only if its uid can open /dev/kvm, which answers the usual
        case without booting anything; otherwise a transient cooperative guest must reach GUEST-READY."""
        caps = ET.fromstring(self._connection().getCapabilities())
        if caps.find(".//guest/arch/domain[@type='kvm']") is None:
            return False
        name = "vmop-kvm-probe"
        try:
            dom = self._connection().createXML(self._domain_xml(name, "coop", "kvm"), 0)
        except libvirt.libvirtError:
            return False
        try:
            wait_until(
                lambda: "GUEST-READY" in self.console_log(name) or not dom.isActive(),
                timeout=_KVM_PROBE_TIMEOUT,
                message="KVM probe guest neither booted nor stopped",
            )
        except AssertionError:
            return False
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        return "GUEST-READY" in self.console_log(name)

    # ---- guests

    def connect(self) -> libvirt.virConnect:
        """A new connection of the caller's own, e.g. for an event loop; the caller closes it."""
        return libvirt.open(self.uri)

    def _connection(self) -> libvirt.virConnect:
        if self._conn is None:
            raise LibvirtHostError("the libvirt test bed is not running")
        return self._conn

    def guest_xml(
        self,
        name: str,
        kind: GuestKind,
        *,
        memory_mib: int | None = None,
        ignore_presses: int = 0,
        shutdown_delay: float = 0.0,
        agent_channel: bool = False,
        agent: str = "absent",
    ) -> str:
        """The domain the bed boots for `kind`. agent_channel adds the guest agent's virtio channel, as the
        operator's domain XML has it when spec.guestAgent is true (any kind: on a stubborn or firmware
        guest nothing ever answers on it); agent says what a coop guest runs there (see
        testbed.guests.AGENT_MODES), and any mode but absent needs the channel."""
        return self._domain_xml(
            name,
            kind,
            self.domain_type,
            memory_mib=memory_mib,
            ignore_presses=ignore_presses,
            shutdown_delay=shutdown_delay,
            agent_channel=agent_channel,
            agent=agent,
        )

    def _domain_xml(
        self,
        name: str,
        kind: GuestKind,
        domain_type: DomainType,
        *,
        memory_mib: int | None = None,
        ignore_presses: int = 0,
        shutdown_delay: float = 0.0,
        agent_channel: bool = False,
        agent: str = "absent",
    ) -> str:
        if kind not in _MEMORY_MIB:
            raise ValueError(f"unknown guest kind {kind!r}; expected one of {get_args(GuestKind)}")
        if kind != "coop" and (ignore_presses or shutdown_delay or agent != "absent"):
            raise ValueError(f"ignore_presses, shutdown_delay and agent apply to coop guests, not {kind}")
        if agent != "absent" and not agent_channel:
            raise ValueError(f"agent={agent!r} needs agent_channel=True: the guest serves the agent on that channel")
        domain = ET.Element("domain", type=domain_type)
        ET.SubElement(domain, "name").text = name
        ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mib or _MEMORY_MIB[kind])
        ET.SubElement(domain, "vcpu").text = "1"
        os_el = ET.SubElement(domain, "os")
        ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
        if kind == "firmware":
            # nothing to boot: SeaBIOS would retry forever after a pause; -1 makes it simply sit there
            ET.SubElement(os_el, "bios", rebootTimeout="-1")
        else:
            initrd = self.images.coop_initrd if kind == "coop" else self.images.stubborn_initrd
            cmdline = (
                coop_cmdline(ignore_presses=ignore_presses, shutdown_delay=shutdown_delay, agent=agent)
                if kind == "coop"
                else STUBBORN_CMDLINE
            )
            ET.SubElement(os_el, "kernel").text = str(self.images.kernel)
            ET.SubElement(os_el, "initrd").text = str(initrd)
            ET.SubElement(os_el, "cmdline").text = cmdline
        features = ET.SubElement(domain, "features")
        ET.SubElement(features, "acpi")
        if domain_type == "qemu":
            tcg = ET.SubElement(features, "tcg")
            ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(_TB_CACHE_MIB[kind])
        ET.SubElement(domain, "clock", offset="utc")
        # a guest that stops for any reason is gone, never restarted behind the test's back
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            ET.SubElement(domain, event).text = "destroy"
        devices = ET.SubElement(domain, "devices")
        ET.SubElement(devices, "controller", type="usb", model="none")
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(self.console_dir / f"{name}.log"), append="off")
        ET.SubElement(serial, "target", port="0")
        if agent_channel:
            # libvirt picks the socket's path itself, as for the operator's domains
            channel = ET.SubElement(devices, "channel", type="unix")
            ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
        ET.SubElement(devices, "memballoon", model="none")
        return ET.tostring(domain, encoding="unicode")

    def create_guest(
        self,
        name: str,
        kind: GuestKind,
        *,
        memory_mib: int | None = None,
        ignore_presses: int = 0,
        shutdown_delay: float = 0.0,
        agent_channel: bool = False,
        agent: str = "absent",
    ) -> libvirt.virDomain:
        """Define a persistent domain and start it; persistent because the operator manages defined
        domains, and a transient one would vanish on shut-off before a test can inspect it."""
        xml = self.guest_xml(
            name,
            kind,
            memory_mib=memory_mib,
            ignore_presses=ignore_presses,
            shutdown_delay=shutdown_delay,
            agent_channel=agent_channel,
            agent=agent,
        )
        dom = self._connection().defineXML(xml)
        try:
            dom.create()
        except libvirt.libvirtError:
            dom.undefine()
            raise
        return dom

    def remove_guest(self, name: str) -> None:
        """Destroy and undefine; a guest that is already stopped or gone is fine, since guests power off
        by themselves and tests may remove them first."""
        conn = self._connection()
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise
        try:
            # checked first because libvirt prints every failed call to stderr
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as error:
            # stopped meanwhile, or transient and therefore already gone
            if error.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                raise
        try:
            dom.undefine()
        except libvirt.libvirtError as error:
            if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise

    def console_log(self, name: str) -> str:
        try:
            return (self.console_dir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_guest_ready(self, name: str, timeout: float = 90.0) -> None:
        """Wait for the guest's GUEST-READY line; a guest that stopped or reported an error fails at once
        rather than after the whole timeout. Firmware guests never print it."""
        dom = self._connection().lookupByName(name)
        started = time.monotonic()

        def ready() -> bool:
            text = self.console_log(name)
            if "GUEST-READY" in text:
                return True
            if "GUEST-ERROR" in text or not dom.isActive():
                raise GuestNotReady(
                    f"guest {name} failed after {time.monotonic() - started:.1f}s "
                    f"(state {dom.state()}); console tail:\n{self._console_tail(name)}"
                )
            return False

        wait_until(
            ready,
            timeout=timeout,
            message=lambda: f"guest {name} printed no GUEST-READY; console tail:\n{self._console_tail(name)}",
        )

    def _console_tail(self, name: str) -> str:
        return "\n".join(self.console_log(name).splitlines()[-20:])
