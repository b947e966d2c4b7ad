#!/usr/bin/env python
"""How long a greedy search takes once the store holds the outputs.

    python scripts/bench_select.py [--candidates 60] [--images 720] [--classes 6]

Times `selection.greedy_policy` (TTA, without replacement, up to 8 views) and
`selection.caruana` (20 steps with replacement) over random candidate probabilities of the
given size, with the calibrated-NLL objective; prints the median of 3 runs of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from ml_infer.selection import caruana, greedy_policy

    parser = argparse.ArgumentParser(prog="python scripts/bench_select.py")
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--images", type=int, default=720)
    parser.add_argument("--classes", type=int, default=6)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.classes, (args.images,), generator=generator)
    signal = torch.nn.functional.one_hot(labels, args.classes).float() * 2
    noise = torch.randn(args.candidates, args.images, args.classes, generator=generator) * 2
    candidates = (signal + noise).softmax(dim=-1)
    timings: dict[str, list[float]] = {"greedy TTA (8 views)": [], "Caruana (20 steps)": []}
    for _ in range(3):
        started = time.perf_counter()
        greedy_policy(candidates, labels, "nll", max_views=8)
        timings["greedy TTA (8 views)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        caruana(candidates, labels, "nll", steps=20)
        timings["Caruana (20 steps)"].append(time.perf_counter() - started)
    print(
        f"{args.candidates} candidates x {args.images} images x {args.classes} classes, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads:"
    )
    for name, seconds in timings.items():
        print(f"  {name}: {statistics.median(seconds):.2f} s (median of 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
