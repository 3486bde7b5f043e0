"""The package's import graph, read with ``ast`` from every module of pytest_ttenv/: every import
counts (module level, inside functions, under ``if TYPE_CHECKING:``, and ``importlib.import_module``
/ ``importlib.resources.files`` of a constant name). The rules, with LAYERS below written once:

- a module imports only modules of its own layer or lower ones; in a layer of siblings (L1) no
  sibling imports another;
- no import cycle, of any length;
- every module has a layer (the longest prefix of LAYERS that names it or a package above it);
- no module is over MAX_LINES lines.

Each violation is one line. ``python tests/unit/test_layers.py`` prints the graph layer by layer
(module -> the package's modules it imports) and then the violations.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_ttenv"
MAX_LINES = 520


@dataclass(frozen=True)
class Layer:
    name: str
    prefixes: tuple[str, ...]  # a module belongs to the longest prefix naming it or a package above it
    siblings: bool = False  # True: no prefix's modules import another prefix's modules


# THE LAYER ORDER, lowest first (docs/architecture.md draws it). A prefix without a dot, the package
# itself, names its __init__ only (here: the version), never every module.
LAYERS = (
    Layer("L0 vocabulary", ("pytest_ttenv", "pytest_ttenv.errors", "pytest_ttenv.quiet", "pytest_ttenv.core")),
    Layer(
        "L1 engines, images, ssh",
        ("pytest_ttenv.backend.engines", "pytest_ttenv.backend.images", "pytest_ttenv.ssh"),
        siblings=True,
    ),
    Layer("L2 backend", ("pytest_ttenv.backend",)),
    Layer(
        "L3 client flow",
        (
            "pytest_ttenv.access",
            "pytest_ttenv.lease",
            "pytest_ttenv.config",
            "pytest_ttenv.matrix",
            "pytest_ttenv.envflow",  # the client-side ENV flow: create -> wait -> clean up
        ),
    ),
    Layer("L4 session", ("pytest_ttenv.session",)),
    Layer("L5 state, fixtures, report", ("pytest_ttenv.state", "pytest_ttenv.fixtures", "pytest_ttenv.report")),
    Layer(
        "L6 entry points",
        (
            "pytest_ttenv.plugin",
            "pytest_ttenv.hookspecs",
            "pytest_ttenv.testinfra_backend",
            "pytest_ttenv.cli",
            "pytest_ttenv.server",
            "pytest_ttenv.doctor",
        ),
    ),
)


# -- reading the graph -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


def modules(root: Path) -> dict[str, Module]:
    """Every .py module under the package dir ``root``, by dotted name (``root.name`` first)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = Module(".".join(parts), path, is_package)
    return found


def _target(name: str, known: Mapping[str, Module]) -> str | None:
    """The module of ``known`` that ``name`` (a module or an attribute of one) names."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported(module: Module, known: Mapping[str, Module]) -> set[str]:
    """The modules of ``known`` that ``module`` imports. ``import a.b`` and ``from a import b`` name
    a.b when that is a module (its parent packages run too, but are not what was asked for); ``from
    a import name`` names a; a constant ``import_module("a")`` names a, and ``resources.files("a")``
    too unless a is a package above ``module`` (its own data: that package is loaded already)."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per dot after the first
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names += [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Call) and node.args and _called(node) in ("import_module", "files"):
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                if _called(node) == "import_module" or not module.name.startswith(first.value + "."):
                    names.append(first.value)
    return {t for t in (_target(n, known) for n in names) if t and t != module.name}


def _called(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def import_graph(known: Mapping[str, Module]) -> dict[str, set[str]]:
    """module -> the modules of ``known`` it imports."""
    return {name: _imported(module, known) for name, module in known.items()}


def layer_of(name: str, layers: Sequence[Layer] = LAYERS) -> tuple[int, str] | None:
    """(layer index, prefix) of the longest prefix naming ``name`` or a package above it."""
    best: tuple[int, str] | None = None
    for index, layer in enumerate(layers):
        for prefix in layer.prefixes:
            exact_only = "." not in prefix
            if (name == prefix or (not exact_only and name.startswith(prefix + "."))) and (
                best is None or len(prefix) > len(best[1])
            ):
                best = (index, prefix)
    return best


# -- the rules ----------------------------------------------------------------------------------------
def upward_imports(graph: Mapping[str, set[str]], layers: Sequence[Layer] = LAYERS) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module, layers)
        for target in sorted(targets):
            theirs = layer_of(target, layers)
            if mine is None or theirs is None:
                continue  # reported by unassigned()
            if theirs[0] > mine[0]:
                wrong.append(
                    f"{module} ({layers[mine[0]].name}) imports {target} ({layers[theirs[0]].name}): a higher layer"
                )
            elif theirs[0] == mine[0] and layers[mine[0]].siblings and theirs[1] != mine[1]:
                wrong.append(f"{module} imports {target}: siblings of {layers[mine[0]].name} import none of each other")
    return wrong


def cycles(graph: Mapping[str, set[str]]) -> list[str]:
    """One line per strongly connected component of more than one module (or a module importing
    itself), with one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (no recursion limit)
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for component in sorted(components):
        first = component[0]
        if len(component) > 1 or first in graph.get(first, ()):
            found.append("import cycle: " + " -> ".join(_cycle_path(graph, first, set(component))))
    return found


def _cycle_path(graph: Mapping[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside ``members`` (breadth first)."""
    previous: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph.get(node, ())):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")


def unassigned(known: Iterable[str], layers: Sequence[Layer] = LAYERS) -> list[str]:
    return [f"{name}: in no layer (add it to LAYERS)" for name in sorted(known) if layer_of(name, layers) is None]


def oversized(known: Mapping[str, Module], limit: int = MAX_LINES) -> list[str]:
    sizes = {name: len(m.path.read_text().splitlines()) for name, m in known.items()}
    return [f"{name}: {n} lines (over {limit})" for name, n in sorted(sizes.items()) if n > limit]


# -- the package's own graph --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package() -> tuple[dict[str, Module], dict[str, set[str]]]:
    known = modules(PACKAGE)
    return known, import_graph(known)


def test_no_import_goes_up_a_layer(package: tuple[dict[str, Module], dict[str, set[str]]]) -> None:
    wrong = upward_imports(package[1])
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(package: tuple[dict[str, Module], dict[str, set[str]]]) -> None:
    wrong = cycles(package[1])
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer(package: tuple[dict[str, Module], dict[str, set[str]]]) -> None:
    wrong = unassigned(package[0])
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_the_size_limit(package: tuple[dict[str, Module], dict[str, set[str]]]) -> None:
    wrong = oversized(package[0])
    assert not wrong, "\n".join(wrong)


def test_the_formatter_formats_every_line() -> None:
    """No line is held against ``ruff format`` (scripts/test.sh runs ``ruff format --check``)."""
    root = PACKAGE.parent
    held = [
        f"{path.relative_to(root)}:{n}"
        for folder in ("pytest_ttenv", "tests", "bench", "examples")
        for path in sorted((root / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "# fmt: " + "skip" in line or "# fmt: " + "off" in line
    ]
    assert not held, "formatter markers: " + ", ".join(held)


# -- the checks on a package made for them -----------------------------------------------------------
def test_the_checks_see_every_kind_of_import_and_violation(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "low/__init__.py": "from pkg.low.a import A\n",
        "low/a.py": "A = 1\n",
        "low/b.py": "def f():\n    from ..high import h  # lazy, relative\n    return h\n",
        "side/__init__.py": "",
        "side/s.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.other.o import O\n",
        "other/o.py": "import pkg.low.a\nimport importlib\nimportlib.import_module('pkg.side.s')\n"
        "from importlib import resources\nG = resources.files('pkg.other').joinpath('guest')\n",  # own data: no import
        "other/__init__.py": "",
        "high.py": "from pkg.low import a, A\nfrom . import loop\nh = 1\n",
        "loop.py": "from pkg import high\n" + "x = 1\n" * 30,
        "stray.py": "from pkg.low import b\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    layers = (
        Layer("L0", ("pkg", "pkg.low")),
        Layer("L1", ("pkg.side", "pkg.other"), siblings=True),
        Layer("L2", ("pkg.high", "pkg.loop")),
    )
    known = modules(pkg)
    graph = import_graph(known)
    assert graph["pkg.high"] == {"pkg.low", "pkg.low.a", "pkg.loop"}  # `from pkg.low import a, A`: both
    assert graph["pkg.low.b"] == {"pkg.high"} and graph["pkg.side.s"] == {"pkg.other.o"}
    assert graph["pkg.other.o"] == {"pkg.low.a", "pkg.side.s"}
    assert upward_imports(graph, layers) == [
        "pkg.low.b (L0) imports pkg.high (L2): a higher layer",
        "pkg.other.o imports pkg.side.s: siblings of L1 import none of each other",
        "pkg.side.s imports pkg.other.o: siblings of L1 import none of each other",
    ]
    assert cycles(graph) == [
        "import cycle: pkg.high -> pkg.loop -> pkg.high",
        "import cycle: pkg.other.o -> pkg.side.s -> pkg.other.o",
    ]
    assert unassigned(known, layers) == ["pkg.stray: in no layer (add it to LAYERS)"]
    assert oversized(known, limit=30) == ["pkg.loop: 31 lines (over 30)"]


# -- the graph, for the note -----------------------------------------------------------------
def short(name: str) -> str:
    return name.removeprefix("pytest_ttenv.") if name != "pytest_ttenv" else name


def print_graph() -> None:
    known = modules(PACKAGE)
    graph = import_graph(known)
    by_layer: dict[int | None, list[str]] = {}
    for name in known:
        found = layer_of(name)
        by_layer.setdefault(found[0] if found else None, []).append(name)
    for index, layer in [*enumerate(LAYERS), (None, None)]:
        names = sorted(by_layer.get(index, []))
        if layer is None and not names:
            continue
        print(f"{layer.name if layer else 'in no layer'} ({', '.join(map(short, layer.prefixes)) if layer else ''})")
        for name in names:
            lines = len(known[name].path.read_text().splitlines())
            targets = ", ".join(short(t) for t in sorted(graph[name])) or "-"
            print(f"  {short(name)} [{lines}] -> {targets}")
    wrong = [*upward_imports(graph), *cycles(graph), *unassigned(known), *oversized(known)]
    print(f"\n{len(wrong)} violation(s)" + "".join(f"\n  {w}" for w in wrong))


if __name__ == "__main__":
    print_graph()
    sys.exit(0)
