"""Benchmarks and the load test, each run from the repository root as ``python -m tools.bench.<name>``.

``http`` (puts/gets against a bare trio+h11 server), ``watch`` (watch throughput and put -> receive
latency), ``storage`` (appends per fsync policy, drain, reopen), ``waiters`` (puts while clients
long-poll) and ``load`` (many connections, watchers, slow-loris) print a table and the targets they
meet or miss; ``bare`` is the baseline server they compare qserve with; ``lib``, ``drive``,
``client``, ``ws``, ``watch_parts``, ``watch_latency`` and ``load_clients`` are their parts.
"""
