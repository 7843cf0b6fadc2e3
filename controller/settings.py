"""The operator's settings: one typed object built from flags, each with an environment variable fallback."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from controller.domainxml import HostDefaults
from controller.nodepolicy import NodePolicy
from controller.storage import DEFAULT_ALLOWED_DIRS


@dataclass(frozen=True)
class Settings:
    node_name: str
    libvirt_uri: str
    kubeconfig: Path | None
    allowed_storage_dirs: tuple[Path, ...]
    policy: NodePolicy
    host: HostDefaults
    resync: timedelta
    log_format: str
    log_level: str
    metrics_port: int
    health_port: int
    libvirt_workers: int
    agent_timeout: float
    graceful_destroy_timeout: float
    node_lock_file: Path
    api_timeout: float


# libvirt gives up a graceful destroy after 15 s without SIGKILL; the plain destroy must come before that.
LIBVIRT_GRACEFUL_DESTROY_LIMIT = 15.0


def _option(
    p: argparse.ArgumentParser, flag: str, env: str, help_text: str, *, default: object = None, **kwargs: object
) -> None:
    """A flag whose default comes from an environment variable; argparse parses a string default with `type`."""
    p.add_argument(flag, default=os.environ.get(env, default), help=f"[{env}] {help_text}", **kwargs)  # type: ignore[arg-type]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmop",
        description=(
            "vmop: runs the VirtualMachines of one node on its libvirt, and turns them off by asking the guest "
            "first, forcing only at the deadline. Every flag can also be set by the environment variable named "
            "in brackets."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _option(
        p,
        "--node-name",
        "NODE_NAME",
        "the node this operator serves: it touches only VirtualMachines whose spec.nodeName is this "
        "(set it from the downward API spec.nodeName)",
    )
    _option(p, "--libvirt-uri", "VMOP_LIBVIRT_URI", "the libvirt connection URI", default="qemu:///system")
    _option(p, "--kubeconfig", "KUBECONFIG", "kubeconfig file; without it the in-cluster service account is used")
    p.add_argument(
        "--allowed-storage-dir",
        action="append",
        dest="allowed_storage_dirs",
        default=None,
        help="[VMOP_ALLOWED_STORAGE_DIRS, colon-separated] a directory kernels, initrds and disks may resolve "
        f"into (repeatable; default {':'.join(map(str, DEFAULT_ALLOWED_DIRS))})",
    )
    for kind, what in (("bridge", "a host bridge"), ("network", "a libvirt network")):
        p.add_argument(
            f"--allowed-{kind}",
            action="append",
            dest=f"allowed_{kind}s",
            default=None,
            help=f"[VMOP_ALLOWED_{kind.upper()}S, comma-separated] {what} that interfaces may attach to "
            f"(repeatable; default none: a VM with a {kind} interface is refused)",
        )
    _option(
        p,
        "--interface-filter",
        "VMOP_INTERFACE_FILTER",
        "a libvirt nwfilter applied to every interface, e.g. clean-traffic (the guest may send only from its "
        "own MAC and IP: no spoofing); needs libvirt's nwfilter driver and tap-based networks (bridges, "
        "NAT or routed networks; not macvtap or hostdev)",
    )
    _option(
        p,
        "--max-vcpus-per-vm",
        "VMOP_MAX_VCPUS_PER_VM",
        "refuse a VM with more vCPUs (default: no limit below the API's 255)",
        type=int,
    )
    _option(
        p,
        "--max-memory-mib-per-vm",
        "VMOP_MAX_MEMORY_MIB_PER_VM",
        "refuse a VM with more memory, in MiB (default: no limit below the node's ceiling)",
        type=int,
    )
    _option(
        p,
        "--memory-ceiling-mib",
        "VMOP_MEMORY_CEILING_MIB",
        "do not start a VM that would take the memory of the node's running domains past this, in MiB "
        "(default: the node's physical memory as libvirt reports it)",
        type=int,
    )
    _option(
        p,
        "--virt-type",
        "VMOP_VIRT_TYPE",
        "libvirt domain type: kvm (hardware virtualization), qemu (TCG emulation, for hosts where KVM does "
        "not work) or test (libvirt's test:///default driver, for scale measurements)",
        default="kvm",
        choices=["kvm", "qemu", "test"],
    )
    _option(
        p,
        "--console-log-dir",
        "VMOP_CONSOLE_LOG_DIR",
        "write each guest's serial console to DIR/<domain>.log (default: a pty, for virsh console)",
    )
    _option(
        p,
        "--tcg-tb-cache-mib",
        "VMOP_TCG_TB_CACHE_MIB",
        "TCG translation cache per guest (qemu type only; lowers memory)",
        type=int,
    )
    _option(
        p,
        "--resync-seconds",
        "VMOP_RESYNC_SECONDS",
        "look at every VM at least this often, in case an event was missed",
        default="300",
        type=float,
    )
    _option(p, "--log-format", "VMOP_LOG_FORMAT", "log line format", default="json", choices=["json", "text"])
    _option(p, "--log-level", "VMOP_LOG_LEVEL", "log level", default="INFO")
    _option(
        p,
        "--metrics-port",
        "VMOP_METRICS_PORT",
        "port of the Prometheus /metrics endpoint (0 disables it)",
        default="9090",
        type=int,
    )
    _option(
        p,
        "--health-port",
        "VMOP_HEALTH_PORT",
        "port of the /healthz endpoint (liveness and readiness)",
        default="8080",
        type=int,
    )
    _option(
        p,
        "--libvirt-workers",
        "VMOP_LIBVIRT_WORKERS",
        "threads for blocking libvirt calls, and as many again for forced stops: how many VMs can be acted "
        "on, or forced off, at the same instant (libvirtd's max_workers and max_client_requests must allow "
        "as many)",
        default="128",
        type=int,
    )
    _option(
        p,
        "--agent-timeout",
        "VMOP_AGENT_TIMEOUT",
        "seconds a guest-agent shutdown request may take before ACPI is tried",
        default="5",
        type=float,
    )
    _option(
        p,
        "--graceful-destroy-timeout",
        "VMOP_GRACEFUL_DESTROY_TIMEOUT",
        "at the deadline QEMU gets SIGTERM first; seconds before a plain destroy (SIGTERM again, SIGKILL 10 s "
        f"later); below libvirt's own {LIBVIRT_GRACEFUL_DESTROY_LIMIT:.0f} s",
        default="5",
        type=float,
    )
    _option(
        p,
        "--node-lock-file",
        "VMOP_NODE_LOCK_FILE",
        "a file on the node (a hostPath mount) that the active operator holds an exclusive flock on: a second "
        "copy for the same node waits as a standby and takes over the instant the first exits or dies",
        default="/var/run/vmop/node.lock",
    )
    _option(
        p,
        "--api-timeout",
        "VMOP_API_TIMEOUT",
        "seconds any one Kubernetes API request may take (status, finalizer, Event, list)",
        default="10",
        type=float,
    )
    return p


def from_args(argv: Sequence[str] | None = None) -> Settings:
    p = parser()
    args = p.parse_args(argv)
    if not args.node_name:
        p.error("--node-name (or NODE_NAME) is required: the operator serves exactly one node")
    dirs = args.allowed_storage_dirs
    if dirs is None:
        from_env = os.environ.get("VMOP_ALLOWED_STORAGE_DIRS")
        dirs = from_env.split(":") if from_env else [str(d) for d in DEFAULT_ALLOWED_DIRS]
    for limit, flag in (
        (args.max_vcpus_per_vm, "--max-vcpus-per-vm"),
        (args.max_memory_mib_per_vm, "--max-memory-mib-per-vm"),
        (args.memory_ceiling_mib, "--memory-ceiling-mib"),
    ):
        if limit is not None and limit <= 0:
            p.error(f"{flag} must be positive")
    for value, flag in (
        (args.resync_seconds, "--resync-seconds"),
        (args.agent_timeout, "--agent-timeout"),
        (args.graceful_destroy_timeout, "--graceful-destroy-timeout"),
        (args.api_timeout, "--api-timeout"),
    ):
        if value <= 0:
            p.error(f"{flag} must be positive")
    if args.graceful_destroy_timeout >= LIBVIRT_GRACEFUL_DESTROY_LIMIT:
        p.error(
            f"--graceful-destroy-timeout must be below {LIBVIRT_GRACEFUL_DESTROY_LIMIT:.0f}: libvirt gives up a "
            "graceful destroy then, and the plain destroy that sends SIGKILL would never be reached"
        )
    return Settings(
        node_name=args.node_name,
        libvirt_uri=args.libvirt_uri,
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        allowed_storage_dirs=tuple(Path(d) for d in dirs if d),
        policy=NodePolicy(
            allowed_bridges=_names(args.allowed_bridges, "VMOP_ALLOWED_BRIDGES"),
            allowed_networks=_names(args.allowed_networks, "VMOP_ALLOWED_NETWORKS"),
            max_vcpus=args.max_vcpus_per_vm,
            max_memory_mib=args.max_memory_mib_per_vm,
            memory_ceiling_mib=args.memory_ceiling_mib,
        ),
        host=HostDefaults(
            virt_type=args.virt_type,
            console_log_dir=Path(args.console_log_dir) if args.console_log_dir else None,
            tcg_tb_cache_mib=int(args.tcg_tb_cache_mib) if args.tcg_tb_cache_mib else None,
            interface_filter=args.interface_filter or None,
        ),
        resync=timedelta(seconds=args.resync_seconds),
        log_format=args.log_format,
        log_level=args.log_level.upper(),
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        libvirt_workers=args.libvirt_workers,
        agent_timeout=args.agent_timeout,
        graceful_destroy_timeout=args.graceful_destroy_timeout,
        node_lock_file=Path(args.node_lock_file),
        api_timeout=args.api_timeout,
    )


def _names(flags: list[str] | None, env: str) -> frozenset[str]:
    """Repeated flags, else the comma-separated variable: bridge names may hold a colon, never a comma."""
    values = flags if flags is not None else os.environ.get(env, "").split(",")
    return frozenset(value.strip() for value in values if value.strip())
