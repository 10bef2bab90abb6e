"""The layout of nad_ext (docs/DESIGN.md, "The package map"): subpackages by purpose, imports in
one direction, no private name used outside its package.

The import graph is read from the source with ast (nothing is imported), imports inside
functions included: a lazy import is a dependency too. The rules:

- each module belongs to a *unit*: its subpackage (``nad_ext.data.pipeline`` -> ``data``) or, at
  the top level, the module itself (``distributed``, ``report``, ...); the package's own
  ``__init__`` (``__version__``) may be imported by any unit and imports none;
- a unit imports only units of lower layers in :data:`LAYERS` (never one of its own layer), minus
  the pairs in :data:`FORBIDDEN`;
- no circle, between units or between modules;
- a name starting with ``_`` (a module or anything in one) is imported only from inside the
  package that holds it: ``nad_ext._utils`` from anywhere in ``nad_ext``, ``nad_ext.ops._layout``
  only from ``nad_ext.ops``, ``nad_ext.analysis.common._sequential`` only from ``nad_ext.analysis``.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nad_ext"

# Lowest first: a unit may import the units of the layers below its own.
LAYERS = [
    ("_utils", "distributed", "_extension"),  # helpers that know nothing about NAD; the native build
    ("ops",),  # the native operators
    ("data",),
    ("models",),
    ("gates",),
    ("training", "analysis"),  # side by side: neither imports the other
    ("report", "path_study"),  # side by side: the report reads results, the path study makes them
    ("demo",),
    ("cli",),
    ("__main__",),
]
# Exceptions to the order: the gates work on any module and tensor (neither the registry nor
# the data); the native operators are for the gates and the stages after them.
FORBIDDEN = {("gates", "models"), ("gates", "data"), ("data", "ops"), ("models", "ops")}
RANK = {unit: rank for rank, layer in enumerate(LAYERS) for unit in layer}


def modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every .py file under ``root`` (a package named root.name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def unit(module: str) -> str:
    """The unit of a module: its subpackage or top-level module ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(name: str, path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """``(line, target)`` for every import of the package in module ``name``: ``target`` the
    imported path as parts (``from a.b import c`` -> ("a", "b", "c"), c a module or a name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    root = name.split(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, tuple(a.name.split("."))) for a in node.names if a.name.split(".")[0] == root]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == root:
                out += [(node.lineno, (*source.split("."), a.name)) for a in node.names]
    return out


def target_module(target: tuple[str, ...], known: dict[str, Path]) -> str:
    """The module an import target loads: the longest prefix that is a module of the package."""
    for n in range(len(target), 0, -1):
        if ".".join(target[:n]) in known:
            return ".".join(target[:n])
    return target[0]


def private_owner(target: tuple[str, ...], known: dict[str, Path]) -> str | None:
    """The package a private part of ``target`` belongs to (None when no part is private): the
    package holding the first name that starts with "_" (dunder names are public)."""
    for i, part in enumerate(target[1:], start=1):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            owner = ".".join(target[:i])
            if owner in known and known[owner].name != "__init__.py":  # a module: its package
                owner = owner.rpartition(".")[0]
            return owner
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(root: Path = PACKAGE) -> list[str]:
    """Every breach of the layout's rules under ``root``, one line each (empty: none)."""
    known = modules(root)
    found = []
    module_graph: dict[str, set[str]] = {m: set() for m in known}
    unit_graph: dict[str, set[str]] = {}
    for name, path in known.items():
        where = f"{path.relative_to(root.parent)}"
        mine = unit(name)
        if mine not in RANK and mine != "":
            found.append(f"{where}: unit {mine!r} is not in the layout's LAYERS")
            continue
        for line, target in imports(name, path):
            loaded = target_module(target, known)
            theirs = unit(loaded)
            spelled = ".".join(target)
            if loaded != name:
                module_graph[name].add(loaded)
            owner = private_owner(target, known)
            if owner is not None and not (name == owner or name.startswith(owner + ".")):
                found.append(f"{where}:{line}: private name {spelled} imported from outside {owner}")
            if theirs in ("", mine):
                if mine == "" and theirs == "" and loaded != name:
                    found.append(f"{where}:{line}: the package's __init__ imports {spelled}")
                continue
            if mine == "":
                found.append(f"{where}:{line}: the package's __init__ imports {spelled}")
                continue
            unit_graph.setdefault(mine, set()).add(theirs)
            if theirs not in RANK:
                found.append(f"{where}:{line}: {spelled} belongs to no unit of the layout")
            elif (mine, theirs) in FORBIDDEN:
                found.append(f"{where}:{line}: {mine} must not import {theirs} ({spelled})")
            elif RANK[theirs] >= RANK[mine]:
                kind = "beside it" if RANK[theirs] == RANK[mine] else "after it"
                found.append(f"{where}:{line}: {mine} imports {theirs} ({spelled}), which comes {kind} in the layout")
    found += [f"circle between units: {' <-> '.join(c)}" for c in cycles(unit_graph)]
    found += [f"circle between modules: {' <-> '.join(c)}" for c in cycles(module_graph)]
    return found


def test_the_package_follows_its_layout():
    assert problems() == []


def test_every_part_says_what_it_holds_and_may_import():
    for name, path in modules(PACKAGE).items():
        is_part = path.name == "__init__.py" and name.count(".") == 1 or name in (
            "nad_ext.distributed", "nad_ext.report", "nad_ext.demo")
        if is_part:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "May import:" in doc, f"{path}: the docstring does not say what it may import"


def test_a_long_module_is_split():
    """A module that passes ~500 lines is split along its natural parts (STYLE.md)."""
    long = {name: n for name, path in modules(PACKAGE).items() if (n := len(path.read_text().splitlines())) > 520}
    assert long == {}


PLANTED = [
    # (file, line to add, what the check must say)
    ("gates/points.py", "def f():\n    from nad_ext import models\n", "gates must not import models"),
    ("analysis/masks.py", "from nad_ext.training import loop\n", "analysis imports training"),
    ("data/imagesets.py", "from nad_ext.gates.model import GatedModel\n", "data imports gates"),
    ("gates/model.py", "from nad_ext.ops.checks import _IDS_CHECKED\n", "private name nad_ext.ops.checks._IDS_CHECKED"),
    ("training/loop.py", "from nad_ext.ops import _layout\n", "private name nad_ext.ops._layout"),
    ("training/config.py", "def g():\n    from nad_ext.training import driver\n", "circle between modules"),
    ("models/zoo.py", "import nad_ext.cli\n", "models imports cli"),
]


@pytest.mark.parametrize("file, line, message", PLANTED, ids=[p[2] for p in PLANTED])
def test_the_check_finds_a_planted_breach(tmp_path, file, line, message):
    copy = tmp_path / "nad_ext"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    target = copy / file
    target.write_text(target.read_text() + "\n\n" + line)
    found = problems(copy)
    assert any(message in p for p in found), found
    assert all(file in p or "circle" in p for p in found), found  # nothing else is reported
