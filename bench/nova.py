"""Benchmark `nova` (issue 13): Nova's clean-shutdown loop beside vmop, on the same libvirt and the same guests.

The baseline is OpenStack Nova's libvirt driver as released in Nova 33.0.0 (2026.1 "Gazpacho", tag
33.0.0 of github.com/openstack/nova): `LibvirtDriver.power_off`, `_clean_shutdown` and `_destroy` in
`nova/virt/libvirt/driver.py`, `Guest.shutdown`, `Guest.get_power_state`/`get_info`, `Guest.poweroff`
and `LIBVIRT_POWER_STATE` in `nova/virt/libvirt/guest.py`, `Host.get_guest`/`_get_domain` in
`nova/virt/libvirt/host.py`, the defaults `[compute] shutdown_retry_interval = 10` and
`shutdown_timeout = 60` in `nova/conf/compute.py` (the timeout here is the issue's 10 s grace). The same
code is on Nova's master at 00a030403f (August 2026). `_nova_power_off` below is that code path, call for
call, in libvirt-python:

* `_clean_shutdown`: look the domain up by UUID (`lookupByUUIDString`, `get_guest`) and read its state
  (`info()`, mapped as `LIBVIRT_POWER_STATE`; `ID()` for `internal_id`); if it is not already in
  SHUTDOWN_STATES (SHUTDOWN, i.e. libvirt SHUTDOWN or SHUTOFF, and CRASHED), `shutdown()`
  (`virDomainShutdown`, the same as `shutdownFlags(0)`), errors ignored; `retry_countdown =
  retry_interval`; then `for sec in range(timeout)`: look the domain up again and read its state; return
  if it is shut down; if the countdown is 0, reset it and re-send `shutdown()` (on an error, `continue`
  without sleeping), else decrement it; `time.sleep(1)`.
* `power_off` then calls `_destroy` whatever the loop returned: look up, `ID()`, `destroy()`, and
  `_wait_for_destroy` every 0.5 s (oslo's FixedIntervalLoopingCall) until the state reads SHUTDOWN.

The deadline of a Nova stop is what Nova means by "destroy after timeout": the instant its first
`shutdown()` was sent plus the timeout. With the timeout and the retry interval both 10, the countdown
reaches 0 only at the 11th tick, which never comes: Nova sends one request. vmop with
`gracePeriodSeconds: 10, retryIntervalSeconds: 10` also sends one: its retry would fall due just after
its deadline, where it forces instead.

Concurrency is Nova's: one libvirt connection per compute host, shared by all its stops, each stop in a
thread of its own (the RPC server runs each `stop_instance` in its own worker), all released at the same
instant by a barrier. Native threads and plain `time.sleep` are nova-compute's threading mode
(`OS_NOVA_DISABLE_EVENTLET_PATCHING`, experimental in 2026.1); in its default eventlet mode the sleeps are
green and the same libvirt calls run on eventlet's tpool of native threads. Nova's connection-event and
lifecycle callbacks, its serial-console bookkeeping and its logging are left out: none is on the path
from the loop to `destroy()`.

Both sides are measured by the bench's own observers: the SIGTERM of libvirt's destroy from QEMU's
timestamped log (`sigterm_time`) and the STOPPED event from the bed's `LifecycleListener`, each relative to
that VM's deadline (for vmop, its `status.shutdown.deadline`). The guests are the bed's firmware-only
ones (SeaBIOS, nothing booted: ACPI is ignored), so every stop ends in a destroy.

Besides the shared per-N keys (`n`, `measured`, `early_sigterm`, `sigterm`, `stopped`,
`overshoot_pct_of_grace`, `samples`), the Nova side records from its own threads `loop_ended` (when the
`for` loop gave up) and `destroy_called` (just before `destroy()`), relative to the deadline: how much of
the overshoot is the loop's counted sleeps, before libvirt gets the destroy. Both sides count the
requests they sent (`requests_sent`; vmop's from `status.shutdown.attempts`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import libvirt

from bench.bed import Bed, parallel
from bench.shutdown import SETTLE_SECONDS, end_section, forced_summary, sigterm_time, vmop_force_round
from bench.stats import summary

GRACE = 10
# nova.conf [compute] shutdown_retry_interval, default 10 (nova/conf/compute.py); vmop gets the same.
RETRY_INTERVAL = 10
SIZES = (1, 30)
QUICK_SIZES = (1, 3)
GUEST = "firmware-only (SeaBIOS, ignores ACPI): every stop ends in a destroy"
NOVA_SOURCE = (
    "openstack/nova 33.0.0 (2026.1 Gazpacho): nova/virt/libvirt/driver.py LibvirtDriver.power_off, "
    "_clean_shutdown, _destroy; nova/virt/libvirt/guest.py Guest.shutdown, get_power_state, poweroff; "
    "nova/virt/libvirt/host.py Host.get_guest; nova/conf/compute.py shutdown_retry_interval=10"
)

# nova.compute.power_state, as LIBVIRT_POWER_STATE maps libvirt's states (guest.py)
_NOSTATE, _RUNNING, _PAUSED, _SHUTDOWN, _CRASHED, _SUSPENDED = 0x00, 0x01, 0x03, 0x04, 0x06, 0x07
_LIBVIRT_POWER_STATE = {
    libvirt.VIR_DOMAIN_NOSTATE: _NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: _RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: _RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: _PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: _SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: _SHUTDOWN,
    libvirt.VIR_DOMAIN_CRASHED: _CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: _SUSPENDED,
}
_SHUTDOWN_STATES = (_SHUTDOWN, _CRASHED)
# _wait_for_destroy runs unbounded in Nova; the bench gives up after this many 0.5 s rounds.
_WAIT_FOR_DESTROY_ROUNDS = 120


@dataclass
class NovaStop:
    """What one thread of Nova's power_off did, in time.time() values."""

    first_request: float | None = None
    resends: int = 0
    clean: bool = False
    ticks: int = 0
    loop_ended: float | None = None
    destroy_called: float | None = None
    destroy_returned: float | None = None
    errors: list[str] = field(default_factory=list)


def _get_guest(conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain:
    """Host.get_guest -> Host._get_domain: a fresh lookup by UUID on the host's one connection."""
    return conn.lookupByUUIDString(uuid)


def _get_power_state(dom: libvirt.virDomain) -> int:
    """Guest.get_power_state -> get_info: info()[0] mapped to Nova's power state (and ID() for internal_id)."""
    info = dom.info()
    dom.ID()
    return _LIBVIRT_POWER_STATE[info[0]]


def _clean_shutdown(conn: libvirt.virConnect, uuid: str, timeout: int, retry_interval: int, out: NovaStop) -> bool:
    """LibvirtDriver._clean_shutdown, line for line (logging left out)."""
    try:
        guest = _get_guest(conn, uuid)
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return True
        raise
    if _get_power_state(guest) in _SHUTDOWN_STATES:
        return True
    out.first_request = time.time()
    try:
        guest.shutdown()
    except libvirt.libvirtError as error:
        out.errors.append(f"shutdown: {error}")
    retry_countdown = retry_interval
    for _sec in range(timeout):
        out.ticks += 1
        guest = _get_guest(conn, uuid)
        if _get_power_state(guest) in _SHUTDOWN_STATES:
            return True
        if retry_countdown == 0:
            retry_countdown = retry_interval
            try:
                out.resends += 1
                guest.shutdown()
            except libvirt.libvirtError:
                continue
        else:
            retry_countdown -= 1
        time.sleep(1)
    out.loop_ended = time.time()
    return False


def _destroy(conn: libvirt.virConnect, uuid: str, out: NovaStop) -> None:
    """LibvirtDriver._destroy: destroy() unless the domain is already gone or off, then _wait_for_destroy."""
    try:
        guest = _get_guest(conn, uuid)
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
        return
    guest.ID()  # old_domid = guest.id
    out.destroy_called = time.time()
    try:
        guest.destroy()  # Guest.poweroff
    except libvirt.libvirtError as error:
        code = error.get_error_code()
        already_off = code == libvirt.VIR_ERR_OPERATION_INVALID and _get_power_state(guest) == _SHUTDOWN
        if code != libvirt.VIR_ERR_NO_DOMAIN and not already_off:
            raise
    out.destroy_returned = time.time()
    for _ in range(_WAIT_FOR_DESTROY_ROUNDS):
        try:
            if _get_power_state(_get_guest(conn, uuid)) == _SHUTDOWN:
                return
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise
        time.sleep(0.5)


def _nova_power_off(
    conn: libvirt.virConnect, uuid: str, *, timeout: int, retry_interval: int, start: threading.Barrier, out: NovaStop
) -> None:
    """LibvirtDriver.power_off(instance, timeout, retry_interval), one thread per instance."""
    try:
        start.wait()
        if timeout:
            out.clean = _clean_shutdown(conn, uuid, timeout, retry_interval, out)
        _destroy(conn, uuid, out)
    except Exception as error:
        out.errors.append(f"{type(error).__name__}: {error}")


def _nova_round(bed: Bed, prefix: str, n: int) -> dict[str, Any]:
    """N firmware guests defined straight on libvirt, stopped by Nova's power_off, one thread each."""
    names = [f"{prefix}n{n}-{i:02d}" for i in range(n)]
    try:
        parallel(lambda name: bed.libvirt.create_guest(name, "firmware"), names, threads=8)
        time.sleep(SETTLE_SECONDS)
        conn = bed.libvirt.connect()  # the compute host's one connection, shared by every stop
        uuids = [conn.lookupByName(name).UUIDString() for name in names]
        outs = [NovaStop() for _ in names]
        start = threading.Barrier(n + 1)
        threads = [
            threading.Thread(
                target=_nova_power_off,
                args=(conn, uuid),
                kwargs={"timeout": GRACE, "retry_interval": RETRY_INTERVAL, "start": start, "out": out},
                name=f"nova-power-off:{name}",
                daemon=True,
            )
            for name, uuid, out in zip(names, uuids, outs, strict=True)
        ]
        for thread in threads:
            thread.start()
        since = time.time()
        start.wait()
        for thread in threads:
            thread.join(timeout=max(1.0, since + GRACE + 60 - time.time()))
        hung = [f"{t.name}: still running" for t in threads if t.is_alive()]
        if not hung:  # a thread still in a call keeps the connection; the bed's daemon goes at the end anyway
            conn.close()
        stops = bed.listener.wait_stopped(names, since, 10)
        samples, loop_ends, destroy_calls = [], [], []
        for name, out in zip(names, outs, strict=True):
            stopped = stops.get(name)
            sigterm = sigterm_time(bed, name, since)
            if out.first_request is None or stopped is None or sigterm is None:
                continue
            deadline = out.first_request + GRACE
            samples.append((sigterm - deadline, stopped - deadline))
            if out.loop_ended is not None:
                loop_ends.append(out.loop_ended - deadline)
            if out.destroy_called is not None:
                destroy_calls.append(out.destroy_called - deadline)
        result = forced_summary(
            n,
            samples,
            GRACE,
            loop_ended=summary(loop_ends),
            destroy_called=summary(destroy_calls),
            destroy_called_before_deadline=sum(1 for d in destroy_calls if d < 0),
            stopped_in_loop=sum(1 for out in outs if out.clean),
            requests_sent=sum(1 + out.resends for out in outs if out.first_request is not None),
            ticks=sorted({out.ticks for out in outs}),
            errors=[f"{name}: {e}" for name, out in zip(names, outs, strict=True) for e in out.errors] + hung,
        )
        print(f"  nova N={n}: { {k: v for k, v in result.items() if k != 'samples'} }", flush=True)
        return result
    finally:
        bed.remove_domains(f"{prefix}n{n}-")


def _vmop(bed: Bed, sizes: Sequence[int]) -> dict[str, Any]:
    namespace = bed.namespace("bench-nova")
    node = f"node-{namespace}"
    operator = bed.operator(node)
    try:
        return {
            str(n): vmop_force_round(bed, operator, namespace, node, n, grace=GRACE, retry=RETRY_INTERVAL)
            for n in sizes
        }
    finally:
        operator.stop()
        end_section(bed, namespace)


def run(bed: Bed, *, quick: bool) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else SIZES
    # domain names of the bench's own, apart from any operator's (theirs are <namespace>_<name>)
    prefix = f"bench-nova-direct-{time.strftime('%H%M%S')}-"
    nova: dict[str, Any] = {}
    try:
        for n in sizes:
            nova[str(n)] = _nova_round(bed, prefix, n)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            bed.remove_domains(prefix)
    return {
        "settings": {
            "grace": GRACE,
            "retry_interval": RETRY_INTERVAL,
            "guest": GUEST,
            "nova_source": NOVA_SOURCE,
            "libvirtd": dataclasses.asdict(bed.libvirt.limits),
        },
        "nova": nova,
        "vmop": _vmop(bed, sizes),
    }


def _f(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _row(label: str, d: dict[str, Any], target: str) -> tuple[str, str, str]:
    s, t, pct = d.get("sigterm") or {}, d.get("stopped") or {}, d.get("overshoot_pct_of_grace") or {}
    return (
        label,
        f"SIGTERM p50 {_f(s.get('p50'))} p99 {_f(s.get('p99'))} max {_f(s.get('max'))}; "
        f"STOPPED p99 {_f(t.get('p99'))} max {_f(t.get('max'))} ({_f(pct.get('max'), 1)}% of G); "
        f"early {d.get('early_sigterm')}",
        target,
    )


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The section's lines of the printed table: (benchmark, result, target)."""
    grace = (result.get("settings") or {}).get("grace", GRACE)
    nova, vmop = result.get("nova") or {}, result.get("vmop") or {}
    lines: list[tuple[str, str, str]] = []
    for n in sorted({*nova, *vmop}, key=int):
        if "sigterm" in (nova.get(n) or {}):
            lines.append(
                _row(
                    f"Nova _clean_shutdown loop, N={n}, {grace} s grace: past deadline (s)",
                    nova[n],
                    f"seed: up to +{grace * 0.5:g} (50%)",
                )
            )
        if "sigterm" in (vmop.get(n) or {}):
            lines.append(_row(f"  vmop, same guests, N={n}, {grace} s grace: past deadline (s)", vmop[n], "p99 < 0.25"))
    return lines
