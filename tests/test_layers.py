"""The floors of STYLE.md, checked on the source: no import cycle (deferred imports included; type-only imports
under TYPE_CHECKING excepted, except in the runtime, where they count too), and no arrow up (ground -> engines or apps, runtime -> export or server, server ->
export)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"toolkit": ROOT / "toolkit", "toolkit.export": ROOT / "export", "toolkit.runtime": ROOT / "runtime",
           "toolkit.server": ROOT / "server"}
ENGINES = ("toolkit.export", "toolkit.runtime", "toolkit.server")
APPS = ("toolkit.cli", "toolkit.bench", "toolkit.bulk")
UP = {("ground", f) for f in ENGINES + APPS} | {("toolkit.runtime", "toolkit.export"),
                                                ("toolkit.runtime", "toolkit.server"),
                                                ("toolkit.server", "toolkit.export")}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p not in ("__init__", "__main__")]
            found[".".join([package, *parts]) if parts else package] = path
    return found


def _graph(type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``type_only``: those under TYPE_CHECKING too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING" and not type_only:
                node.body = []  # type-only imports
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("toolkit"):
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("toolkit")]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "toolkit":
                    graph[name].add(target)
    return graph


def _floor(module: str) -> str:
    return next((f for f in ENGINES + APPS if module == f or module.startswith(f + ".")), "ground")


def test_no_import_points_up():
    graph = _graph()
    up = sorted((a, b) for a, targets in graph.items() for b in targets if (_floor(a), _floor(b)) in UP)
    assert up == [], up


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    seen, cycles = {}, []

    def visit(node: str, path: list[str]) -> None:  # depth-first; grey nodes on the path close a cycle
        seen[node] = "grey"
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == "grey":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = "black"

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
    return cycles


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_no_import_cycle_in_the_runtime_type_only_imports_included():
    """The runtime's modules read a model context (``runtime.context``), never the engine: not even a type-only
    import closes a circle among them."""
    graph = {name: {t for t in targets if _floor(t) == "toolkit.runtime"}
             for name, targets in _graph(type_only=True).items() if _floor(name) == "toolkit.runtime"}
    assert _cycles(graph) == []


def test_the_runtime_reads_capabilities_never_sniffs_them():
    """What an artifact or an encoder can do is declared (the manifest, the encoder protocol's ``builds_inputs``),
    never probed: no ``hasattr`` / ``getattr`` / ``id()`` in the runtime, but for the one place an INPUT declares its
    modality by its type (``encoders.declared_modality``)."""
    allowed = {('encoders.py', 'return getattr(type(item), "modality", "text")')}
    found = [(path.name, line.strip()) for path in sorted((ROOT / "runtime").glob("*.py"))
             for line in path.read_text().splitlines()
             if any(probe in line for probe in ("hasattr(", "getattr(", " id(", "{id(", "(id("))
             and not line.strip().startswith("#")]
    assert [f for f in found if f not in allowed] == []
