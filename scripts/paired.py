#!/usr/bin/env python
"""Two runs on the same images, compared image by image.

    python scripts/paired.py RUN_DIR_A RUN_DIR_B

Reads each run directory's predictions.csv (as data), pairs the rows by image id, and prints
the accuracy of each, A - B with its 95% paired-bootstrap interval, McNemar's p, and the images
A fixed and broke against B (`ml_infer.metrics`, the same figures a run reports against
`standard`).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def correct_by_id(run_dir: Path) -> dict[str, bool]:
    with (run_dir / "predictions.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    label, pred = header.index("label"), header.index("pred")
    return {row[0]: row[label] == row[pred] for row in body}


def main(argv: list[str] | None = None) -> int:
    from ml_infer.metrics import mcnemar_p_value, paired_bootstrap_delta

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python scripts/paired.py RUN_DIR_A RUN_DIR_B", file=sys.stderr)
        return 2
    a, b = (correct_by_id(Path(arg)) for arg in args)
    if a.keys() != b.keys():
        print("error: the two runs scored different images", file=sys.stderr)
        return 2
    ids = sorted(a)
    right_a = torch.tensor([a[i] for i in ids])
    right_b = torch.tensor([b[i] for i in ids])
    delta, low, high = paired_bootstrap_delta(right_a, right_b)
    print(
        f"{len(ids)} images: accuracy A {right_a.double().mean():.4f}, "
        f"B {right_b.double().mean():.4f}; A - B {delta:+.4f} [95% CI {low:+.4f}, {high:+.4f}], "
        f"McNemar p = {mcnemar_p_value(right_a, right_b):.3g}; "
        f"A fixed {int((right_a & ~right_b).sum())}, broke {int((~right_a & right_b).sum())}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
