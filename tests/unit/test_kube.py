"""The real Kube adapter (the real kubernetes client) against servers that hang, refuse and conflict.

Loopback sockets stand in for the API server: one that accepts and never answers (black-holed or frozen),
a port nobody listens on, and a server that answers 409. Each call must end within its timeout with a
KubeError that says which it was, never hang and never leak a urllib3 error.
"""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from controller.kube import CONFLICT, Kube, KubeError


def kube_at(port: int, timeout: float = 1.0) -> Kube:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = 0
    return Kube(client.ApiClient(configuration), timeout=timeout)


def write(kube: Kube) -> tuple[float, KubeError]:
    """A status write that must fail: how long it took, and how."""

    async def call() -> tuple[float, KubeError]:
        started = time.monotonic()
        with pytest.raises(KubeError) as raised:
            await kube.write_status("ns", "vm", {"powerState": "Running"}, resource_version="7")
        return time.monotonic() - started, raised.value

    return asyncio.run(call())


@pytest.fixture
def black_hole() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_black_holed_api_server_costs_at_most_the_timeout(black_hole: int) -> None:
    elapsed, error = write(kube_at(black_hole, timeout=1.0))
    assert elapsed < 5, "bounded by the timeout, not hung"
    assert error.status is None
    assert "no answer" in str(error)


def test_a_refused_connection_is_a_kube_error_at_once() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again below: nobody listens there
    elapsed, error = write(kube_at(port))
    assert elapsed < 5
    assert error.status is None


def test_a_conflict_is_told_apart() -> None:
    class Conflict(http.server.BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            body = b'{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Conflict","code":409}'
            self.send_response(409)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Conflict)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _, error = write(kube_at(server.server_address[1]))
        assert error.status == CONFLICT
    finally:
        server.shutdown()
        server.server_close()
