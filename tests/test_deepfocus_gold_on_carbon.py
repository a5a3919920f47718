"""A specimen unlike the tissue the shipped model saw: gold islands on carbon film, the usual SEM test target.

Most of the field is bare film, the structures are round, sharp-edged and bright; a model that had learnt
neuropil rather than blur would answer it wrongly.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from deepfocus.autofocus import acquire_pair
from deepfocus.bench import BenchConfig, aberrated_scope, true_correction_um
from deepfocus.estimator import DEFAULT_MODEL
from deepfocus.model_files import load_estimator_for
from hardware.config import load_profile
from hardware.errors import ConfigError
from hardware.sim.specimen import load_specimen
from hardware.sim.targets import GOLD_COVER, gold_on_carbon


def test_gold_on_carbon_is_sparse_bright_islands_on_dark_film():
    sp = load_specimen("gold-on-carbon")
    img = sp.slices[0]
    assert sp.pixel_size_m == 4e-9 and img.shape == (4096, 4096)
    gold = img > 0.6
    assert abs(gold.mean() - GOLD_COVER) < 0.04          # overlapping islands cover a little less
    assert 0.15 < float(np.median(img[~gold])) < 0.25     # the film, several times darker than gold
    labels, n = ndimage.label(gold)
    radii_nm = np.sqrt(np.bincount(labels.ravel())[1:] / np.pi) * 4.0
    assert n > 3000 and 10 < float(np.median(radii_nm)) < 40
    # the same seed is the same field; another seed another one
    assert np.array_equal(gold_on_carbon(256, 4e-9, seed=1).slices, gold_on_carbon(256, 4e-9, seed=1).slices)
    assert not np.array_equal(gold_on_carbon(256, 4e-9, seed=1).slices, gold_on_carbon(256, 4e-9, seed=2).slices)


def test_a_misspelt_target_names_the_targets_there_are():
    with pytest.raises(ConfigError, match="gold-on-carbon"):
        load_specimen("gold-on-carbn")


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no shipped model")
def test_the_shipped_model_focuses_on_gold_on_carbon():
    est = load_estimator_for(load_profile("setup_a"), device="cpu")
    cfg = BenchConfig(pixel_size_nm=10.0, dwell_ns=50.0)
    rng = np.random.default_rng(11)
    sp = load_specimen("gold-on-carbon")
    true, pred = [], []
    for z_um in (16.0, 9.0, 4.0, 3.0, 7.0, 12.0, 18.0):          # either side of focus, drawn per pair
        scope = aberrated_scope(cfg, rng, sp, (z_um, z_um), 1.0)
        minus, plus = acquire_pair(scope.sem, 5e-6)
        c = est.estimate(minus.image, plus.image, 10e-9, 5e-6)
        assert c.status == "ok", c.extra
        true.append(true_correction_um(minus, plus))
        pred.append(c.wd_um)
    t, p = np.array(true), np.array(pred)
    slope = np.polyfit(t, p, 1)[0]
    assert abs(slope - 1) < 0.08, (t, p)
    assert np.abs(p - t).mean() < 0.6, (t, p)
