"""Accuracy, calibration and speed figures of one evaluated strategy.

Accuracy, macro-F1, NLL, ECE and Brier score are a few lines of torch (torchmetrics, their
reference in the tests, takes seconds to import), written so that they use the strategy's own
predicted class (a vote's tie-break can differ from the argmax of its vote shares).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

ECE_BINS = 15


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the true class.

    Probabilities are clipped at float32 epsilon first, as scikit-learn's `log_loss` does, so a
    vote that gives the true class no share costs -log(1.19e-7) = 15.9 rather than infinity.

    >>> round(nll(torch.tensor([[0.5, 0.5], [0.9, 0.1]]), torch.tensor([0, 0])), 4)
    0.3993
    """
    eps = torch.finfo(torch.float32).eps
    true_class = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    return float(-true_class.clamp(eps, 1 - eps).log().mean())


def brier(probs: Tensor, labels: Tensor) -> float:
    """Mean over samples of the squared distance between probabilities and the one-hot label.

    >>> round(brier(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([0, 0])), 4)
    0.25
    """
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float(((probs - one_hot) ** 2).sum(dim=1).mean())


def expected_calibration_error(
    probs: Tensor, preds: Tensor, labels: Tensor, n_bins: int = ECE_BINS
) -> float:
    """ECE with equal-width confidence bins: sum over bins of |bin| / N * |accuracy - confidence|.

    The confidence of a sample is the probability of its predicted class. Bins are
    [j/n, (j+1)/n) with confidence 1.0 in a bin of its own, as torchmetrics'
    `multiclass_calibration_error` bins them, except that the edges here are exact (j/n in the
    probabilities' dtype): torchmetrics' `linspace` edges are an ulp off at some j, which moves a
    confidence lying exactly on such an edge (a vote share of 1/5 or 2/5) one bin down.

    >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    >>> preds, labels = torch.tensor([0, 0, 0, 0]), torch.tensor([0, 1, 0, 0])
    >>> round(expected_calibration_error(probs, preds, labels), 4)
    0.4
    """
    confidence = probs.gather(1, preds.view(-1, 1)).squeeze(1)
    correct = (preds == labels).to(probs.dtype)
    boundaries = torch.arange(n_bins + 1, dtype=probs.dtype) / n_bins
    bin_index = torch.bucketize(confidence, boundaries, right=True) - 1
    confidence_sums = torch.bincount(bin_index, weights=confidence, minlength=n_bins + 1)
    correct_sums = torch.bincount(bin_index, weights=correct, minlength=n_bins + 1)
    return float((confidence_sums - correct_sums).abs().sum() / len(labels))


def adaptive_calibration_error(
    probs: Tensor, preds: Tensor, labels: Tensor, n_bins: int = ECE_BINS
) -> float:
    """ECE with equal-mass bins (adaptive ECE, Nixon et al. 2019): images sorted by confidence
    and cut into `n_bins` groups of (nearly) equal size, as torch-uncertainty cuts them; the sum
    over groups of |group| / N * |accuracy - mean confidence|. Unlike equal-width bins, no bin is
    nearly empty when a strategy's confidences crowd near 1.

    >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3]])
    >>> round(adaptive_calibration_error(probs, torch.zeros(4, dtype=torch.long),
    ...                                  torch.tensor([0, 1, 0, 0]), n_bins=2), 4)
    0.35
    """
    confidence = probs.gather(1, preds.view(-1, 1)).squeeze(1).double()
    correct = (preds == labels).double()
    confidence, order = confidence.sort()
    correct = correct[order]
    total = 0.0
    for conf_bin, correct_bin in zip(
        confidence.tensor_split(n_bins), correct.tensor_split(n_bins), strict=True
    ):
        if len(conf_bin):
            total += len(conf_bin) * abs(float(correct_bin.mean() - conf_bin.mean()))
    return total / max(len(labels), 1)


def reliability_bins(
    probs: Tensor, preds: Tensor, labels: Tensor, n_bins: int = ECE_BINS
) -> dict[str, list[float]]:
    """What a reliability diagram draws: per equal-width confidence bin [j/n, (j+1)/n] (the last
    one closed), its image count, mean confidence and accuracy (NaN for an empty bin).

    >>> bins = reliability_bins(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]),
    ...                         torch.tensor([0, 1]), n_bins=2)
    >>> bins["count"], bins["accuracy"]
    ([1.0, 1.0], [0.0, 1.0])
    """
    confidence = probs.gather(1, preds.view(-1, 1)).squeeze(1).double()
    correct = (preds == labels).double()
    boundaries = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    index = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    confidence_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    return {
        "count": count.tolist(),
        "confidence": (confidence_sum / count).tolist(),
        "accuracy": (correct_sum / count).tolist(),
    }


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion.

    >>> [round(x, 4) for x in wilson_interval(90, 100)]
    [0.8256, 0.9448]
    """
    if total == 0:
        return (math.nan, math.nan)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def classification_metrics(probs: Tensor, preds: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy (with its 95% Wilson interval), macro-F1, NLL, ECE and Brier score."""
    correct = int((preds == labels).sum())
    low, high = wilson_interval(correct, len(labels))
    return {
        "accuracy": correct / len(labels) if len(labels) else math.nan,
        "accuracy_ci95_low": low,
        "accuracy_ci95_high": high,
        "macro_f1": macro_f1(preds, labels, probs.shape[1]),
        **calibration_metrics(probs, preds, labels),
    }


def macro_f1(preds: Tensor, labels: Tensor, n_classes: int) -> float:
    """The mean F1 over the classes present in `labels` (scikit-learn's `f1_score(...,
    labels=<those classes>, average="macro")`): a test set without some of the model's classes
    is not scored on them, and a prediction of such a class counts as a miss of the true class.

    >>> round(macro_f1(torch.tensor([0, 0, 2, 1]), torch.tensor([0, 0, 1, 1]), 3), 4)
    0.8333
    """
    pairs = labels.long() * n_classes + preds.long()
    confusion = torch.bincount(pairs, minlength=n_classes * n_classes).view(n_classes, n_classes)
    true_positives = confusion.diagonal().double()
    support, predicted = confusion.sum(dim=1).double(), confusion.sum(dim=0).double()
    present = support > 0
    if not bool(present.any()):
        return math.nan
    f1 = 2 * true_positives / (support + predicted)
    return float(f1[present].mean())


def calibration_metrics(probs: Tensor, preds: Tensor, labels: Tensor) -> dict[str, float]:
    """NLL, 15-bin ECE, adaptive (equal-mass) ECE and Brier score."""
    return {
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(probs, preds, labels),
        "ece_adaptive": adaptive_calibration_error(probs, preds, labels),
        "brier": brier(probs, labels),
    }


def speed_metrics(
    n_images: int, wall_seconds: float, batch_seconds: Sequence[float]
) -> dict[str, float]:
    """Throughput of the whole loop (data included) and per-batch latency percentiles."""
    latencies_ms = np.asarray(batch_seconds) * 1000.0
    return {
        "images_per_s": n_images / wall_seconds if wall_seconds > 0 else math.inf,
        "latency_ms_p50": float(np.percentile(latencies_ms, 50)),
        "latency_ms_p95": float(np.percentile(latencies_ms, 95)),
        "wall_s": wall_seconds,
    }


def paired_bootstrap_delta(
    correct: Tensor, baseline_correct: Tensor, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Accuracy difference to a baseline on the same samples, with a 95% paired-bootstrap interval.

    Samples are resampled with replacement (the same indices for both), `n_resamples` times with
    a fixed seed; the interval is the 2.5th and 97.5th percentile of the resampled differences.
    A resample's difference depends only on how many images it draws that this run fixed (+1)
    and broke (-1), so each resample is drawn as those counts, from a multinomial over the
    three kinds of image: the same distribution as drawing N indices, in O(resamples).

    >>> a, b = torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 1, 0])
    >>> delta, low, high = paired_bootstrap_delta(a, b)
    >>> delta, low <= 0.0 <= high
    (0.25, True)
    """
    difference = correct.double() - baseline_correct.double()
    return bootstrap_mean(difference, n_resamples, seed, levels=(1.0, -1.0, 0.0))


def bootstrap_mean(
    values: Tensor,
    n_resamples: int = 2000,
    seed: int = 0,
    levels: Sequence[float] | None = None,
) -> tuple[float, float, float]:
    """The mean of `values` with a 95% percentile-bootstrap interval, for values that take few
    distinct levels (per-image differences of correctness): a resample's mean depends only on
    how many of each level it draws, so it is drawn as those counts from a multinomial, the
    same distribution as drawing N indices, in O(resamples x levels) time and memory.

    >>> bootstrap_mean(torch.tensor([0.0, 0.5, 0.5, 1.0]))[0]
    0.5
    """
    values = values.double()
    n = len(values)
    levels = torch.unique(values).tolist() if levels is None else list(levels)
    level_values = torch.tensor(levels, dtype=torch.float64)
    shares = np.array([float((values == level).sum()) / n for level in levels])
    counts = np.random.default_rng(seed).multinomial(n, shares, size=n_resamples)
    resampled = torch.from_numpy(counts).double() @ level_values / n
    low, high = torch.quantile(
        resampled, torch.tensor([0.025, 0.975], dtype=torch.float64)
    ).tolist()
    return float(values.mean()), low, high


def mcnemar_p_value(correct: Tensor, baseline_correct: Tensor) -> float:
    """Exact (binomial) two-sided McNemar test of two classifiers on the same samples.

    Only discordant samples count: b = baseline right and this wrong, c = the reverse; under the
    null hypothesis each is equally likely, so p = P(Binomial(b + c, 1/2) as extreme as min(b, c)).

    >>> mcnemar_p_value(torch.tensor([1, 1, 1, 1, 0]), torch.tensor([0, 0, 0, 0, 0]))
    0.125
    """
    correct, baseline_correct = correct.bool(), baseline_correct.bool()
    only_baseline = int((baseline_correct & ~correct).sum())
    only_this = int((correct & ~baseline_correct).sum())
    return binomial_half_two_sided_p(min(only_baseline, only_this), only_baseline + only_this)


def binomial_half_two_sided_p(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) is as far from n/2 as k is, or farther), two-sided: scipy's
    `binomtest(k, n, 0.5).pvalue`, without importing scipy (1.2 s here). The distribution is
    symmetric, so it is twice the lower tail up to min(k, n - k), capped at 1; the tail is summed
    from log-probabilities, so n may be in the millions.

    >>> round(binomial_half_two_sided_p(0, 3), 12), binomial_half_two_sided_p(2, 4)
    (0.25, 1.0)
    """
    k = min(k, n - k)
    if 2 * k >= n:
        return 1.0
    log_half_n = n * math.log(2)
    log_terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - log_half_n
        for i in range(k + 1)
    ]
    top = max(log_terms)
    tail = math.exp(top) * math.fsum(math.exp(term - top) for term in log_terms)
    return min(1.0, 2.0 * tail)


def risk_coverage(probs: Tensor, preds: Tensor, labels: Tensor) -> Tensor:
    """Selective risk at each coverage k/N, k = 1..N: the error rate among the k images the
    strategy is most confident of (confidence: its merged probability of its predicted class).

    >>> risk_coverage(torch.tensor([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 0]),
    ...               torch.tensor([0, 1])).tolist()
    [0.0, 0.5]
    """
    confidence = probs.gather(1, preds.view(-1, 1)).squeeze(1)
    errors = (preds != labels).to(torch.float64)[confidence.argsort(descending=True)]
    return errors.cumsum(0) / torch.arange(1, len(errors) + 1, dtype=torch.float64)


def aurc(risks: Tensor) -> float:
    """Area under the risk-coverage curve: the trapezoid rule over coverages 1/N..1, scaled to
    a unit support, as torch-uncertainty computes it (Geifman & El-Yaniv 2017). Lower is better.

    >>> aurc(torch.tensor([0.0, 0.5]))
    0.25
    """
    n = len(risks)
    if n < 2:
        return math.nan
    # min: all-wrong predictions give 1 plus a rounding step for some n
    return min(1.0, float(torch.trapezoid(risks, dx=1.0 / n) / (1 - 1 / n)))


def coverage_at_risk(risks: Tensor, threshold: float) -> float:
    """The largest coverage whose selective risk is at most `threshold` (0 when none is).

    >>> coverage_at_risk(torch.tensor([0.0, 0.0, 1 / 3, 0.25]), 0.3)
    1.0
    """
    admissible = torch.nonzero(risks <= threshold + 1e-12).flatten()
    return 0.0 if admissible.numel() == 0 else float(admissible[-1] + 1) / len(risks)


def selective_metrics(probs: Tensor, preds: Tensor, labels: Tensor) -> dict[str, float]:
    """AURC and the coverage at 1% and 5% risk, ranking images by their confidence."""
    risks = risk_coverage(probs, preds, labels)
    return {
        "aurc": aurc(risks),
        "coverage_at_risk_1pct": coverage_at_risk(risks, 0.01),
        "coverage_at_risk_5pct": coverage_at_risk(risks, 0.05),
    }
