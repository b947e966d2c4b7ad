#!/usr/bin/env python
"""The MLflow UI on a short sweep, checked and photographed in headless Chromium.

    make train                                   # runs/digits/fold_*/weights/best.pt
    pip install -e '.[docs]'                     # playwright (the Python driver only)
    apt-get install chromium                     # Debian's Chromium: nothing is downloaded
    python scripts/mlflow_screenshots.py         # -> docs/mlflow_runs.png, mlflow_run.png,
                                                 #    mlflow_compare.png

Runs a three-strategy sweep (standard, tta, ensemble) into a fresh sqlite store, serves it with
`mlflow server`, and drives the UI as a user would: the experiment opened in "Model training"
mode, the columns accuracy, images_per_s, relative_cost, nll and strategy.name added, the
sweep's parent run expanded. It fails (exit 1, saying what it missed) unless the runs table lists
the three strategy runs with those columns; then it saves the runs table, the tta run's page and
the compare view of the three runs.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("standard", "tta", "ensemble")
COLUMNS = ("accuracy", "images_per_s", "relative_cost", "nll", "strategy.name")
MODEL_TRAINING = "workflowType=machine_learning"  # the UI's "Model training" mode, not GenAI
CHROMIUM_ARGS = [  # no sandbox as root; no background connections on a closed network
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sweep_into(store: Path, runs_dir: Path, sweep_dir: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "ml_infer",
        "-m",
        f"strategy={','.join(STRATEGIES)}",
        f"runs_dir={runs_dir}",
        f"tracking.uri=sqlite:///{store}",
        f"hydra.sweep.dir={sweep_dir}",
        "engine.min_timing_s=0.5",
    ]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)


def serve(store: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("error: mlflow server did not answer within 60 s")


def photograph(base: str, out: Path, chromium: str) -> list[str]:
    """Drives the UI; returns what it could not find (empty: all checks passed)."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    experiment_id = MlflowClient(base).get_experiment_by_name("ml_infer-digits").experiment_id
    missing: list[str] = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1700, "height": 760})
        page.goto(f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}")
        page.get_by_text("sweep 20").first.wait_for()  # the runs table has loaded
        close = page.get_by_role("button", name="Close")  # the assistant panel
        if close.count():
            close.first.click()
        page.get_by_role("button", name="Columns", exact=True).click()
        menu = page.locator("[role=dialog], [role=menu], [role=listbox]").filter(
            has_text="Metrics ("
        )
        for name in COLUMNS:  # each waited for: the menu lists the metrics once it read them
            menu.get_by_text(name, exact=True).first.click()
        page.keyboard.press("Escape")
        parent = page.get_by_text("sweep 20").first
        parent.locator("xpath=ancestor::*[@role='gridcell'][1]").locator("button").first.click()
        grid = page.locator(".ag-root").first
        with contextlib.suppress(PlaywrightTimeout):  # a run that never shows is reported below
            for name in STRATEGIES:
                grid.get_by_text(name, exact=True).first.wait_for(timeout=15_000)
        table = grid.inner_text()
        missing += [f"column {name}" for name in COLUMNS if name not in table]
        missing += [f"run {name}" for name in STRATEGIES if f"\n{name}\n" not in f"\n{table}\n"]
        page.screenshot(path=str(out / "mlflow_runs.png"))

        for name in STRATEGIES:  # ticked for the compare view
            row_box = page.get_by_text(name, exact=True).first
            row_box.locator("xpath=ancestor::*[@role='row'][1]").locator("input").first.check()
        compare = page.get_by_role("button", name="Compare", exact=True)
        if compare.count():
            compare.first.click()
            page.wait_for_url("**/compare-runs**")
            page.goto(f"{page.url}&{MODEL_TRAINING}")  # the mode is in the address, not kept
            try:
                page.get_by_text("Parallel Coordinates").first.wait_for()
            except PlaywrightTimeout:
                missing.append("the compare view's parallel coordinates")
            page.screenshot(path=str(out / "mlflow_compare.png"))
        else:
            missing.append("the Compare button")

        (tta,) = MlflowClient(base).search_runs(
            [experiment_id], filter_string="params.`strategy.name` = 'tta'"
        )
        page.goto(f"{base}/#/experiments/{experiment_id}/runs/{tta.info.run_id}?{MODEL_TRAINING}")
        with contextlib.suppress(PlaywrightTimeout):  # what is missing is reported below
            page.get_by_text("digits/test").first.wait_for()
        run_page = page.locator("body").inner_text()
        missing += [
            f"run page {word}" for word in ("accuracy", "digits/test") if word not in run_page
        ]
        page.screenshot(path=str(out / "mlflow_run.png"), full_page=False)
        browser.close()
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "digits")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    if not (args.runs_dir / "fold_0" / "weights" / "best.pt").is_file():
        print(f"error: no trained folds in {args.runs_dir}; run make train first", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"error: no Chromium at {args.chromium}; apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "mlflow.db"
        sweep_into(store, args.runs_dir.resolve(), Path(scratch) / "sweep")
        port = free_port()
        server = serve(store, port)
        try:
            missing = photograph(f"http://127.0.0.1:{port}", args.out, args.chromium)
        finally:
            server.terminate()
            server.wait(timeout=30)
    if missing:
        print(f"error: the MLflow UI did not show: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"the runs table lists {', '.join(STRATEGIES)} with {', '.join(COLUMNS)}")
    print(f"wrote {args.out / 'mlflow_runs.png'}, mlflow_run.png, mlflow_compare.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
