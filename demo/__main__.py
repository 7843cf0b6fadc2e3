"""`make demo` (`python -m demo`): one command from a fresh machine to a graceful and a forced stop, told.

It runs vmop exactly as the end-to-end tests do (CRD, RBAC and admission policy from manifests/, the
operator with its ServiceAccount's token bound to its node) and shows what a user of the cluster would
see: `kubectl get`, the Events, and the shutdown record in the status. Everything it starts is stopped
by PID or through its API, also on failure or Ctrl-C; the logs of a failed run are kept under
test-logs/demo/.
"""

from __future__ import annotations

import shlex
import signal
import sys
import textwrap
from dataclasses import dataclass
from datetime import datetime
from types import FrameType
from typing import Any

import yaml

from testbed.controlplane import ControlPlane
from testbed.libvirthost import LibvirtHost
from testbed.vmop import ROOT, OperatorProcess, Vms, condition, install, node_kubeconfig, parse_time, vm_manifest

NAMESPACE = "demo"
NODE = "demo-node"
GRACE_SECONDS = 10
RETRY_SECONDS = 3
LOG_DIR = ROOT / "test-logs" / "demo"
VMS = {
    "cooperative": "coop",  # powers off when the ACPI power button is pressed
    "stubborn": "stubborn",  # ignores the button: only force turns it off
}
SHOWN_METRICS = (
    "vmop_shutdowns_total",
    "vmop_shutdown_duration_seconds_sum",
    "vmop_forced_stop_after_deadline_seconds_count",
    "vmop_forced_stop_after_deadline_seconds_sum",
)
BOOT_TIMEOUT = 180.0  # TCG guests on a busy two-core machine boot in seconds, but not always in few
STOP_TIMEOUT = GRACE_SECONDS + 60.0


class DemoFailed(Exception):
    """The demo saw something other than what vmop promises; the message says what."""


def heading(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def kubectl(control_plane: ControlPlane, *args: str, stdin: str | None = None) -> str:
    """Run and echo a kubectl command the way a person would type it (without the bed's kubeconfig flags)."""
    print(f"$ kubectl {shlex.join(args)}")
    out = control_plane.kubectl(*args, input=stdin).stdout.rstrip()
    print(textwrap.indent(out, "  "), flush=True)
    return out


def stop_finished(body: dict[str, Any]) -> bool:
    record = body.get("status", {}).get("shutdown") or {}
    return bool(record.get("outcome")) and body["status"].get("powerState") == "Stopped"


@dataclass(frozen=True)
class Line:
    at: datetime
    vm: str
    reason: str
    message: str


def timeline(vms: Vms, since: datetime) -> list[Line]:
    """The VMs' Events from the stop request on, oldest first: what `kubectl get events` shows, with times."""
    lines = [
        Line(event.event_time or event.first_timestamp, name, event.reason, event.message)
        for name in VMS
        for event in vms.events(name)
    ]
    return sorted((line for line in lines if line.at >= since), key=lambda line: line.at)


def print_timeline(lines: list[Line], t0: datetime) -> None:
    for line in lines:
        offset = (line.at - t0).total_seconds()
        print(f"  +{offset:6.2f}s  {line.vm:<12} {line.reason:<22} {line.message}")


def shutdown_record(vms: Vms, name: str) -> dict[str, Any]:
    body = vms.get(name)
    if body is None:
        raise DemoFailed(f"VirtualMachine {name} disappeared")
    record: dict[str, Any] = body["status"]["shutdown"]
    return record


def seconds(record: dict[str, Any], later: str, earlier: str) -> float:
    return (parse_time(record[later]) - parse_time(record[earlier])).total_seconds()


def show(control_plane: ControlPlane, libvirt: LibvirtHost, operator: OperatorProcess) -> str:
    """The demo proper, on a running bed; returns the summary line."""
    vms = Vms(control_plane.api_client(), NAMESPACE)
    heading("create a namespace and two VirtualMachines (grace period 10 s, request re-sent every 3 s)")
    kubectl(control_plane, "create", "namespace", NAMESPACE)
    policy = {"gracePeriodSeconds": GRACE_SECONDS, "retryIntervalSeconds": RETRY_SECONDS, "methods": ["ACPI"]}
    manifests = [
        vm_manifest(name, node_name=NODE, libvirt=libvirt, kind=kind, shutdown_policy=policy)
        for name, kind in VMS.items()
    ]
    print(f"  both with spec.shutdownPolicy: {policy}")
    print("  cooperative: a Linux guest that powers off on the ACPI power button")
    print("  stubborn:    a Linux guest that ignores it")
    kubectl(control_plane, "apply", "-n", NAMESPACE, "-f", "-", stdin=yaml.safe_dump_all(manifests))

    heading("wait until both run and their guests listen for the power button")
    for name in VMS:
        vms.wait(
            name, lambda b: b.get("status", {}).get("powerState") == "Running", timeout=BOOT_TIMEOUT, what="Running"
        )
        libvirt.wait_guest_ready(f"{NAMESPACE}_{name}", timeout=BOOT_TIMEOUT)
    kubectl(control_plane, "get", "virtualmachines", "-n", NAMESPACE)

    heading("stop both")
    stop = '{"spec":{"powerState":"Stopped"}}'
    for name in VMS:
        kubectl(control_plane, "patch", "virtualmachine", name, "-n", NAMESPACE, "--type=merge", "-p", stop)
    for name in VMS:
        vms.wait(name, stop_finished, timeout=STOP_TIMEOUT, what="the stop to finish")
    records = {name: shutdown_record(vms, name) for name in VMS}

    t0 = min(parse_time(r["requestedAt"]) for r in records.values())
    heading(f"timeline from the Events (t=0 is the first stop request, {t0.isoformat(timespec='milliseconds')})")
    lines = timeline(vms, t0)
    # The deadline is no Event but an instant in the status; shown where it forced a VM off.
    lines += [
        Line(parse_time(r["deadline"]), name, "(deadline)", "status.shutdown.deadline: the grace period is over")
        for name, r in records.items()
        if r["outcome"] == "Forced"
    ]
    print_timeline(sorted(lines, key=lambda line: line.at), t0)

    heading("what the status says")
    for name, record in records.items():
        print(
            f"  {name:<12} outcome {record['outcome']:<9} attempts {record['attempts']}  "
            f"requested +0.00s  deadline +{seconds(record, 'deadline', 'requestedAt'):.2f}s  "
            f"done +{seconds(record, 'completedAt', 'requestedAt'):.2f}s  (from its own request)"
        )
    kubectl(control_plane, "get", "virtualmachines", "-n", NAMESPACE)

    heading("metrics (Prometheus, scraped from the operator)")
    for line in operator.metrics().splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in SHOWN_METRICS and not line.endswith(" 0.0"):
            print(f"  {line}")

    coop, stubborn = records["cooperative"], records["stubborn"]
    if coop["outcome"] != "Graceful":
        raise DemoFailed(f"the cooperative guest ended {coop['outcome']}, not Graceful: {coop}")
    if stubborn["outcome"] != "Forced":
        raise DemoFailed(f"the stubborn guest ended {stubborn['outcome']}, not Forced: {stubborn}")
    late = seconds(stubborn, "completedAt", "deadline")
    if late < 0:
        raise DemoFailed(f"the stubborn guest was forced {-late:.2f}s before its deadline: {stubborn}")
    for name in VMS:
        body = vms.get(name) or {}
        ready = condition(body, "Ready") or {}
        if ready.get("status") != "True":
            raise DemoFailed(f"{name} is not Ready after its stop: {ready}")
    return (
        f"demo: cooperative stopped gracefully in {seconds(coop, 'completedAt', 'requestedAt'):.1f}s; "
        f"stubborn forced off {late:.2f}s after its {GRACE_SECONDS}s deadline"
    )


def _terminate(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so that the finally blocks stop what the demo started."""
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    failed = True
    summary = ""
    heading(
        "start the test bed: kube-apiserver + etcd (built from Go modules), libvirtd + QEMU (one-time build: minutes)"
    )
    control_plane = ControlPlane.start(failure_logs_dir=LOG_DIR / "controlplane")
    try:
        print(f"  kube-apiserver {control_plane.server}")
        libvirt = LibvirtHost.start()
        try:
            print(f"  libvirtd {libvirt.uri} (domain type {libvirt.domain_type})")
            heading(
                "install vmop from manifests/ (CRD, namespace, RBAC, node-authority policy) and run the operator "
                "with its ServiceAccount's token, bound to its node"
            )
            install(control_plane)
            operator = OperatorProcess(
                kubeconfig=node_kubeconfig(control_plane, NODE),
                node_name=NODE,
                libvirt=libvirt,
                log_path=LOG_DIR / "operator.log",
            )
            try:
                operator.start()
                print(f"  operator pid {operator.pid} for node {NODE}, log {operator.log_path.relative_to(ROOT)}")
                summary = show(control_plane, libvirt, operator)
                failed = False
            finally:
                operator.stop()
                if failed:
                    print(f"\noperator log ends:\n{operator.log_tail(30)}", file=sys.stderr)
        finally:
            if failed:
                libvirt.save_logs(LOG_DIR / "libvirt")
            libvirt.stop()
    finally:
        control_plane.stop(keep_logs=failed, logs_dest=LOG_DIR / "controlplane")
        heading("torn down: operator, libvirtd and its guests, kube-apiserver and etcd")
    print(summary)
    return 0


def run() -> int:
    try:
        return main()
    except Exception as error:  # a failed wait is an AssertionError, a refused kubectl call a ControlPlaneError
        print(f"\ndemo: FAILED: {error}\n(logs in {LOG_DIR.relative_to(ROOT)}/)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run())
