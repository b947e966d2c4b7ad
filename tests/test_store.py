"""The prediction store: a run served from it equals a run that computes everything; every part
of a key changes it; damaged entries are recomputed; concurrent writers leave one valid entry;
and what the outputs tell for free (flips, selective prediction, uncertainty) is right."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

from ml_infer.aggregate import Predictions, SoftVoting
from ml_infer.assemble import StoreKeys, uncertainty
from ml_infer.bank import load_classifier
from ml_infer.evaluate import build_views
from ml_infer.metrics import aurc, coverage_at_risk, risk_coverage
from ml_infer.predictor import EngineSettings, Predictor
from ml_infer.store import DiskStore, entry_key
from ml_infer.task import run_evaluation

from .conftest import compose_config

STRATEGIES = ["standard", "mixed_precision", "accelerate", "tta", "ensemble", "tta_ensemble"]


def evaluated(runs_dir: Path, out: Path, *overrides: str) -> tuple[dict, list[list[str]]]:
    metrics = run_evaluation(compose_config(list(overrides), runs_dir=runs_dir), output_dir=out)
    rows = (out / "predictions.csv").read_text().splitlines()
    return metrics, [row.split(",") for row in rows[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_run_served_from_the_store_equals_one_that_computes_everything(
    strategy, runs_dir, tmp_path
):
    store = tmp_path / "store"
    off, off_rows = evaluated(
        runs_dir, tmp_path / "off", f"strategy={strategy}", "engine.store=off"
    )
    first, _ = evaluated(runs_dir, tmp_path / "a", f"strategy={strategy}", f"engine.store={store}")
    served, served_rows = evaluated(
        runs_dir, tmp_path / "b", f"strategy={strategy}", f"engine.store={store}"
    )
    assert first["forward_passes_computed"] >= off["forward_passes_per_image"]
    assert served["forward_passes_computed"] == 0  # everything came from the store
    assert [row[2] for row in served_rows] == [row[2] for row in off_rows]  # predicted classes
    n_classes = 10
    for ours, theirs in zip(served_rows, off_rows):
        for a, b in zip(ours[3 : 3 + n_classes], theirs[3 : 3 + n_classes]):
            assert abs(float(a) - float(b)) <= 1e-5
    for key in ("accuracy", "nll", "ece", "flips_fixed", "flips_broken"):
        assert served[key] == pytest.approx(off[key], abs=1e-6)


@pytest.fixture(scope="module")
def two_keys(fold_paths):
    """A StoreKeys maker over the real folds, for checking what changes a key."""

    def keys_for(
        *,
        checkpoint=0,
        use_ema=False,
        augmentations=("brightness",),
        images=None,
        size=None,
        channels_last=True,
    ) -> StoreKeys:
        classifier = load_classifier(fold_paths[checkpoint], use_ema=use_ema)
        spec = classifier.input_spec
        if size is not None:
            spec = type(spec)(size=size, channels=spec.channels, mean=spec.mean, std=spec.std)
        predictor = Predictor(
            [classifier.model],
            build_views(list(augmentations)),
            SoftVoting(),
            SoftVoting(),
            spec,
            device=torch.device("cpu"),
            engine=EngineSettings(channels_last=channels_last),
        )

        class Data:
            pass

        data = Data()
        data.images = images if images is not None else torch.zeros(4, 1, 8, 8)
        return StoreKeys.of(predictor, [classifier], data)

    return keys_for


def test_every_part_of_a_key_changes_it(two_keys):
    base = two_keys()
    key = base.key(0, "brightness_0.9", "fp32")
    changed = {
        "checkpoint bytes": two_keys(checkpoint=1).key(0, "brightness_0.9", "fp32"),
        "EMA weights": two_keys(use_ema=True).key(0, "brightness_0.9", "fp32"),
        "view": base.key(0, "brightness_1.1", "fp32"),
        "split (other images)": two_keys(images=torch.ones(4, 1, 8, 8)).key(
            0, "brightness_0.9", "fp32"
        ),
        "input size": two_keys(size=(16, 16)).key(0, "brightness_0.9", "fp32"),
        "precision": base.key(0, "brightness_0.9", "bf16"),
        "engine numerics": two_keys(channels_last=False).key(0, "brightness_0.9", "fp32"),
    }
    assert all(other != key for other in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
    assert two_keys().key(0, "brightness_0.9", "fp32") == key  # and the same parts: the same key


def test_a_view_parameter_changes_the_key(two_keys, tmp_path):
    from ml_infer.augment import Brightness, Views

    keys = two_keys()
    other = StoreKeys(keys.members, {**keys.view_ids}, keys.shared)
    views = Views([Brightness(factors=(0.8,))])
    other.view_ids.update({"brightness_0.8": f"ml_infer.augment.Brightness:{views.names[1]}"})
    assert other.key(0, "brightness_0.8", "fp32") != keys.key(0, "brightness_0.9", "fp32")


@pytest.mark.slow
def test_a_damaged_entry_is_recomputed_with_a_warning(runs_dir, tmp_path, caplog):
    store = tmp_path / "store"
    evaluated(runs_dir, tmp_path / "a", "strategy=tta", f"engine.store={store}")
    entries = sorted(store.rglob("*.npy"))
    assert len(entries) == 10
    entries[3].write_bytes(entries[3].read_bytes()[:-40])  # truncated
    data = bytearray(entries[5].read_bytes())
    data[-1] ^= 0xFF  # one flipped bit
    entries[5].write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        metrics, _ = evaluated(runs_dir, tmp_path / "b", "strategy=tta", f"engine.store={store}")
    assert metrics["forward_passes_computed"] == 2
    assert caplog.text.count("is damaged") == 2
    again, _ = evaluated(runs_dir, tmp_path / "c", "strategy=tta", f"engine.store={store}")
    assert again["forward_passes_computed"] == 0


def _write_entry(directory: str, key: str, seed: int, barrier) -> None:
    store = DiskStore(Path(directory))
    logits = torch.arange(360 * 10, dtype=torch.float32).view(360, 10) / 7.0
    barrier.wait()
    for _ in range(20):
        store.put(key, logits, {"writer": seed})


@pytest.mark.slow
def test_two_jobs_writing_the_same_entry_at_once_leave_one_valid_entry(tmp_path):
    key = entry_key({"test": "concurrent"})
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    writers = [
        context.Process(target=_write_entry, args=(str(tmp_path), key, seed, barrier))
        for seed in range(2)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == [f"{key}.json", f"{key}.npy"]  # no temporary file left behind
    served = DiskStore(tmp_path).get(key)
    assert served is not None
    assert torch.equal(served, torch.arange(3600, dtype=torch.float32).view(360, 10) / 7.0)


@pytest.mark.slow
def test_fixed_minus_broken_is_the_accuracy_difference(runs_dir, tmp_path):
    for strategy in ("tta", "ensemble"):
        metrics, _ = evaluated(runs_dir, tmp_path / strategy, f"strategy={strategy}", "tta=flips")
        difference = metrics["flips_fixed"] - metrics["flips_broken"]
        expected = metrics["accuracy_delta_vs_standard"] * metrics["n"]
        assert difference == round(expected) and abs(difference - expected) < 1e-6


def test_per_view_and_per_member_accuracy(runs_dir, tmp_path):
    metrics, _ = evaluated(runs_dir, tmp_path / "run", "strategy=tta_ensemble", "tta=flips")
    views = metrics["per_view_accuracy"]
    assert list(views) == ["identity", "horizontal_flip", "vertical_flip"]
    assert views["identity"] > 0.95 > views["horizontal_flip"]  # mirrored digits are other digits
    members = metrics["per_member_accuracy"]
    assert len(members) == 3 and all(0 <= value <= 1 for value in members.values())


def reference_aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """torch-uncertainty's AURC, loaded from its file (its package imports lightning)."""
    import importlib.util

    spec = importlib.util.find_spec("torch_uncertainty")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "metrics/classification/risk_coverage.py"
    module_spec = importlib.util.spec_from_file_location("tu_risk_coverage", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["tu_risk_coverage"] = module
    module_spec.loader.exec_module(module)
    metric = module.AURC()
    metric.update(probs, labels)
    return float(metric.compute())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aurc_equals_torch_uncertainty(seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(500, 7, generator=generator, dtype=torch.float64).softmax(dim=-1)
    labels = torch.randint(0, 7, (500,), generator=generator)
    ours = aurc(risk_coverage(probs, probs.argmax(dim=-1), labels))
    assert ours == pytest.approx(reference_aurc(probs, labels), abs=1e-6)


def test_an_oracle_ranking_gives_the_analytic_minimum():
    n, errors = 200, 30
    correct = torch.tensor([True] * (n - errors) + [False] * errors)
    confidence = torch.linspace(1.0, 0.5, n)  # every error ranked below every correct image
    probs = torch.stack([confidence, 1 - confidence], dim=1)
    labels = torch.where(correct, 0, 1)
    risks = risk_coverage(probs, torch.zeros(n, dtype=torch.long), labels)
    exact = [max(0, k - (n - errors)) / k for k in range(1, n + 1)]
    trapezoid = sum((a + b) / 2 for a, b in itertools.pairwise(exact)) / n / (1 - 1 / n)
    assert aurc(risks) == pytest.approx(trapezoid, abs=1e-12)
    assert coverage_at_risk(risks, 0.0) == (n - errors) / n


def test_mutual_information_is_zero_for_one_member_and_positive_when_they_disagree():
    logits = torch.randn(1, 1, 50, 4)
    merged = Predictions.from_probs(logits[0, 0].softmax(-1))
    single = uncertainty(logits, merged)
    assert torch.all(single["mutual_information"] == 0)
    assert torch.all(single["disagreement"] == 0)
    views = torch.randn(1, 5, 50, 4) * 3
    merged = Predictions.from_probs(views.softmax(-1).mean(dim=(0, 1)))
    assert float(uncertainty(views, merged)["mutual_information"].mean()) > 0


@pytest.mark.slow
def test_metrics_hold_the_new_figures(runs_dir, tmp_path):
    metrics, rows = evaluated(runs_dir, tmp_path / "run", "strategy=ensemble")
    for key in (
        "aurc",
        "coverage_at_risk_1pct",
        "coverage_at_risk_5pct",
        "relative_cost",
        "relative_cost_iqr",
        "forward_passes_computed",
        "flips_fixed",
        "flips_broken",
    ):
        assert isinstance(metrics[key], (int, float)) and not math.isnan(metrics[key]), key
    assert 0 <= metrics["coverage_at_risk_1pct"] <= metrics["coverage_at_risk_5pct"] <= 1
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["per_member_accuracy"] == metrics["per_member_accuracy"]
    assert (tmp_path / "run" / "fixed_broken.png").stat().st_size > 1000
    entropy = [float(row[-3]) for row in rows]
    assert all(0 <= value <= math.log(10) + 1e-6 for value in entropy)


@pytest.mark.slow
def test_a_float16_store_halves_the_entries_and_keeps_the_predictions(runs_dir, tmp_path):
    import numpy as np

    full, full_rows = evaluated(runs_dir, tmp_path / "a", "strategy=tta", "engine.store=off")
    store = tmp_path / "half"
    options = ("strategy=tta", f"engine.store={store}", "engine.store_dtype=float16")
    evaluated(runs_dir, tmp_path / "b", *options)
    served, served_rows = evaluated(runs_dir, tmp_path / "c", *options)
    assert served["forward_passes_computed"] == 0
    entries = sorted(store.rglob("*.npy"))
    assert len(entries) == 10 and all(np.load(e).dtype == np.float16 for e in entries)
    agree = sum(a[2] == b[2] for a, b in zip(served_rows, full_rows)) / len(full_rows)
    assert agree >= 0.99 and served["accuracy"] == pytest.approx(full["accuracy"], abs=0.01)


def test_the_images_are_hashed_once_and_again_after_an_in_place_change(monkeypatch):
    """A run asks for its data's identity twice (store keys, metrics.json): the second answer
    comes without hashing, and pixels changed in place are hashed again."""
    import ml_infer.store as store

    class Held:
        images = torch.rand(50, 1, 8, 8)

    held = Held()
    first = store.data_identity(held)
    assert first == store.tensor_digest(held.images)
    hashed = []
    real_digest = store.tensor_digest
    monkeypatch.setattr(store, "tensor_digest", lambda t: hashed.append(1) or real_digest(t))
    assert store.data_identity(held) == first and not hashed
    held.images.mul_(0.5)  # e.g. a corruption applied in place
    changed = store.data_identity(held)
    assert hashed == [1] and changed != first and changed == real_digest(held.images)
