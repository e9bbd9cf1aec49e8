"""Final responses sent from a thread of their own, so that the scheduler's loop does not wait on them.

A response sent through the Python backend waits until Triton's process has taken it: a round trip between two
processes, which on a busy machine takes as long as the other process needs to be scheduled. A plain request's
one response (its completion, decoded then) has nothing after it in its sequence, so the scheduler's thread hands it
here and goes on to its next step, and the send overlaps the engine's. A stream's responses stay on the scheduler's
thread, in order with each other and with its final response (bench/serving/README.md measures both).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional

log = logging.getLogger("deepseek_model_repository.responder")


class Responder:
    """Runs the jobs handed to :meth:`submit` one at a time, in that order, on one thread; :meth:`close` runs those
    still queued before it returns."""

    def __init__(self, name: str = "deepseek-responder"):
        self._jobs: queue.SimpleQueue[Optional[Callable[[], None]]] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; after :meth:`close` it runs at once, on the caller's thread (nothing is left unsent)."""
        with self._lock:  # a job queued after close's sentinel would never run
            if not self._closed:
                self._jobs.put(job)
                return
        self._call(job)

    def close(self, timeout: float = 30.0) -> None:
        """Run the jobs already queued, then stop the thread (waiting at most ``timeout`` seconds for it)."""
        with self._lock:
            self._closed = True
            self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._call(job)

    @staticmethod
    def _call(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:  # noqa: BLE001 - one response that could not be sent must not stop the others
            log.warning("a final response could not be sent", exc_info=True)
