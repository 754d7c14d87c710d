"""ferkit's package layering, read from the source with `ast` (nothing is imported):

(a) no module imports a module of a higher layer: not at module level, not inside a function, not under
    TYPE_CHECKING, not through importlib.import_module("ferkit...");
(b) the import graph between packages (ferkit.data, ferkit.models, ..., and the top-level modules such as
    ferkit.export) has no cycles.

The layers follow the pipeline, lowest first (LAYERS). A module may import its own layer and any lower one. An
upward import that is right anyway goes into ALLOWED with the reason; ALLOWED edges are left out of (b) too, and an
entry that no longer matches any import fails the test, so the list cannot go stale.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import ferkit

SRC = Path(ferkit.__file__).resolve().parent

# Lowest first. An entry covers the module of that name and, for a package, every module below it; "ferkit" is
# the root package's __init__ alone (OMP set-up, __version__), not everything below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("ferkit", "ferkit.shared_files", "ferkit.device", "ferkit.ray_support")),
    ("data", ("ferkit.data",)),
    ("models", ("ferkit.models",)),  # including runnable ensembles: models.ensemble, models.ensemble_weights
    ("training", ("ferkit.training",)),
    ("evaluation", ("ferkit.evaluation",)),
    ("ensembles", ("ferkit.ensembles",)),  # fitting ensembles, prediction files, records, plots
    # Retrains, evaluates and records the published systems: needs training, evaluation and ensembles' records;
    # only the CLI imports it.
    ("reproduce", ("ferkit.reproduce",)),
    ("export", ("ferkit.export",)),  # ONNX export: loads weights (models); verifies with its own ORT session
    ("inference", ("ferkit.inference",)),  # Recognizer, detectors, face crops, ONNX backend (uses export)
    # Saliency and Grad-CAM on faces cut as inference cuts them (ferkit.inference.faces); only the CLI imports it.
    ("explain", ("ferkit.explain",)),
    ("serving", ("ferkit.serving",)),
    ("cli", ("ferkit.cli", "ferkit.__main__")),  # __main__ is `python -m ferkit`: the CLI's entry point
]

# (importer, imported) -> why this upward import is right.
ALLOWED: dict[tuple[str, str], str] = {
    # `ferkit.Recognizer` is the documented entry point (README: `ferkit.Recognizer()`), so the root package names
    # it; a module-level __getattr__ imports ferkit.inference only when the attribute is used (and the
    # TYPE_CHECKING import only runs for type checkers), so importing ferkit, which every `import ferkit.x` does,
    # never loads inference. The root must stay in the base layer: lower layers read ferkit.__version__.
    ("ferkit", "ferkit.inference"): "the root package's lazy ferkit.Recognizer re-export",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    """Every module under src/ferkit by dotted name (a package by its own name, for its __init__.py)."""
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(name: str, modules: Iterable[str]) -> str:
    """The module `from <package> import name` binds: the submodule when there is one, else the package."""
    return name if name in modules else name.rsplit(".", 1)[0]


def imported_modules(importer: str, is_package: bool, source: str, modules: set[str]) -> set[str]:
    """The ferkit modules that `source` (the text of module `importer`) imports anywhere in its body."""
    package = importer if is_package else importer.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..pkg import y`
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update(_resolve(f"{target}.{alias.name}", modules) for alias in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.add(node.args[0].value)
    return {m for m in found if m == "ferkit" or m.startswith("ferkit.")} - {importer}


def import_graph() -> dict[str, set[str]]:
    """importer -> the ferkit modules it imports, for every module under src/ferkit."""
    modules = all_modules()
    names = set(modules)
    return {name: imported_modules(name, path.name == "__init__.py", path.read_text(encoding="utf-8"), names)
            for name, path in modules.items()}


def layer_index(module: str) -> int | None:
    """Position in LAYERS of the layer that holds `module` (the most specific entry wins), or None."""
    best: tuple[int, int] | None = None  # (entry length, layer index)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if module == entry or (entry != "ferkit" and module.startswith(entry + ".")):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), index)
    return None if best is None else best[1]


def package_of(module: str) -> str:
    """The node of the package graph: ferkit.<first part> (a top-level module is its own node), or the root."""
    return ".".join(module.split(".")[:2])


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles (node paths that end where they start), until every node that lies on a cycle is on one of them."""

    def path(start: str, goal: str) -> list[str] | None:  # shortest start -> ... -> goal, by breadth-first search
        parents: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in sorted(edges.get(node, ())):
                if nxt == goal:
                    route = [nxt, node]
                    while route[-1] != start:
                        route.append(parents[route[-1]])
                    return route[::-1]
                if nxt not in parents and nxt != start:
                    parents[nxt] = node
                    queue.append(nxt)
        return None

    cycles: list[list[str]] = []
    covered: set[str] = set()
    for node in sorted(edges):
        if node not in covered and (cycle := path(node, node)):
            cycles.append(cycle)
            covered.update(cycle)
    return cycles


# ---- the rules --------------------------------------------------------------------------------------------------


def test_every_module_has_a_layer() -> None:
    unmapped = sorted(m for m in all_modules() if layer_index(m) is None)
    assert not unmapped, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unmapped}"


def test_no_module_imports_a_higher_layer() -> None:
    violations = []
    for importer, imported in sorted(import_graph().items()):
        for target in sorted(imported):
            low, high = layer_index(importer), layer_index(target)
            if low is not None and high is not None and high > low and (importer, target) not in ALLOWED:
                violations.append(f"{importer} -> {target}  ({LAYERS[low][0]} imports {LAYERS[high][0]})")
    assert not violations, ("lower layers must not import upper ones (not even inside a function):\n  "
                            + "\n  ".join(violations))


def test_allowed_exceptions_are_still_needed() -> None:
    graph = import_graph()
    stale = [f"{a} -> {b}" for a, b in ALLOWED if b not in graph.get(a, set())]
    assert not stale, f"ALLOWED lists imports that no longer exist; remove them: {stale}"


def test_no_import_cycles_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    via: dict[tuple[str, str], list[str]] = {}  # package edge -> the module imports behind it
    for importer, imported in import_graph().items():
        for target in imported:
            a, b = package_of(importer), package_of(target)
            if a != b and (importer, target) not in ALLOWED:
                edges.setdefault(a, set()).add(b)
                via.setdefault((a, b), []).append(f"{importer} -> {target}")
    report = []
    for cycle in find_cycles(edges):
        report.append(" -> ".join(cycle))
        report += [f"    {edge}" for a, b in zip(cycle, cycle[1:], strict=False) for edge in sorted(via[(a, b)])]
    assert not report, "import cycles between packages:\n" + "\n".join(report)


# ---- the checker itself -----------------------------------------------------------------------------------------


def test_reader_sees_every_kind_of_import() -> None:
    modules = {"ferkit", "ferkit.data", "ferkit.data.pixels", "ferkit.models", "ferkit.models.weights",
               "ferkit.inference", "ferkit.inference.faces", "ferkit.serving", "ferkit.cli", "ferkit.export"}
    source = """
import ferkit.data.pixels
from ferkit import export, __version__
from ferkit.models.weights import load_model
from . import weights
from ..data import pixels
from .. import serving


def later():
    from ferkit.inference.faces import FER_SIZE
    import importlib
    return importlib.import_module("ferkit.cli")
"""
    found = imported_modules("ferkit.models.ensemble", False, source, modules)
    assert found == {"ferkit", "ferkit.data.pixels", "ferkit.export", "ferkit.models.weights",
                     "ferkit.inference.faces", "ferkit.serving", "ferkit.cli"}
    # a package's own relative imports are relative to itself
    assert imported_modules("ferkit.models", True, "from .weights import x", modules) == {"ferkit.models.weights"}


def test_real_graph_includes_function_level_imports() -> None:
    graph = import_graph()
    assert "ferkit.models.weights" in graph["ferkit.export"]  # imported inside export._load
    assert "ferkit.inference" in graph["ferkit"]  # inside the root's __getattr__


def test_checks_catch_an_upward_import_and_a_cycle() -> None:
    assert layer_index("ferkit.models.weights") < layer_index("ferkit.ensembles.artifact")
    assert layer_index("ferkit") == 0 and layer_index("ferkit.new_module") is None
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}}) == []
