"""Clocks shared by every layer: when this process started, and durations as a person reads them."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path


def process_start_time() -> float | None:
    """When this process started (epoch seconds, ~10 ms), to time a worker's start-up; None off Linux."""
    try:
        # field 22 of /proc/self/stat: start time in clock ticks since boot
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def format_seconds(seconds: float) -> str:
    """An ETA or duration as "1h05m" / "3m07s" ("?" when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def format_rate(rate: float) -> str:
    """Items per second as "12.34" ("?" when unknown)."""
    return f"{rate:.2f}" if math.isfinite(rate) else "?"


class PassRate:
    """Items per second and the ETA of a pass over `total` items, measured from its first result on.

    The wait for the first result is the actors' start-up (model loading; tens of seconds on a loaded
    machine), not the pace of the pass: counted in, it made a 35 s evaluation say "ETA 19m52s" after
    its first block. Results that come in less than `min_seconds` after the first (blocks the driver
    reads one after another once they are done) say nothing of the pace either ("62920 items/s"): until
    then the rate and the ETA are unknown (nan).
    """

    def __init__(self, total: int, min_seconds: float = 2.0):
        self.total = total
        self.min_seconds = min_seconds
        self.first: tuple[float, int] | None = None  # (when, items done) at the first result

    def update(self, done: int, now: float | None = None) -> tuple[float, float]:
        """(items per second, seconds left) once `done` items are finished."""
        now = time.time() if now is None else now
        if self.first is None:
            self.first = (now, done)
        since, done_then = self.first
        if now - since < self.min_seconds or done <= done_then:
            return math.nan, math.nan
        rate = (done - done_then) / (now - since)
        return rate, (self.total - done) / rate
