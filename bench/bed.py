"""The benchmark's view of the real test bed: the bed itself plus the independent observers each figure needs.

Every time the benchmarks report comes from an observer of their own, never from the operator's word
about itself: a libvirt lifecycle listener on its own connection (when a guest really stopped), a
Kubernetes watch (when a status change reached the API), the apiserver's audit log (which requests the
operator's ServiceAccount made) and /proc (what the operator process costs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kubernetes
import libvirt
from kubernetes import watch

from controller.hypervisor import start_libvirt_event_loop
from testbed.controlplane import ControlPlane
from testbed.libvirthost import DaemonLimits, LibvirtHost
from testbed.vmop import (
    GROUP,
    OPERATOR_ACCOUNT,
    OPERATOR_NAMESPACE,
    PLURAL,
    VERSION,
    OperatorProcess,
    Vms,
    install,
    node_kubeconfig,
    parse_time,
)
from testbed.wait import wait_until

OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"

# Only the operator's requests are recorded, each once, when it arrives: a watch that stays open for the
# whole run still counts, and the bench's own admin requests cost the apiserver nothing to audit.
_AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["ResponseStarted", "ResponseComplete", "Panic"]
rules:
  - level: Metadata
    users: ["{OPERATOR_USER}"]
  - level: None
"""


class OperatorAudit:
    """An audit log of the operator's ServiceAccount, kept with the bench's logs.

    The audit log is the only place where the apiserver attributes requests to a user; its /metrics
    (apiserver_request_total) has no user label, and the bench's own creates and watches would be mixed in.
    """

    def __init__(self, log_dir: Path) -> None:
        self.path = log_dir / "audit.log"
        self._policy = log_dir / "audit-policy.yaml"

    def apiserver_args(self) -> list[str]:
        self._policy.write_text(_AUDIT_POLICY)
        return [f"--audit-policy-file={self._policy}", f"--audit-log-path={self.path}"]

    def _operator_events(self, start: float, end: float) -> Iterator[dict[str, Any]]:
        """The operator's audit events whose request arrived in [start, end] (time.time() values)."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # the last line may be half written
            if event.get("user", {}).get("username") != OPERATOR_USER:
                continue
            when = parse_time(event["requestReceivedTimestamp"]).timestamp()
            if start <= when <= end:
                yield event

    def operator_requests(self, start: float, end: float) -> Counter[str]:
        """The operator's requests in the window, by "verb resource[/subresource]"."""
        counts: Counter[str] = Counter()
        for event in self._operator_events(start, end):
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", event.get("requestURI", "?"))
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            counts[f"{event.get('verb')} {resource}"] += 1
        return counts

    def status_writes(self, namespace: str, name: str, start: float, end: float) -> list[float]:
        """When the operator's status writes of one VirtualMachine reached the apiserver."""
        return sorted(
            parse_time(event["requestReceivedTimestamp"]).timestamp()
            for event in self._operator_events(start, end)
            if event.get("verb") == "patch"
            and (ref := event.get("objectRef") or {}).get("subresource") == "status"
            and ref.get("namespace") == namespace
            and ref.get("name") == name
        )

    def operator_list_watch_uris(self, start: float, end: float) -> list[str]:
        """The URIs of the operator's lists and watches: whether it asks the server to filter for its node."""
        uris = {
            re.sub(r"resourceVersion=[^&]*", "resourceVersion=N", event["requestURI"])
            for event in self._operator_events(start, end)
            if event.get("verb") in ("list", "watch")
        }
        return sorted(uris)


# ---- the operator process, from /proc


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmHWM") / 1024


def cpu_seconds(pid: int) -> float:
    """utime + stime; the fields are counted after the command name, which may itself hold spaces."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MachineCpu:
    """How busy the machine's cores were, from /proc/stat read every 50 ms on a thread of its own: what a
    late force competed with when it fell due (every process of the machine, the bed's and others')."""

    def __init__(self, interval: float = 0.05) -> None:
        self._interval = interval
        self._samples: list[tuple[float, int, int, int]] = []  # (time.time(), busy, steal, total) ticks
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="machine-cpu", daemon=True)

    def __enter__(self) -> MachineCpu:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            # cpu  user nice system idle iowait irq softirq steal guest guest_nice (guest time is in user)
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            idle, steal = ticks[3] + ticks[4], ticks[7]
            self._samples.append((time.time(), sum(ticks) - idle - steal, steal, sum(ticks)))
            if self._stopped.wait(self._interval):
                return

    def share(self, start: float, end: float) -> dict[str, float] | None:
        """The fractions of all cores' time in [start, end] that went to work (busy) and to the host's other
        guests (steal); None without two samples around the window."""
        before = [s for s in self._samples if s[0] <= start]
        after = [s for s in self._samples if s[0] >= end]
        if not before or not after:
            return None
        (_, busy0, steal0, total0), (_, busy1, steal1, total1) = before[-1], after[0]
        total = total1 - total0
        return (
            {"busy": round((busy1 - busy0) / total, 3), "steal": round((steal1 - steal0) / total, 3)} if total else None
        )


# ---- libvirt: when did a guest really stop


class LifecycleListener:
    """Lifecycle events of every domain on the bed's daemon (stops and starts), stamped with time.time() on
    arrival."""

    def __init__(self, uri: str) -> None:
        start_libvirt_event_loop()
        self._lock = threading.Lock()
        self._stops: dict[str, list[float]] = {}
        self._starts: dict[str, list[float]] = {}
        self._conn = libvirt.open(uri)
        self._callback = self._conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None
        )

    def _event(self, _conn: Any, domain: Any, event: int, _detail: int, _opaque: Any) -> None:
        times = {libvirt.VIR_DOMAIN_EVENT_STOPPED: self._stops, libvirt.VIR_DOMAIN_EVENT_STARTED: self._starts}.get(
            event
        )
        if times is not None:
            now = time.time()
            with self._lock:
                times.setdefault(domain.name(), []).append(now)

    def stopped_after(self, domain: str, since: float) -> float | None:
        with self._lock:
            return next((t for t in self._stops.get(domain, []) if t >= since), None)

    def started_after(self, domain: str, since: float) -> float | None:
        with self._lock:
            return next((t for t in self._starts.get(domain, []) if t >= since), None)

    def wait_stopped(self, domains: Iterable[str], since: float, timeout: float) -> dict[str, float]:
        """The stop time of each domain that stopped within the timeout (a missing key: still running)."""
        names = list(domains)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(self.stopped_after(name, since) is not None for name in names):
                break
            time.sleep(0.05)
        found = {name: self.stopped_after(name, since) for name in names}
        return {name: t for name, t in found.items() if t is not None}

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.domainEventDeregisterAny(self._callback)
            self._conn.close()


# ---- Kubernetes: when did a status change reach the API


@dataclass
class _Seen:
    power_state: str | None
    history: list[tuple[float, str | None]] = field(default_factory=list)


class VmWatch:
    """A watch on VirtualMachines (one namespace, or all: what an operator without a selector receives).

    It records when each powerState first arrived, by arrival time on this machine, and counts every
    event, so that the same stream tells both latency and volume.
    """

    def __init__(
        self, api_client: kubernetes.client.ApiClient, namespace: str | None = None, field_selector: str | None = None
    ) -> None:
        self._api = kubernetes.client.CustomObjectsApi(api_client)
        self._namespace = namespace
        self._selector = {"field_selector": field_selector} if field_selector else {}
        self._lock = threading.Lock()
        self._vms: dict[str, _Seen] = {}
        self.events = 0
        self.listed = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch:{namespace or '*'}", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the watch on {namespace or 'all namespaces'} did not start: {self._error}")

    def _list(self, **kwargs: Any) -> Any:
        kwargs.update(self._selector)
        if self._namespace is None:
            return self._api.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)
        return self._api.list_namespaced_custom_object(GROUP, VERSION, self._namespace, PLURAL, **kwargs)

    def _relist(self) -> str:
        body = self._list()
        with self._lock:
            self.listed = len(body["items"])
            for item in body["items"]:
                self._record(item, time.time())
        return str(body["metadata"]["resourceVersion"])

    def _record(self, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        state = (obj.get("status") or {}).get("powerState")
        seen = self._vms.get(key)
        if seen is None:
            self._vms[key] = _Seen(state, [(now, state)])
        elif seen.power_state != state:
            seen.power_state = state
            seen.history.append((now, state))

    def _run(self) -> None:
        try:
            version = self._relist()
        except BaseException as error:
            self._error = error
            raise
        self._ready.set()
        while not self._stop.is_set():
            stream = watch.Watch()  # type: ignore[no-untyped-call]  # the client is unannotated
            try:
                for event in stream.stream(  # type: ignore[no-untyped-call]
                    self._list, resource_version=version, timeout_seconds=10, allow_watch_bookmarks=True
                ):
                    now = time.time()
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    with self._lock:
                        self.events += 1
                        if event["type"] == "DELETED":
                            self._vms.pop(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}", None)
                        else:
                            self._record(obj, now)
                    if self._stop.is_set():
                        break
            except kubernetes.client.ApiException as error:
                if error.status != 410:
                    self._error = error
                    time.sleep(0.5)
                    continue
                version = self._relist()
            except Exception as error:  # a dropped connection: resume from the last version seen
                self._error = error
                time.sleep(0.5)

    def key(self, name: str) -> str:
        return name if "/" in name else f"{self._namespace}/{name}"

    def state(self, name: str) -> str | None:
        with self._lock:
            seen = self._vms.get(self.key(name))
            return seen.power_state if seen else None

    def first(self, name: str, state: str, since: float) -> float | None:
        """When `state` first arrived for this VM at or after `since`."""
        with self._lock:
            seen = self._vms.get(self.key(name))
            history = list(seen.history) if seen else []
        return next((t for t, s in history if s == state and t >= since), None)

    def count(self, state: str) -> int:
        with self._lock:
            return sum(1 for seen in self._vms.values() if seen.power_state == state)

    def wait_all(self, names: Iterable[str], state: str, timeout: float) -> None:
        keys = [self.key(n) for n in names]
        wait_until(
            lambda: all(self.state(k) == state for k in keys),
            timeout=timeout,
            message=lambda: (
                f"not all of {len(keys)} VMs read {state}: {Counter(self.state(k) for k in keys).most_common()}"
            ),
            interval=0.05,
        )

    def stop(self) -> None:
        self._stop.set()


# ---- the bed


def admin_client(control_plane: ControlPlane, pool: int = 32) -> kubernetes.client.ApiClient:
    """An admin client whose connection pool fits the bench's creator threads (the default holds 10)."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]  # the loader is unannotated
        config_file=str(control_plane.admin_kubeconfig), client_configuration=configuration, persist_config=False
    )
    configuration.connection_pool_maxsize = pool
    return kubernetes.client.ApiClient(configuration)


def parallel(fn: Callable[[Any], Any], items: Iterable[Any], threads: int = 16) -> list[Any]:
    """Many API calls at once: the apiserver and the operator, not the bench, should be the bottleneck."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, items))


class Bed:
    """A control plane (with audit log), a libvirtd, vmop installed, a libvirt listener, and every operator
    the bench starts, so that one `with` cleans up all of them whatever fails."""

    def __init__(
        self, control_plane: ControlPlane, audit: OperatorAudit, libvirt_host: LibvirtHost, log_dir: Path
    ) -> None:
        self.control_plane = control_plane
        self.audit = audit
        self.libvirt = libvirt_host
        self.log_dir = log_dir
        install(control_plane)
        self.api = admin_client(control_plane)
        self.listener = LifecycleListener(libvirt_host.uri)
        self._operators: list[OperatorProcess] = []
        self._watches: list[VmWatch] = []

    @classmethod
    @contextlib.contextmanager
    def running(cls, log_dir: Path) -> Iterator[Bed]:
        log_dir.mkdir(parents=True, exist_ok=True)
        start_libvirt_event_loop()
        audit = OperatorAudit(log_dir)
        control_plane = ControlPlane.start(apiserver_args=audit.apiserver_args())
        try:
            libvirt_host = LibvirtHost.start()
            try:
                bed = cls(control_plane, audit, libvirt_host, log_dir)
                try:
                    yield bed
                finally:
                    bed.close()
            finally:
                libvirt_host.stop()
        finally:
            control_plane.stop()

    def close(self) -> None:
        for operator in self._operators:
            operator.stop()
        for vm_watch in self._watches:
            vm_watch.stop()
        self.listener.close()
        self.api.close()  # type: ignore[no-untyped-call]

    def namespace(self, stem: str) -> str:
        name = f"{stem}-{secrets.token_hex(3)}"
        kubernetes.client.CoreV1Api(self.api).create_namespace(
            kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name))
        )
        return name

    def vms(self, namespace: str) -> Vms:
        return Vms(self.api, namespace)

    def watch(self, namespace: str | None, field_selector: str | None = None) -> VmWatch:
        """A watch on its own client: a watch holds its connection for as long as it runs."""
        vm_watch = VmWatch(admin_client(self.control_plane, pool=2), namespace, field_selector)
        self._watches.append(vm_watch)
        return vm_watch

    def operator(self, node_name: str, *extra_args: str) -> OperatorProcess:
        """An operator at INFO level, as deployed: at DEBUG, kopf's per-event logging would be measured too."""
        operator = OperatorProcess(
            kubeconfig=node_kubeconfig(self.control_plane, node_name),
            node_name=node_name,
            libvirt=self.libvirt,
            log_path=self.log_dir / f"operator-{node_name}.log",
            extra_args=("--log-level", "INFO", *extra_args),
        )
        self._operators.append(operator)
        return operator.start()

    def purge(self, namespace: str) -> None:
        """Drop a section's VirtualMachines once its operator is stopped: finalizers off, then delete, so that
        later sections start from an empty cluster (no namespace controller exists to do it)."""
        vms = self.vms(namespace)
        body = cast(dict[str, Any], vms.api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL))
        items = body["items"]

        def drop(name: str) -> None:
            with contextlib.suppress(kubernetes.client.ApiException):
                vms.patch(name, {"metadata": {"finalizers": None}})
            with contextlib.suppress(kubernetes.client.ApiException):
                vms.delete(name)

        parallel(drop, [item["metadata"]["name"] for item in items])

    def restart_libvirtd(self, limits: DaemonLimits) -> None:
        """libvirtd again with these limits (no-op if it runs with them), and the listener on the new daemon.
        Operators reconnect by themselves; start a section's operator after this anyway."""
        if self.libvirt.limits == limits:
            return
        self.libvirt.restart_daemon(limits)
        self.renew_listener()

    def renew_listener(self, listener: LifecycleListener | None = None) -> None:
        """The lifecycle listener on the daemon now running (the one given, already registered there, or a
        new one); the old one, on a daemon that went away, is closed."""
        old, self.listener = self.listener, listener or LifecycleListener(self.libvirt.uri)
        old.close()

    def remove_domains(self, prefix: str) -> None:
        conn = self.libvirt.connect()
        try:
            names = [d.name() for d in conn.listAllDomains() if d.name().startswith(prefix)]
        finally:
            conn.close()
        parallel(self.libvirt.remove_guest, names, threads=8)
