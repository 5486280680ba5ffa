"""The import graph of dmoe_torch points down the layers of docs/architecture.md, with no cycle.

The layer table is parsed from docs/architecture.md itself, so the page and this test cannot
drift apart.  Every ``import`` and ``from ... import`` of a dmoe_torch module counts, also
inside functions and ``if TYPE_CHECKING:`` blocks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "dmoe_torch"
DOC = REPO / "docs" / "architecture.md"


def layer_table() -> dict[str, int]:
    """Entry of the table (a repo-relative path; a folder ends with /) -> its layer."""
    table = {}
    for line in DOC.read_text().splitlines():
        row = re.match(r"^\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for entry in re.findall(r"`([^`]+)`", row.group(2)):
                table[entry] = int(row.group(1))
    return table


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    modules = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def layer_of(path: Path, table: dict[str, int]) -> int | None:
    """The layer of the file at ``path``: its own entry, else that of the nearest folder entry."""
    relative = path.relative_to(REPO).as_posix()
    if relative in table:
        return table[relative]
    folders = [entry for entry in table if entry.endswith("/") and relative.startswith(entry)]
    return table[max(folders, key=len)] if folders else None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``module`` imports anywhere in its file (the nearest module
    that exists: ``from .des import des`` names ``dmoe_torch.selection.des``)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    base = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module or ""
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                prefix = anchor + ("." + node.module if node.module else "")
            # `from P import n` imports the module P.n when there is one, else a name of P.
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE:
                targets.add(resolve(name))
    return {t for t in targets if t and t != module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports.  Importing the ``__init__`` of a package the
    module is inside (``from . import ExchangeError`` in runtime/distributed.py) is no edge,
    except the root package: that is the public face, on top of everything."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        targets = imported_modules(module, path, modules)
        graph[module] = {t for t in targets if t == PACKAGE or not module.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_layer_table_names_existing_paths_only():
    table = layer_table()
    assert set(table.values()) == set(range(7)), f"layers 0..6 in {DOC.name}, got {sorted(set(table.values()))}"
    missing = [entry for entry in table if not (REPO / entry).exists()]
    assert not missing, f"{DOC.name} names paths that do not exist: {missing}"


def test_every_module_has_a_layer():
    table = layer_table()
    unplaced = [m for m, path in package_modules().items() if layer_of(path, table) is None]
    assert not unplaced, f"add these modules (or their folder) to the layer table of {DOC.name}: {unplaced}"


def test_imports_point_down_the_layers():
    table = layer_table()
    modules = package_modules()
    layers = {m: layer_of(path, table) for m, path in modules.items()}
    upward = [
        f"{m} (layer {layers[m]}) imports {t} (layer {layers[t]})"
        for m, targets in import_graph().items()
        for t in sorted(targets)
        if layers[t] > layers[m]
    ]
    assert not upward, "imports that point up; move the shared piece down:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checks_see_imports_inside_functions_and_cycles():
    # The graph builder on this repository's own files: report.py imports plotting.py at
    # module level, config.py imports moe.py inside a function, cnn.py imports moe.py.
    graph = import_graph()
    assert "dmoe_torch.output.plots" in graph["dmoe_torch.output.report"]
    assert "dmoe_torch.moe" in graph["dmoe_torch.models.cnn"]
    assert "dmoe_torch.channel" in graph["dmoe_torch.config"]  # `from .channel import ChannelConfig` in a function
    # A new file in a folder of the table has the folder's layer without a new entry.
    table = layer_table()
    assert layer_of(REPO / PACKAGE / "selection" / "new_policy.py", table) == 0
    assert layer_of(REPO / PACKAGE / "models" / "convmoe.py", table) == 1
    assert layer_of(REPO / PACKAGE / "config" / "__init__.py", table) < layer_of(
        REPO / PACKAGE / "engine" / "checkpoint.py", table
    )
    # ... and the cycle finder on a made-up graph.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_keeps_at_most_six_top_level_modules():
    """Everything else lives in a package named for what it owns (docs/architecture.md)."""
    top_level = sorted(p.name for p in (REPO / PACKAGE).glob("*.py"))
    assert len(top_level) <= 6, f"dmoe_torch/ has {len(top_level)} top-level modules: {top_level}"


MAX_FUNCTION_LINES = 80
CODE_ROOTS = (PACKAGE, "benchmarks", "scripts", "examples", "train.py", "evaluate.py")


def long_functions(source: str, max_lines: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function in ``source`` longer than ``max_lines`` lines, numba
    kernels (decorated with njit / jit) excepted: a kernel is one loop nest, kept whole for speed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kernel = any("jit" in ast.unparse(d) for d in node.decorator_list)
            lines = node.end_lineno - node.lineno + 1
            if lines > max_lines and not kernel:
                found.append((node.name, lines))
    return found


def test_no_function_outside_numba_kernels_is_longer_than_80_lines():
    paths = [p for root in CODE_ROOTS for p in ([REPO / root] if root.endswith(".py") else sorted((REPO / root).rglob("*.py")))]
    offenders = [f"{p.relative_to(REPO)}:{name} ({n} lines)" for p in paths for name, n in long_functions(p.read_text())]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {offenders}"


def test_the_length_check_sees_long_functions_and_spares_kernels():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def long():\n{body}\n") == [("long", MAX_FUNCTION_LINES + 1)]
    assert long_functions(f"@njit(cache=True)\ndef kernel():\n{body}\n") == []
    assert long_functions(f"def short():\n{body[: body.rindex(chr(10))]}\n") == []
