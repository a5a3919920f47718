"""The SBEMimage plug-in's checks before any frame: the scan the daemon's model answers, the settings the SEM
refuses or does not list, the config as SBEMimage users write it, and the microscope the daemon answers for."""
from __future__ import annotations

import configparser

import pytest

from deepfocus.sbemimage import DeepFocusAutofocus, DeepFocusSettings, run_deepfocus_af
from deepfocus.service import Server, ServerConfig

try:
    from test_sbemimage_autofocus import (BETA_PX_PER_UM, FakeSBEMimageSEM, RangeLimited, daemon, run_from, serving,
                                          settings_for)
    from test_service_estimator import PowerRatioEstimator
except ImportError:
    from tests.test_sbemimage_autofocus import (BETA_PX_PER_UM, FakeSBEMimageSEM, RangeLimited, daemon, run_from,
                                                serving, settings_for)
    from tests.test_service_estimator import PowerRatioEstimator

pytestmark = pytest.mark.timeout(60)
__all__ = ["daemon"]            # the module-scoped daemon fixture, used by name


class PickyEstimator(PowerRatioEstimator):
    """Answers frames of at least a patch a side at pixels up to 40 nm, as a model with a pixel range does."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.asked: list[tuple] = []

    def check_frames(self, shape, pixel_size_m, perturbation_m=None) -> None:
        self.asked.append((tuple(shape), pixel_size_m, perturbation_m))
        if min(shape) < self.patch_px:
            raise ValueError(f"frames of {shape[1]} x {shape[0]} px are too small: need at least {self.patch_px} px "
                             "per side")
        if pixel_size_m > 40e-9:
            raise ValueError(f"pixel size {pixel_size_m * 1e9:g} nm is beyond this model's range (up to 40 nm)")


@pytest.mark.parametrize("change, reason", [({"pixel_size_nm": 60.0}, "beyond this model's range"),
                                            ({"frame_size_selector": 1}, "too small")])
def test_a_scan_the_daemons_model_cannot_answer_is_refused_before_any_frame(change, reason):
    est = PickyEstimator(blur_px_per_um=BETA_PX_PER_UM, patch_px=256)
    with serving(est) as address:
        sem = FakeSBEMimageSEM()
        start = sem.wd = sem.true_wd + 4e-6
        res = run_deepfocus_af(sem, settings_for(address, **change))
    assert not res.ok and "ERROR" in res.message and reason in res.message and "no frame was taken" in res.message
    assert sem.frames == 0 and sem.frame_settings == [] and est.calls == 0
    assert sem.wd == start and sem.stig == sem.true_stig
    # the daemon was asked about the frames the selector gives, (rows, columns), at the pair the run would take
    rows_cols = (192, 256) if change.get("frame_size_selector") == 1 else (384, 512)
    assert est.asked == [(rows_cols, pytest.approx(change.get("pixel_size_nm", 10.0) * 1e-9), pytest.approx(5e-6))]


def test_a_scan_the_daemons_model_answers_is_asked_once_and_run_and_without_store_resolutions_not_asked():
    est = PickyEstimator(blur_px_per_um=BETA_PX_PER_UM, patch_px=128)
    with serving(est) as address:
        sem = FakeSBEMimageSEM()
        sem.wd = sem.true_wd + 4e-6
        assert run_deepfocus_af(sem, settings_for(address)).ok
        assert len(est.asked) == 1 and sem.frames >= 2
        # an SEM object without SBEMimage's STORE_RES list: the frame size is unknown, the daemon answers the pair
        sem = FakeSBEMimageSEM()
        del sem.STORE_RES
        sem.wd = sem.true_wd + 4e-6
        assert run_deepfocus_af(sem, settings_for(address)).ok
        assert len(est.asked) == 1 and sem.frames >= 2


class RefusingSEM(FakeSBEMimageSEM):
    """SBEMimage's SEM classes report a setting the microscope refused by returning False, not by raising."""

    def __init__(self, wd_calls_allowed: int = 10**9, frame_settings_ok: bool = True, **kw):
        super().__init__(**kw)
        self.wd_calls_allowed, self.frame_settings_ok = wd_calls_allowed, frame_settings_ok

    def set_wd(self, target_wd: float) -> bool:
        if self.wd_calls_allowed <= 0:
            return False
        self.wd_calls_allowed -= 1
        return super().set_wd(target_wd)

    def apply_frame_settings(self, frame_size_selector, pixel_size, dwell_time):
        super().apply_frame_settings(frame_size_selector, pixel_size, dwell_time)
        return self.frame_settings_ok


def test_a_wd_the_sem_refuses_ends_the_run_and_a_start_it_cannot_restore_is_reported_as_not_restored(daemon):
    # the second wd setting (the first pair's wd + d) is refused, and so is every one after it
    sem = RefusingSEM(wd_calls_allowed=1)
    start = sem.wd = sem.true_wd + 4e-6
    res = run_deepfocus_af(sem, settings_for(daemon))
    assert not res.ok and "ERROR" in res.message and "the SEM refused wd" in res.message
    assert "Previous wd/stig NOT restored" in res.message and "Check the microscope" in res.message
    # no frame taken at a wd the SEM did not reach, and the message says where the SEM is
    assert sem.frames == 1 and sem.wd == pytest.approx(start - 5e-6)
    assert f"reads wd {sem.wd * 1e3:.5f} mm" in res.message
    # refused at the first step (after the pair, back at the start): the start is read back, so restored
    sem = RefusingSEM(wd_calls_allowed=3)
    start = sem.wd = sem.true_wd + 4e-6
    res = run_deepfocus_af(sem, settings_for(daemon))
    assert not res.ok and "the SEM refused wd" in res.message and res.message.endswith("Previous wd/stig restored.")
    assert sem.wd == start and sem.frames == 2


def test_frame_settings_the_sem_refuses_end_the_run_before_any_frame(daemon):
    sem = RefusingSEM(frame_settings_ok=False)
    start = sem.wd = sem.true_wd + 4e-6
    res = run_deepfocus_af(sem, settings_for(daemon))
    assert not res.ok and "the SEM refused the frame settings (deepfocus_frame_size_selector 0" in res.message
    assert sem.frames == 0 and sem.wd == start and res.message.endswith("Previous wd/stig restored.")


@pytest.mark.parametrize("store, expect", [
    ([(1024, 768), (512, 384), (2048, 1536)], 0),                               # SBEMimage's ZEISS presets
    ([(512, 512), (768, 768), (1024, 1024), (1280, 1280), (1536, 1536), (2048, 2048), (2560, 2560), (3072, 3072),
      (4096, 4096), (8192, 8192), (16384, 16384), (512, 384), (768, 576), (1024, 768)], 13),   # its TESCAN ones
    ([(512, 384), (256, 192)], 0)])                                             # no 1024 x 768: the first
def test_unset_the_frame_size_is_the_sems_1024_by_768(daemon, store, expect):
    sem = FakeSBEMimageSEM()
    sem.STORE_RES = store
    sem.wd = sem.true_wd + 3e-6
    run_deepfocus_af(sem, settings_for(daemon))
    assert sem.frame_settings[0][0] == expect


def test_a_dwell_time_not_among_the_sems_is_refused_before_any_frame(daemon):
    sem = FakeSBEMimageSEM()
    sem.DWELL_TIME = [0.05, 0.1, 0.2, 0.4, 0.8]               # SBEMimage's ZEISS list, us
    res = run_deepfocus_af(sem, settings_for(daemon, dwell_time_us=0.25))
    assert not res.ok and "deepfocus_dwell_time_us 0.25 is not one of this SEM's dwell times" in res.message
    assert "0.05, 0.1, 0.2, 0.4, 0.8 us" in res.message and sem.frames == 0 and sem.frame_settings == []
    assert run_deepfocus_af(sem, settings_for(daemon, dwell_time_us=0.2)).ok


def test_a_frame_size_selector_beyond_the_sems_store_resolutions_is_refused_before_any_frame(daemon):
    sem = FakeSBEMimageSEM()
    res = run_deepfocus_af(sem, settings_for(daemon, frame_size_selector=5))
    assert not res.ok and "deepfocus_frame_size_selector 5 is not one of this SEM's store resolutions" in res.message
    assert "0-1: 512 x 384, 256 x 192" in res.message and sem.frames == 0 and sem.frame_settings == []


def test_frames_larger_than_the_daemon_takes_are_refused_before_any_frame():
    from deepfocus.service.protocol import Limits
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:0", limits=Limits(max_side_px=400)),
                 estimator=PickyEstimator(blur_px_per_um=BETA_PX_PER_UM, patch_px=128))
    srv.start_in_thread()
    try:
        sem = FakeSBEMimageSEM()
        res = run_deepfocus_af(sem, settings_for(srv.address))
    finally:
        srv.stop()
        srv.join()
    assert not res.ok and "at most 400 px a side" in res.message and "deepfocus_frame_size_selector" in res.message
    assert sem.frames == 0


class Uncertain(PowerRatioEstimator):
    def estimate(self, *args, **kw):
        c = super().estimate(*args, **kw)
        c.status, c.uncertainty_wd_um, c.uncertainty_stig = "uncertain", float("inf"), float("inf")
        c.extra = {"reason": "only 1 of 8 patches show structure (need 3): constant, blank or noise-only image"}
        return c


def test_an_uncertain_answer_ends_the_run_with_the_daemons_reason():
    with serving(Uncertain(blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
        res = run_deepfocus_af(FakeSBEMimageSEM(), settings_for(address, far_perturbation_factor=0))
    assert not res.ok and "marked 'uncertain' (only 1 of 8 patches show structure" in res.message
    assert "nan" not in res.message and "inf" not in res.message


def test_asking_for_neither_focus_nor_stigmation_takes_no_frame(daemon):
    sem = FakeSBEMimageSEM()
    af = DeepFocusAutofocus(sem, settings_for(daemon))
    try:
        msg = af.run(autofocus=False, autostig=False)
    finally:
        af.close()
    assert "ERROR" not in msg and "not run" in msg and sem.frames == 0


@pytest.mark.parametrize("line, says", [
    ("deepfocus_dwell_time = 0.8", "unknown DeepFocus key(s) deepfocus_dwell_time"),
    ("deepfocus_dwell_time_us = 200", "deepfocus_dwell_time_us must be the focus frames' dwell time in microseconds"),
    ("max_wd_stig_diff = [10, 1, 1]", "max_wd_stig_diff must be three positive limits [wd in metres"),
    ("max_wd_stig_diff = [1e-5, 1]", "three values [wd in metres, stig x, stig y] are needed, got 2"),
    ("deepfocus_retries = 1.5", "deepfocus_retries = '1.5' is not a whole number"),
    ("deepfocus_address = 127.0.0.1:5555", "deepfocus_address must be a ZeroMQ address such as tcp://"),
    ("deepfocus_max_iterations = 0", "deepfocus_max_iterations must be 1 or more"),
    ("pixel_size = 1e-8", "the focus frames' pixel size in nanometres"),
    ("deepfocus_curve_server_public_key = server.key", "given both or neither")])
def test_a_config_slip_is_refused_naming_the_key_and_its_unit(line, says):
    cfg = configparser.ConfigParser()
    cfg.read_string(f"[autofocus]\n{line}\n")
    with pytest.raises(ValueError) as exc:
        DeepFocusSettings.from_sbemimage_config(cfg)
    assert says in str(exc.value)


def test_config_values_as_sbemimage_users_write_them():
    cfg = configparser.ConfigParser()
    # an empty value is unset; max_wd_stig_diff also as plain numbers; the plug-in's own pixel size wins over
    # pixel_size, which SBEMimage's ZEISS autofocus reads too
    cfg.read_string("[autofocus]\nmax_wd_stig_diff = 1e-5, 1, 1\npixel_size = 5.0\ndeepfocus_pixel_size_nm = 10\n"
                    "deepfocus_perturbation_um =\n")
    st = DeepFocusSettings.from_sbemimage_config(cfg)
    assert st.max_wd_stig_diff == (1e-5, 1.0, 1.0) and st.pixel_size_nm == 10.0 and st.perturbation_um is None


@pytest.mark.skipif(not __import__("zmq").has("curve"), reason="libzmq without CURVE")
def test_a_curve_daemon_is_reached_with_the_key_files_the_config_names(tmp_path):
    from pathlib import Path

    import zmq.auth

    from deepfocus.service.server import CurveServerKeys
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_pub, server_sec = zmq.auth.create_certificates(keys, "server")
    client_pub, client_sec = zmq.auth.create_certificates(keys, "client")
    Path(client_pub).rename(allowed / "client.key")
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:0", curve=CurveServerKeys(Path(server_sec), allowed)),
                 estimator=PowerRatioEstimator(blur_px_per_um=BETA_PX_PER_UM, patch_px=128))
    srv.start_in_thread()
    try:
        cfg = configparser.ConfigParser()
        cfg.read_string(f"[autofocus]\ndeepfocus_address = {srv.address}\ndeepfocus_timeout_s = 5\n"
                        f"deepfocus_retries = 0\ndeepfocus_curve_server_public_key = {server_pub}\n"
                        f"deepfocus_curve_client_secret_key = {client_sec}\nmax_wd_stig_diff = [2e-05, 2, 2]\n")
        sem = FakeSBEMimageSEM()
        sem.wd = sem.true_wd + 4e-6
        af = DeepFocusAutofocus(sem, DeepFocusSettings.from_sbemimage_config(cfg))
        try:
            msg = af.run()
        finally:
            af.close()
    finally:
        srv.stop()
        srv.join()
    assert "Completed DeepFocus AF" in msg and abs(sem.wd - sem.true_wd) < 1e-6


def test_a_daemon_restarted_for_another_microscope_is_refused_by_the_plugin_before_any_frame(tmp_path):
    from deepfocus.calibration import StigCalibration

    def daemon(units_per_um):
        est = PowerRatioEstimator(blur_px_per_um=BETA_PX_PER_UM, patch_px=128)
        est.calibration, est.aperture_angle_mrad = StigCalibration(units_per_um), 4.0
        srv = Server(ServerConfig(bind=f"ipc://{tmp_path}/daemon.sock"), estimator=est)
        srv.start_in_thread()
        return srv

    sem = FakeSBEMimageSEM()
    af = DeepFocusAutofocus(sem, settings_for(f"ipc://{tmp_path}/daemon.sock", timeout_s=5, retries=1))
    try:
        for units, refused in ((((0.5, 0.0), (0.0, 0.5)), False), (((0.5, 0.0), (0.0, 0.5)), False),
                               (((0.0, 0.8), (-0.8, 0.0)), True)):
            srv = daemon(units)
            frames = sem.frames
            sem.wd = sem.true_wd + 3e-6
            msg = af.run()
            srv.stop()
            srv.join()
            assert ("now answers for another microscope: stig_units_per_um" in msg) == refused, msg
            assert (sem.frames == frames) == refused and ("ERROR" in msg) == refused
    finally:
        af.close()


def test_a_far_pair_the_daemons_model_cannot_answer_on_these_frames_is_taken_as_far_apart_as_it_can():
    """A far pair further apart shows the model finer pixels, which it bins: on a wide beam the 15 um pair left a
    768 x 576 frame no patch, and the run took it and ended on the daemon's refusal."""
    class FarPicky(RangeLimited):
        def check_frames(self, shape, pixel_size_m, perturbation_m=None) -> None:
            if perturbation_m > 11e-6:
                raise ValueError(f"frames of {shape[1]} x {shape[0]} px (binned 7 x 7 for this model) are too small")

    sem, est, res, start = run_from(55.0, FarPicky, max_iterations=5, max_wd_stig_diff=(80e-6, 2.0, 2.0))
    assert res.ok and res.converged, res.message
    assert est.asked[:3] == pytest.approx([5e-6, 10.5e-6, 5e-6])
    assert [it.far for it in res.iterations][:3] == [False, True, False]
