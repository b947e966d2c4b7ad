"""Post-hoc calibration of a classifier's logits, fitted by NLL on a calibration split.

- `temperature`: one scalar T > 0, logits / T (Guo et al. 2017). Never changes the argmax.
- `vector`: a per-class scale and bias, logits * w + b (Guo et al.'s vector scaling); it may
  change the predicted class.

T is fitted within [0.05, 20]. When the calibration images are all classified right, the NLL
keeps falling as T -> 0 (or as vector scaling's scales grow): nothing identifies the fit. T then
stops at its bound and a warning says so; more calibration images are the cure.

A strategy's merged output is a probability vector (a mean of softmaxes, a vote share), so the
`merged` stage calibrates its log-probabilities as logits; a zero share is clipped at float32
epsilon first, as the NLL metric clips it. Fits run in float64: a temperature by Newton's
method on 1/T (`fit_temperatures`; T < 1 sharpens under-confident models), vector scaling by
L-BFGS.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from ml_infer.errors import UserError, one_of

METHODS = ("none", "temperature", "vector")
STAGES = ("merged", "member")
LOG_EPS = math.log(torch.finfo(torch.float32).eps)
TEMPERATURE_RANGE = (0.05, 20.0)

log = logging.getLogger(__name__)


def log_probs_as_logits(probs: Tensor) -> Tensor:
    """A merged output's probabilities as logits: their log, zero shares clipped at epsilon.

    >>> log_probs_as_logits(torch.tensor([[1.0, 0.0]])).softmax(-1)[0, 0].item() > 0.9999
    True
    """
    return probs.double().log().clamp_min(LOG_EPS)


class Calibrator:
    """`fit(logits, labels)` on the calibration split, then `__call__(logits)` anywhere."""

    name = "none"

    def fit(self, logits: Tensor, labels: Tensor) -> Calibrator:
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        return logits

    def parameters(self) -> dict[str, float | list[float]]:
        return {}


class TemperatureScaling(Calibrator):
    """logits / T with T fitted by NLL (Guo et al. 2017).

    >>> torch.manual_seed(0) is not None
    True
    >>> logits = torch.randn(4000, 5) * 3
    >>> labels = torch.distributions.Categorical(logits=logits / 2.0).sample()
    >>> round(TemperatureScaling().fit(logits, labels).temperature, 1)
    2.0
    """

    name = "temperature"

    def __init__(self) -> None:
        self.temperature = 1.0

    def fit(self, logits: Tensor, labels: Tensor) -> TemperatureScaling:
        fitted = fit_temperature(logits, labels)
        low, high = TEMPERATURE_RANGE
        self.temperature = min(max(fitted, low), high)
        if not low * (1 + 1e-6) < fitted < high * (1 - 1e-6):
            log.warning(
                "temperature scaling: T is held at its bound %g (%s); fit on more "
                "calibration images",
                self.temperature,
                _why_unidentified(logits, labels),
            )
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        return logits / self.temperature

    def parameters(self) -> dict[str, float | list[float]]:
        return {"temperature": self.temperature}


class VectorScaling(Calibrator):
    """logits * w + b with one w and one b per class, fitted by NLL (Guo et al. 2017)."""

    name = "vector"

    def __init__(self) -> None:
        self.scale: Tensor | None = None
        self.bias: Tensor | None = None

    def fit(self, logits: Tensor, labels: Tensor) -> VectorScaling:
        logits = _checked(logits, labels)
        n_classes = logits.shape[-1]
        scale = torch.ones(n_classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        minimise([scale, bias], lambda: _nll(logits * scale + bias, labels))
        self.scale, self.bias = scale.detach(), bias.detach()
        if bool((logits.argmax(dim=1) == labels).all()):
            log.warning(
                "vector scaling: %s, so its scales grow until the optimiser stops; fit on "
                "more calibration images or use calibration=temperature",
                _why_unidentified(logits, labels),
            )
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale is None or self.bias is None:
            raise RuntimeError("VectorScaling is applied before it was fitted")
        return logits * self.scale.to(logits.dtype) + self.bias.to(logits.dtype)

    def parameters(self) -> dict[str, float | list[float]]:
        if self.scale is None or self.bias is None:
            return {}
        return {"vector_scale": self.scale.tolist(), "vector_bias": self.bias.tolist()}


def fit_temperature(logits: Tensor, labels: Tensor, max_steps: int = 50) -> float:
    """The NLL-optimal temperature of `logits` [n, C] for `labels` (see `fit_temperatures`).

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    >>> round(fit_temperature(logits, torch.tensor([0, 1, 1])), 3)  # one of three wrong
    2.885
    """
    return float(fit_temperatures(_checked(logits, labels).unsqueeze(0), labels, max_steps)[0])


def fit_temperatures(logits: Tensor, labels: Tensor, max_steps: int = 50) -> Tensor:
    """The NLL-optimal temperature in TEMPERATURE_RANGE of each of P sets of logits [P, n, C]
    for the same `labels`, all at once, by Newton's method on the inverse temperature b: the NLL
    of b * logits is convex in b (its second derivative is the mean variance of the logits under
    the softmax). A step leaving the bracket of b falls back to its geometric middle.
    """
    logits = logits.detach().double()
    n_sets = len(logits)
    true_logit = logits.gather(2, labels.view(1, -1, 1).expand(n_sets, -1, 1)).squeeze(2)
    low = torch.full((n_sets,), 1.0 / TEMPERATURE_RANGE[1], dtype=torch.float64)
    high = torch.full((n_sets,), 1.0 / TEMPERATURE_RANGE[0], dtype=torch.float64)
    b = torch.ones(n_sets, dtype=torch.float64)
    for _ in range(max_steps):
        probs = (logits * b.view(-1, 1, 1)).softmax(dim=2)
        mean = (probs * logits).sum(dim=2)
        gradient = (mean - true_logit).mean(dim=1)
        curvature = (probs * (logits - mean.unsqueeze(2)) ** 2).sum(dim=2).mean(dim=1)
        above = gradient > 0  # the optimum lies below b
        high = torch.where(above, b, high)
        low = torch.where(above, low, b)
        step = b - gradient / curvature.clamp_min(1e-12)
        inside = (step >= low) & (step <= high) & (curvature > 1e-12)
        b_next = torch.where(inside, step, (low * high).sqrt())
        settled = ((b_next - b).abs() <= 1e-9 * b) | (high - low <= 1e-9 * high)
        converged = bool(settled.all())
        b = b_next
        if converged:
            break
    return 1.0 / b


CALIBRATORS: dict[str, type[Calibrator]] = {
    "none": Calibrator,
    "temperature": TemperatureScaling,
    "vector": VectorScaling,
}


def calibrator(method: str) -> Calibrator:
    if method not in CALIBRATORS:
        raise one_of("calibration.method", method, METHODS)
    return CALIBRATORS[method]()


def _checked(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    if len(labels) == 0:
        raise UserError("the calibration split has no labelled images to fit on")
    # A float64 copy: the store's tensors may be inference tensors, which autograd can't save.
    return logits.detach().double().clone()


def _why_unidentified(logits: Tensor, labels: Tensor) -> str:
    errors = int((logits.argmax(dim=1) != labels).sum())
    return f"{errors} of the {len(labels)} calibration images are classified wrong"


def _nll(logits: Tensor, labels: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(logits, labels)


def minimise(parameters: list[Tensor], loss_of: object) -> None:
    """L-BFGS with a strong-Wolfe line search: a few dozen evaluations for these convex fits."""
    optimiser = torch.optim.LBFGS(
        parameters, lr=1.0, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = loss_of()  # type: ignore[operator]
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
