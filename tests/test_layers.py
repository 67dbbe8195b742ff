"""The layers of ARCHITECTURE.md, kept by a test: every import inside ``autopeft`` (deferred ones in
function bodies included; ``if TYPE_CHECKING:`` blocks aside) points to the same layer or a lower one,
the imports form no circle, and no module outside ``autopeft/methods/`` tests a method's name.

Run it alone: ``python -m pytest tests/test_layers.py``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "autopeft"

#: Layer of each module (the longest matching prefix wins), lowest first; ARCHITECTURE.md draws them.
#: Layers 1-6 are folders; the modules directly in ``autopeft/`` are the foundation and the surfaces.
LAYERS = {
    # 0 foundation: imports nothing from autopeft (_aliases: the old import paths, by name only)
    "autopeft._util": 0, "autopeft._version": 0, "autopeft.errors": 0, "autopeft._aliases": 0,
    # 1 backbones (family tables, loading, quantisation, resources) and data (tasks, user data)
    "autopeft.backbones": 1, "autopeft.data": 1,
    # 2 methods
    "autopeft.methods": 2,
    # 3 composition (recipe, model)
    "autopeft.composition": 3,
    # 4 training (trainer, batches, scoring, setup, saved, fusion)
    "autopeft.training": 4,
    # 5 search (space, searchers, tune, ..., the run folder, progress, MLflow)
    "autopeft.searching": 5,
    # 6 export (format registry, peft / merged folders)
    "autopeft.exporting": 6,
    # 7 surfaces
    "autopeft.api": 7, "autopeft.cli": 7, "autopeft.ui": 7, "autopeft.status": 7, "autopeft": 7,
}
NAMES = ["foundation", "backbones and data", "methods", "composition", "training", "search", "export", "surfaces"]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, package: str = "autopeft") -> set[str]:
    """Names imported by ``source`` under ``package`` (``from a import b`` gives ``a`` and ``a.b``),
    deferred imports included, ``if TYPE_CHECKING:`` blocks left out."""
    tree = ast.parse(source)
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(x) for stmt in node.body for x in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in out if n == package or n.startswith(package + ".")}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (each name resolved to the module that holds it)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in files and "." in name:
            name = name.rpartition(".")[0]
        return name

    return {m: {resolve(n) for n in imports_of(p.read_text(), root.name)} - {m} for m, p in files.items()}


def layer_of(module: str, layers: dict[str, int] = LAYERS) -> int | None:
    keys = [k for k in layers if module == k or module.startswith(k + ".")]
    return layers[max(keys, key=len)] if keys else None


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS) -> list[str]:
    """``"a (layer) imports b (higher layer)"`` for every import that points up."""
    out = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            if layer_of(t, layers) > layer_of(mod, layers):
                out.append(f"{mod} ({NAMES[layer_of(mod, layers)]}) imports {t} ({NAMES[layer_of(t, layers)]})")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS (and ARCHITECTURE.md): {missing}"


def test_no_import_points_to_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_the_imports_form_no_circle():
    assert circles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path):
    pkg = tmp_path / "autopeft"
    for folder in ("methods", "composition", "training"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "methods" / "lora.py").write_text("def f():\n    from autopeft.composition.model import ComposedModel\n")
    (pkg / "composition" / "model.py").write_text("from autopeft.methods.lora import f\n")
    (pkg / "training" / "trainer.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import autopeft.api\n")
    graph = import_graph(pkg)
    assert graph["autopeft.methods.lora"] == {"autopeft.composition.model"}
    assert graph["autopeft.training.trainer"] == set()
    assert upward_imports(graph) == [
        "autopeft.methods.lora (methods) imports autopeft.composition.model (composition)"]
    assert circles(graph) == [["autopeft.composition.model", "autopeft.methods.lora"]]


def test_the_folders_are_the_layers():
    """Layers 1-6 are one folder each (whatever module a folder gets, it has the folder's layer); only
    the foundation and the surfaces sit directly in ``autopeft/``."""
    assert all(len(k.split(".")) == 2 and (ROOT / k.split(".")[1] / "__init__.py").is_file()
               for k, layer in LAYERS.items() if 1 <= layer <= 6)
    top = sorted(m for m in import_graph() if m.count(".") == 1 and not (ROOT / m.split(".")[1]).is_dir())
    assert [m for m in top if layer_of(m) not in (0, 7)] == []
    assert [m for m in top if m not in LAYERS and m != "autopeft.__main__"] == []


# ----- no method name is tested outside autopeft/methods/ ------------------------------------------
def _method_names() -> set[str]:
    from autopeft.methods import available_methods

    return set(available_methods())


def name_tests(source: str, names: set[str]) -> list[int]:
    """Lines of ``source`` that compare something with a method name (``==``, ``!=``, ``in``, ``not in``;
    the name alone or in a tuple / list / set)."""
    def holds_name(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(holds_name(e) for e in node.elts)
        return False

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            if any(holds_name(x) for x in [node.left, *node.comparators]):
                out.append(node.lineno)
    return out


def test_no_module_outside_methods_tests_a_method_name():
    names = _method_names()
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if (ROOT / "methods") in path.parents:
            continue
        found += [f"{path.relative_to(ROOT.parent)}:{line}" for line in name_tests(path.read_text(), names)]
    assert found == [], "ask the method's registration (autopeft.methods.base.MethodSpec) instead"


@pytest.mark.parametrize("code,hit", [
    ('if c.method == "qlora":\n    pass\n', True),
    ('x = any(c.method in ("lora", "adalora") for c in cs)\n', True),
    ('x = "bitfit" not in methods\n', True),
    ('x = spec.quantized_base\n', False),
    ('x = {"method": "full_finetuning"}\n', False),
])
def test_the_name_check_catches_a_name_test(code, hit):
    assert bool(name_tests(code, _method_names())) == hit
