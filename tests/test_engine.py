"""Equalities the engine must keep, on real checkpoints trained by ml_infer.train."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from ml_infer.aggregate import HardVoting, SoftVoting
from ml_infer.augment import Views
from ml_infer.bank import load_classifier
from ml_infer.data import DigitsDataset
from ml_infer.predictor import EngineSettings, Predictor
from ml_infer.task import run_evaluation

from .conftest import compose_config


def read_predictions(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


def run(overrides, runs_dir, out_dir):
    return run_evaluation(compose_config(overrides, runs_dir=runs_dir), output_dir=out_dir)


def test_tta_none_is_identical_to_standard(runs_dir, tmp_path):
    standard = run(["strategy=standard"], runs_dir, tmp_path / "standard")
    # The tta strategy with its views removed, merged by vote: nothing left to merge.
    no_views = run(
        ["strategy=tta", "tta=none", "tta.aggregation=vote"], runs_dir, tmp_path / "none"
    )
    assert read_predictions(tmp_path / "standard") == read_predictions(tmp_path / "none")
    for key in ("accuracy", "nll", "ece", "brier"):
        assert standard[key] == no_views[key]
    assert no_views["forward_passes_per_image"] == 1


def test_ensemble_of_one_checkpoint_equals_that_checkpoint(runs_dir, fold_paths, tmp_path):
    alone = run([f"ensemble.checkpoints=[{fold_paths[1]}]"], runs_dir, tmp_path / "alone")
    ensemble = run(
        ["strategy=ensemble", f"ensemble.checkpoints=[{fold_paths[1]}]"], runs_dir, tmp_path / "ens"
    )
    assert read_predictions(tmp_path / "alone") == read_predictions(tmp_path / "ens")
    assert alone["nll"] == ensemble["nll"]


def digits_test_images() -> torch.Tensor:
    return DigitsDataset(split="test").images


def predictor_for(classifiers, aggregator, views=None, forward_batch_size=256):
    return Predictor(
        [c.model for c in classifiers],
        views or Views([]),
        SoftVoting(),
        aggregator,
        classifiers[0].input_spec,
        device=torch.device("cpu"),
        engine=EngineSettings(forward_batch_size=forward_batch_size),
    )


@pytest.mark.parametrize("aggregator", [SoftVoting(), HardVoting()], ids=["soft", "hard"])
def test_ensemble_of_copies_equals_the_single_model(fold_paths, aggregator):
    images = digits_test_images()
    alone = predictor_for([load_classifier(fold_paths[0])], aggregator)(images)
    copies = predictor_for([load_classifier(fold_paths[0]) for _ in range(3)], aggregator)(images)
    assert torch.equal(alone.preds, copies.preds)
    if isinstance(aggregator, SoftVoting):
        assert torch.allclose(alone.probs, copies.probs, atol=1e-6)


def test_chunked_forward_equals_one_forward(fold_paths):
    from ml_infer.evaluate import build_views

    images = digits_test_images()
    classifiers = [load_classifier(p) for p in fold_paths]
    views = build_views(["horizontal_flip", "brightness"])
    small = predictor_for(classifiers, SoftVoting(), views, forward_batch_size=7)(images)
    large = predictor_for(classifiers, SoftVoting(), views, forward_batch_size=256)(images)
    assert torch.allclose(small.probs, large.probs, atol=1e-5)
    assert torch.equal(small.preds, large.preds)


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_predictions(runs_dir, tmp_path):
    overrides = ["strategy=tta_ensemble", "tta=flips", "seed=3"]
    first = run(overrides, runs_dir, tmp_path / "first")
    second = run(overrides, runs_dir, tmp_path / "second")
    assert read_predictions(tmp_path / "first") == read_predictions(tmp_path / "second")
    assert first["accuracy"] == second["accuracy"] and first["nll"] == second["nll"]


@pytest.mark.slow
def test_data_batch_size_does_not_change_predictions(runs_dir, tmp_path):
    run(["strategy=ensemble", "data.batch_size=256"], runs_dir, tmp_path / "b256")
    run(["strategy=ensemble", "data.batch_size=50"], runs_dir, tmp_path / "b50")
    big, small = read_predictions(tmp_path / "b256"), read_predictions(tmp_path / "b50")
    assert [row["pred"] for row in big] == [row["pred"] for row in small]
    for a, b in zip(big, small):
        assert abs(float(a["prob_3"]) - float(b["prob_3"])) < 1e-5


@pytest.mark.slow
def test_weighted_ensemble_weights_change_the_probabilities(runs_dir, tmp_path):
    even = run(
        ["strategy=ensemble", "ensemble=weighted", "ensemble.weights=[1,1,1]"],
        runs_dir,
        tmp_path / "even",
    )
    skewed = run(
        ["strategy=ensemble", "ensemble=weighted", "ensemble.weights=[1,0,0]"],
        runs_dir,
        tmp_path / "skewed",
    )
    alone = run([], runs_dir, tmp_path / "alone")
    # All weight on fold 0 is fold 0 alone; even weights are plain soft voting.
    assert skewed["nll"] == pytest.approx(alone["nll"], abs=1e-6)
    soft = run(
        [
            "strategy=ensemble",
            "ensemble=weighted",
            "ensemble.weights=null",
            "ensemble.aggregation=soft_voting",
        ],
        runs_dir,
        tmp_path / "soft",
    )
    assert even["nll"] == pytest.approx(soft["nll"], abs=1e-6)
    assert even["ensemble_weights"] == [1, 1, 1]


def test_timing_repeats_whole_passes_and_keeps_one_set_of_outputs(fold_paths):
    import statistics

    from ml_infer.data import make_loader
    from ml_infer.passes import predict_dataset

    predictor = predictor_for([load_classifier(fold_paths[0])], SoftVoting())
    loader = make_loader(DigitsDataset(split="test"), batch_size=100)
    once = predict_dataset(predictor, loader, progress=False)
    # Ten passes' worth of time, capped at 4 passes: repeats happen however busy the machine is.
    min_timing_s = 10 * once.pass_seconds[0]
    repeated = predict_dataset(
        predictor, loader, progress=False, min_timing_s=min_timing_s, max_timing_passes=4
    )
    assert len(once.pass_seconds) == 1
    assert 1 < len(repeated.pass_seconds) <= 4
    assert repeated.wall_seconds == statistics.median(repeated.pass_seconds)
    assert len(repeated.batch_seconds) == 4 * len(repeated.pass_seconds)
    assert torch.equal(repeated.preds, once.preds) and len(repeated.labels) == 360


class WorkerPids(torch.utils.data.Dataset):
    """Each item is the id of the process that loaded it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        import os

        return os.getpid()


def test_loader_workers_outlive_a_pass_so_repeated_timing_passes_reuse_them():
    import os

    from ml_infer.data import make_loader

    loader = make_loader(WorkerPids(), batch_size=2, num_workers=1)
    first, second = ([int(p) for batch in loader for p in batch] for _ in range(2))
    assert os.getpid() not in first
    assert len(set(first)) == 1 and first == second


def test_bf16_autocast_path_agrees_with_fp32(fold_paths):
    # CPUs without native bf16 still run it (emulated, slowly); the engine must get it right.
    classifier = load_classifier(fold_paths[0])
    images = digits_test_images()
    fp32 = predictor_for([classifier], SoftVoting())(images)
    bf16 = Predictor(
        [classifier.model],
        Views([]),
        SoftVoting(),
        SoftVoting(),
        classifier.input_spec,
        device=torch.device("cpu"),
        autocast_dtype=torch.bfloat16,
    )
    assert bf16.precision_name == "bf16"
    low = bf16(images)
    assert low.probs.dtype == torch.float32
    assert (low.preds == fp32.preds).float().mean() > 0.98
    assert torch.allclose(low.probs, fp32.probs, atol=0.05)


def test_batch_norm_is_folded_into_the_trained_cnn_without_changing_its_outputs(fold_paths):
    from ml_infer.predictor import fold_batch_norm

    model = load_classifier(fold_paths[0]).model.eval()
    folded = fold_batch_norm(model)
    batch_norms = (torch.nn.modules.batchnorm._BatchNorm,)
    assert any(isinstance(m, batch_norms) for m in model.modules())
    assert not any(isinstance(m, batch_norms) for m in folded.modules())
    images = digits_test_images()
    with torch.inference_mode():
        assert torch.allclose(folded(images), model(images), atol=1e-4)


class SharedConv(torch.nn.Module):
    """One convolution called twice, once followed by BatchNorm: folding would alter both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)) + self.conv(x)


def test_a_module_called_twice_is_not_folded():
    from ml_infer.predictor import fold_batch_norm

    model = SharedConv()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    model.eval()
    folded = fold_batch_norm(model)
    images = torch.rand(2, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(folded(images), model(images))
