"""A solve's wall-clock allowance, handed down to every step so that `time_limit` holds for the whole solve."""

from __future__ import annotations

import time


class Deadline:
    """Seconds left of a time limit counted from creation (None: no limit)."""

    def __init__(self, time_limit: float | None = None) -> None:
        self.time_limit = time_limit
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the solve began."""
        return time.perf_counter() - self.start

    def remaining(self, share: float = 1.0) -> float | None:
        """`share` of the seconds left (at least 10 ms, so a back end still returns its start), None without a
        limit."""
        if self.time_limit is None:
            return None
        return max(0.01, share * (self.time_limit - self.elapsed()))

    def expired(self) -> bool:
        """Whether the limit has passed."""
        return self.time_limit is not None and self.elapsed() >= self.time_limit

    def split(self, share: float) -> "Deadline":
        """A deadline for a sub-step that may spend `share` of what is left."""
        return Deadline(self.remaining(share))


UNLIMITED = Deadline()  # the default of steps that may also run on their own, without a limit
