"""Emulator of a Keysight 34461A multimeter measuring DC current (the SCPI subset ``Keysight34461A`` uses).

It reads a configurable current plus seeded Gaussian noise, so a test or the
simulated ion gun can set the beam current the meter will see
(``set_current_a``). Autorange picks the smallest range that holds the current;
a fixed range too small for it reads the overload marker ``+9.90000000E+37``.

Run as a process: ``python -m hardware.instruments.emulator_34461a --port 5025 --current-a 38e-9``.
"""
from __future__ import annotations

import random
import sys
from typing import Iterable

from .emulator_base import (DATA_OUT_OF_RANGE, ILLEGAL_PARAMETER_VALUE, EmulatorServer, HandlerFn, ScpiCommandError, ScpiDevice,
                            parse_numeric, run_main)

IDENTITY_34461A = "Keysight Technologies,34461A,MY00000000,A.02.14-02.40-02.14-00.49-01-01"
RANGES_A = (100e-6, 1e-3, 10e-3, 100e-3, 1.0, 3.0)
NPLC_VALUES = (0.02, 0.2, 1.0, 10.0, 100.0)
OVERRANGE = 1.2                      # readings up to 120 % of the range are valid
OVERLOAD = 9.9e37


def _reading(value: float) -> str:
    return f"{value:+.8E}"


class Keysight34461AEmulator(ScpiDevice):
    """Multimeter state machine: DC voltage after reset (as the real one), DC current once configured."""

    identity = IDENTITY_34461A

    def __init__(self, current_a: float = 38e-9, noise_a: float = 0.0, seed: int = 0):
        self._current_a = float(current_a)
        self._noise_a = float(noise_a)
        self._rng = random.Random(seed)
        self.readings = 0
        self.reset_state()
        super().__init__()

    def reset_state(self) -> None:
        self.function = "VOLT"
        self.range_a: float | None = None        # None: autorange
        self.nplc = 10.0

    def set_current_a(self, current_a: float, noise_a: float | None = None) -> None:
        with self.lock:
            self._current_a = float(current_a)
            if noise_a is not None:
                self._noise_a = float(noise_a)

    def commands(self) -> Iterable[tuple[str, HandlerFn]]:
        return [
            ("CONFigure:CURRent[:DC]", self._configure),
            ("CONFigure?", self._conf_query),
            ("MEASure:CURRent[:DC]?", self._measure),
            ("READ?", lambda g, a: self._read()),
            ("[SENSe:]CURRent[:DC]:NPLCycles", self._set_nplc),
            ("[SENSe:]CURRent[:DC]:NPLCycles?", lambda g, a: f"{self.nplc:+.8E}"),
            ("[SENSe:]CURRent[:DC]:RANGe", lambda g, a: self._set_range(a)),
            ("[SENSe:]CURRent[:DC]:RANGe?", lambda g, a: _reading(self._effective_range())),
        ]

    def _set_range(self, args: str) -> None:
        text = args.split(",")[0].strip().upper()
        if text in ("", "AUTO", "DEF", "DEFAULT"):
            self.range_a = None
            return
        value, clamped = parse_numeric(text, 0.0, RANGES_A[-1], RANGES_A[-1])
        if clamped:
            raise ScpiCommandError(*DATA_OUT_OF_RANGE)
        # like the instrument: the smallest range that holds the requested value
        self.range_a = next(r for r in RANGES_A if r >= value * (1 - 1e-9))

    def _configure(self, g: tuple, args: str) -> None:
        self._set_range(args)
        self.function = "CURR"

    def _conf_query(self, g: tuple, args: str) -> str:
        if self.function == "CURR":
            return f'"CURR {_reading(self._effective_range())},{_reading(self._effective_range() * 3e-6)}"'
        return '"VOLT +1.00000000E+01,+1.00000000E-06"'

    def _measure(self, g: tuple, args: str) -> str:
        self._configure(g, args)
        return self._read()

    def _set_nplc(self, g: tuple, args: str) -> None:
        value, _ = parse_numeric(args, NPLC_VALUES[0], NPLC_VALUES[-1], 10.0)
        if value not in NPLC_VALUES:
            raise ScpiCommandError(*ILLEGAL_PARAMETER_VALUE)
        self.nplc = value

    def _effective_range(self) -> float:
        if self.range_a is not None:
            return self.range_a
        return next((r for r in RANGES_A if abs(self._current_a) <= r * OVERRANGE), RANGES_A[-1])

    def _read(self) -> str:
        self.readings += 1
        if self.function != "CURR":
            return _reading(self._rng.gauss(0.0, 1e-6))
        value = self._current_a + (self._rng.gauss(0.0, self._noise_a) if self._noise_a > 0 else 0.0)
        if abs(value) > self._effective_range() * OVERRANGE:
            return _reading(OVERLOAD)
        return _reading(value)


class Emulated34461A(EmulatorServer):
    """A 34461A emulator on a loopback TCP port; ``with Emulated34461A(current_a=38e-9) as emu: emu.url``."""

    device: Keysight34461AEmulator

    def __init__(self, current_a: float = 38e-9, noise_a: float = 0.0, seed: int = 0,
                 host: str = "127.0.0.1", port: int = 0):
        super().__init__(Keysight34461AEmulator(current_a, noise_a, seed), host, port)


def main(argv: list[str] | None = None) -> int:
    def add(parser):
        parser.add_argument("--current-a", type=float, default=38e-9, help="current the meter reads (A)")
        parser.add_argument("--noise-a", type=float, default=0.0, help="s.d. of the reading noise (A)")
        parser.add_argument("--seed", type=int, default=0)
    return run_main(lambda a: Keysight34461AEmulator(a.current_a, a.noise_a, a.seed),
                    "Emulated Keysight 34461A multimeter measuring DC current (SCPI over TCP).", argv,
                    add_arguments=add)


if __name__ == "__main__":
    sys.exit(main())
