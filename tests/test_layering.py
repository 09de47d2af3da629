"""The package's layering, read from the source: no import cycle (imports inside functions count),
the shared machinery imports no driver and no method, and `import prunekit` stays cheap."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prunekit"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the prunekit modules it imports anywhere in its file (top level or in a function)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:          # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name and target != "prunekit":
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level imports count): " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("low, allowed", [
    ("prunekit.core", ("prunekit.core", "prunekit.models", "prunekit.distributed")),
    ("prunekit.registry", ()),
    ("prunekit.models", ("prunekit.models",)),
    ("prunekit.surgery", ("prunekit.models",)),
    ("prunekit.engine", ("prunekit.core", "prunekit.models", "prunekit.distributed", "prunekit.gradients",
                         "prunekit.lockstep", "prunekit.masks", "prunekit.permute", "prunekit.report",
                         "prunekit.surgery", "prunekit.updates", "prunekit.stats", "prunekit.config",
                         "prunekit.expert_weights")),
    ("prunekit.expert_weights", ("prunekit.core", "prunekit.models", "prunekit.distributed", "prunekit.masks",
                                 "prunekit.report", "prunekit.updates")),
])
def test_shared_machinery_imports_no_driver_and_no_method(low, allowed):
    """The block stream and residency, the registry, the family specs, surgery and the linear
    engine sit below every driver and method: they import only what is listed here."""
    graph = import_graph()
    for module, targets in graph.items():
        if module == low or module.startswith(low + "."):
            bad = sorted(t for t in targets if t != module and not t.startswith(allowed + (module,)))
            assert not bad, f"{module} imports {bad}"


def test_method_files_import_no_driver():
    graph = import_graph()
    drivers = {"prunekit.prune", "prunekit.engine", "prunekit.api", "prunekit.cli", "prunekit.io.offload",
               "prunekit.catalog", "prunekit.sweep", "prunekit.recipe"}
    for module, targets in graph.items():
        if module.startswith("prunekit.methods."):
            assert not targets & drivers, f"{module} imports {sorted(targets & drivers)}"


def test_import_prunekit_imports_neither_torch_nor_transformers():
    code = ("import sys, prunekit; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
