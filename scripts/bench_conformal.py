#!/usr/bin/env python
"""Do conformal sets cover what they promise, and which strategy gives the smallest sets?

    python scripts/bench_conformal.py                       # textures, alpha 0.1, 50 re-splits
    python scripts/bench_conformal.py --data digits --calibration temperature

For each strategy, evaluates once (outputs from the prediction store under --out), takes the
calibration split's and the test split's merged probabilities, pools them, and draws
--resplits random calibration/test re-splits of the pool with the original sizes: on each, every
method (LAC, APS, RAPS) is fitted on the calibration part and scored on the test part. Prints
the mean test coverage (with its standard deviation over re-splits) and the mean set size per
strategy and method, and which strategy gives the smallest sets; writes them to --out as JSON.
With `--calibration temperature` the temperature is fitted on the original calibration split,
so pooled images are exchangeable only approximately (its fit saw some of them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

METHODS = ("lac", "aps", "raps")


def strategy_outputs(data: str, strategy: str, calibration: str, store: Path) -> dict:
    """The calibration split's and the test split's (calibrated) probabilities and labels."""
    from hydra import compose, initialize_config_dir

    from ml_infer.config import conf_dir
    from ml_infer.evaluate import evaluate

    overrides = [
        f"data={data}",
        f"strategy={strategy}",
        f"calibration={calibration}",
        "conformal=lac",  # any method: asks for the calibration split
        "tracking=none",
        f"engine.store={store}",
        "engine.progress=false",
        "engine.min_timing_s=0",
        "engine.timing_batches=1",
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    evaluation = evaluate(cfg)
    assert evaluation is not None and evaluation.posthoc is not None
    posthoc = evaluation.posthoc
    assert posthoc.calibration_probs is not None and posthoc.calibration_labels is not None
    return {
        "calibration": (posthoc.calibration_probs, posthoc.calibration_labels),
        "test": (posthoc.calibrated.probs, evaluation.predictions.labels),
        "accuracy": evaluation.metrics["accuracy"],
    }


def resplit_scores(
    outputs: dict, alpha: float, resplits: int
) -> dict[str, dict[str, float | list[float]]]:
    from ml_infer import conformal

    cal_probs, cal_labels = outputs["calibration"]
    test_probs, test_labels = outputs["test"]
    probs = torch.cat([cal_probs.double(), test_probs.double()])
    labels = torch.cat([cal_labels, test_labels])
    n_cal = len(cal_labels)
    found: dict[str, dict[str, float | list[float]]] = {}
    for method in METHODS:
        coverages, sizes = [], []
        for draw in range(resplits):
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(draw))
            fit_part, test_part = order[:n_cal], order[n_cal:]
            fitted = conformal.fit(
                probs[fit_part], labels[fit_part], method, alpha, seed=draw, k_reg="auto"
            )
            members = fitted.sets(probs[test_part])
            figures = conformal.set_metrics(
                members, probs[test_part].argmax(dim=1), labels[test_part]
            )
            coverages.append(figures["coverage"])
            sizes.append(figures["mean_set_size"])
        found[method] = {
            "coverage_mean": statistics.fmean(coverages),
            "coverage_sd": statistics.stdev(coverages),
            "set_size_mean": statistics.fmean(sizes),
        }
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/bench_conformal.py")
    parser.add_argument("--data", default="textures")
    parser.add_argument("--strategies", default="standard,tta,ensemble,tta_ensemble")
    parser.add_argument("--calibration", default="none", help="none | temperature | vector")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--resplits", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_conformal"))
    args = parser.parse_args(argv)
    from benchlib.output import machine_summary

    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for strategy in args.strategies.split(","):
        outputs = strategy_outputs(args.data, strategy, args.calibration, args.out / "store")
        results[strategy] = {
            "accuracy": outputs["accuracy"],
            "n_calibration": len(outputs["calibration"][1]),
            "n_test": len(outputs["test"][1]),
            **resplit_scores(outputs, args.alpha, args.resplits),
        }
    command = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n$ python scripts/bench_conformal.py {command}")
    print("\n".join(machine_summary(torch.device("cpu"))))
    first = next(iter(results.values()))
    print(
        f"{args.data}: {first['n_calibration']} calibration + {first['n_test']} test images "
        f"pooled, {args.resplits} re-splits, alpha {args.alpha}, calibration={args.calibration}"
    )
    print("| strategy | accuracy | " + " | ".join(f"{m} coverage (sd) | {m} size" for m in METHODS))
    print("|---|---|" + "---|---|" * len(METHODS))
    for strategy, row in results.items():
        cells = [
            f"{row[m]['coverage_mean']:.4f} ({row[m]['coverage_sd']:.4f}) | "
            f"{row[m]['set_size_mean']:.3f}"
            for m in METHODS
        ]
        print(f"| {strategy} | {row['accuracy']:.4f} | " + " | ".join(cells))
    for method in METHODS:
        best = min(results, key=lambda s: results[s][method]["set_size_mean"])
        print(f"smallest {method} sets: {best} ({results[best][method]['set_size_mean']:.3f})")
    out_file = args.out / f"{args.data}_{args.calibration}.json"
    out_file.write_text(json.dumps(results, indent=1))
    print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
