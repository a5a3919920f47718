"""A contrast change between the two frames of a pair is not read as defocus."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from deepfocus.autofocus import acquire_pair
from deepfocus.contrast import contrast_ratio
from deepfocus.estimator import EstimatorSettings, load_estimator_for
from hardware.factory import open_microscope


def _texture(seed: int, shape=(768, 1024)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # structure on all scales, as tissue has: summed octaves of smoothed noise
    img = sum(ndimage.gaussian_filter(rng.normal(size=shape), s) * s for s in (1, 4, 16, 64))
    return (img - img.mean()) / img.std()


def test_ratio_ignores_blur_and_measures_gain():
    base = _texture(1)
    sharp = ndimage.gaussian_filter(base, 1.0)
    blurred = ndimage.gaussian_filter(base, 8.0)       # 80 nm at 10 nm pixels: a defocus disc of |wd| ~ 20 um
    assert contrast_ratio(sharp, blurred, 10e-9).ratio == pytest.approx(1.0, abs=0.02)
    assert contrast_ratio(sharp, 1.25 * blurred + 3.0, 10e-9).ratio == pytest.approx(1.25, rel=0.02)
    # shading across the frame, different in the two frames, is not contrast
    ramp = np.linspace(-1.0, 1.0, base.shape[1])[None, :]
    assert contrast_ratio(sharp + ramp, blurred - ramp, 10e-9).ratio == pytest.approx(1.0, abs=0.02)
    # a frame a few band widths across cannot be measured: no answer rather than a guess
    assert contrast_ratio(sharp, blurred, 1e-9).ratio is None
    assert contrast_ratio(np.zeros((768, 1024)), np.zeros((768, 1024)), 10e-9).ratio is None


@pytest.fixture(scope="module")
def defocused_pair():
    scope = open_microscope("setup_a", ["seed=12"])
    sem = scope.sem
    sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=100e-9)
    sem.set_stig(*scope.sim.true_stig())
    sem.set_wd_m(scope.sim.true_wd_m() - 8e-6)
    minus, plus = acquire_pair(sem, 5e-6)
    return scope.config, minus.image.astype(np.float32), plus.image.astype(np.float32)


def _stretched(img: np.ndarray, gain: float) -> np.ndarray:
    return img.mean() + (img - img.mean()) * gain


def test_a_gain_change_between_the_frames_leaves_the_wd_answer(defocused_pair):
    cfg, minus, plus = defocused_pair
    est = load_estimator_for(cfg)
    plain = est.estimate(minus, plus, 10e-9)
    assert plain.status == "ok" and plain.wd_um == pytest.approx(8.0, abs=1.0)
    for gain in (0.85, 1.15):
        c = est.estimate(minus, _stretched(plus, gain), 10e-9)
        assert c.status == "ok" and c.extra["contrast_ratio"] == pytest.approx(gain, rel=0.03)
        assert c.wd_um == pytest.approx(plain.wd_um, abs=0.3)
    # without the matching the same 15 % reads as more than a micrometre of defocus
    raw = load_estimator_for(cfg, settings=EstimatorSettings(match_contrast=False))
    assert abs(raw.estimate(minus, _stretched(plus, 1.15), 10e-9).wd_um - plain.wd_um) > 1.0


def test_frames_far_apart_in_contrast_are_uncertain_not_a_move(defocused_pair):
    cfg, minus, plus = defocused_pair
    c = load_estimator_for(cfg).estimate(minus, _stretched(plus, 1.8), 10e-9)
    assert c.status == "uncertain" and (c.wd_um, c.stig_x, c.stig_y) == (0.0, 0.0, 0.0)
    assert "contrast" in c.extra["reason"] and c.extra["contrast_ratio"] == pytest.approx(1.8, rel=0.03)

