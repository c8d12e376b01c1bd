"""qserve: a self-hosted queue server for asynchronous inference, wire-compatible with PAI-EAS.

Layers (imports flow one way): `storage` (the segment log, no I/O framework) <- the sans-I/O core
(`events`, `routing`, `params`, `protobuf`, `groups`) <- the trio edge (`http`, `queues`, `app`,
`watch`, `server`) <- the command line (`cli`).
"""

__version__ = "0.1.0"
