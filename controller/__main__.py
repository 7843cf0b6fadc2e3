"""`vmop` / `python -m controller`: the operator's entry point."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Sequence
from typing import Any

import kopf
from aiohttp import web
from kubernetes import client, config
from prometheus_client import start_http_server

from controller.clock import Clock
from controller.events import EventRecorder
from controller.hypervisor import Hypervisor
from controller.kube import Kube
from controller.logs import configure_logging
from controller.metrics import Metrics
from controller.nodelock import NodeLock
from controller.operator import Operator, register
from controller.settings import Settings, from_args


def kubernetes_configuration(settings: Settings) -> client.Configuration:
    configuration = client.Configuration()
    if settings.kubeconfig is not None:
        config.load_kube_config(config_file=str(settings.kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return configuration


def kopf_login(configuration: client.Configuration) -> Any:
    """A kopf login handler that uses the very configuration the rest of the operator uses."""

    def login(**_: Any) -> kopf.ConnectionInfo:
        header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
            "authorization"
        )
        scheme, _space, token = (header or "").rpartition(" ")
        return kopf.ConnectionInfo(
            server=configuration.host,
            ca_path=configuration.ssl_ca_cert,
            insecure=not configuration.verify_ssl,
            scheme=scheme or None,
            token=token or None,
            certificate_path=configuration.cert_file,
            private_key_path=configuration.key_file,
        )

    return login


async def run(settings: Settings, configuration: client.Configuration) -> None:
    metrics = Metrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    # Everything is built before the lock is waited for: a standby that takes over at a deadline must not
    # spend the next second or two importing and building its clients (the kubernetes client alone takes
    # one to two seconds on a small node).
    lock = NodeLock(settings.node_lock_file)
    operator = Operator(
        settings,
        kube=Kube(client.ApiClient(configuration), timeout=settings.api_timeout),
        hypervisor=Hypervisor(
            settings.libvirt_uri,
            workers=settings.libvirt_workers,
            agent_timeout=settings.agent_timeout,
            graceful_destroy_timeout=settings.graceful_destroy_timeout,
            on_action=lambda action: metrics.libvirt_actions.labels(action).inc(),
        ),
        events=EventRecorder(
            client.CoreV1Api(client.ApiClient(configuration)),
            node_name=settings.node_name,
            timeout=settings.api_timeout,
        ),
        metrics=metrics,
        clock=Clock(),
        node_lock=lock,
    )
    registry = kopf.OperatorRegistry()
    register(registry, operator, kopf_login(configuration))
    if not lock.try_acquire():
        # A standby: a rollout's new copy, or a second install. It does nothing, kopf included, until the
        # active copy exits or dies; then it takes over at once (the kernel wakes it).
        logging.getLogger("vmop").info(
            "another operator holds %s for node %s: waiting as a standby", settings.node_lock_file, settings.node_name
        )
        health = await _standby_health(settings.health_port) if settings.health_port else None
        try:
            await lock.acquire()
        finally:
            if health is not None:
                await health.cleanup()  # kopf's own endpoint takes the port from here
    metrics.node_lock_held.set(1)
    logging.getLogger("vmop").info("holding %s: acting for node %s", settings.node_lock_file, settings.node_name)
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=True,
            standalone=True,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        )
    finally:
        lock.release()


async def _standby_health(port: int) -> web.AppRunner:
    """Answer the kubelet's probes while waiting for the lock.

    A DaemonSet rolled out with maxSurge deletes the old pod only once the new one is Ready: a standby
    that answered nothing would never be Ready, so the old pod would never go, and its liveness probe
    would restart it over and over. Waiting is healthy; the lock keeps it from acting.
    """

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="standby: waiting for the node lock\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


def tune_garbage_collection() -> None:
    """The operator holds thousands of long-lived objects per VM (its worker, the object, the decided
    status), and CPython's default thresholds (700, 10, 10) walk them over and over: with 3,000 VMs starting,
    a fifth of the operator's CPU went to the cycle collector. What was imported and built at start is
    frozen (never walked again), and the young generation is collected every 10,000 allocations, the older
    ones every 20 of those. Memory is freed by reference counting as before; only cycles wait longer."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def hand_the_interpreter_over_sooner() -> None:
    """An armed force wakes at its deadline on a thread of its own and must take the interpreter from
    whatever runs (the event loop stepping other VMs, the libvirt and status threads) before it can send the
    destroy. CPython hands it over after 5 ms by default, and a busy operator passes it around among many
    threads before the force's turn comes: with 100 VMs at once the send lagged its deadline by 0.035 s at
    p99 (bench, deadline). A 1 ms interval makes each of those turns shorter."""
    sys.setswitchinterval(0.001)


def main(argv: Sequence[str] | None = None) -> None:
    settings = from_args(argv)
    configure_logging(settings.log_format, settings.log_level)
    tune_garbage_collection()
    hand_the_interpreter_over_sooner()
    logging.getLogger("vmop").info(
        "vmop starting for node %s on %s", settings.node_name, settings.libvirt_uri, extra={"node": settings.node_name}
    )
    asyncio.run(run(settings, kubernetes_configuration(settings)))


if __name__ == "__main__":
    main()
