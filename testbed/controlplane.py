"""A real etcd + kube-apiserver on loopback, built from the pinned Go modules, for tests and for people.

By default only etcd and kube-apiserver run: there is no kube-controller-manager, scheduler or kubelet.
Finalizers, status subresources, CEL validation, RBAC, TokenRequest and server-side dry-run behave as in a
cluster, but nothing garbage-collects and no namespace controller exists, so a deleted namespace stays
Terminating forever and owner references never cascade. Tests must therefore never wait for a namespace to
go away: they use a fresh namespace each and leave it behind; the whole etcd is thrown away at stop().

With cluster=True the same control plane is made ready for real nodes (testbed/node.py): the scheduler and
the controller-manager run too (see testbed/controllers.py), Pods get their ServiceAccount token, and the API
server can reach kubelets for logs and exec. An address= other than loopback makes it serve where pods can
reach it, which the "kubernetes" Service then points at.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import kubernetes.client
import kubernetes.config
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes.client import (
    AuthenticationV1TokenRequest,
    V1BoundObjectReference,
    V1Namespace,
    V1Node,
    V1ObjectMeta,
    V1ServiceAccount,
    V1TokenRequestSpec,
)

from testbed import controllers
from testbed.processes import built_path, free_ports, tail_file, terminate
from testbed.wait import WaitTimeout, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "testbed" / "controlplane" / "build.sh"

# The first address of this range becomes the "kubernetes" Service's ClusterIP, which the serving
# certificate must name for in-cluster style clients.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "vmop-admin"
_APISERVER = "kube-apiserver"
_PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """The bed could not be built, started or driven; the message carries what a person needs to act."""


class KubectlError(ControlPlaneError):
    """A kubectl call failed; keeps the pieces so that tests can assert on stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(f"kubectl exited {returncode}: {' '.join(self.argv)}\nstderr:\n{stderr.strip()}")


class _PortTaken(Exception):
    """Another process bound our port between picking it and the server binding it."""


def find_binaries() -> Path:
    """On a machine without the cache this builds for many minutes; that is the price of having no
    downloadable kube-apiserver here, and it is paid once per machine.
    """
    try:
        bin_dir = Path(built_path(BUILD_SCRIPT))
    except RuntimeError as error:
        raise ControlPlaneError(str(error)) from None
    missing = [b for b in ("etcd", "kube-apiserver", "kubectl") if not (bin_dir / b).is_file()]
    if missing:
        raise ControlPlaneError(f"{BUILD_SCRIPT} printed {bin_dir} but it lacks {', '.join(missing)}")
    return bin_dir


def _die_with_parent() -> None:
    """Runs in the child before exec: a crashed or SIGKILLed test run must not leave servers on a shared box.

    SIGKILL rather than SIGTERM because a frozen (SIGSTOPped) apiserver would hold a SIGTERM pending for ever;
    nothing of a bed whose owner is gone needs a graceful end.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so start() and start_apiserver() must be
    called from a thread that outlives the bed (the main thread in pytest and in `python -m testbed.controlplane`).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _all_threads_stopped(pid: int) -> bool:
    """SIGSTOP reaches a multi-threaded Go program's threads one by one; only then is it really silent."""
    states = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process is gone, so it will never be stopped
        return False
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:  # a thread that just ended
            continue
        states.append(stat.rsplit(")", 1)[1].split()[0])
    return bool(states) and all(state in ("T", "t") for state in states)


class _Pki:
    """Short-lived keys and certificates generated per bed, so nothing secret is ever checked in or shared."""

    def __init__(self, directory: Path, address: str) -> None:
        self.dir = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        # Backdated so that a clock a little behind the apiserver's does not make fresh certs "not yet valid".
        self._not_before = now - datetime.timedelta(hours=1)
        self._not_after = now + datetime.timedelta(days=7)

        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmop-testbed-ca")])
        self.ca_cert = (
            self._builder(ca_name, ca_name, self.ca_key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file = self._write("ca.crt", self.ca_cert.public_bytes(serialization.Encoding.PEM))

        self.serving_cert, self.serving_key = self._leaf(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
            ExtendedKeyUsageOID.SERVER_AUTH,
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes"),
                    x509.DNSName("kubernetes.default"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.DNSName("kubernetes.default.svc.cluster.local"),
                    *(
                        x509.IPAddress(ipaddress.ip_address(ip))
                        for ip in dict.fromkeys(("127.0.0.1", KUBERNETES_SERVICE_IP, address))
                    ),
                ]
            ),
        )
        self.serving_cert_file = self._write("serving.crt", self.serving_cert)
        self.serving_key_file = self._write("serving.key", self.serving_key)

        # Group system:masters is what makes this identity cluster-admin without any RBAC object.
        self.admin_cert, self.admin_key = self.client(ADMIN_USER, ["system:masters"])
        self.admin_cert_file = self._write("admin.crt", self.admin_cert)
        self.admin_key_file = self._write("admin.key", self.admin_key)

        sa_key = ec.generate_private_key(ec.SECP256R1())
        self.sa_key_file = self._write("sa.key", _key_pem(sa_key))
        self.sa_pub_file = self._write(
            "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def client(self, user: str, groups: Sequence[str]) -> tuple[bytes, bytes]:
        """A client certificate and its key; the API server reads the user from CN and the groups from O."""
        return self._leaf(
            x509.Name(
                [
                    *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups),
                    x509.NameAttribute(NameOID.COMMON_NAME, user),
                ]
            ),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            None,
        )

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
        )

    def _leaf(
        self,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName | None,
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            self._builder(subject, self.ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _b64(data: bytes) -> str:
    return b64encode(data).decode()


def _kubeconfig(server: str, ca_pem: bytes, user: str, credentials: dict[str, str]) -> str:
    """Self-contained (data, not file paths) so that it survives being copied and needs nothing else."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "vmop-testbed",
                    "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": user, "context": {"cluster": "vmop-testbed", "user": user}}],
            "current-context": user,
        }
    )


class _Server:
    """One child process with its log, so that failures can quote the log and stop() can reap by PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self._log.write(f"\n=== {datetime.datetime.now().isoformat()} {' '.join(argv)}\n".encode())
        self._log.flush()
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,  # noqa: PLW1509  # only async-signal-safe prctl runs there
        )

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def stop(self, timeout: float = 20) -> None:
        terminate(self.proc, timeout=timeout)
        self._log.close()


class ControlPlane:
    """An etcd and a kube-apiserver owned by this object, reachable as cluster-admin through admin_kubeconfig.

    Not a cluster: without kube-controller-manager a deleted namespace stays Terminating and nothing
    garbage-collects, so never wait for a namespace to disappear (see the module docstring).
    """

    def __init__(self, bin_dir: Path, workdir: Path, *, address: str = "127.0.0.1", cluster: bool = False) -> None:
        self.bin_dir = bin_dir
        self.address = address
        self.cluster = cluster
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        self.server = ""
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self._kubeconfig_dir = workdir / "kubeconfigs"
        # Keyed by name, in start order; a restarted server replaces its predecessor in place.
        self._servers: dict[str, _Server] = {}
        self._frozen = False
        self._stopped = False
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._kubeconfig_dir.mkdir(exist_ok=True)
        self._pki = _Pki(workdir / "pki", address)
        self._apiserver_args: tuple[str, ...] = ()

    @classmethod
    def start(
        cls,
        workdir: Path | None = None,
        *,
        timeout: float = 120,
        failure_logs_dir: Path | None = None,
        apiserver_args: Sequence[str] = (),
        address: str = "127.0.0.1",
        cluster: bool = False,
    ) -> ControlPlane:
        """Start etcd then kube-apiserver and return once /readyz says ok.

        apiserver_args are added to kube-apiserver's command line (the benchmarks add an audit log).

        address is where the API server listens and what it advertises as the endpoint of the "kubernetes"
        Service; it must be an address of this machine. Pods reach the API server only through an address
        on their network (a node's bridge), never through loopback. cluster=True makes the control plane one
        that real nodes can join: ServiceAccount admission and NodeRestriction on, a client certificate for
        the kubelets' API, and kube-scheduler plus kube-controller-manager, started after the API server.

        workdir becomes owned by the ControlPlane and is deleted by stop(). If starting fails, the
        processes are stopped, the logs are copied to failure_logs_dir (or a fresh temporary directory)
        and the error quotes both log tails and says where the logs are.
        """
        bin_dir = find_binaries()
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="vmop-controlplane-"))
        else:
            workdir.mkdir(parents=True, exist_ok=True)
        cp = cls(bin_dir, workdir, address=address, cluster=cluster)
        cp._apiserver_args = tuple(apiserver_args)
        try:
            etcd_url = cp._start_etcd(timeout)
            cp._start_apiserver(etcd_url, timeout)
            cp.admin_kubeconfig.write_text(
                _kubeconfig(
                    cp.server,
                    cp._pki.ca_pem,
                    ADMIN_USER,
                    {
                        "client-certificate-data": _b64(cp._pki.admin_cert),
                        "client-key-data": _b64(cp._pki.admin_key),
                    },
                )
            )
            cp.admin_kubeconfig.chmod(0o600)
            if cluster:
                cp._start_controllers(timeout)
        except BaseException as exc:
            kept = cp.stop(keep_logs=True, logs_dest=failure_logs_dir)
            if isinstance(exc, ControlPlaneError):
                raise ControlPlaneError(f"{exc}\nfull logs kept in {kept}") from exc
            raise
        return cp

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(keep_logs=exc is not None)

    def _launch(
        self,
        name: str,
        port_count: int,
        argv_for: Callable[[list[int]], list[str]],
        ready: Callable[[list[int]], bool],
        timeout: float,
    ) -> list[int]:
        """Start a server on fresh ports, retrying once if it lost the race for a port it was given."""
        for _ in range(2):
            ports = free_ports(port_count)
            try:
                self._run(name, argv_for(ports), functools.partial(ready, ports), timeout)
                return ports
            except _PortTaken:
                pass
        raise ControlPlaneError(
            f"{name} lost the race for a free port twice in a row:\n{tail_file(self.log_dir / f'{name}.log')}"
        )

    def _run(self, name: str, argv: list[str], probe: Callable[[], bool], timeout: float) -> None:
        """Start one server with a fixed command line and wait until probe says it is ready.

        Separate from the choice of ports so that a restart can reuse the exact command line, ports included;
        raises _PortTaken, with the server stopped, if another process holds one of its ports.
        """
        server = _Server(name, argv, self.log_dir / f"{name}.log")
        self._servers[name] = server
        try:
            self._wait_ready(server, probe, timeout)
        except _PortTaken:
            server.stop()
            raise

    def _wait_ready(self, server: _Server, probe: Callable[[], bool], timeout: float) -> None:
        def ready_or_dead() -> bool:
            if server.exited():
                log = server.log_path.read_text(errors="replace")
                if "address already in use" in log.rsplit("\n=== ", 1)[-1]:
                    raise _PortTaken
                raise ControlPlaneError(
                    f"{server.name} exited with {server.proc.returncode} while starting\n{self._log_tails()}"
                )
            return probe()

        try:
            wait_until(
                ready_or_dead,
                timeout=timeout,
                interval=0.2,
                message=lambda: f"{server.name} did not become ready\n{self._log_tails()}",
            )
        except WaitTimeout as exc:
            raise ControlPlaneError(str(exc)) from None

    def _log_tails(self) -> str:
        names = dict.fromkeys(("etcd", _APISERVER, *self._servers))
        return "\n".join(
            f"--- last lines of {name}.log ---\n{tail_file(self.log_dir / f'{name}.log')}" for name in names
        )

    def _start_etcd(self, timeout: float) -> str:
        data_dir = self.workdir / "etcd-data"

        def argv(ports: list[int]) -> list[str]:
            client, peer = (f"http://127.0.0.1:{p}" for p in ports)
            # A failed first attempt may have initialised the data dir with the peer URL it lost.
            shutil.rmtree(data_dir, ignore_errors=True)
            return [
                str(self.bin_dir / "etcd"),
                f"--data-dir={data_dir}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                # The data is thrown away at stop(); durability would only cost fsync latency per write.
                "--unsafe-no-fsync",
            ]

        def healthy(ports: list[int]) -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/health", timeout=2) as resp:
                    return bool(json.load(resp).get("health") == "true")
            except (OSError, ValueError):
                return False

        ports = self._launch("etcd", 2, argv, healthy, timeout)
        return f"http://127.0.0.1:{ports[0]}"

    def _start_apiserver(self, etcd_url: str, timeout: float) -> None:
        pki = self._pki

        def argv(ports: list[int]) -> list[str]:
            return [
                str(self.bin_dir / "kube-apiserver"),
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={ports[0]}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert_file}",
                f"--tls-private-key-file={pki.serving_key_file}",
                f"--client-ca-file={pki.ca_file}",
                f"--etcd-servers={etcd_url}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.sa_pub_file}",
                f"--service-account-signing-key-file={pki.sa_key_file}",
                "--authorization-mode=Node,RBAC",
                # Lets privileged DaemonSets (the node agent) pass server-side dry-run and creation.
                "--allow-privileged=true",
                *(self._cluster_apiserver_args() if self.cluster else self._bare_apiserver_args()),
                *self._apiserver_args,
            ]

        host = f"[{self.address}]" if ":" in self.address else self.address
        ports = self._launch(
            _APISERVER, 1, argv, lambda ports: self._apiserver_ready(f"https://{host}:{ports[0]}"), timeout
        )
        self.server = f"https://{host}:{ports[0]}"

    @staticmethod
    def _bare_apiserver_args() -> list[str]:
        # As envtest does: no controller creates the "default" ServiceAccount in new namespaces,
        # so this plugin would reject every Pod.
        return ["--disable-admission-plugins=ServiceAccount"]

    def _cluster_apiserver_args(self) -> list[str]:
        """What a cluster with kubelets needs: NodeRestriction limits each kubelet (an identity made by
        node_kubeconfig) to its own Node and Pods, as the Node authorizer above does for reads; InternalIP,
        since the node names are no DNS names here; and the credentials kubelets accept for logs and exec."""
        cert, key = self._pki.client("kube-apiserver-kubelet-client", [])
        cert_file = self._pki._write("kubelet-client.crt", cert)
        key_file = self._pki._write("kubelet-client.key", key)
        return [
            "--enable-admission-plugins=NodeRestriction",
            "--kubelet-preferred-address-types=InternalIP",
            f"--kubelet-client-certificate={cert_file}",
            f"--kubelet-client-key={key_file}",
        ]

    def _start_controllers(self, timeout: float) -> None:
        """Scheduler, then controller-manager, each on a fresh loopback port and ready once /healthz is ok."""
        state = self.workdir / "controllers"
        self._launch(
            controllers.SCHEDULER,
            1,
            lambda ports: controllers.scheduler_argv(self.bin_dir, self.admin_kubeconfig, ports[0], state),
            lambda ports: controllers.healthy(ports[0]),
            timeout,
        )
        self._launch(
            controllers.CONTROLLER_MANAGER,
            1,
            lambda ports: controllers.controller_manager_argv(
                self.bin_dir, self.admin_kubeconfig, ports[0], state, self._pki.ca_file
            ),
            lambda ports: controllers.healthy(ports[0]),
            timeout,
        )

    def _apiserver_ready(self, server: str) -> bool:
        try:
            with urllib.request.urlopen(f"{server}/readyz", timeout=2, context=self._admin_tls) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    @functools.cached_property
    def _admin_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self._pki.ca_file))
        ctx.load_cert_chain(str(self._pki.admin_cert_file), str(self._pki.admin_key_file))
        return ctx

    # ---- faults for tests: the apiserver gone, back, or silent

    def _apiserver(self) -> _Server:
        if self._stopped or _APISERVER not in self._servers:
            raise ControlPlaneError("the control plane is not running")
        return self._servers[_APISERVER]

    @property
    def pids(self) -> dict[str, int]:
        """The running servers' PIDs by name (etcd, kube-apiserver, ...): for the bench's CPU accounting."""
        return {name: server.proc.pid for name, server in self._servers.items() if not server.exited()}

    @property
    def apiserver_running(self) -> bool:
        return not self._apiserver().exited()

    def stop_apiserver(self, timeout: float = 20) -> None:
        """Stop kube-apiserver alone (SIGTERM by PID, SIGKILL after timeout); etcd and its data stay.

        Clients then get "connection refused" on the unchanged URL until start_apiserver(). A frozen
        apiserver is thawed first, since a stopped process holds SIGTERM until it is continued.
        """
        server = self._apiserver()
        self.thaw_apiserver()
        server.stop(timeout=timeout)

    def start_apiserver(self, timeout: float = 60) -> None:
        """Start kube-apiserver again with the same command line, so on the same address and port, and return
        once /readyz is ok: every kubeconfig and client made before the stop works again, with all objects
        still there (they live in etcd).

        Must be called from a thread that outlives the bed, like start() (see _die_with_parent). Fails if
        another process took the port meanwhile, as the point of a restart is that clients need no change.
        """
        previous = self._apiserver()
        if not previous.exited():
            raise ControlPlaneError(f"kube-apiserver (pid {previous.proc.pid}) is running; stop_apiserver() first")
        try:
            self._run(_APISERVER, previous.argv, functools.partial(self._apiserver_ready, self.server), timeout)
        except _PortTaken:
            raise ControlPlaneError(
                f"another process took the port of {self.server} while kube-apiserver was stopped"
            ) from None

    def freeze_apiserver(self, timeout: float = 10) -> None:
        """SIGSTOP kube-apiserver: a black-holed API server. TCP connections are still accepted (by the kernel,
        up to the listen backlog) but nothing answers, so only clients with timeouts notice. Returns once every
        thread of the process is stopped. thaw_apiserver() undoes it; stop() and stop_apiserver() thaw first.
        """
        server = self._apiserver()
        if server.exited():
            raise ControlPlaneError("kube-apiserver is stopped; a stopped server cannot be frozen")
        server.proc.send_signal(signal.SIGSTOP)
        self._frozen = True
        pid = server.proc.pid
        try:
            wait_until(
                lambda: _all_threads_stopped(pid),
                timeout=timeout,
                message=f"kube-apiserver (pid {pid}) did not stop on SIGSTOP",
            )
        except WaitTimeout as exc:
            raise ControlPlaneError(str(exc)) from None

    def thaw_apiserver(self) -> None:
        """SIGCONT a frozen kube-apiserver; it then answers the requests that queued up meanwhile.

        A no-op when it is not frozen, so that clean-up code may call it unconditionally.
        """
        if not self._frozen:
            return
        self._frozen = False
        server = self._servers[_APISERVER]
        server.proc.send_signal(signal.SIGCONT)

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the kubectl built with the apiserver, never the machine's, so client and server versions match.

        The discovery cache lives in the work dir so that parallel beds on this machine cannot read each
        other's (stale) API lists from ~/.kube/cache.
        """
        argv = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={kubeconfig or self.admin_kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check and proc.returncode != 0:
            raise KubectlError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def api_client(self, kubeconfig: Path | None = None) -> kubernetes.client.ApiClient:
        """A new client each call, so that tests never share connection pools or credentials by accident."""
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]  # the loader is unannotated
            config_file=str(kubeconfig or self.admin_kubeconfig),
            client_configuration=configuration,
            persist_config=False,
        )
        return kubernetes.client.ApiClient(configuration)

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, node: str | None = None, expiration_seconds: int = 3600
    ) -> Path:
        """A kubeconfig carrying only a bound token of that ServiceAccount (no client certificate).

        A process run with it has exactly the rights RBAC grants the ServiceAccount, which is how the
        operator runs in a cluster; the token dies with the ServiceAccount or after expiration_seconds.
        With node, the token is bound to that Node (made here if missing: no kubelet registers nodes on
        this bed), so the API server adds the node's name to the user it authenticates, as it does for the
        token the kubelet mounts into a Pod on that node; admission policies can then tell nodes apart.
        """
        with self.api_client() as api:
            core = kubernetes.client.CoreV1Api(api)
            _create_if_missing(lambda: core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=namespace))))
            _create_if_missing(
                lambda: core.create_namespaced_service_account(
                    namespace, V1ServiceAccount(metadata=V1ObjectMeta(name=name))
                )
            )
            bound_to = None
            if node is not None:
                _create_if_missing(lambda: core.create_node(V1Node(metadata=V1ObjectMeta(name=node))))
                # The uid too, so that the token dies with this Node object rather than passing to a namesake.
                node_meta = core.read_node(node).metadata
                if node_meta is None or not node_meta.uid:
                    raise ControlPlaneError(f"Node {node} was read back without a uid")
                bound_to = V1BoundObjectReference(api_version="v1", kind="Node", name=node, uid=node_meta.uid)
            # Empty audiences: the apiserver fills in its own (the issuer), which it then accepts.
            status = core.create_namespaced_service_account_token(
                name,
                namespace,
                AuthenticationV1TokenRequest(
                    spec=V1TokenRequestSpec(
                        audiences=[], expiration_seconds=expiration_seconds, bound_object_ref=bound_to
                    )
                ),
            ).status
        if status is None or not status.token:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
        user = f"system:serviceaccount:{namespace}:{name}"
        stem = f"sa-{namespace}-{name}" if node is None else f"sa-{namespace}-{name}-node-{node}"
        path = self._kubeconfig_dir / f"{stem}.kubeconfig"
        path.write_text(_kubeconfig(self.server, self._pki.ca_pem, user, {"token": status.token}))
        path.chmod(0o600)
        return path

    @property
    def ca_file(self) -> Path:
        """The CA that signed every certificate of the bed: what kubelets trust for the API server's client."""
        return self._pki.ca_file

    def user_kubeconfig(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig with a client certificate for user in groups, which RBAC and the Node authorizer
        treat as any such identity of a real cluster (kube-proxy's system:kube-proxy, for instance)."""
        cert, key = self._pki.client(user, groups)
        path = self._kubeconfig_dir / f"user-{user.replace(':', '-')}.kubeconfig"
        path.write_text(
            _kubeconfig(
                self.server,
                self._pki.ca_pem,
                user,
                {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)},
            )
        )
        path.chmod(0o600)
        return path

    def node_kubeconfig(self, node: str) -> Path:
        """A kubelet's identity for node: the Node authorizer and NodeRestriction confine it to that node."""
        return self.user_kubeconfig(f"system:node:{node}", ["system:nodes"])

    def stop(self, keep_logs: bool = False, logs_dest: Path | None = None) -> Path | None:
        """Stop the servers in reverse start order: the controllers, then kube-apiserver, then etcd (the
        apiserver before etcd, so it does not log a storm of etcd errors).

        The work dir, etcd data included, is deleted. With keep_logs the logs are first copied to logs_dest
        (or a new temporary directory), whose path is printed and returned. Safe to call twice.
        """
        if self._stopped:
            return None
        self.thaw_apiserver()
        self._stopped = True
        for server in reversed(self._servers.values()):
            # With a node's clients connected, kube-apiserver stops listening at once on SIGTERM but then
            # does not exit for a minute or more (seen: over 40 s), waiting on its clients; everything it
            # holds is thrown away with the work dir, so it gets SIGKILL after a few seconds instead.
            server.stop(timeout=5 if self.cluster and server.name == _APISERVER else 20)
        kept: Path | None = None
        if keep_logs:
            kept = logs_dest or Path(tempfile.mkdtemp(prefix="vmop-controlplane-logs-"))
            shutil.copytree(self.log_dir, kept, dirs_exist_ok=True)
            print(f"control plane logs kept in {kept}", file=sys.stderr)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return kept


def _create_if_missing(create: Callable[[], Any]) -> None:
    try:
        create()
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise


def main() -> None:
    """Start a bed for a person and keep it until Ctrl-C or SIGTERM."""
    cp = ControlPlane.start()
    try:
        print(f"server:     {cp.server}")
        print(f"kubeconfig: {cp.admin_kubeconfig}")
        print(f"kubectl:    {cp.bin_dir / 'kubectl'}")
        print(f"logs:       {cp.log_dir}")
        print(f"try:        export KUBECONFIG={cp.admin_kubeconfig}; {cp.bin_dir / 'kubectl'} get ns")
        print(f"stop:       Ctrl-C, or kill {os.getpid()} (everything, work dir included, is removed)")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    finally:
        cp.stop()


if __name__ == "__main__":
    main()
