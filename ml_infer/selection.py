"""Greedy selection over candidate outputs on a calibration split: which views (a TTA policy)
or which members (an ensemble) to merge, by forward selection on an objective.

Candidates are probabilities [P, n, C]; a selection is a multiset of candidates, merged by their
mean. Two searches use it:

- TTA policy: forward selection without replacement from the identity view (Lyzhov et al.
  2020, Greedy Policy Search, whose objective is the calibrated log-likelihood), its order
  found on one half of the split and its length chosen on the other.
- Ensemble: Caruana et al. (2004) forward selection with replacement from the best few members
  (sorted initialisation), a fixed number of steps, keeping the best prefix; optionally bagged
  over random halves of the members. Counts become weights.

Objectives are to be minimised: `nll` is the NLL after a temperature fitted on the same
outputs (so a selection is judged by what calibration can make of it, as GPS does), `accuracy`
is minus the accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from ml_infer.calibrate import TEMPERATURE_RANGE, fit_temperatures, log_probs_as_logits
from ml_infer.errors import one_of

OBJECTIVES = ("nll", "accuracy")


def objective(probs: Tensor, labels: Tensor, name: str) -> float:
    """The objective of merged probabilities [n, C] (lower is better).

    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    >>> objective(probs, torch.tensor([0, 1]), "accuracy")
    -1.0
    """
    return objectives(probs.unsqueeze(0), labels, name)[0]


def objectives(probs: Tensor, labels: Tensor, name: str) -> list[float]:
    """The objective of each of P merged predictions [P, n, C], computed together."""
    if name == "accuracy":
        return (-(probs.argmax(dim=2) == labels).double().mean(dim=1)).tolist()
    if name != "nll":
        raise one_of("tune.objective", name, OBJECTIVES)
    logits = log_probs_as_logits(probs)
    low, high = TEMPERATURE_RANGE  # the range calibration=temperature holds T in
    # Fitted on the same images: one parameter. (Fitted on one half and scored on the other,
    # a half that a confident model classifies without error drives T to its bound, and the
    # other half's one error then costs more than every view could win.)
    temperatures = fit_temperatures(logits, labels).clamp(low, high)
    scaled = (logits / temperatures.view(-1, 1, 1)).log_softmax(dim=2)
    true = scaled.gather(2, labels.view(1, -1, 1).expand(len(probs), -1, 1)).squeeze(2)
    return (-true.mean(dim=1)).tolist()


@dataclasses.dataclass
class Selection:
    """Chosen candidates (indices, repeats allowed) in the order chosen, the objective of their
    mean, and the objective after each step (the start first)."""

    chosen: list[int]
    score: float
    trajectory: list[float]
    steps: list[int] = dataclasses.field(default_factory=list)  # every candidate added, in order

    def counts(self, n_candidates: int) -> list[int]:
        return [self.chosen.count(index) for index in range(n_candidates)]


def forward_select(
    candidates: Tensor,
    labels: Tensor,
    name: str,
    *,
    start: Sequence[int],
    with_replacement: bool,
    max_steps: int,
    stop_when_worse: bool,
) -> Selection:
    """Adds, step by step, the candidate whose addition gives the best objective. Without
    `stop_when_worse`, runs all `max_steps` and returns the best prefix (Caruana)."""
    chosen = list(start)
    total = candidates[chosen].double().sum(dim=0)
    score = objective(total / len(chosen), labels, name)
    trajectory = [score]
    best = Selection(list(chosen), score, list(trajectory), [])
    for _ in range(max_steps):
        options = [
            index for index in range(len(candidates)) if with_replacement or index not in chosen
        ]
        if not options:
            break
        scores = objectives(
            (total.unsqueeze(0) + candidates[options].double()) / (len(chosen) + 1), labels, name
        )
        step = min(range(len(options)), key=lambda i: (scores[i], options[i]))
        if stop_when_worse and scores[step] >= best.score - 1e-9:
            break
        chosen.append(options[step])
        best.steps.append(options[step])
        total = total + candidates[options[step]]
        trajectory.append(scores[step])
        if scores[step] < best.score - 1e-12:
            best = Selection(list(chosen), scores[step], list(trajectory), best.steps)
    best.trajectory = trajectory
    return best


def greedy_policy(candidates: Tensor, labels: Tensor, name: str, max_views: int) -> Selection:
    """Views without replacement from the identity (candidate 0). The order is found on one half
    of the images (stratified, fixed), and the other half chooses how long a prefix of it to
    keep (ties: the shorter): a view must help images its choice never saw. On digits' 180
    validation images, choosing and stopping on the same images kept rotate_180 and
    horizontal_flip, which cost test NLL (0.045 against identity's 0.041 once calibrated).
    """
    from ml_infer.calsplit import stratified_holdout

    choose_on, confirm_on = stratified_holdout(labels.tolist(), 0.5, seed=0)
    order = forward_select(
        candidates[:, choose_on],
        labels[choose_on],
        name,
        start=[0],
        with_replacement=False,
        max_steps=max(0, max_views - 1),
        stop_when_worse=False,
    )
    sequence = [0, *order.steps]
    confirmed = [
        objective(
            candidates[sequence[:length], :][:, confirm_on].mean(dim=0), labels[confirm_on], name
        )
        for length in range(1, len(sequence) + 1)
    ]
    length = min(range(len(confirmed)), key=lambda i: (confirmed[i], i)) + 1
    kept = sequence[:length]
    return Selection(
        kept, objective(candidates[kept].mean(dim=0), labels, name), confirmed, sequence
    )


def caruana(
    candidates: Tensor,
    labels: Tensor,
    name: str,
    *,
    steps: int,
    init: int = 1,
    bags: int = 0,
    seed: int = 0,
) -> list[float]:
    """Member weights by Caruana et al.'s ensemble selection: with replacement, from the best
    `init` members, `steps` steps, the best prefix; with `bags`, the counts of that many runs
    on random halves of the members are summed. Weights sum to 1.

    >>> probs = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]], [[0.6, 0.4]]])
    >>> caruana(probs, torch.tensor([0]), "accuracy", steps=3)
    [1.0, 0.0, 0.0]
    """
    n_candidates = len(candidates)
    alone = objectives(candidates, labels, name)
    ranked = sorted(range(n_candidates), key=lambda index: (alone[index], index))
    pools = [list(range(n_candidates))]
    if bags:
        generator = torch.Generator().manual_seed(seed)
        half = max(1, n_candidates // 2)
        pools = [
            sorted(torch.randperm(n_candidates, generator=generator)[:half].tolist())
            for _ in range(bags)
        ]
    counts = [0] * n_candidates
    for pool in pools:
        start = [index for index in ranked if index in pool][: max(1, init)]
        selection = forward_select(
            candidates[pool],
            labels,
            name,
            start=[pool.index(index) for index in start],
            with_replacement=True,
            max_steps=steps,
            stop_when_worse=False,
        )
        for local, count in enumerate(selection.counts(len(pool))):
            counts[pool[local]] += count
    total = sum(counts)
    return [count / total for count in counts]
