"""Deploying vmop as a platform engineer would: manifests, rights, GitOps and metrics, on the real bed.

The manifests are checked by the real API server (server-side dry run), the rights with the very token
the operator runs with, GitOps with kubectl's server-side apply under Argo CD's field manager, and the
metrics by scraping the operator while it stops real guests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from testbed.controlplane import ControlPlane, KubectlError
from testbed.vmop import OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, ROOT, OperatorProcess, condition, parse_time
from testbed.wait import holds_until, wait_until
from tests.e2e.conftest import RIGHTS_CHECK_NODE, Vmop

pytestmark = pytest.mark.e2e

SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))
VM = "virtualmachines.vmop.dev"
CRD = "customresourcedefinitions.apiextensions.k8s.io"
ARGOCD = "argocd"


def stopped(body: dict[str, Any]) -> bool:
    record = body.get("status", {}).get("shutdown") or {}
    return bool(record.get("outcome")) and body["status"].get("powerState") == "Stopped"


# ---- manifests


def rendered_manifests(control_plane: ControlPlane) -> str:
    return control_plane.kubectl("kustomize", str(ROOT / "manifests")).stdout


def rendered_daemonset(control_plane: ControlPlane) -> dict[str, Any]:
    (daemonset,) = [doc for doc in yaml.safe_load_all(rendered_manifests(control_plane)) if doc["kind"] == "DaemonSet"]
    return cast(dict[str, Any], daemonset)


def test_kustomization_passes_server_side_dry_run(control_plane: ControlPlane, vmop_installed: None) -> None:
    rendered = rendered_manifests(control_plane)
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(rendered))
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "DaemonSet",
        "Namespace",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    for mode in ((), ("--server-side",)):
        out = control_plane.kubectl("apply", *mode, "--dry-run=server", "-f", "-", input=rendered).stdout
        lines = out.strip().splitlines()
        assert len(lines) == len(kinds), out
        assert all(line.endswith("(server dry run)") for line in lines), out


def daemonset_pod(control_plane: ControlPlane, namespace: str) -> dict[str, Any]:
    """A Pod as the DaemonSet controller would make it from the template (there is none on this bed)."""
    template = rendered_daemonset(control_plane)["spec"]["template"]
    metadata = {**template["metadata"], "name": "vmop-node-x", "namespace": namespace}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def test_the_daemonset_is_a_node_critical_agent_that_tolerates_every_taint(control_plane: ControlPlane) -> None:
    spec = rendered_daemonset(control_plane)["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}], "no key, no effect: every taint, NoExecute included"
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["DAC_READ_SEARCH"]}, "reads image headers, no more"
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert "privileged" not in context


def test_the_daemonsets_pod_is_admitted_in_its_namespace(control_plane: ControlPlane, vmop_installed: None) -> None:
    """Priority admits the critical class outside kube-system, and the namespace's Pod Security level the
    host paths; this server-side dry run is what the DaemonSet controller's create would go through."""
    namespace = json.loads(control_plane.kubectl("get", "namespace", OPERATOR_NAMESPACE, "-o", "json").stdout)
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"
    pod = daemonset_pod(control_plane, OPERATOR_NAMESPACE)
    out = control_plane.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod)).stdout
    admitted = json.loads(out)
    assert admitted["spec"]["priority"] == 2000001000, "the system-node-critical class resolved"


def test_pod_security_baseline_would_refuse_the_daemonsets_pod(control_plane: ControlPlane, namespace: str) -> None:
    """Why the namespace is privileged: the baseline level forbids the host paths the operator needs (and the
    one capability it adds, to read image headers)."""
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=baseline")
    pod = json.dumps(daemonset_pod(control_plane, namespace))
    with pytest.raises(KubectlError) as refused:
        control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=pod)
    said = refused.value.stderr
    assert 'violates PodSecurity "baseline:latest"' in said
    assert 'hostPath volumes (volumes "libvirt-run", "images", "node-lock")' in said
    assert '"DAC_READ_SEARCH" in securityContext.capabilities.add' in said


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_passes_server_side_dry_run(
    control_plane: ControlPlane, vmop_installed: None, namespace: str, sample: Path
) -> None:
    out = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(sample)).stdout
    assert out.strip().endswith("created (server dry run)"), out
    assert control_plane.kubectl("get", VM, "-n", namespace, "-o", "name").stdout == "", "a dry run creates nothing"


def test_server_side_dry_run_refuses_what_the_schema_forbids(
    control_plane: ControlPlane, vmop_installed: None, namespace: str
) -> None:
    """The check above is not vacuous: the same dry run refuses a sample broken against the schema."""
    manifest = yaml.safe_load((ROOT / "manifests" / "samples" / "linux-vm.yaml").read_text())
    manifest["spec"]["shutdownPolicy"]["gracePeriodSeconds"] = 86401
    with pytest.raises(KubectlError) as refused:
        control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    assert "gracePeriodSeconds" in refused.value.stderr


# ---- least privilege, checked with the operator's own ServiceAccount token

MAY = [
    ("get", VM, ""),
    ("list", VM, ""),
    ("watch", VM, ""),
    ("patch", VM, ""),  # its finalizer only; RBAC cannot narrow a patch to a field
    ("patch", VM, "status"),
    ("create", "events", ""),
    ("patch", "events", ""),  # repeats raise the count of one Event
    # Its own Node's taints (it asks only for its own, by field selector: RBAC cannot name a DaemonSet pod's node).
    ("get", "nodes", ""),
    ("list", "nodes", ""),
    ("watch", "nodes", ""),
]
MAY_NOT = [
    ("get", "secrets", ""),
    ("list", "secrets", ""),
    ("watch", "secrets", ""),
    ("create", "pods", ""),
    ("delete", "pods", ""),
    ("create", "pods", "exec"),
    ("create", VM, ""),
    ("update", VM, ""),
    ("delete", VM, ""),
    ("deletecollection", VM, ""),
    ("update", VM, "status"),
    ("get", "configmaps", ""),
    ("list", "configmaps", ""),
    ("create", "configmaps", ""),
    ("update", "configmaps", ""),
    ("delete", "configmaps", ""),
    ("patch", "nodes", ""),
    ("update", "nodes", ""),
    ("delete", "nodes", ""),
    ("patch", "nodes", "status"),
    ("get", CRD, ""),
    ("list", CRD, ""),
    ("create", CRD, ""),
    ("update", CRD, ""),
    ("patch", CRD, ""),
    ("delete", CRD, ""),
    ("delete", "events", ""),
    ("create", "serviceaccounts", "token"),
    ("bind", "clusterroles.rbac.authorization.k8s.io", ""),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", ""),
    ("impersonate", "users", ""),
]


def can_i(control_plane: ControlPlane, kubeconfig: Path, verb: str, resource: str, subresource: str) -> bool:
    """`kubectl auth can-i` in every namespace at once: the operator's rights are cluster-wide or nothing."""
    args = ["auth", "can-i", verb, resource, "--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    result = control_plane.kubectl(*args, kubeconfig=kubeconfig, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {result.stdout}{result.stderr}"
    return answer == "yes"


def test_operator_token_is_the_service_account_of_the_manifests_bound_to_its_node(
    control_plane: ControlPlane, operator_kubeconfig: Path
) -> None:
    """Bound to a node as the kubelet's token for the DaemonSet's pod is: the node-authority policy's key."""
    who = json.loads(control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=operator_kubeconfig).stdout)
    user = who["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"
    assert user["extra"]["authentication.kubernetes.io/node-name"] == [RIGHTS_CHECK_NODE]


@pytest.mark.parametrize(("verb", "resource", "subresource"), MAY, ids=["/".join(filter(None, c)) for c in MAY])
def test_operator_may(
    control_plane: ControlPlane, operator_kubeconfig: Path, verb: str, resource: str, subresource: str
) -> None:
    assert can_i(control_plane, operator_kubeconfig, verb, resource, subresource)


@pytest.mark.parametrize(("verb", "resource", "subresource"), MAY_NOT, ids=["/".join(filter(None, c)) for c in MAY_NOT])
def test_operator_may_not(
    control_plane: ControlPlane, operator_kubeconfig: Path, verb: str, resource: str, subresource: str
) -> None:
    assert not can_i(control_plane, operator_kubeconfig, verb, resource, subresource)


def test_the_operator_reads_and_watches_its_own_node_and_no_other(
    vmop: Vmop, node_requests: Callable[[], list[dict[str, Any]]]
) -> None:
    """RBAC cannot name the node of a DaemonSet's pod: the API server's audit log shows what was asked."""
    vmop.start_operator()
    user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"

    def mine() -> list[dict[str, Any]]:
        return [
            r
            for r in node_requests()
            if r["user"]["username"] == user
            and r["user"].get("extra", {}).get("authentication.kubernetes.io/node-name") == [vmop.node_name]
        ]

    wait_until(lambda: {"list", "watch"} <= {r["verb"] for r in mine()}, timeout=30, message="a list and a watch")
    for record in mine():
        query = parse_qs(urlsplit(record["requestURI"]).query)
        assert record["verb"] in ("get", "list", "watch"), record["requestURI"]
        assert query.get("fieldSelector") == [f"metadata.name={vmop.node_name}"], record["requestURI"]


# ---- GitOps


def test_reapplying_the_same_manifest_after_the_operator_acted_is_a_no_op(
    vmop: Vmop, control_plane: ControlPlane
) -> None:
    vmop.start_operator()
    manifest = yaml.safe_dump(vmop.manifest("gitops", shutdown_policy={"gracePeriodSeconds": 30}))
    apply = ("apply", "--server-side", f"--field-manager={ARGOCD}", "-n", vmop.namespace, "-f", "-")
    control_plane.kubectl(*apply, input=manifest)
    vmop.wait_running("gitops", ready=False)
    vmop.vms.wait(
        "gitops", lambda b: (condition(b, "Ready") or {}).get("status") == "True", timeout=60, what="Ready True"
    )
    before = vmop.vms.get("gitops")
    assert before is not None
    # The operator is done: nothing it would write later can be mistaken for the re-apply's doing.
    holds_until(
        lambda: (vmop.vms.get("gitops") or {})["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"],
        seconds=1.0,
        message="the operator kept writing to a Running VM",
    )

    after = json.loads(control_plane.kubectl(*apply, "-o", "json", input=manifest).stdout)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    diff = control_plane.kubectl(
        "diff",
        "--server-side",
        f"--field-manager={ARGOCD}",
        "-n",
        vmop.namespace,
        "-f",
        "-",
        input=manifest,
        check=False,
    )
    assert (diff.returncode, diff.stdout) == (0, ""), diff.stdout + diff.stderr

    entries = before["metadata"]["managedFields"]
    (gitops,) = [e for e in entries if e["manager"] == ARGOCD]
    assert gitops["operation"] == "Apply"
    assert "f:spec" in gitops["fieldsV1"]
    assert "f:status" not in gitops["fieldsV1"]
    assert {e["manager"] for e in entries} == {ARGOCD, "vmop"}, "only Argo CD and the operator wrote the object"
    operator = [e for e in entries if e["manager"] == "vmop"]
    for entry in operator:
        fields = entry["fieldsV1"]
        assert set(fields) <= {"f:status", "f:metadata"}, entry
        assert set(fields.get("f:metadata", {})) <= {"f:finalizers"}, entry
    assert any(e.get("subresource") == "status" for e in operator)
    assert any("f:finalizers" in e["fieldsV1"].get("f:metadata", {}) for e in operator)


# ---- metrics


def wait_metric(operator: OperatorProcess, name: str, value: float, **labels: str) -> None:
    wait_until(
        lambda: operator.metric(name, **labels) == value,
        timeout=10,
        message=lambda: f"{name}{labels} is {operator.metric(name, **labels)}, expected {value}",
    )


def test_metrics_count_a_graceful_stop(vmop: Vmop) -> None:
    operator = vmop.start_operator()
    vmop.create("coop", shutdown_policy={"gracePeriodSeconds": 60})
    vmop.wait_running("coop")

    wait_metric(operator, "vmop_virtual_machines", 1, power_state="Running")
    assert operator.metric("vmop_virtual_machines", power_state="Stopped") == 0
    assert operator.metric("vmop_libvirt_connected") == 1
    assert operator.metric("vmop_shutdowns_total", outcome="Graceful") == 0
    assert operator.metric("vmop_shutdown_duration_seconds_count", outcome="Graceful") == 0

    vmop.vms.patch_spec("coop", powerState="Stopped")
    record = vmop.vms.wait("coop", stopped, timeout=60, what="the graceful stop")["status"]["shutdown"]
    assert record["outcome"] == "Graceful"

    wait_metric(operator, "vmop_shutdowns_total", 1, outcome="Graceful")
    assert operator.metric("vmop_shutdown_duration_seconds_count", outcome="Graceful") == 1
    took = (parse_time(record["completedAt"]) - parse_time(record["requestedAt"])).total_seconds()
    assert operator.metric("vmop_shutdown_duration_seconds_sum", outcome="Graceful") == pytest.approx(took, abs=1e-3)
    assert operator.metric("vmop_virtual_machines", power_state="Running") == 0
    assert operator.metric("vmop_virtual_machines", power_state="Stopped") == 1
    assert operator.metric("vmop_shutdowns_total", outcome="Forced") == 0
    assert operator.metric("vmop_forced_stop_after_deadline_seconds_count") == 0
    assert operator.metric("vmop_libvirt_connected") == 1


def test_metrics_measure_how_far_past_its_deadline_a_forced_stop_landed(vmop: Vmop) -> None:
    operator = vmop.start_operator()
    vmop.create("stub", kind="stubborn", shutdown_policy={"gracePeriodSeconds": 2, "retryIntervalSeconds": 1})
    vmop.wait_running("stub")
    wait_metric(operator, "vmop_virtual_machines", 1, power_state="Running")
    assert operator.metric("vmop_forced_stop_after_deadline_seconds_count") == 0

    vmop.vms.patch_spec("stub", powerState="Stopped")
    record = vmop.vms.wait("stub", stopped, timeout=60, what="the forced stop")["status"]["shutdown"]
    assert record["outcome"] == "Forced"

    wait_metric(operator, "vmop_forced_stop_after_deadline_seconds_count", 1)
    late = (parse_time(record["completedAt"]) - parse_time(record["deadline"])).total_seconds()
    assert operator.metric("vmop_forced_stop_after_deadline_seconds_sum") == pytest.approx(late, abs=1e-3)
    assert operator.metric("vmop_shutdowns_total", outcome="Forced") == 1
    assert operator.metric("vmop_shutdowns_total", outcome="Graceful") == 0
    assert operator.metric("vmop_shutdown_duration_seconds_count", outcome="Forced") == 1
    assert operator.metric("vmop_virtual_machines", power_state="Stopped") == 1
