"""Strategies chosen on the calibration split: greedy views and Caruana members against hand
computations, and `python -m ml_infer.tune` end to end, its presets usable by a later run, its
choices blind to the scored split's labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ml_infer.calibrate import fit_temperature
from ml_infer.data import DigitsDataset
from ml_infer.errors import UserError
from ml_infer.selection import caruana, forward_select, greedy_policy, objective

from .conftest import compose_config, run_cli


def one_hot_rows(classes: list[int], n_classes: int = 3) -> torch.Tensor:
    """Rows that give `classes` 0.8 + the rest's share."""
    return torch.nn.functional.one_hot(torch.tensor(classes), n_classes).double() * 0.8 + 0.2 / 3


def test_greedy_selection_picks_the_known_best_subset():
    labels = torch.tensor([0, 1, 2])
    identity = [[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.1, 0.5, 0.4]]  # wrong on image 2
    a = [[0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]  # wrong on image 0
    b = [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.2, 0.7]]  # wrong on image 1
    c = [[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.8, 0.1, 0.1]]  # wrong everywhere
    # Each image four times: the order is chosen on one half of them, its length on the other.
    candidates = torch.tensor([identity, a, b, c], dtype=torch.float64).repeat(1, 4, 1)
    labels = labels.repeat(4)
    # identity + a: (0.55, 0.35, 0.1), (0.1, 0.75, 0.15), (0.1, 0.3, 0.6): all right.
    # identity + b: image 1 (0.1, 0.4, 0.5) wrong; identity + c: image 0 wrong. Nothing added
    # to identity + a can do better than all right, so the search stops there.
    chosen = greedy_policy(candidates, labels, "accuracy", max_views=4)
    assert chosen.chosen == [0, 1]
    assert chosen.trajectory[:2] == pytest.approx([-2 / 3, -1.0])  # per prefix, second half


def test_greedy_selection_stops_when_nothing_improves():
    labels = torch.tensor([0, 1])
    candidates = torch.stack([one_hot_rows([0, 1]), one_hot_rows([1, 0])])
    assert greedy_policy(candidates, labels, "accuracy", max_views=5).chosen == [0]


def test_caruana_with_replacement_reproduces_a_hand_computed_weight_vector():
    # Two images (true classes 0 and 1), two members: A is right on image 0 only, B on image 1
    # only. With A's weight w, image 0 is right when 0.9w + 0.05(1-w) > 0.5 (w > 0.53) and
    # image 1 when 0.6w < 0.5 (w < 0.83): only mixtures between hold both.
    labels = torch.tensor([0, 1])
    a = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    b = torch.tensor([[0.05, 0.95], [0.0, 1.0]])
    # Start: A (1/2; B ties at 1/2, the lower index starts). Step 1: A+A (w=1) 1/2, A+B (w=1/2)
    # 1/2: a tie, A again. Step 2: AAA 1/2, AAB (w=2/3) 2/2: B. Step 3: AABA (w=3/4) 2/2 is
    # no better, so the best prefix stays A, A, B.
    weights = caruana(torch.stack([a, b]).double(), labels, "accuracy", steps=3)
    assert weights == pytest.approx([2 / 3, 1 / 3])
    selection = forward_select(
        torch.stack([a, b]).double(),
        labels,
        "accuracy",
        start=[0],
        with_replacement=True,
        max_steps=3,
        stop_when_worse=False,
    )
    assert selection.chosen == [0, 0, 1]
    assert selection.trajectory == [-0.5, -0.5, -1.0, -1.0]


def test_bagged_caruana_sums_the_counts_of_its_bags():
    labels = torch.tensor([0, 1])
    a = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    b = torch.tensor([[0.05, 0.95], [0.0, 1.0]])
    weights = caruana(torch.stack([a, b]).double(), labels, "accuracy", steps=3, bags=4)
    assert sum(weights) == pytest.approx(1.0) and all(w >= 0 for w in weights)
    again = caruana(torch.stack([a, b]).double(), labels, "accuracy", steps=3, bags=4)
    assert weights == again  # fixed by the seed


def test_the_nll_objective_is_the_nll_after_a_fitted_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial((logits / 1.7).softmax(dim=1), 1, generator=generator).squeeze(1)
    probs = logits.softmax(dim=1)
    t = fit_temperature(probs.log(), labels)
    expected = torch.nn.functional.cross_entropy(probs.log() / t, labels)
    assert objective(probs, labels, "nll") == pytest.approx(float(expected), rel=1e-9)
    assert t == pytest.approx(1.7, rel=0.1)
    with pytest.raises(UserError, match="valid: nll, accuracy"):
        objective(probs, labels, "auc")


def tune(runs_dir: Path, out: Path, *overrides: str) -> dict:
    from ml_infer.task import run_evaluation

    out.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(
        ["mode=tune", f"tune.presets_dir={out / 'presets'}", *overrides], runs_dir=runs_dir
    )
    return run_evaluation(cfg, output_dir=out)


def preset_text(path: Path) -> dict:
    content = yaml.safe_load(path.read_text())
    for node in (content, content.get("provenance", {})):
        node.pop("written", None)
    return content


@pytest.mark.slow
def test_tuning_on_digits_chooses_no_label_changing_view_and_writes_usable_presets(
    runs_dir, tmp_path
):
    metrics = tune(runs_dir, tmp_path, "ensemble=folds")
    geometric = {"horizontal_flip", "vertical_flip", "rotate_90", "rotate_180", "rotate_270"}
    assert not geometric & set(metrics["tta_chosen_views"])
    assert metrics["tta_score"] <= min(metrics["hand_preset_scores"].values()) + 1e-9
    assert sum(metrics["ensemble_weights"]) == pytest.approx(1.0)
    ensemble = yaml.safe_load((tmp_path / "presets" / "ensemble" / "tuned.yaml").read_text())
    assert len(ensemble["checkpoints"]) == len(ensemble["weights"]) >= 1
    shas = {c["sha256"] for c in ensemble["provenance"]["checkpoints"]}
    assert len(shas) == len(metrics["member_scores"]) >= 2  # every fold the fixture trained
    # A later run in that folder names them like any option.
    result = run_cli(
        [
            "ml_infer",
            "strategy=tuned",
            f"runs_dir={runs_dir}",
            "tracking=none",
            f"hydra.run.dir={tmp_path / 'run'}",
            "engine.min_timing_s=0",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert scored["models"] == len(ensemble["checkpoints"])
    assert scored["ensemble_weights"] == pytest.approx(ensemble["weights"], abs=1e-6)


def write_split_folder(root: Path, poisoned: bool = False) -> Path:
    """digits as an image folder with val/ and test/; `poisoned` shuffles the test labels."""
    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        data = DigitsDataset(split=split)
        labels = data.labels.numpy().copy()
        if poisoned and split == "test":
            labels = rng.permutation(labels)
        for position in range(len(data)):
            folder = root / split / str(int(labels[position]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (data.images[position, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels, "L").save(folder / f"{position}.png")
    return root


@pytest.mark.slow
def test_poisoned_test_labels_change_no_selection_and_no_weight(runs_dir, tmp_path):
    choices = []
    for poisoned in (False, True):
        root = write_split_folder(tmp_path / f"data_{poisoned}", poisoned=poisoned)
        out = tmp_path / f"tune_{poisoned}"
        metrics = tune(
            runs_dir,
            out,
            "data=imagefolder",
            f"data.root={root}",
            "ensemble=folds",
            "engine.store=off",
        )
        for key in ("search_s", "presets"):
            metrics.pop(key)
        presets = {
            path.relative_to(out).as_posix(): preset_text(path)
            for path in sorted((out / "presets").rglob("*.yaml"))
        }
        for content in presets.values():
            content.get("provenance", {}).pop("data", None)
        from ml_infer.task import run_evaluation

        learned = run_evaluation(
            compose_config(
                [
                    "data=imagefolder",
                    f"data.root={root}",
                    "strategy=tta",
                    "tta.aggregation=learned",
                    "engine.store=off",
                ],
                runs_dir=runs_dir,
            ),
            output_dir=out / "learned",
        )
        choices.append((metrics, presets, learned["tta_weights"]))
        shutil.rmtree(root)
    assert choices[0] == choices[1]


def test_bad_tuning_settings_are_one_line_errors(runs_dir, tmp_path):
    with pytest.raises(UserError, match="unknown tune.objective 'auc'; valid: nll, accuracy"):
        tune(runs_dir, tmp_path, "tune.objective=auc")
    with pytest.raises(UserError, match="tune.name must be a plain name"):
        tune(runs_dir, tmp_path, "tune.name=../evil")


def test_learned_weights_go_to_the_view_that_carries_the_labels():
    from ml_infer.learned import LearnedWeights

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=generator)
    informative = torch.nn.functional.one_hot(labels, 3).double() * 0.7 + 0.1
    noise = torch.rand(400, 3, generator=generator, dtype=torch.float64)
    noise = noise / noise.sum(dim=1, keepdim=True)
    probs = torch.stack([noise, informative, noise.roll(1, dims=1)]).unsqueeze(0)  # [1, 3, n, C]
    for mode in ("views", "views_x_classes"):
        fitted = LearnedWeights(mode).fit(probs, labels, ["identity", "good", "bad"])
        weights = fitted.weights_by_view()
        assert sum(weights.values()) == pytest.approx(1.0)
        assert min(weights.values()) >= 0 and weights["good"] == max(weights.values()), weights
        merged = fitted(Predictions_of(probs[0]))
        assert bool((merged.preds == labels).all()), mode  # the noise views outvoted
    without_temperature = LearnedWeights("views", temperature=False)
    without_temperature.fit(probs, labels, ["identity", "good", "bad"])
    assert without_temperature.temperature == 1.0
    assert without_temperature.weights_by_view()["good"] > 0.9
    beta = LearnedWeights("beta").fit(probs, labels, ["identity", "good", "bad"])
    shares = beta.weights_by_view()
    assert shares["good"] == pytest.approx(shares["bad"]) and shares["identity"] < 0.5
    merged = beta(Predictions_of(probs[0]))
    assert torch.allclose(merged.probs.sum(dim=1), torch.ones(400, dtype=merged.probs.dtype))


def Predictions_of(probs: torch.Tensor):
    from ml_infer.aggregate import Predictions

    return Predictions.from_probs(probs)


@pytest.mark.slow
def test_learned_aggregation_of_the_seeds_views_on_digits(runs_dir, tmp_path):
    from ml_infer.task import run_evaluation

    standard = run_evaluation(compose_config([], runs_dir=runs_dir), output_dir=tmp_path / "s")
    learned = run_evaluation(
        compose_config(["strategy=tta", "tta.aggregation=learned"], runs_dir=runs_dir),
        output_dir=tmp_path / "l",
    )
    assert learned["accuracy"] >= standard["accuracy"] and learned["ece"] <= 0.05
    weights = learned["tta_weights"]
    assert len(weights) == 10 and sum(weights.values()) == pytest.approx(1.0)
    assert 0 < learned["tta_temperature"] < 1  # ten views' mean is under-confident
    # The mean of the same views, for contrast: label-changing views wreck its calibration.
    mean = run_evaluation(
        compose_config(["strategy=tta"], runs_dir=runs_dir), output_dir=tmp_path / "m"
    )
    assert mean["ece"] > 0.2


@pytest.mark.slow
def test_compare_tuned_before_tuning_is_one_line(runs_dir, tmp_path):
    result = run_cli(
        ["ml_infer", "-m", "+experiment=compare_tuned", f"runs_dir={runs_dir}", "tracking=none"],
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: +experiment=compare_tuned compares the presets `python -m ml_infer.tune` writes, "
        "and ./presets/strategy/tuned.yaml is missing here; run the tuning first, in this folder"
    ]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_policy_tuned_for_one_checkpoint_names_that_checkpoint(runs_dir, tmp_path):
    checkpoint = runs_dir / "fold_1" / "weights" / "best.pt"
    tune(runs_dir, tmp_path, f"ensemble.checkpoints=[{checkpoint}]")
    ensemble = yaml.safe_load((tmp_path / "presets" / "ensemble" / "tuned.yaml").read_text())
    assert ensemble["checkpoints"] == [str(checkpoint)] and ensemble["weights"] is None
    strategy = yaml.safe_load((tmp_path / "presets" / "strategy" / "tuned.yaml").read_text())
    assert {"override /ensemble": "tuned"} in strategy["defaults"]


def test_a_tuning_name_of_conf_or_a_path_that_could_interpolate_is_refused(runs_dir, tmp_path):
    from ml_infer.tune import _escaped

    with pytest.raises(
        UserError, match=r"tune.name='folds' is already an option of conf/ensemble/"
    ):
        tune(runs_dir, tmp_path, "tune.name=folds")
    with pytest.raises(UserError, match="tune.bags must be a whole number >= 0, got -1"):
        tune(runs_dir, tmp_path, "tune.bags=-1")
    assert _escaped({"p": ["/a/${x}"]}) == {"p": ["/a/\\${x}"]}
    with pytest.raises(UserError, match="backslash before"):
        _escaped("/tmp/a\\${oc.env:HOME}/b.pt")
    assert not (tmp_path / "presets").exists()
