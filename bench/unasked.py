"""Guest-initiated power-off (issue 13): from libvirt's STOPPED event to the API's Stopped and GuestInitiated.

Cooperative guests created through vmop power themselves off unasked, all at the same moment, and each is
timed from libvirt's STOPPED event (the bench's own listener) to the arrival of `status.powerState:
Stopped` on the bench's own watch; then its `status.shutdown.outcome` must read GuestInitiated. The
operator's status write, from the apiserver's audit log, splits each time into the operator's share and
the API's, as graceful detection does for the stops vmop asked for.

"At once" is made true by the guest image's knob `poweroff_after` counted from a key press
(`poweroff_from="key"`): a timer counted from each guest's readiness would spread the power-offs as
widely as the readiness of 10 TCG boots on 2 cores (seconds), and a guest's wall clock under TCG is off
by up to 2 s (its emulated RTC counts whole seconds, at a phase of its own), so the bench presses a key
on every guest's PS/2 keyboard (libvirt's send-key, on its own connection) once all have booted and
settled, and each guest powers itself off POWEROFF_AFTER seconds later. The presses are over before the
first power-off, so the bench's libvirt calls do not overlap what is measured; vmop takes no part in
them, and libvirt's shutdown machinery none either (no virDomainShutdown is called).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import libvirt

from bench.bed import Bed, parallel
from bench.shutdown import SETTLE_SECONDS, domain_name, end_section, start_vms
from bench.stats import summary
from testbed.vmop import condition

POWEROFF_AFTER = 1.0
"""Seconds from the key press to each guest's own power-off: long enough for the bench to have pressed
every key (0.05 s for all 10 on the busy 2-core machine) before the first guest goes."""
RESTART_POLICY = "OnFailure"
"""Leaves a guest that powered itself off cleanly off (Always would start it again at once, and the start
would blur the figure), yet still makes the operator judge the stop's cause: a stop taken for a crash or
an outside destroy would be started again, and show in `restarted`."""
HOLD_SECONDS = 1.0
"""How long after the last status the bench watches for a restart the policy should not make."""
KEY_SPACE = 57
"""A Linux key code (input-event-codes.h), as virDomainSendKey takes it with VIR_KEYCODE_SET_LINUX."""

_SHUTOFF_REASONS = {
    getattr(libvirt, name): name.removeprefix("VIR_DOMAIN_SHUTOFF_")
    for name in dir(libvirt)
    if name.startswith("VIR_DOMAIN_SHUTOFF_") and name != "VIR_DOMAIN_SHUTOFF_LAST"
}


def _press_keys(bed: Bed, domains: Sequence[str]) -> tuple[float, float]:
    """One key on every guest, all at once (libvirt serves one connection's calls concurrently, each
    domain's monitor on its own); returns when the presses began and when the last had been delivered."""
    conn = bed.libvirt.connect()
    try:
        doms = [conn.lookupByName(domain) for domain in domains]
        since = time.time()
        parallel(lambda dom: dom.sendKey(libvirt.VIR_KEYCODE_SET_LINUX, 0, [KEY_SPACE], 1, 0), doms, threads=len(doms))
        return since, time.time() - since
    finally:
        conn.close()


def _shutoff_reasons(bed: Bed, domains: Sequence[str]) -> Counter[str]:
    conn = bed.libvirt.connect()
    try:
        reasons: Counter[str] = Counter()
        for domain in domains:
            state, reason = conn.lookupByName(domain).state()
            label = _SHUTOFF_REASONS.get(reason, str(reason)) if state == libvirt.VIR_DOMAIN_SHUTOFF else "running"
            reasons[label] += 1
        return reasons
    finally:
        conn.close()


def run(bed: Bed, *, quick: bool) -> dict[str, Any]:
    count = 2 if quick else 10
    namespace = bed.namespace("bench-unasked")
    node = f"node-{namespace}"
    operator = bed.operator(node)
    names = [f"coop-{i:02d}" for i in range(count)]
    domains = {name: domain_name(namespace, name) for name in names}
    clock = time.monotonic()
    try:
        # each counts once its guest printed GUEST-READY, by which time its key reader holds the keyboard open
        start_vms(
            bed,
            namespace,
            node=node,
            kinds=dict.fromkeys(names, "coop"),
            policy=None,
            watch_timeout=120,
            restart_policy=RESTART_POLICY,
            poweroff_after=POWEROFF_AFTER,
            poweroff_from="key",
        )
        booted = time.monotonic() - clock
        time.sleep(SETTLE_SECONDS)
        vm_watch = bed.watch(namespace)
        try:
            since, keys_sent_in = _press_keys(bed, list(domains.values()))
            stops = bed.listener.wait_stopped(domains.values(), since, POWEROFF_AFTER + 30)
            vm_watch.wait_all([n for n in names if domains[n] in stops], "Stopped", timeout=30)
            samples: list[float] = []
            operator_share: list[float] = []
            api_share: list[float] = []
            for name in names:
                stopped = stops.get(domains[name])
                seen = vm_watch.first(name, "Stopped", since)
                if stopped is None or seen is None:
                    continue
                samples.append(round(seen - stopped, 4))
                # the write that made it Stopped is the operator's last status write before the watch saw it
                writes = bed.audit.status_writes(namespace, name, stopped - 0.05, seen)
                if writes:
                    operator_share.append(writes[-1] - stopped)
                    api_share.append(seen - writes[-1])
        finally:
            vm_watch.stop()
        outcomes: Counter[str] = Counter()
        ready_reasons: Counter[str] = Counter()
        for name in names:
            body = bed.vms(namespace).get(name) or {}
            outcome = ((body.get("status") or {}).get("shutdown") or {}).get("outcome")
            outcomes[str(outcome)] += 1
            ready_reasons[str((condition(body, "Ready") or {}).get("reason"))] += 1
        time.sleep(HOLD_SECONDS)
        restarted = sum(1 for d in domains.values() if bed.listener.started_after(d, since) is not None)
        result = {
            "n": count,
            "poweroff_after": POWEROFF_AFTER,
            "poweroff_from": "key",
            "restart_policy": RESTART_POLICY,
            "measured": len(samples),
            "left_running": count - len(stops),
            "outcomes": dict(outcomes),
            "outcome_mismatches": count - outcomes["GuestInitiated"],
            "ready_reasons": dict(ready_reasons),
            "libvirt_reasons": dict(_shutoff_reasons(bed, list(domains.values()))),
            "restarted": restarted,
            "stopped_to_status": summary(samples),
            "event_to_status_write": summary(operator_share),
            "status_write_to_watch": summary(api_share),
            "keys_sent_in": round(keys_sent_in, 4),
            "key_to_stopped": summary([t - since for t in stops.values()]),
            "spread_of_poweroffs": round(max(stops.values()) - min(stops.values()), 4) if stops else None,
            "samples": samples,
            # when each guest's STOPPED came, after the first: how much "at once" the stops were
            "stop_offsets": sorted(round(t - min(stops.values()), 4) for t in stops.values()),
            "boot_seconds": round(booted, 1),
        }
        print(f"  unasked power-off: {result}", flush=True)
        return result
    finally:
        operator.stop()
        end_section(bed, namespace)


def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The section's lines of the printed table: (benchmark, result, target)."""
    s = result.get("stopped_to_status") or {}
    if "p99" not in s:
        return []
    n = result.get("n")
    out = [
        (
            f"unasked power-off, {n} at once: STOPPED to status (s)",
            f"p50 {_f(s['p50'])}  p99 {_f(s['p99'])}  max {_f(s['max'])}",
            "p99 < 0.1",
        )
    ]
    w, a = result.get("event_to_status_write") or {}, result.get("status_write_to_watch") or {}
    out.append(
        (
            "  event to status write / write to watch, p99 (s)",
            f"{_f(w.get('p99'))} / {_f(a.get('p99'))}",
            "",
        )
    )
    out.append(
        (
            "  outcome GuestInitiated / restarted / spread",
            f"{n - result.get('outcome_mismatches', 0)} of {n} / {result.get('restarted')} / "
            f"{_f(result.get('spread_of_poweroffs'))} s",
            f"{n} of {n} / 0 / -",
        )
    )
    return out
