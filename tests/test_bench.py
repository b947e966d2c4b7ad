"""scripts/bench.py end to end at a tiny size: every row is measured and written, the figures are
usable numbers, and the checks that are not timings (ttach agreement, forward counts) hold.
No assertion here is about speed."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH_PATH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"

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
    spec = importlib.util.spec_from_file_location("bench", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["bench"]


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

    def row(name: str) -> bench.Row:
        return bench.Row("fake", name, "fake", 1, sum(batch_sizes), proportional, lambda: None)

    standard, same_cost = row("standard"), row("same cost")
    bench.measure([same_cost], standard, batch_sizes, 3, torch.device("cpu"))
    assert same_cost.efficiency == pytest.approx(1.0, abs=0.15)
