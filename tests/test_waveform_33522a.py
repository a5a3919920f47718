"""The 33522A driver: the ion-gun sawtooth scan, limits checked before sending, agreement with the instrument."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardware.errors import LimitError
from hardware.instruments.emulator_33522a import Agilent33522AEmulator, Emulated33522A
from hardware.instruments.emulator_base import DeviceSerial
from hardware.instruments.scpi import ChoiceError, InstrumentError
from hardware.instruments.waveform_33522a import (HIGH_Z, SawtoothScan, Waveform33522A, WaveformFunction,
                                                  check_output_window, peak_limit_v)


@pytest.fixture(scope="module")
def shared_gen():
    # one connection for the module: closing a pyserial socket costs 0.3 s
    with Emulated33522A() as server:
        generator = Waveform33522A(server.url, timeout_s=1.0)
        yield generator, server
        generator.close()


@pytest.fixture
def emu(shared_gen):
    server = shared_gen[1]
    server.device.handle_line("*RST;*CLS")
    server.clear_log()
    return server


@pytest.fixture
def gen(shared_gen, emu):
    return shared_gen[0]


# ----------------------------------------------------------------------------- the scan
def test_sawtooth_scan_is_set_on_both_channels_from_any_previous_state(gen, emu):
    # a state that would clamp a naive command order: 50 ohm load, offset, fast sine
    for line in ("SOUR1:FUNC SIN", "SOUR1:FREQ 10e6", "SOUR1:VOLT:OFFS 2", "SOUR2:VOLT:UNIT VRMS", "OUTP2:LOAD 50"):
        emu.device.handle_line(line)
    syncs_before = emu.snapshot().phase_sync_count
    gen.configure_sawtooth_scan(x_hz=100, y_hz=1, x_vpp=20, y_vpp=12.5)
    snap = emu.snapshot()
    for ch, hz, vpp in ((1, 100.0, 20.0), (2, 1.0, 12.5)):
        state = snap.channel(ch)
        assert state.function == "RAMP" and state.ramp_symmetry_pct == 100.0
        assert state.frequency_hz == hz and state.amplitude_vpp == pytest.approx(vpp, abs=1e-12)
        assert state.offset_v == 0.0 and math.isinf(state.load_ohm) and state.voltage_unit == "VPP"
        assert state.output_on
    assert snap.phase_sync_count == syncs_before + 1
    assert snap.errors_queued == 0


def test_exact_bytes_written_for_the_sawtooth_scan():
    device = Agilent33522AEmulator()
    port = DeviceSerial(device)
    gen = Waveform33522A("socket://33522a.example:5025", serial_factory=lambda url, **kw: port)
    assert port.writes == [b"*IDN?\n", b"SYST:ERR?\n"]
    port.writes.clear()
    gen.configure_sawtooth_scan(100, 1, 20, 7.5)
    expected = []
    for ch, hz, vpp in ((1, "100", "20"), (2, "1", "7.5")):
        expected += [f"OUTP{ch}:LOAD INF", f"SOUR{ch}:VOLT:UNIT VPP", f"SOUR{ch}:VOLT:OFFS 0",
                     f"SOUR{ch}:FREQ {hz}", f"SOUR{ch}:FUNC RAMP", f"SOUR{ch}:FUNC:RAMP:SYMM 100",
                     f"SOUR{ch}:VOLT {vpp}"]
    expected += ["PHAS:SYNC", "OUTP1 ON", "OUTP2 ON"]
    assert port.writes == [f"{cmd}\nSYST:ERR?\n".encode("ascii") for cmd in expected]


def test_status_reads_back_what_was_configured(gen):
    gen.configure_sawtooth_scan(100, 1, 20, 10)
    x, y = gen.status()
    assert (x.channel, x.function, x.frequency_hz, x.amplitude_vpp, x.offset_v, x.ramp_symmetry_pct) == \
        (1, WaveformFunction.RAMP, 100.0, 20.0, 0.0, 100.0)
    assert math.isinf(x.load_ohm) and x.output_on
    assert (y.frequency_hz, y.amplitude_vpp) == (1.0, 10.0)
    assert y.to_dict()["load_ohm"] is None and y.to_dict()["high_impedance"] is True


def test_outputs_off_switches_both_channels_off(gen, emu):
    gen.configure_sawtooth_scan(100, 1, 20, 20)
    gen.outputs_off()
    assert [emu.snapshot().channel(n).output_on for n in (1, 2)] == [False, False]


@pytest.mark.parametrize("kwargs, value_text", [
    (dict(x_vpp=20.5), "20.5"),              # beyond 10 V peak into high impedance
    (dict(y_vpp=0.0), "0"),                  # below the 2 mVpp minimum
    (dict(y_vpp=-5.0), "-5"),
    (dict(x_hz=250e3), "250000"),            # ramps stop at 200 kHz
    (dict(y_hz=0.0), "0"),
    (dict(x_vpp=float("nan")), "nan"),
])
def test_out_of_range_scan_is_refused_before_anything_is_sent(gen, emu, kwargs, value_text):
    gen.configure_sawtooth_scan(100, 1, 5, 5)
    emu.clear_log()
    before = emu.snapshot()
    args = {**dict(x_hz=100.0, y_hz=1.0, x_vpp=20.0, y_vpp=20.0), **kwargs}
    with pytest.raises(LimitError) as info:
        gen.configure_sawtooth_scan(**args)
    assert value_text in str(info.value)
    assert emu.received_lines() == []
    assert emu.snapshot() == before


def test_limit_error_names_value_and_limit():
    with pytest.raises(LimitError) as info:
        SawtoothScan(100, 1, 24, 1).validated()
    assert (info.value.value, info.value.high, info.value.unit) == (24.0, 20.0, "Vpp")
    assert "24 Vpp" in str(info.value) and "20" in str(info.value)


# ----------------------------------------------------------------------------- per-channel controls
def test_offset_and_amplitude_limits_depend_on_the_load(gen, emu):
    ch = gen.channel(1)
    ch.load_ohm = 50
    ch.offset_v = 0
    ch.amplitude_vpp = 10  # 5 V peak: the most 50 ohm allows
    emu.clear_log()
    with pytest.raises(LimitError, match="into 50 ohm"):
        ch.offset_v = 0.5
    assert not any(line.startswith("SOUR1:VOLT:OFFS") for line in emu.received_lines())
    ch.load_ohm = HIGH_Z  # the same output now reads 20 Vpp: the generator rescales the display
    assert ch.amplitude_vpp == 20.0
    ch.amplitude_vpp = 12
    ch.offset_v = -4  # 4 + 6 = 10 V peak into high impedance
    with pytest.raises(LimitError, match="high impedance"):
        ch.offset_v = 4.5
    assert (ch.amplitude_vpp, ch.offset_v) == (12.0, -4.0)


def test_frequency_limit_follows_the_function(gen):
    ch = gen.channel(2)
    ch.function = "sine"
    ch.frequency_hz = 1e6
    with pytest.raises(InstrumentError, match="-221"):
        ch.function = WaveformFunction.RAMP  # the instrument pulls the frequency down and says so
    assert (ch.function, ch.frequency_hz) == (WaveformFunction.RAMP, 200e3)
    ch.frequency_hz = 100
    with pytest.raises(LimitError, match="ramp frequency"):
        ch.frequency_hz = 1e6
    with pytest.raises(ChoiceError):
        ch.function = "sawtooth"
    with pytest.raises(ChoiceError):
        gen.channel(3)


def test_value_the_driver_would_refuse_is_clamped_by_the_instrument_and_reported(gen, emu):
    gen.configure_sawtooth_scan(100, 1, 20, 20)
    with pytest.raises(InstrumentError) as info:
        gen.command("SOUR1:VOLT:OFFS 3")  # bypasses the driver's check: 3 V + 10 V peak
    assert '-222,"Data out of range"' in str(info.value)
    assert emu.snapshot().channel(1).offset_v == 0.0  # clamped to what still fits next to 20 Vpp


def test_amplitude_reads_in_vpp_when_the_panel_shows_vrms(gen):
    gen.configure_sawtooth_scan(100, 1, 6, 6)
    gen.command("SOUR1:VOLT:UNIT VRMS")
    assert gen.query_float("SOUR1:VOLT?") == pytest.approx(6 / (2 * math.sqrt(3)))
    assert gen.channel(1).amplitude_vpp == pytest.approx(6.0)


# ----------------------------------------------------------------------------- driver and instrument agree
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(load=st.sampled_from([50.0, 600.0, HIGH_Z]), eighths_offset=st.integers(-84, 84),
       steps=st.integers(-3, 3))
def test_driver_limits_agree_with_the_instrument(shared_gen, load, eighths_offset, steps):
    """Whatever the driver accepts the instrument takes unchanged; whatever it refuses the instrument would clamp."""
    gen, emu = shared_gen
    # multiples of 1/8 V are exact in binary, so both sides compare the same numbers;
    # the amplitude lies a few steps either side of the largest that fits beside the offset
    offset = eighths_offset / 8
    vpp = (math.floor(2 * (peak_limit_v(load) - abs(offset)) * 8) + steps) / 8
    gen.reset()
    gen.command(f"OUTP1:LOAD {'INF' if math.isinf(load) else load}")
    gen.command("SOUR1:VOLT 0.125")
    try:
        check_output_window(vpp, offset, load)
        accepted = True
    except LimitError:
        accepted = False
    if accepted:
        gen.command(f"SOUR1:VOLT:OFFS {offset}")
        gen.command(f"SOUR1:VOLT {vpp}")
        state = emu.snapshot().channel(1)
        assert (state.amplitude_vpp, state.offset_v) == (vpp, offset)
    else:
        with pytest.raises(InstrumentError, match="-222"):
            gen.command(f"SOUR1:VOLT:OFFS {offset}")
            gen.command(f"SOUR1:VOLT {vpp}")
