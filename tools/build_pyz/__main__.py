"""Build ``dist/qserve.pyz``: qserve and its runtime dependencies in one file (a shiv zipapp).

    python -m tools.build_pyz                          # from the repository root: dist/qserve.pyz
    python -m tools.build_pyz --output /tmp/qserve.pyz
    python -m tools.build_pyz --python /usr/bin/python3.11   # the file's #! line

Steps: copy the source tree pyproject builds from (pyproject.toml, the README, the package
directories it maps) to a temporary directory, so that a ``build/`` left in the checkout cannot slip
deleted modules into the file; ``pip install --target`` it, with this Python, which installs what
pyproject's ``dependencies`` name (network: the package registry, or pip's cache); check that this
Python can load every compiled module pip chose; zip it with shiv (``pip install -e '.[pyz]'``
installs shiv) with the entry point ``qserve.cli:main``, the preamble, and ``--extend-pythonpath``
(``serve --processes N`` starts its processes as ``python -m qserve``: they find qserve through
PYTHONPATH); write the file next to the output and rename it into place.

shiv rather than stdlib zipapp: zipimport cannot load the compiled modules (msgpack, coredis), so
the file must unpack itself somewhere at its first run, once, safely when several processes start
at the same time, and find that copy again by a hash of its contents; shiv's bootstrap does exactly
that and is well kept, where a bootstrap of our own would repeat it.

Output: pip's and shiv's own messages on stderr; one line on stdout: the file, its size, the build
time and the Python it is for. A failure is one line on stderr (after the failing tool's output)
and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

from .preamble import extension_tags, foreign

REPO = Path(__file__).resolve().parents[2]
PREAMBLE = Path(__file__).resolve().with_name("preamble.py")
ENTRY_POINT = "qserve.cli:main"


class BuildError(Exception):
    """A step failed; the message is the one line to print."""


def copy_sources(repo: Path, dest: Path) -> None:
    """Copy into ``dest`` what pip builds qserve from: pyproject.toml, its readme, licence files and
    the directories of ``[tool.setuptools.package-dir]`` (without bytecode)."""
    pyproject = repo / "pyproject.toml"
    if not pyproject.is_file():
        raise BuildError(f"no pyproject.toml in {repo}: run it from a checkout of qserve")
    meta = tomllib.loads(pyproject.read_text())
    files = ["pyproject.toml", meta["project"]["readme"], *(p.name for p in repo.glob("LICEN[CS]E*"))]
    for name in files:
        shutil.copy2(repo / name, dest / name)
    for folder in sorted(set(meta["tool"]["setuptools"]["package-dir"].values())):
        shutil.copytree(repo / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run(step: str, command: list[str]) -> None:
    """Run a build tool, its output passed through; a non-zero exit is a `BuildError`."""
    rc = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise BuildError(f"{step} failed (exit status {rc}; its messages are above)")


def this_python() -> str:
    """The kind of machine a file built here runs on, in words: 'CPython 3.11 on linux-x86_64'."""
    return (f"{platform.python_implementation()} {sys.version_info.major}.{sys.version_info.minor}"
            f" on {sysconfig.get_platform()}")


def build(output: Path, shebang: str) -> dict[str, str]:
    """Build ``output``; returns the ABI tags of its compiled modules (`preamble.extension_tags`)."""
    if importlib.util.find_spec("shiv") is None:
        raise BuildError("shiv is not installed in this Python: pip install -e '.[pyz]'")
    with tempfile.TemporaryDirectory(prefix="qserve-pyz-") as tmp:
        source, site = Path(tmp, "source"), Path(tmp, "site-packages")
        source.mkdir()
        copy_sources(REPO, source)
        print(f"build_pyz: installing qserve and its dependencies with {sys.executable}", file=sys.stderr)
        run("pip install", [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "--no-compile", "--no-warn-script-location", "--target", str(site), str(source)])
        shutil.rmtree(site / "bin", ignore_errors=True)   # console scripts whose #! is this venv's Python
        unloadable = foreign(site)
        if unloadable:
            raise BuildError(f"pip installed compiled modules this Python cannot load: {sorted(unloadable.values())}")
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:
            run("shiv", [sys.executable, "-m", "shiv", "--site-packages", str(site), "--entry-point", ENTRY_POINT,
                         "--output-file", str(partial), "--python", shebang, "--compressed",
                         "--extend-pythonpath", "--preamble", str(PREAMBLE)])
            os.replace(partial, output)
        finally:
            partial.unlink(missing_ok=True)
        return extension_tags(site)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.build_pyz", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=REPO / "dist" / "qserve.pyz",
                   help="the file to write (default: dist/qserve.pyz in the checkout)")
    p.add_argument("--python", default="/usr/bin/env python3",
                   help="the interpreter of the file's #! line (default: /usr/bin/env python3)")
    args = p.parse_args(argv)
    started = time.monotonic()
    try:
        tags = build(args.output, args.python)
    except BuildError as exc:
        print(f"build_pyz: {exc}", file=sys.stderr)
        return 1
    size = args.output.stat().st_size
    print(f"{args.output}: {size / 1e6:.1f} MB, built in {time.monotonic() - started:.0f} s, for {this_python()}"
          f" (compiled modules: {', '.join(sorted(tags)) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
