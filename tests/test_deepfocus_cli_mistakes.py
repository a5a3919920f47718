"""A user's slips on the ``deepfocus`` command line end in one line naming the slip and exit 4, before any frame."""
from __future__ import annotations

import pytest

from deepfocus.cli import EXIT_INPUT, main


@pytest.mark.parametrize("argv, named", [
    (["train", "--config", "/nonexistent/recipe.yaml"], "No such file or directory: '/nonexistent/recipe.yaml'"),
    (["train", "--config", "deepfocus/configs/baseline.yaml", "--generate-only", "--train-only"],
     "--generate-only and --train-only exclude each other"),
    (["speed", "--archs", "spectral,nosuch"], "unknown architecture(s) nosuch"),
    (["speed", "--archs", "spectral", "--idle-ms", "-5"], "--idle-ms -5: idle time must be 0-10 s"),
    (["predict", "a.tif", "b.tif", "--pixel-size-nm", "10", "--set", "calibration.aperture_angle_mrad=3"],
     "--set changes a profile's keys: give the profile"),
    (["bench", "--specimens", "/nonexistent/stack.tif", "--methods", "sweep", "--trials", "1", "--iterations", "1",
      "--frame-px", "256", "256"], "specimen file '/nonexistent/stack.tif' does not exist"),
    # beyond the estimator's pixel sizes, within the microscope's: refused before the first trial, not failed in each
    (["bench", "--pixel-size-nm", "500", "--methods", "deepfocus", "--trials", "1", "--iterations", "1"],
     "deepfocus: pixel_size_m must be in metres between"),
    (["autofocus", "--pixel-size-nm", "0.01"], "--pixel-size-nm 0.01, --dwell-ns 200, --frame-px 1024 768: pixel size"),
    (["bench", "--fidelity", "2"], "--fidelity 2: a slope and offset are fitted, give at least 3 pairs"),
    (["autofocus", "--method", "sweep", "--patches", "12"], "--method sweep takes neither"),
    (["evaluate", "--model", "deepfocus/models/spectral_v7.pt", "--shards", ".", "--specimen", "7"],
     "--specimen 7 is not one of the val specimens (0: flyem_fib25_8nm_520.ome.tif"),
    # a single step size makes too few stigmator steps for the fit: said at once, not after the measurement
    (["calibrate", "--profile", "setup_a", "--stig-steps", "2"], "2 stigmator offsets make 4 steps"),
])
def test_a_slip_is_named_with_exit_4(argv, named, capsys, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    assert main(argv) == EXIT_INPUT
    assert named in capsys.readouterr().err


def test_counts_below_one_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--trials", "0"])
    assert "argument --trials: must be at least 1, got 0" in capsys.readouterr().err


def test_a_shipped_model_is_found_by_its_name():
    from deepfocus.estimator import MODELS_DIR
    from deepfocus.model_files import load_estimator, model_path
    assert model_path("spectral_v5.pt") == MODELS_DIR / "spectral_v5.pt"
    assert load_estimator("spectral_v5.pt", device="cpu").model_id == "spectral_v5.pt"
    with pytest.raises(FileNotFoundError, match="'spectral_v9.pt' does not exist; shipped models in"):
        load_estimator("spectral_v9.pt")
