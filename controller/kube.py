"""The Kubernetes calls of the operator: status, its own finalizer, and reads. Nothing else is written.

The operator never writes spec, labels or annotations (GitOps tools own those); status is replaced as a
whole with a JSON patch so that a field the operator dropped is really gone, and the finalizer is added
and removed by JSON patch at its index, guarded by a test, so that other finalizers are never clobbered.

Every call has a timeout (the kubernetes client has none by default) and every failure, a refusal or a
connection that never answered, comes back as one KubeError: a caller never has to know the HTTP client.

The calls are made with aiohttp on the operator's event loop, from the kubernetes client's configuration
(server, certificates, token and its refresh, proxy): two of them per VM as it starts, and the kubernetes
client's thread, urllib3 and model layers cost as much CPU again as the request itself (measured: 1.5-1.9 ms
against 0.8-1.1 ms per status write). Bodies stay plain JSON, as a watch event has them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Any

import aiohttp
from kubernetes import client

from controller.api import FINALIZER, GROUP, PLURAL, VERSION

logger = logging.getLogger("vmop.kube")
_JSON_PATCH = "application/json-patch+json"
# The name GitOps tools see in managedFields for what the operator wrote: status and its finalizer.
FIELD_MANAGER = "vmop"
CONFLICT, NOT_FOUND = 409, 404
_OBJECTS = f"/apis/{GROUP}/{VERSION}"
_AUTH_SECONDS = 1.0


class KubeError(Exception):
    """A Kubernetes request failed; status is the HTTP status, or None when no answer came."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


def _ssl_context(configuration: client.Configuration) -> ssl.SSLContext | bool:
    """What the kubernetes client's urllib3 pool would verify and present, as an SSL context."""
    if not configuration.host.startswith("https:"):
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif configuration.assert_hostname is False:
        context.check_hostname = False
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context


class Kube:
    def __init__(self, api_client: client.ApiClient, *, timeout: float = 10.0, workers: int = 32) -> None:
        """api_client: its configuration says where and as whom. At most `workers` requests are on the wire
        at once, on as many connections: the API server is the cluster's. The others wait their turn, and
        their timeout starts when they are sent: a thousand VMs starting queue two thousand writes, and a
        write that was never sent has not timed out (each turn comes within a timeout of the last)."""
        self._configuration: client.Configuration = api_client.configuration
        self._timeout = timeout
        self._connections = workers
        self._turns: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        self._user_agent: str = api_client.user_agent
        self._auth: dict[str, str] = {}
        self._auth_until = 0.0

    def _http(self) -> aiohttp.ClientSession:
        """Made on first use, on the loop that uses it."""
        if self._session is None or self._session.closed:
            self._turns = asyncio.Semaphore(self._connections)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections, ssl=_ssl_context(self._configuration)),
                headers={"Accept": "application/json", "User-Agent": self._user_agent},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self, content_type: str | None) -> dict[str, str]:
        # The client's own reading of the credentials, at most once a second: its refresh hook reads the
        # token again when it expires (in-cluster, the projected ServiceAccount token), and a kubeconfig's
        # hook rewrites the whole configuration each time it is asked.
        now = time.monotonic()
        if now >= self._auth_until:
            self._auth = {}
            bearer = self._configuration.auth_settings().get("BearerToken")
            if bearer is not None and bearer["value"]:
                self._auth[bearer["key"]] = bearer["value"]
            self._auth_until = now + _AUTH_SECONDS
        headers = dict(self._auth)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    async def _call(
        self,
        what: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        configuration = self._configuration
        # From its turn: connect within 3 s, each read within the timeout, the whole (a slow drip included)
        # within the timeout and a second.
        timeout = aiohttp.ClientTimeout(
            total=self._timeout + 1, sock_connect=min(3.0, self._timeout), sock_read=self._timeout
        )
        session = self._http()
        assert self._turns is not None
        try:
            async with (
                self._turns,
                session.request(
                    method,
                    configuration.host + path,
                    params=params,
                    data=json.dumps(body) if body is not None else None,
                    headers=self._headers(content_type),
                    timeout=timeout,
                    proxy=configuration.proxy or None,
                    server_hostname=configuration.tls_server_name or None,
                ) as response,
            ):
                data = await response.read()
                if response.status >= 300:
                    raise KubeError(f"{what}: {response.status} {response.reason}", response.status)
                return json.loads(data)
        except KubeError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
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
            "PATCH",
            f"{_OBJECTS}/namespaces/{namespace}/{PLURAL}/{name}/status",
            params={"fieldManager": FIELD_MANAGER},
            body=[
                {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
                {"op": "add", "path": "/status", "value": status},
            ],
            content_type=_JSON_PATCH,
        )
        return result

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            f"reading {namespace}/{name}", "GET", f"{_OBJECTS}/namespaces/{namespace}/{PLURAL}/{name}"
        )
        return result

    async def list_node(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        """This node's VirtualMachines and the list's resourceVersion, filtered by the API server."""
        result: dict[str, Any] = await self._call(
            f"listing the VirtualMachines of node {node_name}",
            "GET",
            f"{_OBJECTS}/{PLURAL}",
            params={"fieldSelector": f"spec.nodeName={node_name}"},
        )
        return list(result.get("items") or []), str(result["metadata"]["resourceVersion"])

    async def get_node(self, node_name: str) -> dict[str, Any] | None:
        """This node's Node object as the API serves it, or None if there is none (no Node: no taints).

        A list with a field selector, as the watch is: the operator's rights on Nodes are to read, and a
        missing Node is an empty list rather than an error to tell from a refusal. The object is the API
        server's JSON (camelCase keys, RFC 3339 times), as a watch event has it.
        """
        result = await self._call(
            f"reading Node {node_name}", "GET", "/api/v1/nodes", params={"fieldSelector": f"metadata.name={node_name}"}
        )
        items = result.get("items") or []
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
            "PATCH",
            f"{_OBJECTS}/namespaces/{meta['namespace']}/{PLURAL}/{meta['name']}",
            params={"fieldManager": FIELD_MANAGER},
            body=patch,
            content_type=_JSON_PATCH,
        )
        return result
