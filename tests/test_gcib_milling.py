"""Ion gun calibration and blanking, and the milling cycle on the simulated stage and wafer."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gcib.ion_gun import (AxisCalibration, CalibrationPoint, DigitalOutputBlanker, IonGun, RecordingScanDriver,
                          ScanCalibration, ScanOutputsBlanker, SerialRTSBlanker, SimulatedBlanker, fit_axis,
                          washer_points)
from gcib.mill_rate import MillRateModel, ev_per_cm3_to_j_per_m3
from gcib.milling import AzimuthSchedule, MillingCycle, MillingLog, MillingPlan, UnsafeStageStateError
from hardware.errors import LimitError
from hardware.factory import open_microscope
from hardware.stage import StagePosition

CURRENT_A = 38e-9
DOSE = ev_per_cm3_to_j_per_m3(0.5e27)


# ----------------------------------------------------------------------------- calibration
def test_linear_fit_recovers_slope_and_offset():
    rng = np.random.default_rng(1)
    vpp = np.linspace(2, 20, 10)
    field = 1.1e-3 * vpp + 0.05e-3 + rng.normal(0, 5e-6, vpp.size)
    cal = fit_axis([CalibrationPoint(v, f) for v, f in zip(vpp, field)])
    assert cal.slope_m_per_vpp == pytest.approx(1.1e-3, rel=0.01)
    assert cal.offset_m == pytest.approx(0.05e-3, abs=2e-5)
    assert cal.residual_sd_m == pytest.approx(5e-6, rel=0.6)
    assert cal.field_m(cal.vpp_for(12e-3)) == pytest.approx(12e-3)
    with pytest.raises(LimitError, match="ion scan field"):
        cal.vpp_for(30e-3)                             # beyond 20 Vpp
    with pytest.raises(LimitError, match="scan amplitude"):
        cal.field_m(25.0)


def test_washer_calibration_through_origin():
    # a 10 mm washer spans 8.0 V in x and 9.1 V in y (two line scans each)
    x = washer_points(10e-3, [(-4.0, 4.0), (-3.9, 4.05)])
    y = washer_points(10e-3, [(-4.55, 4.55)])
    cal = ScanCalibration.fit(x, y, through_origin=True)
    assert cal.x.slope_m_per_vpp == pytest.approx(10e-3 / 7.975, rel=0.01)
    vx, vy = cal.vpp_for_field(10e-3, 10e-3)
    assert (vx, vy) == pytest.approx((7.975, 9.1), rel=0.01)
    assert ScanCalibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal
    with pytest.raises(ValueError, match="positive"):
        fit_axis([CalibrationPoint(0.0, 1e-3)])


# ----------------------------------------------------------------------------- blanking and the gun
class FakeSerial:
    rts = False


def test_blankers_drive_their_lines():
    port = FakeSerial()
    rts = SerialRTSBlanker(port, blank_level=False)
    assert port.rts is False and rts.is_blanked()
    rts.unblank()
    assert port.rts is True and not rts.is_blanked()
    levels = []
    dio = DigitalOutputBlanker(levels.append)
    dio.unblank()
    dio.blank()
    assert levels == [True, False, True]
    driver = RecordingScanDriver()
    outs = ScanOutputsBlanker(driver)
    with pytest.raises(RuntimeError, match="no scan"):
        outs.unblank()
    outs.remember_scan(100.0, 1.0, 10.0, 10.0)
    outs.unblank()
    assert driver.outputs_on and driver.scan == (100.0, 1.0, 10.0, 10.0)
    outs.blank()
    assert not driver.outputs_on


def make_gun(clock, hook=None, current_a=CURRENT_A) -> IonGun:
    cal = ScanCalibration(AxisCalibration(1.2e-3), AxisCalibration(1.2e-3))   # 24 mm at 20 Vpp
    return IonGun(RecordingScanDriver(), SimulatedBlanker(), cal, current_a, clock, on_exposure=hook)


def test_gun_exposure_delivers_current_times_time_and_always_blanks():
    from hardware.clock import VirtualClock

    clock = VirtualClock()
    gun = make_gun(clock)
    with pytest.raises(RuntimeError, match="field"):
        gun.expose(1.0)
    assert gun.set_field(22e-3, 22e-3) == pytest.approx((22 / 1.2, 22 / 1.2))
    assert gun.driver.scan[:2] == (100.0, 1.0)
    assert gun.expose(10.0) == pytest.approx(38e-9 * 10.0)
    assert clock.now_s() == pytest.approx(10.0) and gun.is_blanked()

    def broken(*_):
        raise RuntimeError("interlock")
    gun.on_exposure = broken
    with pytest.raises(RuntimeError, match="interlock"):
        gun.expose(5.0)
    assert gun.is_blanked()
    with pytest.raises(LimitError, match="ion scan field"):
        gun.set_field(30e-3, 10e-3)
    with pytest.raises(LimitError, match="ion beam current"):
        gun.set_current_a(-1.0)


def test_schedules():
    discrete = list(AzimuthSchedule(mill_time_s=65.0).steps())
    assert [a for a, _ in discrete] == [0, 120, 240, 0, 120, 240, 0]
    assert sum(t for _, t in discrete) == pytest.approx(65.0) and discrete[-1][1] == pytest.approx(5.0)
    cont = list(AzimuthSchedule(mill_time_s=90.0, continuous=True, turn_s=360.0, step_deg=2.0).steps())
    assert len(cont) == 45 and cont[-1][0] == pytest.approx(88.0)
    assert sum(t for _, t in cont) == pytest.approx(90.0)
    with pytest.raises(LimitError, match="dwell"):
        list(AzimuthSchedule(dwell_s=0.0).steps())


# ----------------------------------------------------------------------------- the cycle on the simulator
class SimIonTarget:
    """Mills the simulated wafer where the ion field lies: centred on wafer (0, 0) when the stage is at the
    mill position, squares rotating with the stage. Records where the stage was while the beam was on."""

    def __init__(self, microscope, plan: MillingPlan, model: MillRateModel, fail_on_call: int | None = None):
        self.m, self.plan, self.model = microscope, plan, model
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.charge_c = 0.0
        self.positions: list[StagePosition] = []

    def __call__(self, seconds: float, charge_c: float, width_m: float, height_m: float) -> None:
        self.calls += 1
        pos = self.m.stage.position()
        self.positions.append(pos)
        self.charge_c += charge_c
        mill = self.plan.mill_position
        aligned = (math.hypot(pos.x_m - mill.x_m, pos.y_m - mill.y_m) < 50e-6
                   and abs(pos.z_m - mill.z_m) < 50e-6 and abs(pos.tilt_deg - self.plan.mill_tilt_deg) < 0.05)
        if aligned:
            depth = self.model.volume_per_charge_m3_per_c(DOSE) * charge_c / (width_m * height_m)
            c, s = math.cos(math.radians(pos.rotation_deg)), math.sin(math.radians(pos.rotation_deg))
            for sec in self.m.sim.wafer.sections:
                x, y = sec.center_m
                u, v = c * x + s * y, -s * x + c * y
                if abs(u) <= width_m / 2 and abs(v) <= height_m / 2:
                    sec.mill(depth)
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("power cut")


def make_plan(mill_time_s: float = 60.0, **changes) -> MillingPlan:
    kw = dict(mill_position=StagePosition(x_m=20e-3, y_m=0.0, z_m=1e-3, rotation_deg=10.0), travel_z_m=-2e-3,
              glancing_angle_deg=30.0, field_m=(16e-3, 16e-3), schedule=AzimuthSchedule(mill_time_s=mill_time_s))
    kw.update(changes)
    return MillingPlan(**kw)


@pytest.fixture
def rig():
    m = open_microscope("setup_a")
    plan = make_plan()
    target = SimIonTarget(m, plan, MillRateModel())
    gun = make_gun(m.clock, target)
    return m, plan, target, gun


def removed_depths(m):
    return {sec.index: float(sec.removed_m.mean()) for sec in m.sim.wafer.sections}


def test_cycle_mills_at_the_mill_position_and_returns(rig, tmp_path):
    m, plan, target, gun = rig
    start = m.stage.position()
    state = MillingCycle(m.stage, gun, plan, tmp_path / "mill.jsonl").run("c1")
    assert state.finished and state.beam_s_done == pytest.approx(60.0)
    assert state.charge_c == pytest.approx(CURRENT_A * 60.0)
    # the beam was only ever on with the stage aligned and tilted to the glancing angle, at each azimuth
    assert target.calls == 6
    assert all(abs(p.tilt_deg - 30.0) < 0.05 and abs(p.x_m - 20e-3) < 50e-6 for p in target.positions)
    assert sorted({round(p.rotation_deg) for p in target.positions}) == [10, 130, 250]
    # milled depth = volume per charge x charge / area on sections inside the field, nothing elsewhere
    expected = MillRateModel().volume_per_charge_m3_per_c(DOSE) * CURRENT_A * 60.0 / (16e-3) ** 2
    depths = removed_depths(m)
    radius = {sec.index: math.hypot(*sec.center_m) for sec in m.sim.wafer.sections}
    always_inside = [i for i in depths if radius[i] < 8e-3]      # inside the field at every azimuth
    assert len(always_inside) >= 4
    for i in always_inside:
        assert depths[i] == pytest.approx(expected, rel=1e-4)
    for i, d in depths.items():
        if radius[i] > 8e-3 * math.sqrt(2):                     # outside the field at every azimuth
            assert d == 0.0
        else:
            assert d <= expected * (1 + 1e-4)
    # back where it started
    end = m.stage.position()
    assert math.hypot(end.x_m - start.x_m, end.y_m - start.y_m) < 20e-6
    assert abs(end.tilt_deg) < 0.05 and end.rotation_deg == pytest.approx(start.rotation_deg, abs=0.05)
    assert end.z_m == pytest.approx(start.z_m, abs=5e-6)
    assert gun.is_blanked()


def test_moves_follow_the_safe_order_and_every_step_is_logged(rig, tmp_path):
    m, plan, target, gun = rig
    log = tmp_path / "mill.jsonl"
    MillingCycle(m.stage, gun, plan, log).run("c1")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    moves = [r["move"] for r in records if r["step"] == "move-begin" and not r["move"].startswith("azimuth")]
    assert moves == ["rotation", "z to travel height", "x/y to mill position", "z to mill height",
                     "tilt to glancing angle", "tilt to 0", "z to travel height", "x/y back", "rotation back",
                     "z back"]
    # x/y travel happens only at the travel height and at tilt 0
    for r in records:
        if r["step"] == "move-end" and r["move"] in ("x/y to mill position", "x/y back"):
            assert r["stage"]["z_m"] == pytest.approx(-2e-3, abs=5e-6)
            assert abs(r["stage"]["tilt_deg"]) < 0.05
    exposures = [r for r in records if r["step"] == "expose-end"]
    assert all(r["area_m2"] == pytest.approx(16e-3 ** 2) for r in exposures)
    assert sum(r["charge_c"] for r in exposures) == pytest.approx(CURRENT_A * 60.0)
    assert all("t_s" in r and "stage" in r for r in records)
    assert records[0]["step"] == "start" and records[-1]["step"] == "done"


def test_unsafe_start_and_out_of_limit_plans_move_nothing(rig, tmp_path):
    m, plan, target, gun = rig
    m.stage.move_to(tilt_deg=10.0)
    before = m.stage.position()
    with pytest.raises(UnsafeStageStateError, match="tilt"):
        MillingCycle(m.stage, gun, plan, tmp_path / "a.jsonl").run("c1")
    m.stage.move_to(tilt_deg=0.0)
    far = make_plan(mill_position=StagePosition(x_m=60e-3, y_m=0.0, z_m=1e-3))
    with pytest.raises(LimitError, match="stage x"):
        MillingCycle(m.stage, gun, far, tmp_path / "b.jsonl").run("c1")
    high = make_plan(travel_z_m=2e-3)
    with pytest.raises(UnsafeStageStateError, match="travel z"):
        MillingCycle(m.stage, gun, high, tmp_path / "c.jsonl").run("c1")
    assert m.stage.position().x_m == pytest.approx(before.x_m, abs=5e-6)
    assert target.calls == 0
    assert not (tmp_path / "b.jsonl").exists() and not (tmp_path / "c.jsonl").exists()


def test_interrupted_cycle_resumes_without_milling_twice(tmp_path):
    m = open_microscope("setup_a")
    plan = make_plan(mill_time_s=60.0)
    start = m.stage.position()
    target = SimIonTarget(m, plan, MillRateModel(), fail_on_call=3)
    gun = make_gun(m.clock, target)
    log = tmp_path / "mill.jsonl"
    with pytest.raises(KeyboardInterrupt):
        MillingCycle(m.stage, gun, plan, log).run("c7")
    assert gun.is_blanked()
    after_crash = dict(removed_depths(m))
    assert target.calls == 3 and m.stage.position().tilt_deg == pytest.approx(30.0, abs=0.05)
    # a fresh process: new gun and cycle objects, same log
    target.fail_on_call = None
    state = MillingCycle(m.stage, make_gun(m.clock, target), plan, log).run("c7")
    assert state.finished
    assert target.calls == 6                             # 3 before, 3 after: no exposure repeated
    assert target.charge_c == pytest.approx(CURRENT_A * 60.0)
    expected = MillRateModel().volume_per_charge_m3_per_c(DOSE) * CURRENT_A * 60.0 / (16e-3) ** 2
    for sec in m.sim.wafer.sections:
        if math.hypot(*sec.center_m) < 8e-3:
            assert after_crash[sec.index] == pytest.approx(expected / 2, rel=1e-4)
            assert float(sec.removed_m.mean()) == pytest.approx(expected, rel=1e-4)
    end = m.stage.position()
    assert math.hypot(end.x_m - start.x_m, end.y_m - start.y_m) < 20e-6
    # running the finished cycle again does nothing
    calls = target.calls
    again = MillingCycle(m.stage, make_gun(m.clock, target), plan, log).run("c7")
    assert again.finished and target.calls == calls
    records = MillingLog(log).records("c7")
    assert sum(r["step"] == "resume" for r in records) == 1


def test_resume_refuses_a_tilted_stage_away_from_the_mill_position(tmp_path):
    m = open_microscope("setup_a")
    plan = make_plan()
    target = SimIonTarget(m, plan, MillRateModel(), fail_on_call=1)
    log = tmp_path / "mill.jsonl"
    with pytest.raises(KeyboardInterrupt):
        MillingCycle(m.stage, make_gun(m.clock, target), plan, log).run("c1")
    m.stage.move_to(x_m=10e-3)                          # someone moved it, still tilted
    target.fail_on_call = None
    with pytest.raises(UnsafeStageStateError, match="tilted"):
        MillingCycle(m.stage, make_gun(m.clock, target), plan, log).run("c1")


def test_continuous_rotation_cycle(tmp_path):
    m = open_microscope("setup_a")
    plan = make_plan(schedule=AzimuthSchedule(mill_time_s=40.0, continuous=True, turn_s=120.0, step_deg=30.0))
    target = SimIonTarget(m, plan, MillRateModel())
    state = MillingCycle(m.stage, make_gun(m.clock, target), plan, tmp_path / "m.jsonl").run("c")
    assert state.beam_s_done == pytest.approx(40.0) and target.calls == 4
    assert [round(p.rotation_deg) for p in target.positions] == [10, 40, 70, 100]


def test_crash_in_the_last_exposure_then_partial_return_resumes_safely(tmp_path):
    m = open_microscope("setup_a")
    plan = make_plan(mill_time_s=30.0)
    target = SimIonTarget(m, plan, MillRateModel(), fail_on_call=3)
    log = tmp_path / "mill.jsonl"
    with pytest.raises(KeyboardInterrupt):
        MillingCycle(m.stage, make_gun(m.clock, target), plan, log).run("c")
    m.stage.move_to(tilt_deg=12.0)                     # the return had begun: half tilted, still at the gun
    target.fail_on_call = None
    state = MillingCycle(m.stage, make_gun(m.clock, target), plan, log).run("c")
    assert state.finished and target.calls == 3         # the cut-off exposure counts as delivered
    assert state.beam_s_done == pytest.approx(30.0)
    assert abs(m.stage.position().tilt_deg) < 0.05


def test_outputs_blanker_never_scans_while_blanked():
    from hardware.clock import VirtualClock

    driver = RecordingScanDriver()
    cal = ScanCalibration(AxisCalibration(1.2e-3), AxisCalibration(1.2e-3))
    gun = IonGun(driver, ScanOutputsBlanker(driver), cal, CURRENT_A, VirtualClock())
    gun.set_field(12e-3, 6e-3)
    assert not driver.outputs_on and gun.is_blanked()
    seen = []
    gun.on_exposure = lambda *a: seen.append(driver.outputs_on)
    gun.expose(1.0)
    assert seen == [True] and not driver.outputs_on
    assert driver.scan == pytest.approx((100.0, 1.0, 10.0, 5.0))


def test_a_line_cut_short_while_writing_is_dropped_by_the_next_append(tmp_path):
    from gcib.milling import MillingLog
    log = MillingLog(tmp_path / "mill.jsonl")
    log.append({"cycle": "c1", "step": "move-begin"})
    with open(log.path, "ab") as f:                 # the disk filled up halfway through a record
        f.write(b'{"cycle": "c1", "step": "expo')
    assert [r["step"] for r in log.records()] == ["move-begin"]
    log.append({"cycle": "c1", "step": "milled"})
    log.append({"cycle": "c2", "step": "move-begin"})
    assert [r["step"] for r in log.records()] == ["move-begin", "milled", "move-begin"]
    assert b"expo" not in log.path.read_bytes()          # the torn fragment is gone


@pytest.mark.parametrize("line, says", [
    ('{"cycle": "c1", "index": 0}', "a record is an object with a 'step'"),
    ('[1, 2]', "a record is an object with a 'step'"),
    ('{"cycle": "c1", "step": "expose-end", "index": 0, "charge_c": 1e-9}', "its duration_s is not a number"),
    ('{"cycle": "c1", "step": "start", "return_position": {"x_m": "abc"}}', "its return_position is not a stage"),
])
def test_a_log_record_a_resume_cannot_read_is_refused_naming_its_line(tmp_path, line, says):
    from gcib.milling import MillingLog
    log = MillingLog(tmp_path / "mill.jsonl")
    log.append({"cycle": "c0", "step": "done"})
    with open(log.path, "a") as f:
        f.write(line + "\n")
    log.append({"cycle": "c1", "step": "done"})
    with pytest.raises(ValueError, match=f"mill.jsonl:2: {says}"):
        log.records("c1")
