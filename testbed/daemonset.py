"""vmop deployed as users deploy it: manifests/ applied through a kustomize overlay, its pod on the bed's node.

The overlay is what a user whose hosts differ from the DaemonSet's defaults would write, and nothing more:
the image's name, where libvirtd's socket lives and the URI that reaches it, where the VM images are (the
storage allow-list resolves paths as the host sees them, so they are mounted at the same place), and the
domain type for hosts without KVM. A second overlay on top of it rolls out with a surge of one pod.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from testbed.controlplane import ControlPlane
from testbed.libvirthost import LibvirtHost
from testbed.vmop import OPERATOR_NAMESPACE, ROOT, install, log_records
from testbed.wait import wait_until

DAEMONSET = "vmop"
POD_SELECTOR = "app.kubernetes.io/name=vmop"
# Inside the pod: where the DaemonSet mounts the host's libvirt run directory.
POD_LIBVIRT_RUN = "/var/run/libvirt"


def write_overlay(directory: Path, *, image: str, libvirt: LibvirtHost) -> Path:
    """The kustomization a user with this host layout writes over manifests/; returns its directory."""
    directory.mkdir(parents=True, exist_ok=True)
    name, _, tag = image.rpartition(":")
    socket_dir = libvirt.runtime_dir / "libvirt"
    storage = str(libvirt.storage_dir)
    daemonset_patch = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": DAEMONSET, "namespace": OPERATOR_NAMESPACE},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "vmop",
                            "env": [
                                {
                                    "name": "VMOP_LIBVIRT_URI",
                                    "value": f"qemu+unix:///session?socket={POD_LIBVIRT_RUN}/libvirt-sock",
                                },
                                {"name": "VMOP_ALLOWED_STORAGE_DIRS", "value": storage},
                                {"name": "VMOP_VIRT_TYPE", "value": libvirt.domain_type},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "libvirt-run", "hostPath": {"path": str(socket_dir)}},
                        {"name": "images", "hostPath": {"path": storage}},
                    ],
                }
            }
        },
    }
    # volumeMounts merge on mountPath, so moving a mount takes a JSON patch.
    mount_patch = [
        {"op": "replace", "path": "/spec/template/spec/containers/0/volumeMounts/1/mountPath", "value": storage},
    ]
    (directory / "host-layout.yaml").write_text(yaml.safe_dump(daemonset_patch, sort_keys=False))
    (directory / "images-mount.yaml").write_text(yaml.safe_dump(mount_patch, sort_keys=False))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "manifests", directory)],
        "images": [{"name": "vmop", "newName": name, "newTag": tag}],
        "patches": [
            {"path": "host-layout.yaml"},
            {"path": "images-mount.yaml", "target": {"kind": "DaemonSet", "name": DAEMONSET}},
        ],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return directory


def write_surge_overlay(directory: Path, base: Path) -> Path:
    """The base overlay rolled out with a surge of one: the new pod starts before the old one goes."""
    directory.mkdir(parents=True, exist_ok=True)
    strategy = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": DAEMONSET, "namespace": OPERATOR_NAMESPACE},
        "spec": {"updateStrategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}},
    }
    (directory / "surge.yaml").write_text(yaml.safe_dump(strategy, sort_keys=False))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(base, directory)],
        "patches": [{"path": "surge.yaml"}],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return directory


class PodLogFollower:
    """`kubectl logs -f` of one pod into a file, so that its lines outlive the pod (a deleted pod's are gone)."""

    def __init__(self, control_plane: ControlPlane, pod: str, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            str(control_plane.bin_dir / "kubectl"),
            f"--kubeconfig={control_plane.admin_kubeconfig}",
            "logs",
            "-f",
            "-n",
            OPERATOR_NAMESPACE,
            pod,
        ]
        with path.open("wb") as out:
            self._process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def records(self) -> list[dict[str, Any]]:
        return log_records(self.path)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait(5)


class DeployedVmop:
    """The DaemonSet on the bed's cluster: apply an overlay, find its pods, read them as a user would."""

    def __init__(self, control_plane: ControlPlane, log_dir: Path) -> None:
        self.cp = control_plane
        self.log_dir = log_dir
        self._followers: dict[str, PodLogFollower] = {}
        self._lock = threading.Lock()

    def apply(self, overlay: Path) -> None:
        install(self.cp, overlay)

    def rollout_status(self, timeout: float = 180) -> None:
        self.cp.kubectl(
            "rollout", "status", "-n", OPERATOR_NAMESPACE, f"ds/{DAEMONSET}", f"--timeout={int(timeout)}s",
            timeout=timeout + 10,
        )  # fmt: skip

    def pods(self) -> list[dict[str, Any]]:
        out = self.cp.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l", POD_SELECTOR, "-o", "json").stdout
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return items

    def ready_pod(self, timeout: float = 180, *, other_than: str | None = None) -> dict[str, Any]:
        """The one pod whose Ready condition is True (and, if given, is not the named one)."""

        def ready() -> dict[str, Any] | None:
            for pod in self.pods():
                conditions = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
                name = pod["metadata"]["name"]
                if (
                    conditions.get("Ready") == "True"
                    and name != other_than
                    and not pod["metadata"].get("deletionTimestamp")
                ):
                    return pod
            return None

        pod: dict[str, Any] = wait_until(
            ready, timeout=timeout, message=lambda: f"no Ready vmop pod; pods:\n{self.describe()}"
        )
        return pod

    def describe(self) -> str:
        result = self.cp.kubectl("describe", "pods", "-n", OPERATOR_NAMESPACE, "-l", POD_SELECTOR, check=False)
        return result.stdout + result.stderr

    def follow(self, pod: str) -> PodLogFollower:
        """Start (once) following a pod's log; the file stays in the test's log directory."""
        with self._lock:
            if pod not in self._followers:
                self._followers[pod] = PodLogFollower(self.cp, pod, self.log_dir / f"{pod}.log")
            return self._followers[pod]

    def logs(self, pod: str) -> str:
        return self.cp.kubectl("logs", "-n", OPERATOR_NAMESPACE, pod).stdout

    def exec(self, pod: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl("exec", "-n", OPERATOR_NAMESPACE, pod, "--", *argv, check=check)

    @staticmethod
    def scrape(pod: dict[str, Any], timeout: float = 5) -> str:
        """The pod's metrics, fetched from its own address on the pod network, as Prometheus would."""
        address = pod["status"]["podIP"]
        with urllib.request.urlopen(f"http://{address}:9090/metrics", timeout=timeout) as response:
            text: str = response.read().decode()
            return text

    def close(self) -> None:
        for follower in self._followers.values():
            follower.stop()

    def wait_pod_gone(self, name: str, timeout: float = 120) -> None:
        def gone() -> bool:
            return all(pod["metadata"]["name"] != name for pod in self.pods())

        wait_until(gone, timeout=timeout, interval=0.2, message=f"pod {name} was not removed")
