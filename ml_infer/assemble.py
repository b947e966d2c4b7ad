"""A strategy's predictions assembled from per-(member, view) outputs: served by the prediction
store where it has them, computed (only the missing pairs) where it does not.

Also what those outputs tell for free: each view alone and each member alone, and per-image
uncertainty (entropy of the merged prediction; mutual information and disagreement between the
views and members).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ml_infer.aggregate import Predictions
from ml_infer.bank import Classifier
from ml_infer.predictor import Predictor
from ml_infer.runners import Runner
from ml_infer.store import MemoryStore, data_identity, entry_key

IDENTITY = "identity"


@dataclasses.dataclass(frozen=True)
class StoreKeys:
    """The store keys of a run's outputs: what every entry of the run shares, plus each pair's
    member and view."""

    members: Sequence[Classifier]
    view_ids: dict[str, str]  # view name -> its augmentation class and name
    shared: dict[str, Any]  # data, normalisation, engine numerics

    @classmethod
    def of(cls, predictor: Predictor, members: Sequence[Classifier], dataset: Any) -> StoreKeys:
        data = data_identity(dataset)
        shift = getattr(dataset, "shift", None)  # named beside the digest, when there is one
        device = predictor.device
        return cls(
            members=members,
            view_ids=predictor.views.view_ids(),
            shared={
                "data": data,
                **({"shift": shift} if shift else {}),
                "input": predictor.input_spec.to_dict(),
                "engine": {
                    "device": device.type
                    if device.type != "cuda"
                    else torch.cuda.get_device_name(device),
                    "channels_last": predictor.engine.channels_last,
                    "fold_batch_norm": predictor.engine.fold_batch_norm,
                    "forward_batch_size": predictor.forward_batch_size,
                    **({"compile": True} if predictor.engine.compile else {}),
                },
            },
        )

    def parts(self, member: int, view: str, precision: str) -> dict[str, Any]:
        classifier = self.members[member]
        return {
            "checkpoint_sha256": classifier.sha256,
            "weights": classifier.weights,
            "architecture": classifier.model_config,
            "view": self.view_ids[view],
            "precision": precision,
            **self.shared,
        }

    def key(self, member: int, view: str, precision: str) -> str:
        return entry_key(self.parts(member, view, precision))


@dataclasses.dataclass
class Assembled:
    """A run's outputs: logits [M, K, N, C] of the strategy's pairs and the standard baseline's
    logits [N, C]; how many (member, view) passes over the data this run computed."""

    logits: Tensor | None  # None on the helper processes of a multi-process run
    baseline_logits: Tensor | None
    passes_computed: int


def assemble(
    predictor: Predictor,
    keys: StoreKeys,
    store: MemoryStore,
    runner: Runner,
    loader: Any,
    *,
    progress: bool = True,
    with_baseline: bool = True,
) -> Assembled:
    """The strategy's (member, view) logits and the baseline's (first member, identity, fp32),
    from the store, computing only what it lacks (every process takes part in that)."""
    precision = predictor.precision_name
    views = list(predictor.views.names)
    wanted = [(m, view, precision) for m in range(len(predictor.models)) for view in views]
    baseline = (0, IDENTITY, "fp32")
    if with_baseline and baseline not in wanted:
        wanted.append(baseline)
    # The main process reads the store; the others learn from it what to compute with it.
    missing = (
        [pair for pair in wanted if store.get(keys.key(*pair)) is None]
        if runner.is_main_process
        else []
    )
    missing = runner.agree(missing) if runner.num_processes > 1 else missing
    for group_members, group_views, group_precision in _groups(missing):
        autocast = predictor.autocast_dtype if group_precision == precision else None
        part = predictor.restricted(group_members, group_views, autocast_dtype=autocast)
        logits, _ = runner.collect(part, loader, progress=progress)
        if not runner.is_main_process:
            continue  # every process took part in the pass; the main one keeps the outputs
        for i, member in enumerate(group_members):
            for k, view in enumerate(group_views):
                pair = (member, view, group_precision)
                store.put(keys.key(*pair), logits[i, k], keys.parts(*pair))
    if not runner.is_main_process:
        return Assembled(None, None, len(missing))
    stacked = torch.stack(
        [
            torch.stack([_entry(store, keys, m, view, precision) for view in views])
            for m in range(len(predictor.models))
        ]
    )
    baseline_logits = _entry(store, keys, *baseline) if with_baseline else None
    return Assembled(stacked, baseline_logits, len(missing))


def _entry(store: MemoryStore, keys: StoreKeys, member: int, view: str, precision: str) -> Tensor:
    logits = store.get(keys.key(member, view, precision))
    if logits is None:  # written a moment ago: only a store emptied meanwhile lacks it
        raise RuntimeError(f"the prediction store lost the entry of {member}/{view}/{precision}")
    return logits


def _groups(
    missing: Sequence[tuple[int, str, str]],
) -> list[tuple[list[int], list[str], str]]:
    """Missing pairs as passes: the members lacking the same views at the same precision share
    one pass over the data.

    >>> _groups([(0, "a", "fp32"), (1, "a", "fp32"), (0, "identity", "bf16")])
    [([0, 1], ['a'], 'fp32'), ([0], ['identity'], 'bf16')]
    """
    by_member: dict[tuple[int, str], list[str]] = {}
    for member, view, precision in missing:
        by_member.setdefault((member, precision), []).append(view)
    passes: dict[tuple[tuple[str, ...], str], list[int]] = {}
    for (member, precision), views in by_member.items():
        passes.setdefault((tuple(views), precision), []).append(member)
    return [(members, list(views), precision) for (views, precision), members in passes.items()]


def per_view_accuracy(predictor: Predictor, logits: Tensor, labels: Tensor) -> dict[str, float]:
    """The strategy with one view at a time (its models merged as the strategy merges them)."""
    result = {}
    for k, name in enumerate(predictor.views.names):
        probs = logits[:, k].softmax(dim=-1)  # [M, N, C]
        merged = predictor.model_aggregator(Predictions.from_probs(probs))
        result[name] = float((merged.preds == labels).float().mean())
    return result


def per_member_accuracy(
    predictor: Predictor, logits: Tensor, labels: Tensor, names: Sequence[str]
) -> dict[str, float]:
    """Each checkpoint alone (its views merged as the strategy merges them)."""
    result = {}
    for m, name in enumerate(names):
        merged = predictor.view_aggregator(Predictions.from_probs(logits[m].softmax(dim=-1)))
        result[name] = float((merged.preds == labels).float().mean())
    return result


def uncertainty(logits: Tensor, merged: Predictions) -> dict[str, Tensor]:
    """Per image: the entropy of the merged prediction (nats); the mutual information between
    the prediction and which view/member made it (entropy of their mean minus their mean
    entropy), and the share of views/members whose class differs from the merged one. Both are
    0 for a single view of a single model.

    >>> logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # 1 model, 2 views, 1 image
    >>> merged = Predictions.from_probs(logits.softmax(-1).mean(dim=(0, 1)))
    >>> [round(float(v[0]), 4) for v in uncertainty(logits, merged).values()]
    [0.6931, 0.3278, 0.5]
    """
    members = logits.flatten(0, 1).softmax(dim=-1)  # [M*K, N, C]
    mean = members.mean(dim=0)
    mutual_information = (_entropy(mean) - _entropy(members).mean(dim=0)).clamp_min(0.0)
    disagreement = (members.argmax(dim=-1) != merged.preds).float().mean(dim=0)
    return {
        "entropy": _entropy(merged.probs),
        "mutual_information": mutual_information,
        "disagreement": disagreement,
    }


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
