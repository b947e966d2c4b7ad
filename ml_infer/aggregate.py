"""Merging the predictions of several members (TTA views of one model, or models of an ensemble).

Members arrive as `Predictions(probs [N, B, C], preds [N, B])` and leave as
`Predictions(probs [B, C], preds [B])`. Everything works on probabilities (softmax outputs):

- `SoftVoting` (TTA `mean`, ensemble `soft_voting`): the (weighted) mean of probabilities.
- `Weighted`: `SoftVoting` that insists on one weight per member.
- `Max`: the per-class maximum probability, renormalised to sum to 1.
- `GeometricMean`: the normalised geometric mean of probabilities.
- `Median`, `Min`: the per-class median / minimum probability, renormalised (robust to one
  view that goes wrong; `min` keeps only what every member believes).
- `TSharpen`: the normalised (weighted) mean of probabilities raised to the power t (0.5 by
  default). ttach's `tsharpen` powers logits, which are negative as often as not (NaN for
  t = 0.5); powering probabilities keeps it defined and order-preserving.
- `HardVoting` (TTA `vote`, ensemble `hard_voting`): the majority class of the members' own
  predictions. Ties go to the tied class with the larger summed probability, then to the lower
  class index (vote shares and summed probabilities within 1e-6 count as equal, so the winner
  does not depend on the members' order). `probs` is the (weighted) vote share of each class,
  so accuracy, NLL and calibration stay defined.

A single member is returned unchanged by every aggregator: one view or one model is itself.

Adding an aggregator: one class here (or anywhere importable) and one yaml file in
`conf/tta_aggregation/` or `conf/ensemble_aggregation/` whose `_target_` names it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ml_infer.errors import UserError

# Vote shares and summed probabilities are float sums: values this close count as a tie.
_TIE_TOLERANCE = 1e-6
# Floor for log(0) in the geometric mean.
_LOG_FLOOR = 1e-12


class Predictions(NamedTuple):
    """Class probabilities and predicted classes; leading dims are the members, if any."""

    probs: Tensor
    preds: Tensor

    @classmethod
    def from_probs(cls, probs: Tensor) -> Predictions:
        return cls(probs, probs.argmax(dim=-1))


def normalised_weights(weights: Sequence[float]) -> Tensor:
    """Checks member weights and scales them to sum to 1.

    >>> normalised_weights([2, 1, 1]).tolist()
    [0.5, 0.25, 0.25]
    """
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise UserError(f"ensemble weights must be numbers, got {list(weights)}") from None
    if not values:
        raise UserError("ensemble weights are empty; give one weight per checkpoint")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"ensemble weights must be finite, got {values}")
    negative = [v for v in values if v < 0]
    if negative:
        raise UserError(f"ensemble weights must be non-negative, got {values}")
    largest = max(values)
    if largest == 0:
        raise UserError(f"ensemble weights are all zero ({values}); at least one must be positive")
    scaled = [v / largest for v in values]  # so that the sum of huge weights cannot overflow
    total = sum(scaled)
    return torch.tensor([v / total for v in scaled], dtype=torch.float64)


class Aggregator:
    """Merges members along dim 0. Subclasses implement `merge` for two or more members."""

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        self.weights = None if weights is None else normalised_weights(weights)

    def check_members(self, n_members: int) -> None:
        """Raises a UserError when this aggregator cannot merge `n_members` members."""
        if self.weights is not None and len(self.weights) != n_members:
            raise UserError(
                f"{len(self.weights)} ensemble weights for {n_members} checkpoints; "
                "give one weight per checkpoint"
            )

    def __call__(self, members: Predictions) -> Predictions:
        n_members = members.probs.shape[0]
        self.check_members(n_members)
        if n_members == 1:
            return Predictions(members.probs[0], members.preds[0])
        return self.merge(members)

    def merge(self, members: Predictions) -> Predictions:
        raise NotImplementedError

    def member_weights(self, members: Predictions) -> Tensor:
        """Weights [N, 1, 1] in the members' dtype; uniform when none were given."""
        probs = members.probs
        if self.weights is None:
            weights = torch.full((probs.shape[0],), 1.0 / probs.shape[0])
        else:
            weights = self.weights
        return weights.to(dtype=probs.dtype, device=probs.device).view(-1, 1, 1)


class SoftVoting(Aggregator):
    """(Weighted) mean of probabilities.

    >>> probs = torch.tensor([[[0.6, 0.4]], [[0.2, 0.8]]])
    >>> SoftVoting()(Predictions.from_probs(probs)).probs.tolist()
    [[0.4000000059604645, 0.6000000238418579]]
    """

    def merge(self, members: Predictions) -> Predictions:
        probs = (members.probs * self.member_weights(members)).sum(dim=0)
        return Predictions.from_probs(probs)


class Weighted(SoftVoting):
    """Soft voting with explicit weights: one per member, finite, non-negative, not all zero."""

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        if weights is None:
            raise UserError(
                "aggregation 'weighted' needs ensemble.weights, one per checkpoint "
                "(e.g. ensemble.weights=[0.4,0.3,0.3])"
            )
        super().__init__(weights)


class Max(Aggregator):
    """Per-class maximum probability over members, renormalised to a distribution."""

    def merge(self, members: Predictions) -> Predictions:
        probs = members.probs.amax(dim=0)
        return Predictions.from_probs(probs / probs.sum(dim=-1, keepdim=True))


class GeometricMean(Aggregator):
    """Normalised geometric mean of probabilities (a mean of log-probabilities)."""

    def merge(self, members: Predictions) -> Predictions:
        log_probs = members.probs.clamp_min(_LOG_FLOOR).log()
        mean_log = (log_probs * self.member_weights(members)).sum(dim=0)
        return Predictions.from_probs(mean_log.softmax(dim=-1))


class Median(Aggregator):
    """Per-class median probability over members (the mean of the two middle values for an
    even count), renormalised.

    >>> probs = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]], [[0.1, 0.9]]])
    >>> [round(p, 4) for p in Median()(Predictions.from_probs(probs)).probs[0].tolist()]
    [0.8, 0.2]
    """

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        if weights is not None:
            raise UserError("aggregation 'median' takes no weights; use mean or weighted")
        super().__init__()

    def merge(self, members: Predictions) -> Predictions:
        probs = members.probs.quantile(0.5, dim=0)
        return Predictions.from_probs(_renormalised(probs))


class Min(Aggregator):
    """Per-class minimum probability over members, renormalised."""

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        if weights is not None:
            raise UserError("aggregation 'min' takes no weights; use mean or weighted")
        super().__init__()

    def merge(self, members: Predictions) -> Predictions:
        return Predictions.from_probs(_renormalised(members.probs.amin(dim=0)))


class TSharpen(Aggregator):
    """Normalised (weighted) mean of probabilities to the power t; t < 1 lets a class that
    several members find likely outweigh one member's certainty.

    >>> probs = torch.tensor([[[1.0, 0.0]], [[0.36, 0.64]]])
    >>> [round(p, 4) for p in TSharpen(t=0.5)(Predictions.from_probs(probs)).probs[0].tolist()]
    [0.6667, 0.3333]
    """

    def __init__(self, t: float = 0.5, weights: Sequence[float] | None = None) -> None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < math.inf:
            raise UserError(f"tsharpen's t must be a positive number, got {t!r}")
        super().__init__(weights)
        self.t = float(t)

    def merge(self, members: Predictions) -> Predictions:
        powered = members.probs.clamp_min(0.0) ** self.t
        return Predictions.from_probs(
            _renormalised((powered * self.member_weights(members)).sum(dim=0))
        )


def _renormalised(probs: Tensor) -> Tensor:
    """Rows scaled to sum to 1; an all-zero row becomes uniform. A row whose sum is subnormal
    (under float32's smallest normal, 1.2e-38) is divided by that sum itself, not by the
    smallest normal: that would leave it summing to less than 1.

    >>> _renormalised(torch.tensor([[5.8775e-39, 0.0, 0.0], [0.0, 0.0, 0.0]])).tolist()
    [[1.0, 0.0, 0.0], [0.3333333432674408, 0.3333333432674408, 0.3333333432674408]]
    """
    total = probs.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(probs, 1.0 / probs.shape[-1])
    return torch.where(total > 0, probs / total.where(total > 0, 1.0), uniform)


class HardVoting(Aggregator):
    """Majority vote over the members' predicted classes, with deterministic tie-breaking.

    Two members each way: the tie goes to the class with the larger summed probability.

    >>> probs = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]]])
    >>> merged = HardVoting()(Predictions.from_probs(probs))
    >>> merged.preds.tolist(), merged.probs.tolist()
    ([0], [[0.5, 0.5]])
    """

    def merge(self, members: Predictions) -> Predictions:
        n_classes = members.probs.shape[-1]
        weights = self.member_weights(members)
        votes = torch.nn.functional.one_hot(members.preds, n_classes).to(weights.dtype)
        shares = (votes * weights).sum(dim=0)
        tied = shares >= shares.amax(dim=-1, keepdim=True) - _TIE_TOLERANCE
        # Summed in float64 and compared with a tolerance: a float32 sum depends on the members'
        # order in its last bits, and the winner of a tie must not.
        summed_probs = (members.probs.double() * weights.double()).sum(dim=0)
        tie_break = summed_probs.masked_fill(~tied, -1.0)
        best = tie_break >= tie_break.amax(dim=-1, keepdim=True) - _TIE_TOLERANCE
        # argmax returns the first maximum, i.e. the lowest class index among the best.
        return Predictions(shares, best.to(torch.uint8).argmax(dim=-1))
