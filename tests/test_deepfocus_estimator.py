"""The in-process estimator: input checks, featureless images, calibration, the predict command."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfocus.calibration import StigCalibration
from deepfocus.estimator import DEFAULT_MODEL, EstimatorSettings, patch_offsets
from deepfocus.model_files import load_estimator
from deepfocus.models import SpectralNet
from deepfocus.train import export

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "spectral_test.pt"
    export(SpectralNet(), path, {"arch": "spectral", "perturbation_um": 5.0, "patch_px": 256})
    return path


@pytest.fixture(scope="module")
def pair():
    from deepfocus.autofocus import acquire_pair
    from hardware.factory import open_microscope
    scope = open_microscope("setup_a")
    sem = scope.sem
    sem.set_scan(pixel_size_m=10e-9, width_px=512, height_px=384, dwell_s=100e-9)
    minus, plus = acquire_pair(sem, 5e-6)
    return minus.image, plus.image


def test_a_pair_gives_a_finite_correction_with_uncertainty(model_file, pair):
    est = load_estimator(model_file, device="cpu")
    c = est.estimate(*pair, 10e-9)
    assert all(math.isfinite(v) for v in (c.wd_um, c.stig_x, c.stig_y, c.uncertainty_wd_um, c.uncertainty_stig))
    assert c.n_patches == EstimatorSettings().n_patches
    assert c.timings_s["total"] > 0


@pytest.mark.parametrize("minus, plus, match", [
    (np.zeros((256, 256), np.uint8), np.zeros((256, 300), np.uint8), "differ in shape"),
    (np.full((256, 256), np.nan, np.float32), np.zeros((256, 256), np.float32), "wd - d image contains 65536 NaN"),
    (np.zeros((256, 256), np.float32), np.eye(256, dtype=np.float32) / 0, "wd \\+ d image contains 65536 NaN or inf"),
    (np.zeros((256, 256), np.uint8), np.zeros((256, 256), np.uint16), "differ in type"),
    (np.zeros((3, 256, 256), np.uint8), np.zeros((3, 256, 256), np.uint8), "2-D"),
])
def test_bad_input_is_a_clear_error(model_file, minus, plus, match):
    est = load_estimator(model_file, device="cpu")
    with pytest.raises(ValueError, match=match):
        est.estimate(minus, plus, 10e-9)


def test_pixel_size_in_wrong_units_is_rejected(model_file, pair):
    est = load_estimator(model_file, device="cpu")
    with pytest.raises(ValueError, match="metres"):
        est.estimate(*pair, 10.0)          # nanometres passed as metres
    with pytest.raises(ValueError, match="perturbation"):
        est.estimate(*pair, 10e-9, perturbation_m=5.0)
    # numpy's numbers are numbers, and the range's end is inside it
    assert est.estimate(*pair, np.float32(10e-9)).wd_um == pytest.approx(est.estimate(*pair, 10e-9).wd_um, abs=1e-3)
    est.check_frames(pair[0].shape, 200 * 1e-9, 5e-6)


def test_float_frames_in_any_units_are_answered_as_the_same_frames(model_file, pair):
    """Frames in counts or physical units (values in the millions and beyond) overflowed the float32 spectra."""
    est = load_estimator(model_file, device="cpu")
    ref = est.estimate(*pair, 10e-9)
    for k in (1e12, -1e30):
        c = est.estimate(*(im.astype(np.float32) * np.float32(k) for im in pair), 10e-9)
        assert c.status == ref.status and c.wd_um == pytest.approx(ref.wd_um, abs=0.01)


@pytest.mark.parametrize("kind", ["constant", "noise"])
def test_featureless_images_are_uncertain_not_a_move(model_file, kind):
    rng = np.random.default_rng(0)
    if kind == "constant":
        a = b = np.full((512, 512), 117, np.uint8)
    else:
        a = rng.poisson(60, (512, 512)).astype(np.uint8)
        b = rng.poisson(60, (512, 512)).astype(np.uint8)
    c = load_estimator(model_file, device="cpu").estimate(a, b, 10e-9)
    assert c.status == "uncertain"
    assert (c.wd_um, c.stig_x, c.stig_y) == (0.0, 0.0, 0.0)
    assert "structure" in c.extra["reason"]


def test_missing_model_file_names_the_file():
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_estimator("/nonexistent/nope.pt")


def test_a_file_that_is_not_a_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript"):
        load_estimator(bad)


def test_patch_offsets_stay_inside_and_are_the_same_for_both_images():
    for layout in ("grid", "random"):
        offs = patch_offsets((768, 1024), 256, 8, layout, seed=3)
        assert len(offs) == 8
        assert all(0 <= y <= 512 and 0 <= x <= 768 for y, x in offs)
        assert offs == patch_offsets((768, 1024), 256, 8, layout, seed=3)


def test_calibration_converts_image_frame_astigmatism_to_the_simulators_units():
    from hardware.factory import open_microscope
    # setup_b with a calibration that matches its stigmator, scan rotated 90 degrees
    scope = open_microscope("setup_b", ["calibration.stig_rotation_deg=35", "calibration.stig_scale_um_per_unit=1.4"])
    cal = StigCalibration.from_config(scope.config)
    ts = np.array(scope.sim.true_stig())
    scope.sem.set_stig(*(ts + [0.8, -0.6]))
    ab = scope.sim.aberration()
    np.testing.assert_allclose(cal.units(ab.astig_x_um, ab.astig_y_um), [0.8, -0.6], atol=0.03)
    np.testing.assert_allclose(cal.astig_um(*cal.units(1.0, 2.0)), [1.0, 2.0], atol=1e-9)


def test_calibration_matrix_must_be_invertible():
    with pytest.raises(ValueError, match="invertible"):
        StigCalibration(((1.0, 2.0), (2.0, 4.0)))


def _write_pair(tmp_path, pair):
    import tifffile
    a, b = tmp_path / "minus.tif", tmp_path / "plus.tif"
    tifffile.imwrite(a, pair[0])
    tifffile.imwrite(b, pair[1])
    return a, b


def test_predict_command_prints_one_json_object(tmp_path, pair, model_file):
    a, b = _write_pair(tmp_path, pair)
    out = subprocess.run([sys.executable, "-m", "deepfocus.cli", "predict", str(a), str(b), "--pixel-size-nm", "10",
                          "--perturbation-um", "5", "--model", str(model_file), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("wd_um", "stig_x", "stig_y", "uncertainty_wd_um", "uncertainty_stig", "status"):
        assert key in d


def test_predict_command_rejects_a_missing_image(tmp_path, model_file):
    out = subprocess.run([sys.executable, "-m", "deepfocus.cli", "predict", str(tmp_path / "a.tif"),
                          str(tmp_path / "b.tif"), "--pixel-size-nm", "10", "--model", str(model_file), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode != 0 and "does not exist" in out.stderr


def test_the_shipped_model_exists_and_loads():
    est = load_estimator()
    assert DEFAULT_MODEL.stat().st_size < 10e6
    assert abs(est.perturbation_m - 5e-6) < 1e-9


def test_device_is_picked_automatically_and_a_missing_gpu_is_an_error():
    from deepfocus.estimator import pick_device
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' requested but CUDA is not available here"):
            pick_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        pick_device("bogus")


def test_predict_patches_option_sets_how_many_patch_pairs_are_used(tmp_path, pair, model_file):
    a, b = _write_pair(tmp_path, pair)
    counts = {}
    for n in ("4", "12"):
        out = subprocess.run([sys.executable, "-m", "deepfocus.cli", "predict", str(a), str(b), "--pixel-size-nm",
                              "10", "--model", str(model_file), "--patches", n, "--json"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr
        counts[n] = json.loads(out.stdout)["n_patches"]
    assert counts["4"] <= 4 < counts["12"] <= 12
    out = subprocess.run([sys.executable, "-m", "deepfocus.cli", "predict", str(a), str(b), "--pixel-size-nm", "10",
                          "--model", str(model_file), "--patches", "1"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode != 0 and "--patches" in out.stderr


def test_settings_without_a_patch_size_take_the_models():
    from deepfocus.estimator import DeepFocusEstimator, EstimatorSettings
    from deepfocus.models import SpectralNet
    est = DeepFocusEstimator(SpectralNet(), {"patch_px": 128}, settings=EstimatorSettings(n_patches=5), device="cpu")
    assert est.settings.patch_px == 128 and est.settings.n_patches == 5


def test_larger_frames_are_read_with_more_patch_pairs_up_to_the_limit():
    from deepfocus.patches import patch_count
    assert patch_count((768, 1024), 1, 8) == 8                   # the frame n_patches is meant for
    assert patch_count((384, 512), 1, 8) == 8                    # smaller frames: as many, overlapping
    assert patch_count((960, 1280), 1, 8) == 12                  # 1.56 x the area
    assert patch_count((1536, 2048), 1, 8) == 16                 # 4 x the area: capped at max_patches
    assert patch_count((1536, 2048), 2, 8) == 8                  # fine pixels binned 2 x 2 for the model
    assert patch_count((1536, 2048), 1, 8, scale_with_frame=False) == 8
    assert patch_count((1536, 2048), 1, 12) == 16
    assert patch_count((1536, 2048), 1, 20) == 20                # never fewer than asked for


def test_a_2048_x_1536_pair_is_answered_from_sixteen_patch_pairs(model_file):
    from deepfocus.autofocus import acquire_pair
    from hardware.factory import open_microscope
    scope = open_microscope("setup_a", ["seed=3"])
    scope.sem.set_scan(pixel_size_m=10e-9, width_px=2048, height_px=1536, dwell_s=50e-9)
    minus, plus = acquire_pair(scope.sem, 5e-6)
    est = load_estimator(model_file, device="cpu")
    c = est.estimate(minus.image, plus.image, 10e-9, 5e-6)
    assert c.status == "ok" and c.n_patches == 16, (c.status, c.n_patches, c.extra)
    fixed = load_estimator(model_file, device="cpu", settings=EstimatorSettings(patches_scale_with_frame=False))
    assert fixed.estimate(minus.image, plus.image, 10e-9, 5e-6).n_patches == 8


class _AgreeOnWd(torch.nn.Module):
    """Every patch answers wd 20 um; astigmatism alternates +-3 um between patches."""

    def forward(self, pair: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        n = pair.shape[0]
        sign = (torch.arange(n) % 2 * 2 - 1).float()
        return torch.stack([torch.full((n,), 20.0), 3.0 * sign, torch.zeros(n), torch.zeros(n)], dim=1)


def test_patches_that_disagree_only_on_astigmatism_give_a_wd_only_answer(pair):
    from deepfocus.estimator import DeepFocusEstimator
    est = DeepFocusEstimator(_AgreeOnWd(), {"perturbation_um": 5.0, "patch_px": 128})
    c = est.estimate(*pair, 10e-9, 5e-6)
    assert c.status == "ok"
    assert c.wd_um == pytest.approx(20.0)
    assert (c.astig_x_um, c.astig_y_um, c.stig_x, c.stig_y) == (0.0, 0.0, 0.0, 0.0)
    assert c.extra["astig_uncertain"] and "wd only" in c.extra["reason"]
    assert c.uncertainty_stig > 1.0          # the spread is still reported


def test_predict_reads_grey_saved_as_rgb_or_with_a_leading_axis_and_refuses_colour(tmp_path):
    import cv2
    import tifffile

    from deepfocus.image_files import read_image
    grey = (np.arange(64 * 80).reshape(64, 80) % 251).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([grey] * 3))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([grey] * 3 + [np.full_like(grey, 255)]))
    tifffile.imwrite(tmp_path / "page.tif", (grey.astype(np.uint16) * 200)[None])
    for name in ("grey.png", "rgb.png", "rgba.png"):
        np.testing.assert_array_equal(read_image(tmp_path / name), grey)
    page = read_image(tmp_path / "page.tif")
    assert page.dtype == np.uint16 and page.shape == grey.shape
    colour = np.dstack([grey, grey // 2, grey])
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with pytest.raises(ValueError, match="colour image"):
        read_image(tmp_path / "colour.png")
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([grey, grey]))
    with pytest.raises(ValueError, match="single grey image"):
        read_image(tmp_path / "stack.tif")
    # a palette image: its grey levels, not the indices into its palette (here in reverse order)
    from PIL import Image
    pal = Image.fromarray((255 - grey).astype(np.uint8), mode="P")
    pal.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    pal.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), grey)


def test_an_image_file_that_cannot_be_read_is_named(tmp_path):
    from deepfocus.image_files import read_image
    (tmp_path / "empty.npy").write_bytes(b"")
    import tifffile
    tifffile.imwrite(tmp_path / "whole.tif", np.zeros((256, 256), np.uint16))
    (tmp_path / "cut.tif").write_bytes((tmp_path / "whole.tif").read_bytes()[:60000])     # a copy cut short
    for name in ("empty.npy", "cut.tif"):
        with pytest.raises(ValueError, match=f"cannot read image file .*{name}"):
            read_image(tmp_path / name)
    with pytest.raises(OSError, match="is a directory, not an image file"):
        read_image(tmp_path)


def test_predict_says_which_aperture_angle_its_answer_assumes(tmp_path, capsys, pair_8um_short):
    from deepfocus.cli import main as cli_main
    a, b = _write_pair(tmp_path, pair_8um_short)
    base = ["predict", str(a), str(b), "--pixel-size-nm", "10", "--perturbation-um", "5", "--json"]
    assert cli_main(base) == 0
    cap = capsys.readouterr()
    assumed = json.loads(cap.out)
    assert assumed["aperture_angle_mrad"] == 4.0 and "assuming the model's reference 4 mrad" in cap.err
    assert cli_main(base + ["--aperture-angle-mrad", "4.0"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["wd_um"] == pytest.approx(assumed["wd_um"]) and "assuming" not in cap.err
    # believing a wider aperture turns the same blur into a smaller defocus
    assert cli_main(base + ["--aperture-angle-mrad", "5.5"]) == 0
    cap_wider = capsys.readouterr()
    wider = json.loads(cap_wider.out)
    assert wider["aperture_angle_mrad"] == 5.5 and 0 < wider["wd_um"] < 0.9 * assumed["wd_um"]
    assert "reads a pair" not in cap_wider.err + cap.err      # 5 um is the pair for 4 mrad and wider
    # on a narrow beam the answer comes with the pair the model reads best there
    assert cli_main(base + ["--aperture-angle-mrad", "2"]) == 0
    assert "on a 2 mrad beam at 10 nm pixels the model reads a pair at wd -/+ 10 um best" in capsys.readouterr().err
    assert cli_main(base + ["--aperture-angle-mrad", "4000"]) == 4
    assert "0.3 to 50" in capsys.readouterr().err
    assert cli_main(base + ["--aperture-angle-mrad", "4", "--connect", "tcp://127.0.0.1:1"]) == 4
    assert "cannot go with --connect" in capsys.readouterr().err


def test_predict_names_the_flag_when_the_pixel_size_is_in_the_wrong_unit(tmp_path, pair, model_file):
    a, b = _write_pair(tmp_path, pair)
    for wrong in ("0.01", "nan"):            # 10 nm given in um; not a number
        out = subprocess.run([sys.executable, "-m", "deepfocus.cli", "predict", str(a), str(b), "--pixel-size-nm",
                              wrong, "--model", str(model_file), "--json"], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert out.returncode == 4 and out.stdout == ""
        assert f"--pixel-size-nm {wrong}" in out.stderr and "nanometres" in out.stderr


def test_predict_checks_its_numbers_before_asking_a_daemon(tmp_path, pair, capsys):
    """0 or NaN would reach the daemon as "no perturbation given" and be answered for the model's own pair; the
    range's ends are inside it."""
    from deepfocus.cli import main as cli_main
    a, b = _write_pair(tmp_path, pair)
    base = ["predict", str(a), str(b), "--connect", "tcp://127.0.0.1:1", "--timeout-s", "0.2", "--retries", "0"]
    for bad in ("0", "nan", "-5"):
        assert cli_main(base + ["--pixel-size-nm", "10", "--perturbation-um", bad]) == 4
        assert "--perturbation-um must be the wd step of the pair in micrometres" in capsys.readouterr().err
    assert cli_main(base + ["--pixel-size-nm", "0.01"]) == 4
    assert "--pixel-size-nm 0.01 is outside" in capsys.readouterr().err
    # the range's end is taken (200 nm comes to 2.0000000000000002e-07 m); no daemon there to answer
    assert cli_main(base + ["--pixel-size-nm", "200"]) == 2
    assert "is not answering" in capsys.readouterr().err


def test_shipped_model_answers_mirror_averaged_and_older_models_plainly(pair):
    """The shipped model averages each patch pair's answer with its mirror image's; switched off, or with a model
    exported before that existed (spectral_v4), the plain answer comes back; the two answers agree within the
    model's precision on this near-focus pair."""
    averaged = load_estimator(device="cpu").estimate(*pair, 10e-9, 5e-6)
    plain = load_estimator(device="cpu", settings=EstimatorSettings(mirror_average=False)).estimate(*pair, 10e-9,
                                                                                                   5e-6)
    assert averaged.status == plain.status == "ok"
    assert averaged.wd_um != plain.wd_um
    assert averaged.wd_um == pytest.approx(plain.wd_um, abs=0.5)
    assert math.hypot(averaged.astig_x_um - plain.astig_x_um, averaged.astig_y_um - plain.astig_y_um) < 0.5
    v4 = load_estimator(DEFAULT_MODEL.parent / "spectral_v4.pt", device="cpu")
    assert not hasattr(v4.model, "forward_mirror_averaged")
    assert v4.estimate(*pair, 10e-9, 5e-6).status == "ok"


def test_a_pair_passed_the_other_way_round_is_answered_exactly_the_other_way_round():
    # The probe for aberration M is the probe for -M, so the swapped pair is the pair of the opposite aberration.
    # The model alone answers it not quite so (far from focus 0.35 um apart in astigmatism here); averaged over the
    # pair and its swap, the two answers are each other's negative.
    from deepfocus.autofocus import acquire_pair
    from deepfocus.estimator import EstimatorSettings
    from deepfocus.model_files import load_estimator_for
    from hardware.factory import open_microscope
    scope = open_microscope("setup_a", ["seed=4"])
    sem, sim = scope.sem, scope.sim
    sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=50e-9)
    sem.set_stig(*(np.array(sim.true_stig()) + (2.0, -1.5)))
    sem.set_wd_m(sim.true_wd_m() + 25e-6)
    minus, plus = acquire_pair(sem, 5e-6)
    sums = {}
    for swap in (True, False):
        est = load_estimator_for(scope.config, settings=EstimatorSettings(swap_average=swap))
        a = est.estimate(minus.image, plus.image, 10e-9, 5e-6)
        b = est.estimate(plus.image, minus.image, 10e-9, 5e-6)
        assert a.status == b.status == "ok" and a.wd_um == pytest.approx(-25.0, abs=1.5)
        sums[swap] = np.abs([a.wd_um + b.wd_um, a.astig_x_um + b.astig_x_um, a.astig_y_um + b.astig_y_um])
    assert sums[True].max() < 1e-3
    assert sums[False].max() > 0.1


@pytest.fixture(scope="module")
def far_and_near_pairs():
    from deepfocus.autofocus import acquire_pair
    from hardware.factory import open_microscope
    out = {}
    for name, z_um in (("far", 25.0), ("near", 2.0)):
        scope = open_microscope("setup_a", ["seed=4"])
        scope.sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=50e-9)
        scope.sem.set_wd_m(scope.sim.true_wd_m() + z_um * 1e-6)
        minus, plus = acquire_pair(scope.sem, 5e-6)
        out[name] = (minus.image, plus.image)
    return out


def test_an_answer_far_from_focus_is_taken_again_from_the_twelve_patch_grid(far_and_near_pairs):
    """On 1024 x 768 the 8-patch grid is part of the 12-patch one: far from focus the estimator answers the 4
    patches of the middle band too, exactly as a 12-patch estimator would; near focus it keeps the 8."""
    default = load_estimator(DEFAULT_MODEL, device="cpu")
    twelve = load_estimator(DEFAULT_MODEL, device="cpu", settings=EstimatorSettings(n_patches=12, far_patches=0))
    eight = load_estimator(DEFAULT_MODEL, device="cpu", settings=EstimatorSettings(far_patches=0))
    far = default.estimate(*far_and_near_pairs["far"], 10e-9, 5e-6)
    assert abs(far.wd_um) > 15 and far.extra["far_patches_added"] == 4 and far.n_patches == 12
    ref = twelve.estimate(*far_and_near_pairs["far"], 10e-9, 5e-6)
    assert (far.wd_um, far.stig_x, far.stig_y) == pytest.approx((ref.wd_um, ref.stig_x, ref.stig_y), abs=1e-4)
    assert eight.estimate(*far_and_near_pairs["far"], 10e-9, 5e-6).n_patches == 8
    near = default.estimate(*far_and_near_pairs["near"], 10e-9, 5e-6)
    assert abs(near.wd_um) < 5 and "far_patches_added" not in near.extra and near.n_patches == 8
    ref = eight.estimate(*far_and_near_pairs["near"], 10e-9, 5e-6)
    assert (near.wd_um, near.stig_x, near.stig_y) == (ref.wd_um, ref.stig_x, ref.stig_y)


def test_a_far_answer_on_a_large_frame_reads_up_to_far_max_patches():
    """2048 x 1536 px: 16 patch pairs near focus; far from focus the 32-patch grid's patches that overlap those 16
    by at most a quarter are added (14 of them)."""
    from deepfocus.autofocus import acquire_pair
    from hardware.factory import open_microscope
    scope = open_microscope("setup_a", ["seed=4"])
    scope.sem.set_scan(pixel_size_m=10e-9, width_px=2048, height_px=1536, dwell_s=50e-9)
    scope.sem.set_wd_m(scope.sim.true_wd_m() + 25e-6)
    minus, plus = acquire_pair(scope.sem, 5e-6)
    far = load_estimator(DEFAULT_MODEL, device="cpu").estimate(minus.image, plus.image, 10e-9, 5e-6)
    assert far.n_patches == 30 and far.extra["far_patches_added"] == 14
    capped = load_estimator(DEFAULT_MODEL, device="cpu", settings=EstimatorSettings(far_max_patches=16))
    assert capped.estimate(minus.image, plus.image, 10e-9, 5e-6).n_patches == 16


def test_a_pair_read_beyond_the_trained_wd_range_says_so():
    """A +-3 um pair 29 um from focus looks like a 5 um pair 48 um out, beyond the 34 um of training: the answer
    comes back short and says so; the +-5 um pair at the same place is within the range and says nothing."""
    from deepfocus.autofocus import acquire_pair
    from hardware.factory import open_microscope
    est = load_estimator(DEFAULT_MODEL, device="cpu")
    answers = {}
    for d_um in (3.0, 5.0):
        scope = open_microscope("setup_a", ["seed=5"])
        scope.sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=50e-9)
        scope.sem.set_wd_m(scope.sim.true_wd_m() - 29e-6)
        minus, plus = acquire_pair(scope.sem, d_um * 1e-6)
        answers[d_um] = est.estimate(minus.image, plus.image, 10e-9, d_um * 1e-6)
    assert answers[3.0].extra["beyond_trained_wd_um"] == pytest.approx(34.0 * 3 / 5)
    assert 20.4 < answers[3.0].wd_um < 27          # short of the 29 um to go
    assert "beyond_trained_wd_um" not in answers[5.0].extra and answers[5.0].wd_um > 26


def test_an_unsigned_frame_read_as_signed_is_refused_not_answered_short(pair_8um_short):
    """A uint16 file read as int16 turns its brightest pixels into its darkest: the shipped model answered this pair
    9.07 um against 8.09 read right (others up to 26 % short), and "ok". A truly signed frame is answered as the
    unsigned one."""
    est = load_estimator(DEFAULT_MODEL, device="cpu")
    a, b = pair_8um_short
    lo, hi = np.percentile(a, [0.5, 99.5])
    to16 = [np.clip((x.astype(float) - lo) / (hi - lo) * 50000 + 8000, 0, 65535).astype(np.uint16) for x in (a, b)]
    unsigned = est.estimate(*to16, 10e-9)
    assert unsigned.status == "ok" and unsigned.wd_um == pytest.approx(8.0, abs=1.5)
    with pytest.raises(ValueError, match="wd - d image's grey levels wrap around.*read it as uint16"):
        est.estimate(*(x.view(np.int16) for x in to16), 10e-9)
    signed = est.estimate(*((x.astype(np.int32) - 32768).astype(np.int16) for x in to16), 10e-9)
    assert signed.status == "ok" and signed.wd_um == pytest.approx(unsigned.wd_um, abs=0.05)


@pytest.mark.parametrize("rows", [132, 205, 253])
def test_a_frame_whose_short_side_is_no_multiple_of_8_is_answered(pair_8um_short, rows):
    """Frames whose short side (or what registration leaves of it, or the side binned for a wide beam) is under the
    model's patch and no multiple of 8 made the structure test raise a bare RuntimeError: every frame 1024 x 768
    at 2.5 nm pixels that moved between the two scans, every frame 132-135, 140-143, ... 252-255 px high."""
    est = load_estimator(DEFAULT_MODEL, device="cpu")
    a, b = pair_8um_short
    c = est.estimate(a[:rows], b[:rows], 10e-9)
    assert c.status == "ok" and c.wd_um == pytest.approx(8.0, abs=2.0)
