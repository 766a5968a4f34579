"""The shape of the library: layers import only downwards, functions stay short."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "clibd"
# Lowest first. A module may import from its own layer and those below, never from one above.
LAYERS = [
    ("base", ["constants", "atomic", "lazy"]),
    ("processing", ["processing"]),
    ("data", ["data"]),
    ("model", ["configuration_clibd", "towers", "lora", "modeling_clibd", "loss", "objectives", "attention"]),
    ("retrieval", ["retrieval", "checked_embedding"]),
    ("index", ["thresholds", "novelty", "species_check", "index", "index_store", "index_build", "pair_calibration", "library",
               "library_build"]),
    ("identify and evaluation", ["prediction", "predictions_tsv", "query_plan", "identify", "evaluation"]),
    ("training", ["training"]),
    ("apps", ["cli", "demo", "hub", "model_card", "plots", "convert"]),
]
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 500


def layer_of(module: str) -> int:
    """Layer index of a dotted module name relative to the package (e.g. `data.split`)."""
    head = module.split(".")[0]
    for level, (_, members) in enumerate(LAYERS):
        if head in members:
            return level
    raise AssertionError(f"clibd.{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, clibd module relative to the package) for every import of clibd code in `path`,
    the source of clibd.`module`."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(path.read_text())
    # imports for type annotations only (`if TYPE_CHECKING:`) are not dependencies at run time
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for inner in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif (node.module or "").startswith("clibd."):
                target = node.module[len("clibd."):]
            else:
                continue
            if target:
                found.append((node.lineno, target))
            else:  # `from . import x` in the package root
                found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name[len("clibd."):]) for a in node.names if a.name.startswith("clibd.")]
    return found


def source_files() -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py")) if p != SRC / "__init__.py"]  # the root re-exports everything


def upward_imports(path: Path, module: str) -> list[str]:
    """Imports in `path` (the source of clibd.`module`) from a layer above the module's own."""
    own = layer_of(module)
    return [f"{path.name}:{line} ({LAYERS[own][0]}) imports clibd.{target} ({LAYERS[layer_of(target)][0]})"
            for line, target in imported_modules(path, module) if target != "__version__" and layer_of(target) > own]


def test_layers_import_only_downwards():
    upward = [line for path in source_files() for line in upward_imports(path, module_name(path))]
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    planted = tmp_path / "records.py"
    planted.write_text("from typing import TYPE_CHECKING\nfrom ..constants import RANKS\nfrom ..index import build_index\n"
                       "if TYPE_CHECKING:\n    from ..identify import Identifier\n")
    assert upward_imports(planted, "data.records") == ["records.py:3 (data) imports clibd.index (index)"]


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_files_are_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(SRC)} has {lines} lines: split it"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_functions_are_short(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
