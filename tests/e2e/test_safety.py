"""What vmop must never do: touch a domain it did not define, act for another node, accept bad input."""

from __future__ import annotations

import os
from pathlib import Path

import kubernetes
import libvirt
import pytest

from testbed.controlplane import ControlPlane, KubectlError
from testbed.vmop import Vms, condition
from testbed.wait import holds_until
from tests.e2e.conftest import Vmop


def test_a_foreign_domain_with_the_same_name_is_left_alone(vmop: Vmop) -> None:
    name = "squatter"
    foreign = vmop.libvirt.create_guest(vmop.domain_name(name), "firmware")
    foreign_id = foreign.ID()
    vmop.start_operator()
    vmop.create(name, kind="stubborn", power_state="Stopped")

    body = vmop.vms.wait(
        name,
        lambda b: (condition(b, "Synced") or {}).get("reason") == "DomainConflict",
        timeout=30,
        what="a DomainConflict condition",
    )
    assert condition(body, "Ready")["status"] == "False"
    vmop.vms.wait_events(name, "DomainConflict")
    holds_until(
        lambda: foreign.isActive() and foreign.ID() == foreign_id,
        seconds=2,
        message="vmop stopped a domain it did not define although the VM says Stopped",
    )

    vmop.vms.delete(name)
    vmop.vms.wait_gone(name, timeout=30)
    assert foreign.isActive(), "deleting the VM left the foreign domain running"
    assert foreign.ID() == foreign_id


def test_a_vm_of_another_node_is_ignored(vmop: Vmop) -> None:
    vmop.start_operator()
    manifest = vmop.manifest("elsewhere")
    manifest["spec"]["nodeName"] = "some-other-node"
    vmop.vms.create(manifest)
    vmop.create("here")
    vmop.wait_running("here", ready=False)

    body = vmop.vms.get("elsewhere")
    assert body is not None
    assert "status" not in body, "the operator wrote the status of another node's VM"
    assert "finalizers" not in body["metadata"]
    names = [d.name() for d in vmop.libvirt.connect().listAllDomains()]
    assert vmop.domain_name("elsewhere") not in names


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"powerState": "Sleeping"}, "Unsupported value"),
        ({"shutdownPolicy": {"gracePeriodSeconds": 86401}}, "less than or equal to 86400"),
        ({"shutdownPolicy": {"retryIntervalSeconds": -1}}, "greater than or equal to 0"),
        ({"shutdownPolicy": {"methods": ["ACPI", "ACPI"]}}, "Duplicate value"),
        ({"shutdownPolicy": {"methods": ["Telepathy"]}}, "Unsupported value"),
        ({"restartPolicy": "Sometimes"}, "Unsupported value"),
        ({"domain": {"memoryMiB": 128, "initrd": "/var/lib/libvirt/images/initrd"}}, "initrd needs kernel"),
        ({"domain": {"memoryMiB": 128, "kernel": "relative/path"}}, "should match"),
        ({"domain": {"memoryMiB": 0}}, "greater than or equal to 8"),
    ],
)
def test_bad_specs_are_refused_by_the_api_server(
    vmop: Vmop, control_plane: ControlPlane, change: dict[str, object], message: str
) -> None:
    manifest = vmop.manifest("bad")
    manifest["spec"].update(change)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        vmop.vms.create(manifest)
    assert refused.value.status == 422
    assert message in str(refused.value.body)


def test_node_name_is_immutable(vmop: Vmop, control_plane: ControlPlane) -> None:
    vmop.create("pinned", power_state="Stopped")
    with pytest.raises(KubectlError) as refused:
        control_plane.kubectl(
            "-n", vmop.namespace, "patch", "virtualmachine", "pinned", "--type=merge", "-p",
            '{"spec":{"nodeName":"another"}}',
        )  # fmt: skip
    assert "nodeName is immutable" in refused.value.stderr


@pytest.mark.parametrize("escape", ["outside", "symlink", "dotdot"])
def test_storage_paths_outside_the_allowed_directories_are_refused(vmop: Vmop, tmp_path: Path, escape: str) -> None:
    outside = tmp_path / "secret.img"
    outside.write_bytes(b"\0" * 4096)
    storage = Path(vmop.libvirt.storage_dir)
    link = storage / f"{vmop.namespace}-link.img"
    path = {
        "outside": str(outside),
        "symlink": str(link),
        "dotdot": f"{storage}/../../../../{outside}",
    }[escape]
    if escape == "symlink":
        os.symlink(outside, link)
    try:
        vmop.start_operator()
        manifest = vmop.manifest("sneaky")
        manifest["spec"]["domain"]["disks"] = [{"path": path}]
        vmop.vms.create(manifest)
        body = vmop.vms.wait(
            "sneaky",
            lambda b: (condition(b, "Synced") or {}).get("reason") == "StorageNotAllowed",
            timeout=30,
            what="StorageNotAllowed",
        )
        assert "outside the allowed storage directories" in condition(body, "Synced")["message"]
        vmop.vms.wait_events("sneaky", "StorageNotAllowed")
        names = [d.name() for d in vmop.libvirt.connect().listAllDomains()]
        assert vmop.domain_name("sneaky") not in names, "nothing is defined for a refused path"
    finally:
        link.unlink(missing_ok=True)


def test_libvirt_is_not_touched_for_a_refused_spec_of_a_running_vm(vmop: Vmop) -> None:
    vmop.start_operator()
    vmop.create("keeper")
    vmop.wait_running("keeper", ready=False)
    domain_id = vmop.domain("keeper").ID()

    vmop.vms.patch("keeper", {"spec": {"domain": {"disks": [{"path": "/etc/shadow"}]}}})
    vmop.vms.wait(
        "keeper",
        lambda b: (condition(b, "Synced") or {}).get("reason") == "StorageNotAllowed",
        timeout=30,
        what="StorageNotAllowed",
    )
    assert vmop.domain_state("keeper") == libvirt.VIR_DOMAIN_RUNNING
    assert vmop.domain("keeper").ID() == domain_id, "a refused spec must never turn a VM off"
    xml = vmop.domain("keeper").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "/etc/shadow" not in xml


def test_same_name_in_two_namespaces_gets_two_domains(vmop: Vmop, control_plane: ControlPlane) -> None:
    other_namespace = f"{vmop.namespace}-b"[:63]
    control_plane.kubectl("create", "namespace", other_namespace)
    other = Vms(control_plane.api_client(), other_namespace)
    vmop.start_operator()
    try:
        vmop.create("twin", kind="firmware")
        other.create(vmop.manifest("twin", kind="firmware"))
        first = vmop.wait_running("twin", ready=False)
        second = other.wait(
            "twin", lambda b: b.get("status", {}).get("powerState") == "Running", timeout=60, what="Running"
        )
        assert first["status"]["domainName"] != second["status"]["domainName"]
        assert first["status"]["domainUUID"] != second["status"]["domainUUID"]
    finally:
        vmop.libvirt.remove_guest(f"{other_namespace}_twin")
