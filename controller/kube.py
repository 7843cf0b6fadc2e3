"""The Kubernetes calls of the operator: status, its own finalizer, and reads. Nothing else is written.

The operator never writes spec, labels or annotations (GitOps tools own those); status is replaced as a
whole with a JSON patch so that a field the operator dropped is really gone, and the finalizer is added
and removed by JSON patch at its index, guarded by a test, so that other finalizers are never clobbered.

Every call has a timeout (the kubernetes client has none by default) and every failure, a refusal or a
connection that never answered, comes back as one KubeError: a caller never has to know urllib3.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3
from kubernetes import client

from controller.api import FINALIZER, GROUP, PLURAL, VERSION

logger = logging.getLogger("vmop.kube")
_JSON_PATCH = "application/json-patch+json"
# The name GitOps tools see in managedFields for what the operator wrote: status and its finalizer.
FIELD_MANAGER = "vmop"
CONFLICT, NOT_FOUND = 409, 404


class KubeError(Exception):
    """A Kubernetes request failed; status is the HTTP status, or None when no answer came."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class Kube:
    def __init__(self, api_client: client.ApiClient, *, timeout: float = 10.0, workers: int = 32) -> None:
        self._objects = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._api_client = api_client
        self._timeout = timeout
        # The client blocks; its calls run here, never on the event loop.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")

    async def _call(self, what: str, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        def call() -> Any:
            return fn(**kwargs, _request_timeout=(min(3.0, self._timeout), self._timeout))

        try:
            # The client's own timeouts bound connect and each read; this bounds the whole, a slow drip included.
            return await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._executor, call), timeout=self._timeout + 1
            )
        except client.ApiException as error:
            raise KubeError(f"{what}: {error.status} {error.reason}", error.status) from error
        except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as error:
            raise KubeError(f"{what}: no answer from the API server ({error!r})", None) from error

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], *, resource_version: str
    ) -> dict[str, Any]:
        """Write the whole status if the object is still at resource_version (else KubeError 409).

        The precondition means a write never lands on a state the writer has not seen: a lost race is
        decided again on fresh state, never silently overwritten.
        """
        result: dict[str, Any] = await self._call(
            f"writing the status of {namespace}/{name}",
            self._objects.patch_namespaced_custom_object_status,
            group=GROUP,
            version=VERSION,
            namespace=namespace,
            plural=PLURAL,
            name=name,
            body=[
                {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
                {"op": "add", "path": "/status", "value": status},
            ],
            field_manager=FIELD_MANAGER,
            _content_type=_JSON_PATCH,
        )
        return result

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            f"reading {namespace}/{name}",
            self._objects.get_namespaced_custom_object,
            group=GROUP,
            version=VERSION,
            namespace=namespace,
            plural=PLURAL,
            name=name,
        )
        return result

    async def list_node(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        """This node's VirtualMachines and the list's resourceVersion, filtered by the API server."""
        result: dict[str, Any] = await self._call(
            f"listing the VirtualMachines of node {node_name}",
            self._objects.list_cluster_custom_object,
            group=GROUP,
            version=VERSION,
            plural=PLURAL,
            field_selector=f"spec.nodeName={node_name}",
        )
        return list(result.get("items", [])), str(result["metadata"]["resourceVersion"])

    async def get_node(self, node_name: str) -> dict[str, Any] | None:
        """This node's Node object as the API serves it, or None if there is none (no Node: no taints).

        A list with a field selector, as the watch is: the operator's rights on Nodes are to read, and a
        missing Node is an empty list rather than an error to tell from a refusal.
        """
        result = await self._call(
            f"reading Node {node_name}", self._core.list_node, field_selector=f"metadata.name={node_name}"
        )
        # The client's own JSON form of its model (camelCase keys, RFC 3339 times), as a watch event has it.
        serialize: Callable[[Any], dict[str, Any]] = self._api_client.sanitize_for_serialization
        items = serialize(result).get("items") or []
        return dict(items[0]) if items else None

    async def add_finalizer(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        finalizers = meta.get("finalizers")
        if finalizers:
            patch = [
                {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
                {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
            ]
        else:
            patch = [
                {"op": "test", "path": "/metadata/resourceVersion", "value": meta["resourceVersion"]},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ]
        return await self._patch(meta, patch)

    async def remove_finalizer(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        index = meta.get("finalizers", []).index(FINALIZER)
        patch = [
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        return await self._patch(meta, patch)

    async def _patch(self, meta: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            f"patching the finalizers of {meta['namespace']}/{meta['name']}",
            self._objects.patch_namespaced_custom_object,
            group=GROUP,
            version=VERSION,
            namespace=meta["namespace"],
            plural=PLURAL,
            name=meta["name"],
            body=patch,
            field_manager=FIELD_MANAGER,
            _content_type=_JSON_PATCH,
        )
        return result
