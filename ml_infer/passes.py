"""Passes over a data set: the whole-set timed loop, the collection of every member's logits
under every view (what the prediction store keeps), and the same-process timing of a strategy
against `standard`.

Each pass iterates a loader (in-memory data sets are fetched a batch at a time) and, under
several processes, collects each batch's per-sample outputs from all of them (`gather`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ml_infer.device import BatchTimer, prefetched, synchronize
from ml_infer.errors import UserError, raise_if_interrupted
from ml_infer.predictor import Predictor
from ml_infer.progress import Progress


@dataclasses.dataclass
class DatasetPredictions:
    """Per-sample outputs of a whole pass over a data set, plus how long it took."""

    probs: Tensor  # [N, C] float32
    preds: Tensor  # [N] int64
    labels: Tensor  # [N] int64
    positions: Tensor  # [N] int64: each sample's position in the data set
    wall_seconds: float  # median whole pass: data loading, views, forwards, merging
    batch_seconds: list[float]  # the predictor's time per batch, over every timed pass
    pass_seconds: list[float]  # each timed pass
    peak_memory_mb: float
    peak_memory_kind: str

    @classmethod
    def timed(cls, merged: Any, labels: Tensor, timing: Timing) -> DatasetPredictions:
        """A strategy's merged prediction of every image (in data-set order) with its timing."""
        return cls(
            probs=merged.probs,
            preds=merged.preds,
            labels=labels,
            positions=torch.arange(len(labels)),
            wall_seconds=timing.wall_seconds,
            batch_seconds=timing.batch_seconds,
            pass_seconds=timing.pass_seconds,
            peak_memory_mb=timing.peak_memory_mb,
            peak_memory_kind=timing.peak_memory_kind,
        )


Gather = Callable[[Any], Any]


def predict_dataset(
    predictor: Predictor,
    loader: Iterable,
    *,
    warmup_batches: int = 1,
    progress: bool = True,
    gather: Gather | None = None,
    n_batches: int | None = None,
    min_timing_s: float = 0.0,
    max_timing_passes: int = 50,
    agree: Callable[[int], int] | None = None,
    total: Callable[[Tensor], Tensor] | None = None,
) -> DatasetPredictions:
    """Runs the predictor over every batch of `loader`, timing whole passes after a warm-up.

    The first pass collects the outputs. When it took less than `min_timing_s`, further passes
    (at most `max_timing_passes` in all) are timed too, and `wall_seconds` is the median pass:
    a small test set is otherwise timed in a few milliseconds of noise. `gather` collects each
    batch's per-sample outputs from all processes (Accelerate's `gather_for_metrics`); `agree`
    makes every process run the main process's number of passes.
    """
    device = predictor.device
    if warmup_batches > 0:
        first_images = next(iter(loader))[0]
        for _ in range(warmup_batches):
            predictor(first_images)
    memory = _PeakMemory(device)
    outputs: list[tuple[Tensor, ...]] = []
    batch_seconds: list[float] = []
    predictor.nonfinite_images.zero_()  # the warm-up batch is counted again in the first pass
    pass_seconds = [
        _timed_pass(predictor, loader, gather, batch_seconds, outputs, progress, n_batches)
    ]
    if not outputs:
        raise UserError("the data loader yielded no batches")
    # Counted over every process (`total`), so that all of them stop together, or none does.
    predictor.check_finite(sum(len(batch[1]) for batch in outputs), total)
    repeats = 0
    if 0 < pass_seconds[0] < min_timing_s:
        repeats = min(math.ceil(min_timing_s / pass_seconds[0]) - 1, max_timing_passes - 1)
    if agree is not None:
        repeats = agree(repeats)
    for _ in range(repeats):
        pass_seconds.append(
            _timed_pass(predictor, loader, gather, batch_seconds, None, False, n_batches)
        )
    probs, preds, labels, positions = (torch.cat(column) for column in zip(*outputs))
    return DatasetPredictions(
        probs=probs,
        preds=preds,
        labels=labels,
        positions=positions,
        wall_seconds=statistics.median(pass_seconds),
        batch_seconds=batch_seconds,
        pass_seconds=pass_seconds,
        peak_memory_mb=memory.peak_mb(),
        peak_memory_kind=memory.kind,
    )


def _timed_pass(
    predictor: Predictor,
    loader: Iterable,
    gather: Gather | None,
    batch_seconds: list[float],
    outputs: list | None,
    progress: bool,
    n_batches: int | None,
) -> float:
    """One pass over the loader: its wall time; batch times and (if asked) outputs appended.

    The host never waits for the device inside the pass: batch latencies are CUDA events read
    after it, outputs stay on the device until it ends, and on a GPU the next batch is copied
    (from pinned memory, on a side stream) while the current one runs. The device is
    synchronised twice per pass, at its start and its end.
    """
    device = predictor.device
    bar = Progress(
        "forward passes",
        None,
        passes_per_unit=predictor.forward_passes_per_image,
        show=progress,
        every_s=predictor.engine.progress_every_s,
    )
    timer = BatchTimer(device)
    kept = []
    synchronize(device)
    pass_start = time.perf_counter()
    for images, batch_labels, batch_positions in prefetched(loader, device):
        raise_if_interrupted()
        with timer.batch():
            merged = predictor(images)
        batch = (merged.probs, merged.preds, batch_labels, torch.as_tensor(batch_positions))
        if gather is not None:
            batch = gather(tuple(t.to(device) for t in batch))
        if outputs is not None:
            kept.append(batch)
        bar.update(len(batch[2]))
    synchronize(device)
    elapsed = time.perf_counter() - pass_start
    bar.close()
    batch_seconds.extend(timer.seconds())
    if outputs is not None:
        outputs.extend((b[0].float().cpu(), b[1].cpu(), b[2].cpu(), b[3].cpu()) for b in kept)
    return elapsed


class _PeakMemory:
    """Peak memory from now on: CUDA allocations on a GPU, the process's resident set on CPU.

    On Linux the resident-set high-water mark is reset through /proc/self/clear_refs, so the
    figure belongs to this evaluation rather than to whatever the process did before.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
            torch.cuda.reset_peak_memory_stats(device)
            return
        self.kind = "rss_high_water_mark"
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            self.kind = "rss_max_since_start"

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def collect_logits(
    predictor: Predictor,
    loader: Iterable[Any],
    *,
    gather: Gather | None = None,
    progress: bool = True,
    n_batches: int | None = None,
    n_images: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Every model's logits under every view, for the whole data set: ([M, K, N, C] float32 in
    data-set order, labels [N]). Under several processes every process gets all of them."""
    device = predictor.device
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    bar = Progress(
        "forward passes",
        n_images,
        passes_per_unit=predictor.forward_passes_per_image,
        show=progress and predictor.engine.progress,
        every_s=predictor.engine.progress_every_s,
    )
    for images, labels, positions in loader:
        raise_if_interrupted()
        logits = predictor.logits(images).permute(2, 0, 1, 3)  # [B, M, K, C]: batch first
        batch = (logits, labels, torch.as_tensor(positions))
        if gather is not None:  # every process's images: the count is the whole data set's
            batch = gather(tuple(t.to(device) for t in batch))
        parts.append((batch[0].float().cpu(), batch[1].cpu(), batch[2].cpu()))
        bar.update(len(batch[1]))
    bar.close()
    if not parts:
        raise UserError("the data loader yielded no batches")
    logits, labels, positions = (torch.cat(column) for column in zip(*parts))
    order = positions.argsort()
    return logits[order].permute(1, 2, 0, 3).contiguous(), labels[order]


@dataclasses.dataclass
class Timing:
    """The strategy timed live, alternating with `standard` on the same batches."""

    wall_seconds: float  # median timed pass of the strategy
    timed_images: int  # images in one timed pass (every process)
    batch_seconds: list[float]  # the strategy's time per batch, every timed pass
    pass_seconds: list[float]  # the strategy's timed passes
    relative_cost: float  # median over rounds of strategy pass / standard pass
    relative_cost_iqr: float  # the spread of those ratios (75th - 25th percentile)
    peak_memory_mb: float
    peak_memory_kind: str


def time_strategy(
    strategy: Predictor,
    standard: Predictor | None,
    loader: Iterable[Any],
    *,
    warmup_batches: int = 1,
    min_timing_s: float = 0.0,
    timing_batches: int = 8,
    max_rounds: int = 50,
    gather: Gather | None = None,
    agree: Callable[[int], int] | None = None,
    progress: bool = True,
) -> Timing:
    """Times the strategy on the first `timing_batches` batches (the set, when it has fewer), in
    rounds until at least `min_timing_s` of it is timed; in each round `standard` (the first
    checkpoint, one view, fp32, the same engine) runs the same batches, first or second by
    turns, so that a slow spell of a shared machine moves both sides of the ratio. `standard`
    None: the strategy is standard itself, its relative cost 1 by definition."""
    predictors = [strategy] if standard is None else [strategy, standard]
    first_images = next(iter(loader))[0]
    for predictor in predictors:
        for _ in range(warmup_batches):
            predictor(first_images)
    memory = _PeakMemory(strategy.device)
    limit = timing_batches if timing_batches > 0 else None
    seconds: dict[int, list[float]] = {0: [], 1: []}
    batch_seconds: list[float] = []
    timed_images = 0

    def one_round(round_index: int) -> None:
        nonlocal timed_images
        order = range(len(predictors)) if round_index % 2 == 0 else reversed(range(len(predictors)))
        for which in order:
            batches = itertools.islice(loader, limit)
            times = batch_seconds if which == 0 else []
            sizes: list[int] = []
            seconds[which].append(
                _timed_pass(
                    predictors[which], _counted(batches, sizes), gather, times, None, False, None
                )
            )
            if which == 0:
                timed_images = sum(sizes)

    one_round(0)
    rounds = 1
    if 0 < seconds[0][0] < min_timing_s:
        rounds = min(math.ceil(min_timing_s / seconds[0][0]), max_rounds)
    if agree is not None:
        rounds = agree(rounds)
    with Progress(
        "timing (the strategy beside standard)" if standard else "timing",
        rounds,
        unit="rounds",
        show=progress and strategy.engine.progress,
        every_s=strategy.engine.progress_every_s,
    ) as bar:
        bar.update(1)
        for index in range(1, rounds):
            one_round(index)
            bar.update(1)
    if standard is None:
        ratios = [1.0]
    else:
        ratios = [s / b for s, b in zip(seconds[0], seconds[1]) if b > 0] or [math.nan]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return Timing(
        wall_seconds=statistics.median(seconds[0]),
        timed_images=timed_images,
        batch_seconds=batch_seconds,
        pass_seconds=seconds[0],
        relative_cost=statistics.median(ratios),
        relative_cost_iqr=quartiles[2] - quartiles[0],
        peak_memory_mb=memory.peak_mb(),
        peak_memory_kind=memory.kind,
    )


def _counted(batches: Iterable[Any], sizes: list[int]) -> Iterable[Any]:
    """The batches, their sizes noted in `sizes` as they pass."""
    for batch in batches:
        sizes.append(len(batch[1]))
        yield batch
