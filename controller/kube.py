"""The Kubernetes writes of the operator: status, its own finalizer, and Events. Nothing else is written.

The operator never writes spec, labels or annotations (GitOps tools own those); status is replaced as a
whole with a JSON patch so that a field the operator dropped is really gone, and the finalizer is added
and removed by JSON patch at its index, guarded by a test, so that other finalizers are never clobbered.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes import client

from controller.api import FINALIZER, GROUP, KIND, PLURAL, VERSION

logger = logging.getLogger("vmop.kube")
_JSON_PATCH = "application/json-patch+json"
_COMPONENT = "vmop"
# The name GitOps tools see in managedFields for what the operator wrote: status and its finalizer.
FIELD_MANAGER = "vmop"


class Kube:
    def __init__(self, api_client: client.ApiClient, *, node_name: str, workers: int = 32) -> None:
        self._objects = client.CustomObjectsApi(api_client)
        self._events = client.CoreV1Api(api_client)
        self._node_name = node_name
        # Status and finalizer writes have a pool of their own: a VM seen Stopped is reported at once, not
        # behind other VMs' Events.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")
        self._event_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kube-events")

    async def _run(self, fn: Any, /, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(**kwargs))

    async def replace_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Write the whole status; returns the object as the API server now has it."""
        result: dict[str, Any] = await self._run(
            self._objects.patch_namespaced_custom_object_status,
            group=GROUP,
            version=VERSION,
            namespace=namespace,
            plural=PLURAL,
            name=name,
            body=[{"op": "add", "path": "/status", "value": status}],
            field_manager=FIELD_MANAGER,
            _content_type=_JSON_PATCH,
        )
        return result

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
        result: dict[str, Any] = await self._run(
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

    async def post_event(self, body: dict[str, Any], *, type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about the VM; a failure is logged, never raised: events are not state."""
        meta = body["metadata"]
        now = datetime.now(UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=KIND,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
                resource_version=meta.get("resourceVersion"),
            ),
            type=type_,
            reason=reason,
            message=message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            event_time=now,
            count=1,
            action=reason,
            reporting_component=_COMPONENT,
            reporting_instance=f"{_COMPONENT}-{self._node_name}",
            source=client.V1EventSource(component=_COMPONENT, host=self._node_name),
        )
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._event_executor,
                lambda: self._events.create_namespaced_event(namespace=meta["namespace"], body=event),
            )
        except client.ApiException as error:
            logger.error(
                "could not post event %s for %s/%s: %s",
                reason,
                meta["namespace"],
                meta["name"],
                error.reason,
                extra={"vm": f"{meta['namespace']}/{meta['name']}"},
            )
