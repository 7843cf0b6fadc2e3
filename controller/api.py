"""The VirtualMachine API (vmop.dev/v1alpha1): the one definition that the CRD schema is generated from.

Field descriptions are what `kubectl explain` shows, so they are written for the user of the API.
Validation that the API server can do (enums, bounds, CEL rules) lives here too, as schema extras, so
that bad input is refused at `kubectl apply` time rather than discovered by the operator.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

GROUP = "vmop.dev"
VERSION = "v1alpha1"
KIND = "VirtualMachine"
PLURAL = "virtualmachines"
SINGULAR = "virtualmachine"
SHORT_NAMES = ["lvvm"]

FINALIZER = "vmop.dev/undefine-domain"
RESTART_ANNOTATION = "vmop.dev/restartedAt"

# The limits of the machine every domain gets: QEMU's default x86 machine, i440fx ("pc"), takes at most 255
# vCPUs and has 2 IDE buses of 2 units each. libvirt refuses more at define or start.
MAX_VCPUS = 255
MAX_IDE_DISKS = 4
_IDE_DISKS_MESSAGE = f"at most {MAX_IDE_DISKS} disks on bus ide (the machine has 2 IDE buses of 2 units each)"

# Patterns are checked by the API server (Go's RE2, OpenAPI `pattern`) and by pydantic (Rust's regex crate),
# so they keep to the syntax both read alike: classes, \xHH escapes, and ^ and $ as start and end of text.
# No control characters (C0 and DEL), in text that goes into the domain XML or to the file system: libxml2
# refuses most of them in a definition, and a NUL cannot be in a file name (os.path.realpath raises on it).
_NO_CONTROL = r"[^\x00-\x1F\x7F]"
ABSOLUTE_PATH_PATTERN = f"^/{_NO_CONTROL}*$"
TEXT_PATTERN = f"^{_NO_CONTROL}*$"
MAC_PATTERN = r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"
# The first octet's least significant bit (the group bit) clear: libvirt refuses a multicast MAC. A rule of
# its own, not part of the pattern, so that the API server's refusal says so in words, not as a regex.
UNICAST_MAC_RULE = "self.matches('^[0-9a-fA-F][02468aceACE]')"
UNICAST_MAC_MESSAGE = (
    "must be a unicast MAC address: the first octet must be even (01:..., 33:... and ff:ff:ff:ff:ff:ff are "
    "multicast or broadcast, and libvirt refuses them); 52:54:00:xx:xx:xx is the usual choice"
)


def _unicast(value: str | None) -> str | None:
    if value is not None and int(value[:2], 16) & 1:
        raise ValueError(UNICAST_MAC_MESSAGE)
    return value


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


def _validations(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules for the CRD schema, as (rule, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class PowerState(StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"
    PAUSED = "Paused"


class ObservedPowerState(StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"
    PAUSED = "Paused"
    SHUTTING_DOWN = "ShuttingDown"
    CRASHED = "Crashed"
    UNKNOWN = "Unknown"


class ShutdownMode(StrEnum):
    GRACEFUL = "Graceful"
    FORCE = "Force"


class ShutdownMethod(StrEnum):
    ACPI = "ACPI"
    AGENT = "Agent"


class RestartPolicy(StrEnum):
    ALWAYS = "Always"
    ON_FAILURE = "OnFailure"
    NEVER = "Never"


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class DiskBus(StrEnum):
    VIRTIO = "virtio"
    SATA = "sata"
    SCSI = "scsi"
    IDE = "ide"


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


# The prefix of the taints Kubernetes itself puts on a node (not-ready, unreachable, memory-pressure, ...).
SYSTEM_TAINT_PREFIX = "node.kubernetes.io/"


class InterfaceType(StrEnum):
    NETWORK = "network"
    BRIDGE = "bridge"


class ShutdownPolicy(_Model):
    mode: ShutdownMode = Field(
        ShutdownMode.GRACEFUL,
        description=(
            "Graceful asks the guest to shut down and forces it off only when the grace period has passed "
            "(if forceAfterDeadline). Force turns the VM off at once, like pulling the plug. Switching to "
            "Force while a graceful stop is under way forces the VM off at once."
        ),
    )
    grace_period_seconds: int = Field(
        120,
        ge=0,
        le=86400,
        description=(
            "How long the guest gets to shut down. The deadline is the moment the stop was first requested "
            "plus this. Lowering it during a stop brings the deadline forward; raising it never pushes it back."
        ),
    )
    force_after_deadline: bool = Field(
        True,
        description=(
            "When the deadline passes: true forces the VM off; false never forces, reports the shutdown as "
            "overdue (condition ShutdownOverdue and an Event) and keeps asking until the guest stops or mode "
            "is set to Force."
        ),
    )
    retry_interval_seconds: int = Field(
        10,
        ge=0,
        le=86400,
        description=(
            "Re-send the shutdown request this often, for guests that miss the first one (a booting OS misses "
            "the ACPI power button). 0 sends it once. Nothing is re-sent in the last second before a forced "
            "stop: no guest would finish shutting down in it, and the force is made ready then."
        ),
    )
    methods: Annotated[
        list[ShutdownMethod],
        Field(
            default_factory=lambda: [ShutdownMethod.ACPI],
            min_length=1,
            max_length=2,
            json_schema_extra={"x-kubernetes-list-type": "set", "default": [ShutdownMethod.ACPI.value]},
            description=(
                "How to ask the guest, in order: ACPI (the power button) and Agent (the QEMU guest agent). "
                "Each request tries them in order and stops at the first the hypervisor accepts. Agent is "
                "tried only while a guest agent is connected (status.agentConnected), and a hung one costs "
                "at most the operator's agent timeout before the next method."
            ),
        ),
    ]
    on_delete: ShutdownMode = Field(
        ShutdownMode.GRACEFUL,
        description=(
            "What deleting the VirtualMachine does before the domain is undefined: Graceful stops the VM as "
            "above; Force turns it off at once. Disks are never deleted. The API server ignores "
            "`kubectl delete --grace-period` for custom resources: set mode to Force to shorten a graceful "
            "delete that is under way."
        ),
    )


class Disk(_Model):
    path: str = Field(
        min_length=2,
        max_length=4096,
        pattern=ABSOLUTE_PATH_PATTERN,
        description=(
            "Absolute path of the disk image on the node, without control characters; must lie inside the "
            "operator's allowed storage directories."
        ),
    )
    format: DiskFormat = Field(DiskFormat.RAW, description="Image format.")
    bus: DiskBus = Field(DiskBus.VIRTIO, description="The bus the guest sees the disk on.")
    read_only: bool = Field(False, description="Attach the disk read-only.")


class Interface(_Model):
    type: InterfaceType = Field(description="network: a libvirt network by name; bridge: a host bridge by name.")
    source: str = Field(
        min_length=1,
        max_length=253,
        pattern=TEXT_PATTERN,
        description="The libvirt network or host bridge to attach to (no control characters).",
    )
    model: str = Field(
        "virtio", pattern=r"^[a-z0-9_-]{1,32}$", description="The NIC model the guest sees (e.g. virtio, e1000)."
    )
    mac_address: Annotated[str | None, AfterValidator(_unicast)] = Field(
        None,
        max_length=17,
        pattern=MAC_PATTERN,
        json_schema_extra=_validations((UNICAST_MAC_RULE, UNICAST_MAC_MESSAGE)),
        description=(
            "A fixed unicast MAC address, such as 52:54:00:12:34:56 (the first octet even: libvirt refuses a "
            "multicast address); libvirt chooses one if unset."
        ),
    )


class Toleration(_Model):
    """A Pod's toleration, field for field: the same words mean the same on a VirtualMachine."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            (
                "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
                "an empty key needs operator Exists",
            ),
            (
                "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "value must be empty with operator Exists",
            ),
            (
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds needs effect NoExecute",
            ),
        )
    )

    key: str | None = Field(
        None,
        max_length=316,
        pattern=TEXT_PATTERN,
        description="The taint key this toleration matches; empty (with operator Exists) matches every taint.",
    )
    operator: TolerationOperator = Field(
        TolerationOperator.EQUAL,
        description="Equal matches a taint of this key and value; Exists matches any value of the key.",
    )
    value: str | None = Field(None, max_length=63, pattern=TEXT_PATTERN, description="The taint value (Equal).")
    effect: TaintEffect | None = Field(
        None,
        description=("The taint effect this toleration matches; empty matches all. Only NoExecute taints stop a VM."),
    )
    # No bounds, as a Pod's (an int64): the API server holds a schema bound as a float64, and 2**63 - 1
    # rounds past int64 and refuses every value. Beyond 10**9 s (31 years) it counts as 10**9.
    toleration_seconds: int | None = Field(
        None,
        description=(
            "With effect NoExecute: how long after the taint was added the VM keeps running before it is "
            "stopped (0 or less: at once). Unset tolerates the taint for ever. The taints Kubernetes puts "
            f"on a node whose kubelet stops reporting ({SYSTEM_TAINT_PREFIX}not-ready, unreachable and the "
            f"other {SYSTEM_TAINT_PREFIX}* taints) never stop a VM unless it has a toleration for that "
            "taint with tolerationSeconds: a guest does not depend on its node's kubelet."
        ),
    )

    @model_validator(mode="after")
    def _rules_of_the_schema(self) -> Toleration:
        if not self.key and self.operator is not TolerationOperator.EXISTS:
            raise ValueError("an empty key needs operator Exists")
        if self.operator is TolerationOperator.EXISTS and self.value:
            raise ValueError("value must be empty with operator Exists")
        if self.toleration_seconds is not None and self.effect is not TaintEffect.NO_EXECUTE:
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class DomainSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_validations(
            ("!has(self.initrd) || has(self.kernel)", "initrd needs kernel (direct kernel boot)"),
            ("!has(self.cmdline) || has(self.kernel)", "cmdline needs kernel (direct kernel boot)"),
            (
                f"!has(self.disks) || self.disks.filter(d, has(d.bus) && d.bus == 'ide').size() <= {MAX_IDE_DISKS}",
                _IDE_DISKS_MESSAGE,
            ),
        )
    )

    vcpus: int = Field(
        1,
        ge=1,
        le=MAX_VCPUS,
        description=f"Number of virtual CPUs (at most {MAX_VCPUS}, the limit of QEMU's i440fx machine).",
    )
    memory_mib: int = Field(alias="memoryMiB", ge=8, le=4194304, description="Guest memory in MiB.")
    kernel: str | None = Field(
        None,
        min_length=2,
        max_length=4096,
        pattern=ABSOLUTE_PATH_PATTERN,
        description=(
            "Direct kernel boot: absolute path of the kernel on the node, without control characters. Without "
            "it the firmware boots from the first disk."
        ),
    )
    initrd: str | None = Field(
        None,
        min_length=2,
        max_length=4096,
        pattern=ABSOLUTE_PATH_PATTERN,
        description="Direct kernel boot: the initrd's absolute path, without control characters.",
    )
    cmdline: str | None = Field(
        None,
        max_length=4096,
        pattern=TEXT_PATTERN,
        description="Direct kernel boot: the kernel command line, on one line (no control characters).",
    )
    disks: list[Disk] = Field(
        default_factory=list, max_length=16, description="Disks in boot order. They are never deleted by vmop."
    )
    interfaces: list[Interface] = Field(default_factory=list, max_length=16, description="Network interfaces.")
    guest_agent: bool = Field(
        False,
        description=(
            "Give the guest a QEMU guest agent channel (needed by the Agent shutdown method; the guest must run "
            "qemu-guest-agent)."
        ),
    )

    @model_validator(mode="after")
    def _rules_of_the_schema(self) -> DomainSpec:
        # The same rules as the CEL rules above, for the operator, which validates the spec with this model.
        if self.initrd is not None and self.kernel is None:
            raise ValueError("initrd needs kernel (direct kernel boot)")
        if self.cmdline is not None and self.kernel is None:
            raise ValueError("cmdline needs kernel (direct kernel boot)")
        if sum(disk.bus is DiskBus.IDE for disk in self.disks) > MAX_IDE_DISKS:
            raise ValueError(_IDE_DISKS_MESSAGE)
        return self


class VirtualMachineSpec(_Model):
    node_name: str = Field(
        min_length=1,
        max_length=253,
        json_schema_extra=_validations(("self == oldSelf", "nodeName is immutable: recreate the VM to move it")),
        description="The node whose vmop operator owns this VM. Immutable.",
    )
    power_state: PowerState = Field(PowerState.RUNNING, description="The power state the VM should be in.")
    shutdown_policy: ShutdownPolicy = Field(
        default_factory=ShutdownPolicy,
        json_schema_extra={"default": {}},
        description="How the VM may be turned off, on stop, restart and delete.",
    )
    restart_policy: RestartPolicy = Field(
        RestartPolicy.ALWAYS,
        description=(
            "What vmop does when the VM stops without being asked (powerState Running): Always starts it "
            "again; OnFailure starts it again after a crash or an outside destroy, but leaves a guest that "
            "powered itself off cleanly off; Never leaves it as it is. The status says what happened. A VM "
            "left off starts again when its spec changes or a restart is requested."
        ),
    )
    domain: DomainSpec = Field(description="The libvirt domain to define for this VM.")
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Taints of the node this VM tolerates, as a Pod's tolerations. A NoExecute taint of the node that "
            "the VM does not tolerate stops it by its shutdownPolicy (status.shutdown.purpose Taint) and "
            "keeps it off, whatever powerState says, until the taint is removed; then a VM whose powerState "
            f"is Running starts again. The {SYSTEM_TAINT_PREFIX}* taints (not-ready, unreachable, ...) stop "
            "nothing unless a toleration with tolerationSeconds asks for it. See README, Maintaining a node."
        ),
    )
    priority: int = Field(
        0,
        ge=-1_000_000_000,
        le=1_000_000_000,
        description=(
            "The order of node maintenance: under a NoExecute taint the node's VMs stop in groups of equal "
            "priority, lowest first, each group once every VM of the lower ones is off; when the taint goes "
            "they start again highest first, each group once the higher ones run. Give a database a higher "
            "priority than the applications that write to it."
        ),
    )


class Condition(_Model):
    type: str = Field(
        description=(
            "Ready: the VM is in its desired power state. Synced: the last reconcile succeeded. Reconciling "
            "(present only while true): the VM moves toward its desired state. Stalled (present only while "
            "true): it cannot get there until a person acts."
        )
    )
    status: str = Field(description="True, False or Unknown.")
    reason: str = Field(description="A CamelCase word a program can act on.")
    message: str = Field("", description="What a person needs to know.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(None, description="The spec generation the condition was computed from.")


class ShutdownAttempt(_Model):
    time: datetime = Field(description="When the request was sent.")
    method: str = Field(description="The method the hypervisor accepted (ACPI or Agent), or None if none was.")
    message: str = Field("", description="Why earlier methods in the list were not used, if any.")


class ShutdownOutcome(StrEnum):
    GRACEFUL = "Graceful"
    FORCED = "Forced"
    GUEST_INITIATED = "GuestInitiated"
    CRASHED = "Crashed"
    DESTROYED = "Destroyed"
    CANCELLED = "Cancelled"


class ShutdownPurpose(StrEnum):
    STOP = "Stop"
    RESTART = "Restart"
    DELETE = "Delete"
    TAINT = "Taint"
    NONE = "None"


class ShutdownRecord(_Model):
    purpose: ShutdownPurpose = Field(
        description=(
            "Why the VM was turned off: Stop, Restart, Delete, Taint (a NoExecute taint of the node, named in "
            "taint), or None when nobody asked (the guest or someone else did)."
        )
    )
    taint: str | None = Field(None, description="With purpose Taint: the node's taint, as key=value:effect.")
    requested_at: datetime | None = Field(None, description="When vmop first asked for this stop.")
    deadline: datetime | None = Field(None, description="When vmop forces the VM off (if forceAfterDeadline).")
    method: str | None = Field(None, description="The method of the latest request (ACPI, Agent or Force).")
    attempts: int = Field(0, ge=0, description="How many shutdown requests were sent.")
    recent_attempts: list[ShutdownAttempt] = Field(
        default_factory=list, description="The latest requests, oldest first (at most 10)."
    )
    outcome: ShutdownOutcome | None = Field(
        None,
        description=(
            "How it ended: Graceful (the guest shut down when asked), Forced (turned off at the deadline or "
            "by mode Force), GuestInitiated (the guest powered itself off unasked), Crashed, Destroyed "
            "(turned off from outside vmop) or Cancelled (powerState went back to Running first)."
        ),
    )
    completed_at: datetime | None = Field(None, description="When the VM was seen stopped, or the stop cancelled.")
    generation: int | None = Field(None, description="The spec generation at which the VM stopped unasked.")


class VirtualMachineStatus(_Model):
    power_state: ObservedPowerState = Field(
        ObservedPowerState.UNKNOWN, description="The power state observed in libvirt."
    )
    domain_name: str | None = Field(None, description="The libvirt domain's name.")
    domain_uuid: str | None = Field(None, alias="domainUUID", description="The libvirt domain's UUID.")
    observed_generation: int | None = Field(None, description="The spec generation last acted on.")
    started_at: datetime | None = Field(None, description="When vmop last started the domain.")
    agent_connected: bool | None = Field(
        None,
        description=(
            "With domain.guestAgent: whether a guest agent holds the agent channel (libvirt's agent state). "
            "Shutdown requests use the Agent method only while it is true."
        ),
    )
    restarts: int = Field(
        0,
        ge=0,
        description=(
            "Starts in a row after stops nobody asked for (a crash, the guest's own power-off, an outside "
            "destroy) under restartPolicy. From the second on, each waits longer (10 s, doubling, at most 5 "
            "min; Ready says CrashLoopBackOff meanwhile); a guest that runs for 60 s starts the count again."
        ),
    )
    restarted_at: str | None = Field(
        None, description="The value of the vmop.dev/restartedAt annotation whose restart was last carried out."
    )
    shutdown: ShutdownRecord | None = Field(None, description="The latest stop: requested, forced, or unasked.")
    held_by_taint: str | None = Field(
        None,
        description=(
            "The node taint (key=value:effect) that keeps this VM off, from its stop until it has started "
            "again after the taint went (in priority order)."
        ),
    )
    conditions: Annotated[
        list[Condition],
        Field(
            default_factory=list,
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
            description=(
                "Ready, Synced, ShutdownOverdue and AgentConnected, following the Kubernetes API conventions; "
                "Reconciling and Stalled, present only while true, as GitOps tools (kstatus) read them."
            ),
        ),
    ]

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


def read_status(raw: dict[str, Any]) -> tuple[VirtualMachineStatus, list[str]]:
    """The status as far as it can be read, and the fields that could not be.

    The status is vmop's own, but one written by a newer version (an enum value this one does not know,
    after a downgrade) must not be wiped: it holds the deadline of a stop under way, and a stop begun
    again would be forced later. Each field is kept if it reads. Of a stop record that does not read, an
    unfinished one keeps what says when to force it; a finished one is dropped, as nothing of it is
    needed any more (libvirt shows the domain's state).
    """
    try:
        return VirtualMachineStatus.model_validate(raw), []
    except ValidationError:
        pass
    kept: dict[str, Any] = {}
    lost: list[str] = []
    for key, value in raw.items():
        try:
            VirtualMachineStatus.model_validate({key: value})
        except ValidationError:
            lost.append(key)
            record = _unfinished_stop(value) if key == "shutdown" else None
            if record is not None:
                kept[key] = record
            continue
        kept[key] = value
    return VirtualMachineStatus.model_validate(kept), lost


def _unfinished_stop(raw: object) -> dict[str, Any] | None:
    if not isinstance(raw, dict) or raw.get("outcome") is not None:
        return None
    purpose = raw.get("purpose") if raw.get("purpose") in set(ShutdownPurpose) else ShutdownPurpose.STOP.value
    readable: dict[str, Any] = {"purpose": purpose}
    for key, value in raw.items():
        try:
            ShutdownRecord.model_validate({"purpose": purpose, key: value})
        except ValidationError:
            continue
        readable[key] = value
    return readable if "requestedAt" in readable and "deadline" in readable else None
