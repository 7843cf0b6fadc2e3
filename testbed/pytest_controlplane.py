"""pytest fixtures for the Kubernetes half of the bed: one control plane per session, a namespace per test.

One control plane serves the whole session because starting one costs seconds, while a fresh namespace
costs milliseconds and isolates tests just as well for namespaced objects. A missing binary or a failed
start fails the tests that asked for it instead of skipping them: a skipped e2e suite reads as green.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client import V1Namespace, V1ObjectMeta

from testbed.controlplane import ControlPlane

_NAME_LIMIT = 63
_KEPT_LOGS = pytest.StashKey[Path]()
_NODE_AUDIT = pytest.StashKey[Path]()
# What service accounts ask of Nodes, and nothing else (auditing costs the apiserver): the only record
# that says which Nodes a process listed and watched, with the selectors it used. One line per request, when
# it arrives (a watch completes only when it ends).
_NODE_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["ResponseStarted", "ResponseComplete", "Panic"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
    resources: [{group: "", resources: ["nodes"]}]
  - level: None
"""


def _session_logs_dir(config: pytest.Config) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.rootpath) / "test-logs" / f"controlplane-{stamp}"


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A started etcd + kube-apiserver; logs are kept under test-logs/ when any test of the session failed."""
    audit_dir = Path(tempfile.mkdtemp(prefix="vmop-node-audit-"))
    policy, log = audit_dir / "policy.yaml", audit_dir / "audit.log"
    policy.write_text(_NODE_AUDIT_POLICY)
    request.config.stash[_NODE_AUDIT] = log
    try:
        cp = ControlPlane.start(
            failure_logs_dir=_session_logs_dir(request.config),
            apiserver_args=[f"--audit-policy-file={policy}", f"--audit-log-path={log}"],
        )
    except Exception as exc:
        shutil.rmtree(audit_dir, ignore_errors=True)
        pytest.fail(f"the Kubernetes control plane of the test bed did not start: {exc}", pytrace=False)
    yield cp
    shutil.rmtree(audit_dir, ignore_errors=True)
    failed = request.session.testsfailed > 0
    kept = cp.stop(keep_logs=failed, logs_dest=_session_logs_dir(request.config) if failed else None)
    if kept is not None:
        request.config.stash[_KEPT_LOGS] = kept


@pytest.fixture
def node_requests(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Callable[[], list[dict[str, Any]]]:
    """A function returning the audit events of service accounts' requests about Nodes, oldest first."""
    log = request.config.stash[_NODE_AUDIT]

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []

    return read


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Said in the summary because fixture teardown output is captured and shown only for a failing test."""
    kept = config.stash.get(_KEPT_LOGS, None)
    if kept is not None:
        terminalreporter.write_line(f"control plane logs of this failed session: {kept}")


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> str:
    """A new namespace named after the test; never deleted, since nothing here could finish deleting it."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")
    suffix = secrets.token_hex(3)
    name = f"{stem[: _NAME_LIMIT - len(suffix) - 1].rstrip('-')}-{suffix}".lstrip("-")
    with control_plane.api_client() as api:
        kubernetes.client.CoreV1Api(api).create_namespace(
            V1Namespace(metadata=V1ObjectMeta(name=name, labels={"vmop.dev/test": "true"}))
        )
    return name
