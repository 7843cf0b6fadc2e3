"""What a node lets a VirtualMachine have: its networks, its size, its share of the node's memory.

The node's administrator sets these with the operator's flags; whoever may create a VirtualMachine may
not exceed them. A refusal is reported on the VM (a condition and an Event) and nothing of it reaches
libvirt. These are pure decisions: the shell observes what the node has committed and passes it in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controller.api import DomainSpec, InterfaceType

NETWORK_NOT_ALLOWED = "NetworkNotAllowed"
OVER_VM_LIMITS = "OverVmLimits"
NODE_MEMORY_FULL = "NodeMemoryFull"
STORAGE_NOT_ALLOWED = "StorageNotAllowed"


@dataclass(frozen=True)
class Refusal:
    """Why a spec may not be defined or started on this node: a condition reason and words to act on."""

    reason: str
    message: str


@dataclass(frozen=True)
class NodePolicy:
    """The node's limits. None for a size means no limit beyond the API's own bounds."""

    allowed_bridges: frozenset[str] = frozenset()
    allowed_networks: frozenset[str] = frozenset()
    max_vcpus: int | None = None
    max_memory_mib: int | None = None
    # None: the node's physical memory, as libvirt reports it (no overcommit).
    memory_ceiling_mib: int | None = None


def _listed(names: frozenset[str]) -> str:
    return ", ".join(sorted(names)) if names else "none"


def refusals(spec: DomainSpec, policy: NodePolicy) -> tuple[Refusal, ...]:
    """Everything in the spec this node does not allow, networks first; empty when it may be defined."""
    found = []
    for index, interface in enumerate(spec.interfaces):
        if interface.type is InterfaceType.BRIDGE:
            allowed, flag = policy.allowed_bridges, "--allowed-bridge"
        else:
            allowed, flag = policy.allowed_networks, "--allowed-network"
        if interface.source not in allowed:
            found.append(
                Refusal(
                    NETWORK_NOT_ALLOWED,
                    f"interfaces[{index}]: {interface.type.value} {interface.source!r} is not allowed on this node "
                    f"(allowed {interface.type.value}s: {_listed(allowed)}; the node's administrator sets them "
                    f"with the operator's {flag})",
                )
            )
    if policy.max_vcpus is not None and spec.vcpus > policy.max_vcpus:
        found.append(
            Refusal(OVER_VM_LIMITS, f"vcpus {spec.vcpus} is over this node's limit of {policy.max_vcpus} per VM")
        )
    if policy.max_memory_mib is not None and spec.memory_mib > policy.max_memory_mib:
        found.append(
            Refusal(
                OVER_VM_LIMITS,
                f"memoryMiB {spec.memory_mib} is over this node's limit of {policy.max_memory_mib} MiB per VM",
            )
        )
    return tuple(found)


@dataclass(frozen=True)
class NodeMemory:
    """The node's memory as the shell saw it just before a start."""

    # Memory of the node's other running domains (vmop's and anyone's) and of other starts in flight.
    committed_mib: int
    ceiling_mib: int


def memory_refusal(wanted_mib: int, node: NodeMemory) -> Refusal | None:
    """A start that would take the node's committed memory past its ceiling is refused, not overcommitted:
    QEMU allocates guest memory lazily, so an overcommitted node runs until the kernel's OOM killer takes
    some tenant's QEMU."""
    if node.committed_mib + wanted_mib <= node.ceiling_mib:
        return None
    return Refusal(
        NODE_MEMORY_FULL,
        f"not started: its {wanted_mib} MiB with the {node.committed_mib} MiB already committed on this node "
        f"would pass the node's ceiling of {node.ceiling_mib} MiB; it starts once enough memory is free",
    )


def committed_mib(me: str, running: Mapping[str, int], in_flight: Mapping[str, int]) -> int:
    """The memory committed by everything but `me`: running domains, and starts in flight not yet running.

    in_flight must be read before `running` is observed (see StartReservations): a start that ends
    between the two is then counted once either way, and one that was not yet in flight sees this start.
    """
    # In C (sums, and the overlap as an intersection of key views), with this VM taken out afterwards: a
    # thousand VMs starting at once each ask this of up to a thousand running domains and starts in flight.
    others_running = sum(running.values()) - running.get(me, 0)
    started_since = in_flight.keys() & running.keys()  # in flight then, running now: counted as running
    starting = sum(in_flight.values()) - sum(map(in_flight.__getitem__, started_since))
    if me in in_flight and me not in running:
        starting -= in_flight[me]
    return others_running + starting


class StartReservations:
    """The memory of starts under way on this node, so that two VMs starting at once cannot both take the
    last free memory.

    A worker reserves before it observes the running domains and releases when its start call returns.
    Of two concurrent starts, the later to reserve sees the earlier one's reservation (or, if the earlier
    one has finished, its running domain): at least one of them counts the other.
    """

    def __init__(self) -> None:
        self._mib: dict[str, int] = {}

    def reserve(self, uuid: str, mib: int) -> dict[str, int]:
        """Reserve for uuid; returns the other starts in flight at this moment."""
        others = self._mib.copy()
        others.pop(uuid, None)
        self._mib[uuid] = mib
        return others

    def release(self, uuid: str) -> None:
        self._mib.pop(uuid, None)
