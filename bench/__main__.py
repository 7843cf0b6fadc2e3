"""`make bench` (`python -m bench`): every benchmark on one fresh test bed, a table, bench/results/latest.json.

The sizes are chosen so that the whole run stays under 15 minutes on the project's 2-core machine (issue 13);
the slowest parts are the deadline section, which starts 141 QEMU guests for each libvirtd configuration,
the scale section's 3,000 VMs, the agent section, which boots 10 Linux guests and waits out libvirt's fixed
60 s once, and libvirt-guests' serial baseline, which waits the full grace period for each stubborn guest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import agent, faults, maintenance, nova, plots, report, scale, shutdown, storage, unasked
from bench.bed import Bed
from bench.libvirt_guests import libvirt_guests_baseline
from testbed.libvirthost import STOCK_LIMITS, TUNED_LIMITS
from testbed.vmop import ROOT

RESULTS = ROOT / "bench" / "results" / "latest.json"
SECTIONS = (
    "deadline",
    "nova",
    "graceful",
    "unasked",
    "parallel",
    "agent",
    "scale",
    "storage",
    "maintenance",
    "faults",
)


@dataclass(frozen=True)
class Sizes:
    deadline_n: tuple[int, ...] = (1, 10, 30, 100)
    deadline_alone: int = 30
    deadline_grace: int = 5
    deadline_retry: int = 1
    graceful_guests: int = 6
    parallel_coop: int = 2
    parallel_stubborn: int = 4
    parallel_grace: int = 5
    agent_hung: int = 4
    agent_neighbours: int = 8
    agent_neighbour_grace: int = 3
    scale_vms: int = 1000
    foreign_own: int = 10
    idle_seconds: float = 15.0
    storage_depths: tuple[int, ...] = (1, 3, 8)
    storage_cold_runs: int = 20
    storage_warm_runs: int = 200
    storage_vms: int = 200
    maintenance_groups: int = 3
    maintenance_per_group: int = 8
    maintenance_coop_per_group: int = 1
    maintenance_grace: int = 5


# For developing the bench itself: every path runs, in about two minutes.
QUICK = Sizes(
    deadline_n=(1, 3),
    deadline_alone=3,
    graceful_guests=2,
    parallel_coop=1,
    parallel_stubborn=3,
    parallel_grace=3,
    agent_hung=2,
    agent_neighbours=2,
    scale_vms=60,
    foreign_own=5,
    idle_seconds=10.0,
    storage_depths=(1, 3),
    storage_cold_runs=3,
    storage_warm_runs=20,
    storage_vms=20,
    maintenance_per_group=2,
    maintenance_coop_per_group=1,
    maintenance_grace=3,
)


def _deadline(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    results["deadline_overshoot"] = shutdown.deadline_overshoot(
        bed,
        sizes.deadline_n,
        grace=sizes.deadline_grace,
        retry=sizes.deadline_retry,
        limits=(("stock", STOCK_LIMITS), ("tuned", TUNED_LIMITS)),
        alone=sizes.deadline_alone,
    )
    results["deadline_overshoot_settings"] = {
        "grace": sizes.deadline_grace,
        "retry_interval": sizes.deadline_retry,
        "guest": "firmware-only (ignores ACPI)",
        "operator_libvirt_workers": "default (128)",
    }


def _graceful(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    results["graceful_detection"] = shutdown.graceful_detection(bed, sizes.graceful_guests)


def _parallel(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    coop, stubborn, grace = sizes.parallel_coop, sizes.parallel_stubborn, sizes.parallel_grace
    vmop = shutdown.parallel_vmop(bed, coop, stubborn, grace)
    baseline = libvirt_guests_baseline(bed, coop, stubborn, grace)
    serial, at_once = baseline["serial"], baseline["parallel"]
    results["parallel"] = {
        "n": coop + stubborn,
        "coop": coop,
        "stubborn": stubborn,
        "grace": grace,
        "vmop_total": vmop["total"],
        "vmop_left_running": vmop["left_running"],
        "vmop_total_minus_grace": round(vmop["total"] - grace, 3) if vmop["total"] else None,
        "libvirt_guests_serial_total": serial["total"],
        "libvirt_guests_serial_left_running": serial["left_running"],
        "libvirt_guests_serial_exit_code": serial["exit_code"],
        "libvirt_guests_parallel_total": at_once["total"],
        "libvirt_guests_parallel_left_running": at_once["left_running"],
        "libvirt_guests_parallel_exit_code": at_once["exit_code"],
        "libvirt_guests_parallel_degree": at_once["parallel_shutdown"],
        "ratio_serial_to_vmop": round(serial["total"] / vmop["total"], 2) if vmop["total"] else None,
        "ratio_parallel_to_vmop": round(at_once["total"] / vmop["total"], 2) if vmop["total"] else None,
    }


def _agent(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    results["agent"] = agent.agent_costs(bed, sizes.agent_hung, sizes.agent_neighbours, sizes.agent_neighbour_grace)


def _scale(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    baseline = scale.baseline(bed, sizes.foreign_own)
    results["scale"], results["idle"] = scale.scale(
        bed, sizes.scale_vms, sizes.foreign_own, baseline, idle_seconds=sizes.idle_seconds
    )


def _storage(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    results["storage"] = storage.storage_costs(
        bed, sizes.storage_depths, sizes.storage_cold_runs, sizes.storage_warm_runs, sizes.storage_vms
    )


def _maintenance(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    results["maintenance"] = maintenance.node_maintenance(
        bed,
        sizes.maintenance_groups,
        sizes.maintenance_per_group,
        sizes.maintenance_coop_per_group,
        sizes.maintenance_grace,
    )


def _nova(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    results["nova"] = nova.run(bed, quick=sizes is QUICK)


def _unasked(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    results["unasked"] = unasked.run(bed, quick=sizes is QUICK)


def _faults(bed: Bed, sizes: Sizes, results: dict[str, Any]) -> None:
    results["faults"] = faults.run(bed, quick=sizes is QUICK)


RUNNERS: dict[str, Callable[[Bed, Sizes, dict[str, Any]], None]] = {
    "deadline": _deadline,
    "nova": _nova,
    "unasked": _unasked,
    "faults": _faults,
    "graceful": _graceful,
    "parallel": _parallel,
    "agent": _agent,
    "scale": _scale,
    "storage": _storage,
    "maintenance": _maintenance,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the bench itself runs")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this section (repeatable; scale includes idle)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"JSON file (default {RESULTS.relative_to(ROOT)} for a full run, the log directory otherwise)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    sections = args.only or list(SECTIONS)
    started = datetime.now(UTC)
    log_dir = ROOT / "test-logs" / "bench" / started.strftime("%Y%m%d-%H%M%S")
    full = not args.quick and sections == list(SECTIONS)
    output: Path = args.output or (RESULTS if full else log_dir / "results.json")
    clock = time.monotonic()
    results: dict[str, Any] = {}
    failed: list[str] = []
    print(f"vmop bench: sections {', '.join(sections)}; logs in {log_dir}", flush=True)
    with Bed.running(log_dir) as bed:
        results["machine"] = report.machine(
            bed.libvirt.uri, bed.control_plane.bin_dir / "kube-apiserver", bed.libvirt.domain_type
        )
        print(f"bed up after {time.monotonic() - clock:.1f} s", flush=True)
        for section in sections:
            section_clock = time.monotonic()
            print(f"== {section}", flush=True)
            try:
                RUNNERS[section](bed, sizes, results)
            except Exception as error:
                traceback.print_exc()
                failed.append(section)
                results.setdefault("errors", {})[section] = f"{type(error).__name__}: {error}"
            print(f"   {section} took {time.monotonic() - section_clock:.1f} s", flush=True)
    results["run"] = {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - clock, 1),
        "sizes": "quick" if args.quick else "full",
        "sections": sections,
        "logs": str(log_dir),
    }
    ordered = {k: results[k] for k in ("run", "machine") if k in results} | {
        k: v for k, v in results.items() if k not in ("run", "machine")
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(ordered, indent=2) + "\n")
    figures = plots.draw(ordered, output.parent)
    print()
    print(report.table(results))
    print(f"\ntotal {results['run']['seconds']} s; results in {output}; figures {', '.join(map(str, figures))}")
    if failed:
        print(f"sections that failed (see the traceback above): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
