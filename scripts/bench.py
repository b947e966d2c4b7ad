"""What every inference strategy costs, measured side by side in one process.

For the digits CNN (the folds `ml-infer-train` wrote under runs/digits; random weights where there
are none) and resnet18 at 3x64x64 (random weights), every row runs the same preloaded images in
the same batches and reports images/s and

    efficiency = images/s x forward passes per image / images/s of `standard`

so 1.00 means a strategy costs exactly its forward passes and nothing else. Rows:

- `standard`: our engine (ml_infer.predictor.Predictor), one view, one model, fp32, with the
  engine settings of conf/config.yaml (forward chunk size, channels_last, BatchNorm folding).
- `standard, before tuning`: the same with the engine's settings before issue 6 (chunks of 256,
  contiguous memory, BatchNorm kept): the model as loaded, as the seed-style and ttach rows run it.
- `pure forward`: the engine's model alone on preloaded, normalised chunks: no views, no merging.
- `evaluation loop`: whole passes of ml_infer.predictor.predict_dataset over a DataLoader from
  ml_infer.data.make_loader (data loading included), as `python -m ml_infer` runs them;
  `evaluation loop (N workers)`: the same with N loader worker processes.
- `mixed_precision`: autocast as the engine resolves it here: bf16 only where the CPU has native
  support, otherwise a warning and fp32. On CUDA also `autocast fp16` and `autocast bf16`.
- `tta <preset>`: our engine with the views of conf/tta/<preset>.yaml (flips, seed_all, d4).
- `seed-style <preset>`: the same views run the seed's way (a reference loop written here): the
  model as loaded, one forward per view of the whole batch, brightness and contrast built image by
  image in a Python loop, logits averaged. The seed's seed_all runs 11 forwards: its set has an
  extra hv-flip view, which duplicates rotate_180.
- `ttach d4`: ttach's ClassificationTTAWrapper with its d4 set on the model as loaded, merging
  softmax outputs by mean.
- `ensemble xM`: M models looped by our engine; `ensemble xM stacked`: the same M (tuned) models
  as one call over their stacked weights with torch.func (vmap + functional_call).
- `tta_ensemble`: the seed_all views x 5 models.

Timing: every row first runs on a few images (warm-up). Then, `--repeats` times (rounds), every
batch is run by every row in turn, in an order rotated from batch to batch, each step after a
`standard` step on the same batch. Standard's time in a round is the median of those many steps,
and a row's efficiency is the median over rounds of standard's time / its time in the same round
(x forwards per image): a slow spell on a shared machine hardly moves a median of many short
steps, and a round that runs slower or faster as a whole moves both sides of its ratios. A row's
images/s is the median of its rounds; ratios between two rows (ours / ttach, ...) divide their
efficiencies. The targets of issue 6 are checked at the end. The table goes to a CSV and a PNG
bar chart (outputs/bench/ by default).

Usage:
    python scripts/bench.py                  # the full table: about 4 minutes on 2 CPU cores
    python scripts/bench.py --quick          # fewer images and rows: under a minute
    python scripts/bench.py --sweep-only     # images/s of the bare forward per batch size
    python scripts/bench.py --device cuda    # plus fp16/bf16 autocast, batch sizes up to OOM

This file is the command line; the bench itself is the package beside it, scripts/benchlib/
(workloads, references, rows, measure, output).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ml_infer.errors import UserError, exit_with

REPO = Path(__file__).resolve().parent.parent

# Defaults of a full run and of --quick; an option given explicitly wins over both.
FULL_RUN = dict(
    digits_images=1024,
    resnet_images=128,
    resnet_batch_size=128,
    repeats=3,
    stacked=True,
    tta_ensemble=True,
    loader_workers=[0, 2],
)
QUICK_RUN = dict(
    digits_images=512,
    resnet_images=32,
    resnet_batch_size=32,
    repeats=3,
    stacked=False,
    tta_ensemble=False,
    loader_workers=[0],
)


def integers(text: str) -> list[int]:
    """'0,2' -> [0, 2]"""
    return [int(part) for part in text.split(",")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py",
        description=(
            "Images/s and efficiency (images/s x forward passes per image / standard images/s) "
            "of every inference strategy, our engine beside the seed's approach and ttach, for "
            "the digits CNN and resnet18 at 3x64x64, in one process. Prints a table and the "
            "issue's targets; writes bench.csv and bench.png."
        ),
        epilog=(
            f"Defaults of a full run: {FULL_RUN}; of --quick: {QUICK_RUN}. A full run takes "
            "about 4 minutes on 2 CPU cores, --quick under one."
        ),
    )
    option = parser.add_argument
    option("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    option("--quick", action="store_true", help="fewer images and rows: under a minute")
    option("--models", default="digits,resnet18", help="digits and/or resnet18 (default: both)")
    option("--digits-images", type=int, help="digits images per row")
    option("--digits-batch-size", type=int, default=256, help="data batch size (default: 256)")
    option("--resnet-images", type=int, help="resnet18 images per row")
    option("--resnet-batch-size", type=int, help="resnet18 data batch size")
    option("--repeats", type=int, help="timed rounds; each row reports its median round")
    option("--threads", type=int, help="torch threads (default: torch's)")
    option("--forward-batch-size", help="engine.forward_batch_size (default: conf/config.yaml)")
    option(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="engine.channels_last (default: conf/config.yaml)",
    )
    option(
        "--fold-batch-norms",
        action=argparse.BooleanOptionalAction,
        help="engine.fold_batch_norm (default: conf/config.yaml)",
    )
    option("--stacked", action=argparse.BooleanOptionalAction, help="torch.func-stacked rows")
    option(
        "--tta-ensemble",
        action=argparse.BooleanOptionalAction,
        help="the tta_ensemble row (seed_all x 5 models: 50 forwards per image)",
    )
    option("--loader-workers", type=integers, help="num_workers of the evaluation-loop rows")
    option(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        help="images/s of the bare forward per batch size (default: on for CUDA, up to OOM)",
    )
    option("--sweep-only", action="store_true", help="the batch-size sweep and nothing else")
    option(
        "--sweep-sizes",
        type=integers,
        default=[16, 32, 64, 128, 256, 512],
        help="batch sizes of the CPU sweep (default: 16,32,64,128,256,512)",
    )
    option("--runs-dir", type=Path, default=REPO / "runs" / "digits", help="trained digit folds")
    option("--output-dir", type=Path, default=REPO / "outputs" / "bench", help="CSV and PNG")
    option("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    for name, value in (QUICK_RUN if args.quick else FULL_RUN).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if 0 not in args.loader_workers:
        args.loader_workers.insert(0, 0)  # the loop target compares the default loader
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (3 or more for a trustworthy median)")
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    if not models or set(models) - {"digits", "resnet18"}:
        parser.error(f"--models takes digits and/or resnet18, got {args.models!r}")
    args.models = models
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported lazily, after parsing: torch and benchlib take seconds; --help needs neither.
    import torch
    from benchlib.measure import OtherLoad, measure, sweep_forward_batch_sizes
    from benchlib.output import (
        check_targets,
        format_sweep,
        format_table,
        format_targets,
        machine_summary,
        plot,
        write_csv,
    )
    from benchlib.rows import Row, build_rows, ttach_difference
    from benchlib.workloads import digits_workload, engine_settings, resnet_workload

    from ml_infer.device import resolve_device

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    settings = engine_settings(args)
    sweep = args.sweep_only or (args.sweep if args.sweep is not None else device.type == "cuda")
    started, other_load = time.perf_counter(), OtherLoad()

    workloads = []
    if "digits" in args.models:
        workloads.append(
            digits_workload(args.runs_dir, args.digits_images, args.digits_batch_size, device)
        )
    if "resnet18" in args.models:
        workloads.append(resnet_workload(args.resnet_images, args.resnet_batch_size, device))
    rows: list[Row] = []
    differences: dict[str, float] = {}
    if not args.sweep_only:
        for workload in workloads:
            workload_rows = build_rows(workload, device, settings, args)
            standard = next(row for row in workload_rows if row.name == "standard")
            # Loader workers start and stop processes that would disturb their neighbours' times:
            # they are measured after the other rows, beside standard alone.
            others = [row for row in workload_rows if row is not standard]
            shared = [row for row in others if row.group != "loader workers"]
            apart = [row for row in others if row.group == "loader workers"]
            batch_sizes = [len(batch) for batch in workload.batches]
            measure(shared, standard, batch_sizes, args.repeats, device)
            if apart:
                measure(apart, standard, batch_sizes, args.repeats, device, record_standard=False)
            rows += workload_rows
            differences[workload.name] = ttach_difference(workload, device, settings)
    sweeps = {
        workload.name: sweep_forward_batch_sizes(
            workload, args.sweep_sizes, args.repeats, device, settings
        )
        for workload in (workloads if sweep else [])
    }

    given = argv if argv is not None else sys.argv[1:]
    print(f"\n$ python scripts/bench.py {' '.join(given)}".rstrip())
    print("\n".join(machine_summary(device)))
    for workload in workloads:
        print(f"{workload.name}: {workload.note}")
    print(
        f"engine: {settings}; median of {args.repeats} interleaved rounds; "
        f"{time.perf_counter() - started:.0f} s in all; other processes took "
        f"{other_load.fraction():.0%} of the CPU time meanwhile"
    )
    written = []
    if rows:
        print(f"\n{format_table(rows)}\n\n{format_targets(check_targets(rows, differences))}")
        write_csv(rows, args.output_dir / "bench.csv")
        written.append(args.output_dir / "bench.csv")
        if not args.no_plot:
            plot(rows, args.output_dir / "bench.png")
            written.append(args.output_dir / "bench.png")
    if sweeps:
        print(f"\n{format_sweep(sweeps)}")
    if written:
        print(f"\nwrote {', '.join(str(path) for path in written)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        exit_with(error)
