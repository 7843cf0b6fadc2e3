"""The status of one VM, written beside its worker and never in front of it.

A worker hands over each status it decides and goes on to its next action at once; this writer sends
the newest one (older ones it never got to are simply superseded), retries with backoff while the API
server refuses or does not answer, and writes only on the object version it has seen (a conflict makes
it read the object afresh, hand it to the worker to decide on, and write the newest status again).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from controller.api import VirtualMachineStatus
from controller.kube import CONFLICT, NOT_FOUND, Kube, KubeError

_RETRY_FIRST, _RETRY_MAX = 0.5, 5.0


def status_json(status: VirtualMachineStatus) -> dict[str, Any]:
    result: dict[str, Any] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return result


class StatusWriter:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        written: VirtualMachineStatus | None,
        resource_version: Callable[[], str],
        on_body: Callable[[dict[str, Any], bool], None],
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        """written: what the API server already holds. on_body(body, fresh) takes the object after a write
        (fresh=False: only our own write changed it) or after a conflict (fresh=True: decide again)."""
        self._kube = kube
        self._namespace, self._name = namespace, name
        self._written = written
        self._pending: VirtualMachineStatus | None = None
        self._resource_version = resource_version
        self._on_body = on_body
        self._log = log
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"status:{namespace}/{name}")

    def submit(self, status: VirtualMachineStatus) -> None:
        """Never waits: the newest status replaces any not yet written."""
        self._pending = status
        self._wake.set()

    @property
    def settled(self) -> bool:
        """Everything submitted has been written."""
        return self._pending is None or self._pending == self._written

    async def _run(self) -> None:
        retry = _RETRY_FIRST
        while True:
            await self._wake.wait()
            self._wake.clear()
            status = self._pending
            if status is None or status == self._written:
                continue
            try:
                body = await self._kube.write_status(
                    self._namespace,
                    self._name,
                    status_json(status),
                    resource_version=self._resource_version(),
                )
            except KubeError as error:
                if error.status == NOT_FOUND:
                    self._log.info("the object is gone; its status is not written")
                    return
                if error.status == CONFLICT:
                    await self._refresh()
                    self._wake.set()
                    continue
                self._log.warning("status not written (%s); retrying in %.1fs", error, retry)
                await asyncio.sleep(retry)
                retry = min(_RETRY_MAX, retry * 2) * random.uniform(0.8, 1.0)
                self._wake.set()
                continue
            retry = _RETRY_FIRST
            self._written = status
            self._on_body(body, False)

    async def _refresh(self) -> None:
        try:
            body = await self._kube.get(self._namespace, self._name)
        except KubeError as error:
            self._log.warning("could not re-read the object after a conflict: %s", error)
            await asyncio.sleep(_RETRY_FIRST)
            return
        self._on_body(body, True)
