"""The package's shape, as ../shared/DESIGN.md agrees it: layers that import only downward.

Every import of a project module counts, function-local ones included. A module may import only
modules of lower layers (never one of its own layer, never a higher one), so there is no cycle;
`evaluate` neither logs nor reports; no module is over 350 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ml_infer"

# From the bottom up; a module imports only from the layers before its own.
LAYERS: list[set[str]] = [
    {"errors", "metrics", "plots", "textures", "progress"},  # leaves: nothing of ours below them
    {"shiftplots", "confusion"},
    {"filedata", "reliability"},
    {"config", "outputs", "sweeplock"},  # base: config access, run-directory files, the lock
    {"precheck"},
    {"device"},
    {"inputs"},
    {"crops"},
    {"decode"},
    {"imagesets"},
    {"formats", "labels"},
    {"augment", "aggregate", "models", "checkpoints", "folders", "store", "calibrate", "conformal"},
    {"corruptions", "photoviews"},
    {"warps"},
    {"bank", "data", "learned"},
    {"predictor", "calsplit", "shift"},
    {"passes"},
    {"runners"},
    {"assemble"},
    {"score", "posthoc", "selection"},
    {"evaluate"},
    {"record", "tracking.store", "tune", "cascade"},
    {"cascade_eval"},
    {"tracking.fields"},
    {"tracking.runs"},
    {"tracking.sweep"},
    {"tracking.sync"},
    {"tracking"},
    {"sweepdir"},
    {"perclass"},
    {"shiftreport"},
    {"report"},
    {"task"},
    {"__main__", "train"},
    {"cli"},
]
LAYER_OF = {module: index for index, layer in enumerate(LAYERS) for module in layer}
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports, wherever in the file the import stands."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ml_infer"):
            imported.add(node.module.removeprefix("ml_infer").lstrip("."))
        elif isinstance(node, ast.Import):
            imported |= {
                alias.name.removeprefix("ml_infer.")
                for alias in node.names
                if alias.name.startswith("ml_infer.")
            }
    return {name for name in imported if name}


MODULES = {
    module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if module_name(path) != ""
}
GRAPH = {module: project_imports(path) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert set(MODULES) == set(LAYER_OF), (
        sorted(set(MODULES) - set(LAYER_OF)),
        sorted(set(LAYER_OF) - set(MODULES)),
    )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module):
    upward = {
        imported
        for imported in GRAPH[module]
        if LAYER_OF.get(imported, len(LAYERS)) >= LAYER_OF[module]
    }
    assert not upward, f"{module} (layer {LAYER_OF[module]}) imports {sorted(upward)}"


def test_there_is_no_import_cycle():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for imported in sorted(GRAPH.get(module, ())):
            if state.get(imported) == 1:
                cycles.append([*stack[stack.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*stack, imported])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles


def test_evaluate_neither_tracks_nor_reports():
    assert not GRAPH["evaluate"] & {"tracking", "report", "record", "plots"}
    assert "mlflow" not in MODULES["evaluate"].read_text()


def test_only_tracking_imports_mlflow():
    importers = {
        module
        for module, path in MODULES.items()
        if any(
            isinstance(node, (ast.Import, ast.ImportFrom))
            and any(
                (alias.name if isinstance(node, ast.Import) else node.module or "").startswith(
                    "mlflow"
                )
                for alias in node.names
            )
            for node in ast.walk(ast.parse(path.read_text()))
        )
    }
    assert importers and all(module.startswith("tracking") for module in importers), importers


def test_callbacks_and_the_entry_point_share_no_module_state():
    """The sweep's failures reach the exit code through the sweep directory, not a global."""
    for module in ("__main__", "report", "tracking.sweep"):
        tree = ast.parse(MODULES[module].read_text())
        mutable = [
            ast.unparse(node)
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            and isinstance(node.value, (ast.List, ast.Dict, ast.Set, ast.Call))
            and not ast.unparse(node).startswith(("log = ", "log: "))
        ]
        assert not mutable, (module, mutable)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines"
