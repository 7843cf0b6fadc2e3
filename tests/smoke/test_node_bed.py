"""The node of the bed is a real one: Ready, running pods that reach the API server, gone without a trace.

The first test runs a node of its own, so it is marked own_node: a machine holds one node at a time, and
testbed/pytest_node.py runs such tests before anything starts the session's `cluster`.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import kubernetes.client
import pytest
import yaml
from kubernetes.client import V1Namespace, V1ObjectMeta

from testbed.controlplane import KUBERNETES_SERVICE_IP, ControlPlane
from testbed.node import BUSYBOX_IMAGE, ImageFile, Node, busybox_files, busybox_image, image_archive
from testbed.pytest_node import Cluster
from testbed.vmop import ROOT
from testbed.wait import wait_until

_MARKER = "vmop-node-bed-says-hello"
# Where kubelet, containerd, runc, the CNI plugins and kube-controller-manager write unless kept from it.
_MACHINE_PATHS = [
    Path(p)
    for p in (
        "/var/lib/kubelet",
        "/var/lib/cni",
        "/run/containerd",
        "/run/netns",
        "/var/log/pods",
        "/var/log/containers",
        "/usr/libexec/kubernetes",
        "/opt/cni",
        "/etc/cni",
        "/opt/containerd",
        "/var/lib/containerd",
    )
]
# kubelet's tunables, and the forwarding a bridge plugin as gateway switches on
_MACHINE_SYSCTLS = [
    Path("/proc/sys", key)
    for key in (
        "vm/overcommit_memory",
        "vm/panic_on_oom",
        "kernel/panic",
        "kernel/panic_on_oops",
        "kernel/keys/root_maxkeys",
        "kernel/keys/root_maxbytes",
        "net/ipv4/ip_forward",
        "net/netfilter/nf_conntrack_max",
    )
]


def _machine_state() -> dict[str, object]:
    """What the node could change, and only that: other work on a shared machine makes tables and cgroups too."""
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    return {
        "paths": [path for path in _MACHINE_PATHS if path.exists()],
        "sysctls": {str(path): path.read_text().strip() for path in _MACHINE_SYSCTLS},
        "kube-proxy tables": [line for line in ruleset.splitlines() if line.startswith("table") and "kube" in line],
        "KUBE- chains": [line for line in ruleset.splitlines() if "KUBE-" in line],
        "cgroups": [name for name in os.listdir("/sys/fs/cgroup/memory") if name.startswith(("vmop", "kubepods"))],
    }


_KUBECTL_IMAGE = "vmop.test/kubectl:1"


def _with_libraries(binary: Path, at: str) -> list[ImageFile]:
    """A dynamically linked host binary and the shared libraries ldd names, at the paths it names them."""
    files: list[ImageFile] = [(at, binary.read_bytes(), 0o755)]
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        path = next((word for word in line.split() if word.startswith("/")), None)
        if path is not None:
            files.append((path.lstrip("/"), Path(path).resolve().read_bytes(), 0o755))
    return files


def _run_pod(cp: ControlPlane, namespace: str, name: str, image: str = BUSYBOX_IMAGE) -> None:
    """A busybox pod that logs a marker and then idles, Ready when this returns."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            # busybox as PID 1 ignores SIGTERM; nothing here needs a graceful end
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", f"echo {_MARKER}; exec sleep 3600"],
                }
            ],
        },
    }
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    cp.kubectl("wait", "-n", namespace, f"pod/{name}", "--for=condition=Ready", "--timeout=60s", timeout=90)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and proc.name != str(os.getpid()):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.own_node
def test_a_stopped_node_leaves_nothing_behind() -> None:
    node = Node.create()  # which may clear a killed bed's node first: after it, the machine is as the node finds it
    before = _machine_state()
    cp: ControlPlane | None = None
    try:
        cp = ControlPlane.start(address=node.ip, cluster=True)
        node.start(cp)
        node.import_image(busybox_image())
        with cp.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name="leftovers")))
            wait_until(
                lambda: core.list_namespaced_service_account("leftovers").items,
                timeout=30,
                message="no default ServiceAccount",
            )
        _run_pod(cp, "leftovers", "busy")
        assert _processes_mentioning(str(node.workdir)), "the check below would see nothing even if it was left"
        assert Path(f"/sys/class/net/{node.bridge}/brif").exists()
        assert any(Path(f"/sys/class/net/{node.bridge}/brif").iterdir()), "the pod has no veth on the bridge"
        assert _machine_state()["sysctls"] == before["sysctls"]
    finally:
        if cp is not None:
            cp.stop()
        node.stop()

    assert node.leftovers() == []
    assert not Path(f"/sys/class/net/{node.bridge}").exists()
    assert _processes_mentioning(str(node.workdir)) == []
    assert not node.workdir.exists()
    assert _machine_state() == before


_KILLED_BED = """
import json, time
from testbed.controlplane import ControlPlane
from testbed.node import Node
node = Node.create()
cp = ControlPlane.start(address=node.ip, cluster=True)
node.start(cp)
print(json.dumps({"workdir": str(node.workdir), "bridge": node.bridge, "control_plane": str(cp.workdir)}), flush=True)
time.sleep(600)
"""


@pytest.mark.own_node
def test_the_node_of_a_killed_bed_is_cleared_by_the_next_node() -> None:
    """A session that ends under a running bed kills it: its processes die with it, its tables, bridge,
    cgroups and mount points stay. The next bed must not then fail with "another kube-proxy runs here"."""
    Node.create().stop()  # clears whatever a bed killed before this test left, so that `before` is clean
    before = _machine_state()
    bed = subprocess.Popen([sys.executable, "-c", _KILLED_BED], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert bed.stdout is not None
        ready, _, _ = select.select([bed.stdout], [], [], 180)
        line = bed.stdout.readline() if ready else ""
    finally:
        os.kill(bed.pid, signal.SIGKILL)
        bed.wait(timeout=30)
    assert line, "the bed did not start its node within 180 s"
    killed = json.loads(line)
    shutil.rmtree(killed["control_plane"], ignore_errors=True)  # its processes died with the bed; not the node's
    wait_until(
        lambda: not _processes_mentioning(killed["workdir"]),
        timeout=30,
        message="the killed bed's node processes did not die with it",
    )
    assert _machine_state() != before, "the killed bed left nothing: this test would pass without the clearing"
    assert Path(f"/sys/class/net/{killed['bridge']}").exists()

    Node.create().stop()

    assert not Path(f"/sys/class/net/{killed['bridge']}").exists()
    assert not Path(killed["workdir"]).exists()
    assert _machine_state() == before


def test_the_node_is_ready_at_its_bridge_address(cluster: Cluster) -> None:
    with cluster.control_plane.api_client() as api:
        node = kubernetes.client.CoreV1Api(api).read_node(cluster.node.name)
    conditions = {c.type: c.status for c in node.status.conditions}
    assert conditions["Ready"] == "True", conditions
    addresses = {a.type: a.address for a in node.status.addresses}
    assert addresses["InternalIP"] == cluster.node.ip
    assert cluster.control_plane.server.startswith(f"https://{cluster.node.ip}:")


def test_a_pod_runs_and_kubectl_logs_and_exec_reach_it(cluster: Cluster, cluster_namespace: str) -> None:
    cp = cluster.control_plane
    _run_pod(cp, cluster_namespace, "busy")

    assert _MARKER in cp.kubectl("logs", "-n", cluster_namespace, "busy").stdout
    hostname = cp.kubectl("exec", "-n", cluster_namespace, "busy", "--", "cat", "/etc/hostname").stdout
    assert hostname.strip() == "busy"
    pod_ip = cp.kubectl("get", "-n", cluster_namespace, "pod/busy", "-o", "jsonpath={.status.podIP}").stdout
    assert pod_ip in cp.kubectl("exec", "-n", cluster_namespace, "busy", "--", "ip", "-4", "addr").stdout


def test_a_pod_reaches_the_api_server_through_the_kubernetes_service(cluster: Cluster, cluster_namespace: str) -> None:
    """Through kubectl's in-cluster configuration, as the operator connects: the Service's address from the
    environment, the pod's token and the CA the kubelet mounted. busybox's wget cannot: its TLS signs with
    SHA-1 only, which Go's TLS refuses."""
    cp = cluster.control_plane
    files = busybox_files() + _with_libraries(cp.bin_dir / "kubectl", "bin/kubectl")
    cluster.node.import_image(image_archive(_KUBECTL_IMAGE, files, {"Env": ["PATH=/bin"]}))
    _run_pod(cp, cluster_namespace, "client", _KUBECTL_IMAGE)

    def in_pod(*argv: str) -> str:
        return cp.kubectl("exec", "-n", cluster_namespace, "client", "--", "kubectl", "--cache-dir=/tmp", *argv).stdout

    env = cp.kubectl("exec", "-n", cluster_namespace, "client", "--", "env").stdout
    assert f"KUBERNETES_SERVICE_HOST={KUBERNETES_SERVICE_IP}" in env.splitlines()
    version = json.loads(in_pod("get", "--raw", "/version"))
    assert version["gitVersion"].startswith("v1.")

    # The token the kubelet asked for on the pod's behalf names the node, which vmop's admission policy reads.
    user = json.loads(in_pod("auth", "whoami", "-o", "json"))["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{cluster_namespace}:default"
    assert user["extra"]["authentication.kubernetes.io/node-name"] == [cluster.node.name]
