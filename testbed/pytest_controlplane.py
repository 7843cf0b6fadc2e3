"""pytest fixtures for the Kubernetes half of the bed: one control plane per session, a namespace per test.

One control plane serves the whole session because starting one costs seconds, while a fresh namespace
costs milliseconds and isolates tests just as well for namespaced objects. A missing binary or a failed
start fails the tests that asked for it instead of skipping them: a skipped e2e suite reads as green.
"""

from __future__ import annotations

import datetime
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.client import V1Namespace, V1ObjectMeta

from testbed.controlplane import ControlPlane

_NAME_LIMIT = 63
_KEPT_LOGS = pytest.StashKey[Path]()


def _session_logs_dir(config: pytest.Config) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.rootpath) / "test-logs" / f"controlplane-{stamp}"


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """A started etcd + kube-apiserver; logs are kept under test-logs/ when any test of the session failed."""
    try:
        cp = ControlPlane.start(failure_logs_dir=_session_logs_dir(request.config))
    except Exception as exc:
        pytest.fail(f"the Kubernetes control plane of the test bed did not start: {exc}", pytrace=False)
    yield cp
    failed = request.session.testsfailed > 0
    kept = cp.stop(keep_logs=failed, logs_dest=_session_logs_dir(request.config) if failed else None)
    if kept is not None:
        request.config.stash[_KEPT_LOGS] = kept


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
