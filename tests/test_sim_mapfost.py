"""External validation: MAPFoSt (the `mapfost` package, written independently of this code) reads the
simulator's aberrations back from a wd +- 5 um pair, and a closed loop on its estimates converges."""
from __future__ import annotations

import math

import numpy as np
import pytest

mapfost = pytest.importorskip("mapfost.mapfost", reason="mapfost is in the [test] extra")

from hardware.factory import open_microscope  # noqa: E402
from hardware.sim.series import set_relative_aberration  # noqa: E402


def estimate(scope):
    """One MAPFoSt estimate of the current aberration (um, image frame) from a +-5 um pair."""
    sem = scope.sem
    wd = sem.get_wd_m()
    sem.set_wd_m(wd - 5e-6)
    minus = sem.grab_frame().image.astype(np.float64)
    sem.set_wd_m(wd + 5e-6)
    plus = sem.grab_frame().image.astype(np.float64)
    sem.set_wd_m(wd)
    alpha = scope.config.optics.aperture_angle_mrad * 1e-3
    ok, _, res = mapfost.est_aberr([minus, plus], [-5.0, 5.0], pix_size_um=sem.get_scan().pixel_size_m * 1e6,
                                   num_aperture=alpha * 0.25, stig_rot_deg=0, stig_scale=[1, 1],
                                   crop_ref=(128, 128), crop_size=(512, 512), radial_aperture=0.25)
    assert res is not None, f"mapfost failed: {ok}"
    return np.asarray(res.x, float)


def truth(scope):
    a = scope.sim.aberration()
    return np.array([a.defocus_um, a.astig_x_um, a.astig_y_um])


@pytest.fixture
def scope():
    s = open_microscope("setup_a", ["stigmator.rotation_deg=30"])
    s.sem.set_scan(pixel_size_m=10e-9, width_px=768, height_px=768, dwell_s=200e-9)
    return s


@pytest.mark.parametrize("z_um, stig", [(6.0, (0.0, 0.0)), (-8.0, (0.0, 0.0)), (3.0, (1.0, 0.0)),
                                        (0.0, (0.0, 1.0)), (-5.0, (-0.8, 0.6))])
def test_first_estimate_recovers_the_true_aberration(scope, z_um, stig):
    set_relative_aberration(scope, z_um, stig)
    t = truth(scope)
    est = estimate(scope)
    # MAPFoSt's Gaussian spot over-estimates a uniform spot's blur by about 20 %
    err = np.linalg.norm(est - t)
    assert err <= 0.25 * np.linalg.norm(t) + 0.3, f"truth {t}, mapfost {est}"


def test_closed_loop_on_mapfost_converges(scope):
    cfg = scope.config.stigmator
    set_relative_aberration(scope, 12.0, (1.5, -1.2))
    rot = math.radians(cfg.rotation_deg)
    for _ in range(6):
        z, ax, ay = estimate(scope)
        # image-frame astigmatism (um) -> stigmator units, through the known calibration
        dsx = (math.cos(rot) * ax + math.sin(rot) * ay) / cfg.scale_um_per_unit
        dsy = (-math.sin(rot) * ax + math.cos(rot) * ay) / cfg.scale_um_per_unit
        sx, sy = scope.sem.get_stig()
        scope.sem.set_wd_m(scope.sem.get_wd_m() - z * 1e-6)
        scope.sem.set_stig(sx - dsx, sy - dsy)
    t = truth(scope)
    stig_err = np.subtract(scope.sem.get_stig(), scope.sim.true_stig())
    assert abs(t[0]) < 1.0, t
    assert np.all(np.abs(stig_err) < 0.25), stig_err


@pytest.mark.parametrize("z_um", [22.0, 27.0])
def test_mapfost_on_a_frame_no_larger_than_its_crop_keeps_room_to_register(z_um):
    """On a 512 x 512 frame the 512 px crop would fill the frame: far from focus mapfost's registration then
    moves it out of the frame and the estimate fails. The wrapper takes a smaller centred crop instead."""
    from deepfocus.autofocus import acquire_pair
    from deepfocus.methods import MapfostEstimator

    s = open_microscope("setup_a", ["seed=3"])
    s.sem.set_scan(pixel_size_m=10e-9, width_px=512, height_px=512, dwell_s=50e-9)
    set_relative_aberration(s, z_um, (0.0, 0.0))
    est = MapfostEstimator(s.config.optics.aperture_angle_mrad * 1e-3)
    minus, plus = acquire_pair(s.sem, 5e-6)
    c = est.estimate(minus.image, plus.image, 10e-9)
    assert c.status == "ok", c.extra
    t = truth(s)
    # the correction to add points back to focus and takes out most of the defocus
    assert abs(c.wd_um + t[0]) <= 0.4 * abs(t[0]), (c.wd_um, t)


def test_mapfost_refuses_a_frame_too_small_for_a_crop_and_its_margin():
    from deepfocus.methods import MapfostEstimator

    est = MapfostEstimator(4e-3)
    img = np.random.default_rng(0).random((200, 200))
    with pytest.raises(ValueError, match="too small for MAPFoSt"):
        est.estimate(img, img, 10e-9)
