"""Where a model runs and in which precision: the device, the autocast dtype, synchronisation,
and timing batches and feeding them without making the host wait for the device.

CPUs differ (some have avx512_bf16 or AMX, some only AVX2), so bf16 is used only where oneDNN
reports native support, checked at run time; elsewhere mixed precision warns and runs fp32.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

from ml_infer.errors import UserError

log = logging.getLogger(__name__)

PrecisionMode = Literal["fp32", "autocast"]


AutocastDtype = Literal["auto", "bf16", "fp16"]


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; an unavailable device is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {name!r} asked for, but CUDA is not available; valid here: auto, cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def cpu_supports_bf16() -> bool:
    """True where oneDNN has native bf16 kernels for this CPU (e.g. avx512_bf16 or AMX)."""
    mkldnn_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and mkldnn_check and mkldnn_check())


def resolve_autocast_dtype(
    precision: PrecisionMode, autocast_dtype: AutocastDtype, device: torch.device
) -> torch.dtype | None:
    """The autocast dtype to run with, or None for plain fp32 (with a warning when falling back)."""
    if precision not in ("fp32", "autocast"):
        raise UserError(f"unknown precision {precision!r}; valid: fp32, autocast")
    if autocast_dtype not in ("auto", "bf16", "fp16"):
        raise UserError(f"unknown autocast_dtype {autocast_dtype!r}; valid: auto, bf16, fp16")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if autocast_dtype == "fp16":
            return torch.float16
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if autocast_dtype == "bf16":
            log.warning("this GPU has no bf16 support; autocast runs in fp16 instead")
        return torch.float16
    if autocast_dtype == "fp16":
        log.warning("fp16 autocast on CPU is slower than fp32 on most CPUs; running bf16 or fp32")
    if cpu_supports_bf16():
        return torch.bfloat16
    log.warning(
        "this CPU has no native bf16 support (no avx512_bf16 / AMX); mixed precision runs in fp32"
    )
    return None


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on CPU), so that a timer reads whole work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchTimer:
    """Each batch's latency: CUDA events recorded around it on a GPU (read once the pass is
    over, so that timing does not make the host wait), the host's clock on a CPU (where the
    work is done when the call returns)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[Any] = []

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        if self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
            yield
            events[1].record()
            self.marks.append(events)
        else:
            start = time.perf_counter()
            yield
            self.marks.append((start, time.perf_counter()))

    def seconds(self) -> list[float]:
        if self.device.type == "cuda":
            return [start.elapsed_time(end) / 1000.0 for start, end in self.marks]
        return [end - start for start, end in self.marks]


def prefetched(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """The batches, on a GPU each one's images copied to it while the one before runs (a side
    stream; the loader pins host memory); elsewhere as they come."""
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def started(batch: Any) -> Any:
        with torch.cuda.stream(stream):
            return (batch[0].to(device, non_blocking=True), *batch[1:])

    upcoming = (started(batch) for batch in batches)
    following = next(upcoming, None)
    while following is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        current = following
        current[0].record_stream(torch.cuda.current_stream(device))
        following = next(upcoming, None)
        yield current
