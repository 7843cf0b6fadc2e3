"""The Kubernetes half of the test bed does what the operator's e2e tests will lean on.

Each test checks one apiserver behaviour the operator depends on (CRDs, watches, finalizers, RBAC as a
ServiceAccount, server-side dry-run), so that when an e2e test fails later, a green run here rules out the
bed itself. The last ones check the bed's fault knobs (apiserver stopped, restarted, frozen), so that an
e2e test of an outage fails for the operator's sake, never because the knob did nothing.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from kubernetes.client import ApiException
from kubernetes.watch import Watch
from urllib3.exceptions import MaxRetryError, NewConnectionError, ReadTimeoutError

from testbed.controlplane import ControlPlane, KubectlError
from testbed.wait import wait_until

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).parent / "fixtures"
GROUP, VERSION, PLURAL = "smoke.vmop.dev", "v1alpha1", "widgets"
CRD_NAME = f"{PLURAL}.{GROUP}"


@pytest.fixture(scope="module")
def widget_crd(control_plane: ControlPlane) -> str:
    """The test CRD, applied with the built kubectl like a person would, and Established."""
    control_plane.kubectl("apply", "-f", str(FIXTURES / "widget-crd.yaml"))

    def established() -> bool:
        crd = json.loads(control_plane.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
        conditions = crd.get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_until(established, timeout=30, message=f"CRD {CRD_NAME} never became Established")
    return CRD_NAME


@pytest.fixture
def custom(control_plane: ControlPlane) -> Iterator[kubernetes.client.CustomObjectsApi]:
    with control_plane.api_client() as api:
        yield kubernetes.client.CustomObjectsApi(api)


def widget(name: str, size: int = 1, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name, **metadata},
        "spec": {"size": size},
    }


def get_widget(custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def test_custom_object_is_created_listed_and_watched(
    widget_crd: str, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    listing = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    assert listing["items"] == []

    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w1"))
    names = [
        o["metadata"]["name"] for o in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    ]
    assert names == ["w1"]

    # From the empty list's resourceVersion the watch replays the creation, then must deliver live the
    # modification made after ADDED arrives: both paths a controller's informer depends on.
    seen: list[tuple[str, int]] = []
    watch = Watch()
    for event in watch.stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        resource_version=listing["metadata"]["resourceVersion"],
        timeout_seconds=30,
    ):
        seen.append((event["type"], event["object"]["spec"]["size"]))
        if event["type"] == "ADDED":
            custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1", {"spec": {"size": 2}})
        elif event["type"] == "MODIFIED":
            watch.stop()
    assert seen == [("ADDED", 1), ("MODIFIED", 2)]


def test_schema_and_cel_validation_reject_bad_objects(
    widget_crd: str, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    for bad, why in ((widget("tiny", size=0), "spec.size"), (widget("huge", size=11), "need a colour")):
        with pytest.raises(ApiException) as caught:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, bad)
        assert caught.value.status == 422
        assert why in str(caught.value.body)


def test_finalizer_holds_a_deleted_object_until_removed(
    widget_crd: str, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    finalizer = f"{GROUP}/hold"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("held", finalizers=[finalizer]))
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "held")

    held = get_widget(custom, namespace, "held")
    assert held is not None, "an object with a finalizer vanished on delete"
    assert held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"] == [finalizer]

    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "held", {"metadata": {"finalizers": None}})
    wait_until(
        lambda: get_widget(custom, namespace, "held") is None,
        timeout=10,
        message="the object was not deleted after its last finalizer was removed",
    )


def test_rbac_refuses_a_service_account_what_it_was_not_granted(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "readable"},
                    "data": {"k": "v"},
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "Role",
                    "metadata": {"name": "configmap-getter"},
                    "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": "limited-gets-configmaps"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Role",
                        "name": "configmap-getter",
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": namespace}],
                },
            ]
        ),
    )
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "limited")
    user = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]
    assert set(user) == {"token"}, "the ServiceAccount kubeconfig must not carry the admin's certificate"

    def can_i(*what: str) -> bool:
        proc = control_plane.kubectl("auth", "can-i", *what, "-n", namespace, kubeconfig=kubeconfig, check=False)
        return proc.stdout.strip() == "yes"

    # The RBAC authorizer reads Roles through an informer, so a fresh binding takes a moment to count.
    wait_until(lambda: can_i("get", "configmaps"), timeout=10, message="the RoleBinding never took effect")
    assert not can_i("list", "secrets")
    assert not can_i("create", "configmaps")

    with control_plane.api_client(kubeconfig) as api:
        core = kubernetes.client.CoreV1Api(api)
        assert core.read_namespaced_config_map("readable", namespace).data == {"k": "v"}
        for forbidden in (
            lambda: core.list_namespaced_secret(namespace),
            lambda: core.create_namespaced_config_map(
                namespace, kubernetes.client.V1ConfigMap(metadata=kubernetes.client.V1ObjectMeta(name="nope"))
            ),
            lambda: core.read_namespaced_config_map("readable", "default"),
        ):
            with pytest.raises(ApiException) as caught:
                forbidden()
            assert caught.value.status == 403

    with pytest.raises(KubectlError) as refused:
        control_plane.kubectl("get", "secrets", "-n", namespace, kubeconfig=kubeconfig)
    assert "forbidden" in refused.value.stderr
    assert f"system:serviceaccount:{namespace}:limited" in refused.value.stderr


def test_server_side_dry_run_validates_without_persisting(
    control_plane: ControlPlane, widget_crd: str, custom: kubernetes.client.CustomObjectsApi, namespace: str
) -> None:
    manifest = str(FIXTURES / "privileged-daemonset.yaml")
    out = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", manifest, "-o", "json")
    assert json.loads(out.stdout)["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"]
    missing = control_plane.kubectl("get", "daemonset", "privileged-agent", "-n", namespace, check=False)
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr

    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("ghost"), dry_run="All")
    assert created["metadata"]["name"] == "ghost"
    assert get_widget(custom, namespace, "ghost") is None
    with pytest.raises(ApiException) as caught:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, widget("ghost", size=0), dry_run="All"
        )
    assert caught.value.status == 422


# ---- the fault knobs: the apiserver gone, back, or silent


@pytest.fixture(scope="module")
def own_control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """These tests stop and freeze the apiserver, so they own a control plane: a fault left behind by a failing
    test must not fail every later test of the session."""
    cp = ControlPlane.start()
    try:
        yield cp
    finally:
        cp.stop(keep_logs=request.session.testsfailed > 0)


def _apiserver_address(cp: ControlPlane) -> tuple[str, int]:
    url = urllib.parse.urlsplit(cp.server)
    assert url.hostname is not None
    assert url.port is not None
    return url.hostname, url.port


def _connect_refused(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_stopped_apiserver_refuses_connections_and_comes_back_on_the_same_url_with_its_objects(
    own_control_plane: ControlPlane,
) -> None:
    cp = own_control_plane
    namespace = f"restart-{secrets.token_hex(3)}"
    sa_kubeconfig = cp.service_account_kubeconfig(namespace, "survivor")
    url = cp.server
    with cp.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespaced_config_map(
            namespace,
            kubernetes.client.V1ConfigMap(metadata=kubernetes.client.V1ObjectMeta(name="kept"), data={"k": "v"}),
        )

        cp.stop_apiserver()
        assert _connect_refused(_apiserver_address(cp))
        with pytest.raises(MaxRetryError) as refused:
            core.read_namespaced_config_map("kept", namespace, _request_timeout=5)
        assert isinstance(refused.value.reason, NewConnectionError)
        assert "Connection refused" in str(refused.value.reason)

        cp.start_apiserver()
        assert cp.server == url
        # the client made before the stop, with its pooled connection to the old process
        assert core.read_namespaced_config_map("kept", namespace).data == {"k": "v"}
    assert cp.kubectl("get", "configmap", "kept", "-n", namespace, "-o", "name").stdout.strip() == "configmap/kept"
    # a token issued by the old process still authenticates: the signing key is the same
    who = cp.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=sa_kubeconfig)
    assert who.stdout == f"system:serviceaccount:{namespace}:survivor"


def test_frozen_apiserver_accepts_connections_but_answers_nothing_until_thawed(
    own_control_plane: ControlPlane,
) -> None:
    cp = own_control_plane
    with cp.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        core.list_namespace(limit=1)  # a pooled keep-alive connection, as a long-running client has

        cp.freeze_apiserver()
        try:
            # the kernel completes the handshake on the listening socket; the process never reads
            with socket.create_connection(_apiserver_address(cp), timeout=1):
                pass
            started = time.monotonic()
            # urllib3 retries a timed-out GET three times, so this takes 4 s, not 1
            with pytest.raises(MaxRetryError) as silent:
                core.list_namespace(limit=1, _request_timeout=1)
            waited = time.monotonic() - started
        finally:
            cp.thaw_apiserver()
        assert isinstance(silent.value.reason, ReadTimeoutError), f"not a timeout: {silent.value.reason!r}"
        assert waited >= 1.0

        assert core.list_namespace(limit=1, _request_timeout=5).items


def test_stop_takes_down_a_frozen_control_plane_promptly() -> None:
    """SIGTERM waits while a process is stopped; without a thaw stop() would sit out its 20 s SIGKILL timeout."""
    cp = ControlPlane.start()
    try:
        address = _apiserver_address(cp)
        cp.freeze_apiserver()
    finally:
        started = time.monotonic()
        cp.stop()
    assert time.monotonic() - started < 10
    assert _connect_refused(address)
