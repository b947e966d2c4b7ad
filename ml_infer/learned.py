"""A TTA aggregation learned on the calibration split: how much each view counts.

`tta.aggregation=learned` merges a model's views by a weighted mean of their probabilities whose
weights (non-negative, summing to 1) minimise the NLL of the strategy's prediction on the
calibration split (Shanmugam et al. 2021, "Better aggregation in test-time augmentation"),
jointly with a temperature on the merged log-probabilities: without it, the NLL picks views
for the confidence they add (our under-trained test folds put all weight on contrast_1.1, the
view that sharpens, ECE 0.109), not for the labels they get right.
`mode`:

- `views`: one weight per view;
- `views_x_classes`: one weight per view and class (each class's weights sum to 1 over the
  views; the merged row is renormalised), for views that help some classes and not others;
- `beta`: fastai's TTA, the identity view weighted beta and the other views sharing 1 - beta.

The evaluation fits it (`fit`) before merging any scored image; the weights reach
metrics.json as `tta_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ml_infer.aggregate import Aggregator, Predictions
from ml_infer.calibrate import minimise
from ml_infer.errors import UserError, one_of

MODES = ("views", "views_x_classes", "beta")


class LearnedWeights(Aggregator):
    """A weighted mean of views with weights fitted on labelled calibration outputs."""

    def __init__(
        self,
        mode: str = "views",
        temperature: bool = True,
        weights: Sequence[float] | None = None,
    ) -> None:
        if mode not in MODES:
            raise one_of("tta.aggregation mode", mode, MODES)
        if weights is not None:
            raise UserError("aggregation 'learned' fits its own weights; give none")
        super().__init__()
        self.mode = mode
        self.fits_temperature = bool(temperature)
        self.view_weights: Tensor | None = None  # [K, 1, 1] or [K, 1, C], set by fit
        self.temperature = 1.0  # fitted with the weights: confidence is not what views are for

    def fit(self, probs: Tensor, labels: Tensor, view_names: Sequence[str]) -> LearnedWeights:
        """Fits on calibration probabilities [M, K, n, C] (checkpoints averaged after their views
        are merged, as soft voting merges them); view 0 is the identity."""
        probs = probs.detach().double().clone()
        n_views, n_classes = probs.shape[1], probs.shape[-1]
        shape = {"views": (n_views, 1, 1), "views_x_classes": (n_views, 1, n_classes)}
        theta = torch.zeros(shape.get(self.mode, (1,)), dtype=torch.float64, requires_grad=True)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)

        def loss() -> Tensor:
            merged = self._merge_views(probs, self._weights(theta, n_views)).mean(dim=0)
            log_probs = (merged.clamp_min(1e-300).log() / log_t.exp()).log_softmax(dim=-1)
            return torch.nn.functional.nll_loss(log_probs, labels)

        parameters = ([theta] if n_views > 1 else []) + ([log_t] if self.fits_temperature else [])
        if parameters:
            minimise(parameters, loss)
        self.view_weights = self._weights(theta.detach(), n_views)
        self.temperature = float(log_t.detach().exp())
        self.view_names = list(view_names)
        return self

    def fitted(self) -> dict[str, float]:
        """Each view's weight and the temperature, for metrics.json."""
        return {**self.weights_by_view(), "temperature": self.temperature}

    def weights_by_view(self) -> dict[str, float]:
        """Each view's weight (averaged over classes for `views_x_classes`)."""
        if self.view_weights is None:
            return {}
        per_view = self.view_weights.flatten(1).mean(dim=1)
        return {name: float(w) for name, w in zip(self.view_names, per_view, strict=True)}

    def merge(self, members: Predictions) -> Predictions:
        # Unfitted only on the helper processes of a multi-process run, whose timed passes
        # merge with uniform weights (the same operations); their merges are never scored.
        n_views = members.probs.shape[0]
        weights = self.view_weights
        if weights is None or len(weights) != n_views:
            weights = torch.full((n_views, 1, 1), 1.0 / n_views, dtype=torch.float64)
        merged = self._merge_views(members.probs.double(), weights.to(members.probs.device))
        sharpened = (merged.clamp_min(1e-300).log() / self.temperature).softmax(dim=-1)
        return Predictions.from_probs(sharpened.to(members.probs.dtype))

    def _weights(self, theta: Tensor, n_views: int) -> Tensor:
        if self.mode == "beta":
            beta = torch.sigmoid(theta).view(1, 1, 1)
            rest = (1 - beta).expand(n_views - 1, 1, 1) / max(1, n_views - 1)
            return torch.cat([beta, rest]) if n_views > 1 else torch.ones(1, 1, 1)
        return theta.softmax(dim=0)

    @staticmethod
    def _merge_views(probs: Tensor, weights: Tensor) -> Tensor:
        """Views on dim -3 (probs [..., K, n, C]) merged by `weights` [K, 1, 1 or C]."""
        merged = (probs * weights.to(probs.dtype)).sum(dim=-3)
        return merged / merged.sum(dim=-1, keepdim=True).clamp_min(1e-300)
