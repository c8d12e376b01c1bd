"""The tests' own layout rules, checked with `ast` on every `import` (also in functions):

- No test module imports another test module: what tests share lives in tests/helpers/ (a test
  module is a file named ``test_*.py``; importing one runs its tests' module code twice and ties
  two test files together).
- tests/unit/ starts no process and opens no socket: its files import none of `subprocess`,
  `socket`, `multiprocessing`, `http.client`, `urllib.request`, `trio_websocket`, the official SDK
  (`eas_prediction`), nor the helpers that run servers, child processes or network peers
  (`tests.helpers.process`, `inproc`, `peers`, `rawws`, `sdk`, `stream_cli`, `readme`,
  `crash_child`); and they name none of trio's networking or process calls (`open_tcp_stream`,
  `open_tcp_listeners`, `serve_tcp`, `serve_listeners`, `open_unix_socket`, `run_process`,
  `open_process`, `trio.socket`) nor `os.fork`/`os.system`. Such tests belong in tests/server/ (an
  in-process server over memory streams or loopback) or tests/process/ (real processes).

Each rule also fails on a deliberately broken fake tree, so the checker cannot pass by seeing nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

UNIT_MODULES = {"subprocess", "socket", "multiprocessing", "http.client", "urllib.request", "trio_websocket",
                "eas_prediction"}
UNIT_HELPERS = {"process", "inproc", "peers", "rawws", "sdk", "stream_cli", "readme", "crash_child"}
UNIT_NAMES = {"open_tcp_stream", "open_tcp_listeners", "serve_tcp", "serve_listeners", "open_unix_socket",
              "run_process", "open_process", "fork", "system"}


def module_of(root: Path, path: Path) -> str:
    """The dotted name pytest gives `path` (tests/ and its folders are packages; `root` holds tests/)."""
    return ".".join(path.relative_to(root).with_suffix("").parts)


def imports(root: Path, path: Path) -> list[str]:
    """Every module `path` imports, absolute; `from X import name` also yields X.name (name may be a
    module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_of(root, path).split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names]
    return found


def imports_of_test_modules(root: Path) -> list[str]:
    """'file imports module' for each import of a test module by any file under root/tests."""
    bad = []
    for path in sorted((root / "tests").rglob("*.py")):
        seen: set[str] = set()
        for name in imports(root, path):
            if any(part.startswith("test_") for part in name.split(".")) and f"imports {name}" not in seen:
                seen.add(f"imports {name}")
                bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


def unit_networking(root: Path) -> list[str]:
    """'file uses thing' for each process or network use in root/tests/unit."""
    bad = []
    for path in sorted((root / "tests" / "unit").rglob("*.py")):
        for name in imports(root, path):
            helper = name.split(".")[2] if name.startswith("tests.helpers.") else None
            if any(name == m or name.startswith(m + ".") for m in UNIT_MODULES) or helper in UNIT_HELPERS:
                bad.append(f"{path.relative_to(root)} imports {name}")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            used = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            trio_socket = (isinstance(node, ast.Attribute) and node.attr == "socket"
                           and isinstance(node.value, ast.Name) and node.value.id == "trio")
            if used in UNIT_NAMES or trio_socket:
                bad.append(f"{path.relative_to(root)} uses {'trio.socket' if trio_socket else used}")
    return bad


# -- the rules on this tree --------------------------------------------------------------------------


def test_no_test_module_imports_another():
    assert imports_of_test_modules(TESTS.parent) == []


def test_unit_tests_start_no_process_and_open_no_socket():
    assert unit_networking(TESTS.parent) == []


def test_the_layers_are_there():
    for folder in ("helpers", "unit", "server", "process"):
        assert (TESTS / folder / "__init__.py").is_file(), folder
        assert folder == "helpers" or list((TESTS / folder).rglob("test_*.py")), folder


# -- the checker on broken fake trees ----------------------------------------------------------------


def fake_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("text, expected", [
    ("from .test_b import helper\n", "tests/server/test_a.py imports tests.server.test_b"),
    ("from . import test_b\n", "tests/server/test_a.py imports tests.server.test_b"),
    ("from ..unit.test_c import x\n", "tests/server/test_a.py imports tests.unit.test_c"),
    ("import tests.unit.test_c\n", "tests/server/test_a.py imports tests.unit.test_c"),
    ("def f():\n    from .test_b import helper\n", "tests/server/test_a.py imports tests.server.test_b"),
])
def test_a_test_module_import_is_found(tmp_path, text, expected):
    root = fake_tree(tmp_path, {"tests/server/test_a.py": text, "tests/server/test_b.py": "",
                                "tests/unit/test_c.py": "", "tests/helpers/shared.py": ""})
    assert expected in imports_of_test_modules(root)


def test_helpers_imports_are_allowed(tmp_path):
    root = fake_tree(tmp_path, {"tests/server/test_a.py": "from ..helpers.shared import helper\n",
                                "tests/helpers/shared.py": "from .other import x\n"})
    assert imports_of_test_modules(root) == []


@pytest.mark.parametrize("text, expected", [
    ("import subprocess\n", "imports subprocess"),
    ("def f():\n    import socket\n", "imports socket"),
    ("from http.client import HTTPConnection\n", "imports http.client"),
    ("from ..helpers.inproc import running_server\n", "imports tests.helpers.inproc"),
    ("from ..helpers import process\n", "imports tests.helpers.process"),
    ("import trio\nasync def f():\n    await trio.open_tcp_stream('h', 1)\n", "uses open_tcp_stream"),
    ("import trio\ns = trio.socket.socket()\n", "uses trio.socket"),
    ("import trio\nasync def f():\n    await trio.run_process(['x'])\n", "uses run_process"),
])
def test_a_socket_or_process_in_unit_is_found(tmp_path, text, expected):
    root = fake_tree(tmp_path, {"tests/unit/test_a.py": text})
    assert any(line.startswith("tests/unit/test_a.py " + expected) for line in unit_networking(root)), \
        unit_networking(root)


def test_unit_may_use_storage_and_sources_helpers(tmp_path):
    root = fake_tree(tmp_path, {"tests/unit/test_a.py": "from ..helpers.storage import tiny\n"
                                                        "from ..helpers.sources import FakeSource\n"})
    assert unit_networking(root) == []
