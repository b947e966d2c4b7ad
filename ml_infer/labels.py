"""A labelled data set's classes matched to a checkpoint's by name.

A folder's classes are its sorted folder names; a checkpoint lists the classes of its outputs.
Labels are renumbered to the checkpoint's order, so a folder may hold any subset of the
checkpoint's classes, in any order. A folder class the checkpoint does not know is refused, or,
with `data.unknown_classes=skip`, its images are left out and listed in skipped_files.csv.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ml_infer.errors import UserError, one_of
from ml_infer.imagesets import SkippedFile, TensorImages

UNKNOWN_CLASSES_CHOICES = ("error", "skip")


def labelled_by_name(
    dataset: TensorImages, model_classes: Sequence[str], unknown_classes: str = "error"
) -> TensorImages:
    """`dataset` with its labels numbered as `model_classes` and those as its classes; the same
    object when the names already match in order. Images of classes the checkpoint does not
    know are refused, or left out with `unknown_classes="skip"`."""
    check_unknown_classes(unknown_classes)
    data_classes, model_classes = list(dataset.classes), list(model_classes)
    if data_classes == model_classes:
        return dataset
    position = {name: k for k, name in enumerate(model_classes)}
    unknown = [name for name in data_classes if name not in position]
    if unknown and unknown_classes == "error":
        raise UserError(
            f"the data has classes the checkpoint does not know: {_listed(unknown)} (the "
            f"checkpoint's: {_listed(model_classes)}); set data.unknown_classes=skip to leave "
            "their images out"
        )
    # A copy that shares the images: its labels and classes are replaced below.
    dataset = _without_classes(dataset, unknown) if unknown else copy.copy(dataset)
    renumbered = torch.tensor(
        [position.get(name, -1) for name in data_classes],
        dtype=torch.long,
    )
    dataset.labels = renumbered[dataset.labels] if len(dataset.labels) else dataset.labels
    dataset.classes = model_classes
    return dataset


def check_unknown_classes(choice: str) -> None:
    """A UserError naming the valid choices of `data.unknown_classes`, if `choice` is not one."""
    if choice not in UNKNOWN_CLASSES_CHOICES:
        raise one_of("data.unknown_classes", choice, UNKNOWN_CLASSES_CHOICES)


def _without_classes(dataset: TensorImages, unknown: Sequence[str]) -> TensorImages:
    """The images of every class but `unknown`; theirs added to the skipped files."""
    unknown_labels = [dataset.classes.index(name) for name in unknown]
    dropped = torch.isin(dataset.labels, torch.tensor(unknown_labels, dtype=torch.long))
    if bool(dropped.all()):
        raise UserError(
            f"no images left: every image's class is unknown to the checkpoint ({_listed(unknown)})"
        )
    kept = dataset.subset(torch.nonzero(~dropped).flatten().tolist())
    kept.skipped = list(dataset.skipped) + [
        SkippedFile(
            str(dataset.sample_ids[position]),
            f"class {dataset.classes[int(dataset.labels[position])]!r} is not one of the "
            "checkpoint's classes",
        )
        for position in torch.nonzero(dropped).flatten().tolist()
    ]
    return kept


def class_presence(labels: torch.Tensor, classes: Sequence[str]) -> dict[str, list[str]]:
    """The checkpoint's classes that the scored labels hold, and those they do not.

    >>> class_presence(torch.tensor([2, 0, 2]), ["a", "b", "c"])
    {'classes_present': ['a', 'c'], 'classes_absent': ['b']}
    """
    present = set(labels.tolist())
    return {
        "classes_present": [name for k, name in enumerate(classes) if k in present],
        "classes_absent": [name for k, name in enumerate(classes) if k not in present],
    }


def _listed(names: Sequence[str], most: int = 12) -> str:
    shown = ", ".join(repr(name) for name in names[:most])
    return f"[{shown}{', …' if len(names) > most else ''}]"
