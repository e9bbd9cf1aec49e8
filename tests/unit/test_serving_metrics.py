"""The scheduler's local histogram: what it hands to Triton's counters is a classic cumulative histogram."""

import math

import pytest

from deepseek_model_repository.serving.metrics import Histogram, le_label


class Sent:
    """What a publication handed on, in order; ``fail_at``: the bucket bound, or "total" or "count", whose send
    raises (once)."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def _send(self, what, *value):
        if what == self.fail_at:
            self.fail_at = None
            raise RuntimeError("the metrics port is gone")
        self.calls.append((what, *value))

    def publish(self, h):
        h.publish(lambda bound, n: self._send(bound, n), lambda s: self._send("total", s),
                  lambda n: self._send("count", n))


def test_a_publication_hands_cumulative_increments_widest_first_then_starts_again():
    h = Histogram([0.01, 0.1, 1.0])
    for value in (0.005, 0.01, 0.05, 2.0):  # 0.01 is in its own bucket: le means <=
        h.observe(value)
    sent = Sent()
    sent.publish(h)
    assert sent.calls == [(math.inf, 4), (1.0, 3), (0.1, 3), (0.01, 2), ("total", pytest.approx(2.065)),
                          ("count", 4)]
    sent.calls.clear()
    sent.publish(h)
    assert sent.calls == []
    h.observe(0.5)
    sent.publish(h)
    assert sent.calls == [(math.inf, 1), (1.0, 1), ("total", 0.5), ("count", 1)]


@pytest.mark.parametrize("fail_at", [math.inf, 0.1, "total", "count"])
def test_a_failed_publication_loses_no_observation(fail_at):
    """What a failing send left unsent goes out with the next publication, added to what came meanwhile; what
    went out is not sent again."""
    h = Histogram([0.01, 0.1, 1.0])
    for value in (0.005, 0.05, 2.0):
        h.observe(value)
    sent = Sent(fail_at)
    with pytest.raises(RuntimeError, match="gone"):
        sent.publish(h)
    h.observe(0.05)
    sent.publish(h)
    totals = {}
    for what, value in sent.calls:
        totals[what] = totals.get(what, 0) + value
    # Everything published over both, as if neither had failed: 4 observations, 2 of them at or below 0.1.
    assert totals == {math.inf: 4, 1.0: 3, 0.1: 3, 0.01: 1, "total": pytest.approx(2.105), "count": 4}


def test_le_labels_are_written_as_prometheus_clients_write_them():
    assert [le_label(b) for b in Histogram([0.005, 1, 30]).bounds] == ["0.005", "1.0", "30.0", "+Inf"]


@pytest.mark.parametrize("buckets", [[], [0.1, 0.1], [0.1, math.inf], [math.nan]])
def test_bad_buckets_are_refused(buckets):
    with pytest.raises(ValueError, match="distinct finite"):
        Histogram(buckets)
