#!/usr/bin/env python
"""One evaluation run with 1 process and with N processes (torchrun + the Accelerate runner):
the speed ratio, and whether the predictions and metrics matched (the same class for every
image; probabilities and metrics within 1e-5).

    python scripts/bench_processes.py                                  # 1 vs 2 processes, CPU
    python scripts/bench_processes.py --strategy tta_ensemble --processes 1 2 --repeats 3
    python scripts/bench_processes.py --device cuda --processes 1 2    # a machine with 2 GPUs

Each run is a real `python -m ml_infer strategy.runner=accelerate ...` subprocess (N processes:
`python -m torch.distributed.run --nproc_per_node N -m ml_infer ...`); images/s is the figure
the run itself reports (median whole pass over the test set, data loading included, start-up
excluded). Runs are interleaved over repetitions and the median is reported, so that a noisy
neighbour on a shared machine hits every configuration alike. On CPU the cores are split
evenly: 1 process uses all of them, N processes use cores/N threads each.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("n", "accuracy", "macro_f1", "nll", "ece", "brier")
# Processes split the test set into other batches, and a convolution's summation order depends
# on the batch: probabilities may differ in the last printed digit, predictions may not.
TOLERANCE = 1e-5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--strategy", default="ensemble", help="strategy preset (default: %(default)s)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=None,
        help="process counts to compare (default: 1 2, or 1 and the GPU count)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repetitions (default: 3)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument(
        "--min-timing-s",
        type=float,
        default=2.0,
        help="each run times whole passes for at least this long (default: 2)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data=textures")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_once(processes: int, args: argparse.Namespace, run_dir: Path) -> tuple[dict, list[str]]:
    overrides = [
        f"strategy={args.strategy}",
        "strategy.runner=accelerate",
        f"device={args.device}",
        "tracking=none",
        "engine.progress=false",
        f"engine.min_timing_s={args.min_timing_s}",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    env = dict(os.environ)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    if processes == 1:
        command = [sys.executable, "-m", "ml_infer", *overrides]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "ml_infer",
            *overrides,
        ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {processes}-process run failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics, (run_dir / "predictions.csv").read_text().splitlines()


def max_difference(run: tuple[dict, list[str]], reference: tuple[dict, list[str]]) -> float:
    """Largest absolute difference between two runs' metrics and per-image probabilities;
    infinite when their images, labels or predicted classes differ."""
    (metrics, rows), (reference_metrics, reference_rows) = run, reference
    if len(rows) != len(reference_rows) or rows[0] != reference_rows[0]:
        return math.inf
    largest = max(abs(metrics[k] - reference_metrics[k]) for k in COMPARED)
    for cells, reference_cells in zip(csv.reader(rows[1:]), csv.reader(reference_rows[1:])):
        if cells[:3] != reference_cells[:3]:  # index, label, predicted class
            return math.inf
        for value, reference_value in zip(cells[3:], reference_cells[3:]):
            largest = max(largest, abs(float(value) - float(reference_value)))
    return largest


def main() -> int:
    args = parse_args()
    if args.processes is None:
        gpus = 0
        if args.device.startswith("cuda"):
            import torch

            gpus = torch.cuda.device_count()
        args.processes = [1, gpus] if gpus > 1 else [1, 2]
    if 1 not in args.processes:
        args.processes = [1, *args.processes]
    speeds: dict[int, list[float]] = {p: [] for p in args.processes}
    reference: tuple[dict, list[str]] | None = None
    matched: dict[int, bool] = dict.fromkeys(args.processes, True)
    largest: dict[int, float] = dict.fromkeys(args.processes, 0.0)
    with tempfile.TemporaryDirectory(prefix="bench_processes_") as scratch:
        for repeat in range(args.repeats):
            for processes in args.processes:
                metrics, rows = run_once(processes, args, Path(scratch) / f"p{processes}_r{repeat}")
                assert metrics["processes"] == processes, metrics["processes"]
                speeds[processes].append(metrics["images_per_s"])
                if reference is None:
                    reference = (metrics, rows)
                difference = max_difference((metrics, rows), reference)
                largest[processes] = max(largest[processes], difference)
                matched[processes] = matched[processes] and difference <= TOLERANCE
                print(
                    f"  repeat {repeat + 1}/{args.repeats}: {processes} process(es) "
                    f"{metrics['images_per_s']:.0f} images/s",
                    file=sys.stderr,
                    flush=True,
                )
    base = statistics.median(speeds[1])
    cpus = os.cpu_count()
    print(
        f"\nstrategy={args.strategy} {' '.join(args.overrides)} on {args.device}; "
        f"{reference[0]['n']} images; {cpus} CPUs; median of {args.repeats} interleaved runs\n"
    )
    print(
        "| processes | threads each | images/s | speed vs 1 process | same predictions, metrics "
        "| largest difference |"
    )
    print("|---|---|---|---|---|---|")
    for processes in args.processes:
        threads = max(1, (cpus or 1) // processes) if args.device == "cpu" else "-"
        median = statistics.median(speeds[processes])
        print(
            f"| {processes} | {threads} | {median:.0f} | {median / base:.2f}x | "
            f"{'yes' if matched[processes] else 'NO'} | {largest[processes]:.1e} |"
        )
    return 0 if all(matched.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
