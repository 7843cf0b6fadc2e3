"""Node ownership as the API server's authority (manifests/node-authority.yaml), not only the operator's filter.

Every node's operator runs as the one ServiceAccount, whose RBAC lets it patch any VirtualMachine; the
admission policy confines a token bound to a node to that node's VirtualMachines, and on the object itself
to the operator's finalizer. Checked here with real node-bound tokens against the real admission chain;
install() returned only once the API server enforced the policy, so an allowed write below is allowed by
the policy, not let through before it was loaded. No operator serves the nodes of these VMs (their names
are made up per test) except in the last test, which shows a real operator at work under the policy.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import kubernetes
import pytest

from controller.api import FINALIZER
from testbed.controlplane import ControlPlane
from testbed.vmop import (
    GROUP,
    NODE_AUTHORITY_POLICY,
    OPERATOR_ACCOUNT,
    OPERATOR_NAMESPACE,
    PLURAL,
    VERSION,
    Vms,
    node_kubeconfig,
)
from tests.e2e.conftest import Vmop

pytestmark = pytest.mark.e2e

MERGE, JSON = "application/merge-patch+json", "application/json-patch+json"
NOT_NODE_BOUND = "must authenticate with a node-bound ServiceAccount token"
OWN_FINALIZER_ONLY = f"may change only its own finalizer {FINALIZER}"


@dataclass
class Writer:
    """One identity's writes to the VirtualMachines of a namespace, as the operator makes them."""

    api: kubernetes.client.CustomObjectsApi
    namespace: str

    def patch(self, name: str, body: Any, content_type: str = JSON) -> dict[str, Any]:
        result = self.api.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, body, _content_type=content_type
        )
        return cast(dict[str, Any], result)

    def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        result = self.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, name, {"status": status}, _content_type=MERGE
        )
        return cast(dict[str, Any], result)

    def add_finalizer(self, name: str, finalizer: str = FINALIZER) -> dict[str, Any]:
        return self.patch(name, [{"op": "add", "path": "/metadata/finalizers/-", "value": finalizer}])

    def remove_finalizer(self, name: str, index: int = 0) -> dict[str, Any]:
        return self.patch(name, [{"op": "remove", "path": f"/metadata/finalizers/{index}"}])


@dataclass
class TwoNodes:
    namespace: str
    node_a: str
    node_b: str
    admin: Vms
    operator_a: Writer
    writer: Callable[[Path], Writer]

    def create(self, name: str, node: str, **metadata: Any) -> None:
        """A VM no operator serves; its placeholder finalizer lets the tests add theirs with an append."""
        self.admin.create(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "VirtualMachine",
                "metadata": {"name": name, "finalizers": ["example.com/keep"], **metadata},
                "spec": {"nodeName": node, "domain": {"memoryMiB": 16}},
            }
        )


@pytest.fixture
def nodes(control_plane: ControlPlane, vmop_installed: None, namespace: str) -> Iterator[TwoNodes]:
    suffix = uuid.uuid4().hex[:8]
    clients: list[kubernetes.client.ApiClient] = []

    def writer(kubeconfig: Path) -> Writer:
        clients.append(control_plane.api_client(kubeconfig))
        return Writer(kubernetes.client.CustomObjectsApi(clients[-1]), namespace)

    admin = control_plane.api_client()
    clients.append(admin)
    node_a, node_b = f"node-a-{suffix}", f"node-b-{suffix}"
    two = TwoNodes(
        namespace=namespace,
        node_a=node_a,
        node_b=node_b,
        admin=Vms(admin, namespace),
        operator_a=writer(node_kubeconfig(control_plane, node_a)),
        writer=writer,
    )
    two.create("vm-a", node_a, labels={"app": "web"})
    two.create("vm-b", node_b)
    try:
        yield two
    finally:
        for client in clients:
            client.close()  # type: ignore[no-untyped-call]  # the client is unannotated


def refusal(write: Callable[[], object]) -> str:
    """The API server's message for a write the policy refused (a 403, not a schema or RBAC refusal)."""
    with pytest.raises(kubernetes.client.ApiException) as refused:
        write()
    status = json.loads(refused.value.body)
    assert (refused.value.status, status["reason"]) == (403, "Forbidden"), status
    message: str = status["message"]
    assert f"ValidatingAdmissionPolicy '{NODE_AUTHORITY_POLICY}'" in message, message
    return message


def another_node(nodes: TwoNodes) -> str:
    """The refusal of node A's operator writing vm-b, of node B."""
    return f"the operator of node {nodes.node_a} may not write VirtualMachine {nodes.namespace}/vm-b of node {nodes.node_b}"


def test_an_operator_may_not_write_the_status_of_another_nodes_vm(nodes: TwoNodes) -> None:
    message = refusal(lambda: nodes.operator_a.patch_status("vm-b", {"powerState": "Stopped"}))
    assert message.endswith(another_node(nodes)), message
    assert "status" not in (nodes.admin.get("vm-b") or {})


def test_an_operator_may_neither_add_nor_remove_finalizers_of_another_nodes_vm(nodes: TwoNodes) -> None:
    """Removing one would let a VM be deleted before its own node's operator undefined its domain."""
    nodes.admin.patch_json("vm-b", [{"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}])
    assert another_node(nodes) in refusal(lambda: nodes.operator_a.remove_finalizer("vm-b", 1))
    assert another_node(nodes) in refusal(lambda: nodes.operator_a.remove_finalizer("vm-b", 0))
    nodes.admin.patch_json("vm-b", [{"op": "remove", "path": "/metadata/finalizers/1"}])
    assert another_node(nodes) in refusal(lambda: nodes.operator_a.add_finalizer("vm-b"))
    assert (nodes.admin.get("vm-b") or {})["metadata"]["finalizers"] == ["example.com/keep"]


def test_an_operator_may_not_change_another_nodes_vm_spec(nodes: TwoNodes) -> None:
    """Judged as another node's VM first: that is the message the caller gets."""
    spec = {"spec": {"powerState": "Stopped"}}
    assert another_node(nodes) in refusal(lambda: nodes.operator_a.patch("vm-b", spec, MERGE))


@pytest.mark.parametrize(
    "patch",
    [
        [{"op": "replace", "path": "/spec/powerState", "value": "Stopped"}],
        [{"op": "replace", "path": "/metadata/labels/app", "value": "db"}],
        [{"op": "remove", "path": "/metadata/labels"}],
        [{"op": "add", "path": "/metadata/annotations", "value": {"vmop.dev/restartedAt": "2030-01-01T00:00:00Z"}}],
        [{"op": "add", "path": "/metadata/finalizers/-", "value": "example.com/other"}],
        [{"op": "remove", "path": "/metadata/finalizers/0"}],
        [
            {
                "op": "add",
                "path": "/metadata/ownerReferences",
                "value": [{"apiVersion": "v1", "kind": "Namespace", "name": "x", "uid": str(uuid.uuid4())}],
            }
        ],
        # Its own finalizer together with something else is refused as a whole.
        [
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
            {"op": "replace", "path": "/spec/powerState", "value": "Stopped"},
        ],
    ],
    ids=["spec", "label", "all-labels", "annotation", "other-finalizer", "others-finalizer", "owner", "own-and-spec"],
)
def test_an_operator_may_change_nothing_but_its_finalizer_on_its_own_vm(nodes: TwoNodes, patch: list[Any]) -> None:
    before = nodes.admin.get("vm-a")
    assert before is not None
    message = refusal(lambda: nodes.operator_a.patch("vm-a", patch))
    assert f"{OWN_FINALIZER_ONLY} on VirtualMachine {nodes.namespace}/vm-a" in message, message
    after = nodes.admin.get("vm-a")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_an_operator_may_write_its_own_vms_status_and_finalizer(nodes: TwoNodes) -> None:
    written = nodes.operator_a.patch_status("vm-a", {"powerState": "Stopped"})
    assert written["status"]["powerState"] == "Stopped"
    added = nodes.operator_a.add_finalizer("vm-a")
    assert added["metadata"]["finalizers"] == ["example.com/keep", FINALIZER]
    removed = nodes.operator_a.remove_finalizer("vm-a", 1)
    assert removed["metadata"]["finalizers"] == ["example.com/keep"]
    assert removed["metadata"]["labels"] == {"app": "web"}


def test_the_operators_token_if_not_node_bound_may_write_nothing(nodes: TwoNodes, control_plane: ControlPlane) -> None:
    """Fail closed: a token from `kubectl create token` or a Secret names no node, so it may write no VM."""
    unbound = nodes.writer(control_plane.service_account_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT))
    for name in ("vm-a", "vm-b"):
        assert NOT_NODE_BOUND in refusal(partial(unbound.patch_status, name, {"powerState": "Stopped"}))
        assert NOT_NODE_BOUND in refusal(partial(unbound.add_finalizer, name))
    assert "status" not in (nodes.admin.get("vm-a") or {})


def test_other_users_are_not_held_to_it(nodes: TwoNodes) -> None:
    """People and GitOps tools edit any VM, and remove a gone node's finalizer by hand (README)."""
    nodes.admin.patch("vm-b", {"metadata": {"labels": {"app": "db"}}, "spec": {"powerState": "Stopped"}})
    nodes.admin.patch_json("vm-b", [{"op": "remove", "path": "/metadata/finalizers/0"}])
    body = nodes.admin.get("vm-b")
    assert body is not None
    assert body["metadata"]["labels"] == {"app": "db"}
    assert body["spec"]["powerState"] == "Stopped"
    assert "finalizers" not in body["metadata"]


def test_an_operator_runs_its_own_node_under_the_policy(vmop: Vmop) -> None:
    """Its finalizer added, the status written, the finalizer removed on delete: all through the policy."""
    vmop.start_operator()
    vmop.create("here", kind="firmware", shutdown_policy={"onDelete": "Force"})
    body = vmop.vms.wait(
        "here",
        lambda b: b.get("status", {}).get("powerState") == "Running",
        timeout=60,
        what="Running, written by the operator",
    )
    assert body["metadata"]["finalizers"] == [FINALIZER]
    vmop.vms.delete("here")
    vmop.vms.wait_gone("here", timeout=60)
