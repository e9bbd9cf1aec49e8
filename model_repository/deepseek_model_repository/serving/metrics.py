"""The scheduler's metrics, counted in its own process and published in batches.

Every update through the Python backend's custom-metrics API is a round trip to Triton's process.
One per token (a histogram observation, a counter increment) cost the scheduler's thread about as
much time as the engine itself on CPU (bench/serving/README.md), so the scheduler counts here and
publishes what changed at most every :data:`PUBLISH_INTERVAL_S` seconds, and once it has been idle for
:data:`IDLE_PUBLISH_S`.

Histograms are kept in Prometheus's classic layout, cumulative ``_bucket`` series labelled ``le``
with ``_sum`` and ``_count``, so a batch of observations is a handful of increments, not one round
trip each. ``histogram_quantile`` reads them as any other classic histogram.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable

#: Seconds between two publications while the scheduler is busy. A publication is some 70 round trips to Triton's
#: process (a histogram's buckets are a counter each); at 0.1 s they took 4% of the scheduler's thread under load
#: (bench/serving/README.md). Prometheus scrapes every 15 to 30 s.
PUBLISH_INTERVAL_S = 1.0
#: Seconds the scheduler waits, once it has no work, before it publishes what it counted since the last publication.
#: A closed-loop client's next request comes a few milliseconds after its answer: publishing at once held that
#: request up for the publication's round trips, with the engine idle, after every request (bench/serving/README.md).
IDLE_PUBLISH_S = 0.05

#: The queue signal the autoscalers read: its series' name and help. The scheduler counts the requests that wait for a
#: KV-cache slot; the relay, in a series of its own (labelled :data:`RELAY_WAITING_LABEL`), the plain requests that
#: wait for one of its threads, so that a sum over the series counts both.
WAITING_NAME, WAITING_HELP = "requests_waiting", "Requests queued for a free KV-cache slot"
RELAY_WAITING_LABEL = {"waiting_in": "relay"}

#: Histogram buckets (seconds) of time to first token and inter-token latency.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Histogram buckets (seconds) of one engine call, a prefill or a decode step.
ENGINE_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def le_label(bound: float) -> str:
    """A bucket's ``le`` label as Prometheus' clients write it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class Histogram:
    """Observations counted into buckets here; :meth:`publish` sends the cumulative increments since the last
    publication, and keeps those it could not send for the next."""

    def __init__(self, buckets: Iterable[float]):
        bounds = sorted(float(b) for b in buckets)
        if not bounds or any(not math.isfinite(b) for b in bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram buckets must be distinct finite numbers, not {list(buckets)}")
        self.bounds = tuple(bounds) + (math.inf,)
        self._counts = [0] * len(self.bounds)  # per bucket, not cumulative, since the last publication
        self._sum = 0.0
        #: Not yet sent: each bucket's cumulative increment, the sum, the count.
        self._unsent: dict[float, int] = {}
        self._unsent_sum = 0.0
        self._unsent_count = 0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def publish(self, bucket: Callable[[float, int], None], total: Callable[[float], None],
                count: Callable[[int], None]) -> None:
        """Send what was observed since the last publication: ``bucket(bound, cumulative increment)`` for every
        bucket whose count grew, widest first, then ``total(seconds)`` and ``count(observations)``.

        Widest first: a scrape that lands between two increments still sees cumulative counts that never
        decrease with ``le``. A call that raises leaves its increment, and those after it, to the next
        publication (with what is observed meanwhile added), so that a failed publication loses no observation.
        """
        running = 0
        for bound, n in zip(self.bounds, self._counts):
            running += n
            if running:
                self._unsent[bound] = self._unsent.get(bound, 0) + running
        self._unsent_sum += self._sum
        self._unsent_count += running
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        for bound in reversed(self.bounds):
            if bound in self._unsent:
                bucket(bound, self._unsent[bound])
                del self._unsent[bound]
        if self._unsent_count:
            total(self._unsent_sum)
            self._unsent_sum = 0.0
            count(self._unsent_count)
            self._unsent_count = 0
