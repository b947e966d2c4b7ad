"""What a run reports: the machine, the table, the targets of issue 6, the sweep, the CSV and the
PNG bar chart."""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ml_infer.device import cpu_supports_bf16

from .rows import TTA_PRESETS, Row
from .workloads import ENSEMBLE_SIZES

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")

# The targets of issue 6, checked on every run.
TTA_MIN_EFFICIENCY = 0.95
SEED_ALL_MIN_SPEEDUP = 1.15  # ours over the seed-style reference, digits model
ENSEMBLE_MIN_EFFICIENCY = 0.95
LOOP_MIN_FRACTION = 0.90  # evaluation loop over pure forward
FALLBACK_MIN_FRACTION = 0.97  # mixed_precision over fp32, where it falls back to fp32
TTACH_TOLERANCE = 1e-5


@dataclasses.dataclass
class Target:
    description: str
    measured: float
    threshold: float
    unit: str = ""
    at_most: bool = False

    @property
    def holds(self) -> bool:
        if not math.isfinite(self.measured):
            return False
        if self.at_most:
            return self.measured <= self.threshold
        return self.measured >= self.threshold


def cpu_flags() -> dict[str, bool]:
    """Which of the bf16-relevant CPU flags /proc/cpuinfo lists (all False where it is absent)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags_line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags_line = ""
    present = set(flags_line.partition(":")[2].split())
    return {flag: flag in present for flag in BF16_CPU_FLAGS}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_summary(device: torch.device) -> list[str]:
    flags = ", ".join(f"{flag}={'yes' if on else 'no'}" for flag, on in cpu_flags().items())
    lines = [
        f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"device {device}",
        f"CPU flags: {flags}; torch.ops.mkldnn._is_mkldnn_bf16_supported()={cpu_supports_bf16()}",
    ]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines.append(
            f"GPU: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, "
            f"bf16={torch.cuda.is_bf16_supported()}"
        )
    return lines


def check_targets(rows: list[Row], ttach_differences: dict[str, float]) -> list[Target]:
    """The targets of issue 6, from this run's rows (a missing row reads as not holding)."""
    by_name = {(row.workload, row.name): row for row in rows}
    efficiency = {key: row.efficiency for key, row in by_name.items()}
    targets: list[Target] = []

    def ratio(workload: str, name: str, reference: str) -> float:
        """Images/s of `name` over those of `reference`, each measured beside `standard`."""
        if (workload, name) not in by_name or (workload, reference) not in by_name:
            return math.nan
        return by_name[workload, name].relative_speed / by_name[workload, reference].relative_speed

    for workload in dict.fromkeys(row.workload for row in rows):
        for preset in TTA_PRESETS:
            measured = efficiency.get((workload, f"tta {preset}"), math.nan)
            targets.append(
                Target(f"{workload}: tta {preset} efficiency", measured, TTA_MIN_EFFICIENCY)
            )
        if workload == "digits_cnn":
            measured = ratio(workload, "tta seed_all", "seed-style seed_all")
            description = f"{workload}: tta seed_all / seed-style seed_all"
            targets.append(Target(description, measured, SEED_ALL_MIN_SPEEDUP, "x"))
        measured = ratio(workload, "tta d4", "ttach d4")
        targets.append(Target(f"{workload}: tta d4 / ttach d4", measured, 1.0, "x"))
        difference = ttach_differences.get(workload, math.nan)
        description = f"{workload}: max abs(tta d4 - ttach d4) probability"
        targets.append(Target(description, difference, TTACH_TOLERANCE, at_most=True))
        for members in ENSEMBLE_SIZES[1:]:
            measured = efficiency.get((workload, f"ensemble x{members}"), math.nan)
            description = f"{workload}: ensemble x{members} efficiency"
            targets.append(Target(description, measured, ENSEMBLE_MIN_EFFICIENCY))
        measured = ratio(workload, "evaluation loop", "pure forward")
        description = f"{workload}: evaluation loop / pure forward"
        targets.append(Target(description, measured, LOOP_MIN_FRACTION, "x"))
        if "fallback" in getattr(by_name.get((workload, "mixed_precision")), "note", ""):
            measured = ratio(workload, "mixed_precision", "standard")
            description = f"{workload}: mixed_precision (fp32 fallback) / fp32"
            targets.append(Target(description, measured, FALLBACK_MIN_FRACTION, "x"))
    return targets


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    return "\n".join(
        "| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines]
    )


def format_table(rows: list[Row]) -> str:
    return markdown(
        ("model", "row", "fwd/img", "images/s", "efficiency", "note"),
        [
            (
                row.workload,
                row.name,
                str(row.forwards_per_image),
                f"{row.images_per_s:,.0f}",
                f"{row.efficiency:.2f}",
                row.note,
            )
            for row in rows
        ],
    )


def format_targets(targets: list[Target]) -> str:
    lines = []
    for target in targets:
        if target.at_most:
            measured, threshold = f"{target.measured:.1e}", f"<= {target.threshold:.0e}"
        else:
            measured = f"{target.measured:.2f}{target.unit}"
            threshold = f">= {target.threshold:.2f}{target.unit}"
        lines.append((target.description, measured, threshold, "yes" if target.holds else "NO"))
    return markdown(("target", "measured", "threshold", "holds"), lines)


def format_sweep(sweeps: dict[str, dict[int, float]]) -> str:
    sizes = sorted({size for sweep in sweeps.values() for size in sweep})
    lines = []
    for name, sweep in sweeps.items():
        best = max(sweep.values())
        cells = [
            f"{sweep[size]:,.0f} ({sweep[size] / best:.2f})" if size in sweep else "-"
            for size in sizes
        ]
        lines.append((name, *cells, str(max(sweep, key=sweep.__getitem__))))
    table = markdown(("model", *(str(size) for size in sizes), "best"), lines)
    return "images/s of the engine's model alone (fraction of the best) per batch size:\n" + table


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "model",
                "row",
                "group",
                "forward_passes_per_image",
                "images",
                "images_per_s",
                "efficiency",
                "note",
                "seconds_per_round",
                "standard_seconds_per_round",
            ]
        )
        for row in rows:
            writer.writerow(
                [
                    row.workload,
                    row.name,
                    row.group,
                    row.forwards_per_image,
                    row.n_images,
                    f"{row.images_per_s:.2f}",
                    f"{row.efficiency:.4f}",
                    row.note,
                    " ".join(f"{seconds:.4f}" for seconds in row.seconds),
                    " ".join(f"{seconds:.4f}" for seconds in row.standard_seconds),
                ]
            )


def plot(rows: list[Row], path: Path) -> None:
    """Efficiency of every row, one panel per model, with the 0.95 target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(row.workload for row in rows))
    groups = list(dict.fromkeys(row.group for row in rows))
    colours = {group: plt.cm.tab10(index % 10) for index, group in enumerate(groups)}
    tallest = max(sum(row.workload == workload for row in rows) for workload in workloads)
    figure, axes = plt.subplots(
        1, len(workloads), figsize=(6.5 * len(workloads), 0.3 * tallest + 1.5), squeeze=False
    )
    for axis, workload in zip(axes[0], workloads):
        mine = [row for row in rows if row.workload == workload][::-1]
        values = [row.efficiency for row in mine]
        axis.barh([row.name for row in mine], values, color=[colours[row.group] for row in mine])
        for position, value in enumerate(values):
            axis.text(value, position, f" {value:.2f}", va="center", fontsize=8)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.axvline(TTA_MIN_EFFICIENCY, color="red", linestyle="--", linewidth=0.8)
        axis.set_xlim(0, max(1.2, max(values) * 1.15))
        axis.set_xlabel("efficiency: images/s x forwards per image / standard images/s")
        axis.set_title(workload)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
