"""The simulated ion gun mills what the waveform generator's amplitudes say, and the control side's
tools recover the simulator's true mill rate from a stack it milled and imaged."""
from __future__ import annotations

import numpy as np
import pytest

from gcib.ion_gun import AxisCalibration, IonGun, ScanCalibration, SimulatedBlanker
from gcib.stacks import estimate_mill_rate
from hardware.factory import open_microscope
from hardware.instruments.emulator_33522a import Emulated33522A
from hardware.instruments.waveform_33522a import Waveform33522A
from hardware.sim.ion_beam import SimulatedIonBeam, scan_state_from_33522a, volume_per_charge_m3_per_c


@pytest.fixture
def rig():
    scope = open_microscope("setup_a", ["wafer.mill_inhomogeneity=0.08"])
    with Emulated33522A() as emu, Waveform33522A(emu.url) as wfg:
        beam = SimulatedIonBeam(scope.sim, scan_state_from_33522a(emu))
        yield scope, emu, wfg, beam


def gun_for(scope, wfg, beam, m_per_vpp):
    cal = ScanCalibration(AxisCalibration(m_per_vpp[0]), AxisCalibration(m_per_vpp[1]))
    return IonGun(wfg, SimulatedBlanker(), cal, scope.config.ion_beam.current_na * 1e-9, scope.clock,
                  on_exposure=beam)


def park_at_mill_position(scope):
    mx, my = (v * 1e-3 for v in scope.config.ion_beam.mill_position_mm)
    scope.stage.move_to(x_m=mx, y_m=my)


def test_mill_depth_follows_the_instruments_amplitudes_and_true_calibration(rig):
    scope, emu, wfg, beam = rig
    park_at_mill_position(scope)
    true_k = scope.config.ion_beam.field_m_per_vpp
    gun = gun_for(scope, wfg, beam, true_k)
    x_vpp, y_vpp = gun.set_field(16e-3, 12e-3)
    snap = emu.snapshot()
    assert snap.channel(1).amplitude_vpp == pytest.approx(x_vpp) and snap.channel(2).amplitude_vpp == pytest.approx(y_vpp)
    gun.expose(600.0)
    sections = scope.sim.wafer.sections
    milled = [s for s in sections if s.removed_m.max() > 0]
    untouched = [s for s in sections if abs(s.center_m[0]) > 12e-3 or abs(s.center_m[1]) > 9e-3]
    assert milled and all(s.removed_m.max() == 0 for s in untouched)
    inner = [s for s in milled if abs(s.center_m[0]) < 5e-3 and abs(s.center_m[1]) < 3e-3]
    expected = (volume_per_charge_m3_per_c(inner[0].irradiation_ev_per_cm3) * 38e-9 * 600.0 / (16e-3 * 12e-3))
    for s in inner:
        assert float(s.removed_m.mean() / s.mill_rate_map.mean()) == pytest.approx(expected, rel=1e-3)


def test_a_miscalibrated_gun_mills_another_depth_than_planned(rig):
    scope, emu, wfg, beam = rig
    park_at_mill_position(scope)
    true_k = scope.config.ion_beam.field_m_per_vpp
    # the control side believes the field is 20 % smaller per volt than it is: it sets more volts
    gun = gun_for(scope, wfg, beam, (true_k[0] * 0.8, true_k[1] * 0.8))
    gun.set_field(10e-3, 10e-3)
    gun.expose(100.0)
    centre = min(scope.sim.wafer.sections, key=lambda s: np.hypot(*s.center_m))
    planned = volume_per_charge_m3_per_c(centre.irradiation_ev_per_cm3) * 38e-9 * 100.0 / 1e-4
    got = float(centre.removed_m.mean() / centre.mill_rate_map.mean())
    assert got == pytest.approx(planned * 0.8 ** 2, rel=1e-3)


def true_rate_map_at(sec, x_m, y_m):
    """The section's relative mill rate at wafer points, interpolated as the simulator does."""
    import cv2
    from hardware.sim.wafer import MILL_GRID
    u, v = sec.to_local(x_m, y_m)
    gx = ((u / sec.size_m[0] + 0.5) * (MILL_GRID - 1)).astype(np.float32)
    gy = ((v / sec.size_m[1] + 0.5) * (MILL_GRID - 1)).astype(np.float32)
    return cv2.remap(sec.mill_rate_map, gx, gy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def test_mill_rate_estimated_from_a_simulated_milled_stack_matches_the_truth(rig):
    scope, emu, wfg, beam = rig
    sem, stage = scope.sem, scope.stage
    gun = gun_for(scope, wfg, beam, scope.config.ion_beam.field_m_per_vpp)
    gun.set_field(16e-3, 16e-3)
    sec = min(scope.sim.wafer.sections, key=lambda s: np.hypot(*s.center_m))
    px, n = 2e-6, 128
    sem.set_scan(pixel_size_m=px, width_px=n, height_px=n, dwell_s=1e-6)
    cycle_s = 4000.0
    frames = []
    for _ in range(70):
        stage.move_to(x_m=sec.center_m[0], y_m=sec.center_m[1])
        sem.set_wd_m(scope.sim.true_wd_m())
        frames.append(sem.grab_frame().image)
        park_at_mill_position(scope)
        gun.expose(cycle_s)
    stack = np.stack(frames).astype(np.float32)
    # bare silicon images dark and featureless: threshold halfway between its grey level and the tissue's
    threshold = 0.5 * (np.median(stack[0]) + np.median(stack[-1]))
    assert np.median(stack[-1]) < 0.5 * np.median(stack[0])
    result = estimate_mill_rate(stack, thickness_m=sec.thickness_m, cycles_per_slice=1, threshold=threshold)
    # truth over the imaged field: nominal depth per cycle times the local rate under each pixel
    stage.move_to(x_m=sec.center_m[0], y_m=sec.center_m[1])
    bx, by = scope.sim.beam_position_m()
    offs = (np.arange(n) - (n - 1) / 2) * px
    wx, wy = np.meshgrid(bx + offs, by + offs)
    nominal = volume_per_charge_m3_per_c(sec.irradiation_ev_per_cm3) * 38e-9 * cycle_s / (16e-3 * 16e-3)
    true_per_cycle = nominal * float(true_rate_map_at(sec, wx, wy).mean())
    est, sd = result.depth_per_cycle_m, result.depth_per_cycle_sd_m
    print(f"mill rate from the simulated stack: {est * 1e9:.3f} +- {sd * 1e9:.3f} nm/cycle, truth {true_per_cycle * 1e9:.3f}")
    assert result.pixels_used > 0.9 * n * n
    assert abs(est - true_per_cycle) <= sd, (est, sd, true_per_cycle)
    assert est == pytest.approx(true_per_cycle, rel=0.05)


def test_a_full_milling_cycle_through_the_emulated_generator_mills_every_section_under_the_field(rig, tmp_path):
    from gcib.milling import AzimuthSchedule, MillingCycle, MillingPlan
    from hardware.stage import StagePosition

    scope, emu, wfg, beam = rig
    mx, my = (v * 1e-3 for v in scope.config.ion_beam.mill_position_mm)
    plan = MillingPlan(mill_position=StagePosition(x_m=mx, y_m=my, z_m=1e-3), travel_z_m=-2e-3,
                       field_m=(14e-3, 14e-3), schedule=AzimuthSchedule(mill_time_s=360.0))
    gun = gun_for(scope, wfg, beam, scope.config.ion_beam.field_m_per_vpp)
    state = MillingCycle(scope.stage, gun, plan, tmp_path / "mill.jsonl").run("cycle-1")
    assert state.finished
    assert not emu.snapshot().channel(1).output_on or gun.is_blanked()
    # three azimuths: the square field turns over the wafer, so the milled area is their union;
    # every section within the field's inscribed circle got the full 360 s of beam
    nominal = volume_per_charge_m3_per_c(0.5e27) * 38e-9 * 360.0 / (14e-3 * 14e-3)
    full = outside = 0
    for sec in scope.sim.wafer.sections:
        r = np.hypot(*sec.center_m) + 0.5 * np.hypot(*sec.size_m)
        got = float(sec.removed_m.mean() / sec.mill_rate_map.mean())
        if r < 7e-3:
            assert got == pytest.approx(nominal, rel=1e-3)
            full += 1
        elif np.hypot(*sec.center_m) - 0.5 * np.hypot(*sec.size_m) > 7e-3 * np.sqrt(2):
            assert got == 0.0
            outside += 1
    assert full >= 2 and outside >= 50
    assert beam.charge_delivered_c == pytest.approx(38e-9 * 360.0, rel=1e-6)
