"""Files a user was handed are data: a checkpoint's strings are never resolved, instantiated or
unpickled as code, whichever entry point reads it.

Each payload is first shown to be live (Hydra builds it and a marker file appears), then fed to
every entry point, which must refuse it with one line naming the file and the key, exit 2, and
leave no marker.
"""

from __future__ import annotations

import contextlib
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml_infer.bank import load_classifier
from ml_infer.checkpoints import read_checkpoint
from ml_infer.errors import UserError

from .conftest import REPO, run_cli


def _opener(marker: Path) -> str:
    return f"{{_target_: os.makedirs, name: {marker}}}"


# name -> (where the payload sits in the model config, how it is built from a marker path)
PAYLOADS = {
    "top_level_oc_create": ("model.width", lambda m: {"width": f"${{oc.create:{_opener(m)}}}"}),
    "top_level_oc_decode": (
        "model.width",
        lambda m: {"width": f"${{oc.create:${{oc.decode:'{_opener(m)}'}}}}"},
    ),
    "list_item": ("model.width[0]", lambda m: {"width": [f"${{oc.create:{_opener(m)}}}"]}),
    "nested_dict_value": (
        "model.width.inner",
        lambda m: {"width": {"inner": f"${{oc.create:{_opener(m)}}}"}},
    ),
}


def hostile_checkpoint(fold_path: Path, directory: Path, payload: str) -> tuple[Path, Path]:
    """A copy of a real fold whose model config carries `payload`; returns (file, marker)."""
    marker = directory / f"marker_{payload}"
    contents, _ = read_checkpoint(fold_path)
    contents = copy.deepcopy(dict(contents))
    contents["model"] = {**contents["model"], **PAYLOADS[payload][1](marker)}
    path = directory / f"{payload}.pt"
    torch.save(contents, path)
    return path, marker


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_the_payload_is_live_when_hydra_builds_it(payload, fold_paths, tmp_path):
    """What the pre-fix loader did with a checkpoint's model config: the marker appears."""
    from hydra.utils import instantiate

    path, marker = hostile_checkpoint(fold_paths[0], tmp_path, payload)
    config = torch.load(path, weights_only=True)["model"]
    if payload == "nested_dict_value":  # the old loader refused dicts; Hydra itself does not
        config = {"_target_": "builtins.dict", "width": config["width"]}
    with contextlib.suppress(Exception):  # SmallCNN rejects what was built; the damage is done
        instantiate(config)
    assert marker.exists()


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_the_loader_refuses_the_payload(payload, fold_paths, tmp_path):
    path, marker = hostile_checkpoint(fold_paths[0], tmp_path, payload)
    with pytest.raises(UserError) as refused:
        load_classifier(path)
    assert str(refused.value).startswith(f"checkpoint {path}: {PAYLOADS[payload][0]} holds")
    assert not marker.exists()


ENTRY_POINTS = ["python -m ml_infer", "--checkpoint_path", "--ensemble", "mode=predict", "bench"]


def entry_point_command(entry: str, hostile: Path, good: Path, tmp_path: Path) -> list[str]:
    run_dir = f"hydra.run.dir={tmp_path / 'run'}"
    if entry == "python -m ml_infer":
        return ["ml_infer", f"ensemble.checkpoints=[{hostile}]", "tracking=none", run_dir]
    if entry == "--checkpoint_path":
        return ["ml_infer.cli", "--checkpoint_path", str(hostile), "tracking=none", run_dir]
    if entry == "--ensemble":
        return ["ml_infer.cli", "--ensemble", str(good), str(hostile), "tracking=none", run_dir]
    if entry == "mode=predict":
        images = tmp_path / "images"
        images.mkdir()
        from PIL import Image

        Image.new("L", (8, 8), 128).save(images / "a.png")
        return [
            "ml_infer",
            "mode=predict",
            f"predict.root={images}",
            f"ensemble.checkpoints=[{hostile}]",
            "tracking=none",
            run_dir,
        ]
    runs = tmp_path / "bench_runs" / "fold_0" / "weights"
    runs.mkdir(parents=True)
    (runs / "best.pt").write_bytes(hostile.read_bytes())
    return [
        str(REPO / "scripts" / "bench.py"),
        "--quick",
        "--models",
        "digits",
        "--no-plot",
        "--runs-dir",
        str(runs.parent.parent),
        "--output-dir",
        str(tmp_path / "bench"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_every_entry_point_refuses_the_payload(entry, payload, fold_paths, tmp_path):
    hostile, marker = hostile_checkpoint(fold_paths[0], tmp_path, payload)
    if entry == "bench":
        hostile_name = tmp_path / "bench_runs" / "fold_0" / "weights" / "best.pt"
    else:
        hostile_name = hostile
    args = entry_point_command(entry, hostile, fold_paths[1], tmp_path)
    if entry == "bench":
        result = subprocess.run(
            [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )
    else:
        result = run_cli(args, cwd=REPO)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith(f"error: checkpoint {hostile_name}: {PAYLOADS[payload][0]} holds")
    assert not marker.exists()
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "predictions.csv").exists()


def seed_style_checkpoint(fold_path: Path, directory: Path, run_config: str) -> Path:
    """A seed-project best.pt (weights only) with its run config.yaml beside weights/."""
    contents, _ = read_checkpoint(fold_path)
    path = directory / "seed_run" / "weights" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 3, "model_state_dict": dict(contents["model_state_dict"])}, path)
    (directory / "seed_run" / "config.yaml").write_text(run_config)
    return path


def test_a_seed_run_config_is_read_as_data(fold_paths, tmp_path):
    marker = tmp_path / "marker"
    path = seed_style_checkpoint(
        fold_paths[0],
        tmp_path,
        "model:\n  num_classes: 10\n"
        "transforms:\n  test:\n"
        f"    resize: '${{oc.create:{_opener(marker)}}}'\n"
        "    normalize: {mean: [0.3], std: [0.4]}\n",
    )
    with pytest.raises(
        UserError,
        match=rf"run config {tmp_path / 'seed_run' / 'config.yaml'}: transforms.test.resize holds",
    ):
        load_classifier(path, model_config={"_target_": "ml_infer.models.SmallCNN"})
    assert not marker.exists()


def test_a_seed_run_config_that_is_not_yaml_is_one_error(fold_paths, tmp_path):
    path = seed_style_checkpoint(fold_paths[0], tmp_path, "model: [unclosed\n")
    with pytest.raises(UserError, match="is not readable YAML"):
        load_classifier(path, model_config={"_target_": "ml_infer.models.SmallCNN"})


def test_safetensors_metadata_is_never_read_as_config(fold_paths, tmp_path):
    from safetensors.torch import save_file

    marker = tmp_path / "marker"
    contents, _ = read_checkpoint(fold_paths[0])
    path = tmp_path / "weights.safetensors"
    save_file(
        {k: v.contiguous() for k, v in contents["model_state_dict"].items()},
        path,
        metadata={"model": f"${{oc.create:{_opener(marker)}}}", "classes": "${oc.env:HOME}"},
    )
    classifier = load_classifier(
        path,
        model_config={"_target_": "ml_infer.models.SmallCNN"},
        classes=[str(d) for d in range(10)],
        input_spec=load_classifier(fold_paths[0]).input_spec,
    )
    assert classifier.classes == [str(d) for d in range(10)]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 10**9}, "argument 'width' is 1000000000; valid: 1 to 4096"),
        ({"width": 8.5}, "argument 'width' must be an integer, got float 8.5"),
        ({"width": True}, "argument 'width' must be an integer, got bool True"),
        ({"dropout": float("nan")}, "argument 'dropout' must be a number, got float nan"),
        ({"depth": 3}, "argument 'depth' is not one ml_infer.models.SmallCNN takes"),
        ({"num_classes": 9}, "its model has 9 outputs but it lists 10 classes"),
    ],
)
def test_architecture_arguments_are_type_checked(change, message, fold_paths, tmp_path):
    contents, _ = read_checkpoint(fold_paths[0])
    contents = dict(contents)
    contents["model"] = {**contents["model"], **change}
    path = tmp_path / "changed.pt"
    torch.save(contents, path)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_classifier(path)


def test_a_torchvision_name_must_be_a_torchvision_classifier(fold_paths, tmp_path):
    contents, _ = read_checkpoint(fold_paths[0])
    contents = dict(contents)
    contents["model"] = {
        "_target_": "ml_infer.models.torchvision_classifier",
        "name": "fasterrcnn_resnet50_fpn",
        "in_channels": 1,
        "num_classes": 10,
    }
    path = tmp_path / "detector.pt"
    torch.save(contents, path)
    with pytest.raises(UserError, match="'name' is 'fasterrcnn_resnet50_fpn'; valid: alexnet"):
        load_classifier(path)


# The modules that read files a user was handed (and the loader that builds a checkpoint's model).
FILE_READERS = (
    "checkpoints.py",
    "models.py",
    "bank.py",
    "filedata.py",
    "inputs.py",
    "folders.py",
    "outputs.py",
    "sweeplock.py",
    "report.py",
    "tracking/runs.py",
    "tracking/sweep.py",
    "tracking/sync.py",
    "tracking/store.py",
)


@pytest.mark.parametrize("module", FILE_READERS)
def test_no_reader_of_user_files_can_resolve_or_instantiate(module):
    """A regression guard beside the live payloads: the readers of user files use neither
    OmegaConf's loaders and resolvers nor Hydra's instantiate. (bank.py instantiates only the
    user's own `model=` config, through config.instantiate, never a checkpoint's.)"""
    import ast

    tree = ast.parse((REPO / "ml_infer" / module).read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    attributes = {ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and (node.module or "").startswith(("hydra", "omegaconf"))
        for alias in node.names
    }
    assert "OmegaConf" not in names | imported, module
    assert not {a for a in attributes if a.startswith("OmegaConf.")}, module
    assert "instantiate" not in imported, module
    if module != "bank.py":
        assert "instantiate" not in names, module


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"size": [100000, 100000]}, "input size [100000, 100000] is more than 89478485 pixels"),
        ({"mean": [float("nan")]}, "input mean [nan] and std [0.3758"),
    ],
)
def test_a_checkpoints_input_spec_is_bounded(spec, message, fold_paths, tmp_path):
    """Every image is resized to the size a checkpoint asks for: a huge one is refused."""
    contents, _ = read_checkpoint(fold_paths[0])
    contents = dict(contents)
    contents["input"] = {**contents["input"], **spec}
    path = tmp_path / "huge_input.pt"
    torch.save(contents, path)
    with pytest.raises(UserError, match=re.escape(message)):
        load_classifier(path)
