"""The package's modules import each other without a cycle and only downwards through its layers,
counting imports inside functions too."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

PACKAGE = Path(__file__).resolve().parent.parent / "samcl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the samcl modules it imports anywhere in its body (a package's own parents,
    which Python imports implicitly, are left out)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level else []
                root = ".".join(base + ([node.module] if node.module else []))
                targets = [root] + [f"{root}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(n: str) -> List[str]:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        path.pop()
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # the graph is read from the code: opening a run builds release models through a factory it hands over
    assert "samcl.release.folder" in graph["samcl.opening"] and "samcl.opening" not in graph["samcl.release.folder"]
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


# The package's layers, lowest first: a module imports only from its own layer and the ones below.
# A name ending in ".*" takes every module of that package; an exact name wins over it.
Layers = Sequence[Tuple[str, Sequence[str]]]
LAYERS: Layers = (
    # settings, files, data, points, metrics and losses, the selector, drawing: no model, no method
    ("base", ("samcl", "samcl.bounded", "samcl.config", "samcl.data", "samcl.distributed", "samcl.feature_cache",
              "samcl.heatmap", "samcl.io", "samcl.lock", "samcl.losses", "samcl.metrics", "samcl.pictures",
              "samcl.points", "samcl.precision", "samcl.registry", "samcl.routing", "samcl.selector",
              "samcl.settings")),
    # the frozen SAM / SAM 2 models: the only readers of segment_anything and sam2
    ("backbones", ("samcl.backbones", "samcl.backbones.*")),
    # the learning modules, which act inside a backbone
    ("learning_modules", ("samcl.learning_modules", "samcl.learning_modules.*")),
    # the model (backbone + modules + selector), its files, the loaders, the evaluation, the training step
    ("model", ("samcl.model", "samcl.run_folder", "samcl.loading", "samcl.evaluation", "samcl.training_step",
               "samcl.replay", "samcl.memory_blocks", "samcl.memory")),
    # the library: methods, the protocol, runs (train, resume, test, open), the release format, prediction
    ("library", ("samcl.methods", "samcl.methods.*", "samcl.continual", "samcl.run_state", "samcl.plugins",
                 "samcl.opening", "samcl.pipeline", "samcl.predictor", "samcl.release", "samcl.release.*")),
    # the shared flags, device choice and exits of the command line
    ("cli", ("samcl.cli",)),
    # what a user runs: the scripts and commands, python -m samcl.<name>
    ("commands", ("samcl.commands", "samcl.commands.*", "samcl.scripts", "samcl.predict", "samcl.demo",
                  "samcl.compare", "samcl.datacheck", "samcl.sweep", "samcl.sweep_grid", "samcl.sweep_launch",
                  "samcl.sweep_status", "samcl.sweep_estimate", "samcl.sweep_plan", "samcl.weights", "samcl.app",
                  "samcl.release.__main__")),
)


def layer_of(name: str, layers: Layers) -> Optional[int]:
    """Index of ``name``'s layer: its exact entry, else the longest package entry ("pkg.*") above it."""
    exact = [k for k, (_, names) in enumerate(layers) if name in names]
    if exact:
        return exact[0]
    packages = [(len(n), k) for k, (_, names) in enumerate(layers) for n in names
                if n.endswith(".*") and name.startswith(n[:-1])]
    return max(packages)[1] if packages else None


def unclassified(graph: Dict[str, Set[str]], layers: Layers) -> List[str]:
    return sorted(n for n in graph if layer_of(n, layers) is None)


def upward_imports(graph: Dict[str, Set[str]], layers: Layers) -> List[str]:
    """Every import of a module from a higher layer than its own, as "a (layer) imports b (layer)"."""
    found = []
    for a in sorted(graph):
        la = layer_of(a, layers)
        for b in sorted(graph[a]):
            lb = layer_of(b, layers)
            if la is not None and lb is not None and lb > la:
                found.append(f"{a} ({layers[la][0]}) imports {b} ({layers[lb][0]})")
    return found


def reachable(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    """The modules ``start`` imports, directly or through others."""
    seen: Set[str] = set()
    todo = list(graph[start])
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(graph.get(n, ()))
    return seen


def test_every_module_has_a_layer_and_imports_none_above_it():
    graph = import_graph()
    names = [n for _, ns in LAYERS for n in ns]
    assert len(names) == len(set(names)), "a module is named in two layers"
    assert unclassified(graph, LAYERS) == [], "give these modules a layer in LAYERS"
    assert upward_imports(graph, LAYERS) == []


def test_the_predictor_imports_no_command_line():
    """The library's predictor, directly or through any module it imports, reaches neither the
    command line's helpers nor a command (samcl.predict is the command that uses it)."""
    reach = reachable(import_graph(), "samcl.predictor")
    assert "samcl.opening" in reach and "samcl.backbones.base" in reach  # what it does import
    cli = layer_of("samcl.cli", LAYERS)
    assert sorted(n for n in reach if layer_of(n, LAYERS) is None or layer_of(n, LAYERS) >= cli) == []


def test_only_the_backbones_import_segment_anything_and_sam2():
    """The installed SAM packages are read in samcl/backbones alone; a module that needs a block's
    computation asks its backbone (e.g. Backbone.prefixed_attention)."""
    readers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(r.split(".")[0] in ("segment_anything", "sam2") for r in roots):
                readers.add(module_name(path))
    assert readers and all(layer_of(n, LAYERS) == 1 for n in readers), sorted(readers)


def test_the_layer_checker_reports_a_planted_violation():
    layers = (("low", ("p", "p.low")), ("mid", ("p.mid.*", "p.mid.up")), ("high", ("p.high", "p.mid.top")))
    graph = {"p": set(), "p.low": {"p.mid.a"}, "p.mid.a": {"p.low", "p.mid.up"}, "p.mid.up": {"p.mid.top"},
             "p.mid.top": {"p.mid.a"}, "p.high": {"p.low"}, "p.new": {"p.low"}}
    assert [layer_of(n, layers) for n in ("p", "p.mid.a", "p.mid.up", "p.mid.top", "p.new")] == [0, 1, 1, 2, None]
    assert unclassified(graph, layers) == ["p.new"]
    assert upward_imports(graph, layers) == ["p.low (low) imports p.mid.a (mid)",
                                             "p.mid.up (mid) imports p.mid.top (high)"]
    assert reachable(graph, "p.high") == {"p.low", "p.mid.a", "p.mid.up", "p.mid.top"}
    assert reachable(graph, "p") == set()
