"""Aperture-normalised models: the estimator hands the model p * alpha_ref / alpha, from the microscope's profile."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepfocus.calibration import StigCalibration
from deepfocus.estimator import DEFAULT_MODEL, MODELS_DIR, DeepFocusEstimator
from deepfocus.model_files import load_estimator, load_estimator_for
from hardware.config import load_profile


class EchoPixelSize(torch.nn.Module):
    """Returns the pixel size it was given as the wd correction of every patch (plumbing check)."""

    def forward(self, x: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 4)
        out[:, 0] = pixel_size_nm
        return out


def textured_pair(n=512, seed=0):
    rng = np.random.default_rng(seed)
    import cv2
    img = cv2.GaussianBlur(rng.random((n, n)).astype(np.float32), (0, 0), 3)
    img = (img - img.min()) / (img.max() - img.min()) * 60000
    # two scans of the same field: the same texture, its own shot noise each
    return tuple(np.clip(img + rng.normal(0, 300, img.shape), 0, 65535).astype(np.uint16) for _ in range(2))


@pytest.fixture
def echo_model_file(tmp_path):
    path = tmp_path / "echo.pt"
    torch.jit.save(torch.jit.script(EchoPixelSize()), str(path),
                   _extra_files={"meta.json": json.dumps({"arch": "echo", "alpha_ref_mrad": 4.0, "patch_px": 128})})
    return path


def test_normalised_model_sees_the_pixel_size_scaled_by_the_aperture(echo_model_file):
    minus, plus = textured_pair()
    est = load_estimator(echo_model_file, aperture_angle_mrad=3.0)
    assert est.estimate(minus, plus, 10e-9).wd_um == pytest.approx(10.0 * 4.0 / 3.0, rel=1e-5)
    # a per-call angle wins over the configured one
    assert est.estimate(minus, plus, 10e-9, aperture_angle_mrad=5.0).wd_um == pytest.approx(8.0, rel=1e-5)
    # no angle anywhere: the reference microscope is assumed
    assert load_estimator(echo_model_file).estimate(minus, plus, 10e-9).wd_um == pytest.approx(10.0, rel=1e-5)


def test_profile_calibration_supplies_the_angle(echo_model_file):
    cfg = load_profile("setup_b")
    assert cfg.calibration.aperture_angle_mrad == 3.0
    est = load_estimator_for(cfg, echo_model_file)
    assert est.aperture_angle_mrad == 3.0
    minus, plus = textured_pair()
    assert est.estimate(minus, plus, 8e-9).wd_um == pytest.approx(8.0 * 4.0 / 3.0, rel=1e-5)


@pytest.mark.parametrize("bad", [0.0, -4.0, float("nan"), 4000.0])
def test_implausible_angles_are_refused(echo_model_file, bad):
    with pytest.raises(ValueError, match="aperture_angle_mrad"):
        load_estimator(echo_model_file, aperture_angle_mrad=bad)


def test_models_without_a_reference_angle_are_unaffected():
    est = load_estimator(MODELS_DIR / "spectral_v1.pt", aperture_angle_mrad=3.0)
    assert est.alpha_ref_mrad is None
    assert est.model_pixel_size_nm(10e-9) == pytest.approx(10.0)


def test_the_default_model_is_aperture_normalised():
    est = load_estimator(DEFAULT_MODEL, aperture_angle_mrad=3.0)
    assert est.alpha_ref_mrad == 4.0
    assert est.model_pixel_size_nm(10e-9) == pytest.approx(10.0 * 4.0 / 3.0)


def test_daemon_loader_calibrates_models_for_its_microscope(echo_model_file):
    from deepfocus.service.cli import daemon_model_loader
    est = daemon_model_loader("setup_b", ["calibration.aperture_angle_mrad=2.5"])(echo_model_file, "cpu")
    assert isinstance(est, DeepFocusEstimator) and est.aperture_angle_mrad == 2.5
    cal = load_profile("setup_b").calibration
    # setup_b's scan is rotated 90 degrees: its calibration folds that in
    expected = StigCalibration.from_rotation_scale(cal.stig_rotation_deg, cal.stig_scale_um_per_unit, 90.0)
    assert est.calibration.matrix == pytest.approx(expected.matrix)


def test_daemon_loader_gives_its_models_the_patch_count_it_was_started_with(echo_model_file):
    from deepfocus.service.cli import daemon_model_loader
    est = daemon_model_loader(None, [], patches=12)(echo_model_file, "cpu")
    assert est.settings.n_patches == 12 and est.aperture_angle_mrad is None
    # every patch pair of a 512 x 512 frame is cut from its own place: 12 answers
    assert est.estimate(*textured_pair(512), 10e-9, 5e-6).n_patches == 12
    both = daemon_model_loader("setup_b", [], patches=12)(echo_model_file, "cpu")
    assert both.settings.n_patches == 12
    assert both.aperture_angle_mrad == load_profile("setup_b").calibration.aperture_angle_mrad
    assert daemon_model_loader("setup_b", [])(echo_model_file, "cpu").settings.n_patches == 8


def test_daemon_loader_refuses_a_bad_patch_count_or_overrides_without_a_profile():
    from deepfocus.service.cli import daemon_model_loader
    with pytest.raises(ValueError, match="--patches must be at least 3"):
        daemon_model_loader(None, [], patches=2)
    with pytest.raises(ValueError, match="--set needs --profile"):
        daemon_model_loader(None, ["calibration.aperture_angle_mrad=3"])


def test_the_pair_is_taken_further_apart_on_a_narrow_beam_or_coarse_pixels(echo_model_file):
    est = load_estimator(echo_model_file, aperture_angle_mrad=4.0)
    assert est.pair_perturbation_m(10e-9) == pytest.approx(5e-6)              # the thesis' pair and beam
    assert est.pair_perturbation_m(10e-9, 2.0) == pytest.approx(10e-6)        # half the blur per um of defocus
    assert est.pair_perturbation_m(10e-9, 3.0) == pytest.approx(5e-6 * 4 / 3)
    assert est.pair_perturbation_m(20e-9) == pytest.approx(10e-6)             # half the blur per pixel
    # never closer than the model's own: a closer pair narrows the wd range the model reads
    assert est.pair_perturbation_m(10e-9, 6.0) == pytest.approx(5e-6)
    assert est.pair_perturbation_m(4e-9) == pytest.approx(5e-6)
    # at most the largest the model answers
    assert est.pair_perturbation_m(10e-9, 1.0) == pytest.approx(est.perturbation_range_m[1])
    # with no angle known the model's reference is assumed, as the estimator assumes it for its answers
    assert load_estimator(echo_model_file).pair_perturbation_m(20e-9) == pytest.approx(10e-6)
    assert load_estimator(echo_model_file).pair_perturbation_m(10e-9) == pytest.approx(5e-6)
    # a model that is not aperture-normalised: its own
    v1 = load_estimator(MODELS_DIR / "spectral_v1.pt", aperture_angle_mrad=2.0)
    assert v1.pair_perturbation_m(20e-9) == pytest.approx(v1.perturbation_m)


class Answers(torch.nn.Module):
    """Answers a fixed row for every patch pair: ``columns`` values, NaN from ``nan_from`` patch pairs on."""

    def __init__(self, columns: int = 4, nan_from: int = 10 ** 6):
        super().__init__()
        self.columns = columns
        self.nan_from = nan_from

    def forward(self, x: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        out = torch.ones(x.shape[0], self.columns)
        if x.shape[0] >= self.nan_from:
            out[:, 0] = float("nan")
        return out


def _save(path, module, meta):
    files = {} if meta is None else {"meta.json": meta if isinstance(meta, str) else json.dumps(meta)}
    torch.jit.save(torch.jit.script(module), str(path), _extra_files=files)
    return path


META = {"arch": "test", "alpha_ref_mrad": 4.0, "patch_px": 128}


@pytest.mark.parametrize("module, meta, named", [
    (Answers(), None, "has no meta.json"),                               # conventions would be guessed
    (Answers(), "{arch: x", "its meta.json is not valid JSON"),
    (Answers(), [1, 2], "meta.json holds list"),
    (Answers(), dict(META, patch_px=-5), "patch_px -5 is not a whole number"),
    (Answers(), dict(META, perturbation_um=0), "perturbation_um 0 is not a positive number"),
    (Answers(), dict(META, model_pixel_nm_range=[20, 5]), "model_pixel_nm_range [20, 5] is not"),
    (Answers(columns=2), META, "answers 8 patch pairs with (8, 2): a DeepFocus model answers (8, 4)"),
    (Answers(nan_from=1), META, "answers 8 patch pairs with non-finite values"),
])
def test_a_model_file_of_another_kind_is_refused_at_load_naming_what_it_lacks(tmp_path, module, meta, named):
    path = _save(tmp_path / "other.pt", module, meta)
    with pytest.raises(ValueError, match="other.pt") as err:
        load_estimator(path, device="cpu")
    assert named in str(err.value)


def test_a_model_answering_nan_for_a_frame_is_uncertain_not_ok(tmp_path):
    # finite on the warm-up batches (8 and 4 patch pairs), NaN for the 16 patch pairs of a large frame
    path = _save(tmp_path / "nan16.pt", Answers(nan_from=16), META)
    est = load_estimator(path, device="cpu")
    minus, plus = textured_pair(2048)
    c = est.estimate(minus, plus, 10e-9)
    assert c.n_patches == 16 and c.status == "uncertain" and "non-finite" in c.extra["reason"]
    assert np.isinf(c.uncertainty_wd_um)
    assert est.estimate(*textured_pair(512), 10e-9).status == "ok"

