"""Current meters: the 34461A driver against its emulator, sampling on a clock, charge integration."""
from __future__ import annotations

import numpy as np
import pytest

from hardware.clock import VirtualClock
from hardware.errors import BackendError, LimitError
from hardware.instruments.current_meter import (CurrentMeter, Keysight34461A, SimulatedCurrentMeter,
                                                integrate_charge_c)
from hardware.instruments.emulator_34461a import Emulated34461A
from hardware.instruments.scpi import ChoiceError


@pytest.fixture
def emu():
    with Emulated34461A(current_a=38e-9, noise_a=0.0, seed=1) as server:
        yield server


@pytest.fixture
def meter(emu):
    m = Keysight34461A(emu.url, timeout_s=1.0)
    yield m
    m.close()


def test_reads_the_beam_current_and_configures_only_once(meter, emu):
    assert meter.read_current_a() == 38e-9
    emu.device.set_current_a(-1.5e-6)
    assert meter.read_current_a() == -1.5e-6
    lines = emu.received_lines()
    assert lines.count("CONF:CURR:DC AUTO") == 1 and lines.count("READ?") == 2


def test_fixed_range_overload_is_an_error_not_a_reading(meter, emu):
    meter.configure_dc_current(range_a=100e-6, nplc=10.0)
    emu.device.set_current_a(2e-3)
    with pytest.raises(BackendError, match="overload"):
        meter.read_current_a()


def test_invalid_configuration_is_refused_before_sending(meter, emu):
    emu.clear_log()
    with pytest.raises(ChoiceError):
        meter.configure_dc_current(range_a=50e-6)
    with pytest.raises(ChoiceError):
        meter.configure_dc_current(nplc=3)
    assert emu.received_lines() == []


def test_noisy_readings_are_reproducible_with_a_seed():
    readings = []
    for _ in range(2):
        with Emulated34461A(current_a=38e-9, noise_a=1e-9, seed=7) as server:
            with Keysight34461A(server.url) as m:
                readings.append([m.read_current_a() for _ in range(30)])
    a = np.array(readings[0])
    assert readings[0] == readings[1]
    assert a.std() > 0.5e-9 and abs(a.mean() - 38e-9) < 4 * 1e-9 / np.sqrt(a.size)


def test_sample_on_a_virtual_clock_gives_times_and_charge(meter):
    clock = VirtualClock(start_s=1000.0)
    times, currents = meter.sample(duration_s=10.0, interval_s=1.0, clock=clock)
    np.testing.assert_array_equal(times, np.arange(11.0))
    np.testing.assert_array_equal(currents, np.full(11, 38e-9))
    assert integrate_charge_c(times, currents) == pytest.approx(38e-9 * 10, rel=1e-12)
    assert clock.now_s() == 1010.0


class SlowMeter(CurrentMeter):
    """Each reading takes 0.3 s of clock time and returns t^2 (A), t since the first reading."""

    def __init__(self, clock):
        self.clock = clock
        self.start = clock.now_s()

    def read_current_a(self) -> float:
        t = self.clock.now_s() - self.start
        self.clock.sleep(0.3)
        return t * t


def test_sample_keeps_the_interval_when_readings_take_time_and_simpson_is_exact_for_quadratics():
    clock = VirtualClock()
    times, currents = SlowMeter(clock).sample(4.0, 1.0, clock)
    np.testing.assert_allclose(times, [0, 1, 2, 3, 4])
    assert integrate_charge_c(times, currents) == pytest.approx(4.0 ** 3 / 3, rel=1e-12)


def test_sample_refuses_a_non_positive_interval():
    with pytest.raises(LimitError):
        SimulatedCurrentMeter().sample(1.0, 0.0, VirtualClock())


def test_simulated_meter_noise_is_seeded():
    a = [SimulatedCurrentMeter(38e-9, 1e-9, seed=3).read_current_a() for _ in range(2)]
    assert a[0] == a[1] and a[0] != 38e-9
