"""The timed loop keeps a GPU busy: no per-batch synchronisation (checked here on the CPU by
counting), latencies from events read after the pass, outputs moved once; torch.compile gives
eager's outputs; an `auto` forward batch size halves itself when the device runs out of memory."""

from __future__ import annotations

import logging

import pytest
import torch

from ml_infer import passes
from ml_infer.aggregate import SoftVoting
from ml_infer.bank import load_classifier
from ml_infer.data import DigitsDataset, make_loader
from ml_infer.predictor import Predictor
from ml_infer.task import run_evaluation

from .conftest import compose_config
from .test_engine import predictor_for as one_model_predictor


def predictor_for(fold_paths, forward_batch_size: int = 256) -> Predictor:
    classifier = load_classifier(fold_paths[0])
    return one_model_predictor([classifier], SoftVoting(), forward_batch_size=forward_batch_size)


def test_a_timed_pass_synchronises_at_its_ends_only(fold_paths, monkeypatch):
    calls = []
    monkeypatch.setattr(passes, "synchronize", lambda device: calls.append(device))
    loader = make_loader(DigitsDataset("test", image_size=(8, 8)), batch_size=40)  # 9 batches
    result = passes.predict_dataset(
        predictor_for(fold_paths), loader, progress=False, min_timing_s=0
    )
    assert len(result.batch_seconds) == 9 and len(result.pass_seconds) == 1
    assert len(calls) == 2  # the pass's start and end, not once per batch
    assert len(result.probs) == 360 and torch.equal(result.positions, torch.arange(360))


def test_an_auto_batch_size_halves_itself_on_out_of_memory(fold_paths, caplog):
    predictor = predictor_for(fold_paths, forward_batch_size=128)
    expected = predictor.logits(DigitsDataset("test", image_size=(8, 8)).pixels())
    model = predictor.models[0]

    def small_batches_only(images: torch.Tensor) -> torch.Tensor:
        if len(images) > 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return model(images)

    predictor.models = [small_batches_only]
    predictor.backs_off = True  # as it is for forward_batch_size=auto on CUDA
    with caplog.at_level(logging.WARNING):
        found = predictor.logits(DigitsDataset("test", image_size=(8, 8)).pixels())
    assert torch.allclose(found, expected, atol=1e-6) and predictor.forward_batch_size == 32
    assert sum("forward batch size now" in r.message for r in caplog.records) == 1  # said once
    predictor.backs_off = False  # a batch size the user set is not second-guessed
    predictor.forward_batch_size = 128
    with pytest.raises(torch.OutOfMemoryError):
        predictor.logits(DigitsDataset("test", image_size=(8, 8)).pixels())


@pytest.mark.slow
def test_compiled_models_give_eagers_predictions(runs_dir, tmp_path):
    eager = run_evaluation(compose_config([], runs_dir=runs_dir), output_dir=tmp_path / "eager")
    compiled = run_evaluation(
        compose_config(["engine.compile=true"], runs_dir=runs_dir), output_dir=tmp_path / "c"
    )
    rows = [
        [
            line.split(",")
            for line in (tmp_path / name / "predictions.csv").read_text().splitlines()[1:]
        ]
        for name in ("eager", "c")
    ]
    for ours, theirs in zip(*rows):
        assert ours[2] == theirs[2]  # the predicted class
        assert max(abs(float(a) - float(b)) for a, b in zip(ours[3:13], theirs[3:13])) <= 1e-5
    assert compiled["accuracy"] == eager["accuracy"]
