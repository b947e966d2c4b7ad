"""Unit tests of post-hoc calibration, adaptive ECE, conformal sets and the calibration holdout,
on synthetic data (no model, no subprocess).

- calibrate: a planted temperature (and a planted per-class scale and bias) is recovered from
  labels drawn from the scaled logits; temperature scaling keeps the argmax, ties included;
  vector scaling fits at least as well as temperature scaling.
- metrics: adaptive ECE equals torch-uncertainty's, loaded from its file (its package imports
  lightning); the reliability diagram's bins add up to the equal-width ECE.
- conformal: coverage lies in [1 - alpha, 1 - alpha + 1 / (n + 1)] on average over re-splits;
  LAC and APS sets equal MAPIE's on the same probabilities; RAPS equals a plain re-statement of
  Angelopoulos et al. 2021's score; the errors a user can cause are UserErrors.
- calsplit: the stratified holdout is a partition, stratified and fixed by its seed.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from ml_infer import conformal
from ml_infer.calibrate import (
    LOG_EPS,
    TemperatureScaling,
    VectorScaling,
    calibrator,
    log_probs_as_logits,
)
from ml_infer.calsplit import stratified_holdout
from ml_infer.errors import UserError
from ml_infer.metrics import (
    ECE_BINS,
    adaptive_calibration_error,
    expected_calibration_error,
    reliability_bins,
)


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double(), labels))


def planted(
    n: int, n_classes: int, seed: int, scale: float = 3.0
) -> tuple[torch.Tensor, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_classes, generator=generator, dtype=torch.float64) * scale, generator


def sample(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per row drawn from softmax(logits)."""
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------
# calibrate.py


@pytest.mark.parametrize("t0", [0.5, 0.73, 2.0])
def test_a_planted_temperature_is_recovered(t0):
    with torch.random.fork_rng():  # leaves the global generator as it was
        torch.manual_seed(0)
        logits = torch.randn(20000, 10) * 3
        labels = torch.distributions.Categorical(logits=logits / t0).sample()
    fitted = TemperatureScaling().fit(logits, labels)
    assert fitted.temperature == pytest.approx(t0, rel=0.02)
    # the fitted temperature is the NLL minimum: both neighbours fit worse
    at = nll(logits / fitted.temperature, labels)
    assert at <= nll(logits / (fitted.temperature * 1.01), labels)
    assert at <= nll(logits / (fitted.temperature / 1.01), labels)


@pytest.mark.parametrize("seed", range(5))
def test_temperature_scaling_never_changes_the_argmax(seed):
    generator = torch.Generator().manual_seed(seed)
    continuous = torch.randn(500, 7, generator=generator) * 5
    # small integers: most rows hold a tie for the top class
    tied = torch.randint(-2, 3, (500, 7), generator=generator).float()
    tied[:50] = 1.5  # whole rows tied
    logits = torch.cat([continuous, tied])
    labels = torch.randint(0, 7, (len(logits),), generator=generator)
    fitted = TemperatureScaling().fit(logits, labels)
    for temperature in (fitted.temperature, 1e-3, 0.37, 1.0, 3.3, 250.0):
        scaler = TemperatureScaling()
        scaler.temperature = temperature
        scaled = scaler(logits)
        assert torch.equal(scaled.argmax(dim=-1), logits.argmax(dim=-1)), temperature
        assert torch.equal(scaled.softmax(dim=-1).argmax(dim=-1), logits.argmax(dim=-1))
        # ties stay ties (the top class is the same set, not just the same first index)
        top = logits == logits.max(dim=-1, keepdim=True).values
        assert torch.equal(scaled == scaled.max(dim=-1, keepdim=True).values, top)


def test_vector_scaling_fits_at_least_as_well_as_temperature():
    logits, generator = planted(8000, 6, seed=1)
    # a model over-confident by a factor 2.5 with a per-class prior shift
    shift = torch.tensor([0.8, -0.5, 0.0, 0.3, -1.0, 0.4], dtype=torch.float64)
    labels = sample(logits / 2.5 + shift, generator)
    temperature = TemperatureScaling().fit(logits, labels)
    vector = VectorScaling().fit(logits, labels)
    raw, by_t, by_v = (
        nll(logits, labels),
        nll(temperature(logits), labels),
        nll(vector(logits), labels),
    )
    assert by_t < raw
    # temperature scaling is vector scaling with w = 1 / T, b = 0: the vector optimum is lower
    assert by_v <= by_t + 1e-9
    assert by_v < by_t - 0.01  # and here, with a planted bias, clearly lower
    # the parameters come back as plain floats for metrics.json
    parameters = vector.parameters()
    assert len(parameters["vector_scale"]) == 6 and len(parameters["vector_bias"]) == 6


def test_vector_scaling_recovers_a_planted_scale_and_bias():
    logits, generator = planted(30000, 5, seed=2, scale=2.0)
    scale = torch.tensor([0.4, 0.8, 1.0, 1.5, 2.2], dtype=torch.float64)
    bias = torch.tensor([0.5, -0.3, 0.0, 0.9, -0.6], dtype=torch.float64)
    labels = sample(logits * scale + bias, generator)
    fitted = VectorScaling().fit(logits.float(), labels)
    assert fitted.scale is not None and fitted.bias is not None
    torch.testing.assert_close(fitted.scale, scale, atol=0.1, rtol=0.05)
    # softmax ignores a constant added to every bias: compare the biases centred
    torch.testing.assert_close(
        fitted.bias - fitted.bias.mean(), bias - bias.mean(), atol=0.1, rtol=0.0
    )
    # applied to float32 logits it returns float32
    assert fitted(logits.float()).dtype == torch.float32


def test_calibrator_names_and_merged_probabilities_as_logits():
    assert isinstance(calibrator("temperature"), TemperatureScaling)
    assert isinstance(calibrator("vector"), VectorScaling)
    plain = calibrator("none")
    logits = torch.randn(4, 3)
    assert plain.fit(logits, torch.zeros(4, dtype=torch.long))(logits) is logits
    assert plain.parameters() == {}
    with pytest.raises(UserError, match="valid: none, temperature, vector"):
        calibrator("platt")
    # a merged output's probabilities come back from the softmax of their logits
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5], [1.0, 0.0, 0.0]])
    as_logits = log_probs_as_logits(probs)
    assert torch.isfinite(as_logits).all() and as_logits.min() == LOG_EPS
    torch.testing.assert_close(as_logits.softmax(-1), probs.double(), atol=1e-6, rtol=0)


def test_an_unfitted_vector_scaling_refuses_to_apply():
    with pytest.raises(RuntimeError, match="before it was fitted"):
        VectorScaling()(torch.zeros(2, 3))


def test_fitting_on_no_images_is_a_user_error():
    with pytest.raises(UserError, match="no labelled images"):
        TemperatureScaling().fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# metrics.adaptive_calibration_error against torch-uncertainty


def reference_ace_module():
    """torch-uncertainty's adaptive calibration error file, loaded on its own: the package's
    __init__ imports lightning, which is not installed (the file itself needs seaborn)."""
    name = "tu_adaptive_calibration_error"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("torch_uncertainty")
    assert spec is not None and spec.submodule_search_locations
    path = (
        Path(spec.submodule_search_locations[0])
        / "metrics/classification/calibration/adaptive_calibration_error.py"
    )
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # imports a reference package or repeats re-splits
@pytest.mark.parametrize(
    ("seed", "n", "n_classes"), [(0, 1000, 10), (1, 1003, 4), (2, 45, 3), (3, 16, 7), (4, 2500, 2)]
)
def test_adaptive_ece_equals_torch_uncertainty(seed, n, n_classes):
    reference = reference_ace_module()
    generator = torch.Generator().manual_seed(seed)
    # continuous probabilities (no tied confidences) from 1 / C to nearly 1
    spread = torch.rand(n, 1, generator=generator, dtype=torch.float64) * 6
    logits = torch.randn(n, n_classes, generator=generator, dtype=torch.float64) * spread
    probs = logits.softmax(dim=-1)
    preds = probs.argmax(dim=-1)
    # right 3 times in 4 whatever the confidence: over-confident in the top bins, under-confident
    # in the bottom ones, so that the error depends on where the bins are cut
    right = torch.rand(n, generator=generator) < 0.75
    labels = torch.where(
        right, preds, (preds + torch.randint(1, n_classes, (n,), generator=generator)) % n_classes
    )
    ours = adaptive_calibration_error(probs, preds, labels)
    metric = reference.MulticlassAdaptiveCalibrationError(
        num_classes=n_classes, n_bins=15, norm="l1"
    )
    metric.update(probs, labels)
    assert ours == pytest.approx(float(metric.compute()), abs=1e-6)  # it keeps float32
    # its binning in float64: the same number to rounding
    confidences = probs.max(dim=-1).values
    exact = reference._ace_compute(confidences, (preds == labels).double(), num_bins=15)
    assert ours == pytest.approx(float(exact), abs=1e-12)
    assert ours > adaptive_calibration_error(probs, preds, labels, n_bins=1) + 0.05
    # other bin counts, as long as every bin holds an image (the reference divides by zero)
    for n_bins in (1, 2, 7, 14, 16, min(n, 40)):
        exact = reference._ace_compute(confidences, (preds == labels).double(), num_bins=n_bins)
        assert adaptive_calibration_error(probs, preds, labels, n_bins=n_bins) == pytest.approx(
            float(exact), abs=1e-12
        )


def test_adaptive_ece_with_more_bins_than_images_and_for_a_perfect_model():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=torch.float64)
    preds = probs.argmax(dim=-1)
    labels = torch.tensor([0, 0, 0])
    # three single-image bins: the plain mean of |correct - confidence|
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6)) / 3
    assert adaptive_calibration_error(probs, preds, labels) == pytest.approx(expected)
    one_hot = torch.eye(4, dtype=torch.float64)[torch.tensor([0, 1, 2, 3, 3])]
    assert adaptive_calibration_error(one_hot, one_hot.argmax(-1), one_hot.argmax(-1)) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_reliability_bins_add_up_to_the_equal_width_ece(seed):
    generator = torch.Generator().manual_seed(seed)
    spread = torch.rand(700, 1, generator=generator, dtype=torch.float64) * 6
    probs = (torch.randn(700, 5, generator=generator, dtype=torch.float64) * spread).softmax(-1)
    preds = probs.argmax(dim=-1)
    labels = torch.where(torch.rand(700, generator=generator) < 0.7, preds, 0)
    bins = reliability_bins(probs, preds, labels)
    count = np.array(bins["count"])
    assert count.sum() == 700 and len(count) == ECE_BINS
    confidence = probs.max(dim=-1).values.numpy()
    # every image in the bin its confidence says, [j/15, (j+1)/15)
    assert np.array_equal(count, np.bincount((confidence * ECE_BINS).astype(int), minlength=15))
    filled = count > 0
    gaps = count[filled] * np.abs(
        np.array(bins["accuracy"])[filled] - np.array(bins["confidence"])[filled]
    )
    assert gaps.sum() / 700 == pytest.approx(expected_calibration_error(probs, preds, labels))
    assert np.isnan(np.array(bins["accuracy"])[~filled]).all()
    # a confidence of exactly 1 falls in the last bin (closed), not in a 16th
    one_hot = torch.eye(3, dtype=torch.float64)[torch.tensor([0, 1, 2, 2])]
    assert reliability_bins(one_hot, one_hot.argmax(-1), one_hot.argmax(-1))["count"][-1] == 4


# ---------------------------------------------------------------------------------------------
# conformal: coverage


def synthetic(seed: int, miscalibration: float, n: int = 4000, n_classes: int = 10):
    """Probabilities softmax(logits) and labels drawn from softmax(logits / miscalibration):
    well specified at 1.0, an over-confident model above."""
    logits, generator = planted(n, n_classes, seed, scale=2.5)
    return logits.softmax(dim=-1), sample(logits / miscalibration, generator)


@pytest.mark.slow  # imports a reference package or repeats re-splits
@pytest.mark.parametrize("miscalibration", [1.0, 2.5])
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lac", {}),
        ("aps", {"randomized": True}),
        ("raps", {"randomized": True, "k_reg": 2, "lam": 0.1}),
        ("raps", {"randomized": True, "k_reg": "auto", "lam": 0.01}),
    ],
)
def test_coverage_is_valid_and_tight_on_average_over_resplits(miscalibration, method, options):
    alpha, splits, tolerance = 0.1, 100, 0.005
    probs, labels = synthetic(seed=7, miscalibration=miscalibration)
    n = len(labels)
    n_cal = n // 2
    generator = torch.Generator().manual_seed(11)
    coverages = []
    for split in range(splits):
        order = torch.randperm(n, generator=generator)
        cal, test = order[:n_cal], order[n_cal:]
        fitted = conformal.fit(probs[cal], labels[cal], method, alpha, seed=split, **options)
        members = fitted.sets(probs[test])
        found = conformal.set_metrics(members, probs[test].argmax(dim=-1), labels[test])
        direct = float(members[torch.arange(len(test)), labels[test]].double().mean())
        assert found["coverage"] == pytest.approx(direct)
        coverages.append(found["coverage"])
    mean = float(np.mean(coverages))
    assert 1 - alpha - tolerance <= mean <= 1 - alpha + 1 / (n_cal + 1) + tolerance, mean


def test_nonempty_sets_only_add_the_top_class_to_empty_sets():
    probs, labels = synthetic(seed=3, miscalibration=1.0, n=3000)
    cal, test = slice(0, 1500), slice(1500, None)
    for method in ("aps", "raps"):
        # randomised APS with a loose alpha gives empty sets
        plain = conformal.fit(probs[cal], labels[cal], method, 0.4, seed=5)
        padded = conformal.fit(probs[cal], labels[cal], method, 0.4, seed=5, nonempty=True)
        assert padded.threshold == plain.threshold
        sets, padded_sets = plain.sets(probs[test]), padded.sets(probs[test])
        empty = ~sets.any(dim=1)
        assert empty.sum() > 10, method
        assert padded_sets.any(dim=1).all()
        assert torch.equal(padded_sets[~empty], sets[~empty])
        top = probs[test][empty].argmax(dim=1)
        assert torch.equal(padded_sets[empty], torch.nn.functional.one_hot(top, 10).bool())
    lac = conformal.fit(probs[cal], labels[cal], "lac", 0.4)
    assert (~lac.sets(probs[test]).any(dim=1)).sum() > 10
    lac.nonempty = True
    assert lac.sets(probs[test]).any(dim=1).all()


@pytest.mark.parametrize("randomized", [True, False])
def test_raps_without_penalty_is_aps(randomized):
    probs, labels = synthetic(seed=4, miscalibration=1.5, n=2000)
    cal, test = slice(0, 1000), slice(1000, None)
    aps = conformal.fit(probs[cal], labels[cal], "aps", 0.1, randomized=randomized, seed=3)
    raps = conformal.fit(
        probs[cal], labels[cal], "raps", 0.1, randomized=randomized, seed=3, lam=0.0, k_reg=1
    )
    assert raps.threshold == aps.threshold
    assert torch.equal(raps.sets(probs[test]), aps.sets(probs[test]))


# ---------------------------------------------------------------------------------------------
# conformal: against MAPIE


class FixedProbabilities(ClassifierMixin, BaseEstimator):
    """A prefit classifier whose input rows are its predicted probabilities."""

    def __init__(self, n_classes: int = 10) -> None:
        self.n_classes = n_classes

    def fit(self, X, y=None):
        return self

    def predict_proba(self, X):
        return np.asarray(X, dtype=np.float64)

    def predict(self, X):
        return np.asarray(X).argmax(axis=1)


def mapie_sets(
    probs: torch.Tensor,
    labels: torch.Tensor,
    test: torch.Tensor,
    alpha: float,
    score: object,
    include_last_label: bool = True,
) -> tuple[np.ndarray, float]:
    """MAPIE's split-conformal sets [N, C] for `test` and its threshold, fitted on `probs`."""
    from mapie.classification import SplitConformalClassifier

    n_classes = probs.shape[1]
    estimator = FixedProbabilities(n_classes)
    estimator.classes_ = np.arange(n_classes)
    estimator.n_features_in_ = n_classes
    mapie = SplitConformalClassifier(
        estimator, confidence_level=1 - alpha, conformity_score=score, prefit=True
    )
    mapie.conformalize(probs.numpy(), labels.numpy())
    _, sets = mapie.predict_set(
        test.numpy(), conformity_score_params={"include_last_label": include_last_label}
    )
    # MAPIE keeps its threshold on the v0 classifier its v1 class wraps (no public accessor)
    threshold = float(mapie._mapie_classifier.conformity_score_function_.quantiles_[0])
    return sets[:, :, 0], threshold


def deterministic_aps():
    """MAPIE's APS with the calibration score left un-randomised.

    MAPIE 1.x always randomises the APS calibration score (cumulative mass through the true
    class minus U * its own probability); `include_last_label` only chooses what a prediction
    set does with the class that crosses the threshold. Our `randomized=False` scores the whole
    cumulative mass, so this subclass returns MAPIE's own un-randomised cumulative mass
    (`get_true_label_cumsum_proba`) and keeps the rest of MAPIE (quantile, set construction).
    """
    from mapie.conformity_scores import APSConformityScore

    class DeterministicAPS(APSConformityScore):
        def get_conformity_scores(self, y, y_pred, y_enc=None, **kwargs):
            scores, self.cutoff = self.get_true_label_cumsum_proba(y, y_pred, self.classes)
            return scores

    return DeterministicAPS()


# MAPIE compares with a margin: a class is in a set when its score is within this of the threshold
MAPIE_EPSILON = 1e-8


def clear_of_the_threshold(scores: torch.Tensor, threshold: float) -> bool:
    """No score within MAPIE's margin of the threshold, where the two rules could differ."""
    return bool(((scores - threshold).abs() > MAPIE_EPSILON).all())


@pytest.mark.slow  # imports a reference package or repeats re-splits
@pytest.mark.parametrize(("seed", "alpha"), [(0, 0.1), (1, 0.05), (2, 0.2), (3, 0.1)])
def test_lac_sets_equal_mapie(seed, alpha):
    probs, labels = synthetic(seed=seed, miscalibration=1.5, n=3000)
    cal, test = slice(0, 1200), slice(1200, None)
    ours = conformal.fit(probs[cal], labels[cal], "lac", alpha)
    theirs, threshold = mapie_sets(probs[cal], labels[cal], probs[test], alpha, "lac")
    # both take the ceil((n + 1)(1 - alpha))-th smallest score: the very same float
    assert ours.threshold == threshold
    assert clear_of_the_threshold(ours.scores(probs[test]), ours.threshold)
    members = ours.sets(probs[test]).numpy()
    assert members.sum() > 0 and np.array_equal(members, theirs)


@pytest.mark.slow  # imports a reference package or repeats re-splits
@pytest.mark.parametrize(("seed", "alpha"), [(0, 0.1), (1, 0.05), (2, 0.2)])
def test_deterministic_aps_sets_equal_mapie(seed, alpha):
    """Our APS with randomized=False against MAPIE's APS with an un-randomised calibration
    score (see deterministic_aps), both ways MAPIE builds a set:

    - include_last_label=False keeps the classes whose cumulative mass is at most the threshold,
      and the top class when there is none: our sets with nonempty=True, exactly;
    - include_last_label=True (MAPIE's default) also keeps the first class whose cumulative mass
      passes the threshold (Romano et al.'s conservative non-randomised set): our set plus the
      next class by rank, when ours is not every class already.
    """
    probs, labels = synthetic(seed=seed, miscalibration=1.5, n=3000)
    cal, test = slice(0, 1200), slice(1200, None)
    ours = conformal.fit(probs[cal], labels[cal], "aps", alpha, randomized=False)
    ours_nonempty = conformal.fit(
        probs[cal], labels[cal], "aps", alpha, randomized=False, nonempty=True
    )
    assert clear_of_the_threshold(ours.scores(probs[test]), ours.threshold)

    without_last, threshold = mapie_sets(
        probs[cal], labels[cal], probs[test], alpha, deterministic_aps(), include_last_label=False
    )
    assert ours.threshold == pytest.approx(threshold, abs=1e-12)  # cumsum orders may differ
    assert np.array_equal(ours_nonempty.sets(probs[test]).numpy(), without_last)

    with_last, _ = mapie_sets(
        probs[cal], labels[cal], probs[test], alpha, deterministic_aps(), include_last_label=True
    )
    members = ours.sets(probs[test])
    sizes = members.sum(dim=1)
    order = probs[test].argsort(dim=1, descending=True)
    expected = members.clone()
    grow = sizes < probs.shape[1]
    expected[grow.nonzero().squeeze(1), order[grow, sizes[grow]]] = True
    assert np.array_equal(expected.numpy(), with_last)
    assert np.array_equal(with_last.sum(axis=1), np.minimum(sizes.numpy() + 1, probs.shape[1]))


# ---------------------------------------------------------------------------------------------
# conformal: RAPS against a re-statement of Angelopoulos et al. 2021


def reference_raps_scores(probs: np.ndarray, u: np.ndarray | None, k_reg: int, lam: float):
    """Every class's RAPS score, written out one image and one class at a time: the mass of
    the classes ranked above it, plus its own mass (times 1 - U when randomised: with U our
    uniform draw, 1 - U is the paper's), plus lam * (rank - k_reg)+ with the 1-based rank (the
    paper's penalty vector, lam from rank k_reg + 1 on, summed over the ranks up to the
    class's own)."""
    n, n_classes = probs.shape
    scores = np.empty_like(probs)
    for i in range(n):
        ranked = sorted(range(n_classes), key=lambda c: -probs[i, c])
        above = 0.0
        for rank, c in enumerate(ranked, start=1):
            own = probs[i, c] if u is None else (1.0 - u[i]) * probs[i, c]
            penalty = sum(lam for j in range(1, rank + 1) if j > k_reg)
            scores[i, c] = above + own + penalty
            above += probs[i, c]
    return scores


@pytest.mark.parametrize(
    ("method", "randomized", "k_reg", "lam", "alpha"),
    [
        ("raps", False, 2, 0.1, 0.1),
        ("raps", True, 1, 0.5, 0.1),
        ("raps", True, "auto", 0.01, 0.05),
        ("raps", False, 0, 0.2, 0.2),
        ("aps", True, 0, 0.0, 0.1),  # APS is RAPS without a penalty
        ("aps", False, 0, 0.0, 0.05),
    ],
)
def test_raps_and_aps_equal_a_restatement_of_the_paper(method, randomized, k_reg, lam, alpha):
    """MAPIE's RAPS can't be matched: it always splits off 20% of the calibration images to tune
    k_reg and lambda (lambda from a grid, by set size), and randomises its calibration scores.
    Nor can MAPIE's randomised APS: its U comes from numpy's generator, ours from torch's."""
    probs, labels = synthetic(seed=5, miscalibration=1.5, n=600, n_classes=6)
    cal, test = slice(0, 300), slice(300, None)
    seed = 9
    options = {"k_reg": k_reg, "lam": lam} if method == "raps" else {}
    ours = conformal.fit(
        probs[cal], labels[cal], method, alpha, randomized=randomized, seed=seed, **options
    )
    cal_probs, test_probs = probs[cal].numpy(), probs[test].numpy()
    cal_labels = labels[cal].numpy()
    n = len(cal_labels)
    if k_reg == "auto":
        ranks = sorted(
            1 + int((cal_probs[i] > cal_probs[i, cal_labels[i]]).sum()) for i in range(n)
        )
        k_reg = ranks[math.ceil((n + 1) * (1 - alpha)) - 1]
    assert ours.k_reg == k_reg and ours.lam == lam
    # our generator's draws, in the order fit() then sets() take them: one U per image
    draws = torch.rand(
        len(probs), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    u_cal = draws[:n].numpy() if randomized else None
    u_test = draws[n:].numpy() if randomized else None
    cal_scores = reference_raps_scores(cal_probs, u_cal, k_reg, lam)
    true_scores = sorted(cal_scores[i, cal_labels[i]] for i in range(n))
    threshold = true_scores[math.ceil((n + 1) * (1 - alpha)) - 1]
    assert ours.threshold == pytest.approx(threshold, abs=1e-12)
    test_scores = reference_raps_scores(test_probs, u_test, k_reg, lam)
    np.testing.assert_allclose(ours.scores(probs[test]).numpy(), test_scores, atol=1e-12)
    # a fresh fit draws the same calibration U again, then the test images' U
    refit = conformal.fit(
        probs[cal], labels[cal], method, alpha, randomized=randomized, seed=seed, **options
    )
    expected = test_scores <= threshold
    assert 0 < expected.sum() < expected.size
    assert np.array_equal(refit.sets(probs[test]).numpy(), expected)


# ---------------------------------------------------------------------------------------------
# conformal: the errors a user can cause


def test_fit_refuses_bad_settings_with_user_errors():
    probs, labels = synthetic(seed=0, miscalibration=1.0, n=50, n_classes=4)
    for alpha in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="alpha must lie in"):
            conformal.fit(probs, labels, "lac", alpha)
    with pytest.raises(UserError, match="split is empty"):
        conformal.fit(probs[:0], labels[:0], "lac", 0.1)
    # alpha 0.01 needs ceil((n + 1) * 0.99) <= n: 99 images
    with pytest.raises(UserError, match="needs at least 99 calibration images"):
        conformal.fit(probs, labels, "aps", 0.01)
    assert conformal.fit(probs[:19], labels[:19], "lac", 0.05).threshold < math.inf
    with pytest.raises(UserError, match="at least 19 calibration images"):
        conformal.fit(probs[:18], labels[:18], "lac", 0.05)
    for method in ("lacs", "none", "APS", ""):
        with pytest.raises(UserError, match="valid: lac, aps, raps") as error:
            conformal.fit(probs, labels, method, 0.1)
        assert repr(method) in str(error.value)
    with pytest.raises(UserError, match="k_reg"):
        conformal.fit(probs, labels, "raps", 0.1, k_reg=-1)
    with pytest.raises(UserError, match="lam"):
        conformal.fit(probs, labels, "raps", 0.1, lam=-0.5)


# ---------------------------------------------------------------------------------------------
# calsplit.stratified_holdout


@pytest.mark.parametrize("fraction", [0.5, 0.3, 0.1, 0.77])
def test_the_stratified_holdout_is_a_stratified_partition_fixed_by_its_seed(fraction):
    rng = np.random.default_rng(0)
    counts = {0: 50, 1: 31, 2: 17, 3: 8, 4: 3, 5: 2}
    labels = [label for label, count in counts.items() for _ in range(count)]
    labels = rng.permutation(labels).tolist()
    held, rest = stratified_holdout(labels, fraction, seed=0)
    assert not set(held) & set(rest)
    assert sorted(held + rest) == list(range(len(labels)))
    assert held == sorted(held) and rest == sorted(rest)
    held_counts = Counter(labels[i] for i in held)
    for label, count in counts.items():
        assert abs(held_counts[label] - fraction * count) <= 1, (label, held_counts[label])
    assert stratified_holdout(labels, fraction, seed=0) == (held, rest)
    assert stratified_holdout(labels, fraction, seed=1) != (held, rest)


def test_the_stratified_holdout_on_random_label_sets():
    """The per-class bound relative to the holdout's size: scikit-learn holds out
    ceil(fraction * n) images and gives each class the floor or the ceiling of its share of
    them. Relative to fraction * count a class can be off by a little more than 1 (counts
    [2, 38] at fraction 0.734 hold out 29 of the 38, where 0.734 * 38 = 27.9)."""
    rng = np.random.default_rng(1)
    for case in range(100):
        counts = rng.integers(2, 40, size=rng.integers(2, 8))
        fraction = float(rng.uniform(0.05, 0.95))
        labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
        try:
            held, rest = stratified_holdout(labels.tolist(), fraction, seed=case)
        except UserError:  # a part too small to hold every class
            continue
        assert sorted(held + rest) == list(range(len(labels)))
        assert len(held) == math.ceil(fraction * len(labels))
        held_counts = np.bincount(labels[held], minlength=len(counts))
        share = len(held) * counts / len(labels)
        assert (np.abs(held_counts - share) < 1).all(), (counts, fraction, held_counts)
        assert (np.abs(held_counts - fraction * counts) < 1 + counts / len(labels)).all()


def test_the_holdout_of_a_singleton_class_is_not_stratified_but_still_a_partition():
    labels = [0] * 20 + [1] * 10 + [2]
    held, rest = stratified_holdout(labels, 0.5, seed=3)
    assert sorted(held + rest) == list(range(len(labels)))
    assert len(held) == math.ceil(0.5 * len(labels))


def test_a_holdout_too_small_for_the_classes_is_a_user_error():
    with pytest.raises(UserError, match="holdout_fraction=0.1 cannot split 6 images"):
        stratified_holdout([0, 0, 1, 1, 2, 2], 0.1, seed=0)
