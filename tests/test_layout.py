"""The layout is the map: its rules, checked, so that it stays one.

At most 10 modules directly in lvm/ and 14 in any other folder, no module of lvm/ or callbacks/
over 500 lines, an entry point never imports another, and ruff lints every source file (a bare
`data` exclusion once hid lvm/data/ from it).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SOURCE = ("lvm", "callbacks", "tests")


def modules(folder: Path) -> list[Path]:
    return [p for p in folder.glob("*.py") if p.name != "__init__.py"]


def test_folders_hold_few_modules_and_modules_are_short():
    folders = [p for top in SOURCE for p in [ROOT / top, *(ROOT / top).rglob("*")] if p.is_dir() and "__pycache__" not in p.parts]
    assert len(modules(ROOT / "lvm")) <= 10
    crowded = {str(f.relative_to(ROOT)): len(modules(f)) for f in folders if f != ROOT / "lvm" and len(modules(f)) > 14}
    assert not crowded, crowded
    long = {
        str(p.relative_to(ROOT)): n
        for top in ("lvm", "callbacks")
        for p in (ROOT / top).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, long


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_an_entry_point_never_imports_another():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry_points = {v.split(":")[0] for v in scripts.values()}  # the modules of the console scripts
    assert "lvm.train" in entry_points
    for name in entry_points:
        path = ROOT / (name.replace(".", "/") + ".py")
        others = {e for e in entry_points if e != name and (e in imported(path) or e.removesuffix(".__main__") in imported(path))}
        assert not others, f"{name} imports {others}"


@pytest.mark.skipif(shutil.which("ruff", path=str(Path(sys.executable).parent)) is None, reason="ruff is not installed")
def test_ruff_lints_every_source_file():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    listed = subprocess.run([ruff, "check", "--show-files", "."], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    seen = {Path(line.strip()).resolve() for line in listed.splitlines() if line.strip().endswith(".py")}
    missing = [str(p.relative_to(ROOT)) for top in SOURCE for p in (ROOT / top).rglob("*.py") if p.resolve() not in seen]
    assert not missing, f"ruff skips {missing}"
