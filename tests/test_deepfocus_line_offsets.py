"""Per-line brightness offsets (detector flicker, mains pick-up) are taken out of the patches, and only they."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfocus.autofocus import acquire_pair
from deepfocus.datagen import lowpass_fast_axis, smooth_frames
from deepfocus.estimator import patch_offsets
from deepfocus.frame_artefacts import line_offsets
from deepfocus.line_offsets import offset_ratio, remove_line_offsets_
from hardware.factory import open_microscope
from hardware.sim.specimen import load_specimen


def _patches(minus, plus):
    offs = patch_offsets(minus.shape, 256, 8)
    return torch.from_numpy(np.stack([np.stack([minus[y:y + 256, x:x + 256], plus[y:y + 256, x:x + 256]])
                                      for y, x in offs]).astype(np.float32))


@pytest.fixture(scope="module", params=["synthetic", "flyem_fib25_8nm_520", "epfl_ca1_fibsem_5nm"])
def pair(request):
    spec = None
    if request.param != "synthetic":
        spec = load_specimen(request.getfixturevalue("em_dir") / f"{request.param}.ome.tif")
    scope = open_microscope("setup_a", ["seed=2"], specimen=spec)
    sem = scope.sem
    sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=50e-9)
    sem.set_wd_m(scope.sim.true_wd_m() + 12e-6)
    minus, plus = acquire_pair(sem, 5e-6)
    return minus.image, plus.image


@pytest.mark.parametrize("filtered", ["as rendered", "detector bandwidth", "smoothed"])
def test_clean_patches_are_left_alone(pair, filtered):
    # a detector's bandwidth smooths along the lines, which changes the column means but adds no line offsets
    f = {"as rendered": lambda a: a.astype(np.float32), "detector bandwidth": lambda a: lowpass_fast_axis(a, 2.5),
         "smoothed": lambda a: smooth_frames(lowpass_fast_axis(a, 2.0), 1.0)}[filtered]
    x = _patches(f(pair[0]), f(pair[1]))
    before = x.clone()
    assert not remove_line_offsets_(x).any()
    assert torch.equal(x, before)


def _ratio(x: torch.Tensor) -> torch.Tensor:
    return offset_ratio(x.reshape(-1, 256, 256))


def test_line_offsets_are_found_in_every_patch_and_taken_out(pair):
    rng = np.random.default_rng(3)
    clean = _patches(*pair)
    x = _patches(line_offsets(pair[0], 0.2, rng), line_offsets(pair[1], 0.2, rng))
    assert _ratio(x).min() > 3.0
    assert remove_line_offsets_(x).all()
    # the rows vary at short range no more than the clean patches' did
    assert (_ratio(x) < _ratio(clean) + 0.5).all()


def test_blank_ground_with_line_offsets_is_not_taken_for_structure():
    # Offsets live in the fx = 0 column of a patch's spectrum alone; their smooth remainder, left after the
    # short-range part is removed, made blank ground pass the structure test (half-blank frames, offsets of 0.1
    # frame s.d.: wd MAE 0.40 instead of 0.16 um, 3 of 16 pairs refused)
    from deepfocus.model_files import load_estimator
    est = load_estimator()
    rng = np.random.default_rng(3)
    blank = rng.normal(0.0, 0.05, (2, 256, 256)) + rng.normal(0.0, 0.05, (2, 256, 1))
    scope = open_microscope("setup_a", ["seed=3"])
    scope.sem.set_scan(pixel_size_m=10e-9, width_px=256, height_px=256, dwell_s=50e-9)
    tissue = np.stack([scope.sem.grab_frame().image for _ in range(2)]).astype(np.float64)
    tissue = (tissue - tissue.mean()) / tissue.std() * 0.3
    x = torch.from_numpy(np.stack([blank, tissue]).astype(np.float32))
    lined = remove_line_offsets_(x)
    assert lined[0].all()
    assert list(est._structured(x, lined)) == [False, True]
    # read with the fx = 0 column, the remainder of the offsets passes for structure
    assert est._structured(x)[0]
