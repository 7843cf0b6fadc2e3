"""The figures of `make bench`, drawn from the results JSON: distributions where a table of percentiles hides
their shape (two clusters 200 ms apart read as one p99), and convergence as it happened over time.

Each figure is an empirical CDF: for every VM, the seconds past its deadline (x) against the share of VMs
at or below it (y), so that the deadline is a vertical line and every VM is one step.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_STYLES = {
    ("SIGTERM", 0): {"color": "tab:blue", "linestyle": "-"},
    ("STOPPED", 0): {"color": "tab:blue", "linestyle": ":"},
    ("SIGTERM", 1): {"color": "tab:red", "linestyle": "-"},
    ("STOPPED", 1): {"color": "tab:red", "linestyle": ":"},
}


def _ecdf(axes: Axes, values: Sequence[float], label: str, style: dict[str, str]) -> None:
    if not values:
        return
    axes.ecdf(values, label=label, linewidth=1.5, color=style["color"], linestyle=style["linestyle"])
    if len(values) < 5:  # a step or two is easy to miss: mark each VM
        axes.plot(sorted(values), [(i + 1) / len(values) for i in range(len(values))], "o", color=style["color"])


def _compare(
    axes: Axes, title: str, series: Sequence[tuple[str, dict[str, Any] | None]], note: str | None = None
) -> None:
    """Two runs (e.g. tuned and stock libvirtd) of one N: SIGTERM solid, STOPPED dotted."""
    for index, (name, run) in enumerate(series):
        samples = (run or {}).get("samples") or []
        for what in ("SIGTERM", "STOPPED"):
            values = [float(sample[what.lower()]) for sample in samples]
            _ecdf(axes, values, f"{name}: {what}", _STYLES[what, index])
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_title(title, fontsize=9)
    axes.set_xlabel("seconds past the deadline", fontsize=8)
    axes.set_ylim(0, 1.02)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    if note:
        axes.text(0.98, 0.04, note, transform=axes.transAxes, ha="right", fontsize=7)


def _save(figure: Figure, title: str, path: Path, footer: str) -> Path:
    """Titled, and footed with the machine and the libvirt it ran on: a figure is often read without its
    table."""
    figure.suptitle(title, fontsize=10)
    figure.text(0.5, 0.01, footer, ha="center", va="bottom", fontsize=6.5, color="dimgray", wrap=True)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _save_row(figure: Figure, row: Sequence[Axes], title: str, path: Path, footer: str) -> Path:
    """A row of ECDF panels sharing their y axis: labelled once, with the legend in the last."""
    row[0].set_ylabel("share of VMs", fontsize=8)
    row[-1].legend(fontsize=7, loc="center right")
    return _save(figure, title, path, footer)


def _limits(limits: dict[str, Any] | None) -> str:
    if not limits:
        return "libvirtd limits not recorded"
    return f"max_workers {limits.get('max_workers')}, max_client_requests {limits.get('max_client_requests')}"


def machine_line(results: dict[str, Any]) -> str:
    """The run and the machine, in one line: cores, memory, OS, kernel, libvirt, QEMU and how guests run."""
    m = results.get("machine") or {}
    libvirt = m.get("libvirt") or {}
    run = (results.get("run") or {}).get("started_at", "?")
    return (
        f"make bench {run}; {m.get('cores', '?')} cores ({m.get('cpu_model', '?')}), {m.get('memory_gib', '?')} GiB, "
        f"{m.get('os', '?')}, kernel {m.get('kernel', '?')}; libvirt {libvirt.get('daemon', '?')}, "
        f"QEMU {libvirt.get('qemu_via_libvirt', '?')}, domain type {m.get('guest_domain_type', '?')}; "
        f"{m.get('kube_apiserver', '?')}"
    )


def deadline_figure(deadline: dict[str, Any], settings: dict[str, Any], path: Path, machine: str) -> Path | None:
    """One panel per N: the operator's SIGTERM and libvirt's STOPPED, tuned libvirtd beside stock."""
    tuned, stock = deadline.get("tuned") or {}, deadline.get("stock") or {}
    sizes = sorted({n for n in (*tuned, *stock) if n.isdigit()}, key=int)
    if not sizes:
        return None
    alone = [tuned.get("libvirt_alone"), stock.get("libvirt_alone")]
    panes = len(sizes) + (1 if any(alone) else 0)
    figure, panels = plt.subplots(1, panes, figsize=(3.2 * panes, 3.0), sharey=True, squeeze=False)
    for axes, n in zip(panels[0], sizes, strict=False):
        _compare(axes, f"vmop, N = {n} stopped at once", [("tuned", tuned.get(n)), ("stock", stock.get(n))])
    if any(alone):
        n_alone = next(run["n"] for run in alone if run)
        _compare(
            panels[0][-1],
            f"libvirt alone, {n_alone} destroys at one instant",
            [("tuned", alone[0]), ("stock", alone[1])],
        )
    limits = f"libvirtd tuned: {_limits(tuned.get('libvirtd'))}; stock: {_limits(stock.get('libvirtd'))}"
    return _save_row(
        figure,
        panels[0],
        "vmop's forced stops against their deadline: tuned vs stock libvirtd limits",
        path,
        f"{machine}\n{limits}; the operator's --libvirt-workers {settings.get('operator_libvirt_workers', '?')}; "
        f"{settings.get('guest', '?')} guests, grace {settings.get('grace', '?')} s, "
        f"retry {settings.get('retry_interval', '?')} s",
    )


def nova_figure(nova: dict[str, Any], path: Path, machine: str) -> Path | None:
    """Per N: Nova's loop of one-second sleeps beside vmop's deadline, same guests, same grace."""
    baseline, ours = nova.get("nova") or {}, nova.get("vmop") or {}
    sizes = sorted({n for n in (*baseline, *ours) if n.isdigit()}, key=int)
    if not sizes:
        return None
    settings = nova.get("settings") or {}
    grace = settings.get("grace")
    figure, panels = plt.subplots(1, len(sizes), figsize=(4.0 * len(sizes), 3.0), sharey=True, squeeze=False)
    for axes, n in zip(panels[0], sizes, strict=True):
        _compare(
            axes,
            f"N = {n}, {grace} s grace",
            [("vmop", ours.get(n)), ("Nova _clean_shutdown", baseline.get(n))],
            note="50% of the grace would be x = " + (f"{grace / 2:.0f} s" if grace else "?"),
        )
    return _save_row(
        figure,
        panels[0],
        "Nova's counted sleeps vs vmop's deadline: SIGTERM and STOPPED",
        path,
        f"{machine}\nlibvirtd {_limits(settings.get('libvirtd'))}; firmware-only guests, both sides on the same "
        "libvirtd",
    )


def scale_figure(timelines: dict[str, Sequence[float]], path: Path, machine: str) -> Path | None:
    """VMs reading Running in the API over time, from the first create: one line per run."""
    drawn = {label: sorted(times) for label, times in timelines.items() if times}
    if not drawn:
        return None
    figure, axes = plt.subplots(figsize=(8.0, 3.6))
    for label, times in drawn.items():
        axes.step(times, range(1, len(times) + 1), where="post", label=label, linewidth=1.5)
    axes.set_xlabel("seconds since the first create", fontsize=8)
    axes.set_ylabel("VMs Running (watch)", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _save(
        figure,
        "Convergence at scale (libvirt's test driver)",
        path,
        f"{machine}\nlibvirt's test:///default driver inside the operator (no libvirtd); one operator, one node",
    )


def _timelines(results: dict[str, Any]) -> dict[str, Sequence[float]]:
    """Every run of the scale section that recorded when each VM read Running."""
    found: dict[str, Sequence[float]] = {}
    scale = results.get("scale") or {}
    candidates = [scale, *(v for v in scale.values() if isinstance(v, dict))]
    for run in candidates:
        timeline = run.get("timeline")
        if timeline and run.get("vms"):
            found[f"{run['vms']} VMs created at once"] = timeline
    return found


def draw(results: dict[str, Any], directory: Path) -> list[Path]:
    """Every figure the results allow, as PNG files in `directory`; a section not run draws nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    machine = machine_line(results)
    made = [
        deadline_figure(
            results.get("deadline_overshoot") or {},
            results.get("deadline_overshoot_settings") or {},
            directory / "deadline.png",
            machine,
        ),
        nova_figure(results.get("nova") or {}, directory / "nova.png", machine),
        scale_figure(_timelines(results), directory / "scale.png", machine),
    ]
    return [path for path in made if path is not None]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench.plots [results.json [directory]]`: draw again from a run's JSON, without the bed."""
    args = list(sys.argv[1:] if argv is None else argv)
    source = Path(args[0]) if args else Path(__file__).with_name("results") / "latest.json"
    directory = Path(args[1]) if len(args) > 1 else source.parent
    for path in draw(json.loads(source.read_text()), directory):
        print(path)


if __name__ == "__main__":
    main()
