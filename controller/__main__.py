"""`vmop` / `python -m controller`: the operator's entry point."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from controller.kube import Kube
from controller.metrics import Metrics
from controller.operator import Operator, register
from controller.settings import Settings, from_args

# Attributes every LogRecord has; anything else was passed as `extra` and belongs in the JSON line.
_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the extras (vm, domain, reason) as fields a log system can filter on."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Scalars only: kopf passes whole objects (its settings) as extras, which are no use in a log line.
        extras = {
            k: v
            for k, v in record.__dict__.items()
            if k not in _RECORD_FIELDS and isinstance(v, str | int | float | bool) and not k.startswith("k8s_")
        }
        line.update(extras)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


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
    operator = Operator(settings, Kube(client.ApiClient(configuration), node_name=settings.node_name), metrics)
    registry = kopf.OperatorRegistry()
    register(registry, operator, kopf_login(configuration))
    await kopf.operator(
        registry=registry,
        clusterwide=True,
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
    )


def main(argv: Sequence[str] | None = None) -> None:
    settings = from_args(argv)
    configure_logging(settings)
    logging.getLogger("vmop").info(
        "vmop starting for node %s on %s", settings.node_name, settings.libvirt_uri, extra={"node": settings.node_name}
    )
    asyncio.run(run(settings, kubernetes_configuration(settings)))


if __name__ == "__main__":
    main()
