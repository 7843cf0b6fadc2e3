"""kube-scheduler and kube-controller-manager: what turns the bed's API server into a cluster that runs Pods.

ControlPlane.start(cluster=True) runs both, by PID and with their logs next to the API server's. Both use the
admin identity: the bed tests what vmop does, not the RBAC of Kubernetes' own components. Both serve /healthz
on a loopback port of their own, which is how the bed knows they are up; nothing else listens.
"""

from __future__ import annotations

import ssl
import urllib.request
from pathlib import Path

SCHEDULER = "kube-scheduler"
CONTROLLER_MANAGER = "kube-controller-manager"


def _common(bin_dir: Path, name: str, kubeconfig: Path, port: int, state_dir: Path) -> list[str]:
    """One instance per bed, so no leader election (it would only add seconds of waiting for the lease)."""
    return [
        str(bin_dir / name),
        f"--kubeconfig={kubeconfig}",
        # Delegated authentication and authorization of its own port; without them it logs warnings each start.
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        # Its self-signed serving certificate goes here rather than to a path shared with other beds.
        f"--cert-dir={state_dir / name / 'certs'}",
    ]


def scheduler_argv(bin_dir: Path, kubeconfig: Path, port: int, state_dir: Path) -> list[str]:
    return _common(bin_dir, SCHEDULER, kubeconfig, port, state_dir)


def controller_manager_argv(bin_dir: Path, kubeconfig: Path, port: int, state_dir: Path, root_ca: Path) -> list[str]:
    return [
        *_common(bin_dir, CONTROLLER_MANAGER, kubeconfig, port, state_dir),
        # Pods get bound tokens from TokenRequest; legacy Secret tokens would need the signing key here.
        "--controllers=*,-serviceaccount-token",
        # Published as ConfigMap kube-root-ca.crt in every namespace, which projected token volumes mount.
        f"--root-ca-file={root_ca}",
        "--use-service-account-credentials=false",
        # It creates this directory at start; the default is /usr/libexec/kubernetes/..., outside the bed.
        f"--flex-volume-plugin-dir={state_dir / CONTROLLER_MANAGER / 'flexvolume'}",
    ]


def healthy(port: int) -> bool:
    """Its serving certificate is self-signed and made at start, so there is nothing to verify it against."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=2, context=context) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
