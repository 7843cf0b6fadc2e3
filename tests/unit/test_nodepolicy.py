"""The node's limits: networks from allow-lists, sizes under caps, starts under the memory ceiling."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from controller import nodepolicy
from controller.api import DomainSpec
from controller.nodepolicy import NodeMemory, NodePolicy, StartReservations


def spec(**domain: object) -> DomainSpec:
    return DomainSpec.model_validate({"memoryMiB": 64, **domain})


def reasons(found: tuple[nodepolicy.Refusal, ...]) -> list[str]:
    return [refusal.reason for refusal in found]


def test_nothing_is_allowed_until_the_administrator_lists_it() -> None:
    interfaces = [{"type": "bridge", "source": "br-mgmt"}, {"type": "network", "source": "default"}]
    found = nodepolicy.refusals(spec(interfaces=interfaces), NodePolicy())
    assert reasons(found) == ["NetworkNotAllowed", "NetworkNotAllowed"]
    assert "interfaces[0]: bridge 'br-mgmt' is not allowed" in found[0].message
    assert "allowed bridges: none" in found[0].message
    assert "--allowed-bridge" in found[0].message
    assert "interfaces[1]: network 'default'" in found[1].message
    assert "--allowed-network" in found[1].message


def test_a_bridge_list_does_not_allow_a_network_of_the_same_name() -> None:
    policy = NodePolicy(allowed_bridges=frozenset({"br0"}), allowed_networks=frozenset({"tenants"}))
    assert nodepolicy.refusals(spec(interfaces=[{"type": "bridge", "source": "br0"}]), policy) == ()
    assert nodepolicy.refusals(spec(interfaces=[{"type": "network", "source": "tenants"}]), policy) == ()
    assert reasons(nodepolicy.refusals(spec(interfaces=[{"type": "network", "source": "br0"}]), policy)) == [
        "NetworkNotAllowed"
    ]
    found = nodepolicy.refusals(spec(interfaces=[{"type": "bridge", "source": "tenants"}]), policy)
    assert "allowed bridges: br0" in found[0].message


def test_sizes_over_the_per_vm_caps_are_refused_and_at_the_caps_allowed() -> None:
    policy = NodePolicy(max_vcpus=4, max_memory_mib=2048)
    assert nodepolicy.refusals(spec(vcpus=4, memoryMiB=2048), policy) == ()
    found = nodepolicy.refusals(spec(vcpus=5, memoryMiB=2049), policy)
    assert reasons(found) == ["OverVmLimits", "OverVmLimits"]
    assert "vcpus 5 is over this node's limit of 4 per VM" in found[0].message
    assert "memoryMiB 2049 is over this node's limit of 2048 MiB per VM" in found[1].message
    assert nodepolicy.refusals(spec(vcpus=255, memoryMiB=4194304), NodePolicy()) == ()


def test_the_memory_ceiling_counts_what_is_committed() -> None:
    assert nodepolicy.memory_refusal(100, NodeMemory(committed_mib=900, ceiling_mib=1000)) is None
    refused = nodepolicy.memory_refusal(101, NodeMemory(committed_mib=900, ceiling_mib=1000))
    assert refused is not None
    assert refused.reason == "NodeMemoryFull"
    assert "101 MiB" in refused.message
    assert "900 MiB" in refused.message
    assert "1000 MiB" in refused.message
    assert nodepolicy.memory_refusal(2000, NodeMemory(committed_mib=0, ceiling_mib=1000)) is not None


def test_committed_memory_counts_others_once_and_never_oneself() -> None:
    running = {"me": 512, "a": 100, "b": 200}
    in_flight = {"b": 200, "c": 50, "me": 512}
    assert nodepolicy.committed_mib("me", running, in_flight) == 100 + 200 + 50


def test_of_two_starts_at_once_one_always_counts_the_other() -> None:
    """Every order of reserve, observe and finish: the later to reserve sees the earlier one, in flight or running."""
    reservations = StartReservations()
    in_flight_a = reservations.reserve("a", 600)
    in_flight_b = reservations.reserve("b", 600)
    # a observes before b started anything; b observes after a's start ended and a released.
    running_seen_by_a: dict[str, int] = {}
    reservations.release("a")
    running_seen_by_b = {"a": 600}
    ceiling = NodeMemory(committed_mib=0, ceiling_mib=1000)
    committed_a = nodepolicy.committed_mib("a", running_seen_by_a, in_flight_a)
    committed_b = nodepolicy.committed_mib("b", running_seen_by_b, in_flight_b)
    assert committed_a == 0
    assert committed_b == 600
    assert nodepolicy.memory_refusal(600, NodeMemory(committed_b, ceiling.ceiling_mib)) is not None


def test_a_release_forgets_only_its_own_reservation() -> None:
    reservations = StartReservations()
    reservations.reserve("a", 1)
    reservations.reserve("b", 2)
    reservations.release("a")
    reservations.release("nobody")
    assert reservations.reserve("c", 3) == {"b": 2}


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=1000), min_size=2, max_size=4),
    order=st.lists(st.integers(min_value=0, max_value=3), min_size=40, max_size=40),
)
def test_concurrent_starts_never_take_the_node_past_its_ceiling(sizes: list[int], order: list[int]) -> None:
    """Workers interleave reserve -> observe libvirt -> decide -> running -> release in any order."""
    ceiling = 1000
    reservations = StartReservations()
    running: dict[str, int] = {}
    progress = [0] * len(sizes)
    seen: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
    admitted: set[str] = set()
    schedule = [i % len(sizes) for i in order] + [i for i in range(len(sizes)) for _ in range(5)]
    for worker in schedule:
        uuid, size = f"vm-{worker}", sizes[worker]
        match progress[worker]:
            case 0:
                seen[uuid] = (reservations.reserve(uuid, size), {})
            case 1:
                seen[uuid] = (seen[uuid][0], dict(running))
            case 2:
                in_flight, observed = seen[uuid]
                committed = nodepolicy.committed_mib(uuid, observed, in_flight)
                if nodepolicy.memory_refusal(size, NodeMemory(committed, ceiling)) is None:
                    admitted.add(uuid)
            case 3:
                if uuid in admitted:
                    running[uuid] = size
            case 4:
                reservations.release(uuid)
        progress[worker] += 1
    assert sum(running.values()) <= ceiling
