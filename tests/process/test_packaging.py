"""Packaging: what `pip install .` puts into site-packages, and imports that agree with it.

The repository keeps `storage/` and `tools/` at its top level; they install as `qserve.storage` and
`qserve.tools` (pyproject's package-dir mapping), so nothing generic lands in site-packages and
every import, in the code and the tests, goes through the `qserve` namespace.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("qserve", "storage", "tools", "tests")


def test_the_wheel_installs_only_the_qserve_package(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--quiet", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [wheel] = tmp_path.glob("qserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"qserve"}
    assert "qserve/storage/log.py" in names and "qserve/storage/FORMAT.md" in names
    assert "qserve/tools/logtool/cli.py" in names
    assert not any(name.startswith("qserve/tests") for name in names)
    # every package of the tree is in the wheel (a package missing from pyproject's list would
    # work in an editable install and fail in a real one)
    for root, installed in (("qserve", "qserve"), ("storage", "qserve/storage"), ("tools", "qserve/tools")):
        for init in (REPO / root).rglob("__init__.py"):
            module = f"{installed}/{init.relative_to(REPO / root).as_posix()}"
            assert module in names, f"{module} is not in the wheel: add its package to pyproject.toml"


def _top_level_imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_nothing_imports_storage_or_tools_as_top_level_packages():
    bad = [f"{path.relative_to(REPO)}:{line}: import {name}"
           for folder in SOURCES for path in sorted((REPO / folder).rglob("*.py"))
           for line, name in _top_level_imports(path) if name in ("storage", "tools")]
    assert bad == []


def test_the_check_sees_a_top_level_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from storage.log import QueueLog\n")
    assert list(_top_level_imports(bad)) == [(2, "storage")]


def test_importing_qserve_imports_neither_tools_nor_a_top_level_storage():
    code = ("import sys, qserve, qserve.cli, qserve.server.server, qserve.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('storage', 'tools') "
            "or m.startswith('qserve.tools')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
