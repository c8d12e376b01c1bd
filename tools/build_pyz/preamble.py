"""Runs inside ``qserve.pyz`` before qserve is imported (shiv's preamble, given ``site_packages``):
refuse, in one line, a Python that cannot load the file's compiled modules, rather than fail later
with an ImportError from deep inside a dependency.

The build imports `extension_tags` to say which Python the file is for.
"""

from __future__ import annotations

import importlib.machinery
import re
import sys
from pathlib import Path

# the ABI tag of an extension module's file name: msgpack/_cmsgpack.cpython-311-x86_64-linux-gnu.so
_TAGGED = re.compile(r"(\.(?:cpython|pypy|graalpy|abi3)[^./]*\.(?:so|pyd))$")


def extension_tags(site: Path) -> dict[str, str]:
    """The ABI-tagged suffixes of the extension modules under ``site``, each with one module that has
    it (for the message). Untagged shared libraries (a wheel's vendored ``.so``) are not modules."""
    tags: dict[str, str] = {}
    # a package's module names its owner better than a top-level blob (mypyc's): those first
    for name in sorted((p.relative_to(site).as_posix() for p in site.rglob("*")), key=lambda n: ("/" not in n, n)):
        m = _TAGGED.search(name)
        if m:
            tags.setdefault(m.group(1), name)
    return tags


def foreign(site: Path) -> dict[str, str]:
    """The tags of `extension_tags` that this Python cannot import."""
    loadable = set(importlib.machinery.EXTENSION_SUFFIXES)
    return {tag: module for tag, module in extension_tags(site).items() if tag not in loadable}


if __name__ == "__main__":
    unloadable = foreign(Path(globals()["site_packages"]))   # shiv's runtime passes it in
    if unloadable:
        tag, module = next(iter(unloadable.items()))
        sys.exit(f"qserve.pyz: its compiled modules are for {tag[1:].rsplit('.', 1)[0]} ({module}), which "
                 f"Python {sys.version.split()[0]} at {sys.executable} cannot load: run it with the Python it "
                 f"was built with, or build one on this machine (python -m tools.build_pyz)")
