"""The README's bad-input table, walked row by row.

Each row of the table under "### Bad input, row by row" names an input, an example, the line a
user sees on stderr and the exit code. Every row has a scenario here that builds the input for
real (hostile or broken files, read-only or full disks, signals) and runs `python -m ml_infer`
as a user's shell would; the test checks the exit code, that a failure is exactly one line
matching the table's message (`<...>` stands for a path of the test, `…` for elided text), that
there is no traceback, and that no result file of the run is left behind. A row without a
scenario, or a scenario without a row, fails the test: the table cannot drift.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from ml_infer.checkpoints import read_checkpoint

from .conftest import REPO, run_cli, write_digits_folder

README = REPO / "README.md"
TABLE_HEADING = "### Bad input, row by row"


@dataclasses.dataclass
class Row:
    input: str
    example: str
    message: str
    exit_code: int


def readme_rows() -> list[Row]:
    text = README.read_text()
    section = text.split(TABLE_HEADING, 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| input |"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if len(cells) != 4 or set(cells[0]) <= {"-"}:
            continue
        rows.append(Row(cells[0], cells[1].strip("`"), cells[2].strip("`"), int(cells[3])))
    return rows


def message_pattern(message: str) -> re.Pattern[str]:
    """The table's message as a regex: `<anything>` and `…` match any text."""
    parts = re.split(r"(<[^<>]+>|…)", message)
    return re.compile(
        "".join(".+" if re.fullmatch(r"<[^<>]+>|…", p) else re.escape(p) for p in parts)
    )


@dataclasses.dataclass
class Case:
    """What a scenario ran: the process result and the run directory it must leave clean."""

    result: subprocess.CompletedProcess
    run_dir: Path
    check: Callable[[], None] | None = None


class Scenarios:
    """One method per table row, each building its input and running the command."""

    def __init__(self, tmp_path: Path, fold_paths: list[Path], runs_dir: Path) -> None:
        self.tmp = tmp_path
        self.folds = fold_paths
        self.runs_dir = runs_dir
        self.run_dir = tmp_path / "run"

    # -- helpers ---------------------------------------------------------------------------
    def evaluate(self, *overrides: str, run_dir: Path | None = None, timeout: float = 300) -> Case:
        run_dir = run_dir or self.run_dir
        args = [
            "ml_infer",
            f"hydra.run.dir={run_dir}",
            f"runs_dir={self.runs_dir}",
            "engine.min_timing_s=0",
            "tracking=none",
            *overrides,
        ]
        return Case(run_cli(args, cwd=self.tmp, timeout=timeout), run_dir)

    def checkpoint(self, name: str, change: Callable[[dict], None]) -> Path:
        contents, _ = read_checkpoint(self.folds[0])
        contents = dict(contents)
        change(contents)
        path = self.tmp / name
        torch.save(contents, path)
        return path

    def state_dict_file(self, name: str, change: Callable[[dict], None]) -> Path:
        contents, _ = read_checkpoint(self.folds[0])
        state = dict(contents["model_state_dict"])
        change(state)
        path = self.tmp / name
        torch.save(state, path)
        return path

    def with_checkpoint(self, path: Path, *overrides: str) -> Case:
        return self.evaluate(f"ensemble.checkpoints=[{path}]", *overrides)

    def digit_folder(
        self, root: Path, classes: list[str] | None = None, per_class: int = 3
    ) -> Path:
        """Real digit scans as 8x8 PNGs under root/<class>/; class k is named classes[k]."""
        return write_digits_folder(root, classes, per_class)

    def imagefolder(self, root: Path, *overrides: str) -> Case:
        return self.evaluate(
            "data=imagefolder",
            f"data.root='{root}'",
            f"ensemble.checkpoints=[{self.folds[0]}]",
            *overrides,
        )

    @contextlib.contextmanager
    def tmpfs(self, size: str, *options: str) -> Iterator[Path]:
        """A small tmpfs mount (root only; the test is skipped where mounting is not allowed)."""
        mount_point = self.tmp / f"tmpfs_{size}"
        mount_point.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options])]
        mounted = subprocess.run([*command, "tmpfs", str(mount_point)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        try:
            yield mount_point
        finally:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)

    def interrupted(self, signal_number: int) -> Case:
        """A long run (tta_ensemble, timed for a minute) stopped by a signal once it is busy."""
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ml_infer",
                f"hydra.run.dir={self.run_dir}",
                f"runs_dir={self.runs_dir}",
                "strategy=tta_ensemble",
                "engine.min_timing_s=60",
                "tracking=none",
            ],
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            if "forward passes per image" in line:  # the evaluation has started
                break
        time.sleep(1.0)  # into the timed passes
        sent = time.perf_counter()
        process.send_signal(signal_number)
        stdout, stderr = process.communicate(timeout=30)
        stopped_after = time.perf_counter() - sent
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

        def check() -> None:
            assert stopped_after < 3.0, f"took {stopped_after:.1f} s to stop"

        return Case(result, self.run_dir, check)

    # -- the rows ----------------------------------------------------------------------------
    def misspelt_config_key(self) -> Case:
        return self.evaluate("stratgy=tta")

    def misspelt_nested_key(self) -> Case:
        return self.evaluate("tta.agregation=max")

    def unknown_key_with_nothing_close(self) -> Case:
        return self.evaluate("engine.jit=true")

    def key_of_a_group_not_chosen(self) -> Case:
        return self.evaluate("model.width=64")

    def unknown_strategy(self) -> Case:
        return self.evaluate("strategy=fastest")

    def unknown_augmentation(self) -> Case:
        return self.evaluate("tta.augmentations=[horizontal_flip,mirror]")

    def unknown_tta_aggregation(self) -> Case:
        return self.evaluate("tta.aggregation=avg")

    def unknown_ensemble_aggregation(self) -> Case:
        return self.evaluate("ensemble.aggregation=average")

    def override_that_does_not_parse(self) -> Case:
        return self.evaluate("data.batch_size=[")

    def comma_in_a_single_run(self) -> Case:
        return self.evaluate("data=imagefolder", "data.root=/data/a,b")

    def read_only_output_directory(self) -> Case:
        with self.tmpfs("1m", "ro") as read_only:
            return self.evaluate(run_dir=read_only / "run")

    def output_directory_on_a_full_disk(self) -> Case:
        with self.tmpfs("256k") as disk:
            with contextlib.suppress(OSError), (disk / "filler").open("wb") as filler:
                filler.write(bytes(1 << 20))
            return self.evaluate(run_dir=disk / "run")

    def output_directory_below_a_file(self) -> Case:
        (self.tmp / "a_file").write_text("x")
        return self.evaluate(run_dir=self.tmp / "a_file" / "run")

    def missing_checkpoint(self) -> Case:
        return self.with_checkpoint(self.tmp / "nowhere" / "best.pt")

    def empty_checkpoint(self) -> Case:
        (self.tmp / "empty.pt").write_bytes(b"")
        return self.with_checkpoint(self.tmp / "empty.pt")

    def truncated_checkpoint(self) -> Case:
        data = self.folds[0].read_bytes()
        (self.tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
        return self.with_checkpoint(self.tmp / "truncated.pt")

    def checkpoint_that_pickles_code(self) -> Case:
        path = self.tmp / "pickled.pt"
        torch.save({"model_state_dict": {}, "payload": _Exploit(self.tmp / "pwned")}, path)
        case = self.with_checkpoint(path)
        case.check = lambda: _assert_missing(self.tmp / "pwned")
        return case

    def interpolation_in_a_checkpoint(self) -> Case:
        marker = self.tmp / "pwned"
        payload = f"${{oc.create:{{_target_: os.makedirs, name: {marker}}}}}"
        path = self.checkpoint("interpolated.pt", lambda c: c["model"].update(width=payload))
        case = self.with_checkpoint(path)
        case.check = lambda: _assert_missing(marker)
        return case

    def untrusted_architecture(self) -> Case:
        target = {"_target_": "torchvision.models.resnet.torch.load", "f": "x.pt"}
        return self.with_checkpoint(
            self.checkpoint("untrusted.pt", lambda c: c.update(model=target))
        )

    def classes_that_do_not_match_the_model(self) -> Case:
        path = self.checkpoint("nine.pt", lambda c: c.update(classes=c["classes"][:9]))
        return self.with_checkpoint(path)

    def weights_for_another_number_of_classes(self) -> Case:
        path = self.state_dict_file("plain.pt", lambda s: None)
        return self.with_checkpoint(
            path, "model=small_cnn", "checkpoint.classes=[a,b,c]", *self.input_spec(1)
        )

    def weights_for_other_input_channels(self) -> Case:
        path = self.state_dict_file("plain.pt", lambda s: None)
        return self.with_checkpoint(path, "model=small_cnn", *self.input_spec(3))

    def missing_and_unexpected_weights(self) -> Case:
        def rename(state: dict) -> None:
            state["head.weight"] = state.pop("7.weight")
            state["head.bias"] = state.pop("7.bias")

        path = self.state_dict_file("renamed.pt", rename)
        return self.with_checkpoint(path, "model=small_cnn", *self.input_spec(1))

    def input_spec(self, channels: int) -> list[str]:
        mean = ",".join(["0.3"] * channels)
        std = ",".join(["0.4"] * channels)
        return [
            "checkpoint.input.size=[8,8]",
            f"checkpoint.input.mean=[{mean}]",
            f"checkpoint.input.std=[{std}]",
        ]

    def model_with_nan_outputs(self) -> Case:
        def poison(contents: dict) -> None:
            contents["model_state_dict"]["7.bias"] = torch.full_like(
                contents["model_state_dict"]["7.bias"], float("nan")
            )

        return self.with_checkpoint(self.checkpoint("nan.pt", poison))

    def ensemble_members_with_other_classes(self) -> Case:
        def rename(contents: dict) -> None:
            contents["classes"] = [*contents["classes"][:-1], "nine"]

        path = self.checkpoint("renamed.pt", rename)
        return self.evaluate("strategy=ensemble", f"ensemble.checkpoints=[{self.folds[0]},{path}]")

    def ensemble_members_of_other_architectures(self) -> Case:
        from ml_infer.checkpoints import save_checkpoint
        from ml_infer.models import SmallCNN

        spec = read_checkpoint(self.folds[0])[0]["input"]
        from ml_infer.inputs import InputSpec

        narrow = save_checkpoint(
            self.tmp / "narrow.pt",
            model_config={
                "_target_": "ml_infer.models.SmallCNN",
                "width": 8,
                "in_channels": 1,
                "num_classes": 10,
            },
            model_state_dict=SmallCNN(in_channels=1, num_classes=10, width=8).state_dict(),
            classes=[str(d) for d in range(10)],
            input_spec=InputSpec.from_dict(spec),
        )
        return self.evaluate(
            "strategy=ensemble", f"ensemble.checkpoints=[{self.folds[0]},{narrow}]"
        )

    def weights(self, weights: str) -> Case:
        return self.evaluate(
            "strategy=ensemble", "ensemble=weighted", f"ensemble.weights={weights}"
        )

    def ensemble_weights_of_the_wrong_length(self) -> Case:
        return self.weights("[0.5,0.5]")

    def nan_ensemble_weight(self) -> Case:
        return self.weights("[0.5,nan,0.5]")

    def infinite_ensemble_weight(self) -> Case:
        return self.weights("[0.5,inf,0.5]")

    def negative_ensemble_weight(self) -> Case:
        return self.weights("[0.5,-1,0.5]")

    def all_zero_ensemble_weights(self) -> Case:
        return self.weights("[0,0,0]")

    def empty_folder(self) -> Case:
        (self.tmp / "empty").mkdir()
        return self.imagefolder(self.tmp / "empty")

    def labels_the_checkpoint_does_not_know(self) -> Case:
        root = self.digit_folder(self.tmp / "digits")
        (root / "cat").mkdir()
        first = sorted((root / "0").iterdir())[0]
        first.rename(root / "cat" / first.name)
        return self.imagefolder(root)

    def unknown_ensemble_members_choice(self) -> Case:
        return self.evaluate("ensemble.members=some")

    def unknown_unknown_classes_choice(self) -> Case:
        root = self.digit_folder(self.tmp / "digits")
        return self.imagefolder(root, "data.unknown_classes=ignore")

    def only_classes_the_checkpoint_does_not_know_skipped(self) -> Case:
        root = self.digit_folder(self.tmp / "pets", ["cat", "dog"])
        return self.imagefolder(root, "data.unknown_classes=skip")

    def nameless_checkpoint_on_a_folder_with_some_of_its_classes(self) -> Case:
        path = self.state_dict_file("plain.pt", lambda s: None)
        root = self.digit_folder(self.tmp / "nine", [str(d) for d in range(9)])
        return self.evaluate(
            "data=imagefolder",
            f"data.root='{root}'",
            f"ensemble.checkpoints=[{path}]",
            "model=small_cnn",
            *self.input_spec(1),
        )

    def only_non_image_files(self) -> Case:
        for name in ("0", "1"):
            (self.tmp / "texts" / name).mkdir(parents=True)
            (self.tmp / "texts" / name / "notes.txt").write_text("not an image")
        return self.imagefolder(self.tmp / "texts")

    def crop_views_without_a_resize(self) -> Case:
        return self.evaluate("strategy=tta", "tta=five_crop")

    def unknown_tta_composition(self) -> Case:
        return self.evaluate("strategy=tta", "tta.compose=cartesian")

    def unknown_stream_choice(self) -> Case:
        return self.imagefolder(self.digit_folder(self.tmp / "digits"), "data.dataset.stream=yes")

    def unknown_calibration(self) -> Case:
        return self.evaluate("calibration=platt")

    def unknown_calibration_stage(self) -> Case:
        return self.evaluate("calibration=temperature", "calibration.stage=views")

    def unknown_conformal_method(self) -> Case:
        return self.evaluate("conformal.method=thr")

    def conformal_level_outside_0_1(self) -> Case:
        return self.evaluate("conformal=aps", "conformal.alpha=1.5")

    def too_few_calibration_images_for_the_level(self) -> Case:
        return self.evaluate("conformal=lac", "conformal.alpha=0.001")

    def holdout_fraction_outside_0_1(self) -> Case:
        return self.evaluate("calibration=temperature", "calibration.holdout_fraction=2")

    def calibrating_on_the_scored_split(self) -> Case:
        return self.evaluate("calibration=temperature", "data.split=val")

    def image_folder_without_a_calibration_split(self) -> Case:
        return self.imagefolder(self.digit_folder(self.tmp / "flat"), "calibration=temperature")

    def one_pixel_images(self) -> Case:
        root = self.digit_folder(self.tmp / "tiny")
        for path in root.rglob("*.png"):
            Image.open(path).resize((1, 1)).save(path)
        case = self.imagefolder(root)
        case.check = lambda: _assert_scored(case.run_dir, 30)
        return case

    def very_large_image(self) -> Case:
        root = self.digit_folder(self.tmp / "large")
        _write_png_header(root / "5" / "huge.png", width=40_000, height=40_000)
        case = self.imagefolder(root)

        def check() -> None:
            _assert_scored(case.run_dir, 30)
            skipped = (case.run_dir / "skipped_files.csv").read_text()
            assert "5/huge.png,image of 40000x40000 pixels is larger than the limit" in skipped

        case.check = check
        return case

    def names_with_spaces_commas_brackets_and_non_ascii(self) -> Case:
        names = [f"class {d}, [v{d}] é" for d in range(10)]
        root = self.digit_folder(self.tmp / "my data, [v2] ü", names)
        checkpoint = self.checkpoint("named.pt", lambda c: c.update(classes=names))
        case = self.evaluate(
            "data=imagefolder",
            f"data.root='{root}'",
            f"ensemble.checkpoints=['{checkpoint}']",
        )

        def check() -> None:
            _assert_scored(case.run_dir, 30)
            header = (case.run_dir / "predictions.csv").read_text().splitlines()[0]
            assert '"prob_class 0, [v0] é"' in header

        case.check = check
        return case

    def corrupt_mlflow_store(self) -> Case:
        store = self.tmp / "corrupt.db"
        store.write_bytes(bytes(range(256)) * 40)
        case = self.evaluate("tracking=mlflow", f"tracking.uri=sqlite:///{store}")

        def check() -> None:
            _assert_scored(case.run_dir, 360)
            assert case.result.stderr.strip() == ""
            warnings = [line for line in case.result.stdout.splitlines() if "WARNING" in line]
            assert (
                len(warnings) == 1
                and "(sqlite3.DatabaseError) file is not a database" in (warnings[0])
            ), case.result.stdout

        case.check = check
        return case

    def corrupt_mlflow_store_with_tracking_required(self) -> Case:
        store = self.tmp / "corrupt.db"
        store.write_bytes(bytes(range(256)) * 40)
        return self.evaluate(
            "tracking=mlflow", f"tracking.uri=sqlite:///{store}", "tracking.required=true"
        )

    def sweep_with_a_config_path_option(self) -> Case:
        return self.evaluate("-m", "-cd", "elsewhere", "strategy=tta,ensemble")

    def second_sweep_into_a_directory_in_use(self) -> Case:
        sweep_dir = self.tmp / "sweep"
        first_err = (self.tmp / "first_sweep.err").open("w")
        first = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ml_infer",
                "-m",
                "strategy=tta_ensemble",
                "engine.min_timing_s=60",
                f"runs_dir={self.runs_dir}",
                "tracking=none",
                f"hydra.sweep.dir={sweep_dir}",
            ],
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=first_err,
        )
        try:
            deadline = time.monotonic() + 120
            while not (sweep_dir / ".sweep.lock").exists():
                assert first.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            second = run_cli(
                [
                    "ml_infer",
                    "-m",
                    "strategy=standard",
                    f"runs_dir={self.runs_dir}",
                    "tracking=none",
                    f"hydra.sweep.dir={sweep_dir}",
                ],
                cwd=self.tmp,
            )
        finally:
            first.send_signal(signal.SIGINT)
            first.wait(timeout=60)
            first_err.close()
        case = Case(second, sweep_dir / "0_standard")

        def check() -> None:
            assert not (sweep_dir / "0_standard").exists()
            assert first.returncode == 130, (self.tmp / "first_sweep.err").read_text()
            assert not (sweep_dir / ".sweep.lock").exists()  # the first sweep released it

        case.check = check
        return case

    def sigint_mid_run(self) -> Case:
        return self.interrupted(signal.SIGINT)

    def sigterm_mid_run(self) -> Case:
        return self.interrupted(signal.SIGTERM)


def scenario_name(row_input: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", row_input.lower()).strip("_")


class _Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _assert_missing(marker: Path) -> None:
    assert not marker.exists(), f"{marker} was created: the payload ran"


def _assert_scored(run_dir: Path, n: int) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == n


def _write_png_header(path: Path, *, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels (its data would decode to gigabytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (width + 1))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")
    )


ROWS = readme_rows()


def test_every_row_has_a_scenario_and_every_scenario_a_row():
    rows = {scenario_name(row.input) for row in ROWS}
    scenarios = {
        name
        for name, value in vars(Scenarios).items()
        if callable(value) and not name.startswith("_") and name not in _HELPERS
    }
    assert rows == scenarios, (sorted(rows - scenarios), sorted(scenarios - rows))


_HELPERS = {
    "evaluate",
    "checkpoint",
    "state_dict_file",
    "with_checkpoint",
    "digit_folder",
    "imagefolder",
    "tmpfs",
    "interrupted",
    "input_spec",
    "weights",
}


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[scenario_name(row.input) for row in ROWS])
def test_bad_input_row(row: Row, fold_paths, runs_dir, tmp_path):
    scenarios = Scenarios(tmp_path, fold_paths, runs_dir)
    case = getattr(scenarios, scenario_name(row.input))()
    result = case.result
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == row.exit_code, output[-3000:]
    if row.exit_code != 0:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr[-3000:]
        assert message_pattern(row.message).fullmatch(lines[0]), (lines[0], row.message)
        for name in ("metrics.json", "predictions.csv"):
            assert not (case.run_dir / name).exists(), name
        assert not list(case.run_dir.rglob("*.partial"))
    if case.check is not None:
        case.check()
