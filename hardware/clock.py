"""Clocks: every duration in the hardware layer runs on one of these.

A ``VirtualClock`` lets a ten-hour campaign on the simulated microscope run in
minutes: ``sleep`` advances time instead of waiting.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod


class Clock(ABC):
    @abstractmethod
    def now_s(self) -> float:
        """Seconds since an arbitrary, fixed origin."""

    @abstractmethod
    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass."""

    @property
    def is_virtual(self) -> bool:
        return False


class RealClock(Clock):
    def now_s(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class VirtualClock(Clock):
    """Simulated time; thread-safe so a daemon thread and the scheduler can share it."""

    def __init__(self, start_s: float = 0.0):
        self._t = float(start_s)
        self._lock = threading.Lock()

    def now_s(self) -> float:
        with self._lock:
            return self._t

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot sleep a negative duration ({seconds} s)")
        with self._lock:
            self._t += float(seconds)

    @property
    def is_virtual(self) -> bool:
        return True


def make_clock(kind: str) -> Clock:
    if kind == "virtual":
        return VirtualClock()
    if kind == "real":
        return RealClock()
    raise ValueError(f"clock must be 'virtual' or 'real', not {kind!r}")
