"""qserve: a self-hosted queue server for asynchronous inference, wire-compatible with PAI-EAS.

The public API is the names in `__all__`: the client (`QueueClient`, `BlockingQueueClient`, `Entry`
and the errors they raise), `Retryable` for worker handlers and `Config` for the server's settings.
They are loaded on first use (PEP 562 `__getattr__`), so `import qserve` stays cheap: the `qserve`
command and `qserve.storage` do not pay for trio. The folders and their import rules are in the
README's "Code map".
"""

import importlib

__version__ = "0.1.0"

__all__ = ["__version__", "QueueClient", "BlockingQueueClient", "Entry", "QueueError", "ConnectError",
           "QueueTimeout", "Retryable", "Config"]

_PUBLIC = {
    "QueueClient": "qserve.client", "BlockingQueueClient": "qserve.client", "Entry": "qserve.client",
    "QueueError": "qserve.client", "ConnectError": "qserve.client", "QueueTimeout": "qserve.client",
    "Retryable": "qserve.worker", "Config": "qserve.config",
}


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'qserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
