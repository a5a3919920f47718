"""`deepfocus bench --frame-artefacts`: answers on pairs changed as real saved frames are."""
from __future__ import annotations

import pytest

from deepfocus.bench import BenchConfig
from deepfocus.frame_artefacts import CHANGES, RAW, run_frame_artefacts


@pytest.fixture(scope="module")
def res():
    return run_frame_artefacts(BenchConfig(methods=["deepfocus"], dwell_ns=100), 3, log=lambda s: None)


def test_each_artefact_is_reported_with_and_without_the_frame_checks(res):
    assert set(res["changes"]) == {name for name, _, _ in CHANGES}
    clean = res["changes"]["none"]["deepfocus"]["bias_wd_um"]
    # measured on these 3 pairs: a 1.25 gain moves the raw answer 3.46 um, the checked one 0.01; the data bar 0.15 um
    # raw (more before the answers were averaged over the swapped pair and answers far from focus read 12 patches,
    # 4 of them away from the bar), 0.01 checked
    for name, moves_raw, moves_checked in (("gain 1.25", 1.5, 0.3), ("data bar 80 rows", 0.1, 0.05)):
        per = res["changes"][name]
        assert set(per) == {"deepfocus", RAW}
        # the artefact moves the raw answer; the shipped estimator answers as on the clean pair
        assert abs(per[RAW]["bias_wd_um"] - clean) > moves_raw, name
        assert abs(per["deepfocus"]["bias_wd_um"] - clean) < moves_checked, name


def test_shipped_model_reads_through_detector_bandwidth_and_smoothing(res):
    # real frames pass through a detector chain of finite bandwidth, and saved frames are often smoothed: both
    # frames alike, which leaves the aberration where it was
    clean = res["changes"]["none"]["deepfocus"]
    for name in ("bandwidth tau 2 px", "smoothed sigma 0.8 px"):
        got = res["changes"][name]["deepfocus"]
        assert got["uncertain"] == 0, name
        assert got["mae_wd_um"] < clean["mae_wd_um"] + 0.35, (name, got, clean)
        assert got["mae_astig_um"] < clean["mae_astig_um"] + 0.2, (name, got, clean)


def test_shipped_estimator_reads_through_a_shift_clipping_and_jpeg(res):
    # the plus frame moved by 24 px (drift after a stage move), frames clipped by a tight detector setting, or
    # saved as JPEG: the answer stays near the clean pair's
    clean = res["changes"]["none"]["deepfocus"]
    for name in ("shift 24 px", "clipped 2 %", "jpeg quality 75"):
        got = res["changes"][name]["deepfocus"]
        assert got["uncertain"] == 0, name
        assert got["mae_wd_um"] < clean["mae_wd_um"] + 0.3, (name, got, clean)
        assert got["mae_astig_um"] < clean["mae_astig_um"] + 0.15, (name, got, clean)


def test_frames_moved_by_a_third_of_the_field_are_refused_not_answered(res):
    got = res["changes"]["moved 300 px"]["deepfocus"]
    assert got["uncertain"] == 3, got


def test_line_offsets_are_taken_out_before_they_read_as_astigmatism(res):
    per = res["changes"]["line offsets 0.3 s.d."]
    clean = res["changes"]["none"]["deepfocus"]
    assert per[RAW]["mae_astig_um"] > clean["mae_astig_um"] + 0.3      # what the offsets do unchecked
    assert per["deepfocus"]["mae_astig_um"] < clean["mae_astig_um"] + 0.3
    assert per["deepfocus"]["mae_wd_um"] < clean["mae_wd_um"] + 0.3
