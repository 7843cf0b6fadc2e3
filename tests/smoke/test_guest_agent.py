"""The cooperative guest's QEMU guest agent behaves as each `vmop.agent=` mode promises, seen through libvirt.

The operator's guestAgent shutdown path needs guests whose agent obeys, has none, hangs, or takes the request
and does nothing. These tests prove each through the real daemon (the channel's lifecycle state in the live
XML, and what `shutdownFlags(GUEST_AGENT)` does), so that a failing e2e test later points at the operator,
and they print how long libvirt took, which the operator's timeouts must be designed around.
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from testbed.guests import AGENT_CHANNEL
from testbed.libvirthost import LibvirtHost
from testbed.wait import wait_until

pytestmark = pytest.mark.e2e

AGENT = libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
RESPONSE_TIMEOUT = 2
"""Seconds, set with agentSetResponseTimeout; libvirt uses it for the guest-sync that precedes every command."""
CONNECT_TIMEOUT = 15.0
"""The guest opens the port before GUEST-READY; libvirt learns of it from QEMU's VSERPORT_CHANGE event."""
STOP_TIMEOUT = 15.0
HOLD_SECONDS = 5.0
"""How long a guest that should keep running must still run to count as running."""

_GUESTS = {"absent": "ga-absent", "ok": "ga-ok", "hung": "ga-hung", "ignore": "ga-ignore"}


@pytest.fixture(scope="module")
def agent_guests(libvirt_host: LibvirtHost) -> Iterator[dict[str, libvirt.virDomain]]:
    """One cooperative guest with the agent's channel per mode, all booting at once (each test uses its own)."""
    guests: dict[str, libvirt.virDomain] = {}
    try:
        for mode, name in _GUESTS.items():
            guests[mode] = libvirt_host.create_guest(name, "coop", agent_channel=True, agent=mode)
        yield guests
    finally:
        for name in _GUESTS.values():
            libvirt_host.remove_guest(name)


def _state(dom: libvirt.virDomain) -> tuple[int, int]:
    state, reason = dom.state()
    return state, reason


def _running(dom: libvirt.virDomain) -> bool:
    return _state(dom)[0] == libvirt.VIR_DOMAIN_RUNNING


def _agent_state(dom: libvirt.virDomain) -> str | None:
    """The agent channel's lifecycle state in the live XML: connected, disconnected, or None without one."""
    target = ET.fromstring(dom.XMLDesc(0)).find(f"./devices/channel/target[@name='{AGENT_CHANNEL}']")
    return None if target is None else target.get("state")


def _ready(host: LibvirtHost, dom: libvirt.virDomain, mode: str) -> None:
    """GUEST-READY comes after the agent side is up, so it suffices; the agent's own line is checked too."""
    host.wait_guest_ready(dom.name())
    console = host.console_log(dom.name())
    if mode == "absent":
        assert "GUEST-AGENT-READY" not in console
    else:
        assert f"GUEST-AGENT-READY mode={mode} " in console


def _wait_agent_state(dom: libvirt.virDomain, expected: str) -> None:
    wait_until(
        lambda: _agent_state(dom) == expected,
        timeout=CONNECT_TIMEOUT,
        message=lambda: f"{dom.name()}: agent channel state {_agent_state(dom)!r}, expected {expected!r}",
    )


def _agent_shutdown_fails(dom: libvirt.virDomain) -> tuple[libvirt.libvirtError, float]:
    started = time.monotonic()
    with pytest.raises(libvirt.libvirtError) as caught:
        dom.shutdownFlags(AGENT)
    return caught.value, time.monotonic() - started


def _assert_keeps_running(dom: libvirt.virDomain, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    wait_until(
        lambda: not _running(dom) or time.monotonic() >= deadline,
        timeout=seconds + 5.0,
        message=f"{dom.name()}: polling for {seconds}s stalled",
    )
    assert _running(dom), f"{dom.name()} stopped although nothing should stop it: {_state(dom)}"


def _error(error: libvirt.libvirtError) -> str:
    return f"code {error.get_error_code()} ({error.get_error_message()!r})"


def test_ok_agent_connects_and_powers_the_guest_off(
    libvirt_host: LibvirtHost, agent_guests: dict[str, libvirt.virDomain]
) -> None:
    dom = agent_guests["ok"]
    _ready(libvirt_host, dom, "ok")
    _wait_agent_state(dom, "connected")
    dom.agentSetResponseTimeout(RESPONSE_TIMEOUT, 0)

    started = time.monotonic()
    assert dom.shutdownFlags(AGENT) == 0
    call_seconds = time.monotonic() - started
    wait_until(
        lambda: _state(dom)[0] == libvirt.VIR_DOMAIN_SHUTOFF,
        timeout=STOP_TIMEOUT,
        message=lambda: f"{dom.name()} still in state {_state(dom)}",
    )
    stop_seconds = time.monotonic() - started

    print(f"agent ok: shutdownFlags(GUEST_AGENT) returned after {call_seconds:.3f}s, SHUTOFF after {stop_seconds:.3f}s")
    assert _state(dom) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
    # exactly what Debian's qemu-ga 7.2 runs for mode powerdown
    assert "GUEST-AGENT-SHUTDOWN args=-h -P +0 hypervisor initiated shutdown" in libvirt_host.console_log(dom.name())


def test_absent_agent_leaves_the_channel_disconnected_and_fails_at_once(
    libvirt_host: LibvirtHost, agent_guests: dict[str, libvirt.virDomain]
) -> None:
    dom = agent_guests["absent"]
    _ready(libvirt_host, dom, "absent")
    assert _agent_state(dom) == "disconnected"
    dom.agentSetResponseTimeout(RESPONSE_TIMEOUT, 0)

    error, seconds = _agent_shutdown_fails(dom)

    print(f"agent absent: shutdownFlags(GUEST_AGENT) failed after {seconds:.3f}s with {_error(error)}")
    assert error.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
    assert "not connected" in (error.get_error_message() or "")
    assert seconds < RESPONSE_TIMEOUT + 1.0
    _assert_keeps_running(dom, 1.0)


def test_hung_agent_is_connected_but_times_out(
    libvirt_host: LibvirtHost, agent_guests: dict[str, libvirt.virDomain]
) -> None:
    dom = agent_guests["hung"]
    _ready(libvirt_host, dom, "hung")
    _wait_agent_state(dom, "connected")
    dom.agentSetResponseTimeout(RESPONSE_TIMEOUT, 0)

    error, seconds = _agent_shutdown_fails(dom)

    print(f"agent hung: shutdownFlags(GUEST_AGENT) failed after {seconds:.3f}s with {_error(error)}")
    assert error.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
    assert "not available for now" in (error.get_error_message() or "")
    assert RESPONSE_TIMEOUT - 0.1 <= seconds < RESPONSE_TIMEOUT + 2.0
    _assert_keeps_running(dom, 1.0)
    assert _agent_state(dom) == "connected"


def test_ignoring_agent_takes_the_request_and_the_guest_keeps_running(
    libvirt_host: LibvirtHost, agent_guests: dict[str, libvirt.virDomain]
) -> None:
    """qemu-ga sends no reply to a guest-shutdown that succeeded (its schema says success-response: false),
    so libvirt waits for the guest's poweroff instead: up to its own fixed 60 s, whatever the response
    timeout, and then fails with "Guest agent not available for now". The call is left pending here and
    ends with the guest's destroy, which wakes it as the poweroff would.

    The pending call has a connection of its own: libvirt's client can lose the wake-up of a thread that
    holds a connection's socket in a long call, and another call on that connection then is not even sent
    until the long one ends (seen with destroy: 55 s late, in 2 of 15 runs)."""
    dom = agent_guests["ignore"]
    _ready(libvirt_host, dom, "ignore")
    _wait_agent_state(dom, "connected")
    dom.agentSetResponseTimeout(RESPONSE_TIMEOUT, 0)
    outcome: dict[str, object] = {}
    own = libvirt_host.connect()

    def call() -> None:
        try:
            outcome["returned"] = own.lookupByName(dom.name()).shutdownFlags(AGENT)
        except libvirt.libvirtError as error:
            outcome["failed"] = _error(error)

    caller = threading.Thread(target=call, name="agent-shutdown", daemon=True)
    try:
        started = time.monotonic()
        caller.start()
        wait_until(
            lambda: "GUEST-AGENT-SHUTDOWN-IGNORED" in libvirt_host.console_log(dom.name()),
            timeout=CONNECT_TIMEOUT,
            message=lambda: f"the agent of {dom.name()} never ran /sbin/shutdown: {outcome}",
        )
        taken_seconds = time.monotonic() - started
        _assert_keeps_running(dom, HOLD_SECONDS)
        pending_seconds = time.monotonic() - started
        pending = caller.is_alive()

        destroyed = time.monotonic()
        dom.destroy()
        destroy_seconds = time.monotonic() - destroyed
        caller.join(STOP_TIMEOUT)
        ended_seconds = time.monotonic() - destroyed
    finally:
        own.close()

    print(
        f"agent ignore: /sbin/shutdown ran {taken_seconds:.3f}s after shutdownFlags(GUEST_AGENT); the call "
        f"still pending {pending_seconds:.1f}s later: {pending}; destroy took {destroy_seconds:.3f}s; the call "
        f"ended {ended_seconds:.3f}s after destroy with {outcome}"
    )
    console = libvirt_host.console_log(dom.name())
    assert "GUEST-AGENT-SHUTDOWN-IGNORED args=-h -P +0 hypervisor initiated shutdown" in console
    assert "GUEST-AGENT-SHUTDOWN args=" not in console
    assert pending, f"shutdownFlags(GUEST_AGENT) returned although the guest runs: {outcome}"
    assert not caller.is_alive(), "shutdownFlags(GUEST_AGENT) still pending after the guest was destroyed"


def test_firmware_guest_with_the_channel_has_an_agent_that_never_connects(libvirt_host: LibvirtHost) -> None:
    """The cheap stand-in for "guestAgent: true, but the guest has none": nothing to boot. Without the
    channel libvirt refuses the agent outright instead."""
    try:
        with_channel = libvirt_host.create_guest("ga-fw", "firmware", agent_channel=True)
        without = libvirt_host.create_guest("ga-fw-none", "firmware")
        assert _agent_state(with_channel) == "disconnected"
        assert _agent_state(without) is None
        with_channel.agentSetResponseTimeout(RESPONSE_TIMEOUT, 0)

        error, seconds = _agent_shutdown_fails(with_channel)
        unsupported, unsupported_seconds = _agent_shutdown_fails(without)

        print(
            f"firmware guest: with the channel failed after {seconds:.3f}s with {_error(error)}; "
            f"without it after {unsupported_seconds:.3f}s with {_error(unsupported)}"
        )
        assert error.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE
        assert unsupported.get_error_code() == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED
        assert _running(with_channel)
    finally:
        for name in ("ga-fw", "ga-fw-none"):
            libvirt_host.remove_guest(name)
