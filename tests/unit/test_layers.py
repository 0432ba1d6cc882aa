"""wan_dist's layers are its subpackages, lowest first in LAYERS: a module imports from its own layer and the
ones below it only, whether the import is at the top, inside a function or only for type checking."""

from __future__ import annotations

from tests.import_graph import import_graph

LAYERS = ("config", "wan", "parallel", "plan", "run")
# (importer, imported) pairs allowed to point upward until the piece is moved where it belongs; each with
# the reason it is still here.
EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


def layer_of(module: str) -> str | None:
    """The layer a wan_dist module is in; None for the package itself (its version, importing nothing)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def rank(module: str) -> int:
    layer = layer_of(module)
    return -1 if layer is None else LAYERS.index(layer)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{importer} ({layer_of(importer)}) imports {imported} ({layer_of(imported)})"
                  for importer, imported_modules in graph.items() for imported in imported_modules
                  if rank(imported) > rank(importer) and (importer, imported) not in EXCEPTIONS)


def test_every_module_is_in_a_layer():
    graph = import_graph()
    assert sorted(module for module in graph if module != "wan_dist" and layer_of(module) not in LAYERS) == []
    assert graph["wan_dist"] == set()


def test_no_layer_imports_a_higher_one():
    graph = import_graph()
    # The walk sees imports at all, and those inside a function too (run/decode.py's is one).
    assert "wan_dist.config.schema" in graph["wan_dist.plan.planner"]
    assert "wan_dist.parallel.vae_bands" in graph["wan_dist.run.decode"]
    assert upward_imports(graph) == []


def test_an_upward_import_is_named():
    graph = {"wan_dist.plan.job": {"wan_dist.run.video", "wan_dist.config.schema"},
             "wan_dist.run.video": {"wan_dist"}, "wan_dist": set()}
    assert upward_imports(graph) == ["wan_dist.plan.job (plan) imports wan_dist.run.video (run)"]
