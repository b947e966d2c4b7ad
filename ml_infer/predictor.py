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
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ml_infer.aggregate import Aggregator, Predictions, SoftVoting
from ml_infer.augment import Views
from ml_infer.errors import UserError
from ml_infer.inputs import InputSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How the engine runs a model's forwards (`engine.*` of conf/config.yaml): the same outputs
    either way, up to float rounding; only the speed differs."""

    forward_batch_size: int | Literal["auto"] = "auto"
    channels_last: bool = False
    fold_batch_norm: bool = True
    compile: bool = False  # torch.compile each model (the same outputs up to float rounding)
    progress: bool = True  # a bar on a terminal, else a line every progress_every_s seconds
    progress_every_s: float = 30.0

    @classmethod
    def from_config(cls, engine: Any) -> EngineSettings:
        """From the `engine` block of a run's config.

        >>> EngineSettings.from_config({"forward_batch_size": 64, "channels_last": True,
        ...                             "fold_batch_norm": False}).forward_batch_size
        64
        """
        return cls(
            forward_batch_size=engine["forward_batch_size"],
            channels_last=bool(engine["channels_last"]),
            fold_batch_norm=bool(engine["fold_batch_norm"]),
            compile=bool(engine.get("compile", False)),
            progress=bool(engine.get("progress", True)),
            progress_every_s=float(engine.get("progress_every_s", 30.0)),
        )


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
    except Exception as error:  # noqa: BLE001 - any tracing failure: run the model as is
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
        engine: EngineSettings | None = None,
        member_names: Sequence[str] | None = None,
    ) -> None:
        engine = engine or EngineSettings()
        self.engine = engine
        self.forward_batch_size = resolve_forward_batch_size(
            engine.forward_batch_size, device, input_spec
        )
        memory_format = torch.channels_last if engine.channels_last else torch.contiguous_format
        self.models = [
            (fold_batch_norm(m.eval()) if engine.fold_batch_norm else m.eval())
            .to(device)
            .to(memory_format=memory_format)
            for m in models
        ]
        if engine.compile:
            self.models = [torch.compile(model) for model in self.models]  # type: ignore[misc]
        # A forward batch size chosen for the device halves itself when CUDA runs out of memory.
        self.backs_off = engine.forward_batch_size == "auto" and device.type == "cuda"
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

    def check_finite(self, n_images: int, total: Callable[[Tensor], Tensor] | None = None) -> None:
        """A UserError when any model gave NaN or infinite outputs since the last check: such
        outputs would poison every merged probability and metric, so nothing is computed from
        them. `total` sums the counts of every process of a multi-process run. Resets the
        counts."""
        counts = (total(self.nonfinite_images) if total else self.nonfinite_images).tolist()
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
        return self.merge(self.logits(images))

    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        """Every model's logits under every view of a batch: [M, K, B, C], float32. With an
        `auto` forward batch size on CUDA, running out of memory halves it (said once) and the
        batch is run again."""
        try:
            return self._logits(images)
        except torch.OutOfMemoryError:
            if not self.backs_off or self.forward_batch_size == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.forward_batch_size //= 2
            if not getattr(self, "_said_back_off", False):
                log.warning(
                    "out of memory on %s: forward batch size now %d (it halves again if need "
                    "be; engine.forward_batch_size=N fixes it)",
                    self.device,
                    self.forward_batch_size,
                )
                self._said_back_off = True
            return self.logits(images)

    def _logits(self, images: Tensor) -> Tensor:
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
        return torch.stack([torch.cat(per_model, dim=1).float() for per_model in logits])

    def merge(self, logits: Tensor) -> Predictions:
        """Logits [M, K, B, C] -> one prediction per image: softmax, the view aggregator over
        each model's views, then the model aggregator. Images whose logits hold a NaN or an
        infinity are counted per model (`check_finite`)."""
        nonfinite = ~torch.isfinite(logits).all(dim=-1).all(dim=1)  # [M, B]
        self.nonfinite_images += nonfinite.sum(dim=1).to(self.nonfinite_images.device)
        per_model = [
            self.view_aggregator(Predictions.from_probs(model_logits.softmax(dim=-1)))
            for model_logits in logits
        ]
        members = Predictions(
            torch.stack([p.probs for p in per_model]), torch.stack([p.preds for p in per_model])
        )
        return self.model_aggregator(members)

    def model_input(self, images: Tensor) -> Tensor:
        """Normalised images in the models' memory layout."""
        return self.input_spec.normalise(images).contiguous(memory_format=self.memory_format)

    def restricted(
        self,
        members: Sequence[int],
        view_names: Sequence[str],
        *,
        autocast_dtype: torch.dtype | str | None = "same",
    ) -> Predictor:
        """The same prepared models (already folded and laid out), only `members` under only
        `view_names`, merged by plain means: what the store lacks, or `standard` for timing."""

        restricted = copy.copy(self)
        restricted.models = [self.models[index] for index in members]
        restricted.member_names = [self.member_names[index] for index in members]
        restricted.views = self.views.subset(view_names)
        restricted.view_aggregator = SoftVoting()
        restricted.model_aggregator = SoftVoting()
        if autocast_dtype != "same":
            restricted.autocast_dtype = autocast_dtype  # type: ignore[assignment]
        restricted.nonfinite_images = torch.zeros(
            len(members), dtype=torch.int64, device=self.device
        )
        return restricted
