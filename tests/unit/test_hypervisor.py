"""The libvirt adapter against libvirt's in-process test driver: real libvirt calls, no daemon.

The test driver refuses the ACPI and agent shutdown flags and cannot model a stubborn guest, so graceful
shutdown itself is proved end to end on the real daemon; here: connecting, the ownership mark, states,
stop causes, lifecycle events, forcing off, and refusals reported per method.
"""

from __future__ import annotations

import asyncio
import uuid

from controller import domainxml
from controller.api import DomainSpec, ShutdownMethod
from controller.hypervisor import Hypervisor
from controller.reconcile import DomainState, StopCause


def test_adapter_on_the_test_driver() -> None:
    async def scenario() -> None:
        events: list[str] = []
        event_seen, connected = asyncio.Event(), asyncio.Event()

        def domain_event(name: str) -> None:
            events.append(name)
            event_seen.set()

        hypervisor = Hypervisor(
            "test:///default", on_domain_event=domain_event, on_connection_change=lambda up: up and connected.set()
        )
        await hypervisor.open()
        try:
            await asyncio.wait_for(connected.wait(), timeout=5)
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
            await asyncio.wait_for(event_seen.wait(), timeout=5)
            assert name in events, "the lifecycle event names the domain"

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
