"""The table of `tools.bench.ratios`: issue #19's targets computed from one run's figures (medians of
the rounds), each with its reference, ratio, goal and verdict, and the table's text."""

from __future__ import annotations

import argparse
import re
import statistics

from . import lib as bl

__all__ = ["NOT_RUN", "target_rows", "render", "ratio_text"]

NOT_RUN = "skipped"
WINDOW = 10   # the consumers' window in the watch rows


def target_rows(runs: dict[str, list[float]], rates: dict[str, float], have: dict[str, str | None],
                args: argparse.Namespace) -> list[dict]:
    """One row per target. ``runs``: every figure by name, one per round (`Ratios.note`); ``rates``:
    the latency runs' put rates by commit mode; ``have``: why an optional part did not run."""
    def m(key: str) -> float | None:
        vals = runs.get(key)
        return statistics.median(vals) if vals else None

    rows: list[dict] = []

    def add(target: str, key: str, q: float | None, ref: float | None, ref_name: str, goal: str, *, unit: str,
            met: bool | None = None, why: str | None = None) -> None:
        rows.append({"target": target, "unit": unit, "qserve": q, "reference": ref, "reference_is": ref_name,
                     "ratio": q / ref if q is not None and ref else None, "goal": goal, "met": met,
                     "skipped": why, "runs": len(runs.get(key, []))})

    def at_least(q: float | None, ref: float | None, x: float) -> bool | None:
        return None if not q or not ref else q / ref >= x

    rq, rb = m("wrk qserve"), m("wrk bare")
    add("durable put c16 (wrk)", "wrk qserve", rq, rb, "bare trio+h11", ">= 0.70x", unit="req/s",
        met=at_least(rq, rb, 0.70), why=have["wrk"])
    if m("c16 writes per round") is not None:   # the group commit under that load (qserve's /metrics)
        add("  writes per fsync round", "c16 writes per round", m("c16 writes per round"), 16.0,
            "wrk's connections", "report", unit="writes")
        add("  fsync per round", "c16 fsync us per round", m("c16 fsync us per round"),
            m("fsync p50") * 1000 if m("fsync p50") is not None else None, "fsync_bench p50, servers' CPU",
            "report", unit="us")
        add("  fsync rounds' share of the wall time", "c16 fsync share", m("c16 fsync share"), None, "-",
            "report", unit="%")
    sq, sb50, f50 = m("seq qserve"), m("seq bare p50"), m("fsync p50")
    ceiling = 1000 / (sb50 + f50) if sb50 is not None and f50 is not None else None
    add("durable put seq (http.client)", "seq qserve", sq, ceiling, "1/(bare p50 + fsync p50)", ">= 0.80x",
        unit="req/s", met=at_least(sq, ceiling, 0.80))
    f50c = m("fsync p50 client cpu")
    if f50c is not None and sb50 is not None:
        add("  same, fsync measured on the client CPU", "seq qserve", sq, 1000 / (sb50 + f50c),
            "1/(bare p50 + fsync p50 there)", "report", unit="req/s")
    add("durable put seq vs Redis XADD", "redis seq", sq, m("redis seq"), "redis-py, appendfsync always", "report",
        unit="req/s", why=have["redis"])
    wq, wr = m("watch c1"), m("redis group")
    add("push+manual commit w10, 1 consumer", "watch c1", wq, wr, "redis-py XREADGROUP 10 + XACK", ">= 1.00x",
        unit="entries/s", met=at_least(wq, wr, 1.0), why=have["watch_rate"] or have["redis"])
    for what, key, ref_name in (("server process's CPU", "server_us", "redis-server's CPU"),
                                 ("  of which polling while idle", "polled_us", "(Redis does not poll)"),
                                 ("servers' CPU busy", "servers_cpu_us", "the same, Redis"),
                                 ("consumer's CPU", "client_us", "redis-py's CPU"),
                                 ("cycle (wall)", "wall_us", "Redis's cycle")):
        q, ref = m(f"cycle qserve {key}"), m(f"cycle redis {key}")
        if q is not None or ref is not None:   # none when the steady phase was shorter than the window
            add(f"  per 10 entries: {what}", f"cycle qserve {key}", q, ref, ref_name, "report", unit="us")
    budget = _cycle_budget(m)
    if budget is not None:
        add("  per 10 entries: servers' CPU at work", "cycle qserve servers_cpu_us", *budget,
            "Redis's cycle - consumer's CPU", "report", unit="us")
    add("push+manual commit w10, 4 consumers", "watch c4", m("watch c4"), wr, "redis-py XREADGROUP 10 + XACK (1)",
        "report", unit="entries/s")
    for mode in ("manual", "auto"):
        p50, p99 = m(f"lat {mode} p50"), m(f"lat {mode} p99")
        fl50, fl99 = m(f"floor {mode} p50"), m(f"floor {mode} p99")
        rate = rates.get(mode)
        at = f" at {rate:,.0f}/s" if rate else ""
        if mode == "manual":
            add(f"latency manual p50{at}", "lat manual p50", p50, fl50, "bare round trip p50", "< 1 ms", unit="ms",
                met=None if p50 is None else p50 < 1.0)
            add(f"latency manual p99{at}", "lat manual p99", p99, fl99, "bare round trip p99", "< 5 ms", unit="ms",
                met=None if p99 is None else p99 < 5.0)
            _put_row(add, m, mode)
            _at_work(add, m, mode, rate)   # a saturated server, told apart from the disk's stalls below
            _round_rows(add, m, mode, rate)
        else:
            floor = fl50 + f50 if fl50 is not None and f50 is not None else None
            add(f"latency auto p50{at}", "lat auto p50", p50, floor, "bare p50 + fsync p50", "<= 1.50x", unit="ms",
                met=None if p50 is None or floor is None else p50 <= 1.5 * floor)
            _put_row(add, m, mode)
            # what the p50 waits behind: the server's work at that rate (its idle loop's poll apart),
            # next to the bare one's at it, and the group-commit rounds, one of which each frame waits for
            cpu, polled = m("lat auto cpu us"), m("lat auto polled us")
            add("  server's CPU per put at that rate", "lat auto cpu us", cpu,
                m("floor auto cpu us"), "bare trio+h11, per request", "report", unit="us")
            if polled is not None:
                add("    of which polling while idle", "lat auto polled us", polled, None, "(the bare one does not)",
                    "report", unit="us")
            _at_work(add, m, mode, rate)
            _round_rows(add, m, mode, rate)
    rs, ram = m("reopen s"), m("ram B")
    add(f"restart, {args.reopen_entries:,} entries", "reopen s", rs, 2.0, "limit", "<= 2 s", unit="s",
        met=None if rs is None else rs <= 2.0)
    add("RAM per stored entry", "ram B", ram, 100.0, "limit", "<= 100 B", unit="B",
        met=None if ram is None else ram <= 100)
    lp = m("load probe p99")
    add(f"{args.load_connections} idle conns + {args.load_watchers} watchers: probe p99", "load probe p99", lp,
        100.0, "limit", "served, < 100 ms", unit="ms",
        met=None if lp is None else (lp < 100.0 and not runs.get("load errors", [1])[0]),
        why=None if lp is not None else have.get("load"))
    return rows


def _put_row(add, m, mode: str) -> None:
    """Under a latency row: the p50 of its puts' own answers, next to the bare round trip at the same
    rate. An auto-commit frame leaves with its put's round, so its latency is about its put's: a put
    that is itself slow to be answered waited in the server (for the loop or its round), not in the
    frame's path. A manual frame leaves before its put is durable, so it can beat its put's answer."""
    key = f"lat {mode} put p50"
    if (put := m(key)) is not None:
        add("  its puts' own answers, p50", key, put, m(f"floor {mode} p50"), "bare round trip p50", "report", unit="ms")


def _at_work(add, m, mode: str, rate: float | None) -> None:
    """Under a latency row: how busy the server's work (its CPU less the idle loop's poll) keeps it
    at that rate, next to the bare server's CPU at it."""
    cpu, polled = m(f"lat {mode} cpu us"), m(f"lat {mode} polled us")
    if cpu is not None and rate:
        add("  server's CPU at work at that rate", f"lat {mode} cpu us", (cpu - (polled or 0.0)) * rate / 1e4,
            m(f"floor {mode} busy"), "bare trio+h11, busy", "report", unit="%")


def _round_rows(add, m, mode: str, rate: float | None) -> None:
    """Under a latency row: its run's group-commit rounds over 5 ms and the longest. Every
    auto-commit frame leaves with a round; a manual frame waits for one once its window is out (a
    commit is answered when its deletes are durable), so a round longer than the window's entries
    take to arrive delays the frames behind it, past the p99 goal when it is over 5 ms."""
    if m(f"lat {mode} rounds") is None:
        return
    add("  group-commit rounds over 5 ms in the run", f"lat {mode} slow", m(f"lat {mode} slow"),
        m(f"lat {mode} rounds"), "the run's rounds", "report", unit="rounds")
    add("  the longest round, at most", f"lat {mode} longest_ms", m(f"lat {mode} longest_ms"),
        1e3 * WINDOW / rate if rate else None, f"{WINDOW} entries' arrival at that rate", "report", unit="ms")


def _cycle_budget(m) -> tuple[float, float] | None:
    """The one-consumer row in two figures: (the servers' CPU at work per cycle, what Redis's cycle
    leaves it). The consumer and the server take strict turns, so qserve's cycle is about the
    servers' CPU while busy with anything but the idle loop's poll, plus the consumer's CPU; it
    beats Redis's cycle (the row's 1.0x) when the first figure is below the second. None when a
    figure is missing."""
    busy, polled = m("cycle qserve servers_cpu_us"), m("cycle qserve polled_us")
    consumer, redis_cycle = m("cycle qserve client_us"), m("cycle redis wall_us")
    if None in (busy, consumer, redis_cycle):
        return None
    return busy - (polled or 0.0), redis_cycle - consumer


def ratio_text(ratio: float | None, goal: str) -> str:
    """The ratio as printed: two decimals, more when two would round it onto its goal's bound (a
    0.697x against ">= 0.70x" would read 0.70x beside MISSED)."""
    if ratio is None:
        return "-"
    bound = re.fullmatch(r"[<>]= ([\d.]+)x", goal)
    digits = 2
    if bound and ratio != float(bound.group(1)):
        while digits < 6 and round(ratio, digits) == float(bound.group(1)):
            digits += 1
    return f"{ratio:.{digits}f}x"


def render(rows: list[dict]) -> str:
    def fig(x, unit):
        if x is None:
            return "-"
        return bl.fmt_num(x, 2 if unit in ("ms", "s") else (1 if unit == "B" else 0))

    def verdict(r):
        if r["skipped"]:
            return f"{NOT_RUN}: {r['skipped']}"
        if r["met"] is None:
            return "report" if r["goal"] == "report" else "-"
        return "met" if r["met"] else "MISSED"

    return bl.table([[r["target"], fig(r["qserve"], r["unit"]), fig(r["reference"], r["unit"]), r["unit"],
                      r["reference_is"], ratio_text(r["ratio"], r["goal"]), r["goal"], verdict(r)]
                     for r in rows],
                    ["target", "qserve", "reference", "unit", "reference is", "ratio", "target", "verdict"])
