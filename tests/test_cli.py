"""`ml-inference`: the seed's CLI examples give the same results as the equivalent overrides."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ml_infer.cli import build_parser, split_overrides, to_overrides
from ml_infer.task import run_evaluation

from .conftest import REPO, compose_config, run_cli

ML_INFERENCE = Path(sys.executable).parent / "ml-inference"
COMPARED = ("n", "accuracy", "macro_f1", "nll", "ece", "brier", "views", "models", "strategy")


def seed_examples(folds: list[Path]) -> list[tuple[list[str], list[str]]]:
    """The seed's "CLI Usage" section, pointed at our folds, with the overrides each means."""
    f0, f1, f2 = (str(p) for p in folds)
    return [
        (["--checkpoint_path", f0], [f"ensemble.checkpoints=[{f0}]"]),
        (["--checkpoint_path", f0, "--tta"], ["strategy=tta", f"ensemble.checkpoints=[{f0}]"]),
        (
            [
                "--checkpoint_path",
                f0,
                "--tta",
                "--tta-augmentations",
                "horizontal_flip",
                "vertical_flip",
            ],
            [
                "strategy=tta",
                f"ensemble.checkpoints=[{f0}]",
                "tta.augmentations=[horizontal_flip,vertical_flip]",
            ],
        ),
        (
            ["--ensemble", f0, f1, f2],
            ["strategy=ensemble", f"ensemble.checkpoints=[{f0},{f1},{f2}]"],
        ),
        (
            ["--ensemble", f0, f1, "--tta"],
            ["strategy=tta_ensemble", f"ensemble.checkpoints=[{f0},{f1}]"],
        ),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("example", range(5))
def test_seed_cli_example_matches_python_m_ml_infer(example, fold_paths, runs_dir, tmp_path):
    flags, overrides = seed_examples(fold_paths)[example]
    run_dir = tmp_path / "cli"
    result = subprocess.run(
        [
            str(ML_INFERENCE),
            *flags,
            "tracking=none",
            "engine.min_timing_s=0",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.splitlines()[0]
    assert printed.startswith("equivalent: python -m ml_infer ")
    assert shlex.split(printed.removeprefix("equivalent: python -m ml_infer ")) == [
        *overrides,
        "tracking=none",
        "engine.min_timing_s=0",
        f"hydra.run.dir={run_dir}",
    ]
    from_cli = json.loads((run_dir / "metrics.json").read_text())
    expected = run_evaluation(
        compose_config(overrides, runs_dir=runs_dir), output_dir=tmp_path / "direct"
    )
    for key in COMPARED:
        assert from_cli[key] == expected[key], key


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tta-aggregation", "voting"], ["tta.aggregation=vote"]),
        (
            ["--ensemble", "a.pt", "b.pt", "--ensemble-weights", "2", "1"],
            [
                "strategy=ensemble",
                "ensemble.checkpoints=[a.pt,b.pt]",
                "ensemble.weights=[2,1]",
                "ensemble.aggregation=weighted",
            ],
        ),
        (
            ["--checkpoint_path", "my runs/best,1.pt"],
            ["ensemble.checkpoints=['my runs/best,1.pt']"],
        ),
        (
            [
                "--data_dir",
                "photos",
                "--split",
                "val",
                "--batch-size",
                "32",
                "--device",
                "cpu",
                "--use-ema",
            ],
            [
                "use_ema=true",
                "data=imagefolder",
                "data.root=photos",
                "data.split=val",
                "data.batch_size=32",
                "device=cpu",
            ],
        ),
        (
            ["--predict", "new/", "--strategy", "tta"],
            ["strategy=tta", "mode=predict", "predict.root=new/"],
        ),
        (["--tta-augmentations", "rotate_90"], ["strategy=tta", "tta.augmentations=[rotate_90]"]),
        (
            ["--calibration", "temperature", "--conformal", "raps", "--alpha", "0.05"],
            ["calibration=temperature", "conformal=raps", "conformal.alpha=0.05"],
        ),
    ],
)
def test_flags_map_to_overrides(flags, expected):
    flags, _overrides = split_overrides(flags)
    args = build_parser().parse_args(flags)
    assert to_overrides(args) == expected


def test_trailing_overrides_are_not_swallowed_by_list_flags():
    flags, overrides = split_overrides(["--ensemble", "a.pt", "b.pt", "tracking=none", "seed=3"])
    assert flags == ["--ensemble", "a.pt", "b.pt"] and overrides == ["tracking=none", "seed=3"]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_help_imports_neither_torch_nor_hydra():
    result = run_python(
        "import sys\n"
        "from ml_infer import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'torchvision', 'hydra', 'mlflow', 'torchmetrics', 'accelerate')\n"
        "print('IMPORTED', [m for m in heavy if m in sys.modules])\n"
    )
    assert "usage: ml-inference" in result.stdout
    assert "IMPORTED []" in result.stdout


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (
            ["--tta-aggregation", "avg"],
            ["--tta-aggregation", "invalid choice: 'avg'", "'mean'", "'voting'"],
        ),
        (
            ["--tta-augmentations", "mirror"],
            ["--tta-augmentations", "'mirror'", "'horizontal_flip'"],
        ),
        (["--strategy", "fast"], ["--strategy", "'tta_ensemble'"]),
        (["--batch-size", "0"], ["--batch-size", "positive integer"]),
        (["--alpha", "1.5"], ["--alpha", "in (0, 1)", "'1.5'"]),
        (["--conformal", "thr"], ["--conformal", "'thr'", "'raps'"]),
        (["--checkpoint_path", "a.pt", "--ensemble", "b.pt"], ["--ensemble", "not allowed with"]),
    ],
)
def test_argument_errors_name_the_flag_and_valid_values(flags, fragments):
    result = subprocess.run([str(ML_INFERENCE), *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    error_line = result.stderr.strip().splitlines()[-1]
    assert error_line.startswith("ml-inference: error: argument")
    for fragment in fragments:
        assert fragment in error_line


@pytest.mark.slow
def test_python_m_ml_infer_help_names_the_app_and_its_commands_compose():
    result = run_cli(["ml_infer", "--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ml_infer: which inference strategy to ship")
    assert "powered by Hydra" not in result.stdout and "__main__" not in result.stdout
    assert "== Configuration groups ==" in result.stdout  # Hydra's listing follows
    commands = [line.split("#")[0].split() for line in lines if line.startswith("  python -m ")]
    assert [c[2] for c in commands] == ["ml_infer"] * 4 + ["ml_infer.report"]
    for command in commands[:4]:  # each one's overrides are valid ones
        overrides = [w.strip("'") for w in command[3:] if w != "-m"]
        first_of_each_sweep = [o.replace("=DIR", "=/data").split(",")[0] for o in overrides]
        assert compose_config(first_of_each_sweep).mode == "evaluate"
