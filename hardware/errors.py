"""Exceptions raised by every hardware backend.

All carry a message that names the offending value and the limit or device, so
an operator reading a log at 3 a.m. knows what to fix without the source code.
"""
from __future__ import annotations

import math

# relative difference below which a value equals a limit (a few rounding steps of a double)
LIMIT_ROUNDING = 1e-12


class HardwareError(Exception):
    """Base class of every error raised by the hardware layer."""


class ConfigError(HardwareError, ValueError):
    """A microscope profile or an override is malformed (unknown key, bad type, missing file)."""


class LimitError(HardwareError, ValueError):
    """A requested setting lies outside the device's limits; nothing was sent to the device."""

    def __init__(self, quantity: str, value: float, low: float, high: float, unit: str = ""):
        self.quantity = quantity
        self.value = value
        self.low = low
        self.high = high
        self.unit = unit
        u = f" {unit}" if unit else ""
        super().__init__(f"{quantity} = {value:g}{u} is outside the limits [{low:g}, {high:g}]{u}")


class HardwareTimeoutError(HardwareError, TimeoutError):
    """A device did not complete an operation in time."""


class CommunicationError(HardwareError, ConnectionError):
    """The link to a device failed (closed socket, no answer, garbled reply)."""


class BackendError(HardwareError, RuntimeError):
    """The device answered with an error of its own (vendor error code, SCPI error queue)."""


def check_range(quantity: str, value: float, low: float, high: float, unit: str = "") -> float:
    """Return ``value`` as float if it is finite and within [low, high], else raise LimitError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LimitError(quantity, float("nan"), low, high, unit) from None
    # a limit written in other units (25 ns -> 2.5e-08 s) can come out one rounding step away from the same
    # value the caller wrote: within that the value is the limit itself, and the limit is what is set
    for bound in (low, high):
        if math.isfinite(bound) and abs(v - bound) <= LIMIT_ROUNDING * abs(bound):
            return float(bound)
    if not (low <= v <= high):  # also rejects NaN
        raise LimitError(quantity, v, low, high, unit)
    return v
