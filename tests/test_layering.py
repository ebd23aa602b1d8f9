"""The layers, as docs/architecture.md draws them: who may import whom.  Read from the code's own imports
(every `import` and `from ... import` of a module of this project, at any depth, type-only ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (files, forbidden module prefixes, why)
SERVER_ROOMS = ("mone.server.http", "mone.server.core", "mone.server.media")
RULES = [
    ("model", ("mone.server", "mone.clients"), "the model knows no server and no client"),
    ("server/core", ("mone.server.http",), "the engine knows no wire format"),
    ("server/media", SERVER_ROOMS[:2], "decoding knows neither wire format nor engine"),
    ("server/config.py", SERVER_ROOMS, "settings stand alone"),
    ("server/errors.py", SERVER_ROOMS, "errors stand alone"),
    ("clients", ("mone.model", "mone.server"), "the client installs without torch or the server"),
]


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _files(where: str) -> list[Path]:
    path = ROOT / where
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    # clients/wire.py is a link to the server's wire models, the one shared file by design.
    return [f for f in files if not f.is_symlink() and "proto" not in f.parts]


@pytest.mark.parametrize(("where", "forbidden", "why"), RULES, ids=[r[0] for r in RULES])
def test_a_layer_imports_nothing_above_it(where: str, forbidden: tuple[str, ...], why: str) -> None:
    files = _files(where)
    assert files, where
    broken = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in files
        for line, name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert broken == [], why


def test_the_rules_see_imports() -> None:
    # The reader finds the project's imports at all (a rule over files it cannot read would pass vacuously).
    names = {name for _, name in _imports(ROOT / "server" / "core" / "engine.py")}
    assert any(name.startswith("mone.server.core.") for name in names)
    assert any(name.startswith("mone.model") for name in names)
