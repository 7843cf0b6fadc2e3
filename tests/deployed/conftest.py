"""vmop as users run it: the image built from the Dockerfile, the DaemonSet applied with an overlay, its pod on
the bed's real node (kubelet, containerd, runc, CNI, kube-proxy) talking to a libvirtd through the mounted socket.

One deployment for the whole session, as on a cluster; each test has its own namespace, and removes its
domains at its end. A test that replaces the pod waits for the new one to be Ready before it ends.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import ControlPlane
from testbed.daemonset import DeployedVmop, write_overlay
from testbed.image import OperatorImage, operator_image
from testbed.libvirthost import LibvirtHost
from testbed.pytest_node import Cluster
from testbed.vmop import ROOT, Vms, vm_manifest

RESULTS = ROOT / "test-logs" / "deployed.jsonl"
# The DaemonSet's node-lock directory, a hostPath the kubelet creates on the host (the overlay keeps it: it
# is the same on every host); when the kubelet made it, it goes with the node.
NODE_LOCK_DIR = Path("/var/run/vmop")


def record(test: str, **figures: Any) -> None:
    """Figures for the README (image size, apply to Ready), kept beside the logs of the run."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as out:
        out.write(json.dumps({"test": test, **figures}) + "\n")


@pytest.fixture(scope="session")
def image() -> OperatorImage:
    return operator_image()


@pytest.fixture(scope="session")
def pod_libvirt() -> Iterator[LibvirtHost]:
    """The node's libvirtd; its socket admits the pod's root, which has no capability to pass permissions."""
    host = LibvirtHost.start(socket_perms=0o777)
    try:
        yield host
    finally:
        host.stop()


@dataclass
class Deployment:
    vmop: DeployedVmop
    overlay: Path
    cluster: Cluster
    libvirt: LibvirtHost

    @property
    def control_plane(self) -> ControlPlane:
        return self.cluster.control_plane

    @property
    def node_name(self) -> str:
        return self.cluster.node.name


@pytest.fixture(scope="session")
def deployed(
    cluster: Cluster, image: OperatorImage, pod_libvirt: LibvirtHost, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    cluster.node.import_image(image.archive)
    overlay = write_overlay(tmp_path_factory.mktemp("overlay"), image=image.name, libvirt=pod_libvirt)
    vmop = DeployedVmop(cluster.control_plane, ROOT / "test-logs" / "deployed")
    if not NODE_LOCK_DIR.exists():
        cluster.node.adopt(NODE_LOCK_DIR)
    started = time.monotonic()
    vmop.apply(overlay)
    vmop.ready_pod()
    record("apply-to-ready", seconds=round(time.monotonic() - started, 2), image_bytes=image.size_bytes)
    try:
        yield Deployment(vmop, overlay, cluster, pod_libvirt)
    finally:
        vmop.close()


@dataclass
class World:
    """One test's namespace on the deployed operator's node."""

    deployment: Deployment
    namespace: str
    vms: Vms

    def create(self, name: str, **kwargs: Any) -> dict[str, Any]:
        return self.vms.create(
            vm_manifest(name, node_name=self.deployment.node_name, libvirt=self.deployment.libvirt, **kwargs)
        )

    def domain_name(self, name: str) -> str:
        return f"{self.namespace}_{name}"

    def wait_running(self, name: str, timeout: float = 120) -> dict[str, Any]:
        return self.vms.wait(
            name, lambda b: b.get("status", {}).get("powerState") == "Running", timeout=timeout, what="Running"
        )


@pytest.fixture
def world(deployed: Deployment, request: pytest.FixtureRequest) -> Iterator[World]:
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    namespace = f"{name}-{uuid.uuid4().hex[:6]}"
    deployed.control_plane.kubectl("create", "namespace", namespace)
    vms = Vms(deployed.control_plane.api_client(), namespace)
    try:
        yield World(deployed, namespace, vms)
    finally:
        conn = deployed.libvirt.connect()
        for domain in conn.listAllDomains():
            if domain.name().startswith(f"{namespace}_"):
                deployed.libvirt.remove_guest(domain.name())
