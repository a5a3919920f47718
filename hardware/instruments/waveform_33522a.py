"""Keysight/Agilent 33522A two-channel waveform generator: the ion gun's scan.

The GCIB gun is scanned by two superimposed sawtooth voltages, X fast (100 Hz)
and Y slow (1 Hz); their peak-to-peak amplitudes (up to 20 Vpp) set the milled
area. Channel 1 drives X, channel 2 drives Y.

Every limit the instrument would enforce is checked here first and raises
``LimitError`` before the setting is sent (a per-channel setter first reads the
other settings its limit depends on; ``configure_sawtooth_scan`` sends nothing
at all before its checks have passed), because the instrument itself does not
refuse an out-of-range value: it clamps it, and a clamped scan amplitude mills a
different area than planned. The instrument's error queue is still drained
after every setting, in case this table of limits and the instrument disagree.

Limits (33522A data sheet): peak output |offset| + Vpp/2 <= 10 V into high
impedance, 5 V into 50 ohm (in general 10 V * R / (R + 50 ohm)); amplitude at
least 1 mVpp into 50 ohm (2 mVpp into high impedance); frequency from 1 uHz to
30 MHz, ramp and triangle to 200 kHz.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ..errors import BackendError, LimitError, check_range
from .scpi import (Channel, ChoiceError, Control, SCPIInstrument, boolean, control, format_number,
                   format_on_off, in_range, parse_on_off)

SOURCE_IMPEDANCE_OHM = 50.0
OPEN_CIRCUIT_PEAK_V = 10.0
OPEN_CIRCUIT_MIN_VPP = 2e-3
LOAD_MIN_OHM = 1.0
LOAD_MAX_OHM = 10e3
HIGH_Z = math.inf
FREQUENCY_MIN_HZ = 1e-6
FREQUENCY_MAX_HZ = 30e6
RAMP_FREQUENCY_MAX_HZ = 200e3
# the instrument answers OUTP:LOAD? with 9.9E+37 for INF; anything this large is "infinite"
_INFINITE_LOAD_THRESHOLD_OHM = 1e37


class WaveformFunction(str, Enum):
    """Output functions, valued by the short form the instrument uses and reports."""
    SINE = "SIN"
    SQUARE = "SQU"
    RAMP = "RAMP"
    TRIANGLE = "TRI"
    PULSE = "PULS"
    NOISE = "NOIS"
    DC = "DC"
    PRBS = "PRBS"
    ARB = "ARB"

    @classmethod
    def coerce(cls, value: Any) -> "WaveformFunction":
        if isinstance(value, cls):
            return value
        text = str(value).strip().upper()
        for f in cls:
            if text in (f.value, f.name):
                return f
        raise ChoiceError("waveform function", value, [f.name.lower() for f in cls])


# Vpp per Vrms, for reading amplitudes back from a channel set to display VRMS
_CREST_VPP_PER_VRMS = {WaveformFunction.SINE: 2 * math.sqrt(2), WaveformFunction.SQUARE: 2.0,
                       WaveformFunction.RAMP: 2 * math.sqrt(3), WaveformFunction.TRIANGLE: 2 * math.sqrt(3)}


# ----------------------------------------------------------------------------- limits (pure)
def load_factor(load_ohm: float) -> float:
    """Voltage across the load per open-circuit voltage: 1 at high impedance, 1/2 into 50 ohm."""
    return 1.0 if math.isinf(load_ohm) else load_ohm / (load_ohm + SOURCE_IMPEDANCE_OHM)


def peak_limit_v(load_ohm: float) -> float:
    """Largest |offset| + Vpp/2 the instrument can put across ``load_ohm``."""
    return OPEN_CIRCUIT_PEAK_V * load_factor(load_ohm)


def check_load(load_ohm: Any) -> float:
    if isinstance(load_ohm, str) and load_ohm.strip().upper() in ("INF", "INFINITY", "HIGHZ", "HIGH_Z"):
        return HIGH_Z
    if isinstance(load_ohm, (int, float)) and not isinstance(load_ohm, bool) and math.isinf(load_ohm) \
            and load_ohm > 0:
        return HIGH_Z
    return check_range("output load", load_ohm, LOAD_MIN_OHM, LOAD_MAX_OHM, "ohm")


def check_frequency(function: WaveformFunction, frequency_hz: Any) -> float:
    fmax = RAMP_FREQUENCY_MAX_HZ if function in (WaveformFunction.RAMP, WaveformFunction.TRIANGLE) \
        else FREQUENCY_MAX_HZ
    return check_range(f"{function.name.lower()} frequency", frequency_hz, FREQUENCY_MIN_HZ, fmax, "Hz")


def check_output_window(amplitude_vpp: Any, offset_v: Any, load_ohm: float) -> tuple[float, float]:
    """Check an amplitude/offset pair against the load; return them as floats or raise ``LimitError``."""
    peak = peak_limit_v(load_ohm)
    where = "into high impedance" if math.isinf(load_ohm) else f"into {load_ohm:g} ohm"
    vpp_min = OPEN_CIRCUIT_MIN_VPP * load_factor(load_ohm)
    vpp = check_range(f"amplitude {where}", amplitude_vpp, vpp_min, 2 * peak, "Vpp")
    off = check_range(f"offset {where}", offset_v, -peak, peak, "V")
    if abs(off) + vpp / 2 > peak:
        raise LimitError(f"peak output |offset| + Vpp/2 {where} (offset {off:g} V, amplitude {vpp:g} Vpp)",
                         abs(off) + vpp / 2, 0.0, peak, "V")
    return vpp, off


# ----------------------------------------------------------------------------- read-back state
@dataclass(frozen=True)
class ChannelSettings:
    """What one channel is set to, as read back from the instrument."""
    channel: int
    function: WaveformFunction
    frequency_hz: float
    amplitude_vpp: float
    offset_v: float
    ramp_symmetry_pct: float
    load_ohm: float                     # math.inf for high impedance
    output_on: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: a high-impedance load is ``load_ohm: None, high_impedance: True``."""
        high_z = math.isinf(self.load_ohm)
        return {"channel": self.channel, "function": self.function.name.lower(),
                "frequency_hz": self.frequency_hz, "amplitude_vpp": self.amplitude_vpp,
                "offset_v": self.offset_v, "ramp_symmetry_pct": self.ramp_symmetry_pct,
                "load_ohm": None if high_z else self.load_ohm, "high_impedance": high_z,
                "output_on": self.output_on}


@dataclass(frozen=True)
class SawtoothScan:
    """The ion gun's raster: two rising sawtooth voltages into high impedance, centred on 0 V."""
    x_hz: float
    y_hz: float
    x_vpp: float
    y_vpp: float

    def validated(self) -> "SawtoothScan":
        """Return a copy with every value checked (and made float); raise ``LimitError`` otherwise."""
        values = {}
        for axis in ("x", "y"):
            hz = check_frequency(WaveformFunction.RAMP, getattr(self, f"{axis}_hz"))
            vpp, _ = check_output_window(getattr(self, f"{axis}_vpp"), 0.0, HIGH_Z)
            values[f"{axis}_hz"], values[f"{axis}_vpp"] = hz, vpp
        return SawtoothScan(**values)


# ----------------------------------------------------------------------------- channel
def _parse_function(reply: str) -> WaveformFunction:
    return WaveformFunction(reply.strip().upper())


def _parse_load(reply: str) -> float:
    v = float(reply)
    return HIGH_Z if v >= _INFINITE_LOAD_THRESHOLD_OHM else v


def _format_load(load_ohm: float) -> str:
    return "INF" if math.isinf(load_ohm) else format_number(load_ohm)


def _validate_frequency(channel: "Channel33522A", value: Any) -> float:
    return check_frequency(channel.function, value)


def _validate_offset(channel: "Channel33522A", value: Any) -> float:
    _, off = check_output_window(channel.amplitude_vpp, value, channel.load_ohm)
    return off


class Channel33522A(Channel):
    """One output of the 33522A. Reading a property queries the instrument; setting checks limits first."""

    function = control("SOUR{ch}:FUNC?", "SOUR{ch}:FUNC {value}", "Output function (WaveformFunction).",
                       validator=lambda ch, v: WaveformFunction.coerce(v), parse=_parse_function,
                       format=lambda f: f.value)
    ramp_symmetry_pct = control("SOUR{ch}:FUNC:RAMP:SYMM?", "SOUR{ch}:FUNC:RAMP:SYMM {value}",
                                "Percentage of the period the ramp rises (100 = sawtooth).",
                                validator=in_range("ramp symmetry", 0.0, 100.0, "%"))
    frequency_hz = control("SOUR{ch}:FREQ?", "SOUR{ch}:FREQ {value}", "Frequency in Hz.",
                           validator=_validate_frequency)
    offset_v = control("SOUR{ch}:VOLT:OFFS?", "SOUR{ch}:VOLT:OFFS {value}", "DC offset in V (for the set load).",
                       validator=_validate_offset)
    load_ohm = control("OUTP{ch}:LOAD?", "OUTP{ch}:LOAD {value}",
                       "Load the output is assumed to drive, in ohm; math.inf (or 'INF') for high impedance.",
                       validator=lambda ch, v: check_load(v), parse=_parse_load, format=_format_load)
    output_on = control("OUTP{ch}?", "OUTP{ch} {value}", "Output relay state.",
                        validator=boolean("output state"), parse=parse_on_off, format=format_on_off)
    voltage_unit: Control = control("SOUR{ch}:VOLT:UNIT?", "SOUR{ch}:VOLT:UNIT {value}",
                                    "Unit amplitudes are displayed in (this driver sets VPP).",
                                    validator=lambda ch, v: _check_unit(v), parse=lambda r: r.strip().upper(),
                                    format=str)

    @property
    def amplitude_vpp(self) -> float:
        """Peak-to-peak amplitude in V (for the set load), whatever unit the front panel displays."""
        reply = self.instrument.query_float(f"SOUR{self.number}:VOLT?")
        unit = self.voltage_unit
        if unit == "VPP":
            return reply
        function = self.function
        if unit == "VRMS" and function in _CREST_VPP_PER_VRMS:
            return reply * _CREST_VPP_PER_VRMS[function]
        raise BackendError(f"{self.url}: channel {self.number} displays its amplitude in {unit} for "
                           f"{function.name.lower()}; cannot convert to Vpp")

    @amplitude_vpp.setter
    def amplitude_vpp(self, value: float) -> None:
        vpp, _ = check_output_window(value, self.offset_v, self.load_ohm)
        self.voltage_unit = "VPP"
        self.command(f"SOUR{self.number}:VOLT {format_number(vpp)}")

    def settings(self) -> ChannelSettings:
        return ChannelSettings(self.number, self.function, self.frequency_hz, self.amplitude_vpp, self.offset_v,
                               self.ramp_symmetry_pct, self.load_ohm, self.output_on)


def _check_unit(value: Any) -> str:
    unit = str(value).strip().upper()
    if unit not in ("VPP", "VRMS", "DBM"):
        raise ChoiceError("voltage unit", value, ("VPP", "VRMS", "DBM"))
    return unit


# ----------------------------------------------------------------------------- instrument
class Waveform33522A(SCPIInstrument):
    """Keysight/Agilent 33522A on any pyserial URL (``socket://HOST:5025`` on LAN)."""

    expected_model = "3352"            # 33521A/33522A and their B successors speak the same SCPI
    X_CHANNEL = 1
    Y_CHANNEL = 2

    def __init__(self, url: str, **kwargs: Any):
        self.channels = (Channel33522A(self, 1), Channel33522A(self, 2))
        super().__init__(url, **kwargs)

    def channel(self, number: int) -> Channel33522A:
        if number not in (1, 2):
            raise ChoiceError("channel", number, (1, 2))
        return self.channels[number - 1]

    def phase_sync(self) -> None:
        """Restart both channels' waveforms together, so X and Y ramps keep a fixed phase."""
        self.command("PHAS:SYNC")

    def configure_sawtooth_scan(self, x_hz: float, y_hz: float, x_vpp: float, y_vpp: float) -> SawtoothScan:
        """Set channel 1 (X) and 2 (Y) to rising sawtooth ramps centred on 0 V into high impedance,
        synchronise their phase and switch both outputs on.

        All values are checked before the first command is sent.
        """
        scan = SawtoothScan(x_hz, y_hz, x_vpp, y_vpp).validated()
        for number, hz, vpp in ((self.X_CHANNEL, scan.x_hz, scan.x_vpp), (self.Y_CHANNEL, scan.y_hz, scan.y_vpp)):
            # Order matters because the instrument clamps each value against the present
            # others: load and offset first so the full amplitude fits, the frequency before
            # the function so a fast sine does not get pulled down to the ramp limit.
            self.command(f"OUTP{number}:LOAD INF")
            self.command(f"SOUR{number}:VOLT:UNIT VPP")
            self.command(f"SOUR{number}:VOLT:OFFS 0")
            self.command(f"SOUR{number}:FREQ {format_number(hz)}")
            self.command(f"SOUR{number}:FUNC RAMP")
            self.command(f"SOUR{number}:FUNC:RAMP:SYMM 100")
            self.command(f"SOUR{number}:VOLT {format_number(vpp)}")
        self.phase_sync()
        for number in (self.X_CHANNEL, self.Y_CHANNEL):
            self.command(f"OUTP{number} ON")
        return scan

    def outputs_off(self) -> None:
        for number in (1, 2):
            self.command(f"OUTP{number} OFF")

    def status(self) -> tuple[ChannelSettings, ChannelSettings]:
        return self.channels[0].settings(), self.channels[1].settings()
