"""The house in layers: every import points down (or sideways within a layer), and no two modules
import each other, directly or round a longer circle. Imports inside functions count too: a lazy
import is still a dependency, only a later one."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("transports", "processors", "pipelines")
RUNTIME = {"pipelines", "pipelines.builder", "pipelines.call_log", "pipelines.call_observer", "pipelines.caller_memory", "pipelines.events", "pipelines.config",
           "pipelines.deletion_cost", "pipelines.errors", "pipelines.extras", "pipelines.guard", "pipelines.metrics", "pipelines.records", "pipelines.registry",
           "pipelines.server"}
# bottom to top; a module may import its own layer and those below
LAYERS = ["transports", "processors", "runtime", "simulators", "report", "benchmarks", "entry"]


def layer(module: str) -> str:
    if module.startswith(("transports.", "processors.")) or module in ("transports", "processors"):
        return module.split(".")[0]
    if module in RUNTIME:
        return "runtime"
    if module.startswith("pipelines.sim"):
        return "simulators"
    if module.startswith("pipelines.report") or module == "pipelines.config_reference":
        return "report"
    if module.startswith("pipelines.bench"):
        return "benchmarks"
    if module in ("pipelines.cli", "pipelines.__main__"):
        return "entry"
    raise AssertionError(f"{module}: in no layer; add it to tests/test_layers.py")


def modules() -> dict[str, set[str]]:
    """Every shipped module and the modules of ours it imports (a package import counts as its __init__)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in found.items():
        imports = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in found else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in found and "." in target:
                    target = target.rpartition(".")[0]
                if target in found and target != name:
                    imports.add(target)
        graph[name] = imports
    return graph


def test_every_import_points_down():
    graph = modules()
    upward = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in sorted(graph.items()) for t in sorted(targets)
              if LAYERS.index(layer(t)) > LAYERS.index(layer(m))]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_shipped_module_imports_the_tests():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n == "tests" or n.startswith("tests.") for n in names), f"{path} imports tests"


def test_no_import_circles():
    graph = modules()
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_walk_sees_lazy_and_package_imports():
    """The checks above are only as good as the walk: it must see imports inside functions."""
    graph = modules()
    assert "pipelines.sim.engine.reference" in graph["pipelines.cli"]  # imported inside `_load_plan`'s callees
    assert "processors.personaplex.pool" in graph["processors.personaplex.processor"]
