"""The tree shows the pipeline (issue 24): few flat modules, no import cycle (imports inside functions counted), no
module importing another's private name, short functions. Read from the source with ``ast``; the checker is
itself tested on a small package built here, so each check can fail."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

import pytest

from tests import conftest

ROOT = str(conftest.ROOT)
PACKAGES = {"dsrewrite": os.path.join(ROOT, "dsrewrite"), "dsrewrite.kernels": os.path.join(ROOT, "kernels")}
MAX_FLAT = 12  # modules directly in dsrewrite/, __init__ and __main__ included
MAX_LINES, MAX_KERNEL_LINES = 80, 120  # a function, def to last line; a Triton kernel (@triton.jit)


def _modules(packages: Dict[str, str]) -> Dict[str, str]:
    """Dotted module name -> file, for every .py file under each package folder (``dsrewrite.kernels`` is the
    top-level kernels/ folder, installed under that name)."""
    mods = {}
    for pkg, folder in packages.items():
        for dirpath, dirnames, files in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), folder)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    mods[".".join([pkg] + rel)] = os.path.join(dirpath, f)
    return mods


def _imports(mods: Dict[str, str]) -> Tuple[Dict[str, Set[str]], List[Tuple[str, str, str]]]:
    """Each module's imports of the others (at any depth: inside functions too) and the private names imported
    from another module ``(importer, module, name)``."""
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    private = []
    for m, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    targets.append(full if full in mods else target)
                    private_name = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private_name and target in mods and target != m:
                        private.append((m, target, alias.name))
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[m].update(t for t in targets if t in mods and t != m)
    return edges, private


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _long_functions(mods: Dict[str, str]) -> List[str]:
    out = []
    for m, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kernel = any("jit" in ast.unparse(d) for d in node.decorator_list)
                lines = node.end_lineno - node.lineno + 1
                if lines > (MAX_KERNEL_LINES if kernel else MAX_LINES):
                    out.append(f"{m}.{node.name}: {lines} lines")
    return out


def test_the_checker_finds_a_hidden_cycle_a_private_import_and_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "stage").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stage" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .stage.b import f\n\n\ndef g():\n    from .stage.b import _hidden\n")
    (pkg / "stage" / "b.py").write_text("def f():\n    from ..a import g  # hidden in a function\n\n\n"
                                        "def _hidden():\n" + "    x = 1\n" * 90)
    mods = _modules({"pkg": str(pkg)})
    edges, private = _imports(mods)
    assert _cycles(edges) == [["pkg.a", "pkg.stage.b"]]
    assert private == [("pkg.a", "pkg.stage.b", "_hidden")]
    assert _long_functions(mods) == ["pkg.stage.b._hidden: 91 lines"]
    (pkg / "stage" / "b.py").write_text("def f():\n    return 1\n")
    assert _cycles(_imports(_modules({"pkg": str(pkg)}))[0]) == []


def test_few_modules_directly_in_the_package():
    flat = sorted(f for f in os.listdir(PACKAGES["dsrewrite"]) if f.endswith(".py"))
    assert len(flat) <= MAX_FLAT, flat


@pytest.fixture(scope="module")
def package():
    mods = _modules(PACKAGES)
    return mods, *_imports(mods)


def test_no_import_cycle_counting_imports_inside_functions(package):
    mods, edges, _ = package
    assert len(mods) > 50 and sum(map(len, edges.values())) > 100  # the walk found the package
    assert _cycles(edges) == []


def test_no_module_imports_another_modules_private_name(package):
    _, _, private = package
    assert private == []


def test_no_long_function(package):
    mods, _, _ = package
    assert _long_functions(mods) == []
