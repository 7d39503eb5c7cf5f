"""The package graph runs one way: a package imports only packages on its own level or below.

    comm, storage, choices, lazy,     the bottom: processes, bytes, the config's Enum base, lazy exports,
    cpus, process_exit                a rank's CPU budget (threads and workers), how an entry point exits
    tasks, adapters                   what a task is; the LoRA math
    data, models, config_errors       sources -> shards -> batches; backbone + heads; what a config error means
    config, synthetic                 the run configuration (every job reads it; hands config_errors its
                                      schema); generated datasets in the real layouts (tests, quickstart)
    checkpoint                        trainable state on disk
    engine                            DeepSpeed set-up and the training loop
    export                            merged weights for inference
    reports                           tables, pictures, curves
    study                             sweeps of whole runs and the report comparing them
    (launch/ entry points sit on top and may import anything)

So a change to the training loop cannot break data loading, and evaluation or export never depend on
``engine/trainer.py``. Modules directly in the package (``comm.py``, ``config.py``) count as packages.
Inside a package, modules import each other without circles (lazy imports included): a module that
registers itself somewhere imports the registry, never the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtlora_dist"
LEVELS = [
    {"comm", "storage", "choices", "lazy", "cpus", "process_exit"},
    {"tasks", "adapters"},
    {"data", "models", "config_errors"},
    {"config", "synthetic"},
    {"checkpoint"},
    {"engine"},
    {"export"},
    {"reports"},
    {"study"},
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _unit(module: str) -> str | None:
    """``mtlora_dist.data.stream.loader`` -> ``data``; ``mtlora_dist`` itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mtlora_dist" else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported unit) for every import of the package in ``path``, lazy imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "mtlora_dist" else [f"mtlora_dist.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, unit) for unit in map(_unit, names) if unit]
    return found


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import module`` names the module)."""
    paths = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module for a in node.names
                }
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def _import_cycles(package: Path) -> list[list[str]]:
    """Every circle of imports between modules (strongly connected components of more than one)."""
    graph, order, low, stack, cycles = _module_graph(package), {}, {}, [], []

    def visit(v: str) -> None:  # Tarjan
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return cycles


def _upward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        unit = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if unit not in LEVEL:
            continue  # mtlora_dist/__init__.py
        for line, target in _imports(path):
            if target in LEVEL and LEVEL[target] > LEVEL[unit]:
                bad.append(
                    f"mtlora_dist/{rel}:{line}: {unit} (level {LEVEL[unit]}) imports {target} (level {LEVEL[target]})"
                )
    return bad


def test_every_package_has_a_level():
    rels = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")]
    units = {rel.parts[0] if len(rel.parts) > 1 else rel.stem for rel in rels} - {"__init__"}
    assert sorted(units - set(LEVEL)) == [], "give every package of mtlora_dist a level in LEVELS"


def test_no_package_imports_a_higher_one():
    assert _upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a lazy import inside a function of a low package is found."""
    fake = tmp_path / "mtlora_dist"
    (fake / "storage").mkdir(parents=True)
    (fake / "storage" / "x.py").write_text("def f():\n    from mtlora_dist.engine.trainer import train\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert _upward_imports() == ["mtlora_dist/storage/x.py:2: storage (level 0) imports engine (level 5)"]


def test_no_import_cycle_between_modules():
    assert _import_cycles(PACKAGE) == []


def test_the_check_sees_an_import_cycle(tmp_path):
    """The checker itself: a registry that imports the module registering into it is a circle."""
    fake = tmp_path / "mtlora_dist"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "registry.py").write_text("REG = {}\nfrom mtlora_dist.data import plugin  # registers\n")
    (fake / "data" / "plugin.py").write_text("from mtlora_dist.data.registry import REG\n")
    assert _import_cycles(fake) == [["mtlora_dist.data.plugin", "mtlora_dist.data.registry"]]


@pytest.mark.parametrize("module", ["mtlora_dist.engine.restore", "mtlora_dist.engine.evaluate"])
def test_evaluation_and_export_do_not_depend_on_the_training_loop(module):
    path = PACKAGE / Path(*module.split(".")[1:]).with_suffix(".py")
    if not path.exists():
        pytest.skip(f"{module} is gone")
    text = path.read_text()
    assert "engine.trainer" not in text and "from mtlora_dist.engine import trainer" not in text
