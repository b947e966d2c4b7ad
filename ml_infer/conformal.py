"""Split-conformal prediction sets: sets of classes that hold the true class with probability at
least 1 - alpha on exchangeable data, calibrated on a split the strategy is not scored on.

Each method gives every (image, class) a non-conformity score; the threshold is the
ceil((n + 1)(1 - alpha)) / n quantile of the calibration images' true-class scores, and a test
image's set is every class whose score is at most that threshold.

- `lac`: 1 - p(class) (Sadinle et al. 2019, "least ambiguous set-valued classifiers").
- `aps`: the probability mass of the classes ranked above it plus a uniform share of its own
  (Romano et al. 2020, randomised as published; `randomized=false` counts its whole mass).
- `raps`: APS plus lambda * max(0, rank - k_reg) (Angelopoulos et al. 2021), which stops long
  tails of unlikely classes; `k_reg=auto` takes the (1 - alpha) quantile of the true class's
  rank, as the paper does, but on the same calibration images as the threshold (the paper
  tunes it on a separate part; a fixed `k_reg` keeps the guarantee exact).

`nonempty=true` puts the top class into a set that would be empty (the paper's
`allow_zero_sets=False`); coverage can then only rise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from ml_infer.errors import UserError, one_of

METHODS = ("none", "lac", "aps", "raps")


@dataclasses.dataclass
class ConformalSets:
    """A fitted conformal predictor: method, level and threshold, and what it needs to score a
    new image the same way (RAPS's penalty, the random draws' generator)."""

    method: str
    alpha: float
    threshold: float
    randomized: bool = True
    nonempty: bool = False
    k_reg: int = 0
    lam: float = 0.0
    generator: torch.Generator | None = None

    def scores(self, probs: Tensor) -> Tensor:
        """Every class's non-conformity score [N, C] (a draw of U per image when randomised)."""
        return class_scores(
            probs,
            self.method,
            randomized=self.randomized,
            k_reg=self.k_reg,
            lam=self.lam,
            generator=self.generator,
        )

    def sets(self, probs: Tensor) -> Tensor:
        """Membership [N, C]: True where a class belongs to the image's set."""
        members = self.scores(probs) <= self.threshold
        if self.nonempty:
            empty = ~members.any(dim=1)
            members[empty, probs[empty].argmax(dim=1)] = True
        return members

    def parameters(self) -> dict[str, Any]:
        found: dict[str, Any] = {"conformal_threshold": self.threshold}
        if self.method == "raps":
            found |= {"conformal_k_reg": self.k_reg, "conformal_lambda": self.lam}
        return found


def fit(
    probs: Tensor,
    labels: Tensor,
    method: str,
    alpha: float,
    *,
    randomized: bool = True,
    nonempty: bool = False,
    k_reg: int | str = "auto",
    lam: float = 0.01,
    seed: int = 0,
) -> ConformalSets:
    """The threshold of `method` at level `alpha` from calibration probabilities and labels."""
    if method not in METHODS or method == "none":
        raise one_of("conformal.method", method, METHODS[1:])
    check_settings(alpha, k_reg, lam)
    n = len(labels)
    if n == 0:
        raise UserError("conformal sets need labelled calibration images; the split is empty")
    if conformal_rank(n, alpha) > n:
        raise UserError(
            f"conformal.alpha={alpha} needs at least {math.ceil(1 / alpha) - 1} calibration "
            f"images, the calibration split has {n}"
        )
    generator = torch.Generator().manual_seed(seed)
    if method == "raps":
        k_reg = _auto_k_reg(probs, labels, alpha) if k_reg == "auto" else _positive_int(k_reg)
    fitted = ConformalSets(
        method,
        alpha,
        threshold=math.inf,
        randomized=randomized and method != "lac",
        nonempty=nonempty,
        k_reg=int(k_reg) if method == "raps" else 0,
        lam=lam if method == "raps" else 0.0,
        generator=generator,
    )
    true_scores = fitted.scores(probs).gather(1, labels.view(-1, 1)).squeeze(1)
    fitted.threshold = conformal_quantile(true_scores, alpha)
    return fitted


def check_settings(alpha: Any, k_reg: Any, lam: Any) -> None:
    """alpha in (0, 1), k_reg `auto` or a whole number >= 0, lam a number >= 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise UserError(f"conformal.alpha must lie in (0, 1), got {alpha!r}")
    if k_reg != "auto":
        _positive_int(k_reg)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < math.inf:
        raise UserError(f"conformal.lam must be a number >= 0, got {lam!r}")


def conformal_rank(n: int, alpha: float) -> int:
    """ceil((n + 1)(1 - alpha)), free of float error: in floats (99 + 1) * (1 - 0.41) is
    59.00000000000001, whose ceiling, 60, is one rank (a slightly larger set) too many.

    >>> conformal_rank(99, 0.41), conformal_rank(99, 0.1)
    (59, 90)
    """
    return math.ceil(round((n + 1) * (1 - alpha), 9))


def conformal_quantile(scores: Tensor, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest score: the finite-sample valid threshold.

    >>> conformal_quantile(torch.arange(1.0, 11.0), 0.2)
    9.0
    """
    rank = conformal_rank(len(scores), alpha)
    return float(scores.double().sort().values[min(rank, len(scores)) - 1])


def class_scores(
    probs: Tensor,
    method: str,
    *,
    randomized: bool = True,
    k_reg: int = 0,
    lam: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Non-conformity score of every class of every image, [N, C], in float64.

    >>> p = torch.tensor([[0.6, 0.3, 0.1]])
    >>> [round(s, 4) for s in class_scores(p, "aps", randomized=False)[0].tolist()]
    [0.6, 0.9, 1.0]
    >>> class_scores(p, "raps", randomized=False, k_reg=1, lam=0.5).round(decimals=4).tolist()
    [[0.6, 1.4, 2.0]]
    """
    probs = probs.double()
    if method == "lac":
        return 1.0 - probs
    order = probs.argsort(dim=1, descending=True, stable=True)
    sorted_probs = probs.gather(1, order)
    cumulative = sorted_probs.cumsum(dim=1)
    if randomized:
        u = torch.rand(len(probs), 1, dtype=torch.float64, generator=generator)
        cumulative = cumulative - u * sorted_probs
    if method == "raps":
        ranks = torch.arange(1, probs.shape[1] + 1, dtype=torch.float64)
        cumulative = cumulative + lam * (ranks - k_reg).clamp_min(0.0)
    return torch.empty_like(cumulative).scatter_(1, order, cumulative)


def set_metrics(members: Tensor, preds: Tensor, labels: Tensor | None) -> dict[str, float]:
    """Set size (mean, median, by whether the strategy's own prediction was right) and coverage
    (the share of sets holding the true class), for labelled images."""
    sizes = members.sum(dim=1).double()
    found = {
        "mean_set_size": float(sizes.mean()),
        "median_set_size": float(sizes.median()),  # the lower of two middle values
        "empty_sets": float((sizes == 0).double().mean()),
    }
    if labels is None:
        return found
    right = preds == labels
    found["coverage"] = float(members.gather(1, labels.view(-1, 1)).double().mean())
    found["set_size_correct"] = float(sizes[right].mean()) if right.any() else math.nan
    found["set_size_incorrect"] = float(sizes[~right].mean()) if (~right).any() else math.nan
    return found


def _auto_k_reg(probs: Tensor, labels: Tensor, alpha: float) -> int:
    """The (1 - alpha) conformal quantile of the true class's rank (1 = the top class)."""
    ranks = (probs > probs.gather(1, labels.view(-1, 1))).sum(dim=1) + 1
    return int(conformal_quantile(ranks.double(), alpha))


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"conformal.k_reg must be auto or an integer >= 0, got {value!r}")
    return value
