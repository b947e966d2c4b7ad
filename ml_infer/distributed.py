"""Runners: how many processes share the data set. The predictor is the same either way.

- `SingleProcessRunner`: one process, one device.
- `AccelerateRunner`: Hugging Face Accelerate. Under `torchrun --nproc_per_node N` or
  `accelerate launch` each process gets a shard of the data set (gloo on CPU, NCCL on GPU);
  `gather_for_metrics` collects every sample's outputs on every process, dropping the padding
  Accelerate adds when the data set does not divide evenly; only the main process writes and
  logs. Launched as a single process it behaves like `SingleProcessRunner`.
"""

from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import DataLoader, Dataset

from ml_infer.data import make_loader
from ml_infer.predictor import (
    DatasetPredictions,
    Gather,
    Predictor,
    predict_dataset,
    resolve_device,
)

log = logging.getLogger(__name__)


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
