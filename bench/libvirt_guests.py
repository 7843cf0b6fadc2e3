"""The baseline of benchmark 3: libvirt's own libvirt-guests script stopping the same set of guests.

Debian's script reads its settings only from /etc/default/libvirt-guests and keeps state under /var, so
the bench runs a sed-patched copy that takes both paths from the environment (the recipe in
shared/testbed/libvirt.md), generated in a temporary directory: nothing under /etc is written.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bed import Bed, parallel
from bench.shutdown import COOP_BATCH, chunks

SCRIPT = Path("/usr/lib/libvirt/libvirt-guests.sh")
_SED = (
    r's|"$sysconfdir"/default/libvirt-guests|"${LIBVIRT_GUESTS_CONF:-/etc/default/libvirt-guests}"|g',
    r's|^LISTFILE=.*|LISTFILE="${LIBVIRT_GUESTS_STATE:-/var/lib/libvirt}"/libvirt-guests|',
    r's|^VAR_SUBSYS_LIBVIRT_GUESTS=.*|VAR_SUBSYS_LIBVIRT_GUESTS="${LIBVIRT_GUESTS_STATE:-/var/lock}"/libvirt-guests.lock|',
)


class LibvirtGuests:
    """A patched copy of the script with its own config and state directory; close() removes them."""

    def __init__(self, log_dir: Path) -> None:
        if not SCRIPT.is_file():
            raise FileNotFoundError(f"{SCRIPT} is missing (Debian package libvirt-daemon)")
        self.dir = Path(tempfile.mkdtemp(prefix="vmop-bench-libvirt-guests-"))
        self.script = self.dir / "libvirt-guests.sh"
        self.config = self.dir / "libvirt-guests.conf"
        self.log_dir = log_dir
        argv = ["sed"]
        for expression in _SED:
            argv += ["-e", expression]
        self.script.write_text(subprocess.run([*argv, str(SCRIPT)], check=True, capture_output=True, text=True).stdout)
        self.script.chmod(0o755)
        patched = self.script.read_text()
        if "LIBVIRT_GUESTS_CONF" not in patched or "LIBVIRT_GUESTS_STATE" not in patched:
            raise RuntimeError(f"the sed patch no longer applies to {SCRIPT}: its config or state path moved")

    def stop(self, uri: str, *, timeout: int, parallel_shutdown: int, label: str) -> tuple[float, int]:
        """Run `libvirt-guests.sh stop` once from a clean state; returns (wall seconds, exit code)."""
        self.config.write_text(
            f"URIS='{uri}'\nON_SHUTDOWN=shutdown\nSHUTDOWN_TIMEOUT={timeout}\nPARALLEL_SHUTDOWN={parallel_shutdown}\n"
        )
        # `stop` does nothing while the state file of an earlier stop exists
        for leftover in ("libvirt-guests", "libvirt-guests.lock"):
            (self.dir / leftover).unlink(missing_ok=True)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C",
            "LIBVIRT_GUESTS_CONF": str(self.config),
            "LIBVIRT_GUESTS_STATE": str(self.dir),
        }
        with (self.log_dir / f"libvirt-guests-{label}.log").open("w") as log:
            started = time.monotonic()
            code = subprocess.run(
                [str(self.script), "stop"], env=env, stdout=log, stderr=subprocess.STDOUT, check=False
            ).returncode
            return time.monotonic() - started, code

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _run_once(bed: Bed, tool: LibvirtGuests, *, coop: int, stubborn: int, grace: int, degree: int) -> dict[str, Any]:
    """The same guests as the vmop run, defined fresh straight on libvirt, then stopped by the script."""
    label = "serial" if degree == 0 else f"parallel{degree}"
    coops = [f"lg-{label}-coop-{i:02d}" for i in range(coop)]
    stubborns = [f"lg-{label}-fw-{i:02d}" for i in range(stubborn)]
    try:
        parallel(lambda name: bed.libvirt.create_guest(name, "firmware"), stubborns, threads=8)
        for batch in chunks(coops, COOP_BATCH):
            for name in batch:
                bed.libvirt.create_guest(name, "coop")
            for name in batch:
                bed.libvirt.wait_guest_ready(name, timeout=120)
        time.sleep(2.0)
        seconds, code = tool.stop(bed.libvirt.uri, timeout=grace, parallel_shutdown=degree, label=label)
        conn = bed.libvirt.connect()
        try:
            left = sum(1 for name in coops + stubborns if conn.lookupByName(name).isActive())
        finally:
            conn.close()
        result = {"total": round(seconds, 3), "left_running": left, "exit_code": code, "parallel_shutdown": degree}
        print(f"  libvirt-guests {label}: {result}", flush=True)
        return result
    finally:
        bed.remove_domains(f"lg-{label}-")


def libvirt_guests_baseline(bed: Bed, coop: int, stubborn: int, grace: int) -> dict[str, Any]:
    """Serial (PARALLEL_SHUTDOWN=0), then its maximum parallelism: every guest at once (the script has no
    upper bound; a value above the number of guests behaves the same)."""
    tool = LibvirtGuests(bed.log_dir)
    try:
        serial = _run_once(bed, tool, coop=coop, stubborn=stubborn, grace=grace, degree=0)
        at_once = _run_once(bed, tool, coop=coop, stubborn=stubborn, grace=grace, degree=coop + stubborn)
        return {"serial": serial, "parallel": at_once}
    finally:
        tool.close()
