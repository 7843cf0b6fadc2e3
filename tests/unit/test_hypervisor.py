"""The libvirt adapter against libvirt's in-process test driver: real libvirt calls, no daemon.

The test driver refuses the ACPI and agent shutdown flags and cannot model a stubborn guest, so graceful
shutdown itself is proved end to end on the real daemon; here: connecting, the ownership mark, states,
stop causes, lifecycle events, forcing off, and refusals reported per method.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from controller import domainxml
from controller.api import DomainSpec, ShutdownMethod
from controller.hypervisor import Hypervisor
from controller.reconcile import DomainState, StopCause


async def _until(probe: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(5.0):
            while not probe():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what} (waited 5s)") from None


def test_adapter_on_the_test_driver() -> None:
    async def scenario() -> None:
        events: list[str] = []
        connected: list[bool] = []
        hypervisor = Hypervisor("test:///default", on_domain_event=events.append, on_connection_change=connected.append)
        await hypervisor.open()
        try:
            await _until(lambda: hypervisor.connected, "the adapter did not connect")
            assert connected == [True]
            uid = str(uuid.uuid4())
            name = f"ns_{uid[:8]}"
            spec = DomainSpec(memoryMiB=16)
            host = domainxml.HostDefaults(virt_type="test")
            xml = domainxml.build(name=name, namespace="ns", vm_name=uid[:8], uid=uid, spec=spec, host=host)
            await hypervisor.define(xml)
            await hypervisor.start_domain(name)
            running = await hypervisor.observe(name)
            assert running is not None
            assert (running.state, running.owner_uid, running.uuid) == (DomainState.RUNNING, uid, uid)
            assert running.spec_hash == domainxml.spec_hash(spec, host)
            await _until(lambda: name in events, "no lifecycle event reached the asyncio loop")

            method, refusals = await hypervisor.request_shutdown(name, (ShutdownMethod.AGENT, ShutdownMethod.ACPI))
            assert method is None
            assert refusals.startswith("Agent: ")
            assert "; ACPI: " in refusals

            await hypervisor.force_off(name)
            stopped = await hypervisor.observe(name)
            assert stopped is not None
            assert (stopped.state, stopped.stop_cause) == (DomainState.STOPPED, StopCause.DESTROYED)
            await hypervisor.force_off(name)  # already off: not an error

            await hypervisor.undefine(name)
            assert await hypervisor.observe(name) is None

            foreign = await hypervisor.observe("test")  # the driver's own domain carries no vmop mark
            assert foreign is not None
            assert foreign.owner_uid is None
        finally:
            await hypervisor.close()

    asyncio.run(scenario())
