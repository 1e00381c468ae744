"""The shape of the package: imports run one way, no circle, no import inside a function, small functions."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"

#: layers, lowest first: a module imports only modules of its own or a lower layer
LAYERS = [
    {"config", "distributed", "data", "compiling"},
    {"networks", "likelihoods", "guides", "priors", "particles", "score_function"},
    {"vae", "hierarchical"},
    {"conditional", "semisupervised"},
    {"objectives", "objectives.kl", "objectives.bounds", "objectives.base", "objectives.elbo",
     "objectives.analytic_kl", "objectives.renyi", "objectives.iwae", "objectives.fisher"},
    {"evaluation"},
    {"analysis"},
    {"training"},
    {"runs", "user_model"},
    {"plots"},
    {"studies", "studies.gradient_variance"},
    {"cli"},
    {"__init__"},
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}
MAX_FUNCTION_LINES = 60


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        yield name, path, ast.parse(path.read_text())


def _target(module: str, path: Path, node) -> list[str]:
    """The pyro_vae modules an import statement names (relative or absolute)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            stem = base + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "pyro_vae":
            stem = node.module.split(".")[1:]
        else:
            return []
        names = [".".join(stem + [a.name]) for a in node.names]
        found = [n for n in names if n in LAYER]
        return found or ([".".join(stem)] if stem else [])
    return [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("pyro_vae.")]


def _edges():
    for module, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _target(module, path, node):
                    yield module, target, node


def test_every_module_has_a_layer():
    assert {m for m, _, _ in _modules()} <= set(LAYER), "add new modules to LAYERS"


def test_imports_run_one_way():
    upward = [f"{m} -> {t}" for m, t, _ in _edges() if t in LAYER and LAYER[t] > LAYER[m]]
    assert not upward, upward


def test_the_import_graph_has_no_circle():
    graph = {}
    for m, t, _ in _edges():
        if t in LAYER and t != m:
            graph.setdefault(m, set()).add(t)
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != "open", " -> ".join(stack + [node, nxt])
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in list(graph):
        if node not in state:
            visit(node, [])


def test_no_import_of_the_package_inside_a_function():
    late = []
    for module, path, tree in _modules():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _target(module, path, node):
                        late.append(f"{module}.{fn.name}")
    assert not late, late


@pytest.mark.parametrize("module, path, tree", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_functions_are_small(module, path, tree):
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long
