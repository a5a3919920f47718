"""Frames of a pair that show the specimen moved (drift, a beam off the lens centre) are registered first."""
from __future__ import annotations

import numpy as np
import pytest

from deepfocus.autofocus import acquire_pair
from deepfocus.estimator import EstimatorSettings
from deepfocus.model_files import load_estimator
from deepfocus.frame_artefacts import shift_pair
from deepfocus.registration import PairShift, common_field, field_correlation, measure_shift
from hardware.factory import open_microscope
from hardware.sim.series import set_relative_aberration


def _pair(defocus_um: float):
    scope = open_microscope("setup_a", ["seed=4"])
    sem = scope.sem
    sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=50e-9)
    ts = scope.sim.true_stig()
    sem.set_stig(float(ts[0] + 0.8), float(ts[1] - 0.5))
    sem.set_wd_m(scope.sim.true_wd_m() + defocus_um * 1e-6)
    minus, plus = acquire_pair(sem, 5e-6)
    return minus.image, plus.image


def _wide_pair(width_px: int, defocus_um: float):
    """A pair wider than 1024 px, to cut 1024 px frames from that show the specimen moved along x."""
    scope = open_microscope("setup_a", ["seed=5"])
    scope.sem.set_scan(pixel_size_m=10e-9, width_px=width_px, height_px=768, dwell_s=50e-9)
    set_relative_aberration(scope, defocus_um, (0.5, -0.3))
    minus, plus = acquire_pair(scope.sem, 5e-6)
    return minus.image, plus.image


@pytest.fixture(scope="module")
def near():
    return _pair(3.0)


@pytest.mark.parametrize("defocus_um", [3.0, -25.0])
def test_a_shift_between_the_frames_is_measured_near_and_far_from_focus(defocus_um):
    minus, plus = _pair(defocus_um)
    for px in (6, 24, 48):
        s = measure_shift(*shift_pair(minus, plus, px))
        # the plus frame shows at (y - px, x - px) what the minus frame shows at (y, x); to one binned pixel
        assert abs(s.dy_px + px) <= 4 and abs(s.dx_px + px) <= 4, (px, s)


def test_aligned_blank_and_noise_frames_are_left_as_they_are(near):
    assert not measure_shift(*near).any
    flat = np.full((512, 512), 1000, np.uint16)
    assert not measure_shift(flat, flat).any
    for seed in range(10):
        rng = np.random.default_rng(seed)
        a, b = (rng.poisson(50, (512, 512)).astype(np.uint16) for _ in range(2))
        assert not measure_shift(a, b).any, seed


def test_common_field_crops_both_frames_to_the_same_specimen():
    rng = np.random.default_rng(1)
    scene = rng.normal(size=(300, 400)).astype(np.float32)
    minus, plus = scene[20:220, 30:330], scene[10:210, 45:345]   # plus shows scene[y + 10, x + 45] at (y, x)
    a, b = common_field(minus, plus, PairShift(10, -15, 1.0))
    assert a.shape == b.shape == (190, 285)
    np.testing.assert_array_equal(a, b)


def test_estimator_answers_a_shifted_pair_as_the_aligned_one(near):
    est = load_estimator(device="cpu")
    raw = load_estimator(device="cpu", settings=EstimatorSettings(register=False))
    aligned = est.estimate(*near, 10e-9, 5e-6)
    shifted = shift_pair(*near, 32)
    got = est.estimate(*shifted, 10e-9, 5e-6)
    assert got.extra["shift_px"] == [-32, -32]
    assert abs(got.wd_um - aligned.wd_um) < 0.3
    assert abs(got.astig_x_um - aligned.astig_x_um) < 0.2 and abs(got.astig_y_um - aligned.astig_y_um) < 0.2
    # without registration the same pair is read worse: the check has something to catch
    unreg = raw.estimate(*shifted, 10e-9, 5e-6)
    err = lambda c: abs(c.wd_um - aligned.wd_um) + abs(c.astig_x_um - aligned.astig_x_um) + abs(  # noqa: E731
        c.astig_y_um - aligned.astig_y_um)
    assert err(unreg) > err(got)


def test_a_shift_of_a_fifth_of_the_frame_is_found_and_answered_as_no_shift():
    """Two micrometres between the frames (a stage still settling): the whole frame is registered, not only its
    centre, so such a shift is found (a central 512 px crop did not find it: FlyEM pairs were answered up to 8 um
    off)."""
    minus, plus = _wide_pair(1224, 4.0)
    est = load_estimator(device="cpu")
    aligned = est.estimate(minus[:, :1024], plus[:, :1024], 10e-9, 5e-6)
    got = est.estimate(minus[:, :1024], plus[:, 200:], 10e-9, 5e-6)      # plus shows at x what minus shows at x + 200
    assert got.status == "ok"
    assert got.extra["shift_px"][0] == 0 and abs(got.extra["shift_px"][1] + 200) <= 4, got.extra
    assert abs(got.wd_um - aligned.wd_um) < 0.5
    assert abs(got.astig_x_um - aligned.astig_x_um) < 0.3 and abs(got.astig_y_um - aligned.astig_y_um) < 0.3


def test_a_frame_wider_than_the_registered_crop_still_has_its_drift_found():
    """2048 px wide frames are registered on their central 1024 px: a 200 px drift (2 um) is found there as on a
    1024 px frame, and the patches are cut from the field both frames share."""
    minus, plus = _wide_pair(2248, 4.0)
    shift = measure_shift(minus[:, :2048], plus[:, 200:])
    assert shift.dy_px == 0 and abs(shift.dx_px + 200) <= 4, shift
    est = load_estimator(device="cpu")
    aligned = est.estimate(minus[:, :2048], plus[:, :2048], 10e-9, 5e-6)
    got = est.estimate(minus[:, :2048], plus[:, 200:], 10e-9, 5e-6)
    assert got.status == "ok" and abs(got.extra["shift_px"][1] + 200) <= 4, got.extra
    assert abs(got.wd_um - aligned.wd_um) < 0.5


def test_frames_moved_by_more_than_registration_finds_are_answered_uncertain():
    """A third of the frame between the two frames is beyond what registration finds: the patches would compare
    different specimen, so the answer is "uncertain", not a move micrometres off. (The patches' spread refuses
    many such pairs on its own, not all: this one, answered plainly and with the contrast ratio divided out in
    full, came out 3.0 um off; with the ratio shrunk by its noise, or mirror averaged, the spread refuses it too.)"""
    minus, plus = _wide_pair(1472, 8.0)
    est = load_estimator(device="cpu")
    aligned = est.estimate(minus[:, :1024], plus[:, :1024], 10e-9, 5e-6)
    assert aligned.status == "ok" and aligned.extra["field_correlation"] > 0.9, aligned.extra
    moved = minus[:, :1024], plus[:, 360:1384]               # plus shows at x what minus shows at x + 360
    got = est.estimate(*moved, 10e-9, 5e-6)
    assert got.status == "uncertain" and "same field" in got.extra["reason"], got.extra
    assert got.extra["field_correlation"] < 0.3
    # without the check nothing the pair says can be trusted: micrometres off, or refused for its spread alone
    unchecked = load_estimator(device="cpu", settings=EstimatorSettings(min_field_correlation=0.0,
                                                                        mirror_average=False))
    c = unchecked.estimate(*moved, 10e-9, 5e-6)
    assert "same field" not in (c.extra.get("reason") or "")
    assert c.status == "uncertain" or abs(c.wd_um - aligned.wd_um) > 1.5, (c.wd_um, aligned.wd_um)


def test_field_correlation_of_a_genuine_pair_far_from_focus_is_high():
    minus, plus = _pair(-25.0)
    assert field_correlation(minus, plus) > 0.9
    assert field_correlation(minus[:, :700], plus[:, 300:1000]) < 0.3
    assert np.isnan(field_correlation(minus[:64, :64], plus[:64, :64]))     # too small to tell


def test_binned_frames_passed_in_give_the_same_answers_and_are_left_unchanged(near):
    """The estimator bins each frame once and hands the binned frames to registration, the same-field check and
    the contrast measurement; registration must not leave them windowed (OpenCV's phase correlation multiplies
    its inputs by the window in place)."""
    from deepfocus.contrast import contrast_ratio
    from deepfocus.registration import bin_frame
    minus, plus = shift_pair(*near, 24)
    binned = bin_frame(minus), bin_frame(plus)
    kept = binned[0].copy(), binned[1].copy()
    assert measure_shift(minus, plus, binned) == measure_shift(minus, plus)
    np.testing.assert_array_equal(binned[0], kept[0])
    np.testing.assert_array_equal(binned[1], kept[1])
    assert field_correlation(minus, plus, binned) == pytest.approx(field_correlation(minus, plus), abs=1e-6)
    full, shared = contrast_ratio(minus, plus, 10e-9), contrast_ratio(minus, plus, 10e-9, binned)
    assert shared.ratio == pytest.approx(full.ratio, abs=0.01)
    assert shared.mean_plus == pytest.approx(full.mean_plus, rel=1e-3)
