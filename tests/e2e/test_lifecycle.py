"""Pause and resume, restart by annotation, drift from outside vmop, and deletion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libvirt

from testbed.vmop import condition, parse_time
from testbed.wait import holds_until
from tests.e2e.conftest import Vmop


def status_is(power_state: str) -> Any:
    return lambda body: (
        body.get("status", {}).get("powerState") == power_state
        and ((condition(body, "Ready") or {}).get("status") == "True")
    )


def test_pause_and_resume(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("sleepy")
    vmop.wait_running("sleepy")
    domain_id = vmop.domain("sleepy").ID()

    vmop.vms.patch_spec("sleepy", powerState="Paused")
    vmop.vms.wait("sleepy", status_is("Paused"), timeout=30, what="Paused")
    assert vmop.domain_state("sleepy") == libvirt.VIR_DOMAIN_PAUSED

    vmop.vms.patch_spec("sleepy", powerState="Running")
    vmop.vms.wait("sleepy", status_is("Running"), timeout=30, what="Running again")
    assert vmop.domain_state("sleepy") == libvirt.VIR_DOMAIN_RUNNING
    assert vmop.domain("sleepy").ID() == domain_id, "pause and resume keep the same QEMU process"
    vmop.vms.wait_events("sleepy", "Pausing", "Resuming")


def test_stopping_a_paused_vm_sets_the_deadline_then_resumes_it_so_that_the_guest_hears_the_request(
    vmop: Vmop,
) -> None:
    vmop.start_operator()
    vmop.create("paused", power_state="Running", shutdown_policy={"gracePeriodSeconds": 60})
    vmop.wait_running("paused")
    vmop.vms.patch_spec("paused", powerState="Paused")
    vmop.vms.wait("paused", status_is("Paused"), timeout=30, what="Paused")

    vmop.vms.patch_spec("paused", powerState="Stopped")
    body = vmop.vms.wait(
        "paused", lambda b: (b["status"].get("shutdown") or {}).get("outcome"), timeout=60, what="the stop"
    )
    assert body["status"]["shutdown"]["outcome"] == "Graceful"
    reasons = vmop.vms.wait_events("paused", "Pausing", "StopRequested", "Resuming", "ShutdownRequested")
    resumed = reasons.index("Resuming", reasons.index("Pausing") + 1)
    assert reasons.index("StopRequested") < resumed < reasons.index("ShutdownRequested")


def test_restart_by_annotation_stops_gracefully_then_starts_once(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("rolling", shutdown_policy={"gracePeriodSeconds": 60})
    vmop.wait_running("rolling")
    first_id = vmop.domain("rolling").ID()

    token = "2026-11-24T08:00:00Z"
    vmop.vms.patch("rolling", {"metadata": {"annotations": {"vmop.dev/restartedAt": token}}})
    body = vmop.vms.wait(
        "rolling",
        lambda b: b["status"].get("restartedAt") == token and status_is("Running")(b),
        timeout=90,
        what="the restart to finish",
    )
    record = body["status"]["shutdown"]
    assert record["purpose"] == "Restart"
    assert record["outcome"] == "Graceful"
    second_id = vmop.domain("rolling").ID()
    assert second_id != first_id, "the guest was started again"
    vmop.libvirt.wait_guest_ready(vmop.domain_name("rolling"))

    # The same value again is not a new request: nothing restarts. The pause that follows is the evidence
    # that the operator has read the object since the touch (it reads the newest object whole).
    vmop.vms.patch("rolling", {"metadata": {"labels": {"touched": "yes"}}})
    vmop.vms.patch_spec("rolling", powerState="Paused")
    body = vmop.vms.wait("rolling", status_is("Paused"), timeout=30, what="the pause after the touch")
    assert vmop.domain("rolling").ID() == second_id
    assert body["status"]["shutdown"] == record, "no second restart was begun"


def test_outside_destroy_is_undone_under_always(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("phoenix", restart_policy="Always")
    vmop.wait_running("phoenix", ready=False)
    first_id = vmop.domain("phoenix").ID()

    vmop.domain("phoenix").destroy()
    body = vmop.vms.wait(
        "phoenix",
        lambda b: (b["status"].get("shutdown") or {}).get("outcome") == "Destroyed" and status_is("Running")(b),
        timeout=60,
        what="the VM to be started again",
    )
    assert body["status"]["shutdown"]["purpose"] == "None"
    assert vmop.domain("phoenix").ID() != first_id
    reasons = vmop.vms.wait_events("phoenix", "StoppedDestroyed", "Starting")
    assert reasons.index("StoppedDestroyed") < len(reasons) - 1
    assert "Starting" in reasons[reasons.index("StoppedDestroyed") :]


def test_guest_power_off_is_respected_under_on_failure(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("tidy", restart_policy="OnFailure")
    vmop.wait_running("tidy")

    # The guest powers itself off: a press vmop did not send.
    vmop.domain("tidy").shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    body = vmop.vms.wait(
        "tidy",
        lambda b: (b["status"].get("shutdown") or {}).get("outcome") == "GuestInitiated",
        timeout=30,
        what="the guest's own power-off to be reported",
    )
    assert body["status"]["powerState"] == "Stopped"
    ready = condition(body, "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "StoppedGuestInitiated"
    vmop.vms.wait_events("tidy", "StoppedGuestInitiated")
    assert vmop.domain_state("tidy") == libvirt.VIR_DOMAIN_SHUTOFF

    # A spec change is a new intent: the VM starts again.
    vmop.vms.patch("tidy", {"spec": {"domain": {"vcpus": 1, "memoryMiB": 144}}})
    vmop.vms.wait("tidy", status_is("Running"), timeout=60, what="a start after the spec changed")


def test_delete_graceful_stops_the_guest_then_undefines_and_keeps_disks(vmop: Vmop) -> None:
    disk = Path(vmop.libvirt.storage_dir) / f"{vmop.namespace}-data.img"
    disk.write_bytes(b"\0" * 1024 * 1024)
    disk.chmod(0o666)
    try:
        vmop.start_operator()
        manifest = vmop.manifest("gone", shutdown_policy={"gracePeriodSeconds": 60, "onDelete": "Graceful"})
        manifest["spec"]["domain"]["disks"] = [{"path": str(disk), "format": "raw", "bus": "virtio"}]
        vmop.vms.create(manifest)
        vmop.wait_running("gone")

        vmop.vms.delete("gone")
        vmop.vms.wait_gone("gone", timeout=60)
        names = [d.name() for d in vmop.libvirt.connect().listAllDomains()]
        assert vmop.domain_name("gone") not in names, "the domain is undefined"
        assert disk.exists(), "disks are never deleted"
        console = vmop.libvirt.console_log(vmop.domain_name("gone"))
        assert "GUEST-POWERBUTTON accepted" in console, "the guest was asked, not pulled"
    finally:
        disk.unlink(missing_ok=True)


def test_delete_force_turns_off_at_once(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("scrap", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 3600, "onDelete": "Force"})
    vmop.wait_running("scrap", ready=False)

    vmop.vms.delete("scrap")
    vmop.vms.wait_gone("scrap", timeout=30)
    names = [d.name() for d in vmop.libvirt.connect().listAllDomains()]
    assert vmop.domain_name("scrap") not in names


def test_graceful_delete_is_shortened_by_mode_force(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("slowpoke", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 3600})
    vmop.wait_running("slowpoke", ready=False)

    vmop.vms.delete("slowpoke")
    body = vmop.vms.wait(
        "slowpoke",
        lambda b: (b["status"].get("shutdown") or {}).get("purpose") == "Delete",
        timeout=30,
        what="the delete's graceful stop",
    )
    assert parse_time(body["status"]["shutdown"]["deadline"]) > parse_time(body["status"]["shutdown"]["requestedAt"])
    vmop.vms.patch("slowpoke", {"spec": {"shutdownPolicy": {"mode": "Force"}}})
    vmop.vms.wait_gone("slowpoke", timeout=30)


def test_a_spec_change_of_a_running_vm_redefines_once_and_leaves_it_running(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("grower", kind="firmware")
    vmop.wait_running("grower", ready=False)
    domain_id = vmop.domain("grower").ID()

    vmop.vms.patch("grower", {"spec": {"domain": {"memoryMiB": 24}}})
    vmop.vms.wait(
        "grower",
        lambda b: b["status"].get("observedGeneration") == b["metadata"]["generation"] and status_is("Running")(b),
        timeout=30,
        what="the new generation to be reconciled",
    )
    xml = vmop.domain("grower").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "<memory unit='KiB'>24576</memory>" in xml, "the persistent definition has the new memory"
    vmop.vms.wait_events("grower", "DefinitionUpdated")
    holds_until(
        lambda: vmop.vms.event_reasons("grower").count("DefinitionUpdated") == 1,
        seconds=3,
        message="the definition was updated more than once for one spec change",
    )
    assert vmop.domain("grower").ID() == domain_id, "the running guest was not restarted"
