"""The package's shape: layers import downwards only, no import circles, trainer never imports app,
app never imports the training loop, and every subpackage ships in a wheel."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each layer may import itself and the layers listed after it (its inputs), nothing else.
LAYERS = {
    "trainer.cli": ["trainer.training", "trainer.demo", "trainer.evals", "trainer.inference", "trainer.core"],
    "trainer.training": ["trainer.demo", "trainer.evals", "trainer.inference", "trainer.core"],
    "trainer.demo": ["trainer.evals", "trainer.core"],
    "trainer.evals": ["trainer.inference", "trainer.core"],
    "trainer.inference": ["trainer.core"],
    "trainer.core": [],
}
APP_MAY_USE = ("trainer.core", "trainer.inference", "trainer.evals", "trainer.cli.args",
               "trainer.training.plan", "trainer.training.metrics")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every trainer/app module a file imports, at the top or inside a function:
    `from trainer.core import catalog` imports trainer.core.catalog, `from trainer.core.catalog import X`
    imports trainer.core.catalog."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found.update(subs or {node.module})
    return found & modules


def graph() -> dict[str, set[str]]:
    files = [p for d in ("trainer", "app") for p in (ROOT / d).rglob("*.py")]
    paths = {module_name(p): p for p in files}
    return {name: imports(p, set(paths)) - {name} for name, p in paths.items()}


def layer_of(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def test_layers_import_downwards_only():
    wrong = []
    for module, deps in graph().items():
        layer = layer_of(module)
        if layer is None:
            continue
        allowed = (layer, *LAYERS[layer])
        wrong += [f"{module} -> {d}" for d in deps
                  if d.startswith("trainer") and d != "trainer" and layer_of(d) not in allowed]
    assert not wrong, "upward or sideways imports:\n" + "\n".join(sorted(wrong))


def test_trainer_never_imports_app_and_app_never_imports_the_loop():
    g = graph()
    assert not [f"{m} -> {d}" for m, deps in g.items() if m.startswith("trainer") for d in deps if d.startswith("app")]
    bad = [f"{m} -> {d}" for m, deps in g.items() if m.startswith("app") for d in deps
           if d.startswith("trainer.") and not d.startswith(APP_MAY_USE)]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    g = graph()
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        seen[node] = 1
        for dep in sorted(g.get(node, ())):
            if seen.get(dep) == 1:
                return path + [node, dep]
            if dep not in seen and (cycle := visit(dep, path + [node])):
                return cycle
        seen[node] = 2
        return None

    for start in sorted(g):
        if start not in seen and (cycle := visit(start, [])):
            pytest.fail("import circle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


def test_every_subpackage_is_in_the_wheel_and_says_what_it_holds():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for init in (ROOT / "trainer").rglob("__init__.py"):
        name = module_name(init)
        assert name in listed, f"{name} is missing from pyproject.toml's packages"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert name == "trainer" or (doc and len(doc) > 20), f"{init}: a one-line docstring says what it holds"
