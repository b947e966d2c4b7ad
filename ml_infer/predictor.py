"""The engine: a bank of models x test-time views x two aggregators x numeric precision.

For a batch of B images, K views and M models:

    images [B] -> slices of s images -> views [K, s] (batched tensor ops)
               -> forward chunks of `forward_batch_size`, each normalised and laid out just
                  before it runs -> for each model: logits -> probs [K, B, C]
               -> view aggregator -> [M, B, C] -> model aggregator -> [B, C]

Models are looped rather than stacked (torch.func stacking measured slower on CPU), and the K*s
views of a slice are run in chunks of the tuned forward batch size (a bigger batch is slower per
image once activations fall out of cache). A slice holds just enough images for its views to
fill whole chunks, so every forward but the last of a batch is a full chunk, while the views in
memory stay a few chunks large instead of K*B images. Models run with BatchNorm folded into the
preceding convolution, and in channels_last layout where `engine.channels_last` asks for it
(together measured 1.4-1.5x on a 2-core AVX2 CPU and 2.9-3.6x on an H100; see scripts/bench.py).
Nothing outside this module knows how views and models are batched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ml_infer.aggregate import Aggregator, Predictions
from ml_infer.augment import Views
from ml_infer.checkpoints import InputSpec
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


# `engine.forward_batch_size: auto`, measured with `python scripts/bench.py` (--sweep-only on
# CPU, --device cuda on a GPU). CPU (2 cores, torch 2.14.1, channels_last, BatchNorm folded): the
# digits CNN runs within noise of its best from 128 to 1024 images per forward, resnet18 at
# 3x64x64 is best at 64-128 and 5-10% slower from 256 up (activations fall out of cache): 128
# suits both. CUDA (H100, torch 2.11): throughput keeps rising with the batch until a forward
# holds about 2^25-2^26 input values (digits 1x8x8: 95% of the best from 4096 images; resnet18 at
# 3x64x64: 95% at 2048, 98% at 4096), so auto fills that many values: 4096 images of 3x64x64,
# 256 of 3x224x224, at most 8192.
CPU_AUTO_FORWARD_BATCH_SIZE = 128
CUDA_AUTO_INPUT_VALUES = 2**26
CUDA_AUTO_LIMITS = (16, 8192)


def resolve_forward_batch_size(
    value: int | str, device: torch.device, input_spec: InputSpec | None = None
) -> int:
    """`engine.forward_batch_size` as a number: `auto` is the measured default of the device.

    >>> resolve_forward_batch_size("auto", torch.device("cpu"))
    128
    >>> spec = InputSpec(size=(224, 224), channels=3, mean=(0.5,) * 3, std=(0.2,) * 3)
    >>> resolve_forward_batch_size("auto", torch.device("cuda"), spec)
    256
    """
    if value == "auto":
        if device.type != "cuda" or input_spec is None:
            return CPU_AUTO_FORWARD_BATCH_SIZE
        values_per_image = input_spec.channels * input_spec.size[0] * input_spec.size[1]
        images = 2 ** int(math.log2(max(1, CUDA_AUTO_INPUT_VALUES // values_per_image)))
        low, high = CUDA_AUTO_LIMITS
        return min(max(images, low), high)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(
            f"engine.forward_batch_size must be a positive integer or auto, got {value!r}"
        )
    return value


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm folded into the convolution or linear layer
    it follows: the same function up to float rounding, one pass over the activations less per
    BatchNorm. Returned as it is: a model without BatchNorm, one that torch.fx cannot trace
    (data-dependent control flow), and one that calls a module at more than one place (folding
    would change the module for every caller).
    """
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if model.training or not has_batch_norm:
        return model
    from collections import Counter

    from torch.fx import symbolic_trace
    from torch.fx.experimental.optimization import fuse

    try:
        traced = symbolic_trace(model)
        calls = Counter(node.target for node in traced.graph.nodes if node.op == "call_module")
        if any(count > 1 for count in calls.values()):
            log.info("BatchNorm not folded: the model calls a module at more than one place")
            return model
        return fuse(traced, no_trace=True)  # fuse copies the traced model: `model` stays as is
    except Exception as error:  # noqa: BLE001 - any tracing failure means: run the model as is
        log.info(
            "BatchNorm not folded (%s: %s); running the model as is", type(error).__name__, error
        )
        return model


class Predictor:
    """Runs every model on every view of a batch and merges them into one prediction per image."""

    def __init__(
        self,
        models: Sequence[nn.Module],
        views: Views,
        view_aggregator: Aggregator,
        model_aggregator: Aggregator,
        input_spec: InputSpec,
        *,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        forward_batch_size: int | Literal["auto"] = "auto",
        channels_last: bool = False,
        fold_batch_norms: bool = True,
        member_names: Sequence[str] | None = None,
    ) -> None:
        self.forward_batch_size = resolve_forward_batch_size(forward_batch_size, device, input_spec)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.models = [
            (fold_batch_norm(m.eval()) if fold_batch_norms else m.eval())
            .to(device)
            .to(memory_format=memory_format)
            for m in models
        ]
        self.views = views
        self.view_aggregator = view_aggregator
        self.model_aggregator = model_aggregator
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.memory_format = memory_format
        self.input_spec = input_spec
        model_aggregator.check_members(len(self.models))
        self.member_names = list(member_names or (f"model {i}" for i in range(len(models))))
        # Images whose logits held a NaN or an infinity, per model, counted on the device.
        self.nonfinite_images = torch.zeros(len(self.models), dtype=torch.int64, device=device)

    def check_finite(self, n_images: int) -> None:
        """A UserError when any model gave NaN or infinite outputs since the last check: such
        outputs would poison every merged probability and metric, so nothing is computed from
        them. Resets the counts."""
        counts = self.nonfinite_images.tolist()
        self.nonfinite_images.zero_()
        bad = [(name, count) for name, count in zip(self.member_names, counts) if count]
        if not bad:
            return
        name, count = bad[0]
        hint = (
            "; fp16 autocast overflows for some models: try strategy.autocast_dtype=bf16 or fp32"
            if self.autocast_dtype == torch.float16
            else ""
        )
        others = f" (and {len(bad) - 1} more model(s))" if len(bad) > 1 else ""
        raise UserError(
            f"{name} gave NaN or infinite outputs for {count} of {n_images} images{others}; "
            f"no result was computed from them{hint}"
        )

    @property
    def forward_passes_per_image(self) -> int:
        return len(self.views) * len(self.models)

    @property
    def precision_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def images_per_slice(self) -> int:
        """Images whose views are built at once: the fewest whose K views fill whole chunks."""
        return self.forward_batch_size // math.gcd(len(self.views), self.forward_batch_size)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Predictions:
        """Merged prediction for a batch [B, C, H, W] of [0, 1] images."""
        images = images.to(self.device, non_blocking=True)
        n_views = len(self.views)
        logits: list[list[Tensor]] = [[] for _ in self.models]  # per model: [K, s, C] per slice
        with self.autocast():
            for image_slice in images.split(self.images_per_slice):
                chunks = self.views(image_slice).flatten(0, 1).split(self.forward_batch_size)
                for model, model_logits in zip(self.models, logits):
                    # Normalised just before each forward, while the chunk is in cache.
                    slice_logits = torch.cat([model(self.model_input(chunk)) for chunk in chunks])
                    model_logits.append(slice_logits.view(n_views, len(image_slice), -1))
        per_model = []
        for index, model_logits in enumerate(logits):
            all_logits = torch.cat(model_logits, dim=1).float()  # [K, B, C]
            nonfinite = ~torch.isfinite(all_logits).all(dim=-1).all(dim=0)  # [B]
            self.nonfinite_images[index] += nonfinite.sum()
            probs = all_logits.softmax(dim=-1)
            per_model.append(self.view_aggregator(Predictions.from_probs(probs)))
        members = Predictions(
            torch.stack([p.probs for p in per_model]), torch.stack([p.preds for p in per_model])
        )
        return self.model_aggregator(members)

    def model_input(self, images: Tensor) -> Tensor:
        """Normalised images in the models' memory layout."""
        return self.input_spec.normalise(images).contiguous(memory_format=self.memory_format)


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
    predictor.check_finite(sum(len(batch[1]) for batch in outputs))
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


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on CPU), so that a timer reads whole work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
