"""The installed names: the folders model/, server/ and clients/ are the packages `mone.model`, `mone.server`
and `mone.clients`, so that installing mone-serve never shadows another distribution's `model` or `server`."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("model", "server", "clients")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk() -> set[str]:
    found = set()
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found.add(".".join(("mone", *rel.parts)))
    return found


def test_every_package_folder_is_installed_under_mone() -> None:
    setup = PYPROJECT["tool"]["setuptools"]
    assert setup["package-dir"] == {f"mone.{f}": f for f in FOLDERS}
    assert set(setup["packages"]) == _packages_on_disk()


def test_the_namespace_links_name_the_folders() -> None:
    for folder in FOLDERS:
        link = ROOT / ".namespace" / "mone" / folder
        assert link.is_symlink(), link
        assert link.resolve() == (ROOT / folder).resolve()


def _imports(path: Path) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
    return names


def test_no_code_imports_the_bare_folder_names() -> None:
    # `import server` from a checkout would load a second copy of the package under another name.
    bare = []
    for top in (*FOLDERS, "bench", "tests", "scripts"):
        for path in (ROOT / top).rglob("*.py"):
            if "proto" in path.parts or path.is_symlink():
                continue
            for line, name in _imports(path):
                if name.split(".")[0] in FOLDERS:
                    bare.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert bare == []


def test_no_process_is_started_under_a_bare_folder_name() -> None:
    # `python -m server` from a checkout runs the folder as a package named `server`, beside `mone.server`.
    bare = []
    for top in (*FOLDERS, "bench", "tests", "scripts", "docker", "docs"):
        for path in (ROOT / top).rglob("*"):
            if path.suffix not in {".py", ".sh", ".md", ".yaml", ".yml", ""} or not path.is_file():
                continue
            if "proto" in path.parts or "runs" in path.parts:
                continue
            text = path.read_text(errors="replace")
            for name in FOLDERS:
                for bad in (f'"-m", "{name}', f"-m {name}.", f"-m {name} ", f'"-m",\n        "{name}"'):
                    if bad in text:
                        bare.append(f"{path.relative_to(ROOT)}: {bad!r}")
    assert bare == []


@pytest.mark.slow
def test_the_wheel_holds_only_the_mone_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("mone_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"mone", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "mone/__init__.py" not in names  # a namespace package, shared with mone-client
    for wanted in (
        "mone/server/http/app.py",
        "mone/server/http/proto/inference.proto",
        "mone/model/vit.py",
        "mone/clients/web/index.html",
    ):
        assert wanted in names, wanted
