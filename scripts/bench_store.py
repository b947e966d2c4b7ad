#!/usr/bin/env python
"""What the prediction store saves a sweep, measured side by side on this machine.

    python scripts/bench_store.py                                   # digits, compare_all
    python scripts/bench_store.py data=textures data.root=datasets/textures10k \
        runs_dir=runs/textures

Runs the same sweep (default `+experiment=compare_all`) three times in turn: with
`engine.store=off`, with a fresh shared store, and again with that store; prints each one's wall
time, the forward passes computed for predictions (per image, summed over the runs) against those
its runs use, and the ratios. Extra arguments are Hydra overrides for every sweep. Sweeps run
with `tracking=none`; their directories are under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_sweep(out: Path, name: str, store: str, overrides: list[str], experiment: str) -> dict:
    sweep_dir = out / name
    shutil.rmtree(sweep_dir, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "ml_infer",
        "-m",
        f"+experiment={experiment}",
        "tracking=none",
        "engine.progress=false",
        f"engine.store={store}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"error: the {name} sweep failed: {result.stderr.strip().splitlines()[-1:]}")
    runs = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))]
    return {
        "name": name,
        "seconds": seconds,
        "runs": len(runs),
        "images": runs[0]["n"] if runs else 0,
        "computed": sum(run.get("forward_passes_computed", 0) for run in runs),
        "used": sum(run["forward_passes_per_image"] for run in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench_store.py",
        description="Wall time of a sweep without and with the prediction store, side by side.",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_store"))
    parser.add_argument("--experiment", default="compare_all")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every sweep")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "store"
    shutil.rmtree(store, ignore_errors=True)
    rows = [
        run_sweep(args.out, "store_off", "off", args.overrides, args.experiment),
        run_sweep(args.out, "store_fresh", str(store), args.overrides, args.experiment),
        run_sweep(args.out, "store_again", str(store), args.overrides, args.experiment),
    ]
    off = rows[0]["seconds"]
    print(
        f"\n$ python scripts/bench_store.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    print("| sweep | runs | images | wall s | vs store off | fwd passes computed / used |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['runs']} | {row['images']} | {row['seconds']:.1f} | "
            f"{row['seconds'] / off:.2f}x | {row['computed']} / {row['used']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
