"""The package's layers, read from its source (every import, lazy ones inside functions too):
no import cycle, and each layer imports only the layers below it (DESIGN.md, import rules)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ppl_vae

PACKAGE = Path(ppl_vae.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def module_imports(lazy: bool = True) -> dict:
    """{module: set of ppl_vae modules it imports}; ``lazy`` includes imports inside functions."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if lazy else tree.body
        deps = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ppl_vae"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import; use absolute ppl_vae imports")
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("ppl_vae"))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return None
        if module in visiting:
            return visiting[visiting.index(module) :] + [module]
        visiting.append(module)
        for dep in sorted(graph[module]):
            if dep.startswith(module + "."):  # a package importing its own submodule is no cycle
                continue
            if module.startswith(dep + ".") and dep == module.rsplit(".", 1)[0]:
                continue  # a submodule importing names of its own package's __init__ (registries)
            found = visit(dep)
            if found:
                return found
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module)
        if found:
            return found
    return None


def test_no_import_cycle_even_through_lazy_imports():
    graph = module_imports(lazy=True)
    assert "ppl_vae.inference.importance" in graph and "ppl_vae.reports.compare" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# layer -> prefixes it must never import (DESIGN.md: models import nothing above them; inference
# never imports analysis, reports or the run layer; analysis never reads run directories).
RUN_LAYER = ("ppl_vae.pipeline", "ppl_vae.runs", "ppl_vae.reports", "ppl_vae.cli", "ppl_vae.experiments")
FORBIDDEN = {
    "ppl_vae.models": ("ppl_vae.inference", "ppl_vae.analysis") + RUN_LAYER,
    "ppl_vae.inference": ("ppl_vae.analysis",) + RUN_LAYER,
    "ppl_vae.analysis": RUN_LAYER,
    "ppl_vae.data": ("ppl_vae.models", "ppl_vae.inference", "ppl_vae.analysis") + RUN_LAYER,
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_the_layers_below_it(layer):
    graph = module_imports(lazy=True)
    offending = sorted(
        f"{m} imports {d}"
        for m, deps in graph.items()
        if m == layer or m.startswith(layer + ".")
        for d in deps
        if d.startswith(FORBIDDEN[layer])
    )
    assert not offending, "; ".join(offending)
