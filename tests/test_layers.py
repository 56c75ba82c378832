"""The package's layers, read from the source (ast): imports only run downward, so a change in a
lower layer never needs an upper one, and no lazy import works around a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cbn_detect"

# What each part of the package may import from the package, besides itself: the layers, lowest first.
ALLOWED: dict[str, set[str]] = {
    "voc": set(),
    "runtime": set(),
    "stats": set(),
    "norm": {"voc", "runtime"},
    "models": {"voc", "runtime"},
    "data": {"voc", "runtime"},
    "tracking": {"runtime"},
    "results": {"runtime"},
    "overrides": set(),
    "engine": {"voc", "runtime", "norm", "models", "data", "tracking"},
    "evaluation": {"voc", "runtime", "data"},
    "jobs": {"voc", "runtime", "data", "engine", "results"},
    "settings": {"runtime", "engine"},
    "train": {
        "voc",
        "runtime",
        "norm",
        "models",
        "data",
        "tracking",
        "results",
        "engine",
        "evaluation",
        "jobs",
        "overrides",
        "settings",
    },
    "evaluate": {
        "voc",
        "runtime",
        "norm",
        "models",
        "data",
        "tracking",
        "results",
        "engine",
        "evaluation",
        "jobs",
        "overrides",
        "settings",
    },
    "report": {"runtime", "stats", "results", "evaluation"},
    "voc_eval": {"voc", "runtime", "evaluation", "results"},
    "bench": {"voc", "runtime", "norm", "models", "data", "engine", "evaluation", "results", "jobs", "train"},
}


def part_of(module: str) -> str:
    """``cbn_detect.data.voc`` -> ``data``."""
    return module.split(".")[1]


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "cbn_detect":
            found.append((name, path))
    return found


def package_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported cbn_detect module, whether at module level) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cbn_detect"):
            names = [node.module] if node.module != "cbn_detect" else [f"cbn_detect.{a.name}" for a in node.names]
            found += [(name, id(node) in top_level) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names if a.name.startswith("cbn_detect.")]
    return found


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_imports_only_run_downward(module: str, path: Path) -> None:
    part = part_of(module)
    assert part in ALLOWED, f"{module}: a new part of the package; give it its place in ALLOWED"
    for imported, at_top in package_imports(path):
        target = part_of(imported)
        assert at_top, f"{module} imports {imported} inside a function: a lazy import hides a cycle"
        assert target == part or target in ALLOWED[part], f"{module} ({part}) may not import {imported} ({target})"


def test_nothing_imports_the_benchmarks() -> None:
    for module, path in modules():
        if part_of(module) != "bench":
            assert all(part_of(imported) != "bench" for imported, _ in package_imports(path)), module


def test_the_leaves_import_nothing_of_the_package() -> None:
    leaves = [(m, p) for m, p in modules() if part_of(m) in ("voc", "runtime")]
    assert {part_of(m) for m, _ in leaves} == {"voc", "runtime"}
    for module, path in leaves:
        assert {part_of(i) for i, _ in package_imports(path)} <= {part_of(module)}, module
