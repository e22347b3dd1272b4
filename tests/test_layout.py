"""The package's architecture as a checked rule: imports flow one way between the subpackages, with no cycles.

Layers, bottom up: `common` (leaf helpers); `data`, `engine` and `reward` (independent of each other); `execution`,
`train`, `embedded`, then the entry points at the top (config, run, evaluate, report) and what they share beside
`data` (loggers). A module may import its own
layer's subpackage or any lower layer; lazy imports inside functions count too.
"""

import ast
from pathlib import Path

import acim_fast

ROOT = Path(acim_fast.__file__).parent
LAYER = {"common": 0, "data": 1, "engine": 1, "reward": 1, "execution": 2, "train": 3, "embedded": 4}
TOP = 5  # config, run, evaluate, report, loggers


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage, `data`, or the module itself for an entry point."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "acim_fast"


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("acim_fast"):
                found |= {f"{node.module}.{a.name}" if node.module == "acim_fast" else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("acim_fast")}
        graph[name] = found
    return graph


def test_every_subpackage_has_a_layer():
    units = {_unit(_module_name(p)) for p in ROOT.rglob("*.py")} - {"acim_fast"}
    entry_points = {u for u in units if (ROOT / f"{u}.py").is_file()} - {"data"}
    assert units - entry_points <= set(LAYER), f"subpackages without a layer: {units - entry_points - set(LAYER)}"
    assert entry_points == {"config", "run", "evaluate", "report", "loggers"}


def test_imports_flow_one_way():
    wrong = []
    for module, imported in _imports().items():
        here = _unit(module)
        for target in imported:
            there = _unit(target)
            rank_here, rank_there = LAYER.get(here, TOP), LAYER.get(there, TOP)
            if rank_there > rank_here or (rank_there == rank_here and here != there and rank_here != TOP):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _imports()
    known = set(graph)
    edges = {m: {t for t in targets if t in known and t != m} for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m, path):
        state[m] = 1
        for t in edges[m]:
            assert state.get(t) != 1, "import cycle: " + " -> ".join([*path, m, t])
            if t not in state:
                visit(t, [*path, m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
