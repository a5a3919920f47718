"""Saved frames with a data bar: the drawn rows are left out, the scanned part answers."""
from __future__ import annotations

import numpy as np
import pytest

from deepfocus.autofocus import acquire_pair
from deepfocus.databar import scanned_region
from deepfocus.model_files import load_estimator_for
from deepfocus.frame_artefacts import draw_databar
from hardware.factory import open_microscope

BAR_ROWS = 80


@pytest.fixture(scope="module")
def scope_and_pair():
    scope = open_microscope("setup_a", ["seed=4", "detector.bit_depth=8"])
    sem = scope.sem
    sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=100e-9)
    sem.set_stig(*scope.sim.true_stig())
    sem.set_wd_m(scope.sim.true_wd_m() + 9e-6)
    minus, plus = acquire_pair(sem, 5e-6)
    return scope, minus.image, plus.image


def with_bar(image: np.ndarray, wd_text: str) -> np.ndarray:
    """The frame as microscope software saves it: a black bar with white text over the bottom rows."""
    return draw_databar(image, BAR_ROWS, wd_text)


def test_a_drawn_bar_is_found_and_nothing_in_a_scanned_pair(scope_and_pair):
    _, minus, plus = scope_and_pair
    assert not scanned_region(minus, plus).any_dropped
    region = scanned_region(with_bar(minus, "4.495"), with_bar(plus, "4.505"))
    assert region.dropped_px == (0, BAR_ROWS, 0, 0)
    assert region.rows == slice(0, 768 - BAR_ROWS) and region.cols == slice(0, 1024)


def test_a_band_too_large_for_a_bar_is_kept(scope_and_pair):
    _, minus, plus = scope_and_pair
    a, b = minus.copy(), plus.copy()
    a[-400:] = b[-400:] = 0                  # half the frame blank in both: not a data bar, the structure test judges
    assert not scanned_region(a, b).any_dropped


def test_the_answer_with_a_bar_is_the_answer_without(scope_and_pair):
    scope, minus, plus = scope_and_pair
    est = load_estimator_for(scope.config)
    clean = est.estimate(minus, plus, 10e-9)
    barred = est.estimate(with_bar(minus, "4.495"), with_bar(plus, "4.505"), 10e-9)
    assert clean.status == barred.status == "ok"
    assert clean.wd_um == pytest.approx(-9.0, abs=1.0)
    assert barred.wd_um == pytest.approx(clean.wd_um, abs=0.3)
    assert barred.extra["databar_px"] == [0, BAR_ROWS, 0, 0] and "databar_px" not in clean.extra


def test_the_same_frame_twice_is_uncertain_not_a_move(scope_and_pair):
    scope, minus, plus = scope_and_pair
    est = load_estimator_for(scope.config)
    one = minus.copy()
    one[100, 100] ^= 1
    brighter = np.clip(minus.astype(np.float64) * 1.01 + 3, 0, 255).astype(minus.dtype)
    for first, copy in ((minus, minus.copy()), (minus, one), (minus, brighter),
                        (with_bar(minus, "4.495"), with_bar(minus, "4.505"))):      # told apart by their bars only
        c = est.estimate(first, copy, 10e-9)
        assert c.status == "uncertain" and (c.wd_um, c.stig_x, c.stig_y) == (0.0, 0.0, 0.0)
        assert "copies of one frame" in c.extra["reason"]
    assert est.estimate(minus, plus, 10e-9).status == "ok"


def test_bars_at_every_edge_are_found(scope_and_pair):
    """Software that draws its bar at the top or down a side: the edges are searched inwards one by one."""
    _, minus, plus = scope_and_pair
    a, b = minus.copy(), plus.copy()
    a[:24] = b[:24] = 0                         # a title bar
    a[:, -50:] = b[:, -50:] = 255               # a side panel
    a[:, :3] = b[:, :3] = 0                     # a thin frame line
    assert scanned_region(a, b).dropped_px == (24, 0, 3, 50)
