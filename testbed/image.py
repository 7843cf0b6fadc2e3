"""The operator's image, built from the repo's Dockerfile by a real OCI builder (buildah), for the bed's containerd.

No registry is reachable here, so the Dockerfile's base, debian:bookworm-slim, is made locally: mmdebstrap
installs a minbase bookworm from this machine's apt sources, slimmed the way Debian's official image is
(no docs, man pages or locales; apt configured to keep no package cache), and it is imported under the name
the Dockerfile pulls. Both builds happen in a buildah storage of the bed's own under the cache directory:
the machine's /var/lib/containers and /etc/cni are left alone, and no registry is asked for anything.

The results are cached under ~/.cache/vmop/image (or $VMOP_CACHE/image): the base's root file system keyed
by the suite and the inputs that make it, the image as an OCI archive keyed by the content of everything the
Dockerfile reads. The base is not reproducible bit for bit (the mirror moves on), which only matters on a
machine with a cold cache: within one cache, an unchanged key always means the same image.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from testbed.processes import tail_file

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("VMOP_CACHE", Path.home() / ".cache" / "vmop")) / "image"
SUITE = "bookworm"
# The name the Dockerfile's default BASE_IMAGE resolves to; the build names it explicitly all the same, so
# that the build argument is what the tests exercise.
BASE_NAME = "docker.io/library/debian:bookworm-slim"
# The machine's own apt sources: the mirror that is reachable from here, copied into the base as its sources.
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
# The build's pip needs this machine's extra CAs when HTTPS goes through an intercepting proxy; they are
# bind-mounted for the RUN steps only (ca-certificates, installed in the build stage alone, picks them up),
# so they never reach the image.
EXTRA_CAS = Path("/usr/local/share/ca-certificates")
IMAGE_REPOSITORY = "localhost/vmop"
# What `docker build .` sends: the Dockerfile and what .dockerignore lets through.
IMAGE_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml")
IMAGE_SOURCE_DIRS = ("controller",)

# Debian's official slim images, made by debuerreotype: dpkg skips documentation, and apt keeps neither the
# downloaded packages nor its binary caches, so that `apt-get install` in a Dockerfile adds only the packages.
_DPKG_SLIM = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/lintian/overrides/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/man/*",
]
_APT_CLEAN = "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"
_APT_SLIM = {
    "docker-clean": (
        f'DPkg::Post-Invoke {{ "{_APT_CLEAN}"; }};\n'
        f'APT::Update::Post-Invoke {{ "{_APT_CLEAN}"; }};\n'
        'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
    ),
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
_KEEP = 3
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageBuildError(RuntimeError):
    """The base or the image could not be built; the message quotes the end of the log and says where it is."""


@dataclass(frozen=True)
class OperatorImage:
    name: str  # the full reference containerd will know it by, e.g. "localhost/vmop:<12-hex content hash>"
    archive: Path  # OCI archive importable with `ctr -n k8s.io images import <archive>`
    size_bytes: int  # the image's unpacked size (sum of layer sizes, uncompressed), for the README


def operator_image() -> OperatorImage:
    """The image built from the Dockerfile at the repo's current content: from the cache, or built now.

    A cold cache costs a couple of minutes (mmdebstrap, then the build, both downloading packages); a change
    to the Dockerfile, pyproject.toml or controller/ costs about one.
    """
    base_key = _base_key()
    image_key = _image_key(base_key)
    cached = _cached(image_key)
    if cached is not None:
        return cached
    with _locked():
        # Another run may have built it while this one waited for the lock.
        cached = _cached(image_key)
        if cached is not None:
            return cached
        _ensure_base(base_key)
        image = _build(image_key)
        _prune()
        return image


RUNC_ROOT_FLAG = f"--runtime-flag=root={CACHE_DIR / 'runc'}"


def buildah(*args: str, log: IO[bytes] | None = None, timeout: float = 1800) -> str:
    """Run buildah on the bed's private storage and return its stdout; raise ImageBuildError if it fails.

    With log, the output goes there instead (for builds, whose output is long) and "" is returned.
    """
    argv = [
        "buildah",
        f"--root={CACHE_DIR / 'storage'}",
        f"--runroot={CACHE_DIR / 'runroot'}",
        "--storage-driver=overlay",
        *args,
    ]
    env = {
        **os.environ,
        # buildah stages the layers of an archive in TMPDIR (/var/tmp otherwise); keep those in the cache too.
        "TMPDIR": str(_dir("tmp")),
        # Any buildah command that may run something makes a lock file in the CNI configuration directory,
        # /etc/cni/net.d unless told otherwise, and only this file can tell all of them.
        "CONTAINERS_CONF": str(_containers_conf()),
    }
    if log is not None:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise ImageBuildError(
                f"buildah {args[0]} exited {proc.returncode}; {log.name} ends with:\n{tail_file(Path(log.name))}"
            )
        return ""
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if result.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr.strip()}")
    return result.stdout


def _containers_conf() -> Path:
    path = _dir(".") / "containers.conf"
    text = f'[network]\nnetwork_config_dir = "{_dir("cni")}"\n'
    if not path.is_file() or path.read_text() != text:
        partial = path.with_suffix(f".tmp.{os.getpid()}")
        partial.write_text(text)
        partial.rename(path)
    return path


def _dir(name: str) -> Path:
    path = CACHE_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One build at a time per cache: concurrent runs share the storage and would race on the base's tag."""
    with (_dir(".") / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _sha12(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:12]


def _base_key() -> str:
    """This module says how the base is made, the sources where from; the suite is in the key for people."""
    return f"{SUITE}-{_sha12(Path(__file__).read_bytes(), APT_SOURCES.read_bytes())}"


def _image_key(base_key: str) -> str:
    parts = [base_key.encode()]
    for name in IMAGE_INPUTS:
        parts += [name.encode(), (REPO_ROOT / name).read_bytes()]
    for directory in IMAGE_SOURCE_DIRS:
        for path in sorted((REPO_ROOT / directory).rglob("*")):
            # As .dockerignore: bytecode is local state, not source.
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                parts += [str(path.relative_to(REPO_ROOT)).encode(), path.read_bytes()]
    return _sha12(*parts)


def _archive(image_key: str) -> Path:
    return CACHE_DIR / f"vmop-{image_key}.oci.tar"


def _metadata(image_key: str) -> Path:
    """Written last, so that its presence means the archive next to it is complete."""
    return CACHE_DIR / f"vmop-{image_key}.json"


def _cached(image_key: str) -> OperatorImage | None:
    archive, metadata = _archive(image_key), _metadata(image_key)
    if not (metadata.is_file() and archive.is_file()):
        return None
    os.utime(metadata)  # in use: see _prune
    fields = json.loads(metadata.read_text())
    return OperatorImage(name=fields["name"], archive=archive, size_bytes=fields["size_bytes"])


def _log(name: str) -> IO[bytes]:
    return (_dir("logs") / name).open("wb")


def _ensure_base(base_key: str) -> None:
    """Make the base's root file system if the cache lacks it, and tag it as the Dockerfile's base."""
    rootfs = _dir("base") / f"{base_key}.tar"
    keyed = f"localhost/vmop-base:{base_key}"
    if rootfs.is_file():
        os.utime(rootfs)  # in use: see _prune
    else:
        _mmdebstrap(rootfs, base_key)
    if not buildah("images", "--quiet", "--filter", f"reference={keyed}").strip():
        with _log(f"base-{base_key}-import.log") as log:
            container = buildah("from", "--pull=never", "scratch").strip()
            try:
                buildah("add", container, str(rootfs), "/", log=log)
                # As the official image: PATH set, bash by default.
                buildah("config", "--env", f"PATH={_PATH}", "--cmd", "bash", container, log=log)
                buildah("commit", "--rm", container, keyed, log=log)
            except ImageBuildError as error:
                with contextlib.suppress(ImageBuildError):
                    buildah("rm", container)
                raise ImageBuildError(f"importing the base {rootfs}: {error}") from None
    buildah("tag", keyed, BASE_NAME)


def _mmdebstrap(rootfs: Path, base_key: str) -> None:
    with tempfile.TemporaryDirectory(dir=_dir("tmp")) as tmp:
        conf = []
        for name, text in _APT_SLIM.items():
            (Path(tmp) / name).write_text(text)
            conf.append(str(Path(tmp) / name))
        partial = Path(tmp) / "rootfs.tar"
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            "--format=tar",
            # /bin, /lib... as symlinks into /usr, as debootstrap and the official image make them, rather
            # than through the usrmerge package, which would pull Perl into the image.
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            *(f"--dpkgopt={option}" for option in _DPKG_SLIM),
            f"--customize-hook=copy-in {' '.join(conf)} /etc/apt/apt.conf.d",
            # mmdebstrap's own clean-up runs apt-get clean, which leaves the caches that apt is now told
            # not to have; 70 MB that the official image lacks.
            '--customize-hook=rm -f "$1"/var/cache/apt/*.bin',
            SUITE,
            str(partial),
            str(APT_SOURCES),
        ]
        log_path = _dir("logs") / f"base-{base_key}.log"
        with log_path.open("wb") as log:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=1800, check=False)
        if proc.returncode != 0:
            raise ImageBuildError(
                f"mmdebstrap exited {proc.returncode}; its log {log_path} ends with:\n{tail_file(log_path)}"
            )
        partial.rename(rootfs)


def _build(image_key: str) -> OperatorImage:
    """Build as `docker build` would, export to an OCI archive, and publish archive then metadata by rename."""
    name = f"{IMAGE_REPOSITORY}:{image_key}"
    with _log(f"vmop-{image_key}.log") as log, tempfile.TemporaryDirectory(dir=_dir("tmp")) as tmp:
        partial = Path(tmp) / "image.oci.tar"
        volumes = [f"--volume={EXTRA_CAS}:{EXTRA_CAS}:ro"] if EXTRA_CAS.is_dir() else []
        try:
            buildah(
                "bud",
                # The base exists only in this storage; no registry is asked about it.
                "--pull=never",
                f"--build-arg=BASE_IMAGE={BASE_NAME}",
                # RUN steps download packages: with the host's network no CNI bridge, iptables rules or
                # /var/lib/cni state are made on this shared machine.
                "--network=host",
                # Spelled out, as BUILDAH_ISOLATION, BUILDAH_FORMAT or BUILDAH_LAYERS in the caller's
                # environment would change them.
                "--isolation=oci",
                "--format=oci",
                # The storage keeps only bases: each image lives in its archive, so nothing piles up there.
                "--layers=false",
                "--force-rm",
                # runc keeps its state in /run/runc unless told: in the cache, like everything of the bed's.
                RUNC_ROOT_FLAG,
                *volumes,
                f"--tag={name}",
                f"--file={REPO_ROOT / 'Dockerfile'}",
                str(REPO_ROOT),
                log=log,
            )
            buildah("push", "--quiet", name, f"oci-archive:{partial}:{name}", log=log)
        except ImageBuildError as error:
            raise ImageBuildError(f"building {name}: {error}") from None
        finally:
            with contextlib.suppress(ImageBuildError):
                buildah("rmi", name)
        size = unpacked_size(partial)
        partial.rename(_archive(image_key))
    metadata = _metadata(image_key).with_suffix(".json.tmp")
    metadata.write_text(json.dumps({"name": name, "size_bytes": size}))
    metadata.rename(_metadata(image_key))
    return OperatorImage(name=name, archive=_archive(image_key), size_bytes=size)


def _prune() -> None:
    """Drop all but the most recently used few archives and bases, each ~100 MB, as every change to controller/
    makes a new archive. A few rather than one: other checkouts on this machine may share the cache."""
    for old in _least_recent(CACHE_DIR.glob("vmop-*.json")):
        old.unlink(missing_ok=True)
        old.with_suffix(".oci.tar").unlink(missing_ok=True)
        (_dir("logs") / f"{old.stem}.log").unlink(missing_ok=True)
    for old in _least_recent(_dir("base").glob("*.tar")):
        old.unlink(missing_ok=True)
        for log in (f"base-{old.stem}.log", f"base-{old.stem}-import.log"):
            (_dir("logs") / log).unlink(missing_ok=True)
        with contextlib.suppress(ImageBuildError):  # never imported, or already gone
            buildah("rmi", f"localhost/vmop-base:{old.stem}")


def _least_recent(paths: Iterable[Path]) -> list[Path]:
    return sorted(paths, key=lambda path: path.stat().st_mtime, reverse=True)[_KEEP:]


def oci_manifest(archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The image's manifest and config from an OCI archive holding one image."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> IO[bytes]:
            member = tar.extractfile(f"blobs/{digest.replace(':', '/')}")
            if member is None:
                raise ImageBuildError(f"{archive} lacks blob {digest}")
            return member

        index_file = tar.extractfile("index.json")
        if index_file is None:
            raise ImageBuildError(f"{archive} has no index.json")
        (descriptor,) = json.load(index_file)["manifests"]
        manifest: dict[str, Any] = json.load(blob(descriptor["digest"]))
        config: dict[str, Any] = json.load(blob(manifest["config"]["digest"]))
        return manifest, config


def unpacked_size(archive: Path) -> int:
    """The sum of the layers' uncompressed tar sizes, which is what the image occupies once unpacked."""
    manifest, _ = oci_manifest(archive)
    total = 0
    with tarfile.open(archive) as tar:
        for layer in manifest["layers"]:
            member = tar.extractfile(f"blobs/{layer['digest'].replace(':', '/')}")
            if member is None:
                raise ImageBuildError(f"{archive} lacks layer {layer['digest']}")
            stream: gzip.GzipFile | IO[bytes] = (
                gzip.GzipFile(fileobj=member) if layer["mediaType"].endswith("gzip") else member
            )
            while chunk := stream.read(1 << 20):
                total += len(chunk)
    return total


def main() -> None:
    image = operator_image()
    print(f"name:    {image.name}")
    print(f"archive: {image.archive}")
    print(f"size:    {image.size_bytes / 1e6:.0f} MB unpacked")
    print(f"import:  ctr -n k8s.io images import {image.archive}")


if __name__ == "__main__":
    main()
