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


PACKAGE = MODELS.parent
ROOMS = ("models", "io", "config", "parallel", "data", "method", "attack", "evaluation", "cli")
# Which rooms each room may import (docs/architecture.md draws the same map; its "known crossings" are the
# entries against the order models -> io/config/parallel -> data -> method/attack/evaluation -> cli).
ALLOWED = {
    "models": set(),
    "io": {"models", "method", "parallel", "config"},
    "config": {"models", "data", "method"},
    "parallel": {"models", "method", "config"},
    "data": {"models", "io", "method", "evaluation"},
    "method": {"models", "io", "config", "parallel", "data", "evaluation"},
    "evaluation": {"models", "io", "config", "parallel", "data", "method"},
    "attack": {"models", "io", "config", "parallel", "data", "method", "evaluation"},
    "cli": {"models", "io", "config", "parallel", "data", "method", "attack", "evaluation", "pipeline"},
}


def test_package_is_rooms():
    """Modules live in rooms by purpose; at the top only the package's face and the end-to-end job."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "pipeline.py"], top
    rooms = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert rooms == sorted(ROOMS), rooms


def test_rooms_import_only_what_the_map_allows():
    crossings = {}
    for room in ROOMS:
        for f in sorted((PACKAGE / room).glob("*.py")):
            used = {m.split(".")[1] for m in _imported_modules(f) if m.startswith("beear_jax.")}
            extra = used - ALLOWED[room] - {room}
            if extra:
                crossings[f"{room}/{f.name}"] = sorted(extra)
    assert not crossings, f"imports the map (tests/test_layers.py ALLOWED, docs/architecture.md) does not allow: {crossings}"


MAX_LINES = 400


def test_long_modules_say_why():
    """No module over ~400 lines without a reason: its docstring has a sentence starting "Over 400 lines:"."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        if len(text.splitlines()) <= MAX_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if "Over 400 lines:" not in " ".join(docstring.split()):
            unexplained.append(f"{name} ({len(text.splitlines())} lines)")
    assert not unexplained, f"split these modules, or say why in their docstring ('Over 400 lines: ...'): {unexplained}"
