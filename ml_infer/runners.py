"""Runners: how many processes share the passes over a data set. The predictor is the same.

- `SingleProcessRunner`: one process, one device.
- `AccelerateRunner`: Hugging Face Accelerate. Under `torchrun --nproc_per_node N` or
  `accelerate launch` each process gets a shard of the data set (gloo on CPU, NCCL on GPU);
  `gather_for_metrics` collects every sample's outputs on every process, dropping the padding
  Accelerate adds when the data set does not divide evenly; only the main process writes and
  logs. Launched as a single process it behaves like `SingleProcessRunner`.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ml_infer.data import make_loader
from ml_infer.device import resolve_device
from ml_infer.errors import one_of
from ml_infer.passes import (
    Gather,
    Timing,
    collect_logits,
    time_strategy,
)
from ml_infer.predictor import Predictor

log = logging.getLogger(__name__)


class Runner(Protocol):
    """How an evaluation runs over a data set: its device, its processes, and its passes."""

    device: torch.device
    is_main_process: bool
    num_processes: int

    def loader(self, dataset: Dataset[Any], *, batch_size: int, num_workers: int = 0) -> Any: ...

    def collect(self, predictor: Predictor, loader: Any, *, progress: bool = True) -> Any: ...

    def time(
        self,
        strategy: Predictor,
        standard: Predictor | None,
        loader: Any,
        *,
        warmup_batches: int = 1,
        min_timing_s: float = 0.0,
        timing_batches: int = 8,
    ) -> Timing: ...

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

    def loader(self, dataset: Dataset[Any], *, batch_size: int, num_workers: int = 0) -> Any:
        """The data set's loader, sharded over the processes (one for every pass of a run)."""
        return self.prepare(
            make_loader(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
            )
        )

    def collect(self, predictor: Predictor, loader: Any, *, progress: bool = True) -> Any:
        """Every model's logits under every view, whole data set: ([M, K, N, C], labels [N])."""
        return collect_logits(
            predictor,
            loader,
            gather=self.gather,
            progress=progress and self.is_main_process,
            n_batches=len(loader),
            n_images=len(loader.dataset) if hasattr(loader, "dataset") else None,
        )

    def time(
        self,
        strategy: Predictor,
        standard: Predictor | None,
        loader: Any,
        *,
        warmup_batches: int = 1,
        min_timing_s: float = 0.0,
        timing_batches: int = 8,
    ) -> Timing:
        """The strategy's speed and its cost relative to `standard`, measured side by side."""
        timing = time_strategy(
            strategy,
            standard,
            loader,
            warmup_batches=warmup_batches,
            min_timing_s=min_timing_s,
            timing_batches=timing_batches,
            gather=self.gather,
            agree=self.agree,
            progress=self.is_main_process,
        )
        # Every process times its own shard; the job is as fast as its slowest process.
        timing.wall_seconds = self.max_over_processes(timing.wall_seconds)
        timing.relative_cost = self.max_over_processes(timing.relative_cost)
        counted = self.sum_over_processes(torch.tensor([timing.timed_images], device=self.device))
        timing.timed_images = int(counted.item())
        return timing

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
