"""The machine a run came from, the printed table and the JSON file: figures mean little without the first."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import libvirt

from bench import faults, nova, unasked


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
    except OSError as error:
        return f"unavailable: {error}"
    return out.strip().splitlines()[0] if out.strip() else "unavailable"


def machine(libvirt_uri: str, apiserver: Path, domain_type: str) -> dict[str, Any]:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")
    os_release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    conn = libvirt.open(libvirt_uri)
    try:
        daemon, hypervisor = _version(conn.getLibVersion()), _version(conn.getVersion())
    finally:
        conn.close()
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(int(meminfo["MemTotal"].split()[0]) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_release.get("PRETTY_NAME", "unknown").strip('"'),
        "libvirt": {"library": _version(libvirt.getVersion()), "daemon": daemon, "qemu_via_libvirt": hypervisor},
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "guest_domain_type": domain_type,
        "kube_apiserver": _first_line([str(apiserver), "--version"]),
        "python": platform.python_version(),
    }


def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def _libvirt_call(c: dict[str, Any]) -> str:
    if c.get("blocked") is None:
        how = f"still blocked after {_f(c.get('still_blocked_after'), 0)} s"
    else:
        how = f"returned after {_f(c['blocked'], 2)} s"
        how += f", failed: {c['error']}" if c.get("error") else ", no error"
    how += ", ACPI press reached the guest" if c.get("acpi_press_accepted") else ", no ACPI press"
    stopped = c.get("call_to_stopped")
    return how + (f"; stopped +{_f(stopped, 2)} s" if stopped is not None else "; guest left running")


def _agent_rows(a: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    v = a.get("vmop") or {}
    if "requested_to_first_attempt" in v:
        rows.append(
            (
                f"hung agent: vmop stop [Agent, ACPI], agent timeout {_f(v['agent_timeout'], 0)} s",
                f"first attempt +{_f(v['requested_to_first_attempt'], 2)} s ({v['first_attempt_method']} accepted), "
                f"stopped +{_f(v.get('requested_to_stopped'), 2)} s",
                "~agent timeout",
            )
        )
    for key, label in (
        ("libvirt_default", "shutdownFlags(0), same guest"),
        ("libvirt_acpi", "shutdownFlags(ACPI_POWER_BTN), same guest"),
        ("libvirt_default_ignore", "shutdownFlags(0), agent ignoring shutdown"),
    ):
        c = a.get(key) or {}
        if "flags" in c:
            rows.append((f"  libvirt {label}", _libvirt_call(c), ""))
    n = a.get("neighbour") or {}
    for key, label in (
        ("in_flight", f"{n.get('hung_guests')} hung-agent stops in flight"),
        ("idle", f"{n.get('hung_guests')} hung-agent guests idle"),
        ("none", "no hung agents"),
    ):
        d = n.get(key) or {}
        if "p50" not in d:
            continue
        first = key == "in_flight"
        rows.append(
            (
                f"neighbour force overshoot, {label} (s)" if first else f"  {label}",
                f"p50 {_f(d['p50'])}  p99 {_f(d['p99'])}  max {_f(d['max'])}  early {d.get('forced_before_deadline')}",
                "same as without" if first else "",
            )
        )
    return rows


def _budget_rows(budget: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Where a converge run's CPU went, and the least time that work takes on the machine's cores."""
    spent = budget.get("cpu_seconds_by_process")
    if not spent:
        return []
    return [
        (
            "    CPU-s until the last ran, by process; that work spread over the cores: all; all but the operator",
            ", ".join(f"{name} {_f(seconds, 1)}" for name, seconds in spent.items())
            + f"; {budget['cores']} cores: {_f(budget['all_work_on_the_cores'], 1)} s; "
            f"{_f(budget['without_the_operator'], 1)} s",
            "",
        )
    ]


def _storage_rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    cold, warm = s.get("cold") or {}, s.get("warm") or {}
    if not cold:
        return []

    def by_depth(runs: dict[str, Any], key: str, digits: int) -> str:
        return " / ".join(_f(runs[depth][key], digits) for depth in cold if depth in runs)

    depths = " / ".join(cold)
    rows = [
        (
            f"storage check, cold, qcow2 chain of {depths} (ms)",
            f"p50 {by_depth(cold, 'p50_ms', 1)}  p95 {by_depth(cold, 'p95_ms', 1)}",
            "",
        ),
        ("  cached, same chains (ms)", f"p50 {by_depth(warm, 'p50_ms', 3)}  p95 {by_depth(warm, 'p95_ms', 3)}", ""),
    ]
    firmware, linux = s.get("firmware") or {}, s.get("linux_guest") or {}
    if "p50_ms" in firmware and "p50_ms" in linux:
        rows.append(
            (
                "  cached, no file / kernel+initrd+raw disk (ms)",
                f"p50 {_f(firmware['p50_ms'])} / {_f(linux['p50_ms'])}",
                "",
            )
        )
    c = s.get("concurrent") or {}
    if "warm_total_ms" in c:
        rows.append(
            (
                f"  cached, {c['vms']} VMs at once (qcow2 overlay each)",
                f"{_f(c['warm_total_ms']['p50_ms'], 1)} ms, {_f(c['warm_mean_per_check_ms'])} ms per check (one "
                f"after another {_f(c['warm_one_after_another_mean_ms'])}); cold {_f(c['cold_total_ms'] / 1000, 2)} s",
                "",
            )
        )
    return rows


def _maintenance_rows(m: dict[str, Any]) -> list[tuple[str, str, str]]:
    stop, start = m.get("stop") or {}, m.get("start") or {}
    rows: list[tuple[str, str, str]] = []
    if "total" in stop:
        spans = " / ".join(_f(g["span"], 1) for g in stop["groups"])
        gaps = " / ".join(_f(gap, 2) for gap in stop["gaps"])
        rows.append(
            (
                f"maintenance, {m['groups']}x{m['per_group']} VMs ({m['stubborn_per_group']} stubborn each), "
                f"G={m['grace']} s: taint to all off",
                f"{_f(stop['total'], 1)} s (sum of G {stop['sum_of_grace']} s), left running {stop['left_running']}, "
                f"order violations {stop['order_violations']}",
                "~sum of G",
            )
        )
        rows.append(("  group spans (s), lowest first; gaps (s)", f"{spans}; {gaps}", ""))
    if "total" in start:
        gaps = " / ".join(_f(gap, 2) for gap in start["gaps"])
        rows.append(
            (
                "  untaint to all Running, highest first",
                f"{_f(start['total'], 1)} s, gaps {gaps} s, order violations {start['order_violations']}",
                "",
            )
        )
    return rows


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    for label, by_n in (results.get("deadline_overshoot") or {}).items():
        limits = by_n.get("libvirtd") or {}
        alone = by_n.get("libvirt_alone") or {}
        if "sigterm" in alone:
            rows.append(
                (
                    f"libvirt alone (no vmop): {alone['n']} graceful destroys at one instant, libvirtd {label}: "
                    "SIGTERM; STOPPED (s)",
                    f"p50 {_f(alone['sigterm']['p50'])}  p99 {_f(alone['sigterm']['p99'])}  "
                    f"max {_f(alone['sigterm']['max'])}; p99 {_f(alone['stopped']['p99'])}",
                    "the floor",
                )
            )
        for n, d in by_n.items():
            if not n.isdigit() or "sigterm" not in d:
                continue
            sigterm, stopped = d["sigterm"], d["stopped"]
            rows.append(
                (
                    f"force past deadline, N={n}, libvirtd {label} ({limits.get('max_workers')} workers, "
                    f"{limits.get('max_client_requests')}/client): SIGTERM; STOPPED (s)",
                    f"p50 {_f(sigterm['p50'])}  p99 {_f(sigterm['p99'])}  max {_f(sigterm['max'])}; "
                    f"p99 {_f(stopped['p99'])}  max {_f(stopped['max'])}; early {d['early_sigterm']}",
                    "SIGTERM p99 < 0.02, none early, N=100 tuned" if n == "100" and label == "tuned" else "",
                )
            )
            sent, after = d.get("destroy_sent") or {}, d.get("destroy_sent_to_sigterm") or {}
            if "p99" in sent and "p99" in after:
                rows.append(
                    (
                        "  of which: deadline to destroy sent (operator); sent to SIGTERM (libvirtd, QEMU) (s)",
                        f"p50 {_f(sent['p50'])}  p99 {_f(sent['p99'])}  max {_f(sent['max'])}; "
                        f"p50 {_f(after['p50'])}  p99 {_f(after['p99'])}  max {_f(after['max'])}; "
                        f"not armed {d.get('destroy_not_armed')}",
                        "",
                    )
                )
            if cpu := d.get("machine_cpu_while_due"):
                rows.append(
                    (
                        "  the machine's cores from the first deadline to the last SIGTERM: busy; stolen by the host",
                        f"{_f(cpu['busy'] * 100, 0)}%; {_f(cpu['steal'] * 100, 0)}%",
                        "",
                    )
                )
    rows += nova.rows(results.get("nova") or {})
    g = results.get("graceful_detection") or {}
    if "p50" in g:
        rows.append(
            (
                f"graceful detection, {g.get('n')} guests (s)",
                f"p50 {_f(g['p50'])}  p99 {_f(g['p99'])}  max {_f(g['max'])}",
                "p99 < 0.5",
            )
        )
    rows += unasked.rows(results.get("unasked") or {})
    p = results.get("parallel") or {}
    if "vmop_total" in p:
        label = f"parallel, N={p['n']} ({p.get('coop')} coop), G={p['grace']} s"
        rows.append((label + ": vmop", f"{_f(p['vmop_total'], 1)} s, left running {p['vmop_left_running']}", "~G"))
        rows.append(
            (
                "  libvirt-guests PARALLEL_SHUTDOWN=0",
                f"{_f(p['libvirt_guests_serial_total'], 1)} s ({_f(p.get('ratio_serial_to_vmop'), 1)}x), left running "
                f"{p['libvirt_guests_serial_left_running']}",
                "",
            )
        )
        rows.append(
            (
                f"  libvirt-guests PARALLEL_SHUTDOWN={p.get('libvirt_guests_parallel_degree')}",
                f"{_f(p['libvirt_guests_parallel_total'], 1)} s ({_f(p.get('ratio_parallel_to_vmop'), 1)}x), left running "
                f"{p['libvirt_guests_parallel_left_running']}",
                "",
            )
        )
    rows += _agent_rows(results.get("agent") or {})
    s = results.get("scale") or {}
    if "converge" in s:
        rows.append(
            (
                f"scale, {s['vms']} own VMs created at once (test driver)",
                f"converge {_f(s['converge'], 1)} s (creating them {_f(s.get('create_seconds'), 1)} s), "
                f"{_f(s.get('api_requests_per_vm'), 2)} API requests per VM, peak RSS {_f(s['rss_mib'], 0)} MiB, "
                f"{_f(s.get('cpu_seconds_converge'), 1)} CPU-s",
                "< 10 s, <= 4 per VM",
            )
        )
        rows += _budget_rows(s.get("to_converge") or {})
        r = s.get("restart_1000") or {}
        if "reconciled_seconds" in r:
            rows.append(
                (
                    f"  operator restarted under {r['vms']} steady VMs",
                    f"every VM reconciled {_f(r['reconciled_seconds'], 1)} s after start; {r['api_writes']} API "
                    f"writes, {r['libvirt_actions']} libvirt actions, {r['events_logged']} Events "
                    f"({r['api_requests']} requests)",
                    "0 writes, actions, Events",
                )
            )
        b = s.get("scale_3000") or {}
        if "converge" in b:
            rows.append(
                (
                    f"  {b['vms']} VMs on one node",
                    f"converge {_f(b['converge'], 1)} s, {_f(b.get('api_requests_per_vm'), 2)} API requests per VM, "
                    f"peak RSS {_f(b['rss_mib'], 0)} MiB, {_f(b.get('cpu_seconds_converge'), 1)} CPU-s",
                    "RSS < 300 MiB",
                )
            )
            rows += _budget_rows(b.get("to_converge") or {})
        f = s.get("foreign_990") or {}
        if "converge" in f:
            rows.append(
                (
                    f"  {f['own']} own + {f['foreign']} foreign",
                    f"converge {_f(f['converge'], 2)} s, {f['api_requests']} API requests, RSS {_f(f['rss_mib'], 0)} "
                    f"MiB (own-only {_f(f['rss_baseline_own_only_mib'], 0)}), {f['watch_events_received']} watch "
                    f"events + {f['objects_listed_at_start']} listed",
                    "scales with own VMs",
                )
            )
    i = results.get("idle") or {}
    if "cpu_seconds" in i:
        rows.append(
            (
                f"idle, {i['vms']} VMs for {_f(i['seconds'], 0)} s",
                f"{_f(i['cpu_seconds'])} CPU s, {i['api_requests']} API requests",
                "no polling",
            )
        )
    rows += _storage_rows(results.get("storage") or {})
    rows += _maintenance_rows(results.get("maintenance") or {})
    rows += faults.rows(results.get("faults") or {})
    widths = [max(len(r[c]) for r in [("benchmark", "result", "target"), *rows]) for c in range(3)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(("benchmark", "result", "target"), widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)
