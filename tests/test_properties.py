"""Property-based tests (hypothesis) of the aggregators and the metrics.

The aggregators must not care about member order or the scale of their weights, must return
distributions, break hard-voting ties as documented and hand a single member back unchanged.
The metrics must agree with plain numpy / fractions references written here, and ECE with
torchmetrics. No expected value is hard-coded: every check compares two computations.

Inputs mix arbitrary floats with small integers before rows are normalised, so that exact ties
(equal votes, equal summed probabilities, confidences on bin edges) come up often.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
from ml_infer.errors import UserError
from ml_infer.metrics import ECE_BINS, brier, expected_calibration_error, nll

# No example database: it would write .hypothesis/ into the working tree.
FAST = settings(max_examples=20, deadline=None, database=None)
THOROUGH = settings(max_examples=80, deadline=None, database=None)

# float32 sums of a handful of probabilities in [0, 1]
ATOL = 1e-6
# float32 accumulations over up to 200 samples
METRIC_ATOL = 1e-5

SOFT = {
    "mean": SoftVoting,
    "max": Max,
    "gmean": GeometricMean,
    "median": Median,
    "min": Min,
    "tsharpen": TSharpen,
}
WEIGHTABLE = {"mean": SoftVoting, "weighted": Weighted, "gmean": GeometricMean}
# preds = argmax of the merged probs
ARGMAX_PREDS = {"mean", "weighted", "max", "gmean", "median", "min", "tsharpen"}

# Small integers give grid rows (k / sum), arbitrary floats the rest.
ELEMENT = st.one_of(st.integers(0, 10).map(float), st.floats(0.0, 1.0))
WEIGHT = st.one_of(st.just(0.0), st.integers(1, 5).map(float), st.floats(1e-3, 1e3))
SCALE = st.floats(1e-3, 1e3)


def normalise_rows(raw: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of non-negative values scaled to sum to 1 (an all-zero row becomes one-hot at 0)."""
    raw = np.array(raw, dtype=np.float64)
    raw[raw.sum(axis=-1) == 0, 0] = 1.0
    return torch.from_numpy(raw / raw.sum(axis=-1, keepdims=True)).to(dtype)


@st.composite
def member_probs(draw, min_members: int = 1, max_members: int = 6) -> torch.Tensor:
    """Probabilities [N members, B images, C classes], float32 rows summing to 1."""
    shape = (
        draw(st.integers(min_members, max_members)),
        draw(st.integers(1, 4)),
        draw(st.integers(2, 6)),
    )
    return normalise_rows(draw(hnp.arrays(np.float64, shape, elements=ELEMENT)))


@st.composite
def members(draw, min_members: int = 1, max_members: int = 6) -> Predictions:
    """Members whose preds are their argmax or, half of the time, arbitrary classes."""
    probs = draw(member_probs(min_members, max_members))
    if draw(st.booleans()):
        return Predictions.from_probs(probs)
    n, b, c = probs.shape
    preds = draw(hnp.arrays(np.int64, (n, b), elements=st.integers(0, c - 1)))
    return Predictions(probs, torch.from_numpy(preds))


@st.composite
def weights_for(draw, n: int) -> list[float]:
    """n valid weights: finite, non-negative, at least one positive."""
    weights = draw(st.lists(WEIGHT, min_size=n, max_size=n))
    if not any(w > 0 for w in weights):
        weights[draw(st.integers(0, n - 1))] = draw(st.floats(1e-3, 1e3))
    return weights


def permute(m: Predictions, order: list[int]) -> Predictions:
    index = torch.tensor(order)
    return Predictions(m.probs[index], m.preds[index])


def assert_argmax_up_to_float_ties(preds: torch.Tensor, probs: torch.Tensor) -> None:
    """Each pred is a maximiser of its row of `probs`, up to float32 rounding."""
    chosen = probs.gather(1, preds.view(-1, 1)).squeeze(1)
    assert torch.all(chosen >= probs.amax(dim=1) - ATOL), (preds, probs)


AGGREGATORS = [
    ("mean", False),
    ("mean", True),
    ("weighted", True),
    ("max", False),
    ("gmean", False),
    ("gmean", True),
    ("median", False),
    ("min", False),
    ("tsharpen", False),
    ("vote", False),
    ("vote", True),
]


def make_aggregator(name: str, weights: list[float] | None):
    make = {**SOFT, **WEIGHTABLE, "vote": HardVoting}[name]
    return make() if weights is None else make(weights)


# 1. Member order does not matter ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SOFT))
@FAST
@given(m=members(min_members=2), data=st.data())
def test_soft_aggregators_ignore_member_order(name, m, data):
    order = data.draw(st.permutations(range(len(m.probs))), label="order")
    merged = SOFT[name]()(m)
    permuted = SOFT[name]()(permute(m, order))
    torch.testing.assert_close(permuted.probs, merged.probs, atol=ATOL, rtol=1e-5)
    # float sums in another order may flip an argmax between (mathematically) tied classes
    assert_argmax_up_to_float_ties(permuted.preds, merged.probs)


@pytest.mark.parametrize("name", sorted(WEIGHTABLE))
@FAST
@given(m=members(min_members=2), data=st.data())
def test_weighted_aggregators_ignore_member_order_with_their_weights(name, m, data):
    n = len(m.probs)
    weights = data.draw(weights_for(n), label="weights")
    order = data.draw(st.permutations(range(n)), label="order")
    merged = WEIGHTABLE[name](weights)(m)
    permuted = WEIGHTABLE[name]([weights[i] for i in order])(permute(m, order))
    torch.testing.assert_close(permuted.probs, merged.probs, atol=ATOL, rtol=1e-5)
    assert_argmax_up_to_float_ties(permuted.preds, merged.probs)


@st.composite
def hard_voting_orders(draw) -> tuple[Predictions, list[float] | None, list[int]]:
    """Members (random ones, optionally weighted, or a vote tie), and another member order."""
    if draw(st.booleans(), label="tie"):
        m, _ = draw(vote_ties())
        weights = None
    else:
        m = draw(members(min_members=2))
        weights = draw(st.none() | weights_for(len(m.probs)), label="weights")
    return m, weights, draw(st.permutations(range(len(m.probs))), label="order")


# Votes 1, 0, 2 (a three-way tie); classes 0 and 2 both sum to exactly 1.2, class 1 to 0.6.
THREE_WAY_TIE = Predictions.from_probs(
    torch.tensor([[[0.2, 0.6, 0.2]], [[0.9, 0.0, 0.1]], [[0.1, 0.0, 0.9]]])
)


@THOROUGH
@example(case=(THREE_WAY_TIE, None, [0, 2, 1]))
@given(case=hard_voting_orders())
def test_hard_voting_ignores_member_order(case):
    """Tie-breaks (summed probability, then lowest index) do not depend on member order."""
    m, weights, order = case
    merged = HardVoting(weights)(m)
    permuted_weights = None if weights is None else [weights[i] for i in order]
    permuted = HardVoting(permuted_weights)(permute(m, order))
    torch.testing.assert_close(permuted.probs, merged.probs, atol=ATOL, rtol=1e-5)
    assert permuted.preds.tolist() == merged.preds.tolist()


# 2. Weights are scale-invariant ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["mean", "weighted", "gmean", "vote"])
@FAST
@given(m=members(min_members=2), scale=SCALE, data=st.data())
def test_weights_are_scale_invariant(name, m, scale, data):
    make = {**WEIGHTABLE, "vote": HardVoting}[name]
    weights = data.draw(weights_for(len(m.probs)), label="weights")
    merged = make(weights)(m)
    scaled = make([scale * w for w in weights])(m)
    torch.testing.assert_close(scaled.probs, merged.probs, atol=ATOL, rtol=1e-5)
    if name == "vote":
        assert scaled.preds.tolist() == merged.preds.tolist()
    else:
        assert_argmax_up_to_float_ties(scaled.preds, merged.probs)


@pytest.mark.parametrize("name", ["mean", "gmean", "vote"])
@FAST
@given(m=members(min_members=2), scale=SCALE)
def test_equal_weights_are_no_weights(name, m, scale):
    make = {"mean": SoftVoting, "gmean": GeometricMean, "vote": HardVoting}[name]
    unweighted = make()(m)
    equal = make([scale] * len(m.probs))(m)
    torch.testing.assert_close(equal.probs, unweighted.probs, atol=ATOL, rtol=1e-5)
    if name == "vote":
        assert equal.preds.tolist() == unweighted.preds.tolist()
    else:
        assert_argmax_up_to_float_ties(equal.preds, unweighted.probs)


# 3. Outputs are distributions ------------------------------------------------------------------


@pytest.mark.parametrize(("name", "weighted"), AGGREGATORS)
@FAST
@given(m=members(), data=st.data())
def test_merged_rows_are_distributions(name, weighted, m, data):
    n, b, c = m.probs.shape
    weights = data.draw(weights_for(n), label="weights") if weighted else None
    merged = make_aggregator(name, weights)(m)
    assert merged.probs.shape == (b, c) and merged.probs.dtype == m.probs.dtype
    assert merged.preds.shape == (b,) and merged.preds.dtype == torch.int64
    assert torch.isfinite(merged.probs).all()
    assert (merged.probs >= 0).all()
    torch.testing.assert_close(merged.probs.sum(dim=1), torch.ones(b), atol=1e-5, rtol=0)
    assert ((merged.preds >= 0) & (merged.preds < c)).all()
    if n == 1:
        return  # a single member is itself (see test_single_member_is_returned_unchanged)
    if name in ARGMAX_PREDS:
        assert merged.preds.tolist() == merged.probs.argmax(dim=1).tolist()
    else:
        # a vote's winner has the largest vote share; unweighted shares are multiples of 1/n
        assert_argmax_up_to_float_ties(merged.preds, merged.probs)
        if weights is None:
            votes = merged.probs * n
            torch.testing.assert_close(votes, votes.round(), atol=1e-4, rtol=0)


# 4. Hard-voting ties break as documented ------------------------------------------------------


@st.composite
def vote_ties(draw) -> tuple[Predictions, list[int]]:
    """One image; two or more classes share the most votes; each member's pred is its argmax.

    Half of the time two of the tied classes get exactly equal summed probabilities: their
    voters come in pairs whose probability vectors are mirror images in those two classes, and
    every other member gives both the same probability.
    """
    c = draw(st.integers(2, 5), label="classes")
    tied = draw(st.lists(st.integers(0, c - 1), min_size=2, max_size=c, unique=True))
    top = draw(st.integers(1, 2), label="votes per tied class")
    votes = [cls for cls in tied for _ in range(top)]
    for cls in range(c):
        if cls not in tied:
            votes += [cls] * draw(st.integers(0, top - 1))
    mirror = draw(st.booleans(), label="mirror")
    a, b = tied[0], tied[1]

    def row(vote: int) -> np.ndarray:
        raw = draw(hnp.arrays(np.float64, (c,), elements=ELEMENT))
        if mirror and vote not in (a, b):
            raw[a] = raw[b] = min(raw[a], raw[b])
        raw[vote] = raw.max() + draw(st.one_of(st.integers(1, 3).map(float), st.floats(0.01, 1)))
        return raw

    rows: list[np.ndarray] = []
    for vote in votes:
        if mirror and vote == b:
            continue  # b's voters are the mirror images of a's
        raw = row(vote)
        rows.append(raw)
        if mirror and vote == a:
            twin = raw.copy()
            twin[[a, b]] = twin[[b, a]]
            rows.append(twin)
    order = draw(st.permutations(range(len(rows))), label="member order")
    probs = normalise_rows(np.stack([rows[i] for i in order])[:, None, :])
    return Predictions.from_probs(probs), tied


@THOROUGH
@example(case=(THREE_WAY_TIE, [0, 1, 2]))
@given(case=vote_ties())
def test_hard_voting_ties_go_to_larger_summed_probability_then_lower_index(case):
    m, tied = case
    n = len(m.probs)
    counts = np.bincount(m.preds[:, 0].numpy(), minlength=m.probs.shape[-1])
    assert sorted(np.flatnonzero(counts == counts.max()).tolist()) == sorted(tied)
    # exact summed probabilities of the tied classes (the inputs are float32 values)
    summed = {k: sum(Fraction(float(p)) for p in m.probs[:, 0, k]) for k in tied}
    best = max(summed.values())
    merged = HardVoting()(m)
    winner = int(merged.preds[0])
    torch.testing.assert_close(merged.probs[0], torch.from_numpy(counts / n).float())
    assert winner in tied
    # float32 sums of n probabilities each weighted 1/n are good to ~n ulp; in summed units:
    close = 1e-5 * n
    if all(best - s > close for s in summed.values() if s != best):
        # the larger sum wins; an exact tie of sums goes to the lowest index
        assert winner == min(k for k in tied if summed[k] == best), (winner, summed)
    else:
        # sums closer than float32 tells apart (but not equal): any of the close ones
        assert best - summed[winner] <= close, (winner, summed)


# 5. One member is itself ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "weighted"), AGGREGATORS)
@FAST
@given(
    m=members(min_members=1, max_members=1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    weight=st.floats(1e-3, 1e3),
)
def test_single_member_is_returned_unchanged(name, weighted, m, dtype, weight):
    single = Predictions(m.probs.to(dtype), m.preds)
    merged = make_aggregator(name, [weight] if weighted else None)(single)
    assert merged.probs.dtype == dtype
    assert torch.equal(merged.probs, single.probs[0])
    assert torch.equal(merged.preds, single.preds[0])


@pytest.mark.parametrize(("name", "weighted"), AGGREGATORS)
@FAST
@given(m=members(min_members=1, max_members=1), copies=st.integers(2, 5), data=st.data())
def test_copies_of_one_member_merge_to_that_member(name, weighted, m, copies, data):
    """N identical members: soft aggregators give the member back (tsharpen its p^t,
    renormalised), a vote its pred (all votes)."""
    weights = data.draw(weights_for(copies), label="weights") if weighted else None
    single = Predictions.from_probs(m.probs[0])
    merged = make_aggregator(name, weights)(Predictions.from_probs(m.probs.expand(copies, -1, -1)))
    if name == "vote":
        assert merged.preds.tolist() == single.preds.tolist()
        one_hot = torch.nn.functional.one_hot(single.preds, m.probs.shape[-1]).to(merged.probs)
        torch.testing.assert_close(merged.probs, one_hot, atol=ATOL, rtol=0)
    elif name == "tsharpen":  # copies are merged like any members: p^t, renormalised
        powered = single.probs**0.5
        expected = powered / powered.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(merged.probs, expected, atol=ATOL, rtol=1e-5)
        assert_argmax_up_to_float_ties(merged.preds, single.probs)
    else:
        torch.testing.assert_close(merged.probs, single.probs, atol=ATOL, rtol=1e-5)
        assert_argmax_up_to_float_ties(merged.preds, single.probs)


# 6. Metrics against references ----------------------------------------------------------------


@st.composite
def edge_rows(draw, c: int) -> np.ndarray:
    """A probability row with a special confidence: one-hot, uniform, a vote share, a bin edge."""
    kind = draw(st.sampled_from(["one_hot", "uniform", "vote_share", "bin_edge"]))
    row = np.zeros(c)
    top = draw(st.integers(0, c - 1))
    if kind == "one_hot":
        row[top] = 1.0
    elif kind == "uniform":
        row[:] = 1.0 / c
    elif kind == "vote_share":  # the vote shares of 1 to 10 members, as hard voting gives
        votes = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=10))
        row[:] = np.bincount(votes, minlength=c) / len(votes)
    else:  # `top` gets j / ECE_BINS, the other classes share the rest evenly
        j = draw(st.integers(math.ceil(ECE_BINS / c), ECE_BINS))
        row[:] = (1.0 - j / ECE_BINS) / (c - 1)
        row[top] = j / ECE_BINS
    return row


@st.composite
def metric_inputs(draw, arbitrary_preds: bool = False, dtypes=(torch.float32, torch.float64)):
    """probs [N, C] (Dirichlet rows, some edge rows), preds (argmax or arbitrary), labels."""
    n = draw(st.integers(1, 200), label="N")
    c = draw(st.integers(2, 12), label="C")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    alpha = draw(st.sampled_from([0.05, 0.3, 1.0, 5.0]), label="alpha")
    probs = rng.dirichlet(np.full(c, alpha), size=n)
    edges = draw(st.lists(st.tuples(st.integers(0, n - 1), edge_rows(c)), max_size=10))
    for i, row in edges:
        probs[i] = row
    dtype = draw(st.sampled_from(dtypes), label="dtype")
    probs = normalise_rows(probs, dtype)
    labels = torch.from_numpy(rng.integers(0, c, size=n))
    if arbitrary_preds and draw(st.booleans(), label="arbitrary preds"):
        preds = torch.from_numpy(rng.integers(0, c, size=n))
    else:
        preds = probs.argmax(dim=1)
    return probs, preds, labels


def reference_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    eps = float(np.finfo(np.float32).eps)
    losses = [-math.log(min(max(float(p[y]), eps), 1 - eps)) for p, y in zip(probs, labels)]
    return sum(losses) / len(losses)


def reference_brier(probs: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for p, y in zip(probs, labels):
        total += sum((float(p[k]) - (1.0 if k == y else 0.0)) ** 2 for k in range(len(p)))
    return total / len(labels)


def reference_ece(
    probs: np.ndarray, preds: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """Bins [lo, hi) with edges j / n_bins in the probabilities' dtype; 1.0 in a bin of its own.

    An edge is j / n_bins correctly rounded to that dtype, so a confidence that is the dtype's
    value of j / n_bins (a vote share of 2 / 5 = 6 / 15, say) starts bin j.
    """
    edges = [probs.dtype.type(j / n_bins) for j in range(n_bins + 1)]
    confidence_sums = [0.0] * (n_bins + 1)
    correct_sums = [0.0] * (n_bins + 1)
    for p, pred, y in zip(probs, preds, labels):
        confidence = p[pred]
        j = n_bins if confidence == 1.0 else max(k for k in range(n_bins) if edges[k] <= confidence)
        confidence_sums[j] += float(confidence)
        correct_sums[j] += 1.0 if pred == y else 0.0
    return sum(abs(s - a) for s, a in zip(confidence_sums, correct_sums)) / len(labels)


@FAST
@given(inputs=metric_inputs())
def test_nll_and_brier_match_references(inputs):
    probs, _, labels = inputs
    assert math.isclose(
        nll(probs, labels), reference_nll(probs.numpy(), labels.numpy()), rel_tol=1e-5, abs_tol=1e-9
    )
    assert math.isclose(
        brier(probs, labels), reference_brier(probs.numpy(), labels.numpy()), abs_tol=METRIC_ATOL
    )


@FAST
@example(  # a vote share of 2/5 = 6/15 starts the bin [0.4, 0.467)
    inputs=(
        torch.tensor([[0.4, 0.4, 0.2], [0.45, 0.25, 0.3]]),
        torch.tensor([0, 0]),
        torch.tensor([0, 2]),
    )
)
@given(inputs=metric_inputs(arbitrary_preds=True))
def test_ece_matches_reference(inputs):
    probs, preds, labels = inputs
    expected = reference_ece(probs.numpy(), preds.numpy(), labels.numpy())
    actual = expected_calibration_error(probs, preds, labels)
    assert math.isclose(actual, expected, abs_tol=METRIC_ATOL), (actual, expected)


@FAST
@given(inputs=metric_inputs(dtypes=(torch.float32,)))
def test_ece_matches_torchmetrics(inputs):
    """float32 only: torchmetrics casts confidences to float32 (float64 ones within a float32
    rounding of 1.0 or of a bin edge land in another bin there). Rows whose confidence lies on a
    bin edge are left out: torchmetrics' linspace edges are an ulp off j/15 at some j, ours are
    exact (see `expected_calibration_error`; `test_ece_matches_reference` covers the edges)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, preds, labels = inputs
    confidence = probs.gather(1, preds.view(-1, 1)).squeeze(1).double()
    edges = torch.arange(ECE_BINS + 1, dtype=torch.float64) / ECE_BINS
    off_edges = (confidence[:, None] - edges).abs().amin(dim=1) > 1e-6
    if not off_edges.any():
        return
    probs, preds, labels = probs[off_edges], preds[off_edges], labels[off_edges]
    expected = multiclass_calibration_error(
        probs, labels, num_classes=probs.shape[1], n_bins=ECE_BINS, norm="l1", validate_args=False
    )
    actual = expected_calibration_error(probs, preds, labels)
    assert math.isclose(actual, float(expected), abs_tol=METRIC_ATOL), (actual, float(expected))


# 7. Weight validation ---------------------------------------------------------------------------

FINITE = st.floats(allow_nan=False, allow_infinity=False)
NON_NEGATIVE = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)


@st.composite
def invalid_weights(draw) -> list:
    kind = draw(st.sampled_from(["non_finite", "negative", "all_zero", "empty", "not_a_number"]))
    if kind == "empty":
        return []
    if kind == "all_zero":
        return draw(st.lists(st.sampled_from([0.0, -0.0, 0]), min_size=1, max_size=8))
    bad = {
        "non_finite": st.sampled_from([math.nan, math.inf, -math.inf]),
        # (not FINITE.filter(lambda v: v < 0): hypothesis rewrites that to a bound it meets
        # with -0.0, which is not negative)
        "negative": st.floats(max_value=-5e-324, allow_infinity=False),
        "not_a_number": st.sampled_from([None, "one", object()]),
    }[kind]
    weights = draw(st.lists(FINITE, max_size=7))
    weights.insert(draw(st.integers(0, len(weights))), draw(bad))
    return weights


@THOROUGH
@given(weights=invalid_weights())
def test_invalid_weights_raise_user_error(weights):
    with pytest.raises(UserError):
        normalised_weights(weights)


@THOROUGH
@given(
    weights=st.lists(st.floats(0.0, 1e300), min_size=1, max_size=10).filter(
        lambda w: any(v > 0 for v in w)
    )
)
def test_valid_weights_sum_to_one_and_keep_proportions(weights):
    normalised = normalised_weights(weights)
    assert normalised.dtype == torch.float64 and normalised.shape == (len(weights),)
    values = normalised.tolist()
    assert all(v >= 0 for v in values)
    assert math.isclose(math.fsum(values), 1.0, rel_tol=1e-12)
    total = math.fsum(weights)
    for v, w in zip(values, weights):
        assert math.isclose(v, w / total, rel_tol=1e-12, abs_tol=1e-300)


@FAST
@example(weights=[1e308, 1e308])
@given(weights=st.lists(NON_NEGATIVE, min_size=1, max_size=10).filter(lambda w: any(w)))
def test_any_finite_weights_sum_to_one(weights):
    """Finite, non-negative, not all zero, however large: the normalised weights sum to 1."""
    assert math.isclose(float(normalised_weights(weights).sum()), 1.0, rel_tol=1e-9)
