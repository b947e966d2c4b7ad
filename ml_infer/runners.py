"""Runners: one timed pass over a data set, in one process or several. The predictor is the same.

- `predict_dataset`: every batch through the predictor, whole passes timed after a warm-up.
- `SingleProcessRunner`: one process, one device.
- `AccelerateRunner`: Hugging Face Accelerate. Under `torchrun --nproc_per_node N` or
  `accelerate launch` each process gets a shard of the data set (gloo on CPU, NCCL on GPU);
  `gather_for_metrics` collects every sample's outputs on every process, dropping the padding
  Accelerate adds when the data set does not divide evenly; only the main process writes and
  logs. Launched as a single process it behaves like `SingleProcessRunner`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ml_infer.data import make_loader
from ml_infer.device import resolve_device, synchronize
from ml_infer.errors import UserError, one_of, raise_if_interrupted
from ml_infer.predictor import Predictor

log = logging.getLogger(__name__)


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
    """One pass over the loader: its wall time; batch times and (if asked) outputs appended."""
    from tqdm.auto import tqdm

    device = predictor.device
    bar = tqdm(
        loader,
        total=n_batches,
        desc="batches",
        unit="batch",
        disable=None if progress else True,
        leave=False,
    )
    synchronize(device)
    pass_start = time.perf_counter()
    for images, batch_labels, batch_positions in bar:
        raise_if_interrupted()
        batch_start = time.perf_counter()
        merged = predictor(images)
        synchronize(device)
        batch_seconds.append(time.perf_counter() - batch_start)
        batch = (merged.probs, merged.preds, batch_labels, torch.as_tensor(batch_positions))
        if gather is not None:
            batch = gather(tuple(t.to(device) for t in batch))
        if outputs is not None:
            outputs.append((batch[0].float().cpu(), batch[1].cpu(), batch[2].cpu(), batch[3].cpu()))
    synchronize(device)
    elapsed = time.perf_counter() - pass_start
    bar.close()
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


class Runner(Protocol):
    """How an evaluation runs over a data set: its device, processes, and one timed pass."""

    device: torch.device
    is_main_process: bool
    num_processes: int

    def predict(
        self,
        predictor: Predictor,
        dataset: Dataset[Any],
        *,
        batch_size: int,
        num_workers: int = 0,
        warmup_batches: int = 1,
        progress: bool = True,
        min_timing_s: float = 0.0,
    ) -> DatasetPredictions: ...

    def agree(self, value: Any) -> Any: ...


RUNNERS = ("single", "accelerate")


def build_runner(name: str, device: str) -> Runner:
    """The runner named by `strategy.runner`."""
    if name not in RUNNERS:
        raise one_of("strategy.runner", name, RUNNERS)
    return AccelerateRunner(device) if name == "accelerate" else SingleProcessRunner(device)


class SingleProcessRunner:
    is_main_process = True
    num_processes = 1

    def __init__(self, device: str) -> None:
        self.device = resolve_device(device)

    def predict(
        self,
        predictor: Predictor,
        dataset: Dataset,
        *,
        batch_size: int,
        num_workers: int = 0,
        warmup_batches: int = 1,
        progress: bool = True,
        min_timing_s: float = 0.0,
    ) -> DatasetPredictions:
        """Every sample's merged prediction, and the median time of a whole pass."""
        loader = self.prepare(
            make_loader(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
            )
        )
        result = predict_dataset(
            predictor,
            loader,
            warmup_batches=warmup_batches,
            progress=progress and self.is_main_process,
            gather=self.gather,
            n_batches=len(loader),
            min_timing_s=min_timing_s,
            agree=self.agree,
            total=self.sum_over_processes,
        )
        # Every process times its own shard; the job is as fast as its slowest process.
        result.wall_seconds = self.max_over_processes(result.wall_seconds)
        return result

    def prepare(self, loader: DataLoader) -> DataLoader:
        return loader

    gather: Gather | None = None

    def agree(self, value: Any) -> Any:
        """The main process's `value`, so that every process takes the same branch."""
        return value

    def max_over_processes(self, value: float) -> float:
        return value

    def sum_over_processes(self, counts: Tensor) -> Tensor:
        return counts


class AccelerateRunner(SingleProcessRunner):
    def __init__(self, device: str) -> None:
        from accelerate import Accelerator

        # Accelerate shards over CPU processes (gloo) only when told to use the CPU.
        use_cpu = resolve_device(device).type == "cpu"
        self.accelerator = Accelerator(cpu=use_cpu)
        if device.startswith("cuda:") and str(self.accelerator.device) != device:
            log.warning(
                "device=%s: the Accelerate runner puts each process on the GPU of its local rank "
                "(%s here); choose GPUs with CUDA_VISIBLE_DEVICES",
                device,
                self.accelerator.device,
            )
        self.device = self.accelerator.device
        self.gather = self._gather
        self.is_main_process = self.accelerator.is_main_process
        self.num_processes = self.accelerator.num_processes

    def prepare(self, loader: DataLoader) -> DataLoader:
        return self.accelerator.prepare_data_loader(loader)

    def _gather(self, outputs: Any) -> Any:
        return self.accelerator.gather_for_metrics(outputs)

    def agree(self, value: Any) -> Any:
        if self.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def max_over_processes(self, value: float) -> float:
        if self.num_processes == 1:
            return value
        import torch

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(tensor, reduction="max").item())

    def sum_over_processes(self, counts: Tensor) -> Tensor:
        if self.num_processes == 1:
            return counts
        summed: Tensor = self.accelerator.reduce(counts.clone(), reduction="sum")
        return summed
