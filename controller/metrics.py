"""Prometheus metrics: what an on-call person asks of a shutdown operator, answered without reading logs."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controller.api import ObservedPowerState, ShutdownOutcome, ShutdownRecord

# Shutdowns last from a fraction of a second to the longest grace period (a day).
_DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 86400)
# A forced stop should land within milliseconds of its deadline; anything near a second is a problem.
_OVERSHOOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# What the operator asks of libvirt that changes a domain (Hypervisor's actions; looks are not counted).
LIBVIRT_ACTIONS = (
    "define",
    "start",
    "suspend",
    "resume",
    "wake_up",
    "undefine",
    "shutdown_agent",
    "shutdown_acpi",
    "destroy",
    "set_shutdown_mark",
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.vms = Gauge(
            "vmop_virtual_machines",
            "VirtualMachines of this node by observed power state.",
            ["power_state"],
            registry=self.registry,
        )
        self.shutdowns = Counter("vmop_shutdowns", "Finished stops by outcome.", ["outcome"], registry=self.registry)
        self.shutdown_seconds = Histogram(
            "vmop_shutdown_duration_seconds",
            "From the first shutdown request to the VM seen stopped, by outcome.",
            ["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.force_overshoot = Histogram(
            "vmop_forced_stop_after_deadline_seconds",
            "How long after its deadline each forced stop was seen done.",
            buckets=_OVERSHOOT_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "vmop_reconcile_errors", "Reconciles that failed, by kind of failure.", ["kind"], registry=self.registry
        )
        # At 0 from the start: an alert on vmop's own bugs sees the first one, and a test can read the zero.
        self.reconcile_errors.labels("unexpected")
        self.libvirt_connected = Gauge(
            "vmop_libvirt_connected", "1 while the libvirt connection is up.", registry=self.registry
        )
        self.node_lock_held = Gauge(
            "vmop_node_lock_held",
            "1 while this operator holds its node's lock and acts; 0 while it waits as a standby.",
            registry=self.registry,
        )
        self.shutdowns_overdue = Gauge(
            "vmop_virtual_machines_shutdown_overdue",
            "VirtualMachines of this node past their shutdown deadline and not forced (ShutdownOverdue=True).",
            registry=self.registry,
        )
        self.held_by_taint = Gauge(
            "vmop_virtual_machines_held_by_taint",
            "VirtualMachines of this node that a NoExecute taint stops or keeps off (status.heldByTaint).",
            registry=self.registry,
        )
        self.vms_reconciled = Gauge(
            "vmop_virtual_machines_reconciled",
            "VirtualMachines of this node this operator has looked at and decided on at least once since it "
            "started: equal to the VMs of the node once a restarted operator has caught up with all of them.",
            registry=self.registry,
        )
        self.libvirt_actions = Counter(
            "vmop_libvirt_actions",
            "Calls to libvirt that change a domain (define, start, destroy, ...), by action, failed ones included.",
            ["action"],
            registry=self.registry,
        )
        # Every label value exported from the start, at 0: a series that appears only at its first
        # increment hides that increment from rate() and increase(), and reads as "no data" on a dashboard.
        for outcome in ShutdownOutcome:
            self.shutdowns.labels(outcome.value)
            self.shutdown_seconds.labels(outcome.value)
        for action in LIBVIRT_ACTIONS:
            self.libvirt_actions.labels(action)
        self.power_states(Tally())

    def stop_finished(self, record: ShutdownRecord) -> None:
        if record.outcome is None or record.completed_at is None:
            return
        self.shutdowns.labels(record.outcome.value).inc()
        if record.requested_at is not None:
            seconds = (record.completed_at - record.requested_at).total_seconds()
            self.shutdown_seconds.labels(record.outcome.value).observe(seconds)
        if record.outcome is ShutdownOutcome.FORCED and record.deadline is not None:
            self.force_overshoot.observe(max(0.0, (record.completed_at - record.deadline).total_seconds()))

    def power_states(self, states: Tally[ObservedPowerState]) -> None:
        for state in ObservedPowerState:
            self.vms.labels(state.value).set(states.get(state, 0))
