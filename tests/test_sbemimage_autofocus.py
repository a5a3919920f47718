"""DeepFocus as SBEMimage's autofocus method, against a fake of SBEMimage's SEM API."""
from __future__ import annotations

import configparser
import contextlib

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from deepfocus.sbemimage import DeepFocusAutofocus, DeepFocusSettings, run_deepfocus_af
from deepfocus.service import Server, ServerConfig

try:
    from test_service_estimator import PowerRatioEstimator, specimen
except ImportError:
    from tests.test_service_estimator import PowerRatioEstimator, specimen

pytestmark = pytest.mark.timeout(60)

BETA_PX_PER_UM = 0.6


class FakeSBEMimageSEM:
    """Mimics SBEMimage's SEM class: wd in metres, stig in %, frames saved as TIFF files.

    The image is the specimen blurred by an elliptical Gaussian whose widths
    along columns and rows grow with defocus +/- astigmatism (x stigmator only).
    """

    def __init__(self, true_wd: float = 5.0e-3, true_stig=(0.3, -0.2), shape=(384, 512)):
        self.true_wd, self.true_stig = true_wd, true_stig
        self.wd, self.stig = true_wd, tuple(true_stig)
        self.spec = specimen(shape, seed=21)
        # SBEMimage's store resolutions, (width, height) per frame size selector; as on its ZEISS presets, selector 0
        # gives the frames this fake renders and 1 half their size
        self.STORE_RES = [(shape[1], shape[0]), (shape[1] // 2, shape[0] // 2)]
        self.frame_settings: list[tuple] = []
        self.wd_log: list[float] = []
        self.fail_acquisition = False
        self.error_info = ""
        self.frames = 0

    # SBEMimage SEM API
    def get_wd(self) -> float:
        return self.wd

    def set_wd(self, target_wd: float) -> bool:
        self.wd = float(target_wd)
        self.wd_log.append(self.wd)
        return True

    def get_stig_xy(self) -> tuple[float, float]:
        return self.stig

    def set_stig_xy(self, target_stig_x: float, target_stig_y: float) -> None:
        self.stig = (float(target_stig_x), float(target_stig_y))

    def apply_frame_settings(self, frame_size_selector, pixel_size, dwell_time) -> None:
        self.frame_settings.append((frame_size_selector, pixel_size, dwell_time))

    def acquire_frame(self, save_path_filename, extra_delay=0) -> bool:
        if self.fail_acquisition:
            self.error_info = "Grab incomplete"
            return False
        z_um = (self.wd - self.true_wd) * 1e6
        ax = self.stig[0] - self.true_stig[0]
        sigma_cols, sigma_rows = BETA_PX_PER_UM * abs(z_um + ax), BETA_PX_PER_UM * abs(z_um - ax)
        img = ndimage.gaussian_filter(self.spec, (sigma_rows, sigma_cols))
        tifffile.imwrite(save_path_filename, np.clip(20000 + 3000 * img, 0, 65535)
                         .astype(np.uint16))
        self.frames += 1
        return True


@contextlib.contextmanager
def serving(estimator):
    """A daemon on a free loopback port answering with ``estimator``; its address."""
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:0"), estimator=estimator)
    srv.start_in_thread()
    try:
        yield srv.address
    finally:
        srv.stop()
        srv.join()


@pytest.fixture(scope="module")
def daemon():
    with serving(PowerRatioEstimator(blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
        yield address


def settings_for(address: str, **kw) -> DeepFocusSettings:
    base = dict(address=address, timeout_s=10, retries=0, settle_s=0.0, max_iterations=4,
                max_wd_stig_diff=(20e-6, 2.0, 2.0))
    base.update(kw)
    return DeepFocusSettings(**base)


def test_focuses_and_stigmates_through_the_daemon(daemon):
    sem = FakeSBEMimageSEM()
    sem.wd = sem.true_wd + 6e-6
    sem.stig = (sem.true_stig[0] - 0.8, sem.true_stig[1])
    res = run_deepfocus_af(sem, settings_for(daemon))
    assert res.ok and "ERROR" not in res.message and "Completed DeepFocus AF" in res.message
    assert abs(sem.wd - sem.true_wd) < 1e-6
    assert abs(sem.stig[0] - sem.true_stig[0]) < 0.3
    assert res.new_wd_stig == (sem.wd, *sem.stig)
    assert res.converged and 1 <= len(res.iterations) <= 4
    # SBEMimage units: frame size selector, pixel size in nm, dwell time in us
    assert sem.frame_settings == [(0, 10.0, 0.2)]
    # the pair is taken at -5 um and +5 um around the setting of each iteration
    first = res.iterations[0].wd_before_m
    assert sem.wd_log[:3] == pytest.approx([first - 5e-6, first + 5e-6, first])


def test_correction_beyond_max_wd_stig_diff_is_not_applied(daemon):
    sem = FakeSBEMimageSEM()
    start_wd = sem.true_wd + 6e-6
    sem.wd = start_wd
    res = run_deepfocus_af(sem, settings_for(daemon, max_wd_stig_diff=(2e-6, 2.0, 2.0)))
    assert not res.ok and "ERROR" in res.message and "max_wd_stig_diff" in res.message
    assert sem.wd == start_wd and sem.stig == sem.true_stig
    assert res.new_wd_stig == (None, None, None)


def test_daemon_not_running_gives_an_error_message_and_restores_settings(tmp_path):
    sem = FakeSBEMimageSEM()
    sem.wd = start = sem.true_wd - 3e-6
    addr = f"ipc://{tmp_path}/absent.sock"
    res = run_deepfocus_af(sem, settings_for(addr, timeout_s=0.3, retries=1))
    assert not res.ok and "ERROR" in res.message and addr in res.message
    assert "?." not in res.message and ".." not in res.message
    assert sem.wd == start and sem.stig == sem.true_stig


def test_failed_frame_acquisition_is_reported(daemon):
    sem = FakeSBEMimageSEM()
    sem.fail_acquisition = True
    start = sem.wd = sem.true_wd + 2e-6
    res = run_deepfocus_af(sem, settings_for(daemon))
    assert not res.ok and "Grab incomplete" in res.message and sem.wd == start


def test_focus_only_leaves_stigmators_alone(daemon):
    sem = FakeSBEMimageSEM()
    sem.wd = sem.true_wd - 5e-6
    sem.stig = stig = (sem.true_stig[0] + 0.6, sem.true_stig[1])
    af = DeepFocusAutofocus(sem, settings_for(daemon))
    try:
        assert af.daemon_available()
        msg = af.run(autofocus=True, autostig=False)
    finally:
        af.close()
    assert "Completed" in msg
    assert sem.stig == stig and abs(sem.wd - sem.true_wd) < 1.5e-6


def test_settings_from_an_sbemimage_config():
    cfg = configparser.ConfigParser()
    cfg.read_string("[autofocus]\nmax_wd_stig_diff = [1e-05, 0.5, 0.5]\npixel_size = 8.0\n"
                    "deepfocus_address = tcp://127.0.0.1:6001\ndeepfocus_max_iterations = 5\n"
                    "deepfocus_lens_play_um = 0.17\n")
    st = DeepFocusSettings.from_sbemimage_config(cfg)
    assert st.max_wd_stig_diff == (1e-05, 0.5, 0.5) and st.pixel_size_nm == 8.0
    assert st.address == "tcp://127.0.0.1:6001" and st.max_iterations == 5 and st.lens_play_um == 0.17


class ScaledAnswers(PowerRatioEstimator):
    """Answers 0.7 x what the pair shows, wd and stigmators alike (a profile's aperture angle 1.2 x too large)."""
    stig_shares_wd_scale = True

    def estimate(self, *args, **kw):
        c = super().estimate(*args, **kw)
        for key in ("wd_um", "astig_x_um", "astig_y_um", "stig_x", "stig_y"):
            setattr(c, key, 0.7 * getattr(c, key))
        return c


def test_the_plugin_steps_as_the_closed_loop_does_and_divides_out_the_scale_it_learns():
    sem = FakeSBEMimageSEM()
    sem.wd = sem.true_wd + 8e-6
    with serving(ScaledAnswers(blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
        res = run_deepfocus_af(sem, settings_for(address, max_iterations=3, wd_tolerance_um=0.01,
                                                 stig_tolerance=0.001))
    assert res.ok, res.message
    first, second = res.iterations[0], res.iterations[1]
    step1_um = (second.wd_before_m - first.wd_before_m) * 1e6
    assert step1_um == pytest.approx(first.correction["wd_um"], abs=1e-6)     # nothing learned yet
    gain = (first.correction["wd_um"] - second.correction["wd_um"]) / step1_um
    step2_um = (res.iterations[2].wd_before_m - second.wd_before_m) * 1e6
    assert gain < 0.8
    # divided by it, within the loop's limits on a learned scale (0.6-1.6)
    assert step2_um == pytest.approx(second.correction["wd_um"] / max(gain, 0.6), abs=1e-6)


def test_the_plugin_imports_nothing_sbemimages_environment_lacks():
    # SBEMimage's Python gets numpy, pyzmq and tifffile; no torch, no YAML, not the hardware layer
    import subprocess
    import sys
    code = ("import sys, deepfocus.sbemimage; "
            "print(sorted(m for m in ('torch', 'yaml', 'cv2', 'scipy', 'hardware', 'PyQt5') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class GrowingStigmatorAnswers(PowerRatioEstimator):
    """Near focus, stigmator answers that grow whatever is done (a map no loop can learn)."""
    ANSWERS = [(0.5, 0.5, 0.0), (0.3, 0.0, 0.8), (0.2, -1.2, 0.0), (0.1, 0.0, -1.8)]

    def estimate(self, *args, **kw):
        c = super().estimate(*args, **kw)
        c.wd_um, c.stig_x, c.stig_y = self.ANSWERS[min(self.calls - 1, len(self.ANSWERS) - 1)]
        c.status, c.extra = "ok", {}
        return c


def test_stigmator_answers_that_grow_end_the_run_with_an_error_and_the_start_restored():
    sem = FakeSBEMimageSEM()
    start = (sem.wd, sem.stig)
    with serving(GrowingStigmatorAnswers(blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
        res = run_deepfocus_af(sem, settings_for(address, max_iterations=5, wd_tolerance_um=0.01,
                                                 stig_tolerance=0.25))
    assert not res.ok and "ERROR" in res.message and "grew" in res.message and "calibration" in res.message
    assert len(res.iterations) == 2 and (sem.wd, sem.stig) == start


class AstigmatismTooUncertain(PowerRatioEstimator):
    """A small wd answer whose patches disagree on astigmatism: wd only, stigmators 0."""

    def estimate(self, *args, **kw):
        c = super().estimate(*args, **kw)
        c.wd_um, c.stig_x, c.stig_y, c.astig_x_um, c.astig_y_um = 0.2, 0.0, 0.0, 0.0, 0.0
        c.status, c.extra = "ok", {"astig_uncertain": True, "astig_um_unapplied": [1.5, -0.9]}
        return c


def test_a_wd_only_answer_never_counts_as_converged():
    # its zero stigmator answer is no measurement: the closed loop does not converge on one either
    sem = FakeSBEMimageSEM()
    with serving(AstigmatismTooUncertain(blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
        res = run_deepfocus_af(sem, settings_for(address, max_iterations=3))
    assert res.ok and not res.converged and len(res.iterations) == 3
    assert "not converged after 3 iterations" in res.message
    # focus alone asked for: then a small wd answer is all there is to it
    sem = FakeSBEMimageSEM()
    with serving(AstigmatismTooUncertain(blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
        res = run_deepfocus_af(sem, settings_for(address, max_iterations=3, aberr_mode=(True, False, False)))
    assert res.converged and len(res.iterations) == 1


class RangeLimited(PowerRatioEstimator):
    """A model trained within 30 um of focus at +-5 um: further out its patches disagree on wd; pairs at up to
    +-15 um it reads three times as far (here: the fake microscope's truth, wd only)."""
    perturbation_range_m = (2.5e-6, 15e-6)

    def __init__(self, sem, **kw):
        super().__init__(**kw)
        self.sem, self.asked = sem, []

    def estimate(self, minus, plus, pixel_size_m, perturbation_m=None, **kw):
        self.asked.append(perturbation_m)
        c = super().estimate(minus, plus, pixel_size_m, perturbation_m, **kw)
        off_um = (self.sem.true_wd - self.sem.wd) * 1e6
        if abs(off_um) > 30 * perturbation_m / 5e-6:
            c.status, c.extra = "uncertain", {"wd_uncertain": True, "reason": "patches disagree on wd"}
        elif abs(off_um) > 30:
            c.wd_um, c.stig_x, c.stig_y, c.status, c.extra = off_um, 0.0, 0.0, "ok", {"astig_uncertain": True}
        return c


def run_from(start_um: float, estimator_cls=RangeLimited, **settings):
    """The plug-in's run from ``start_um`` above focus, its daemon answering with ``estimator_cls``: (fake SEM,
    estimator, result, starting wd)."""
    sem = FakeSBEMimageSEM()
    start = sem.true_wd + start_um * 1e-6
    sem.wd = start
    est = estimator_cls(sem, blur_px_per_um=BETA_PX_PER_UM, patch_px=128)
    with serving(est) as address:
        res = run_deepfocus_af(sem, settings_for(address, **settings))
    return sem, est, res, start


def test_a_pair_refused_far_from_focus_is_taken_once_more_at_three_times_the_perturbation():
    sem, est, res, start = run_from(60.0, max_iterations=5, max_wd_stig_diff=(80e-6, 2.0, 2.0))
    assert res.ok and res.converged, res.message
    assert [it.far for it in res.iterations][:3] == [False, True, False]
    assert [it.applied for it in res.iterations][:2] == [False, True]
    assert est.asked[:3] == pytest.approx([5e-6, 15e-6, 5e-6])
    # the far pair at -/+ 15 um around the start, its wd answer applied in full, the stigmators left alone
    assert sem.wd_log[3:6] == pytest.approx([start - 15e-6, start + 15e-6, start])
    assert res.iterations[2].wd_before_m == pytest.approx(sem.true_wd, abs=1e-9)
    assert abs(sem.wd - sem.true_wd) < 1e-6


@pytest.mark.parametrize("factor, start_um, expect", [
    (0.0, 60.0, "marked 'uncertain'"),                      # switched off: refused as before
    (3.0, 100.0, "at the far perturbation 15 um"),          # beyond the far pair's reach too: refused there
])
def test_a_far_pair_that_is_off_or_refused_ends_the_run_with_the_start_restored(factor, start_um, expect):
    sem = FakeSBEMimageSEM()
    start = (sem.true_wd + start_um * 1e-6, sem.stig)
    sem.wd = start[0]
    with serving(RangeLimited(sem, blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
        res = run_deepfocus_af(sem, settings_for(address, max_iterations=5, far_perturbation_factor=factor,
                                                 max_wd_stig_diff=(150e-6, 2.0, 2.0)))
    assert not res.ok and "ERROR" in res.message and expect in res.message
    assert (sem.wd, sem.stig) == start


class NarrowBeam(RangeLimited):
    """RangeLimited, set up by its daemon for a beam of half the model's reference angle."""
    alpha_ref_mrad = 4.0
    aperture_angle_mrad = 2.0


def test_unset_the_pair_is_the_one_the_daemons_model_wants_on_its_beam():
    # half the reference angle at the model's 10 nm: +-10 um, and the far pair as far apart as the model answers
    sem, est, res, start = run_from(80.0, NarrowBeam, max_iterations=5, pixel_size_nm=10.0,
                                    max_wd_stig_diff=(100e-6, 2.0, 2.0))
    assert res.ok and res.converged, res.message
    assert est.asked[:3] == pytest.approx([10e-6, 15e-6, 10e-6])
    assert sem.wd_log[:2] == pytest.approx([start - 10e-6, start + 10e-6])
    # a perturbation in the settings wins
    _, est, _, _ = run_from(0.0, NarrowBeam, max_iterations=1, perturbation_um=5.0)
    assert est.asked == pytest.approx([5e-6])


def test_a_pair_refused_on_the_last_iteration_is_an_error_not_a_completed_run():
    sem = FakeSBEMimageSEM()
    start = (sem.true_wd + 60e-6, sem.stig)
    sem.wd = start[0]
    with serving(RangeLimited(sem, blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
        res = run_deepfocus_af(sem, settings_for(address, max_iterations=1, max_wd_stig_diff=(80e-6, 2.0, 2.0)))
    assert not res.ok and "ERROR" in res.message and (sem.wd, sem.stig) == start


class PlayingLens(FakeSBEMimageSEM):
    """Its objective lens follows the set wd only once it has moved more than ``play`` (half-width)."""

    def __init__(self, play: float, **kw):
        super().__init__(**kw)
        self.play, self.lens = play, self.wd

    def set_wd(self, target_wd: float) -> bool:
        super().set_wd(target_wd)
        self.lens = min(max(self.lens, self.wd - self.play), self.wd + self.play)
        return True

    def acquire_frame(self, save_path_filename, extra_delay=0) -> bool:
        wd, self.wd = self.wd, self.lens          # the frame shows where the lens is
        try:
            return super().acquire_frame(save_path_filename, extra_delay)
        finally:
            self.wd = wd


class PairCentreAnswers(PowerRatioEstimator):
    """Exact answers from the pair's centre, the set wd (the play cancels between the pair's frames)."""

    def __init__(self, sem, **kw):
        super().__init__(**kw)
        self.sem = sem

    def estimate(self, *args, **kw):
        c = super().estimate(*args, **kw)
        s = self.sem
        c.wd_um = (s.true_wd - s.wd) * 1e6
        c.stig_x, c.stig_y = s.true_stig[0] - s.stig[0], s.true_stig[1] - s.stig[1]
        c.status, c.extra, c.uncertainty_wd_um, c.uncertainty_stig = "ok", {}, 0.01, 0.001
        return c


@pytest.mark.parametrize("start_um", [-6.0, 6.0])
def test_the_lens_play_given_is_compensated_and_a_step_up_comes_down_onto_its_target(start_um):
    play_um = 0.5
    ends = {}
    for given in (0.0, play_um):
        sem = PlayingLens(play_um * 1e-6)
        sem.set_wd(sem.true_wd + start_um * 1e-6)
        with serving(PairCentreAnswers(sem, blur_px_per_um=BETA_PX_PER_UM, patch_px=128)) as address:
            res = run_deepfocus_af(sem, settings_for(address, lens_play_um=given, wd_tolerance_um=0.1))
        assert res.ok and res.converged, res.message
        ends[given] = (sem.lens - sem.true_wd) * 1e6
        if given and start_um < 0:
            # the first step (up) went beyond its target by 4 x the play, then came down onto it
            target = res.iterations[1].wd_before_m
            assert sem.wd_log[4:6] == pytest.approx([target + 2e-6, target])
    assert abs(ends[0.0]) == pytest.approx(play_um, abs=1e-6)
    assert abs(ends[play_um]) < 1e-3


def test_a_lens_play_beyond_reason_is_refused_by_name():
    with pytest.raises(ValueError, match="deepfocus_lens_play_um"):
        DeepFocusSettings(lens_play_um=-0.2)
