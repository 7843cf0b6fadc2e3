"""The schema refuses what can never work, and the models (which the operator validates specs with) agree.

Each rule is checked twice: on the pydantic model, and on the generated CRD schema that the API server
enforces. Patterns are matched here as Go's RE2 reads them ($ is the end of the text, never before a final
newline); the e2e test tests/e2e/test_validation.py puts the same values through the real API server.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import pydantic
import pytest

from controller import api, crd

GOOD: dict[str, Any] = {
    "memoryMiB": 64,
    "vcpus": 2,
    "kernel": "/var/lib/libvirt/images/vmlinuz",
    "initrd": "/var/lib/libvirt/images/initrd.img",
    "cmdline": "console=ttyS0 root=/dev/vda1 quiet x='<&>' é",
    "disks": [{"path": "/var/lib/libvirt/images/disk 1 (copy).img"}],
    "interfaces": [{"type": "network", "source": "default", "macAddress": "52:54:00:AA:bb:01"}],
}
# Where each checked string sits in a domain spec, and where its schema sits under the domain's schema.
TEXT_FIELDS = {
    "kernel": (("kernel",), ("properties", "kernel")),
    "initrd": (("initrd",), ("properties", "initrd")),
    "cmdline": (("cmdline",), ("properties", "cmdline")),
    "disks[].path": (("disks", 0, "path"), ("properties", "disks", "items", "properties", "path")),
    "interfaces[].source": (("interfaces", 0, "source"), ("properties", "interfaces", "items", "properties", "source")),
}
CONTROL_CHARACTERS = [*map(chr, range(0x20)), "\x7f"]


@functools.cache
def domain_schema() -> dict[str, Any]:
    root = crd.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema: dict[str, Any] = root["properties"]["spec"]["properties"]["domain"]
    return schema


def at(node: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


def with_value(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD)
    at(spec, path[:-1])[path[-1]] = value
    return spec


def api_server_matches(pattern: str, value: str) -> bool:
    """The OpenAPI `pattern` as the API server applies it: RE2, unanchored search, $ only at the very end."""
    return re.search(pattern.replace("$", r"\Z"), value) is not None


def model_accepts(spec: dict[str, Any]) -> bool:
    try:
        api.DomainSpec.model_validate(spec)
    except pydantic.ValidationError:
        return False
    return True


def test_the_good_spec_passes_both() -> None:
    assert model_accepts(GOOD)
    schema = domain_schema()
    for value_path, schema_path in TEXT_FIELDS.values():
        assert api_server_matches(at(schema, schema_path)["pattern"], at(GOOD, value_path))


@pytest.mark.parametrize("field", sorted(TEXT_FIELDS))
@pytest.mark.parametrize("char", CONTROL_CHARACTERS, ids=lambda c: f"0x{ord(c):02x}")
@pytest.mark.parametrize("where", ["middle", "end"])
def test_control_characters_are_refused(field: str, char: str, where: str) -> None:
    value_path, schema_path = TEXT_FIELDS[field]
    good = at(GOOD, value_path)
    bad = f"{good[:3]}{char}{good[3:]}" if where == "middle" else good + char
    assert not model_accepts(with_value(value_path, bad)), f"the model took {bad!r} in {field}"
    pattern = at(domain_schema(), schema_path)["pattern"]
    assert not api_server_matches(pattern, bad), f"the schema's pattern {pattern} takes {bad!r} in {field}"


@pytest.mark.parametrize("field", ["kernel", "initrd", "disks[].path"])
def test_paths_stay_absolute(field: str) -> None:
    value_path, schema_path = TEXT_FIELDS[field]
    assert not model_accepts(with_value(value_path, "relative/path"))
    assert not api_server_matches(at(domain_schema(), schema_path)["pattern"], "relative/path")


def test_the_model_uses_the_patterns_the_schema_states() -> None:
    schema = domain_schema()
    assert at(schema, TEXT_FIELDS["kernel"][1])["pattern"] == api.ABSOLUTE_PATH_PATTERN
    assert at(schema, TEXT_FIELDS["cmdline"][1])["pattern"] == api.TEXT_PATTERN
    mac = schema["properties"]["interfaces"]["items"]["properties"]["macAddress"]
    assert mac["pattern"] == api.MAC_PATTERN
    assert mac["x-kubernetes-validations"] == [{"rule": api.UNICAST_MAC_RULE, "message": api.UNICAST_MAC_MESSAGE}]


@pytest.mark.parametrize("first_octet", range(256))
def test_only_unicast_mac_addresses_are_taken(first_octet: int) -> None:
    unicast = first_octet & 1 == 0
    mac_schema = domain_schema()["properties"]["interfaces"]["items"]["properties"]["macAddress"]
    # The CEL rule's regex, as RE2 applies it through CEL's matches(): an unanchored search.
    rule_regex = api.UNICAST_MAC_RULE.split("'")[1]
    for mac in (f"{first_octet:02x}:54:00:12:34:56", f"{first_octet:02X}:54:00:AB:CD:EF"):
        assert model_accepts(with_value(("interfaces", 0, "macAddress"), mac)) is unicast, mac
        assert api_server_matches(mac_schema["pattern"], mac), mac
        assert api_server_matches(rule_regex, mac) is unicast, mac


@pytest.mark.parametrize("mac", ["52:54:00:12:34", "52:54:00:12:34:56:78", "52-54-00-12-34-56", "52:54:00:12:34:5g"])
def test_malformed_mac_addresses_are_refused(mac: str) -> None:
    pattern = domain_schema()["properties"]["interfaces"]["items"]["properties"]["macAddress"]["pattern"]
    assert not model_accepts(with_value(("interfaces", 0, "macAddress"), mac))
    assert not api_server_matches(pattern, mac)


def test_vcpus_stop_at_the_machine_limit() -> None:
    assert model_accepts({**GOOD, "vcpus": 255})
    assert not model_accepts({**GOOD, "vcpus": 256})
    assert domain_schema()["properties"]["vcpus"]["maximum"] == 255


def disks(ide: int, other: int = 0) -> list[dict[str, str]]:
    return [{"path": f"/d{i}.img", "bus": "ide"} for i in range(ide)] + [
        {"path": f"/v{i}.img", "bus": bus} for i, bus in zip(range(other), ["virtio", "sata", "scsi"] * 6, strict=False)
    ]


def test_at_most_four_ide_disks() -> None:
    assert model_accepts({**GOOD, "disks": disks(4, other=12)})
    with pytest.raises(pydantic.ValidationError, match="at most 4 disks on bus ide"):
        api.DomainSpec.model_validate({**GOOD, "disks": disks(5)})
    (rule,) = [r for r in domain_schema()["x-kubernetes-validations"] if "ide" in r["rule"]]
    assert rule == {
        "rule": "!has(self.disks) || self.disks.filter(d, has(d.bus) && d.bus == 'ide').size() <= 4",
        "message": "at most 4 disks on bus ide (the machine has 2 IDE buses of 2 units each)",
    }


def test_the_operator_reads_a_refused_domain_as_an_unreadable_spec() -> None:
    """The whole spec, as the operator validates it: a bad domain field fails the spec, naming the field."""
    spec = {"nodeName": "n", "domain": with_value(("interfaces", 0, "macAddress"), "01:00:5e:00:00:01")}
    with pytest.raises(pydantic.ValidationError) as refused:
        api.VirtualMachineSpec.model_validate(spec)
    assert [e["loc"] for e in refused.value.errors()] == [("domain", "interfaces", 0, "macAddress")]
