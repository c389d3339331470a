"""Durations and the pace of a pass, as a person reads them."""

import math

from orchestrator.timing import PassRate, format_rate, format_seconds


def test_a_pass_rate_leaves_out_the_wait_for_the_first_result_and_blocks_read_right_after_it():
    pace = PassRate(total=74)
    rate, left = pace.update(2, now=130.0)  # the first block, 30 s of actor start-up after the pass began
    assert math.isnan(rate) and math.isnan(left) and format_seconds(left) == "?" and format_rate(rate) == "?"
    assert math.isnan(pace.update(50, now=130.5)[0])  # blocks the driver reads at once: no pace yet
    rate, left = pace.update(34, now=134.0)  # 32 more items in 4 s
    assert rate == 8.0 and left == 5.0 and format_seconds(left) == "0m05s" and format_rate(rate) == "8.00"
    assert pace.update(34, now=135.0)[0] == 32 / 5  # no new item: the rate slows, the ETA holds what is known
    assert math.isnan(PassRate(10).update(0, now=1.0)[0])


def test_durations_read_as_minutes_and_seconds_or_hours_and_minutes():
    assert format_seconds(65.4) == "1m05s" and format_seconds(3725) == "1h02m" and format_seconds(-3) == "0m00s"
    assert format_seconds(math.inf) == "?"
