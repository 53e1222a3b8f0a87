"""The project's modules import downward only: no import cycle and no import from a higher layer, counting
every import statement wherever it stands (function-local imports included).

Layers, lowest first (a module may import its own layer's modules and lower ones):
  0  v4jax.config, v4jax.hub, v4jax.sharding, v4jax.numerics, v4jax.formats: configuration, the released file
     format, mesh rules, summation order and number formats (no model code)
  1  kernels: one folder per op (a pure-jnp reference beside the Pallas kernels)
  2  the rest of v4jax: the model, its cache, checkpoints, conversion, costs
  3  train
  4  infer
  5  bench
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("v4jax", "kernels", "train", "infer", "bench")
FLOOR = ("v4jax", "v4jax.config", "v4jax.hub", "v4jax.sharding", "v4jax.numerics", "v4jax.formats")


def layer(module: str) -> int:
    if module in FLOOR:
        return 0
    return {"kernels": 1, "v4jax": 2, "train": 3, "infer": 4, "bench": 5}[module.split(".")[0]]


def modules() -> dict[str, Path]:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    out = {}
    for f in files:
        path = ROOT / f
        if f.split("/")[0] in PACKAGES and path.exists():
            name = f[:-3].replace("/", ".")
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file. `from p import x` counts p.x when that is a module,
    else p; a module's own enclosing packages are not counted (Python has them loaded already)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names}
            found |= (subs & known) or {base}
            if subs - known:
                found.add(base)
    ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in known and m != name and m not in ancestors}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The parser sees the imports it is meant to see (so that the two tests below can fail)."""
    g = graph()
    assert len(g) > 40 and {"v4jax.model", "kernels.indexer.reference", "train.pretrain"} <= set(g)
    assert "v4jax.attention" in g["v4jax.block"] and "v4jax.formats" in g["kernels.fp4_matmul"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, ("import cycles (each a group of modules that import one another, directly or around a "
                       f"loop): {found}. Move what both need into a lower module")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_upward_imports(package):
    g = graph()
    up = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})" for m, deps in g.items()
                if m.split(".")[0] == package for d in deps if layer(d) > layer(m))
    assert not up, "imports from a higher layer (see this file's docstring for the layers):\n  " + "\n  ".join(up)
