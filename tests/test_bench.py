"""scripts/bench.py end to end at a tiny size: every row is measured and written, the figures are
usable numbers, and the checks that are not timings (ttach agreement, forward counts) hold.
No assertion here is about speed."""

from __future__ import annotations

import csv
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
BENCH_PATH = SCRIPTS / "bench.py"
BENCH_MODULES = ("bench", "benchlib")  # the command line and its package

EXPECTED_FORWARDS = {
    "standard": 1,
    "standard, before tuning": 1,
    "pure forward": 1,
    "evaluation loop": 1,
    "mixed_precision": 1,
    "tta flips": 3,
    "seed-style flips": 3,
    "tta seed_all": 10,
    "seed-style seed_all": 11,  # the seed's extra hv-flip view
    "tta d4": 8,
    "seed-style d4": 8,
    "ttach d4": 8,
    "ensemble x1": 1,
    "ensemble x3": 3,
    "ensemble x3 stacked": 3,
    "ensemble x5": 5,
    "ensemble x5 stacked": 5,
    "tta_ensemble": 50,
}


@pytest.fixture(scope="module")
def bench():
    """scripts/bench.py, with scripts/ on sys.path as `python scripts/bench.py` has it: the
    command line imports its package, scripts/benchlib, from there."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("bench")
    finally:
        sys.path.remove(str(SCRIPTS))
        for name in [name for name in sys.modules if name.partition(".")[0] in BENCH_MODULES]:
            del sys.modules[name]


def test_help_imports_no_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(BENCH_PATH), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--quick" in result.stdout
    imported = {line.rpartition("|")[2].strip() for line in result.stderr.splitlines()}
    assert imported and not {name for name in imported if name.split(".")[0] == "torch"}


def test_help_describes_the_options(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--device", "--repeats", "--sweep", "--output-dir"):
        assert option in text


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_tiny_run_measures_and_writes_every_row(bench, tmp_path, capsys, restore_torch_threads):
    output_dir = tmp_path / "bench"
    exit_code = bench.main(
        [
            # One thread: a shared, busy machine slows multi-threaded tiny forwards a hundredfold.
            "--threads=1",
            "--models=digits",
            "--digits-images=32",
            "--digits-batch-size=16",
            "--repeats=1",
            "--loader-workers=0",
            "--stacked",
            "--tta-ensemble",
            f"--runs-dir={tmp_path / 'no-folds'}",  # random weights: no training needed
            f"--output-dir={output_dir}",
        ]
    )
    assert exit_code == 0
    with (output_dir / "bench.csv").open() as handle:
        rows = {row["row"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(EXPECTED_FORWARDS)
    for name, row in rows.items():
        assert row["model"] == "digits_cnn"
        assert int(row["forward_passes_per_image"]) == EXPECTED_FORWARDS[name]
        assert int(row["images"]) == 32
        for column in ("images_per_s", "efficiency"):
            value = float(row[column])
            assert math.isfinite(value) and value > 0, (name, column, value)
    assert float(rows["standard"]["efficiency"]) == 1.0
    assert (output_dir / "bench.png").stat().st_size > 0

    printed = capsys.readouterr().out
    assert "avx512_bf16=" in printed and "_is_mkldnn_bf16_supported()=" in printed
    agreement = next(line for line in printed.splitlines() if "abs(tta d4 - ttach d4)" in line)
    assert agreement.rstrip(" |").endswith("yes")  # equal probabilities, not a timing


def test_a_short_last_batch_counts_for_its_size(bench):
    # Two steps that each take time in proportion to the batch: the same cost per image, so the
    # efficiency is 1 whatever the sizes (counting the 8-image batch as a full one gave ~1.5).
    import time

    batch_sizes = [256, 256, 8]

    def proportional(index: int) -> None:
        time.sleep(batch_sizes[index] * 2e-5)

    from benchlib.measure import measure
    from benchlib.rows import Row

    def row(name: str) -> Row:
        return Row("fake", name, "fake", 1, sum(batch_sizes), proportional, lambda: None)

    standard, same_cost = row("standard"), row("same cost")
    measure([same_cost], standard, batch_sizes, 3, torch.device("cpu"))
    assert same_cost.efficiency == pytest.approx(1.0, abs=0.15)
