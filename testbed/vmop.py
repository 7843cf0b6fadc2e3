"""vmop on the bed: installed from manifests/, the operator run as its ServiceAccount, VMs made and watched.

Shared by the end-to-end tests, the demo and the benchmarks, so that each runs vmop the way a user
would: the CRD, RBAC and admission policy from the same manifests, the operator with only the rights
those grant, through a token bound to its node as a DaemonSet pod's is.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import kubernetes
from prometheus_client.parser import text_string_to_metric_families

from testbed.controlplane import ControlPlane, ControlPlaneError
from testbed.guests import STUBBORN_CMDLINE, coop_cmdline
from testbed.libvirthost import LibvirtHost
from testbed.processes import free_ports, tail_file, terminate
from testbed.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "vmop.dev", "v1alpha1", "virtualmachines"
OPERATOR_NAMESPACE, OPERATOR_ACCOUNT = "vmop-system", "vmop"
NODE_AUTHORITY_POLICY = "vmop-node-authority"


def install(control_plane: ControlPlane, kustomization: Path = ROOT / "manifests") -> None:
    """Apply manifests/ (or an overlay of it) as a user would, and return once the API server enforces the
    node-authority policy."""
    control_plane.kubectl("apply", "--server-side", "-k", str(kustomization))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}")
    _wait_until_node_authority_enforced(control_plane)


def node_kubeconfig(control_plane: ControlPlane, node_name: str) -> Path:
    """The operator's credentials on one node: its ServiceAccount's token bound to that node, as the token
    the kubelet mounts into the DaemonSet's Pod there is, since the policy refuses every other token."""
    return control_plane.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, node=node_name)


def _wait_until_node_authority_enforced(control_plane: ControlPlane) -> None:
    """The API server enforces a new admission policy only once its informer has seen the policy and its
    binding, a moment after they are created; until then an operator's writes would go unchecked, and a
    test of the policy would pass or fail by timing. The evidence is a refusal: a write with a token that
    is not node-bound, as a server-side dry run that changes nothing, on a VirtualMachine made for it."""
    unbound = control_plane.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT)
    probe = "node-authority-probe"
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": probe, "namespace": OPERATOR_NAMESPACE},
        "spec": {"nodeName": probe, "domain": {"memoryMiB": 16}},
    }
    resource = (f"{PLURAL}.{GROUP}", probe, "-n", OPERATOR_NAMESPACE)
    write = ("patch", *resource, "--subresource=status", "--type=json", "-p", "[]", "--dry-run=server")

    def refused() -> bool:
        result = control_plane.kubectl(*write, kubeconfig=unbound, check=False)
        if result.returncode != 0 and NODE_AUTHORITY_POLICY not in result.stderr:
            raise ControlPlaneError(f"the policy's probe was refused by something else: {result.stderr.strip()}")
        return result.returncode != 0

    control_plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(manifest))
    try:
        wait_until(refused, timeout=30, message=f"the API server did not enforce {NODE_AUTHORITY_POLICY}")
    finally:
        control_plane.kubectl("delete", *resource, "--ignore-not-found")


class OperatorProcess:
    """One vmop operator as a child process, stopped by its PID (never by name: the machine is shared)."""

    def __init__(
        self,
        *,
        kubeconfig: Path,
        node_name: str,
        libvirt: LibvirtHost,
        log_path: Path,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.libvirt = libvirt
        self.log_path = log_path
        self.extra_args = extra_args
        self.metrics_port, self.health_port = free_ports(2)
        # One lock per simulated node, shared by every operator started for it: the bed's stand-in for the
        # host directory the DaemonSet mounts (inside the libvirt host's work directory, gone with it).
        self.lock_file = libvirt.workdir / "node-locks" / f"{node_name}.lock"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "controller",
            "--node-name", self.node_name,
            "--kubeconfig", str(self.kubeconfig),
            "--libvirt-uri", self.libvirt.uri,
            "--virt-type", self.libvirt.domain_type,
            "--allowed-storage-dir", str(self.libvirt.storage_dir),
            "--console-log-dir", str(self.libvirt.console_dir),
            "--tcg-tb-cache-mib", "16",
            "--metrics-port", str(self.metrics_port),
            "--health-port", str(self.health_port),
            "--node-lock-file", str(self.lock_file),
            "--log-format", "json",
            "--log-level", "DEBUG",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 60.0, *, standby: bool = False) -> OperatorProcess:
        """Start and wait until it acts (healthy), or with standby=True until it waits for the node lock."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
            )
        if standby:
            wait_until(
                lambda: self._alive() and self._lock_held() == 0,
                timeout=timeout,
                message=lambda: f"the operator did not wait as a standby; its log ends:\n{self.log_tail()}",
            )
            return self
        wait_until(
            self.healthy,
            timeout=timeout,
            message=lambda: f"the operator did not become healthy; its log ends:\n{self.log_tail()}",
        )
        return self

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log_tail()}")
        return True

    def _lock_held(self) -> float | None:
        try:
            return self.metric("vmop_node_lock_held")
        except OSError:
            return None

    @property
    def acting(self) -> bool:
        """It holds the node's lock (and so it is the one copy that acts for the node)."""
        return self._lock_held() == 1

    def healthy(self) -> bool:
        """Its /healthz answers 200 (a standby answers too); it fails if the process exited."""
        self._alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """One sample from a fresh scrape; a missing series fails, since every series is exported from the start."""
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        raise AssertionError(f"{name}{labels} is not exported")

    def log_records(self) -> list[dict[str, Any]]:
        return log_records(self.log_path)

    def log_tail(self, lines: int = 60) -> str:
        return tail_file(self.log_path, lines)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def pause(self) -> None:
        """SIGSTOP: the operator hears nothing and does nothing until resume(), as on a frozen node."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to clean up, as in a node's OOM kill."""
        if self.process is not None:
            terminate(self.process, timeout=10, sig=signal.SIGKILL)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused one could not hear SIGTERM
            terminate(self.process, timeout=timeout)


def log_records(path: Path) -> list[dict[str, Any]]:
    """An operator's JSON log lines, parsed (lines that are not JSON, a traceback's, are skipped)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def vm_manifest(
    name: str,
    *,
    node_name: str,
    libvirt: LibvirtHost,
    kind: str = "coop",
    power_state: str = "Running",
    shutdown_policy: dict[str, Any] | None = None,
    restart_policy: str | None = None,
    ignore_presses: int = 0,
    shutdown_delay: float = 0.0,
    poweroff_after: float | None = None,
    poweroff_from: str = "ready",
    suspend_after: float | None = None,
    agent: str | None = None,
    domain: dict[str, Any] | None = None,
    priority: int | None = None,
    tolerations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A VirtualMachine running one of the bed's guests: coop (ACPI-obedient), stubborn, or firmware-only.

    poweroff_after (with poweroff_from) makes a coop guest power itself off unasked, S seconds after it is
    ready or after a key press (see testbed.guests.coop_cmdline). priority and tolerations (Pod-shaped) set
    spec.priority and spec.tolerations, for node maintenance."""
    images = libvirt.images
    guests: dict[str, dict[str, Any]] = {
        "coop": {
            "memoryMiB": 128,
            "kernel": str(images.kernel),
            "initrd": str(images.coop_initrd),
            "cmdline": coop_cmdline(
                ignore_presses=ignore_presses,
                shutdown_delay=shutdown_delay,
                poweroff_after=poweroff_after,
                poweroff_from=poweroff_from,
                suspend_after=suspend_after,
                agent=agent or "absent",
            ),
            # agent=None: no channel at all; any mode (absent included) gets the channel.
            "guestAgent": agent is not None,
        },
        "stubborn": {
            "memoryMiB": 96,
            "kernel": str(images.kernel),
            "initrd": str(images.stubborn_initrd),
            "cmdline": STUBBORN_CMDLINE,
        },
        "firmware": {"memoryMiB": 16},
    }
    spec: dict[str, Any] = {
        "nodeName": node_name,
        "powerState": power_state,
        "domain": domain if domain is not None else guests[kind],
    }
    if shutdown_policy is not None:
        spec["shutdownPolicy"] = shutdown_policy
    if restart_policy is not None:
        spec["restartPolicy"] = restart_policy
    if priority is not None:
        spec["priority"] = priority
    if tolerations is not None:
        spec["tolerations"] = tolerations
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": spec}


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def condition(body: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == type_), None)


class Vms:
    """VirtualMachines of one namespace, through the admin's client, as a user's kubectl would see them."""

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.api = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = namespace

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return cast(
            dict[str, Any], self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)
        )

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return cast(
                dict[str, Any], self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        result = self.api.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, patch, _content_type="application/merge-patch+json"
        )
        return cast(dict[str, Any], result)

    def patch_json(self, name: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
        result = self.api.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, operations, _content_type="application/json-patch+json"
        )
        return cast(dict[str, Any], result)

    def patch_spec(self, name: str, **spec: Any) -> dict[str, Any]:
        return self.patch(name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def wait(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        timeout: float,
        what: str,
    ) -> dict[str, Any]:
        last: list[dict[str, Any] | None] = [None]

        def probe() -> dict[str, Any] | None:
            body = self.get(name)
            last[0] = body
            return body if body is not None and predicate(body) else None

        def message() -> str:
            status = (last[0] or {}).get("status")
            return f"VirtualMachine {self.namespace}/{name}: {what}; last status: {status}"

        return wait_until(probe, timeout=timeout, message=message, interval=0.05)

    def wait_gone(self, name: str, *, timeout: float) -> None:
        wait_until(
            lambda: self.get(name) is None,
            timeout=timeout,
            message=lambda: f"VirtualMachine {self.namespace}/{name} still exists: {self.get(name)}",
        )

    def events(self, name: str) -> list[Any]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=VirtualMachine"
        ).items
        return sorted(items, key=lambda e: (e.event_time or e.first_timestamp, e.metadata.name))

    def event_reasons(self, name: str) -> list[str]:
        return [e.reason for e in self.events(name)]

    def wait_events(self, name: str, *reasons: str, timeout: float = 15.0) -> list[str]:
        """The VM's Event reasons once every one of `reasons` has been posted.

        The operator writes status before it posts a step's Events (a deadline is persisted first), so a
        test that has just seen a status must wait for the Events that go with it.
        """

        def all_posted() -> list[str] | None:
            seen = self.event_reasons(name)
            return seen if all(reason in seen for reason in reasons) else None

        return wait_until(
            all_posted,
            timeout=timeout,
            message=lambda: f"Events {reasons} of {self.namespace}/{name}; posted so far: {self.event_reasons(name)}",
        )
