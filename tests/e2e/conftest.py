"""End-to-end fixtures: vmop installed from manifests/ on the real control plane, one operator per test.

Each test gets its own namespace and its own node name, and the operator it starts serves only that
node: VirtualMachines left by other tests belong to other nodes and are ignored, which is the node
ownership rule at work. Domains a test's VMs made are destroyed through libvirt at its end.
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed.controlplane import ControlPlane
from testbed.libvirthost import LibvirtHost
from testbed.vmop import ROOT, OperatorProcess, Vms, install, node_kubeconfig, parse_time, vm_manifest

pytestmark = pytest.mark.e2e

RIGHTS_CHECK_NODE = "rights-check"


@pytest.fixture(scope="session")
def vmop_installed(control_plane: ControlPlane) -> None:
    install(control_plane)


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane: ControlPlane, vmop_installed: None) -> Path:
    """The operator's credentials on a node of their own, for checking its rights; no operator runs with them."""
    return node_kubeconfig(control_plane, RIGHTS_CHECK_NODE)


@dataclass
class Vmop:
    """One test's world: its namespace, its node, its operator, and the libvirt host."""

    namespace: str
    node_name: str
    vms: Vms
    libvirt: LibvirtHost
    kubeconfig: Path
    log_dir: Path
    operators: list[OperatorProcess] = field(default_factory=list)

    def start_operator(self, *extra_args: str, standby: bool = False) -> OperatorProcess:
        operator = OperatorProcess(
            kubeconfig=self.kubeconfig,
            node_name=self.node_name,
            libvirt=self.libvirt,
            log_path=self.log_dir / f"operator-{len(self.operators)}.log",
            extra_args=extra_args,
        )
        self.operators.append(operator)
        return operator.start(standby=standby)

    @property
    def operator(self) -> OperatorProcess:
        return self.operators[-1]

    def manifest(self, name: str, **kwargs: Any) -> dict[str, Any]:
        return vm_manifest(name, node_name=self.node_name, libvirt=self.libvirt, **kwargs)

    def create(self, name: str, **kwargs: Any) -> dict[str, Any]:
        return self.vms.create(self.manifest(name, **kwargs))

    def domain_name(self, name: str) -> str:
        return f"{self.namespace}_{name}"

    def domain(self, name: str) -> libvirt.virDomain:
        return self.libvirt.connect().lookupByName(self.domain_name(name))

    def domain_state(self, name: str) -> int:
        state: int = self.domain(name).state()[0]
        return state

    def stop_requested(self, name: str) -> datetime:
        """Set powerState Stopped and wait until the first shutdown request is sent; the deadline the operator
        wrote (a fault test then measures the force against it)."""
        self.vms.patch_spec(name, powerState="Stopped")
        body = self.vms.wait(
            name, lambda b: (b["status"].get("shutdown") or {}).get("attempts", 0) >= 1, timeout=30, what="a request"
        )
        return parse_time(body["status"]["shutdown"]["deadline"])

    def wait_running(self, name: str, *, ready: bool = True, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the VM reads Running and, for Linux guests, until the guest listens for ACPI."""
        body = self.vms.wait(
            name, lambda b: b.get("status", {}).get("powerState") == "Running", timeout=timeout, what="Running"
        )
        if ready:
            self.libvirt.wait_guest_ready(self.domain_name(name), timeout=timeout)
        return body


def _world(
    control_plane: ControlPlane, libvirt_host: LibvirtHost, namespace: str, request: pytest.FixtureRequest
) -> Vmop:
    test_name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    node_name = f"node-{uuid.uuid4().hex[:8]}"
    world = Vmop(
        namespace=namespace,
        node_name=node_name,
        vms=Vms(control_plane.api_client(), namespace),
        libvirt=libvirt_host,
        kubeconfig=node_kubeconfig(control_plane, node_name),
        log_dir=ROOT / "test-logs" / "e2e" / test_name,
    )
    # A rerun's logs start empty: tests read the operator's records back, and an earlier run's would mislead.
    shutil.rmtree(world.log_dir, ignore_errors=True)
    world.log_dir.mkdir(parents=True)
    return world


@pytest.fixture
def vmop(
    control_plane: ControlPlane,
    libvirt_host: LibvirtHost,
    vmop_installed: None,
    namespace: str,
    request: pytest.FixtureRequest,
) -> Iterator[Vmop]:
    world = _world(control_plane, libvirt_host, namespace, request)
    try:
        yield world
    finally:
        for operator in world.operators:
            operator.stop()
        conn = libvirt_host.connect()
        for domain in conn.listAllDomains():
            if domain.name().startswith(f"{namespace}_"):
                libvirt_host.remove_guest(domain.name())


@pytest.fixture
def vmop_own_libvirt(
    control_plane: ControlPlane, vmop_installed: None, namespace: str, request: pytest.FixtureRequest
) -> Iterator[Vmop]:
    """A test's world on a libvirtd of its own, for tests that stop or restart the daemon the shared one is."""
    host = LibvirtHost.start()
    world = _world(control_plane, host, namespace, request)
    try:
        yield world
    finally:
        for operator in world.operators:
            operator.stop()
        host.stop()
