"""A token bucket shared by every thread of a run."""

from __future__ import annotations

import threading
import time
from typing import Callable


class TokenBucket:
    """Allow at most ``rate`` acquisitions a second, ``burst`` of them back to back.

    A caller that finds the bucket empty reserves the next free slot (the bucket goes into
    debt) and sleeps outside the lock until it comes, so waiting threads are served in the
    order they arrived and none of them holds the lock while sleeping.

    Args:
        rate: acquisitions a second; must be positive.
        burst: acquisitions allowed back to back after an idle spell. The default of 1 spaces
            requests evenly, the safest reading of an API's "N requests a second".
        clock: a monotonic clock (injectable for tests).
        sleep: how to wait (injectable for tests).
    """

    def __init__(
        self,
        rate: float,
        burst: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not rate or rate <= 0:
            raise ValueError(f"rate must be a positive number of requests a second, got {rate!r}")
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()

    def acquire(self) -> float:
        """Take one token, waiting for it if needed; return the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
