"""The package's layers: the core never imports the application or anything above it, the application never
imports the demos, commands, API or CLI, and no module imports itself back through a cycle."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "selfalign_jax"
LAYERS = {"core": 0, "app": 1, "demos": 2, "commands": 3, "api": 3, "cli": 4}  # a module may import only lower floors


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "selfalign_jax" else None


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    """Every selfalign_jax module `path` imports, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("selfalign_jax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("selfalign_jax"):
            out += [f"{node.module}.{a.name}" if node.module == "selfalign_jax" else node.module for a in node.names]
    return out


FILES = sorted(p for p in PKG.rglob("*.py") if _layer(_module(p)) is not None)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_down_the_layers(path):
    floor = _layer(_module(path))
    up = [m for m in _imports(path) if (_layer(m) or 0) > floor]
    assert not up, f"{path.relative_to(PKG)} (layer {floor}) imports a higher layer: {up}"


def test_the_layers_cover_the_package():
    """Every module but the package face sits in a layer, so the rule above sees all of them."""
    loose = [p.name for p in PKG.glob("*.py") if p.name != "__init__.py" and _layer(_module(p)) is None]
    assert not loose, f"modules outside the layers {sorted(LAYERS)}: {loose}"
    assert len(FILES) > 40


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from selfalign_jax.app import isara\nimport selfalign_jax.cli\n")
    assert [m for m in _imports(bad) if (_layer(m) or 0) > 0] == ["selfalign_jax.app", "selfalign_jax.cli"]
