"""The import rule of docs/ARCHITECTURE.md, checked on the source: every import (also the ones
inside functions) goes to a module of the same layer or of a layer below.

The layers, lowest first (a module belongs to the first layer with a matching prefix):

    verify vocabulary   verify.spec, verify.errors, verify.deadline, verify.certificate,
                        verify.resources, verify.options
    verify loading      verify.vnnlib, verify.onnx_import, verify.onnx_composite, verify.onnx_argmax, verify.graph_functions,
                        verify.model
    verify base         verify.attack (the one falsifier), verify.confirm (the user's check),
                        verify.status_rule, verify.registry
    relax.ir            the bound graph, its op rules, pruning, the dense view
    relax.bounds        interval / CROWN / alpha-CROWN, round-off;  relax.solvers (LP/MILP backends)
    relax.exact         LP, MILP, SDP;  relax.lipschitz
    relax.bab           branch-and-bound (ReLU / activation splitting, input splitting, tightening)
    relax.methods       the registered deterministic methods
    smoothing           probabilistic certificates (beside relax: neither imports the other)
    verify front door   everything else in verify (api, cli, instance, vnncomp, report, ...)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("verify", "relax", "smoothing")

# (layer name, module prefixes); lowest first. Modules in one tuple share a layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("verify vocabulary", ("verify.spec", "verify.errors", "verify.deadline", "verify.certificate",
                           "verify.resources", "verify.options", "verify.precision", "verify.placement")),
    ("verify loading", ("verify.vnnlib", "verify.onnx_import", "verify.onnx_composite", "verify.onnx_argmax", "verify.graph_functions",
                        "verify.model")),
    ("verify base", ("verify.surrogate", "verify.attack", "verify.confirm", "verify.status_rule", "verify.registry")),
    ("relax.ir", ("relax.ir",)),
    ("relax.bounds", ("relax.bounds", "relax.solvers")),
    ("relax.exact", ("relax.exact", "relax.lipschitz")),
    ("relax.bab", ("relax.bab",)),
    ("relax.methods", ("relax.methods",)),
    ("smoothing", ("smoothing",)),
    ("verify front door", ("verify",)),
]
# relax and smoothing are siblings: neither may import the other
SIBLINGS = {("relax", "smoothing"), ("smoothing", "relax")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports (``from pkg import sub`` counts ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py and docs")


def _violations(modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in modules.items():
        if name in PACKAGES:  # a package's __init__ may re-export what it holds
            continue
        for target in sorted(_imports(name, path, modules)):
            if target in PACKAGES and target != name.split(".")[0]:
                bad.append(f"{name} imports the package {target}")
                continue
            if target in PACKAGES:
                continue
            if (name.split(".")[0], target.split(".")[0]) in SIBLINGS:
                bad.append(f"{name} imports {target} (relax and smoothing are siblings)")
            elif layer_of(target) > layer_of(name):
                bad.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    return bad


def test_every_import_goes_down_or_sideways():
    assert _violations(_sources()) == []


def test_every_module_has_a_layer():
    for name in _sources():
        if name not in PACKAGES:
            layer_of(name)


def test_the_rule_catches_upward_and_sibling_imports(tmp_path):
    """The checker itself: an engine module importing the front door, or smoothing, is reported;
    a function-level import counts as much as a top-level one."""
    engine = tmp_path / "graph.py"
    engine.write_text("from verify.spec import LpBall\n\ndef f():\n    from verify.cli import main\n"
                      "    import smoothing.noise\n")
    other = tmp_path / "other.py"
    other.write_text("")
    modules = {"relax.ir.graph": engine, "verify.cli": other, "smoothing.noise": other, "verify.spec": other}
    assert sorted(_violations(modules)) == [
        "relax.ir.graph (relax.ir) imports verify.cli (verify front door)",
        "relax.ir.graph imports smoothing.noise (relax and smoothing are siblings)",
    ]


@pytest.mark.parametrize("module", ["relax.bounds.crown", "relax.bab.activation_split", "verify.attack"])
def test_known_modules_sit_in_their_layer(module):
    assert module in _sources()


def test_the_architecture_page_shows_every_layer():
    """docs/ARCHITECTURE.md's diagram names the layers this test enforces."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    diagram = page[page.index("**The import rule**"):]
    for name, _ in LAYERS:
        assert name in diagram, f"layer {name!r} missing from the diagram in docs/ARCHITECTURE.md"


#: the longest function (lines from ``def`` to its end, docstring included) the packages may hold
MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_the_limit():
    """Functions stay short enough to read in one screen: split by the algorithm's stages."""
    long = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over the limit: " + "; ".join(long)
