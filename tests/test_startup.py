"""Start-up: what an evaluation imports. Times are the benchmark's (scripts/bench_startup.py);
this checks which heavy packages the evaluation path pulls in, which a change can break."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, write_digits_folder

# Seconds each on this machine, and none needed to score a folder: scipy.stats (1.2 s, once
# McNemar's test), scikit-learn (the bundled digits' loader), torchmetrics (3.7 s with what it
# pulls in), mlflow (only when tracking), and the optional model zoos and runners.
HEAVY = {"scipy", "sklearn", "torchmetrics", "mlflow", "pandas", "triton", "timm", "lightning"}
HEAVY |= {"accelerate", "sqlalchemy"}

_REPORT_MODULES = """
import atexit, json, runpy, sys
loaded = lambda: sorted(sys.modules)
atexit.register(lambda: print("MODULES", json.dumps(loaded())))
sys.argv = ["ml-inference", *json.loads(sys.argv[1])]
runpy.run_module("ml_infer.cli", run_name="__main__")
"""


@pytest.mark.slow
def test_scoring_a_folder_imports_no_heavy_package(runs_dir, tmp_path):
    folder = write_digits_folder(tmp_path / "data", per_class=5)
    arguments = [
        "--checkpoint_path",
        str(runs_dir / "fold_0" / "weights" / "best.pt"),
        "--data-dir",
        str(folder),
        "tracking=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", _REPORT_MODULES, json.dumps(arguments)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("MODULES ")]
    imported = set(json.loads(line.removeprefix("MODULES ")))
    modules = {name.split(".")[0] for name in imported}
    assert {"torch", "ml_infer"} <= modules  # (torchvision is not needed to score a folder)
    assert modules & HEAVY == set()
    # the run's pictures are drawn with matplotlib's object API, without pyplot's machinery
    assert "matplotlib.figure" in imported and "matplotlib.pyplot" not in imported
