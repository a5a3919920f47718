"""Current meters: the ion beam current on a Faraday cup or the specimen, sampled over a milling cycle.

The milling dose and the electron irradiation are integrals of a current over
time (Simpson's rule on samples 1 s apart in the thesis), so a meter's main job
is ``sample``: readings at a fixed interval on a ``Clock``, returned as arrays.
"""
from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..clock import Clock, RealClock
from ..errors import BackendError, LimitError, check_range
from .scpi import ChoiceError, SCPIInstrument, format_number

# A reading this large is the 34400 series' overload marker, not a current.
OVERLOAD_READING = 9.9e37


class CurrentMeter(ABC):
    """Anything that reads a current in amperes."""

    @abstractmethod
    def read_current_a(self) -> float:
        """One reading, in A."""

    def sample(self, duration_s: float, interval_s: float, clock: Clock | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Read every ``interval_s`` from 0 to ``duration_s`` inclusive; return (times_s, currents_a).

        Times are measured on ``clock`` from the first reading, so they are the
        true reading times even if a reading takes part of the interval. Both
        ends are included so that the samples span the whole duration
        (an odd number of points when ``duration_s`` is an even multiple of
        ``interval_s``, which Simpson's rule integrates exactly for a quadratic).
        """
        if not (isinstance(interval_s, (int, float)) and interval_s > 0 and math.isfinite(interval_s)):
            raise LimitError("sampling interval", interval_s, 0.0, math.inf, "s")
        check_range("sampling duration", duration_s, 0.0, math.inf, "s")
        clock = clock or RealClock()
        n = int(math.floor(duration_s / interval_s + 1e-9)) + 1
        times = np.empty(n)
        currents = np.empty(n)
        start = clock.now_s()
        for i in range(n):
            wait = start + i * interval_s - clock.now_s()
            if wait > 0:
                clock.sleep(wait)
            times[i] = clock.now_s() - start
            currents[i] = self.read_current_a()
        return times, currents


def integrate_charge_c(times_s: np.ndarray, currents_a: np.ndarray) -> float:
    """Charge in C from sampled current (Simpson's rule; trapezoid for fewer than three samples)."""
    from scipy.integrate import simpson, trapezoid

    t = np.asarray(times_s, dtype=float)
    i = np.asarray(currents_a, dtype=float)
    if t.shape != i.shape or t.ndim != 1:
        raise ValueError(f"times and currents must be 1-D arrays of equal length, got {t.shape} and {i.shape}")
    if t.size < 2:
        return 0.0
    return float(simpson(i, x=t) if t.size >= 3 else trapezoid(i, x=t))


class SimulatedCurrentMeter(CurrentMeter):
    """An in-process meter reading a fixed current plus Gaussian noise (seeded)."""

    def __init__(self, current_a: float = 38e-9, noise_a: float = 0.0, seed: int = 0):
        self.current_a = float(current_a)
        self.noise_a = float(noise_a)
        self._rng = random.Random(seed)

    def read_current_a(self) -> float:
        return self.current_a + (self._rng.gauss(0.0, self.noise_a) if self.noise_a > 0 else 0.0)


class Keysight34461A(SCPIInstrument, CurrentMeter):
    """Keysight 34461A digital multimeter measuring DC current (``CONF:CURR:DC``, then ``READ?``).

    The configuration is sent once (first reading or ``configure_dc_current``)
    rather than with every reading, as ``MEAS:CURR:DC?`` would: reconfiguring
    costs an autorange cycle per reading.
    """

    expected_model = "3446"              # 34460A/61A/65A/70A share this SCPI subset
    RANGES_A = (100e-6, 1e-3, 10e-3, 100e-3, 1.0, 3.0)
    NPLC_VALUES = (0.02, 0.2, 1.0, 10.0, 100.0)

    def __init__(self, url: str, **kwargs: Any):
        self._configured = False
        super().__init__(url, **kwargs)

    def configure_dc_current(self, range_a: float | None = None, nplc: float = 1.0) -> None:
        """Measure DC current on ``range_a`` (None: autorange), integrating ``nplc`` power-line cycles."""
        if range_a is not None and range_a not in self.RANGES_A:
            raise ChoiceError("current range (A)", range_a, self.RANGES_A + (None,))
        if nplc not in self.NPLC_VALUES:
            raise ChoiceError("integration time (power-line cycles)", nplc, self.NPLC_VALUES)
        self.command("CONF:CURR:DC " + ("AUTO" if range_a is None else format_number(range_a)))
        self.command(f"CURR:DC:NPLC {format_number(nplc)}")
        self._configured = True

    def read_current_a(self) -> float:
        if not self._configured:
            self.configure_dc_current()
        value = self.query_float("READ?")
        if abs(value) >= OVERLOAD_READING / 10:
            raise BackendError(f"{self.url}: current overload (reading {value:g}); use a larger range")
        return value

    def reset(self) -> None:
        super().reset()
        self._configured = False
