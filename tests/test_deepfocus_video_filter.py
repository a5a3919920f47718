"""Frames that passed through a linear filter after detection (detector bandwidth, smoothing) for training."""
from __future__ import annotations

import numpy as np
import pytest

from deepfocus import datagen


def test_lowpass_runs_along_the_scan_lines_only():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (64, 256)).astype(np.float32)
    y = datagen.lowpass_fast_axis(x, 2.0)
    # neighbours along a line become correlated, neighbours across lines stay independent
    along = np.corrcoef(y[:, 1:].ravel(), y[:, :-1].ravel())[0, 1]
    across = np.corrcoef(y[1:, :].ravel(), y[:-1, :].ravel())[0, 1]
    assert along == pytest.approx(np.exp(-1 / 2.0), abs=0.05)
    assert abs(across) < 0.05
    # a constant line is passed unchanged (started in steady state), and so is the mean level
    flat = np.full((4, 50), 3.0, np.float32)
    assert np.allclose(datagen.lowpass_fast_axis(flat, 1.5), 3.0)
    assert np.array_equal(datagen.lowpass_fast_axis(x, 0.0), x)


def test_video_filter_treats_both_frames_of_a_pair_alike():
    rng = np.random.default_rng(3)
    frame = rng.normal(0, 1, (128, 128)).astype(np.float32)
    pair = np.stack([frame, frame])
    for seed in range(6):
        out = datagen.video_filter(pair, np.random.default_rng(seed))
        assert out.shape == pair.shape and out.dtype == np.float32
        assert np.array_equal(out[0], out[1])
        # shot noise is smoothed, never amplified
        assert out.std() < 0.95 * frame.std()


def _pair_shard(tmp_path, n: int, seed: int):
    """A raw pair shard of ``n`` random groups (8 nm pixels, 3 mrad), as an image-model run writes them."""
    rng = np.random.default_rng(seed)
    src = tmp_path / "train_0000.npz"
    np.savez(src, pairs=rng.integers(0, 256, (n, 4, 2, 256, 256), dtype=np.uint8),
             targets=rng.normal(0, 5, (n, 3)).astype(np.float32), specimen=np.arange(n, dtype=np.int16),
             pixel_size_nm=np.full(n, 8.0, np.float32), aperture_angle_mrad=np.full(n, 3.0, np.float32))
    return src


def test_feature_shards_from_pair_shards(tmp_path):
    n = 3
    src = _pair_shard(tmp_path, n, seed=1)
    dst = tmp_path / "out.npz"
    cfg = datagen.GenConfig(alpha_ref_mrad=4.0, video_filter_fraction=1.0)
    datagen.features_from_pair_shard(src, dst, cfg, seed=0, copies=2)
    with np.load(dst) as d, np.load(src) as s:
        assert d["features"].shape == (2 * n, 4, 3, 20, 12)
        assert np.array_equal(d["targets"][:n], s["targets"]) and np.array_equal(d["targets"][n:], s["targets"])
        # the augmented copy differs from the plain one
        assert not np.array_equal(d["features"][:n], d["features"][n:])
    with pytest.raises(FileNotFoundError, match="pair shard"):
        datagen.features_from_pair_shard(tmp_path / "missing.npz", dst, cfg, seed=0)


def test_a_believed_aperture_angle_off_by_a_drawn_factor_for_augmented_copies_only():
    cfg = datagen.GenConfig(alpha_ref_mrad=4.0, aperture_error_factor=1.6)
    rng = np.random.default_rng(0)
    assert datagen._believed_pixel_nm(8.0, 0, rng, cfg) == 8.0
    drawn = np.array([datagen._believed_pixel_nm(8.0, 1, rng, cfg) for _ in range(400)])
    assert drawn.min() >= 8.0 / 1.6 and drawn.max() <= 8.0 * 1.6
    # log-uniform: as many too large as too small, reaching near both ends
    assert abs(np.mean(np.log(drawn / 8.0))) < 0.05
    assert drawn.min() < 8.0 / 1.5 and drawn.max() > 8.0 * 1.5
    # the default draws nothing, so runs made before the key keep their seeded stream
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert datagen._believed_pixel_nm(8.0, 2, rng_a, datagen.GenConfig()) == 8.0
    assert rng_a.random() == rng_b.random()


def test_feature_shards_with_a_wrong_aperture_angle_keep_the_true_one_in_copy_0(tmp_path):
    n = 2
    src = _pair_shard(tmp_path, n, seed=2)
    plain, wrong = tmp_path / "plain.npz", tmp_path / "wrong.npz"
    datagen.features_from_pair_shard(src, plain, datagen.GenConfig(alpha_ref_mrad=4.0), seed=0, copies=2)
    datagen.features_from_pair_shard(src, wrong, datagen.GenConfig(alpha_ref_mrad=4.0, aperture_error_factor=1.6),
                                     seed=0, copies=2)
    with np.load(plain) as p, np.load(wrong) as w:
        assert np.array_equal(p["features"][:n], w["features"][:n])
        assert not np.array_equal(p["features"][n:], w["features"][n:])
        assert np.array_equal(p["targets"], w["targets"])



def test_an_image_specimen_is_stretched_along_x_and_the_generated_neuropil_kept(monkeypatch):
    from hardware.sim.specimen import Specimen
    img = np.random.default_rng(0).random((3, 40, 50)).astype(np.float32)
    s = datagen.stretched(Specimen(img, 8e-9, 8e-9, name="img"), 1.5)
    assert s.slices.shape == (3, 40, 75) and s.pixel_size_m == 8e-9
    assert np.allclose(s.slices[:, :, 0], img[:, :, 0], atol=0.05)      # stretched from the left edge, not shifted
    # in generation each microscope images its specimen stretched: an image specimen widens, generated neuropil
    # (drawn, not sampled from an image) keeps its shapes
    seen = {}

    def render(specimen, overrides, k, cfg, rng):
        seen[specimen.name] = specimen.slices.shape
        return np.zeros((k, 4, 2, 1, 1), np.float32), np.zeros((k, 3), np.float32), 10.0, 4.0
    monkeypatch.setattr(datagen, "render_groups", render)
    cfg = datagen.GenConfig(specimen_stretch=(1.4, 1.4), pairs_per_microscope=1)
    loaded = {"img": (None, Specimen(img, 8e-9, 8e-9, name="img"))}
    list(datagen.rendered_blocks([datagen.SpecimenSpec("img")], 1, cfg, np.random.default_rng(0), loaded))
    list(datagen.rendered_blocks([datagen.SpecimenSpec("synthetic:11")], 1, cfg, np.random.default_rng(0)))
    assert seen.pop("img x1.40") == (3, 40, 70)
    assert len(seen) == 1 and "x1.40" not in next(iter(seen))
