"""Emulator of a Keysight/Agilent 33522A two-channel waveform generator (the SCPI subset the ion-gun scan uses).

It behaves like the instrument where a driver could go wrong: headers in short
or long form with optional ``SOURce`` node, numbers in the instrument's format
(``+2.000000000000000E+01``), out-of-range values clamped with ``-222`` queued,
unknown headers queued as ``-113`` (and queries left unanswered), amplitude and
offset limited together by the output load, and the displayed voltages rescaled
when the load setting changes (the physical output stays the same).

The simulated ion gun reads the set amplitudes (scan size, hence milled area)
and output states through ``snapshot()``.

Run as a process: ``python -m hardware.instruments.emulator_33522a --port 5025``.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Iterable

from .emulator_base import (DATA_OUT_OF_RANGE, HEADER_SUFFIX_OUT_OF_RANGE, ILLEGAL_PARAMETER_VALUE,
                            SETTINGS_CONFLICT, EmulatorServer, HandlerFn, ScpiCommandError, ScpiDevice,
                            format_nr3, parse_numeric, run_main)

IDENTITY_33522A = "Agilent Technologies,33522A,MY00000000,2.05-1.19-2.00-52-00"

SOURCE_IMPEDANCE_OHM = 50.0
OPEN_CIRCUIT_PEAK_V = 10.0          # |offset| + Vpp/2 into an open circuit
OPEN_CIRCUIT_MIN_VPP = 2e-3
LOAD_MIN_OHM, LOAD_MAX_OHM = 1.0, 10e3
INFINITE_LOAD_REPLY = 9.9e37        # what the instrument answers for OUTP:LOAD? at INF
FREQ_MIN_HZ = 1e-6
FREQ_MAX_HZ = {"RAMP": 200e3, "TRI": 200e3}
FREQ_MAX_DEFAULT_HZ = 30e6

FUNCTIONS = {  # accepted spellings -> the short form the instrument reports
    "SIN": "SIN", "SINUSOID": "SIN", "SQU": "SQU", "SQUARE": "SQU", "RAMP": "RAMP", "TRI": "TRI",
    "TRIANGLE": "TRI", "PULS": "PULS", "PULSE": "PULS", "NOIS": "NOIS", "NOISE": "NOIS", "DC": "DC",
    "PRBS": "PRBS", "ARB": "ARB", "ARBITRARY": "ARB",
}
# Vpp / Vrms of the functions for which the instrument offers VRMS
CREST_VPP_PER_VRMS = {"SIN": 2 * math.sqrt(2), "SQU": 2.0, "RAMP": 2 * math.sqrt(3), "TRI": 2 * math.sqrt(3)}


def load_factor(load_ohm: float) -> float:
    """Voltage across the load per open-circuit voltage (1 at high impedance, 1/2 into 50 ohm)."""
    return 1.0 if math.isinf(load_ohm) else load_ohm / (load_ohm + SOURCE_IMPEDANCE_OHM)


@dataclass(frozen=True)
class ChannelState:
    """One output channel as set (voltages as displayed for the set load)."""
    function: str = "SIN"
    frequency_hz: float = 1e3
    amplitude_vpp: float = 0.1
    offset_v: float = 0.0
    ramp_symmetry_pct: float = 100.0
    load_ohm: float = 50.0              # math.inf for high impedance
    output_on: bool = False
    voltage_unit: str = "VPP"

    @property
    def peak_v(self) -> float:
        """Largest |voltage| of the waveform across the load (as displayed)."""
        return abs(self.offset_v) + self.amplitude_vpp / 2


@dataclass(frozen=True)
class WaveformGeneratorSnapshot:
    """Consistent copy of both channels, taken under the emulator's lock."""
    channels: tuple[ChannelState, ChannelState]
    phase_sync_count: int                # how often PHAS:SYNC was received
    errors_queued: int

    def channel(self, number: int) -> ChannelState:
        return self.channels[number - 1]


class Agilent33522AEmulator(ScpiDevice):
    """The 33522A's state machine; put it behind ``EmulatorServer`` or use ``serve_33522a()``."""

    identity = IDENTITY_33522A

    def __init__(self) -> None:
        self._ch = [ChannelState(), ChannelState()]
        self._syncs = 0
        super().__init__()

    def reset_state(self) -> None:
        with self.lock:
            self._ch = [ChannelState(), ChannelState()]

    def snapshot(self) -> WaveformGeneratorSnapshot:
        with self.lock:
            return WaveformGeneratorSnapshot(tuple(self._ch), self._syncs, len(self.errors()))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ helpers
    def _index(self, suffix: str | None) -> int:
        n = int(suffix) if suffix else 1
        if n not in (1, 2):
            raise ScpiCommandError(*HEADER_SUFFIX_OUT_OF_RANGE)
        return n - 1

    def _update(self, i: int, **changes: object) -> None:
        self._ch[i] = replace(self._ch[i], **changes)

    def _numeric(self, args: str, low: float, high: float, default: float) -> float:
        value, clamped = parse_numeric(args, low, high, default)
        if clamped:
            self.push_error(*DATA_OUT_OF_RANGE)
        return value

    @staticmethod
    def _limits(s: ChannelState) -> tuple[float, float, float]:
        """(peak voltage limit, minimum Vpp, crest factor of the display unit) for the channel's load."""
        f = load_factor(s.load_ohm)
        crest = CREST_VPP_PER_VRMS.get(s.function, 2.0) if s.voltage_unit == "VRMS" else 1.0
        return OPEN_CIRCUIT_PEAK_V * f, OPEN_CIRCUIT_MIN_VPP * f, crest

    # ------------------------------------------------------------------ command table
    def commands(self) -> Iterable[tuple[str, HandlerFn]]:
        return [
            ("[SOURce#:]FUNCtion", self._set_function),
            ("[SOURce#:]FUNCtion?", lambda g, a: self._ch[self._index(g[0])].function),
            ("[SOURce#:]FUNCtion:RAMP:SYMMetry", self._set_symmetry),
            ("[SOURce#:]FUNCtion:RAMP:SYMMetry?", lambda g, a: format_nr3(self._ch[self._index(g[0])].ramp_symmetry_pct)),
            ("[SOURce#:]FREQuency", self._set_frequency),
            ("[SOURce#:]FREQuency?", lambda g, a: format_nr3(self._ch[self._index(g[0])].frequency_hz)),
            ("[SOURce#:]VOLTage[:AMPLitude]", self._set_amplitude),
            ("[SOURce#:]VOLTage[:AMPLitude]?", self._get_amplitude),
            ("[SOURce#:]VOLTage:OFFSet", self._set_offset),
            ("[SOURce#:]VOLTage:OFFSet?", lambda g, a: format_nr3(self._ch[self._index(g[0])].offset_v)),
            ("[SOURce#:]VOLTage:UNIT", self._set_unit),
            ("[SOURce#:]VOLTage:UNIT?", lambda g, a: self._ch[self._index(g[0])].voltage_unit),
            ("OUTPut#", self._set_output),
            ("OUTPut#?", lambda g, a: "1" if self._ch[self._index(g[0])].output_on else "0"),
            ("OUTPut#:LOAD", self._set_load),
            ("OUTPut#:LOAD?", self._get_load),
            ("[SOURce#:]PHASe:SYNChronize", self._phase_sync),
        ]

    def _set_function(self, g: tuple, args: str) -> None:
        i = self._index(g[0])
        name = FUNCTIONS.get(args.strip().upper())
        if name is None:
            raise ScpiCommandError(*ILLEGAL_PARAMETER_VALUE)
        s = self._ch[i]
        fmax = FREQ_MAX_HZ.get(name, FREQ_MAX_DEFAULT_HZ)
        if s.frequency_hz > fmax:
            # the instrument changes the function and pulls the frequency down to what it can do
            self._update(i, function=name, frequency_hz=fmax)
            self.push_error(SETTINGS_CONFLICT[0], "Settings conflict;frequency reduced to the function's limit")
        else:
            self._update(i, function=name)

    def _set_symmetry(self, g: tuple, args: str) -> None:
        i = self._index(g[0])
        self._update(i, ramp_symmetry_pct=self._numeric(args, 0.0, 100.0, 100.0))

    def _set_frequency(self, g: tuple, args: str) -> None:
        i = self._index(g[0])
        fmax = FREQ_MAX_HZ.get(self._ch[i].function, FREQ_MAX_DEFAULT_HZ)
        self._update(i, frequency_hz=self._numeric(args, FREQ_MIN_HZ, fmax, 1e3))

    def _set_amplitude(self, g: tuple, args: str) -> None:
        i = self._index(g[0])
        s = self._ch[i]
        peak, vpp_min, crest = self._limits(s)
        vpp_max = max(2 * (peak - abs(s.offset_v)), vpp_min)
        shown = self._numeric(args, vpp_min / crest, vpp_max / crest, 0.1 / crest)
        self._update(i, amplitude_vpp=shown * crest)

    def _get_amplitude(self, g: tuple, args: str) -> str:
        s = self._ch[self._index(g[0])]
        return format_nr3(s.amplitude_vpp / self._limits(s)[2])

    def _set_offset(self, g: tuple, args: str) -> None:
        i = self._index(g[0])
        s = self._ch[i]
        limit = max(self._limits(s)[0] - s.amplitude_vpp / 2, 0.0)
        self._update(i, offset_v=self._numeric(args, -limit, limit, 0.0))

    def _set_unit(self, g: tuple, args: str) -> None:
        i = self._index(g[0])
        unit = args.strip().upper()
        if unit not in ("VPP", "VRMS", "DBM"):
            raise ScpiCommandError(*ILLEGAL_PARAMETER_VALUE)
        if unit == "DBM" or (unit == "VRMS" and self._ch[i].function not in CREST_VPP_PER_VRMS):
            # this emulator offers dBm nowhere; the instrument refuses it into high impedance too
            raise ScpiCommandError(*SETTINGS_CONFLICT)
        self._update(i, voltage_unit=unit)

    def _set_output(self, g: tuple, args: str) -> None:
        i = self._index(g[0])
        word = args.strip().upper()
        if word in ("ON", "1"):
            self._update(i, output_on=True)
        elif word in ("OFF", "0"):
            self._update(i, output_on=False)
        else:
            raise ScpiCommandError(*ILLEGAL_PARAMETER_VALUE)

    def _set_load(self, g: tuple, args: str) -> None:
        i = self._index(g[0])
        load = self._numeric(args, LOAD_MIN_OHM, LOAD_MAX_OHM, 50.0) if args.strip().upper() not in (
            "INF", "INFINITY") else math.inf
        s = self._ch[i]
        # the load setting only changes what is displayed: the open-circuit voltage is kept
        k = load_factor(load) / load_factor(s.load_ohm)
        self._update(i, load_ohm=load, amplitude_vpp=s.amplitude_vpp * k, offset_v=s.offset_v * k)

    def _get_load(self, g: tuple, args: str) -> str:
        load = self._ch[self._index(g[0])].load_ohm
        return format_nr3(INFINITE_LOAD_REPLY if math.isinf(load) else load)

    def _phase_sync(self, g: tuple, args: str) -> None:
        if g[0] is not None:
            self._index(g[0])
        self._syncs += 1


class Emulated33522A(EmulatorServer):
    """A 33522A emulator on a loopback TCP port; ``with Emulated33522A() as emu: emu.url``."""

    device: Agilent33522AEmulator

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__(Agilent33522AEmulator(), host, port)

    def snapshot(self) -> WaveformGeneratorSnapshot:
        return self.device.snapshot()


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda args: Agilent33522AEmulator(),
                    "Emulated Keysight/Agilent 33522A waveform generator (SCPI over TCP).", argv)


if __name__ == "__main__":
    sys.exit(main())
