"""`tools.bench.ratios_table`: how the ratios tool prints a ratio beside its verdict (no server)."""

import pytest

from qserve.tools.bench.ratios_table import ratio_text


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
