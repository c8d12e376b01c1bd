"""What `qserve chaos` prints: progress lines on stderr, and the summary as a table or one JSON object.

The summary is a plain dict (the ``--json`` output): the run's shape (seed, rounds, nodes, the
backend with its password masked), what was killed, what the workload did and what the checker
found (`checker.Report`; with ``--policies`` also the dead letters, duplicate answers, delayed
negative commits, deliveries after a lease ran out, late commits, and poison entries acknowledged
and not dead-lettered), and ``ok``: nothing lost, resurrected, duplicated, reordered, corrupted or
poison left, and, on the local backend, the log verified clean (on Redis there is no log to
verify: ``verify`` is ``n/a`` there).
"""

from __future__ import annotations

import sys

from qserve.config import redact_url

from .checker import Report
from .workload import Counters, Settings

__all__ = ["say", "summarize", "format_table"]


def say(text: str) -> None:
    """A progress line on stderr."""
    print(f"qserve chaos: {text}", file=sys.stderr, flush=True)


def summarize(rep: Report, counters: Counters, settings: Settings, seconds: float, *, kills: int,
              restarts: int, verify: bool, backend: str = "") -> dict:
    """The summary of a run. ``verify``: the local log was verified (else ``verify`` is ``n/a``);
    ``backend``: the Redis URL the nodes used ("" for the local backend)."""
    if not verify:
        shown = "n/a"
    else:
        shown = "clean" if not counters.verify_problems else f"{len(counters.verify_problems)} problems"
    return {
        "seed": settings.seed, "rounds": settings.rounds, "seconds_per_round": settings.seconds,
        "backend": redact_url(backend) if backend else "local", "nodes": settings.nodes,
        "kills": kills, "kill_kinds": dict(counters.kill_kinds), "restarts": restarts,
        "puts_acknowledged": rep.puts_acked, "puts_unknown": rep.puts_unknown, "unknown_found": rep.unknown_found,
        "deliveries": rep.deliveries, "redeliveries": rep.redeliveries, "commits": rep.commits,
        "negatives": rep.negatives, "deletes": rep.deletes, "truncates": rep.truncates,
        "disconnects": counters.disconnects, "moves": counters.moves, "remaining": rep.remaining, "lost": rep.lost,
        "resurrected": rep.resurrected, "duplicates_index": rep.duplicates_index, "out_of_order": rep.out_of_order,
        "corrupted": rep.corrupted, "reused_unacknowledged": rep.reused, "torn_tails": counters.torn_tails,
        "policies": settings.policies, "dead_lettered": rep.dead_lettered,
        "duplicate_answers": rep.duplicate_answers, "delayed_negatives": rep.delayed_negatives,
        "lease_timeouts": rep.lease_timeouts, "poison_puts": rep.poison_puts, "poison": rep.poison,
        "late_commits": rep.late_commits,
        "verify": shown, "verify_problems": counters.verify_problems, "problems": rep.problems,
        "elapsed_seconds": round(seconds, 1), "ok": rep.ok and not counters.verify_problems,
    }


_ROWS = [("rounds", "rounds"), ("kills", "kills"), ("puts acknowledged", "puts_acknowledged"),
         ("puts unknown", "puts_unknown"), ("  of them found", "unknown_found"), ("deliveries", "deliveries"),
         ("redeliveries", "redeliveries"), ("commits", "commits"), ("negatives", "negatives"),
         ("deletes", "deletes"), ("truncates", "truncates"), ("disconnects", "disconnects"),
         ("left at the end", "remaining"), ("lost", "lost"), ("resurrected", "resurrected"),
         ("duplicates-index", "duplicates_index"), ("out-of-order", "out_of_order"), ("corrupted", "corrupted"),
         ("torn tails", "torn_tails"), ("verify", "verify")]
_MOVES = ("moves to a node", "moves")   # shown after "disconnects" with several nodes
_POLICY_ROWS = [("dead-lettered", "dead_lettered"), ("duplicate answers", "duplicate_answers"),
                ("delayed negatives", "delayed_negatives"), ("lease timeouts", "lease_timeouts"),
                ("late commits", "late_commits"), ("poison acked", "poison_puts"),
                ("poison", "poison")]   # with --policies, before "lost"


def format_table(s: dict) -> list[str]:
    """The summary as aligned ``name  value`` lines, then the evidence of any failure."""
    kinds = ", ".join(f"{k} {v}" for k, v in s["kill_kinds"].items())
    where = f"  {s['nodes']} nodes on {s['backend']}" if s["backend"] != "local" else ""
    lines = [f"qserve chaos  seed {s['seed']}  {s['rounds']} rounds x {s['seconds_per_round']:g}s{where}  "
             f"({s['elapsed_seconds']:g}s)"]
    rows = list(_ROWS)
    if s["backend"] != "local":
        rows.insert(rows.index(("disconnects", "disconnects")) + 1, _MOVES)
        rows.remove(("torn tails", "torn_tails"))
    if s["policies"]:
        at = rows.index(("lost", "lost"))
        rows[at:at] = _POLICY_ROWS
    for label, key in rows:
        value = f"{s[key]}  ({kinds})" if key == "kills" else str(s[key])
        lines.append(f"  {label:<18} {value}")
    lines.append("  result             " + ("OK" if s["ok"] else "FAILED"))
    lines += [f"  ! {p}" for p in s["verify_problems"] + s["problems"]]
    if "data_dir" in s:
        lines.append(f"  data kept in {s['data_dir']}")
    return lines
