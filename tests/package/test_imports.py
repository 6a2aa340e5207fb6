"""The package's imports: no cycles between files, and the data's path flows one way.

Every ``import`` statement counts, at module or function level (a lazy import is still a
dependency). Layers, lowest first (a module may import its own layer or lower ones)::

    0  errors, paths, hashing, hardware, sharding, run, resources   facts every stage shares
    1  recipe                                                       the validated recipe
    2  model, data                                                  what is trained, on what
    3  train, distributed                                           training and its sharding
    4  eval, provenance, slurm                                      what a run did, where it runs
    5  cli and the command modules (plan, smoke, evaluate, …)       thin commands
"""

from __future__ import annotations

import ast
from pathlib import Path

import affinage

PACKAGE = Path(affinage.__file__).resolve().parent
LAYERS = {
    0: ("errors", "paths", "hashing", "hardware", "sharding", "run", "resources", "scrub", "runlock"),
    1: ("recipe",),
    2: ("model", "data"),
    3: ("train", "distributed"),
    4: ("eval", "provenance", "slurm"),
}
TOP = 5  # anything not listed: cli.py and the command modules beside it
#: modules that are commands although they live in a lower package, with the reason
COMMANDS = {
    "affinage.distributed.measure": "`python -m affinage.distributed.measure` compares every strategy with plan's estimate",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
        mods[rel.removesuffix(".__init__")] = path
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != mod and not mod.startswith(name + "."):
                    edges[mod].add(name)
    return edges


def _layer(mod: str) -> int:
    if mod in COMMANDS:
        return TOP
    first = mod.split(".")[1] if "." in mod else ""
    return next((n for n, names in LAYERS.items() if first in names), TOP)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_files():
    cycles = _cycles(_edges(_modules()))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_run_one_way():
    edges = _edges(_modules())
    upward = sorted(f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
                    for m, deps in edges.items() for d in deps if _layer(d) > _layer(m) and d != "affinage")
    assert not upward, "imports against the data's path:\n" + "\n".join(upward)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
