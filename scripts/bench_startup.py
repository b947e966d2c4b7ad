#!/usr/bin/env python
"""What one small evaluation spends on imports, measured in one process on this machine.

    python scripts/bench_startup.py                         # runs/digits/fold_0, a 180-image folder
    python scripts/bench_startup.py --checkpoint CKPT --folder DIR

Runs `ml-inference --checkpoint_path CKPT --data-dir DIR tracking=none` under `python -X importtime`
`--repeats` times and prints, per run, the end-to-end wall time, the time spent importing torch and
torchvision (with the packages `import torch, torchvision` itself imports), and the time spent
importing everything else, listed by top-level package. The import times come from the same
process, so their ratio holds on a busy machine; the wall times do not compare across runs (this
machine is shared).
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
        command = [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "ml_infer.cli",
            "--checkpoint_path",
            str(args.checkpoint),
            "--data-dir",
            str(folder),
            "tracking=none",
        ]
        print(f"machine: {cpu_model()}, Python {platform.python_version()}")
        print(" ".join(command[3:]))
        # what `import torch, torchvision` pulls in (numpy, sympy, ...) counts as theirs
        bare = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import torch, torchvision"],
            capture_output=True,
            text=True,
        )
        torch_packages = set(top_level_imports(bare.stderr)) | set(TORCH)
        totals, torch_s, rest_s = [], [], []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
            totals.append(time.perf_counter() - started)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            packages = top_level_imports(done.stderr)
            torch_s.append(sum(v for k, v in packages.items() if k in torch_packages))
            rest = {k: v for k, v in packages.items() if k not in torch_packages}
            rest_s.append(sum(rest.values()))
            heaviest = sorted(rest.items(), key=lambda item: -item[1])[:8]
            listed = ", ".join(f"{name} {seconds:.2f}" for name, seconds in heaviest)
            print(
                f"run {repeat + 1}: {totals[-1]:.2f} s end to end; imports: torch, torchvision "
                f"and what they import {torch_s[-1]:.2f} s, the rest {rest_s[-1]:.2f} s ({listed})"
            )
        print(
            f"median: {statistics.median(totals):.2f} s end to end, torch and torchvision "
            f"{statistics.median(torch_s):.2f} s, other imports {statistics.median(rest_s):.2f} s "
            f"(target <= 1.0 s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
