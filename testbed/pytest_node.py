"""pytest fixtures for a cluster with a real node: its own control plane, the controllers and one Node.

Separate from the session `control_plane` of testbed/pytest_controlplane.py, so that the tests using that one
see exactly what they always saw (no controllers, no node). Started once per session, since a node takes
seconds, and only by the tests that ask for it. BUSYBOX_IMAGE is on the node for them.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client import V1Namespace, V1ObjectMeta

from testbed.controlplane import ControlPlane
from testbed.node import Node, busybox_image
from testbed.wait import wait_until

_NAME_LIMIT = 63
_KEPT_LOGS = pytest.StashKey[Path]()


@dataclasses.dataclass(frozen=True)
class Cluster:
    control_plane: ControlPlane
    node: Node


def _logs_dir(config: pytest.Config) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.rootpath) / "test-logs" / "node" / stamp


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A control plane serving on the node's bridge, with scheduler and controller-manager, and a Ready node.

    Logs of both are kept under test-logs/node/ when a test of the session failed. Teardown fails (an error
    in the report) if the node left anything on the machine.
    """
    logs = _logs_dir(request.config)
    try:
        node = Node.create()
    except Exception as exc:
        pytest.fail(f"the test-bed node could not be created: {exc}", pytrace=False)
    cp: ControlPlane | None = None
    try:
        cp = ControlPlane.start(address=node.ip, cluster=True, failure_logs_dir=logs / "controlplane")
        node.start(cp)
        node.import_image(busybox_image())
    except Exception as exc:
        if cp is not None:
            cp.stop(keep_logs=True, logs_dest=logs / "controlplane")
        node.stop(keep_logs=True, logs_dest=logs / "node")
        pytest.fail(f"the cluster with a node did not start: {exc}", pytrace=False)
    yield Cluster(cp, node)
    failed = request.session.testsfailed > 0
    cp.stop(keep_logs=failed, logs_dest=logs / "controlplane")  # first: it serves on the node's bridge
    node.stop(keep_logs=failed, logs_dest=logs / "node")
    if failed:
        request.config.stash[_KEPT_LOGS] = logs
    left = node.leftovers()
    if left:
        pytest.fail(f"node {node.name} left behind: {'; '.join(left)}", pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "own_node: starts a node of its own; run first, before anything starts the session's cluster"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A machine holds one node at a time (Node.create takes a lock), and the session's `cluster` keeps its
    node until the session ends: a test with a node of its own must therefore run before the first test
    that asks for `cluster`, wherever pytest would have put it. The sort is stable, so nothing else moves."""
    items.sort(key=lambda item: item.get_closest_marker("own_node") is None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Said in the summary because fixture teardown output is captured and shown only for a failing test."""
    kept = config.stash.get(_KEPT_LOGS, None)
    if kept is not None:
        terminalreporter.write_line(f"cluster and node logs of this failed session: {kept}")


@pytest.fixture
def cluster_namespace(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    """A new namespace of the cluster, named after the test, returned once Pods can be created in it.

    That is when the controller-manager has made its "default" ServiceAccount: until then ServiceAccount
    admission rejects every Pod. Never deleted: the session's etcd goes with the cluster.
    """
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")
    suffix = secrets.token_hex(3)
    name = f"{stem[: _NAME_LIMIT - len(suffix) - 1].rstrip('-')}-{suffix}".lstrip("-")
    with cluster.control_plane.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=name, labels={"vmop.dev/test": "true"})))
        wait_until(
            lambda: any(
                sa.metadata and sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items
            ),
            timeout=30,
            interval=0.1,
            message=f"no default ServiceAccount in namespace {name}",
        )
    return name
