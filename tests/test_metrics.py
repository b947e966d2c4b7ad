"""Metrics against reference implementations (scikit-learn, torchmetrics) with fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss

from ml_infer.aggregate import HardVoting, Predictions
from ml_infer.metrics import (
    brier,
    classification_metrics,
    expected_calibration_error,
    speed_metrics,
    wilson_interval,
)


def random_predictions(seed: int, n: int = 500, classes: int = 7):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    logits = torch.randn(n, classes, generator=generator) * 2
    logits[torch.arange(n), labels] += 1.5  # better than chance, not perfect
    probs = logits.softmax(-1)
    return probs, probs.argmax(-1), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_scikit_learn(seed):
    probs, preds, labels = random_predictions(seed)
    metrics = classification_metrics(probs, preds, labels)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6)
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-6)
    probs64 = probs.double() / probs.double().sum(1, keepdim=True)
    assert metrics["nll"] == pytest.approx(
        log_loss(labels, probs64.numpy(), labels=range(7)), abs=1e-5
    )
    one_hot = np.eye(7)[labels.numpy()]
    assert metrics["brier"] == pytest.approx(
        ((probs.numpy() - one_hot) ** 2).sum(1).mean(), abs=1e-6
    )
    assert metrics["accuracy_ci95_low"] < metrics["accuracy"] < metrics["accuracy_ci95_high"]


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_torchmetrics(seed):
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, preds, labels = random_predictions(seed)
    expected = multiclass_calibration_error(probs, labels, num_classes=7, n_bins=15, norm="l1")
    assert expected_calibration_error(probs, preds, labels) == pytest.approx(
        float(expected), abs=1e-6
    )


def test_ece_of_a_perfectly_calibrated_bin_is_zero():
    # Confidence 0.75 and 3 of 4 right: calibrated.
    probs = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, probs.argmax(-1), labels) == pytest.approx(
        0.0, abs=1e-7
    )


def test_vote_shares_keep_nll_finite():
    probs = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]]])
    merged = HardVoting()(Predictions.from_probs(probs))  # all votes for class 0
    metrics = classification_metrics(merged.probs, merged.preds, torch.tensor([1]))
    assert metrics["accuracy"] == 0.0
    assert np.isfinite(metrics["nll"]) and metrics["nll"] == pytest.approx(
        -np.log(np.finfo(np.float32).eps), rel=1e-5
    )


def test_brier_of_perfect_and_uniform_predictions():
    labels = torch.tensor([0, 1])
    assert brier(torch.eye(2), labels) == 0.0
    assert brier(torch.full((2, 2), 0.5), labels) == pytest.approx(0.5)


def test_wilson_interval_reference_values():
    # statsmodels' proportion_confint(95, 100, method="wilson"): (0.88825, 0.97846)
    assert wilson_interval(95, 100) == pytest.approx((0.88825, 0.97846), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_speed_metrics():
    speed = speed_metrics(1000, 2.0, [0.010, 0.020, 0.030, 0.040, 0.100])
    assert speed["images_per_s"] == 500
    assert speed["latency_ms_p50"] == pytest.approx(30.0)
    assert speed["latency_ms_p95"] == pytest.approx(88.0)


def test_mcnemar_p_equals_scipys_exact_binomial_test():
    """Our two-sided Binomial(n, 1/2) p-value against scipy's binomtest: every (k, n) up to 60
    exactly to 1e-12, and large n (summed in log space) to 1e-8."""
    from scipy.stats import binomtest

    from ml_infer.metrics import binomial_half_two_sided_p, mcnemar_p_value

    for n in range(1, 61):
        for k in range(n + 1):
            expected = binomtest(k, n, 0.5).pvalue
            assert binomial_half_two_sided_p(k, n) == pytest.approx(expected, rel=1e-12, abs=0)
    for k, n in ((2400, 5000), (99_000, 200_000), (10, 1000)):
        expected = binomtest(k, n, 0.5).pvalue
        assert binomial_half_two_sided_p(k, n) == pytest.approx(expected, rel=1e-8, abs=0)
    this = torch.tensor([1] * 7 + [0] * 2 + [1] * 5)
    baseline = torch.tensor([0] * 7 + [1] * 2 + [1] * 5)
    assert mcnemar_p_value(this, baseline) == pytest.approx(binomtest(2, 9, 0.5).pvalue)
    assert mcnemar_p_value(baseline, baseline) == 1.0
