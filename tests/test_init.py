"""The public API and the package's shape: lazy top-level names, no import cycles, the demo kept apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import rapidin_index

PACKAGE = Path(rapidin_index.__file__).parent


def test_the_public_names_resolve_to_their_classes():
    from rapidin_index.build import build_index
    from rapidin_index.retrieval import Index
    from rapidin_index.settings import BuildSettings, ModelSettings, SketchSettings

    assert rapidin_index.build_index is build_index and rapidin_index.Index is Index
    assert rapidin_index.BuildSettings is BuildSettings and rapidin_index.ModelSettings is ModelSettings
    assert rapidin_index.SketchSettings is SketchSettings
    assert set(rapidin_index.__all__) >= {"build_index", "Index", "BuildSettings", "SketchSettings"}


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_the_package_and_the_cli_pays_for_no_heavy_library():
    loaded = run_python(
        "import sys, rapidin_index, rapidin_index.settings, rapidin_index.cli.main\n"
        "print(sorted(m for m in ('torch', 'faiss', 'lancedb', 'transformers') if m in sys.modules))"
    )
    assert loaded == "[]"


def product_modules() -> list[str]:
    return sorted(f"rapidin_index.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def test_the_product_never_imports_the_demo():
    code = (
        "import importlib, sys\n"
        f"for name in {product_modules()!r} + ['rapidin_index.cli.main']:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('rapidin_index.demo')))"
    )
    assert run_python(code) == "[]"


def imports_of(path: Path) -> set[str]:
    """rapidin_index modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "rapidin_index":
                found.update(f"rapidin_index.{alias.name}" for alias in node.names)
            elif node.module.startswith("rapidin_index."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rapidin_index."))
    return found


def test_no_two_product_modules_import_each_other_in_a_cycle():
    graph = {f"rapidin_index.{p.stem}": imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {module: {d for d in deps if d in graph} for module, deps in graph.items()}
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for dependency in graph[module]:
                assert dependency != start, " -> ".join([*path, dependency])
                if dependency not in seen:
                    seen.add(dependency)
                    stack.append((dependency, [*path, dependency]))
