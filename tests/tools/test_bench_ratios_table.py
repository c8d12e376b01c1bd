"""`tools.bench.ratios_table`: how the ratios tool prints a ratio beside its verdict, and the rows it
derives from one run's figures (no server)."""

import argparse

import pytest

from qserve.tools.bench.ratios_table import ratio_text, target_rows


@pytest.mark.parametrize("ratio, goal, shown", [
    (0.697, ">= 0.70x", "0.697x"),        # two decimals would read 0.70x beside MISSED
    (0.69995, ">= 0.70x", "0.6999x"),     # ... and three 0.700x
    (0.7, ">= 0.70x", "0.70x"),           # on the bound: met, as printed
    (0.7049, ">= 0.70x", "0.705x"),       # met, but 0.70x would look like the bound itself
    (0.71, ">= 0.70x", "0.71x"),
    (0.9961, ">= 1.00x", "0.996x"),
    (1.503, "<= 1.50x", "1.503x"),
    (1.48, "<= 1.50x", "1.48x"),
    (0.4567, "report", "0.46x"),          # no bound: two decimals
    (None, ">= 0.70x", "-"),
])
def test_a_ratio_shows_which_side_of_its_goal_it_is_on(ratio, goal, shown):
    assert ratio_text(ratio, goal) == shown


def _rows(runs):
    args = argparse.Namespace(reopen_entries=1000, load_connections=10, load_watchers=2)
    have = {"wrk": None, "redis": None, "watch_rate": None, "load": None}
    return {r["target"].strip(): r for r in target_rows(runs, {}, have, args)}


def test_the_one_consumer_cycle_is_set_against_what_redis_leaves_the_servers():
    runs = {"watch c1": [9000.0], "redis group": [8500.0],
            "cycle qserve servers_cpu_us": [1060.0, 1070.0, 1080.0], "cycle qserve polled_us": [460.0],
            "cycle qserve client_us": [490.0], "cycle redis wall_us": [1100.0, 1190.0, 1200.0]}
    row = _rows(runs)["per 10 entries: servers' CPU at work"]
    assert (row["qserve"], row["reference"]) == (1070.0 - 460.0, 1190.0 - 490.0)
    assert row["ratio"] < 1 and row["goal"] == "report"


def test_no_cycle_figures_no_budget_row():
    rows = _rows({"watch c1": [9000.0], "redis group": [8500.0]})
    assert "per 10 entries: servers' CPU at work" not in rows
    assert rows["push+manual commit w10, 1 consumer"]["ratio"] == 9000.0 / 8500.0


def test_each_latency_rows_work_is_its_cpu_less_the_idle_poll_and_it_has_its_rounds():
    runs = {"lat auto p50": [0.8], "lat auto cpu us": [400.0, 420.0, 440.0], "lat auto polled us": [200.0],
            "floor auto busy": [35.0], "lat auto rounds": [4000.0], "lat auto slow": [3.0],
            "lat auto longest_ms": [50.0], "lat manual p99": [9.0], "lat manual rounds": [900.0],
            "lat manual slow": [2.0], "lat manual longest_ms": [25.0], "lat manual cpu us": [380.0],
            "lat manual polled us": [30.0], "floor manual busy": [40.0]}
    rows = target_rows(runs, {"auto": 2000.0, "manual": 2500.0}, {"wrk": None, "redis": None, "watch_rate": None,
                                                                      "load": None},
                       argparse.Namespace(reopen_entries=1000, load_connections=10, load_watchers=2))
    named = [(r["target"].strip(), r) for r in rows]
    work = [r for name, r in named if name == "server's CPU at work at that rate"]   # manual, then auto
    assert [(r["qserve"], r["reference"]) for r in work] == [((380.0 - 30.0) * 2500.0 / 1e4, 40.0),
                                                             ((420.0 - 200.0) * 2000.0 / 1e4, 35.0)]
    rounds = [r for name, r in named if name == "group-commit rounds over 5 ms in the run"]
    assert [(r["qserve"], r["reference"]) for r in rounds] == [(2.0, 900.0), (3.0, 4000.0)]   # manual, then auto
    longest = [r for name, r in named if name == "the longest round, at most"]
    assert [(r["qserve"], r["reference"]) for r in longest] == [(25.0, 4.0), (50.0, 5.0)]   # vs 10 entries' arrival


def test_each_latency_row_has_its_puts_own_answers_against_the_bare_round_trip():
    """Under each latency row, its puts' answer p50 beside the bare round trip at that rate: an
    auto-commit frame waits for its put's round, so a slow put answer says where the time went."""
    runs = {"lat manual p50": [0.5], "lat manual p99": [1.0], "lat manual put p50": [1.1, 1.3, 1.2],
            "floor manual p50": [0.29], "lat auto p50": [1.2], "lat auto put p50": [1.0, 1.4, 1.1],
            "floor auto p50": [0.3, 0.31, 0.28]}
    rows = target_rows(runs, {"auto": 3000.0, "manual": 3000.0}, {"wrk": None, "redis": None, "watch_rate": None,
                                                                      "load": None},
                       argparse.Namespace(reopen_entries=1000, load_connections=10, load_watchers=2))
    names = [r["target"].strip() for r in rows]
    puts = [r for r in rows if r["target"].strip() == "its puts' own answers, p50"]
    assert [(r["qserve"], r["reference"], r["goal"]) for r in puts] == [(1.2, 0.29, "report"), (1.1, 0.3, "report")]
    # each right under its own mode's rows: manual's after its p99, auto's after its p50
    under = [names[i - 1] for i, name in enumerate(names) if name == "its puts' own answers, p50"]
    assert [u.split(" at ")[0] for u in under] == ["latency manual p99", "latency auto p50"]
