"""Behaviour every SEM and stage backend must show, whatever the microscope behind it.

A backend's test module subclasses these classes and provides ``sem`` and
``stage`` fixtures (see test_sim_interface.py). Nothing here knows about the
simulator.
"""
from __future__ import annotations

import numpy as np
import pytest

from hardware.errors import HardwareTimeoutError, LimitError
from hardware.sem import ScanSettings
from hardware.stage import StagePosition


class SEMInterfaceTests:
    def test_wd_round_trip(self, sem):
        wd = sem.get_wd_m()
        sem.set_wd_m(wd + 10e-6)
        assert sem.get_wd_m() == pytest.approx(wd + 10e-6, abs=1e-9)

    def test_wd_outside_limits_is_refused_and_nothing_changes(self, sem):
        before = sem.get_wd_m()
        with pytest.raises(LimitError) as err:
            sem.set_wd_m(sem.limits.wd_max_m + 1e-3)
        msg = str(err.value)
        assert "working distance" in msg and f"{sem.limits.wd_max_m:g}" in msg
        assert sem.get_wd_m() == before

    def test_wd_jump_larger_than_step_limit_is_refused(self, sem):
        with pytest.raises(LimitError, match="step"):
            sem.set_wd_m(sem.get_wd_m() + 2 * sem.limits.wd_step_max_m)

    def test_nan_wd_is_refused(self, sem):
        with pytest.raises(LimitError):
            sem.set_wd_m(float("nan"))

    def test_stigmator_round_trip_and_limits(self, sem):
        if not sem.has_stigmator():
            pytest.skip("backend has no stigmator")
        sem.set_stig(0.5, -0.25)
        assert sem.get_stig() == pytest.approx((0.5, -0.25))
        with pytest.raises(LimitError, match="stigmator y"):
            sem.set_stig(0.0, sem.limits.stig_max * 2)
        assert sem.get_stig() == pytest.approx((0.5, -0.25))

    def test_scan_settings_are_validated(self, sem):
        s = sem.set_scan(ScanSettings(pixel_size_m=10e-9, width_px=64, height_px=48, dwell_s=100e-9))
        assert sem.get_scan() == s
        for bad in ({"dwell_s": 0.0}, {"dwell_s": -1e-7}, {"pixel_size_m": 0.0}, {"width_px": 10**6},
                    {"height_px": 2.5}):
            with pytest.raises(LimitError):
                sem.set_scan(**bad)
        assert sem.get_scan() == s

    def test_the_shortest_dwell_is_accepted_as_written(self, sem):
        """A limit kept in other units (ns in a profile) must not refuse the same value written in seconds."""
        lo = sem.limits.dwell_min_s
        as_written = float(f"{lo * 1e9:.6g}e-9")          # 25 ns typed as 25e-9 s
        s = sem.set_scan(pixel_size_m=10e-9, width_px=64, height_px=48, dwell_s=as_written)
        assert s.dwell_s == lo and sem.get_scan().dwell_s == lo
        with pytest.raises(LimitError, match="dwell time"):
            sem.set_scan(dwell_s=lo * (1 - 1e-6))

    def test_grab_returns_a_frame_of_the_set_size(self, sem):
        sem.set_scan(pixel_size_m=10e-9, width_px=96, height_px=64, dwell_s=100e-9)
        f = sem.grab_frame()
        assert f.image.shape == (64, 96)
        assert f.image.dtype in (np.uint8, np.uint16)
        assert f.scan.width_px == 96 and f.dose_e_per_nm2 > 0

    def test_frame_time_follows_pixels_times_dwell(self, sem):
        a = sem.frame_time_s(ScanSettings(10e-9, 256, 128, 100e-9))
        b = sem.frame_time_s(ScanSettings(10e-9, 512, 128, 100e-9))
        c = sem.frame_time_s(ScanSettings(10e-9, 256, 128, 200e-9))
        # doubling the width or the dwell adds exactly height x width x dwell
        assert b - a == pytest.approx(128 * 256 * 100e-9, rel=1e-6)
        assert c - a == pytest.approx(128 * 256 * 100e-9, rel=1e-6)

    def test_grab_takes_the_frame_time(self, sem):
        sem.set_scan(pixel_size_m=10e-9, width_px=128, height_px=96, dwell_s=1e-6)
        t0 = sem.clock.now_s()
        sem.grab_frame()
        assert sem.clock.now_s() - t0 >= sem.frame_time_s() * 0.999

    def test_blanked_beam_delivers_no_dose(self, sem):
        if not sem.has_blanker():
            pytest.skip("backend has no blanker")
        sem.set_scan(pixel_size_m=10e-9, width_px=64, height_px=64, dwell_s=100e-9)
        sem.blank_beam()
        assert sem.is_blanked()
        f = sem.grab_frame()
        assert f.dose_e_per_nm2 == 0.0
        sem.unblank_beam()
        assert not sem.is_blanked()
        assert sem.grab_frame().dose_e_per_nm2 > 0


class StageInterfaceTests:
    def test_move_completes_and_reads_back(self, stage):
        p = stage.position()
        target = StagePosition(p.x_m + 1e-3, p.y_m - 0.5e-3, p.z_m, p.tilt_deg, p.rotation_deg)
        got = stage.move_to(target)
        assert not stage.is_moving()
        assert got.x_m == pytest.approx(target.x_m, abs=20e-6)
        assert got.y_m == pytest.approx(target.y_m, abs=20e-6)

    def test_move_outside_limits_is_refused_before_moving(self, stage):
        before = stage.position()
        with pytest.raises(LimitError) as err:
            stage.move_to(x_m=stage.limits.x_m[1] + 1e-3)
        assert "stage x" in str(err.value)
        assert stage.position() == before and not stage.is_moving()

    def test_unknown_axis_is_an_error(self, stage):
        with pytest.raises(TypeError, match="unknown stage axes"):
            stage.move_to(w_m=1.0)

    def test_move_that_takes_too_long_times_out(self, stage):
        far = stage.limits.x_m[0] + 1e-3 if stage.position().x_m > 0 else stage.limits.x_m[1] - 1e-3
        with pytest.raises(HardwareTimeoutError, match="did not reach"):
            stage.move_to(x_m=far, timeout_s=0.2)
        assert not stage.is_moving()
