"""Progress that reads well in `kubectl logs`: one line per event, a timestamp, the stage, no carriage returns."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Iterator, Optional

STAGES = ("resolve", "download", "load", "merge", "export", "check", "engine", "repository")


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Progress:
    """Times each stage and prints ``2026-01-01T10:00:00Z [build] export: started`` lines."""

    def __init__(self, log: Optional[Callable[[str], None]] = None):
        self.log = log or _stderr_line
        self.timings: dict[str, float] = {}
        self.current: Optional[str] = None

    def say(self, message: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        where = f" {self.current}:" if self.current else ""
        self.log(f"{stamp} [build]{where} {message}")

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        outer, self.current = self.current, name
        self.say(f"started{' - ' + detail if detail else ''}")
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - start, 3)
            self.say(f"failed after {time.monotonic() - start:.1f}s")
            self.current = outer
            raise
        elapsed = time.monotonic() - start
        self.timings[name] = round(self.timings.get(name, 0.0) + elapsed, 3)
        self.say(f"done in {elapsed:.1f}s")
        self.current = outer
