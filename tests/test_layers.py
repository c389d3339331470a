"""The package's layers point one way, read from the source with `ast` (nothing is imported).

Every import counts, at the top of a module or inside a function: an import deferred to keep start-up
light (torch, Ray) still has to respect the layers, and none may be there to break a cycle.

    bottom:        files, timing, versions, images, paths, layout, errors, retry, console, startup
                   (import nothing of ours above)
    config:        config, data.schema, model.image_tokens, plan, resources, cluster, ray_session
    data / model:  data.*, model.*
    train / eval:  train.*, eval.*          (eval never imports train)
    pipeline/tune: pipeline, tune
    report:        report.*
    doors:         export, boundary, cli    (nothing imports cli)

A module imports its own layer or those below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "orchestrator"
ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / PACKAGE

LAYERS = (
    ("bottom", ("files", "timing", "versions", "images", "paths", "layout", "errors", "retry", "console",
                "startup")),
    # data.schema is the rows and the error type the config refers to, so it sits with the config;
    # model.image_tokens is arithmetic the planner and the model loader share
    ("config", ("config", "data.schema", "model.image_tokens", "plan", "resources", "cluster", "ray_session")),
    ("data/model", ("data", "model")),
    ("train/eval", ("train", "eval")),
    ("pipeline/tune", ("pipeline", "tune")),
    ("report", ("report",)),
    ("doors", ("export", "boundary", "cli")),
)
# same layer, but one way only: (importer, imported)
FORBIDDEN_WITHIN = (("eval", "train"),)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(source: Path = SOURCE) -> dict[str, Path]:
    return {module_name(path): path for path in sorted(source.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its source (`from pkg import mod` counts as `pkg.mod`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name and module != PACKAGE}


def import_graph(source: Path = SOURCE) -> dict[str, set[str]]:
    """Our module -> our modules it imports (the root package, a version string, is left out)."""
    found = modules(source)
    return {name: imported_modules(name, path, set(found)) for name, path in found.items() if name != PACKAGE}


def layer_of(module: str) -> tuple[int, str]:
    """(rank, the layer entry it matched) of one of our modules; the longest matching entry wins."""
    relative = module.removeprefix(f"{PACKAGE}.")
    matches = [(len(entry), rank, entry) for rank, (_, entries) in enumerate(LAYERS) for entry in entries
               if relative == entry or relative.startswith(f"{entry}.")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    _, rank, entry = max(matches)
    return rank, entry


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up a layer, crosses a one-way pair, or imports the command line."""
    found = []
    for module, imports in sorted(graph.items()):
        rank, entry = layer_of(module)
        for target in sorted(imports):
            target_rank, target_entry = layer_of(target)
            if target_rank > rank:
                found.append(f"{module} ({LAYERS[rank][0]}) imports {target} ({LAYERS[target_rank][0]})")
            elif (entry.split(".")[0], target_entry.split(".")[0]) in FORBIDDEN_WITHIN:
                found.append(f"{module} imports {target}: {entry} never imports {target_entry}")
            elif target == f"{PACKAGE}.cli":
                found.append(f"{module} imports the command line ({target})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph` (strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def without_package_to_own_modules(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ may name its own modules lazily (`orchestrator.eval.run_eval`): not a cycle of layers."""
    return {module: {target for target in imports if not target.startswith(f"{module}.")}
            for module, imports in graph.items()}


def test_every_module_of_the_package_is_in_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_point_down_the_layers_only():
    assert violations(import_graph()) == []


def test_no_import_cycle_even_counting_the_imports_inside_functions():
    assert cycles(without_package_to_own_modules(import_graph())) == []


def test_no_module_imports_a_private_name_of_another():
    found = []
    for root in (SOURCE, ROOT / "benchmarks", ROOT / "jobs"):
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}"
                              for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert found == []


def test_the_checks_catch_an_upward_import_a_one_way_pair_the_cli_and_a_cycle():
    graph = {"orchestrator.data.formats": {"orchestrator.eval.pope"},
             "orchestrator.eval.pope": {"orchestrator.train.losses"},
             "orchestrator.train.losses": {"orchestrator.cli"},
             "orchestrator.cli": set(),
             "orchestrator.layout": {"orchestrator.config"},
             "orchestrator.config": {"orchestrator.layout"}}
    assert violations(graph) == [
        "orchestrator.data.formats (data/model) imports orchestrator.eval.pope (train/eval)",
        "orchestrator.eval.pope imports orchestrator.train.losses: eval never imports train",
        "orchestrator.layout (bottom) imports orchestrator.config (config)",
        "orchestrator.train.losses (train/eval) imports orchestrator.cli (doors)",
    ]
    assert cycles(graph) == [["orchestrator.config", "orchestrator.layout"]]


def test_the_import_reader_sees_imports_inside_functions_and_submodules_named_by_from(tmp_path):
    package = tmp_path / PACKAGE
    (package / "eval").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "eval" / "__init__.py").write_text("")
    (package / "eval" / "pope.py").write_text("")
    (package / "layout.py").write_text("")
    (package / "report.py").write_text("from orchestrator.eval import pope\n\n"
                                       "def f():\n    from orchestrator import layout\n    import json\n")
    known = {"orchestrator", "orchestrator.eval", "orchestrator.eval.pope", "orchestrator.layout", "orchestrator.report"}
    assert imported_modules("orchestrator.report", package / "report.py", known) == {
        "orchestrator.eval.pope", "orchestrator.layout"}
