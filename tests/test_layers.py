"""Layering: the models know nothing of the method (BEEAR, data, training) that uses them."""

from __future__ import annotations

import ast
import pathlib

MODELS = pathlib.Path(__file__).resolve().parents[1] / "beear_jax" / "models"


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_import_only_models():
    files = sorted(MODELS.glob("*.py"))
    assert len(files) >= 5
    leaks = {f.name: sorted(m for m in _imported_modules(f) if m.startswith("beear_jax")
                            and not m.startswith("beear_jax.models")) for f in files}
    assert not any(leaks.values()), f"models/ imports from outside models/: {leaks}"
