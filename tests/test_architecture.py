"""The shape of the code (issue 18), checked so that it stays that way:

* no import cycle among megatron/ modules, counting every import -- at the top of a module or
  inside a function (an in-function import can hide a cycle from Python, not from this test);
* no module under megatron/ longer than 450 lines, except the flag declarations
  (megatron/arguments.py); at most 8 top-level modules beside the packages.

Run the cycle check alone: ``python -m pytest -q tests/test_architecture.py``.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "megatron")
MAX_LINES = 450
LONG_ALLOWED = {"megatron/arguments.py"}  # the flag declarations


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module under megatron/."""
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: megatron modules it imports anywhere in its body}. ``from a.b import c`` counts as
    importing a.b.c when that is a module, else a.b; importing a submodule also runs its package's
    __init__, which is counted as an edge to the package."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    # importing a.b.c executes a/__init__ and a/b/__init__ first
    for mod in list(graph):
        for t in list(graph[mod]):
            parts = t.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in mods and parent != mod and not mod.startswith(parent + "."):
                    graph[mod].add(parent)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_find_cycles_sees_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_megatron():
    assert find_cycles(import_graph()) == []


def test_module_sizes_and_top_level_modules():
    long = []
    for mod, path in _modules().items():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        n = sum(1 for _ in open(path))
        if n > MAX_LINES and rel not in LONG_ALLOWED:
            long.append(f"{rel}: {n} lines")
    assert long == []
    top = sorted(f for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py")
    assert len(top) <= 8, top
