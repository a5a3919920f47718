"""SCPI laboratory instruments on pyserial (LAN raw socket, RS-232/USB serial), with loopback emulators.

* ``scpi``: the transport and instrument base class (``SCPIInstrument``, ``Control``).
* ``waveform_33522a``: the Keysight/Agilent 33522A that scans the ion gun.
* ``current_meter``: current meters (``CurrentMeter``; the Keysight 34461A multimeter).
* ``emulator_33522a``, ``emulator_34461a``: TCP emulators of both, for tests and the simulated microscope.
"""
from .scpi import ChoiceError, Control, Identity, InstrumentError, SCPIInstrument, control
from .current_meter import CurrentMeter, Keysight34461A, SimulatedCurrentMeter, integrate_charge_c
from .waveform_33522a import ChannelSettings, SawtoothScan, Waveform33522A, WaveformFunction

__all__ = ["ChoiceError", "Control", "Identity", "InstrumentError", "SCPIInstrument", "control",
           "CurrentMeter", "Keysight34461A", "SimulatedCurrentMeter", "integrate_charge_c", "ChannelSettings", "SawtoothScan", "Waveform33522A", "WaveformFunction"]
