#!/usr/bin/env python
"""What one small evaluation spends on imports, measured in one process on this machine.

    python scripts/bench_startup.py                         # runs/digits/fold_0, a 180-image folder
    python scripts/bench_startup.py --checkpoint CKPT --folder DIR

Runs `ml-inference --checkpoint_path CKPT --data-dir DIR tracking=none` `--repeats` times (and once
more each time under `python -X importtime`, which slows it) and prints, per run, the end-to-end
wall time, the time spent importing torch and
torchvision (with the packages `import torch, torchvision` itself imports), and the time spent
importing everything else, listed by top-level package. The import times come from the same
process, so their ratio holds on a busy machine; the wall times do not compare across runs (this
machine is shared).

Beside each run, by turns first or second, it runs `benchlib/plain_reference.py` on the same
checkpoint and folder: plain PyTorch that loads the checkpoint, decodes the folder with
torchvision and counts the right answers (the least a seed-style CLI does). The ratio of the two
end-to-end times, per pair of runs, is the figure to quote.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchlib.output import cpu_model

REPO = Path(__file__).resolve().parents[1]
_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")
TORCH = ("torch", "torchvision")


def top_level_imports(stderr: str) -> dict[str, float]:
    """Seconds per top-level package: the self times of `-X importtime`, each module's counted
    towards its own package (torch imported by an ml_infer module is torch's time)."""
    seconds: dict[str, float] = defaultdict(float)
    for match in _LINE.finditer(stderr):
        seconds[match.group(4).split(".")[0]] += int(match.group(1)) / 1e6
    return dict(seconds)


def digits_folder(root: Path, per_class: int) -> Path:
    """The bundled digits test split as PNGs, `per_class` of each class."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import write_digits_folder

    return write_digits_folder(root, per_class=per_class)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "runs/digits/fold_0/weights/best.pt"
    )
    parser.add_argument("--folder", type=Path, default=None, help="default: 180 digit scans")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        print(f"error: no checkpoint {args.checkpoint}; run make train first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or digits_folder(Path(scratch) / "digits", per_class=18)
        ours = [sys.executable, "-m", "ml_infer.cli", "--checkpoint_path", str(args.checkpoint)]
        ours += ["--data-dir", str(folder), "tracking=none"]
        reference = [sys.executable, str(REPO / "scripts/benchlib/plain_reference.py")]
        reference += [str(args.checkpoint), str(folder)]
        print(f"machine: {cpu_model()}, Python {platform.python_version()}")
        print(" ".join(ours[1:]))
        # what `import torch, torchvision` pulls in (numpy, sympy, ...) counts as theirs
        bare = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import torch, torchvision"],
            capture_output=True,
            text=True,
        )
        torch_packages = set(top_level_imports(bare.stderr)) | set(TORCH)

        def timed(command: list[str]) -> tuple[float, str]:
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
            return time.perf_counter() - started, done.stderr

        totals, ratios, torch_s, rest_s = [], [], [], []
        for repeat in range(args.repeats):
            # the pair by turns first or second, so that a slow spell moves both
            pair = {"ours": ours, "reference": reference}
            order = list(pair) if repeat % 2 == 0 else list(pair)[::-1]
            seconds = {which: timed(pair[which])[0] for which in order}
            totals.append(seconds["ours"])
            ratios.append(seconds["ours"] / seconds["reference"])
            _, stderr = timed([ours[0], "-X", "importtime", *ours[1:]])  # inflated: imports only
            packages = top_level_imports(stderr)
            torch_s.append(sum(v for k, v in packages.items() if k in torch_packages))
            rest = {k: v for k, v in packages.items() if k not in torch_packages}
            rest_s.append(sum(rest.values()))
            heaviest = sorted(rest.items(), key=lambda item: -item[1])[:8]
            listed = ", ".join(f"{name} {seconds:.2f}" for name, seconds in heaviest)
            print(
                f"run {repeat + 1}: {totals[-1]:.2f} s end to end, {ratios[-1]:.2f}x the "
                f"plain-PyTorch reference ({seconds['reference']:.2f} s); imports: torch, "
                f"torchvision and what they import {torch_s[-1]:.2f} s, the rest "
                f"{rest_s[-1]:.2f} s ({listed})"
            )
        print(
            f"median: {statistics.median(totals):.2f} s end to end, "
            f"{statistics.median(ratios):.2f}x the reference (range {min(ratios):.2f}-"
            f"{max(ratios):.2f}); torch and torchvision {statistics.median(torch_s):.2f} s, other "
            f"imports {statistics.median(rest_s):.2f} s (target <= 1.0 s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
