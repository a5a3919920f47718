"""``gcibsem mill-cycle``: one milling cycle configured by the profile's ``ion_gun`` section, run through the
real 33522A driver and an emulated generator against the simulated ion beam."""
from __future__ import annotations

import json

import numpy as np
import pytest

import hardware.factory
from acquisition.cli import main
from gcib.config import blanker_from_config, gun_from_config, plan_from_config
from gcib.ion_gun import RecordingScanDriver, ScanOutputsBlanker, SerialRTSBlanker
from hardware.config import load_profile
from hardware.errors import ConfigError
from hardware.sim.ion_beam import SimulatedIonBeam, volume_per_charge_m3_per_c

CURRENT_A = 38e-9


@pytest.fixture
def scope(monkeypatch):
    """One simulated microscope shared by every run of the command, so its wafer remembers what was milled."""
    shared = hardware.factory.open_microscope("setup_a")
    opened = []

    def open_shared(cfg, *args, **kwargs):
        opened.append(cfg)
        return shared
    monkeypatch.setattr(hardware.factory, "open_microscope", open_shared)
    shared.opened = opened
    return shared


def run(capsys, *argv: str) -> tuple[int, dict | str, str]:
    rc = main(["mill-cycle", "--profile", "setup_a", *argv])
    out, err = capsys.readouterr()
    if rc == 0 and "--json" in argv:
        return rc, json.loads(out), err
    return rc, out, err


def removed(scope) -> np.ndarray:
    return np.array([float(s.removed_m.mean()) for s in scope.sim.wafer.sections])


def expected_depth_m(scope, charge_c: float, area_m2: float) -> np.ndarray:
    """Truth: volume per charge x charge / area, times each section's mean local rate."""
    rate = scope.config.ion_beam.rate_scale
    return np.array([volume_per_charge_m3_per_c(s.irradiation_ev_per_cm3) * rate * charge_c / area_m2
                     * float(s.mill_rate_map.mean()) for s in scope.sim.wafer.sections])


def test_a_cycle_from_the_profile_mills_what_plan_and_truth_say_and_is_not_repeated(scope, capsys, tmp_path):
    log = tmp_path / "mill.jsonl"
    start = scope.stage.position()
    rc, s, _ = run(capsys, "--log", str(log), "--cycle-id", "slice-0001", "--json")
    assert rc == 0 and log.is_file()
    cfg = load_profile("setup_a").ion_gun
    assert s["status"] == "finished"
    assert s["beam_s"] == pytest.approx(cfg.mill_time_s) and s["beam_s_this_run"] == pytest.approx(cfg.mill_time_s)
    assert s["charge_c"] == pytest.approx(CURRENT_A * cfg.mill_time_s, rel=1e-9)
    assert s["azimuths_deg"] == [0.0, 120.0, 240.0]
    assert s["exposures"] == int(round(cfg.mill_time_s / cfg.azimuth_dwell_s))
    assert s["field_m"] == pytest.approx([20e-3, 20e-3])
    assert s["scan_vpp"] == pytest.approx([20e-3 / 1.1e-3, 20e-3 / 1.05e-3])
    # virtual time covers at least the beam time plus the dwell between azimuths; wall time far less
    assert s["clock"] == "virtual" and s["clock_s"] > cfg.mill_time_s and s["wall_s"] < s["clock_s"]
    # the simulated beam, reading the emulated generator's amplitudes, delivered what the log says
    sim = s["simulated"]
    assert sim["charge_c_true"] == pytest.approx(s["charge_c"], rel=1e-9)
    under = sim["sections_under_field"]
    assert len(under) >= 4
    expected = expected_depth_m(scope, CURRENT_A * cfg.mill_time_s, 20e-3 * 20e-3)
    depth = removed(scope)
    assert depth[under] == pytest.approx(expected[under], rel=1e-6)
    assert sim["depth_mean_m"] == pytest.approx(float(expected[under].mean()), rel=1e-6)
    assert np.all(depth <= expected * (1 + 1e-6))
    # back where it started, beam blanked
    end = scope.stage.position()
    assert abs(end.x_m - start.x_m) < 20e-6 and abs(end.y_m - start.y_m) < 20e-6 and abs(end.tilt_deg) < 0.05

    n_lines = len(log.read_text().splitlines())
    rc, again, _ = run(capsys, "--log", str(log), "--cycle-id", "slice-0001", "--json")
    assert rc == 0 and again["status"].startswith("already finished")
    assert again["beam_s_this_run"] == 0.0 and again["simulated"]["charge_c_true"] == 0.0
    assert again["beam_s"] == pytest.approx(s["beam_s"])
    assert np.array_equal(removed(scope), depth)
    assert len(log.read_text().splitlines()) == n_lines


def test_an_interrupted_cycle_resumes_without_milling_twice(scope, capsys, tmp_path, monkeypatch):
    log = tmp_path / "mill.jsonl"
    argv = ("--log", str(log), "--cycle-id", "c7", "--set", "ion_gun.mill_time_s=60", "--json")
    calls = []
    real_expose = SimulatedIonBeam.expose

    def power_cut_after_third(self, seconds):
        depth = real_expose(self, seconds)
        calls.append(seconds)
        if len(calls) == 3:
            raise KeyboardInterrupt("power cut")
        return depth
    monkeypatch.setattr(SimulatedIonBeam, "expose", power_cut_after_third)
    rc, out, err = run(capsys, *argv)
    assert rc == 130 and "resume" in err
    assert scope.stage.position().tilt_deg > 10      # stopped at the gun, tilted
    monkeypatch.setattr(SimulatedIonBeam, "expose", real_expose)

    rc, s, _ = run(capsys, *argv)
    assert rc == 0 and s["status"] == "resumed and finished"
    assert s["beam_s"] == pytest.approx(60.0) and s["beam_s_this_run"] == pytest.approx(30.0)
    # 60 s in all reached the wafer: the interrupted exposure is not repeated
    expected = expected_depth_m(scope, CURRENT_A * 60.0, 20e-3 * 20e-3)
    under = s["simulated"]["sections_under_field"]
    assert removed(scope)[under] == pytest.approx(expected[under], rel=1e-6)
    assert abs(scope.stage.position().tilt_deg) < 0.05


def test_resuming_with_another_plan_is_refused(scope, capsys, tmp_path, monkeypatch):
    log = tmp_path / "mill.jsonl"
    real_expose = SimulatedIonBeam.expose

    def interrupt(self, seconds):
        real_expose(self, seconds)
        raise KeyboardInterrupt
    monkeypatch.setattr(SimulatedIonBeam, "expose", interrupt)
    assert run(capsys, "--log", str(log), "--cycle-id", "c1")[0] == 130
    monkeypatch.setattr(SimulatedIonBeam, "expose", real_expose)
    before = removed(scope)
    rc, _, err = run(capsys, "--log", str(log), "--cycle-id", "c1", "--set", "ion_gun.field_mm=[10,10]")
    assert rc == 2 and "started with another plan" in err and "field_m" in err
    assert np.array_equal(removed(scope), before)


def test_a_field_beyond_20_vpp_is_refused_before_anything_moves_or_is_sent(scope, capsys, tmp_path, monkeypatch):
    import hardware.instruments.emulator_33522a as emu
    import hardware.instruments.waveform_33522a as wfg

    def must_not_connect(*args, **kwargs):
        raise AssertionError("the scan generator was contacted")
    monkeypatch.setattr(wfg, "Waveform33522A", must_not_connect)
    monkeypatch.setattr(emu, "Emulated33522A", must_not_connect)
    start = scope.stage.position()
    log = tmp_path / "mill.jsonl"
    rc, _, err = run(capsys, "--log", str(log), "--cycle-id", "c1", "--set", "ion_gun.field_mm=[30,10]")
    assert rc == 2
    assert "ion_gun.field_mm" in err and "27.3 Vpp" in err and "20 Vpp" in err
    assert not log.exists() and not scope.opened
    assert scope.stage.position() == start and not removed(scope).any()


def test_a_non_simulated_microscope_without_url_names_the_key(capsys, tmp_path):
    rc = main(["mill-cycle", "--profile", "setup_a", "--set", "backend=smartsem", "--log", str(tmp_path / "m.jsonl"),
               "--cycle-id", "c1"])
    err = capsys.readouterr().err
    assert rc == 2 and "ion_gun.waveform_url" in err and "--url" in err


def test_profile_overrides_change_the_field_and_the_depth(scope, capsys, tmp_path):
    rc, out, _ = run(capsys, "--log", str(tmp_path / "m.jsonl"), "--cycle-id", "c1",
                     "--set", "ion_gun.field_mm=[10,10]", "--set", "ion_gun.mill_time_s=30")
    assert rc == 0
    assert "10 x 10 mm (9.091 x 9.524 Vpp)" in out
    assert "mean depth milled" in out
    expected = expected_depth_m(scope, CURRENT_A * 30.0, 10e-3 * 10e-3)
    depth = removed(scope)
    milled = depth > 0
    # a quarter of the area: four times the depth per charge, and fewer sections reached
    assert 0 < milled.sum() < 16
    assert np.all(depth[milled] <= expected[milled] * (1 + 1e-6))
    assert depth.max() == pytest.approx(expected[np.argmax(depth)], rel=1e-6)


@pytest.mark.parametrize("override, message", [
    ("ion_gun.blanker=laser", "ion_gun.blanker must be one of outputs, rts, none, got 'laser'"),
    ("ion_gun.current_na=-5", "ion_gun.current_na must be in (0, 10000] nA, got -5"),
    ("ion_gun.blanker=rts", "ion_gun.blanker_port is empty"),
    ("ion_gun.continuous=1", "ion_gun.continuous: expected true or false, got 1"),
    ("ion_gun.field_mm=[10]", "ion_gun.field_mm must be [x, y]"),
    ("ion_gun.azimuths_deg=[]", "ion_gun.azimuths_deg must list at least one azimuth"),
    ("ion_gun.travel_z_mm=3", "ion_gun.travel_z_mm = 3 must not lie above ion_gun.mill_z_mm = 0"),
    ("ion_gun.feild_mm=[10,10]", "unknown profile key 'ion_gun.feild_mm'"),
])
def test_a_broken_ion_gun_section_names_the_key(override, message, capsys, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_profile("setup_a", [override])
    assert message in str(info.value)
    rc = main(["mill-cycle", "--profile", "setup_a", "--set", override, "--log", str(tmp_path / "m.jsonl"),
               "--cycle-id", "c1"])
    assert rc == 2 and message in capsys.readouterr().err


def test_a_broken_section_in_a_profile_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("ion_gun:\n  blanker: laser\n")
    with pytest.raises(ConfigError, match="ion_gun.blanker"):
        load_profile(str(p))


def test_plan_and_gun_from_the_profile():
    cfg = load_profile("setup_a", ["ion_gun.continuous=true", "ion_gun.mill_time_s=20", "ion_gun.mill_rotation_deg=15",
                                   "ion_gun.gun_elevation_deg=5", "ion_gun.current_na=32"])
    plan = plan_from_config(cfg)
    assert plan.mill_position.x_m == pytest.approx(40e-3) and plan.mill_position.rotation_deg == 15.0
    assert plan.mill_tilt_deg == pytest.approx(25.0)
    steps = list(plan.schedule.steps())
    assert plan.schedule.continuous and len(steps) == 10 and steps[-1][0] == pytest.approx(18.0)
    driver = RecordingScanDriver()
    gun = gun_from_config(cfg, driver, hardware.factory.make_clock("virtual"))
    assert isinstance(gun.blanker, ScanOutputsBlanker) and gun.current_a == pytest.approx(32e-9)
    assert gun.set_field(11e-3, 10.5e-3) == pytest.approx((10.0, 10.0))
    gun.expose(1.0)
    assert driver.scan == pytest.approx((100.0, 1.0, 10.0, 10.0)) and not driver.outputs_on


def test_rts_blanker_from_the_profile_blanks_at_the_configured_level():
    class Port:
        rts = None
    port = Port()
    cfg = load_profile("setup_a", ["ion_gun.blanker=rts", "ion_gun.blanker_port=/dev/ttyUSB0",
                                   "ion_gun.blanker_rts_blanks_high=false"])
    opened = []
    blanker = blanker_from_config(cfg, RecordingScanDriver(), open_port=lambda url: opened.append(url) or port)
    assert isinstance(blanker, SerialRTSBlanker) and opened == ["/dev/ttyUSB0"]
    assert port.rts is False and blanker.is_blanked()
    blanker.unblank()
    assert port.rts is True


def test_a_simulated_microscope_with_a_url_mills_what_that_generator_is_set_to(scope, capsys, tmp_path):
    from hardware.instruments.emulator_33522a import Emulated33522A

    with Emulated33522A() as generator:
        rc, s, _ = run(capsys, "--log", str(tmp_path / "m.jsonl"), "--cycle-id", "c1", "--url", generator.url,
                       "--set", "ion_gun.mill_time_s=20", "--json")
        snap = generator.snapshot()
    assert rc == 0 and s["scan_generator"] == generator.url
    assert snap.channel(1).amplitude_vpp == pytest.approx(s["scan_vpp"][0]) and not snap.channel(1).output_on
    assert s["simulated"]["charge_c_true"] == pytest.approx(CURRENT_A * 20.0)
    under = s["simulated"]["sections_under_field"]
    expected = expected_depth_m(scope, CURRENT_A * 20.0, 20e-3 * 20e-3)
    assert removed(scope)[under] == pytest.approx(expected[under], rel=1e-6)


def test_a_stop_signal_mid_exposure_blanks_the_beam_and_the_cycle_resumes(scope, capsys, tmp_path, monkeypatch):
    import os
    import signal

    from hardware.instruments.emulator_33522a import Emulated33522A

    real_expose = SimulatedIonBeam.expose
    calls = []

    def stopped_by_the_service_manager(self, seconds):
        calls.append(seconds)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)        # as systemd or a scheduler stops a process
        return real_expose(self, seconds)
    monkeypatch.setattr(SimulatedIonBeam, "expose", stopped_by_the_service_manager)
    log = tmp_path / "m.jsonl"
    with Emulated33522A() as generator:
        argv = ("--log", str(log), "--cycle-id", "c1", "--url", generator.url, "--set", "ion_gun.mill_time_s=60")
        rc, _, err = run(capsys, *argv)
        snap = generator.snapshot()
        assert rc == 130 and "interrupted by SIGTERM; the beam is blanked" in err and "resume" in err
        assert not snap.channel(1).output_on and not snap.channel(2).output_on
        assert signal.getsignal(signal.SIGTERM) is not None     # the handler was put back as it was
        monkeypatch.setattr(SimulatedIonBeam, "expose", real_expose)
        rc, s, _ = run(capsys, *argv, "--json")
    assert rc == 0 and s["status"] == "resumed and finished" and s["beam_s"] == pytest.approx(60.0)
