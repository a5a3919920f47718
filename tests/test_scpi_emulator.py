"""The 33522A emulator behaves like the instrument where a driver could be fooled."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from hardware.instruments.emulator_33522a import Agilent33522AEmulator
from hardware.instruments.waveform_33522a import Waveform33522A


@pytest.fixture
def dev():
    return Agilent33522AEmulator()


def run(dev, *lines):
    return [dev.handle_line(line) for line in lines]


def test_identity_and_number_format(dev):
    assert dev.handle_line("*IDN?") == "Agilent Technologies,33522A,MY00000000,2.05-1.19-2.00-52-00"
    dev.handle_line("OUTP1:LOAD INF")
    dev.handle_line("SOUR1:VOLT 20")
    assert run(dev, "SOUR1:VOLT?", "OUTP1:LOAD?", "SOUR1:VOLT:OFFS?", "OUTP1?") == \
        ["+2.000000000000000E+01", "+9.900000000000000E+37", "+0.000000000000000E+00", "0"]


def test_long_short_and_implicit_source_headers_address_the_same_setting(dev):
    run(dev, "source2:frequency 12.5", "SOUR1:FREQ 3", "FREQuency 4")
    assert dev.snapshot().channel(2).frequency_hz == 12.5
    assert dev.snapshot().channel(1).frequency_hz == 4.0  # no SOURce node: channel 1
    assert dev.handle_line(":SOURce2:FREQuency?;:SOUR1:FREQ?") == "+1.250000000000000E+01;+4.000000000000000E+00"


def test_out_of_range_is_clamped_silently_and_queued(dev):
    assert dev.handle_line("SOUR1:VOLT 15") is None          # 50 ohm default: at most 10 Vpp
    assert dev.snapshot().channel(1).amplitude_vpp == 10.0
    assert run(dev, "SYST:ERR?", "SYST:ERR?") == ['-222,"Data out of range"', '+0,"No error"']


def test_unknown_header_is_queued_and_an_unknown_query_gets_no_reply(dev):
    assert dev.handle_line("SOUR1:WOBBLE?") is None
    assert dev.handle_line("SOUR3:FREQ 1") is None
    assert run(dev, "SYST:ERR?", "SYST:ERR?", "SYST:ERR?") == \
        ['-113,"Undefined header"', '-114,"Header suffix out of range"', '+0,"No error"']


def test_error_queue_overflows_at_twenty(dev):
    for _ in range(25):
        dev.handle_line("BOGUS")
    errors = dev.errors()
    assert len(errors) == 20 and errors[-1] == (-350, "Queue overflow")


def test_rst_restores_factory_settings_but_keeps_errors_and_cls_clears_them(dev):
    run(dev, "SOUR1:FUNC RAMP", "OUTP1 ON", "BOGUS")
    dev.handle_line("*RST")
    state = dev.snapshot().channel(1)
    assert (state.function, state.output_on, state.load_ohm, state.amplitude_vpp) == ("SIN", False, 50.0, 0.1)
    assert dev.errors() == [(-113, "Undefined header")]
    dev.handle_line("*CLS")
    assert dev.errors() == []


def test_load_setting_rescales_the_displayed_voltages(dev):
    run(dev, "SOUR1:VOLT 4", "SOUR1:VOLT:OFFS 1", "OUTP1:LOAD INF")
    state = dev.snapshot().channel(1)
    assert (state.amplitude_vpp, state.offset_v, math.isinf(state.load_ohm)) == (8.0, 2.0, True)
    dev.handle_line("OUTP1:LOAD 50")
    assert dev.snapshot().channel(1).amplitude_vpp == 4.0


def test_amplitude_limit_takes_the_offset_into_account(dev):
    run(dev, "OUTP2:LOAD INF", "SOUR2:VOLT:OFFS 4", "SOUR2:VOLT 20")
    assert dev.snapshot().channel(2).amplitude_vpp == 12.0   # 4 V + 6 V = 10 V peak
    assert dev.errors() == [(-222, "Data out of range")]


def test_snapshot_is_a_consistent_copy(dev):
    snap = dev.snapshot()
    dev.handle_line("OUTP1 ON")
    assert not snap.channel(1).output_on and dev.snapshot().channel(1).output_on


def test_runs_as_a_process_and_serves_the_driver():
    proc = subprocess.Popen([sys.executable, "-m", "hardware.instruments.emulator_33522a", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("socket://127.0.0.1:")
        with Waveform33522A(url, timeout_s=2.0) as gen:
            gen.configure_sawtooth_scan(100, 1, 20, 20)
            assert gen.channel(2).frequency_hz == 1.0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
