"""``deepfocus survey``: the loop once on each of many simulated microscopes drawn from a seed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deepfocus.cli import main
from deepfocus.survey import KINDS, draw


def test_a_seed_draws_the_same_microscopes_within_the_stated_ranges():
    first, second = np.random.default_rng(7), np.random.default_rng(7)
    runs = [draw("geometry", i, first, []) for i in range(5)]
    assert runs == [draw("geometry", i, second, []) for i in range(5)]
    assert len({(r.pixel_size_nm, r.frame_px, r.start_wd_um) for r in runs}) == 5
    rng = np.random.default_rng(3)
    for kind in KINDS:
        for i in range(40):
            r = draw(kind, i, rng, ["a.tif", "b.tif"])
            assert r.specimen in ("a.tif", "b.tif") and abs(r.start_wd_um) <= 30 and max(map(abs, r.start_stig)) <= 6
            keys = dict(o.split("=") for o in r.overrides)
            if kind == "geometry":
                assert 1.2 <= float(keys["optics.aperture_angle_mrad"]) <= 14
                # the installation knows its beam: the calibration says the same angle
                assert keys["calibration.aperture_angle_mrad"] == keys["optics.aperture_angle_mrad"]
                assert 2 <= r.pixel_size_nm <= 40 and r.frame_px[1] in (r.frame_px[0], r.frame_px[0] * 3 // 4,
                                                                        r.frame_px[0] // 2)
            else:
                assert r.profile == "setup_a" and r.frame_px == (1024, 768) and keys["detector.bit_depth"] in "816"
    with pytest.raises(ValueError, match="survey kind must be one of geometry, detector"):
        draw("optics", 0, rng, [])


def test_the_survey_command_runs_the_loop_on_each_microscope_and_says_how_each_ended(tmp_path, capsys):
    out = tmp_path / "survey.json"
    code = main(["survey", "--kind", "detector", "--runs", "2", "--seed", "1", "--json", str(out)])
    summary = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert len(saved["runs"]) == 2 and sum(summary["ends"].values()) == 2
    for run in saved["runs"]:
        # each run ends as the loop ends, measured against the simulator's truth
        assert run["outcome"] in ("converged", "iteration_limit", "uncertain", "failed")
        assert np.isfinite(run["final_wd_um"]) and run["pairs"] >= 1
        assert run["within_margin"] == (abs(run["final_wd_um"]) <= 1.0 and max(map(abs, run["final_stig"])) <= 0.25)
    # the exit status says whether any run claimed convergence outside the margin
    assert code == (1 if summary["converged_outside_margin"] else 0)
