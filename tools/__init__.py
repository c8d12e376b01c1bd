"""qserve tools: log inspection (`qserve log`), crash-recovery testing (`qserve chaos`), benchmarks.

Strategy: tools never define the storage format themselves; they read segment files with
``storage.iter_records`` (the lenient mode for inspection) and open queues with ``storage.QueueLog``.
One package per tool: ``logtool`` and ``chaos`` each have a ``cli`` module providing
``add_arguments(parser)`` and ``main(args) -> int`` for ``qserve.cli``; ``bench`` holds the
benchmarks, each run as ``python -m tools.bench.<name>`` from the repository root; ``build_pyz``
builds the one-file distribution (``python -m tools.build_pyz``).
"""
