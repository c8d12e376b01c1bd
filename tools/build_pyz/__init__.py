"""One-file distribution: ``python -m tools.build_pyz`` builds ``dist/qserve.pyz``, qserve and every
runtime dependency in one executable zip (a shiv zipapp) that ``python3 qserve.pyz serve`` runs with
nothing installed but Python.

Strategy: pip installs qserve from a copy of the source tree (its own metadata, so the file holds
exactly pyproject's runtime dependencies) into a staging directory; shiv zips that directory with
its bootstrap. Some dependencies are compiled (msgpack, coredis), and Python cannot import an
extension module from inside a zip, so at its first run the file unpacks itself into a cache
directory (``~/.shiv``, or ``$SHIV_ROOT``), keyed by a hash of its contents, and runs from there;
later runs reuse it. The compiled modules tie the file to the build machine's kind: its Python
version, OS and architecture (``preamble`` refuses, in one line, a Python that cannot load them).
"""
