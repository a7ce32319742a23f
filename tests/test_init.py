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


def test_the_public_api_is_exactly_these_names():
    """Issue 24 moved the store into a package: the top-level names a user imports stay the same."""
    from rapidin_index.build import BuildReport

    public = ["BuildReport", "BuildSettings", "Index", "ModelSettings", "SketchSettings", "build_index"]
    assert sorted(rapidin_index.__all__) == sorted([*public, "__version__"])
    assert rapidin_index.BuildReport is BuildReport


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


def module_name(path: Path) -> str:
    """rapidin_index.sketch.v2 for rapidin_index/sketch/v2.py; a package is its __init__.py."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_files() -> list[Path]:
    """Every module of the product, subpackages included (the demo is not the product)."""
    return sorted(
        path
        for path in PACKAGE.rglob("*.py")
        if "demo" not in path.relative_to(PACKAGE).parts and path != PACKAGE / "__init__.py"
    )


def product_modules() -> list[str]:
    return [module_name(path) for path in product_files()]


def test_the_walk_reaches_the_subpackages():
    assert {"rapidin_index.sketch", "rapidin_index.sketch.v2", "rapidin_index.sketch.kron"} <= set(
        product_modules()
    )


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
    graph = {module_name(path): imports_of(path) for path in product_files()}
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


def test_no_product_module_imports_another_modules_private_names():
    """A name that starts with ``_`` stays in its module (issue 24): make it public or move it."""
    borrowed = []
    for path in product_files():
        tree = ast.parse(path.read_text())
        imported = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rapidin_index")
        ]
        names = {alias.asname or alias.name for node in imported for alias in node.names}
        borrowed += [
            f"{module_name(path)}: from {node.module} import {alias.name}"
            for node in imported
            for alias in node.names
            if private(alias.name)
        ]
        borrowed += [
            f"{module_name(path)}:{node.lineno}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            if node.value.id in names and private(node.attr)
        ]
    assert borrowed == []


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")
