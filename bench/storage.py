"""Benchmark `storage`: what the storage check (controller/storage.py) costs the operator.

The operator runs StorageInspector.check on every step of every VM whose domain is not in a stop, so its
price is paid per step, and its steady state (every header cached) is what a node pays all the time. It is
measured in the bench's own process, with the real inspector and the real qemu-img on real files in an
allowed directory of its own, because nothing else (libvirt, the API server) takes part in it: inside the
operator the figures would be the same plus the noise of everything else it does.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bed import Bed, parallel
from bench.report import _first_line
from bench.stats import percentile
from controller.api import DiskFormat, DomainSpec
from controller.storage import _SETTLED_NS, StorageCheck, StorageInspector

# Virtual size of every image: a common guest disk. Only metadata is written (the images are sparse), and
# qemu-img info reads the header and tables, never the data.
_VIRTUAL_SIZE = "10G"
# Rounds of the 200-VM gather: one round is over in milliseconds, and on a shared machine one round alone
# can land on a moment when something else holds the cores.
_GATHER_ROUNDS = 5


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def _qcow2(path: Path, backing: Path | None = None) -> Path:
    """A qcow2 image; its backing file named by absolute path, with its format, as the check requires."""
    _qemu_img(
        "create", "-f", "qcow2", *(["-b", str(backing), "-F", "qcow2"] if backing else []), str(path), _VIRTUAL_SIZE
    )
    return path


def _chain(directory: Path, depth: int) -> Path:
    """A qcow2 chain of depth images (the top one and its backing files, all qcow2); returns the top one."""
    directory.mkdir()
    top: Path | None = None
    for layer in range(depth):
        top = _qcow2(directory / f"layer{layer}.qcow2", top)
    assert top is not None
    return top


def _spec(disks: Sequence[tuple[Path, str]] = (), **boot: Path) -> DomainSpec:
    return DomainSpec.model_validate(
        {
            "memoryMiB": 64,
            "disks": [{"path": str(path), "format": format_} for path, format_ in disks],
            **{field: str(path) for field, path in boot.items()},
        }
    )


def _settle(paths: Sequence[Path]) -> None:
    """Wait until every file changed longer ago than the inspector's settle time: a header it reads sooner
    is not cached (it could still change within its timestamp's tick), and the warm figures would be cold."""
    newest = max(path.stat().st_ctime_ns for path in paths)
    # The inspector compares with its read's start, strictly: a tenth of a second more, so no file is on the edge.
    time.sleep(max(0.0, (newest + _SETTLED_NS + 100_000_000 - time.time_ns()) / 1e9))


def _ms(samples: Sequence[float], *quantiles: int) -> dict[str, float]:
    """Percentiles of seconds, in milliseconds to the microsecond: a cached check takes well under a millisecond."""
    return {f"p{q}_ms": round(percentile(samples, q) * 1000, 3) for q in quantiles} | {
        "max_ms": round(max(samples) * 1000, 3)
    }


def _accepted(found: StorageCheck, layers: int) -> None:
    """Only a check that passed, and read the whole chain, is a figure for the cost of a check."""
    if found.problems or found.resolved is None:
        raise RuntimeError(f"the storage check refused the bench's own images: {found.problems}")
    chains = [len(disk.chain) for disk in found.resolved.disks]
    if sum(chains) != layers:
        raise RuntimeError(f"the storage check resolved chains of {chains} images, not {layers} in all")


async def _timed(inspector: StorageInspector, spec: DomainSpec, layers: int) -> float:
    started = time.perf_counter()
    found = await inspector.check(spec)
    elapsed = time.perf_counter() - started
    _accepted(found, layers)
    return elapsed


async def _fresh(allowed: Path, spare: DomainSpec) -> StorageInspector:
    """An inspector with nothing cached whose file thread is already running, as in an operator that has
    been up for a while and meets a new image: the thread's start is a cost of the operator's start, not of
    a cold check. spare is a spec with a raw disk (no qemu-img), checked once, untimed, to start it."""
    inspector = StorageInspector([allowed])
    _accepted(await inspector.check(spare), 1)
    return inspector


async def _cold(allowed: Path, spec: DomainSpec, depth: int, runs: int, spare: DomainSpec) -> list[float]:
    return [await _timed(await _fresh(allowed, spare), spec, depth) for _ in range(runs)]


async def _warm(inspector: StorageInspector, spec: DomainSpec, layers: int, runs: int) -> list[float]:
    """Checks of a spec whose headers the inspector holds, after one check (untimed) that reads them."""
    found = await inspector.check(spec)
    _accepted(found, layers)
    assert found.resolved is not None
    headers = {layer.path for disk in found.resolved.disks for layer in disk.chain if layer.format is DiskFormat.QCOW2}
    # A header is kept only once its file has settled: were one missing, every "warm" check would run qemu-img.
    if not headers <= {key[0] for key in inspector._headers}:
        raise RuntimeError("the headers were not cached: the warm figures would be cold ones")
    return [await _timed(inspector, spec, layers) for _ in range(runs)]


async def _gather(inspector: StorageInspector, specs: Sequence[DomainSpec], layers: int) -> float:
    """Wall time of all the specs' checks at once, as the operator's workers run them."""
    started = time.perf_counter()
    found = await asyncio.gather(*(inspector.check(spec) for spec in specs))
    elapsed = time.perf_counter() - started
    for one in found:
        _accepted(one, layers)
    return elapsed


@dataclass(frozen=True)
class _Specs:
    """The bench's images, made and settled, as the specs that name them."""

    allowed: Path
    chains: dict[int, DomainSpec]  # by depth: one qcow2 disk, the top of a chain of that many qcow2 images
    spare: DomainSpec  # one raw disk: no qemu-img
    firmware: DomainSpec  # no file at all
    linux: DomainSpec  # kernel, initrd and one raw disk
    vms: list[DomainSpec]  # each its own qcow2 overlay on one shared qcow2 base


def _make(allowed: Path, depths: Sequence[int], vms: int) -> _Specs:
    chains = {depth: _spec([(_chain(allowed / f"chain{depth}", depth), "qcow2")]) for depth in depths}
    kernel, initrd = allowed / "vmlinuz", allowed / "initrd.img"
    # The inspector stats them and never opens them, so their content is no part of the cost.
    kernel.write_bytes(b"\0" * 4096)
    initrd.write_bytes(b"\0" * 4096)
    raw = allowed / "linux.raw"
    _qemu_img("create", "-f", "raw", str(raw), _VIRTUAL_SIZE)
    base = _qcow2(allowed / "base.qcow2")
    overlays = parallel(lambda i: _qcow2(allowed / f"vm{i}.qcow2", base), range(vms))
    _settle([path for path in allowed.rglob("*") if path.is_file()])
    return _Specs(
        allowed,
        chains,
        spare=_spec([(raw, "raw")]),
        firmware=_spec(),
        linux=_spec([(raw, "raw")], kernel=kernel, initrd=initrd),
        vms=[_spec([(overlay, "qcow2")]) for overlay in overlays],
    )


async def _measure(specs: _Specs, cold_runs: int, warm_runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {"cold": {}, "warm": {}}
    for depth, spec in specs.chains.items():
        samples = await _cold(specs.allowed, spec, depth, cold_runs, specs.spare)
        results["cold"][str(depth)] = {"runs": cold_runs, "qemu_img_runs": depth, **_ms(samples, 50, 95)}
    inspector = await _fresh(specs.allowed, specs.spare)
    for depth, spec in specs.chains.items():
        samples = await _warm(inspector, spec, depth, warm_runs)
        results["warm"][str(depth)] = {"runs": warm_runs, **_ms(samples, 50, 95)}
    results["firmware"] = {"runs": warm_runs, **_ms(await _warm(inspector, specs.firmware, 0, warm_runs), 50, 95)}
    linux = await _warm(inspector, specs.linux, 1, warm_runs)
    results["linux_guest"] = {"runs": warm_runs, "files": 3, **_ms(linux, 50, 95)}

    # One inspector for all the VMs, as in the operator. Its first gather is an operator's start: no header
    # read yet (and the shared base's read by many checks at once, as none has cached it yet).
    many = StorageInspector([specs.allowed])
    cold = await _gather(many, specs.vms, 2)
    if len({key[0] for key in many._headers}) != len(specs.vms) + 1:
        raise RuntimeError("the VMs' headers were not all cached: the warm rounds would be cold ones")
    started = time.perf_counter()
    for spec in specs.vms:
        _accepted(await many.check(spec), 2)
    one_after_another = time.perf_counter() - started
    rounds = [await _gather(many, specs.vms, 2) for _ in range(_GATHER_ROUNDS)]
    vms = len(specs.vms)
    results["concurrent"] = {
        "vms": vms,
        "disk": "own qcow2 overlay on a shared qcow2 base (2 images)",
        "rounds": _GATHER_ROUNDS,
        "warm_total_ms": _ms(rounds, 50),
        "warm_mean_per_check_ms": round(percentile(rounds, 50) / vms * 1000, 3),
        "warm_one_after_another_total_ms": round(one_after_another * 1000, 3),
        "warm_one_after_another_mean_ms": round(one_after_another / vms * 1000, 3),
        "cold_total_ms": round(cold * 1000, 3),
    }
    return results


def storage_costs(bed: Bed, depths: Sequence[int], cold_runs: int, warm_runs: int, vms: int) -> dict[str, Any]:
    """The check's cost on cold and cached headers, and for many VMs at once. The images go in the bed's
    work directory (the file system the guests' images are on), in an allowed directory of their own."""
    with tempfile.TemporaryDirectory(prefix="storage-bench-", dir=bed.libvirt.workdir) as directory:
        specs = _make(Path(directory), depths, vms)
        return {"qemu_img": _first_line(["qemu-img", "--version"])} | asyncio.run(_measure(specs, cold_runs, warm_runs))
