"""Import layering of foxacp, read from the source with ``ast`` (nothing is imported).

Layers, lowest first: ops and data (side by side, neither imports the other) < models < train
< analysis < the command line (``foxacp.cli``, ``foxacp.__main__`` and every ``*/commands.py``).
A module imports only its own layer or lower ones, a library module never imports a command
module, command modules do not import each other, and no foxacp modules import each other in
a cycle. Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
RANKS = {"ops": 0, "data": 0, "models": 1, "train": 2, "analysis": 3}
CLI_RANK = 4


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((SRC / "foxacp").rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The foxacp modules ``name`` imports: ``from pkg import mod`` counts as ``pkg.mod`` when that
    is a module, else as ``pkg``; relative imports are resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _is_cli(name: str) -> bool:
    return name in ("foxacp.cli", "foxacp.__main__") or name.endswith(".commands")


def _layer(name: str) -> tuple[str, int]:
    """``(layer name, rank)`` of a module; the root package and ``foxacp.acp`` re-export ops."""
    if _is_cli(name):
        return "cli", CLI_RANK
    parts = name.split(".")
    area = parts[1] if len(parts) > 1 and parts[1] in RANKS else "ops"
    return area, RANKS[area]


def test_sources_found():
    assert {"foxacp.cli", "foxacp.ops.api", "foxacp.train.trainer", "foxacp.analysis.loading"} <= set(MODULES)


def test_no_module_imports_a_higher_layer():
    bad = []
    for name, imported in GRAPH.items():
        area, rank = _layer(name)
        for other in imported:
            other_area, other_rank = _layer(other)
            if other_rank > rank or (other_rank == rank and other_area != area and area != "cli"):
                bad.append(f"{name} ({area}) imports {other} ({other_area})")
    assert not bad, "\n".join(sorted(bad))


def test_command_modules_do_not_import_each_other():
    bad = [f"{name} imports {other}" for name, imported in GRAPH.items() if name.endswith(".commands")
           for other in imported if _is_cli(other)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycles, state = [], {}  # state: 1 on the current path, 2 finished

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(GRAPH[name]):
            if state.get(other) == 1:
                cycles.append(" -> ".join(path[path.index(other):] + [other]))
            elif other not in state:
                visit(other, path + [other])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
