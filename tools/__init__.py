"""qserve tools: log inspection (`qserve log`), crash-recovery testing, benchmarks.

Strategy: tools never define the storage format themselves; they read segment files with
``storage.iter_records`` (the lenient mode for inspection) and open queues with ``storage.QueueLog``.
Each command module provides ``add_arguments(parser)`` and ``main(args) -> int`` for ``qserve.cli``.
"""
