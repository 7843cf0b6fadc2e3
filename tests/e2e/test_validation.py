"""The API server refuses what libvirt could never run, takes what it can, and a name it takes always fits libvirt.

Refusals need no operator: the CRD's schema (patterns, bounds, CEL rules) is the API server's. The same
values are put through the models the operator validates specs with, so the two cannot disagree.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes
import pydantic
import pytest

from controller.api import VirtualMachineSpec
from controller.reconcile import domain_name
from tests.e2e.conftest import Vmop

IMAGES = "/var/lib/libvirt/images"


def ide_disks(count: int) -> list[dict[str, str]]:
    return [{"path": f"{IMAGES}/d{i}.img", "bus": "ide"} for i in range(count)]


def interface(**fields: str) -> list[dict[str, str]]:
    return [{"type": "network", "source": "default", **fields}]


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "nul-in-disk-path": ({"disks": [{"path": f"{IMAGES}/a\0b.img"}]}, "should match"),
    "nul-at-end-of-kernel": ({"kernel": f"{IMAGES}/vmlinuz\0"}, "should match"),
    "newline-at-end-of-initrd": ({"kernel": f"{IMAGES}/k", "initrd": f"{IMAGES}/initrd\n"}, "should match"),
    "del-in-kernel": ({"kernel": f"{IMAGES}/vm\x7flinuz"}, "should match"),
    "nul-in-cmdline": ({"kernel": f"{IMAGES}/k", "cmdline": "console=ttyS0\0 quiet"}, "should match"),
    "escape-in-cmdline": ({"kernel": f"{IMAGES}/k", "cmdline": "console=ttyS0 \x1b[2J"}, "should match"),
    "tab-in-interface-source": ({"interfaces": interface(source="br\t0")}, "should match"),
    "multicast-mac": ({"interfaces": interface(macAddress="01:00:5e:00:00:01")}, "must be a unicast MAC address"),
    "broadcast-mac": ({"interfaces": interface(macAddress="FF:FF:FF:FF:FF:FF")}, "must be a unicast MAC address"),
    "256-vcpus": ({"vcpus": 256}, "less than or equal to 255"),
    "5-ide-disks": ({"disks": ide_disks(5)}, "at most 4 disks on bus ide"),
}

ACCEPTED: dict[str, dict[str, Any]] = {
    "unicast-macs": {
        "interfaces": interface(macAddress="52:54:00:AB:cd:01") + interface(macAddress="02:00:00:00:00:01")
    },
    "255-vcpus": {"vcpus": 255},
    "4-ide-disks-and-more-on-other-buses": {
        "disks": [*ide_disks(4), {"path": f"{IMAGES}/v.img"}, {"path": f"{IMAGES}/s.img", "bus": "sata"}]
    },
    "text-everywhere-else": {
        "kernel": f"{IMAGES}/vmlinuz é (1)",
        "initrd": f"{IMAGES}/initrd,x.img",
        "cmdline": "console=ttyS0 root=/dev/vda1 x='<&>' ü",
        "disks": [{"path": f"{IMAGES}/disk 1.img"}],
        "interfaces": interface(source="br-lan.10"),
    },
}


def manifest_with(vmop: Vmop, name: str, domain: dict[str, Any]) -> dict[str, Any]:
    manifest = vmop.manifest(name, kind="firmware", power_state="Stopped")
    manifest["spec"]["domain"] = {**copy.deepcopy(manifest["spec"]["domain"]), **domain}
    return manifest


def assert_refused_alike(vmop: Vmop, manifest: dict[str, Any], message: str) -> None:
    """Refused by the API server with this message, and by the model the operator reads specs with."""
    with pytest.raises(kubernetes.client.ApiException) as refused:
        vmop.vms.create(manifest)
    assert refused.value.status == 422
    assert message in str(refused.value.body)
    with pytest.raises(pydantic.ValidationError):
        VirtualMachineSpec.model_validate(manifest["spec"])


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_libvirt_cannot_run_is_refused_by_the_api_server_and_the_model(vmop: Vmop, case: str) -> None:
    domain, message = REFUSED[case]
    assert_refused_alike(vmop, manifest_with(vmop, "bad", domain), message)


def given(stored: Any, value: Any) -> Any:
    """The part of what the API server stored that the manifest gave (it adds defaults to the rest)."""
    if isinstance(value, dict):
        return {k: given(stored[k], v) for k, v in value.items()}
    if isinstance(value, list):
        return [given(s, v) for s, v in zip(stored, value, strict=True)]
    return stored


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_what_libvirt_can_run_is_accepted_by_the_api_server_and_the_model(vmop: Vmop, case: str) -> None:
    created = vmop.vms.create(manifest_with(vmop, case, ACCEPTED[case]))
    assert given(created["spec"]["domain"], ACCEPTED[case]) == ACCEPTED[case]
    VirtualMachineSpec.model_validate(created["spec"])


def toleration(**fields: Any) -> dict[str, Any]:
    return {"tolerations": [{"key": "vmop.dev/maintenance", "operator": "Exists", "effect": "NoExecute", **fields}]}


# Node maintenance's fields, beside the domain: a toleration is a Pod's, checked as the Pod API checks it.
SPEC_REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "empty-key-with-equal": (toleration(key="", operator="Equal", value="x"), "an empty key needs operator Exists"),
    "no-key-with-equal": ({"tolerations": [{"operator": "Equal"}]}, "an empty key needs operator Exists"),
    "exists-with-a-value": (toleration(value="v"), "value must be empty with operator Exists"),
    "seconds-without-noexecute": (
        toleration(effect="NoSchedule", tolerationSeconds=5),
        "tolerationSeconds needs effect NoExecute",
    ),
    "unknown-effect": (toleration(effect="NoRun"), "Unsupported value"),
    "priority-past-its-bound": ({"priority": 1_000_000_001}, "less than or equal to 1000000000"),
}

SPEC_ACCEPTED: dict[str, dict[str, Any]] = {
    "seconds": toleration(tolerationSeconds=300),
    "seconds-0": toleration(tolerationSeconds=0),
    "seconds-negative": toleration(tolerationSeconds=-5),
    "seconds-int64-max": toleration(tolerationSeconds=2**63 - 1),
    "everything-by-an-empty-key": {"tolerations": [{"key": "", "operator": "Exists"}, {"operator": "Exists"}]},
    "equal-with-a-value": toleration(operator="Equal", value="planned"),
    "lowest-priority": {"priority": -1_000_000_000},
}


def spec_with(vmop: Vmop, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    manifest = vmop.manifest(name, kind="firmware", power_state="Stopped")
    manifest["spec"].update(copy.deepcopy(fields))
    return manifest


@pytest.mark.parametrize("case", sorted(SPEC_REFUSED))
def test_a_bad_toleration_or_priority_is_refused_by_the_api_server_and_the_model(vmop: Vmop, case: str) -> None:
    fields, message = SPEC_REFUSED[case]
    assert_refused_alike(vmop, spec_with(vmop, "bad", fields), message)


@pytest.mark.parametrize("case", sorted(SPEC_ACCEPTED))
def test_a_pod_shaped_toleration_or_a_priority_is_accepted_by_the_api_server_and_the_model(
    vmop: Vmop, case: str
) -> None:
    created = vmop.vms.create(spec_with(vmop, case, SPEC_ACCEPTED[case]))
    assert given(created["spec"], SPEC_ACCEPTED[case]) == SPEC_ACCEPTED[case]
    VirtualMachineSpec.model_validate(created["spec"])


def test_the_longest_name_the_api_takes_runs_under_a_domain_name_libvirt_can_hold(vmop: Vmop) -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    expected = domain_name(vmop.namespace, name)
    assert len(expected) <= 200 < len(f"{vmop.namespace}_{name}")
    vmop.start_operator()
    vmop.create(name, kind="firmware")
    body = vmop.wait_running(name, ready=False, timeout=60)
    assert body["status"]["domainName"] == expected
    domain = vmop.libvirt.connect().lookupByName(expected)
    assert domain.isActive()
    assert domain.UUIDString() == body["metadata"]["uid"]

    vmop.vms.patch_spec(name, powerState="Stopped", shutdownPolicy={"mode": "Force"})
    vmop.vms.wait(name, lambda b: b.get("status", {}).get("powerState") == "Stopped", timeout=60, what="Stopped")
    assert not domain.isActive()
    vmop.vms.delete(name)
    vmop.vms.wait_gone(name, timeout=60)
    assert expected not in [d.name() for d in vmop.libvirt.connect().listAllDomains()], "undefined on delete"
