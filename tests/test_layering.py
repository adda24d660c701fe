"""The package's import graph: no cycles, and every arrow points down the layers.

Every module of ``advtrain/`` is parsed with :mod:`ast` (nothing is imported), and every import
of another advtrain module is an edge, wherever it stands: at the top of the file or inside a
function. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
``pkg`` (its ``__init__``). Imports under ``if TYPE_CHECKING:`` count for the layers (a lower
layer does not name a higher one's types either) but not for cycles: they never run, and they
are how a module names the type of its caller (``attacks.registry`` holds ``Attack`` classes,
``attacks.base`` registers them).

The layers, top to bottom (a module may import from its own layer or below, never above):

==========  ===============================================================================
5 (entry)   ``advtrain`` (the package's façade ``__init__``), ``__main__``, ``cli``, ``serving``
4           ``training``, ``evaluation``, ``poisoning``, ``detection``, ``tuning``
3           ``attacks``, ``certify``
2           ``data``, ``models``, ``threat``, ``feasibility``, ``losses``
1 (floor)   ``util``, ``errors``, ``device_sync``, ``distributed``, ``checkpoint``,
            ``visualize``
==========  ===============================================================================

``checkpoint``, ``visualize`` and ``distributed`` stand on the floor: they import nothing but
``util`` and ``errors`` (``distributed`` only torch), and ``models.user`` loads a user's
weights through ``checkpoint``. A new top-level module or subpackage must be given a layer here.

``KNOWN_VIOLATIONS`` names imports allowed to break these rules for now, each with the reason
and the issue that removes it (empty since issue 21); an entry that no longer occurs fails the
test too, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "advtrain"
ROOT = "advtrain"

LAYERS: dict[str, int] = {
    ROOT: 5,
    "__main__": 5,
    "cli": 5,
    "serving": 5,
    "training": 4,
    "evaluation": 4,
    "poisoning": 4,
    "detection": 4,
    "tuning": 4,
    "attacks": 3,
    "certify": 3,
    "data": 2,
    "models": 2,
    "threat": 2,
    "feasibility": 2,
    "losses": 2,
    "util": 1,
    "errors": 1,
    "device_sync": 1,
    "distributed": 1,
    "checkpoint": 1,
    "visualize": 1,
}

# Imports allowed to break the rules for now, as (importer, imported): the reason it goes. Each is
# left out of the graph before the checks, so any other upward arrow or cycle fails; an entry that
# no longer occurs fails too (remove it), so the list can only shrink. Issue 21 emptied it.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def _module_names() -> dict[str, Path]:
    """Every module of the package by dotted name; a package is named by its ``__init__``."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` names (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the import statements inside ``if TYPE_CHECKING:`` blocks."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                found.update(id(inner) for inner in ast.walk(statement))
    return found


def imports_of(
    name: str, source: str, modules: set[str], is_package: bool = False, runtime: bool = False
) -> set[str]:
    """The advtrain modules that the module ``name`` (text ``source``) imports, anywhere;
    ``runtime``: leave out the imports under ``if TYPE_CHECKING:``."""
    edges: set[str] = set()
    tree = ast.parse(source)
    skip = _type_checking_only(tree) if runtime else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import advtrain.x.f` names advtrain.x
                target = target.rpartition(".")[0]
            if target.split(".")[0] == ROOT and target != name:
                edges.add(target)
    return edges


def import_graph(runtime: bool = False) -> dict[str, set[str]]:
    """Each advtrain module and the advtrain modules it imports (``runtime``: those it imports
    when it runs, not under ``if TYPE_CHECKING:``), less :data:`KNOWN_VIOLATIONS`."""
    modules = _module_names()
    return {
        name: {
            target
            for target in imports_of(
                name,
                path.read_text(encoding="utf-8"),
                set(modules),
                path.name == "__init__.py",
                runtime,
            )
            if (name, target) not in KNOWN_VIOLATIONS
        }
        for name, path in modules.items()
    }


def room(module: str) -> str:
    """The top-level module or subpackage a module belongs to (``advtrain`` for the façade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each as
    a sorted tuple: every import cycle lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The imports from a lower layer to a higher one."""
    return {
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if LAYERS[room(source)] < LAYERS[room(target)]
    }


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


@pytest.fixture(scope="module")
def runtime_graph() -> dict[str, set[str]]:
    return import_graph(runtime=True)


def test_every_room_has_a_layer(graph):
    unplaced = sorted({room(module) for module in graph} - set(LAYERS))
    assert not unplaced, f"give these a layer in tests/test_layering.py: {unplaced}"


def test_no_import_cycles(runtime_graph):
    assert cycles(runtime_graph) == set(), "import cycle(s) among these modules"


def test_imports_point_down_the_layers(graph):
    assert upward(graph) == set(), "import(s) from a lower layer to a higher one"


def test_rooms_do_not_import_each_other_in_a_circle(runtime_graph):
    rooms: dict[str, set[str]] = {}
    for source, targets in runtime_graph.items():
        rooms.setdefault(room(source), set()).update(
            room(t) for t in targets if room(t) != room(source)
        )
    assert cycles(rooms) == set()


def test_known_violations_still_occur():
    modules = _module_names()
    fixed = [
        (source, target)
        for source, target in KNOWN_VIOLATIONS
        if source not in modules
        or target
        not in imports_of(
            source,
            modules[source].read_text(encoding="utf-8"),
            set(modules),
            modules[source].name == "__init__.py",
        )
    ]
    assert not fixed, f"fixed: remove from KNOWN_VIOLATIONS in tests/test_layering.py: {fixed}"


# ---------------------------------------------------------------------- the checker itself


def test_the_checker_sees_function_level_relative_and_type_only_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ..errors import AdvtrainError\n"
        "from . import base\n"
        "if TYPE_CHECKING:\n"
        "    from ..threat import ThreatModel\n"
        "def f():\n"
        "    from ..evaluation.basic import predict\n"
        "    import advtrain.util\n"
        "    import torch\n"
    )
    modules = set(_module_names())
    assert imports_of("advtrain.attacks.pgd", source, modules, runtime=True) == {
        "advtrain.errors",
        "advtrain.attacks.base",
        "advtrain.evaluation.basic",
        "advtrain.util",
    }
    assert imports_of("advtrain.attacks.pgd", source, modules) == {
        "advtrain.errors",
        "advtrain.attacks.base",
        "advtrain.threat",
        "advtrain.evaluation.basic",
        "advtrain.util",
    }
    assert imports_of("advtrain.data", "from .base import Split", {"advtrain.data.base"}, True) == {
        "advtrain.data.base"
    }


def test_the_checker_finds_a_cycle_and_an_upward_arrow():
    graph = {"advtrain.a": {"advtrain.b"}, "advtrain.b": {"advtrain.a"}, "advtrain.c": set()}
    assert cycles(graph) == {("advtrain.a", "advtrain.b")}
    assert upward({"advtrain.util": {"advtrain.cli"}}) == {("advtrain.util", "advtrain.cli")}
