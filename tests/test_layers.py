"""The import rules of the layout, checked on the source (like trio's export tests: `ast`, no imports).

Every `import` statement counts, also one inside a function or under `if TYPE_CHECKING:`: a lazy
import still ties the two modules together. The rules:

- `storage` imports nothing of qserve or tools (it is the bottom layer);
- `qserve.core` and `qserve.wire` import neither trio nor the server, client, worker, stream or
  backends packages (they are sans-I/O and shared by all of them); nor does `qserve.signals` (the
  stop-signal counting the server and the worker share);
- `client`, `worker` and `stream` never import `server` or `backends` (they talk to a server over
  the network; `qserve serve --worker` is wired by the server side);
- nothing in qserve imports `tools` (`qserve log` and `qserve chaos` are loaded by module name by
  `qserve.cli` when they run);
- the server speaks to queues only through the backend seam (`qserve.backends.base`): no server
  module but the wiring (`server.server`, `server.embedded`) imports a backend (`backends.local`, `backends.redis`);
- in qserve only `backends.local`, `server.startup` (the data directory's lock) and
  `backends.redis.migrate` (`qserve migrate` reads a data directory into Redis) import `storage`:
  the core's errors know nothing of storage's (the local backend maps them);
- no import cycles at all.

Each rule is also run against a small broken tree in `tmp_path`, so a checker that sees nothing
cannot pass.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package name -> its directory, as pyproject's package-dir maps them
ROOTS = {"qserve": REPO / "qserve", "qserve.storage": REPO / "storage", "qserve.tools": REPO / "tools"}
TRIO = ("trio", "trio_websocket")


@dataclass(frozen=True)
class Rule:
    """Modules under `importer` may not import modules under any of `forbidden` (dotted prefixes)
    unless they are also under one of `allowed`."""
    importer: str
    forbidden: tuple[str, ...]
    why: str
    allowed: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()   # importers under `importer` the rule does not cover


SANS_IO_FORBIDDEN = (*TRIO, "qserve.server", "qserve.client", "qserve.worker", "qserve.stream",
                     "qserve.backends", "qserve.tools")
RULES = (
    Rule("qserve.storage", ("qserve", *TRIO), "storage is the bottom layer: it imports nothing of qserve or trio",
         allowed=("qserve.storage",)),
    Rule("qserve.core", SANS_IO_FORBIDDEN, "the core is sans-I/O and shared"),
    Rule("qserve.wire", SANS_IO_FORBIDDEN, "the wire format is sans-I/O and shared"),
    Rule("qserve.signals", SANS_IO_FORBIDDEN, "the stop-signal counting is shared by the server and the worker"),
    Rule("qserve.client", ("qserve.server", "qserve.backends", "qserve.tools"), "a client talks to a server over the network"),
    Rule("qserve.worker", ("qserve.server", "qserve.backends", "qserve.tools"), "a worker talks to a server over the network"),
    Rule("qserve.stream", ("qserve.server", "qserve.backends", "qserve.tools"), "`qserve stream` talks to a server over the network"),
    Rule("qserve", ("qserve.tools",), "qserve loads the tools by module name only (qserve.cli)"),
    Rule("qserve.server", ("qserve.backends.local", "qserve.backends.redis"), "the server uses queues through "
         "qserve.backends.base; only the wiring picks the backend",
         exempt=("qserve.server.server", "qserve.server.embedded")),
    Rule("qserve", ("qserve.storage",), "storage is the local backend's business (and the data directory's "
         "lock, server.startup's; and `qserve migrate`'s, which reads it into Redis)",
         exempt=("qserve.backends.local", "qserve.server.startup", "qserve.backends.redis.migrate")),
)
# modules a rule's importer prefix covers but which have their own rule or none
EXEMPT = {"qserve": ("qserve.storage", "qserve.tools")}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Every module of the given packages: dotted name -> file."""
    found = {}
    for package, directory in roots.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """What module `name` imports anywhere in its file: known modules by name, others by top package."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:   # `from pkg import module` imports that module
                child = f"{source}.{alias.name}"
                found.add(child if child in known else source)
    return {m if m in known or not m.startswith("qserve") else _nearest(m, known) for m in found}


def _nearest(module: str, known: set[str]) -> str:
    while module not in known and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    found = modules(roots)
    known = set(found)
    return {name: imports(name, path, known) - {name} for name, path in found.items()}


def violations(edges: dict[str, set[str]], rules=RULES) -> list[str]:
    """One line per import that breaks a rule."""
    out = []
    for importer, targets in sorted(edges.items()):
        for rule in rules:
            if not _under(importer, rule.importer):
                continue
            if any(_under(importer, exempt) for exempt in (*EXEMPT.get(rule.importer, ()), *rule.exempt)):
                continue
            for target in sorted(targets):
                if (any(_under(target, bad) for bad in rule.forbidden)
                        and not any(_under(target, ok) for ok in rule.allowed)):
                    out.append(f"{importer} imports {target}: {rule.why}")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles (Tarjan's strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


# --- the real tree ------------------------------------------------------------------------------

def test_the_tree_follows_the_import_rules():
    assert violations(graph(ROOTS)) == []


def test_the_tree_has_no_import_cycle():
    assert cycles(graph(ROOTS)) == []


def test_the_checker_sees_the_whole_tree():
    edges = graph(ROOTS)
    assert {"qserve.core.groups", "qserve.server.app", "qserve.storage.log", "qserve.tools.logtool"} <= set(edges)
    assert "qserve.core.groups" in edges["qserve.backends.local.queues"]


def test_importing_qserve_is_cheap():
    """`import qserve` loads neither trio nor any subpackage: the public names load on first use."""
    code = "import sys, qserve; print(sorted(m for m in sys.modules if m.startswith(('qserve.', 'trio'))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- the checker against broken trees ------------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    """A fake qserve/storage/tools tree: `files` maps "qserve/core/x.py" -> source."""
    roots = {"qserve": tmp_path / "qserve", "qserve.storage": tmp_path / "storage", "qserve.tools": tmp_path / "tools"}
    for root in roots.values():
        root.mkdir()
        (root / "__init__.py").write_text("")
    for rel, source in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents[:-2]:
            (tmp_path / parent / "__init__.py").touch()
        path.write_text(source)
    return roots


FINE = {
    "storage/log.py": "from qserve.storage import record\n",
    "storage/record.py": "import struct\n",
    "qserve/core/groups.py": "from qserve.core import tags\nfrom qserve.wire import params\n",
    "qserve/core/tags.py": "from array import array\n",
    "qserve/wire/params.py": "import re\n",
    "qserve/server/app.py": "import trio\nfrom qserve.backends import base\nfrom qserve.core import groups\n",
    "qserve/server/server.py": "from qserve.backends.local import queues\nfrom qserve.server import app\n",
    "qserve/server/startup.py": "from qserve.storage import log\n",
    "qserve/backends/base.py": "import trio\nfrom qserve.core import groups\n",
    "qserve/backends/local/queues.py": "import trio\nfrom qserve.core.groups import Dispatcher\nfrom qserve import storage\n",
    "qserve/client/http.py": "import trio\nfrom qserve.wire import params\n",
    "qserve/worker/engine.py": "from qserve.client import http\n",
    "qserve/worker/cli.py": "from qserve.signals import numbered\n",
    "qserve/signals.py": "import signal\n",
    "qserve/stream/cli.py": "from ..client import http\n",
    "qserve/cli.py": "import importlib\n\ndef run():\n    importlib.import_module('qserve.tools.logtool')\n",
    "tools/logtool.py": "from qserve.storage import log\nfrom qserve.core import groups\n",
}


def test_a_clean_fake_tree_passes(tmp_path):
    edges = graph(_tree(tmp_path, FINE))
    assert violations(edges) == [] and cycles(edges) == []
    assert edges["qserve.stream.cli"] == {"qserve.client.http"}   # relative imports resolve


@pytest.mark.parametrize("rel, source, expected", [
    ("storage/record.py", "from qserve.core import groups\n", "qserve.storage.record imports qserve.core.groups"),
    ("storage/record.py", "def f():\n    import qserve.tools.logtool\n", "qserve.storage.record imports qserve.tools.logtool"),
    ("storage/record.py", "import trio\n", "qserve.storage.record imports trio"),
    ("qserve/core/tags.py", "import trio\n", "qserve.core.tags imports trio"),
    ("qserve/core/tags.py", "def f():\n    from qserve.server import app\n", "qserve.core.tags imports qserve.server.app"),
    ("qserve/core/tags.py", "from qserve.backends.local.queues import Queue\n",
     "qserve.core.tags imports qserve.backends.local.queues"),
    ("qserve/wire/params.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qserve.client import http\n",
     "qserve.wire.params imports qserve.client.http"),
    ("qserve/wire/params.py", "from ..worker import engine\n", "qserve.wire.params imports qserve.worker.engine"),
    ("qserve/wire/params.py", "import trio_websocket\n", "qserve.wire.params imports trio_websocket"),
    ("qserve/signals.py", "from qserve.server import app\n", "qserve.signals imports qserve.server.app"),
    ("qserve/client/http.py", "from qserve.server.app import App\n", "qserve.client.http imports qserve.server.app"),
    ("qserve/worker/engine.py", "def run():\n    from qserve.server import app\n", "qserve.worker.engine imports qserve.server.app"),
    ("qserve/worker/engine.py", "from qserve.backends.local import queues\n",
     "qserve.worker.engine imports qserve.backends.local.queues"),
    ("qserve/stream/cli.py", "from ..server import app\n", "qserve.stream.cli imports qserve.server.app"),
    ("qserve/cli.py", "def run():\n    from qserve.tools import logtool\n", "qserve.cli imports qserve.tools.logtool"),
    ("qserve/server/app.py", "import qserve.tools.logtool\n", "qserve.server.app imports qserve.tools.logtool"),
    ("qserve/server/app.py", "from qserve.backends.local.queues import Queue\n",
     "qserve.server.app imports qserve.backends.local.queues"),
    ("qserve/server/app.py", "from qserve import storage\n", "qserve.server.app imports qserve.storage"),
    ("qserve/backends/base.py", "from qserve.storage import log\n", "qserve.backends.base imports qserve.storage.log"),
    ("qserve/core/tags.py", "from qserve.storage.index import next_live\n", "qserve.core.tags imports qserve.storage"),
    ("qserve/core/groups.py", "def f():\n    from qserve import storage\n", "qserve.core.groups imports qserve.storage"),
    ("qserve/wire/params.py", "import qserve.storage.log\n", "qserve.wire.params imports qserve.storage.log"),
    ("qserve/client/http.py", "from qserve.storage import log\n", "qserve.client.http imports qserve.storage.log"),
    ("qserve/cli.py", "from qserve import storage\n", "qserve.cli imports qserve.storage"),
])
def test_each_rule_fails_on_a_broken_import(tmp_path, rel, source, expected):
    edges = graph(_tree(tmp_path, {**FINE, rel: source}))
    found = violations(edges)
    assert len(found) == 1 and found[0].startswith(expected + ":"), found


@pytest.mark.parametrize("extra", [
    {"qserve/core/tags.py": "from qserve.core import groups\n"},                         # at the top
    {"qserve/core/tags.py": "def f():\n    from . import groups\n"},                       # inside a function
    {"qserve/core/tags.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import qserve.core.groups\n"},
])
def test_a_cycle_fails(tmp_path, extra):
    edges = graph(_tree(tmp_path, {**FINE, **extra}))
    assert violations(edges) == []
    assert cycles(edges) == [["qserve.core.groups", "qserve.core.tags"]]


def test_a_longer_cycle_is_reported_whole(tmp_path):
    edges = graph(_tree(tmp_path, {**FINE, "storage/record.py": "from qserve.storage import log\n"}))
    assert cycles(edges) == [["qserve.storage.log", "qserve.storage.record"]]


def test_the_public_api_loads_on_first_use():
    import qserve
    from qserve.client import BlockingQueueClient, QueueClient
    from qserve.config import Config
    from qserve.worker import Retryable

    assert (qserve.QueueClient, qserve.BlockingQueueClient, qserve.Config, qserve.Retryable) == (
        QueueClient, BlockingQueueClient, Config, Retryable)
    assert set(qserve.__all__) <= set(dir(qserve)) | {"__version__"}
    with pytest.raises(AttributeError):
        qserve.nothing_here


def test_qserve_serve_imports_no_other_subcommand():
    """The parser for `qserve serve --help` imports none of the other subcommands' modules."""
    code = ("import sys\nfrom qserve import cli\ncli.build_parser('serve')\n"
            "print(sorted(m for m in sys.modules if m.startswith(('qserve.tools', 'qserve.stream', "
            "'qserve.worker', 'qserve.client', 'trio'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
