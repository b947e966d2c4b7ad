"""Aggregators against hand-computed examples, and weight validation."""

from __future__ import annotations

import math

import pytest
import torch

from ml_infer.aggregate import (
    GeometricMean,
    HardVoting,
    Max,
    Median,
    Min,
    Predictions,
    SoftVoting,
    TSharpen,
    Weighted,
    normalised_weights,
)
from ml_infer.config import instantiate_named, options
from ml_infer.errors import UserError

# Three members (views or models), two images, three classes.
PROBS = torch.tensor(
    [
        [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]],
        [[0.1, 0.7, 0.2], [0.3, 0.3, 0.4]],
        [[0.5, 0.1, 0.4], [0.1, 0.1, 0.8]],
    ]
)
MEMBERS = Predictions.from_probs(PROBS)


def close(actual: torch.Tensor, expected: list) -> bool:
    return torch.allclose(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6)


def test_mean_averages_probabilities():
    merged = SoftVoting()(MEMBERS)
    # image 0: (0.6+0.1+0.5)/3, (0.3+0.7+0.1)/3, (0.1+0.2+0.4)/3
    assert close(merged.probs, [[0.4, 1.1 / 3, 0.7 / 3], [0.2, 0.3, 0.5]])
    assert merged.preds.tolist() == [0, 2]


def test_max_takes_per_class_maximum_then_renormalises():
    merged = Max()(MEMBERS)
    # image 0: max per class (0.6, 0.7, 0.4), sum 1.7
    assert close(merged.probs[0], [0.6 / 1.7, 0.7 / 1.7, 0.4 / 1.7])
    # image 1: (0.3, 0.5, 0.8), sum 1.6
    assert close(merged.probs[1], [0.3 / 1.6, 0.5 / 1.6, 0.8 / 1.6])
    assert merged.preds.tolist() == [1, 2]


def test_geometric_mean():
    merged = GeometricMean()(MEMBERS)
    expected = PROBS[:, 0].log().mean(0).exp()
    assert close(merged.probs[0], (expected / expected.sum()).tolist())


def test_median_takes_the_per_class_median_then_renormalises():
    merged = Median()(MEMBERS)
    # image 0: medians (0.5, 0.3, 0.2), sum 1.0; image 1: (0.2, 0.3, 0.4), sum 0.9
    assert close(merged.probs, [[0.5, 0.3, 0.2], [0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]])
    assert merged.preds.tolist() == [0, 2]


def test_min_keeps_what_every_member_believes():
    merged = Min()(MEMBERS)
    # image 0: minima (0.1, 0.1, 0.1) -> uniform; image 1: (0.1, 0.1, 0.3), sum 0.5
    assert close(merged.probs, [[1 / 3, 1 / 3, 1 / 3], [0.2, 0.2, 0.6]])
    zeros = Predictions.from_probs(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert close(Min()(zeros).probs, [[0.5, 0.5]])  # nothing in common: uniform, not NaN


def test_tsharpen_powers_probabilities_not_logits():
    merged = TSharpen(t=0.5)(MEMBERS)
    expected = PROBS.sqrt().mean(dim=0)
    assert close(merged.probs, (expected / expected.sum(dim=-1, keepdim=True)).tolist())
    assert torch.isfinite(merged.probs).all()
    assert close(TSharpen(t=1.0)(MEMBERS).probs, SoftVoting()(MEMBERS).probs.tolist())
    with pytest.raises(UserError, match="t must be a positive number"):
        TSharpen(t=-1)


@pytest.mark.parametrize("cls", [Median, Min])
def test_order_statistics_take_no_weights(cls):
    with pytest.raises(UserError, match="takes no weights"):
        cls([0.5, 0.5])


def test_vote_takes_majority_and_reports_vote_shares():
    merged = HardVoting()(MEMBERS)
    # image 0: votes 0, 1, 0 -> class 0 with 2/3; image 1: votes 1, 2, 2 -> class 2
    assert merged.preds.tolist() == [0, 2]
    assert close(merged.probs, [[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]])


def test_vote_tie_goes_to_larger_summed_probability():
    # Two members: one votes class 2 (0.55), one votes class 0 (0.5); class 0's summed prob wins:
    # class 0: 0.45 + 0.5 = 0.95, class 2: 0.55 + 0.1 = 0.65.
    probs = torch.tensor([[[0.45, 0.0, 0.55]], [[0.5, 0.4, 0.1]]])
    merged = HardVoting()(Predictions.from_probs(probs))
    assert merged.preds.tolist() == [0]
    assert close(merged.probs, [[0.5, 0.0, 0.5]])


def test_vote_tie_with_equal_summed_probability_goes_to_lowest_index():
    probs = torch.tensor([[[0.2, 0.0, 0.8]], [[0.8, 0.0, 0.2]]])
    assert HardVoting()(Predictions.from_probs(probs)).preds.tolist() == [0]


def test_hard_voting_uses_members_own_predictions():
    # A member's tie-broken prediction can differ from the argmax of its probs; the vote counts it.
    probs = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]], [[0.9, 0.1]]])
    members = Predictions(probs, torch.tensor([[1], [1], [0]]))
    assert HardVoting()(members).preds.tolist() == [1]


def test_weighted_ensemble():
    merged = Weighted([0.4, 0.3, 0.3])(MEMBERS)
    # image 0: 0.4*(.6,.3,.1) + 0.3*(.1,.7,.2) + 0.3*(.5,.1,.4) = (.42, .36, .22)
    assert close(merged.probs[0], [0.42, 0.36, 0.22])
    # image 1: 0.4*(.2,.5,.3) + 0.3*(.3,.3,.4) + 0.3*(.1,.1,.8) = (.20, .32, .48)
    assert close(merged.probs[1], [0.20, 0.32, 0.48])


def test_weights_are_normalised_and_soft_voting_with_weights_is_weighted():
    unnormalised = SoftVoting([4, 3, 3])(MEMBERS)
    assert torch.allclose(unnormalised.probs, Weighted([0.4, 0.3, 0.3])(MEMBERS).probs)


def test_weighted_hard_voting():
    # votes: 0, 1, 0 for image 0 -> with weights (0.2, 0.7, 0.1) class 1 has 0.7 of the vote.
    merged = HardVoting([0.2, 0.7, 0.1])(MEMBERS)
    assert merged.preds.tolist()[0] == 1
    assert close(merged.probs[0], [0.3, 0.7, 0.0])


@pytest.mark.parametrize(
    "aggregator", [SoftVoting(), Max(), GeometricMean(), HardVoting(), Median(), Min(), TSharpen()]
)
def test_single_member_is_returned_unchanged(aggregator):
    one = Predictions(PROBS[:1], torch.tensor([[2, 0]]))
    merged = aggregator(one)
    assert torch.equal(merged.probs, PROBS[0])
    assert merged.preds.tolist() == [2, 0]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([0.5, -0.1, 0.6], "non-negative"),
        ([0, 0, 0], "all zero"),
        ([0.5, math.nan, 0.5], "finite"),
        ([0.5, math.inf, 0.5], "finite"),
        (["a", 1, 1], "numbers"),
    ],
)
def test_bad_weights_are_rejected(weights, message):
    with pytest.raises(UserError, match=message):
        Weighted(weights)


def test_wrong_number_of_weights_is_rejected():
    with pytest.raises(UserError, match="2 ensemble weights for 3 checkpoints"):
        Weighted([0.5, 0.5])(MEMBERS)


def test_weighted_without_weights_is_rejected():
    with pytest.raises(UserError, match="needs ensemble.weights"):
        Weighted()


def test_normalised_weights():
    assert normalised_weights([1, 1, 2]).tolist() == [0.25, 0.25, 0.5]


@pytest.mark.parametrize(
    ("group", "name", "cls"),
    [
        ("tta_aggregation", "mean", SoftVoting),
        ("tta_aggregation", "max", Max),
        ("tta_aggregation", "vote", HardVoting),
        ("tta_aggregation", "gmean", GeometricMean),
        ("tta_aggregation", "median", Median),
        ("tta_aggregation", "min", Min),
        ("tta_aggregation", "tsharpen", TSharpen),
        ("ensemble_aggregation", "soft_voting", SoftVoting),
        ("ensemble_aggregation", "hard_voting", HardVoting),
    ],
)
def test_aggregators_are_built_from_their_yaml(group, name, cls):
    assert type(instantiate_named(group, name, "aggregation")) is cls


def test_unknown_aggregation_lists_valid_names():
    valid = ", ".join(options("tta_aggregation"))
    with pytest.raises(UserError, match=rf"unknown TTA aggregation 'avg'; valid: {valid}$"):
        instantiate_named("tta_aggregation", "avg", "TTA aggregation")
