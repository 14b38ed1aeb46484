"""The package's layout is its architecture: a few top-level modules beside the rooms
(``cli``, ``config``, ``runs``, ``trainer``, ``teacher``, ``analysis``, ``data``, ``models``,
``losses``, ``distillers``, ``lit``), and no room imports another room's private names."""

import ast
from pathlib import Path

import kdlight

PACKAGE = Path(kdlight.__file__).resolve().parent


def room_of(module: str) -> str:
    """``kdlight.teacher.find`` -> ``teacher``; a top-level module is its own room."""
    return module.split(".")[1]


def test_the_top_level_holds_at_most_six_modules_besides_the_rooms():
    modules = sorted(path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert len(modules) <= 6, modules


def test_no_room_imports_another_rooms_private_names():
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = ".".join(("kdlight", *path.relative_to(PACKAGE).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                "kdlight."
            ):
                continue
            private = [alias.name for alias in node.names if alias.name.startswith("_")]
            if private and room_of(node.module) != room_of(here):
                crossings.append(f"{here} imports {private} from {node.module}")
    assert not crossings, "\n".join(crossings)
