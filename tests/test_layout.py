"""The house, read from its own source: small modules, and imports that point one way.

DESIGN.md lays the package out one folder per stage, the imports following the data flow
(cli -> run -> sources / embedding / store / outputs -> models, records, errors). A circle
(a protocol's module importing the implementations that import it back) makes a module
impossible to read or test alone, so these tests read every import statement, including
the ones inside functions (a lazy import is still an arrow), and fail on the first circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import esm2_batch

PACKAGE = Path(esm2_batch.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside a function)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "esm2_batch"


def test_no_module_over_500_lines() -> None:
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_circle_between_modules() -> None:
    assert _cycles(_import_graph()) == []


def test_no_import_circle_between_stage_folders() -> None:
    folders: dict[str, set[str]] = {}
    for module, targets in _import_graph().items():
        source = _folder(module)
        folders.setdefault(source, set()).update(
            t for t in map(_folder, targets) if t != source)
    for folder in list(folders.values()):
        for target in folder:
            folders.setdefault(target, set())
    assert _cycles(folders) == []


def test_the_lower_stages_never_import_the_upper_ones() -> None:
    """The arrows DESIGN.md draws: models know nothing of batching, runs or files; the
    reader side (nn, outputs) never needs the orchestrator; nothing but the CLI imports it."""
    forbidden = {
        "models": {"embedding", "run", "sources", "store", "outputs", "nn", "cli"},
        "embedding": {"run", "sources", "store", "outputs", "nn", "cli"},
        "records": {"models", "embedding", "run", "sources", "store", "outputs", "nn"},
        "errors": {"models", "embedding", "run", "sources", "store", "outputs", "records"},
        "store": {"run", "outputs", "nn", "cli"},
        "sources": {"run", "outputs", "nn", "cli"},
        "outputs": {"run", "nn", "cli"},
        "nn": {"run", "sources", "outputs", "cli", "embedding"},
        "run": {"cli", "nn"},
    }
    wrong = sorted((module, target) for module, targets in _import_graph().items()
                   for target in targets
                   if _folder(target) in forbidden.get(_folder(module), set()))
    assert wrong == []


def test_the_readers_are_at_the_package_top() -> None:
    """The names users reach for (README's examples) import from the package itself."""
    from esm2_batch import (
        AugmentedGeneEmbedding,
        EsmFile,
        gene_vectors,
        load_esm_matrix,
        open_residues,
        read_esm_file,
    )
    from esm2_batch.nn import AugmentedGeneEmbedding as from_nn
    from esm2_batch.store.residues import open_residues as from_store

    assert open_residues is from_store and AugmentedGeneEmbedding is from_nn
    assert all(callable(f) for f in (gene_vectors, load_esm_matrix, read_esm_file))
    assert EsmFile.__name__ == "EsmFile"
    missing = [name for name in esm2_batch.__all__ if not hasattr(esm2_batch, name)]
    assert missing == []
