"""The scheduler's local histogram: what it hands to Triton's counters is a classic cumulative histogram."""

import math

import pytest

from deepseek_model_repository.serving.metrics import Histogram, le_label


def test_take_hands_cumulative_increments_widest_first_then_starts_again():
    h = Histogram([0.01, 0.1, 1.0])
    for value in (0.005, 0.01, 0.05, 2.0):  # 0.01 is in its own bucket: le means <=
        h.observe(value)
    increments, total, count = h.take()
    assert increments == [(math.inf, 4), (1.0, 3), (0.1, 3), (0.01, 2)]
    assert total == pytest.approx(2.065) and count == 4
    assert h.take() == ([], 0.0, 0)
    h.observe(0.5)
    assert h.take() == ([(math.inf, 1), (1.0, 1)], 0.5, 1)


def test_le_labels_are_written_as_prometheus_clients_write_them():
    assert [le_label(b) for b in Histogram([0.005, 1, 30]).bounds] == ["0.005", "1.0", "30.0", "+Inf"]


@pytest.mark.parametrize("buckets", [[], [0.1, 0.1], [0.1, math.inf], [math.nan]])
def test_bad_buckets_are_refused(buckets):
    with pytest.raises(ValueError, match="distinct finite"):
        Histogram(buckets)
