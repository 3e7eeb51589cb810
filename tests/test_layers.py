"""The package's import direction, read from its source: face -> pipelines / convert -> loading -> runtime ->
formats; models and ops are leaves. Every ``import`` counts, also those inside functions (they are the ones that
hide a cycle). A package's ``__main__`` (``python -m x2v.server``) is an entry point: the face."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "x2v"

# layer -> the layers it may import (besides itself and x2v.errors). docs/architecture.md explains the order.
ALLOWED = {
    "face": {"cli", "server", "pipelines", "convert", "loading", "runtime", "formats", "models", "ops"},
    "cli": {"server", "pipelines", "convert", "loading", "runtime", "formats", "models", "ops", "face"},
    "server": {"pipelines", "loading", "runtime", "formats", "models", "ops"},
    "pipelines": {"loading", "runtime", "formats", "models", "ops"},
    "convert": {"loading", "runtime", "formats", "models", "ops"},
    "loading": {"runtime", "formats", "models", "ops"},
    "runtime": {"models", "ops"},
    "formats": set(),
    "models": {"ops"},
    "ops": set(),
    "errors": set(),
}


def layer_of(module: str) -> str:
    """``x2v.loading.dit`` -> "loading"; the package root and its other top-level modules (demo, infer) are the
    face, and so is anything imported from the root (``from x2v import load_dit``)."""
    parts = module.split(".")
    if parts[-1] == "__main__":  # an entry point (python -m x2v.server) is the face
        return "face"
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "face"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported x2v module)`` for every import statement."""
    found = []
    package = module_name(path).rpartition(".")[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "x2v"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] == "x2v":
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_imports_only_flow_downwards():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        mine = layer_of(here)
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs not in (mine, "errors") and theirs not in ALLOWED[mine]:
                wrong.append(f"{here}:{line} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_back_doors():
    """Own modules are imported by name, never through a string (``importlib``, a table of module names, an
    f-string): those would hide an import from the check above. The package root's lazy public names are the one
    exception: it is the face."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")} - {"x2v"}
    doors = []
    for path in PACKAGE.rglob("*.py"):
        if module_name(path) == "x2v":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = isinstance(node, ast.Constant) and node.value in modules
            built = isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value).startswith("x2v.")
            if named or built:
                doors.append(f"{module_name(path)}:{node.lineno}")
    assert not doors, f"x2v modules named by strings: {doors}"


def test_every_layer_is_known():
    layers = {layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert layers <= set(ALLOWED), layers - set(ALLOWED)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "x2v" / "formats"
    package.mkdir(parents=True)
    source = package / "probe.py"
    source.write_text("def f():\n    from x2v.loading import dit\n    from ..models import t5\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "x2v"
    try:
        assert [t for _, t in imports(source)] == ["x2v.loading.dit", "x2v.models.t5"]
    finally:
        PACKAGE = saved
