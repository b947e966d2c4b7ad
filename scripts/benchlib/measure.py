"""Timing: the interleaved rounds every row is measured in, the batch-size sweep of the bare
forward, and how much of the machine other processes took meanwhile."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ml_infer.augment import Views
from ml_infer.device import synchronize
from ml_infer.predictor import EngineSettings

from .rows import Row
from .workloads import Workload, engine_predictor

log = logging.getLogger("bench")  # one logger for the whole bench, as in its single-file days


class OtherLoad:
    """How much of the machine's CPU time other processes took while this one ran (Linux).

    On a shared machine this says how far to trust a run: the ratios hold up to moderate load,
    the absolute images/s do not.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import os
        import resource

        try:
            with open("/proc/stat") as stat:
                jiffies = [int(value) for value in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = jiffies[3] + jiffies[4]  # idle + iowait
        own = sum(
            usage.ru_utime + usage.ru_stime
            for usage in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )
        ticks = os.sysconf("SC_CLK_TCK")
        return sum(jiffies) / ticks, (sum(jiffies) - idle) / ticks, own

    def fraction(self) -> float:
        """Other processes' share of all CPU time since construction (nan where unknown)."""
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return math.nan
        total, busy, own = (after - before for after, before in zip(end, self.start))
        return max(0.0, busy - own) / total


def measure(
    rows: list[Row],
    standard: Row,
    batch_sizes: Sequence[int],
    repeats: int,
    device: torch.device,
    *,
    record_standard: bool = True,
) -> None:
    """Warms every row up, then times `repeats` rounds. Within a round every batch is run by every
    row in turn, in an order rotated from batch to batch, with a `standard` step on the same
    batch before each. Standard's time in a round is the median of those steps per image, times
    the images: many samples spread over the round, so a slow spell on a shared machine shifts
    it little (and a short last batch counts for its size), and a machine
    that is slower or faster in one round than in another moves both sides of that round's
    ratios. `standard`'s own figures come from those steps (`record_standard`)."""

    def timed(step: Callable[[int], Any], index: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        step(index)
        synchronize(device)
        return time.perf_counter() - start

    for row in [standard, *rows]:
        row.warm_up()
    n_batches = len(batch_sizes)
    for round_index in range(repeats):
        standard_seconds_per_image: list[float] = []  # per image: batches may differ in size
        for row in rows:
            row.seconds.append(0.0)
        for batch_index in range(n_batches):
            shift = (round_index + batch_index) % len(rows)
            for row in rows[shift:] + rows[:shift]:
                seconds = timed(standard.step, batch_index)
                standard_seconds_per_image.append(seconds / batch_sizes[batch_index])
                row.seconds[-1] += timed(row.step, batch_index)
        standard_round = statistics.median(standard_seconds_per_image) * sum(batch_sizes)
        for row in rows:
            row.standard_seconds.append(standard_round * row.passes_per_round)
        if record_standard:
            standard.seconds.append(standard_round)
            standard.standard_seconds.append(standard_round)
        log.info("%s: round %d/%d done", standard.workload, round_index + 1, repeats)


def sweep_forward_batch_sizes(
    workload: Workload,
    sizes: Sequence[int],
    repeats: int,
    device: torch.device,
    settings: EngineSettings,
) -> dict[int, float]:
    """Images/s of the engine's model alone per forward batch size (interleaved, median round).

    On CUDA the sizes go on doubling from 32 until the GPU runs out of memory.
    """
    predictor = engine_predictor(workload, Views([]), 1, device, settings)
    model, memory_format = predictor.models[0], predictor.memory_format
    shape = workload.images.shape[1:]
    if device.type == "cuda":
        sizes = [2**power for power in range(5, 17)]
    inputs: dict[int, Tensor] = {}
    with torch.inference_mode():
        for size in sizes:
            try:
                inputs[size] = torch.rand(size, *shape, device=device).contiguous(
                    memory_format=memory_format
                )
                model(inputs[size])
                synchronize(device)
            except torch.cuda.OutOfMemoryError:
                inputs.pop(size, None)
                torch.cuda.empty_cache()
                log.info("a batch of %d does not fit in GPU memory: the sweep stops there", size)
                break
        # Every size runs the same number of images: the workload's, or one batch of the largest.
        n_images = max(max(inputs), len(workload.images))
        rates: dict[int, list[float]] = {size: [] for size in inputs}
        usable = list(inputs)
        for round_index in range(repeats):
            shift = round_index % len(usable)
            for size in usable[shift:] + usable[:shift]:
                forwards = math.ceil(n_images / size)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(forwards):
                    model(inputs[size])
                synchronize(device)
                rates[size].append(forwards * size / (time.perf_counter() - start))
    return {size: statistics.median(values) for size, values in rates.items()}
