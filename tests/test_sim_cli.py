"""gcibsem sim-grab / sim-series as a user runs them, and the errors a user gets for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from acquisition.cli import main


def test_sim_grab_writes_a_tiff_that_records_the_true_aberration(tmp_path):
    out = tmp_path / "f.tif"
    rc = main(["sim-grab", "--profile", "setup_b", "--set", "beam.current_na=1.1", "--pixel-size-nm", "8",
               "--dwell-ns", "100", "--size", "200", "150", "--wd-offset-um", "-7", "--stig-offset", "0.5", "-1",
               "--out", str(out)])
    assert rc == 0
    with tifffile.TiffFile(out) as tif:
        img = tif.pages[0].asarray()
        rec = json.loads(tif.pages[0].description)
    assert img.shape == (150, 200) and img.dtype == np.uint8          # setup_b has an 8-bit detector
    assert rec["profile"] == "setup_b"
    assert rec["pixel_size_m"] == pytest.approx(8e-9) and rec["dwell_s"] == pytest.approx(100e-9)
    assert rec["beam_current_a"] == pytest.approx(1.1e-9)
    assert rec["truth"]["defocus_um"] == pytest.approx(-7.0, abs=1e-6)
    # 1.5 units of stigmator error at 1.4 um/unit is 1.4 * sqrt(0.5^2 + 1^2) um of astigmatism
    astig = np.hypot(rec["truth"]["astig_x_um"], rec["truth"]["astig_y_um"])
    assert astig == pytest.approx(1.4 * np.hypot(0.5, 1.0), rel=1e-3)


def test_sim_series_writes_ome_tiff_json_and_contact_sheet(tmp_path):
    rc = main(["sim-series", "--size", "96", "96", "--wd-range-um", "10", "--wd-step-um", "10",
               "--out", str(tmp_path / "s")])
    assert rc == 0
    with tifffile.TiffFile(tmp_path / "s" / "series.ome.tif") as tif:
        assert tif.is_ome
        stack = tif.series[0].asarray()
        assert 'PhysicalSizeX="0.01"' in tif.ome_metadata
    assert stack.shape == (3 + 4, 96, 96)
    planes = json.loads((tmp_path / "s" / "series.json").read_text())["planes"]
    assert [round(p["truth"]["defocus_um"], 6) for p in planes[:3]] == [-10.0, 0.0, 10.0]
    import cv2
    sheet = cv2.imread(str(tmp_path / "s" / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] > 96


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "acquisition.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--set", "optics.apertur_angle_mrad=3"], "unknown profile key 'optics.apertur_angle_mrad'"),
    (["--set", "beam.current_na=fast"], "beam.current_na: expected a number"),
    (["--set", "nonsense"], "not of the form KEY=VALUE"),
    (["--profile", "setup_z"], "unknown profile 'setup_z'"),
    (["--dwell-ns", "0"], "dwell time = 0"),
    (["--dwell-ns", "-50"], "dwell time = -5e-08"),
    (["--pixel-size-nm", "50000"], "pixel size = 5e-05 m is outside the limits"),
    (["--size", "100000", "10"], "frame width = 100000 px is outside the limits"),
    (["--wd-offset-um", "2e6"], "working distance"),
])
def test_bad_input_exits_non_zero_naming_the_problem(tmp_path, args, message):
    out = tmp_path / "x.tif"
    r = run_cli("sim-grab", "--size", "64", "64", *args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_unreadable_specimen_is_named(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff at all")
    r = run_cli("sim-grab", "--specimen", str(bad), "--size", "64", "64", "--out", str(tmp_path / "x.tif"))
    assert r.returncode == 2 and "cannot read specimen" in r.stderr and "broken.tif" in r.stderr
    r = run_cli("sim-grab", "--specimen", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.tif"))
    assert r.returncode == 2 and "missing.png" in r.stderr and "does not exist" in r.stderr


def test_png_specimen_needs_a_pixel_size(tmp_path):
    import cv2
    png = tmp_path / "spec.png"
    cv2.imwrite(str(png), (np.random.default_rng(0).random((128, 128)) * 255).astype(np.uint8))
    r = run_cli("sim-grab", "--specimen", str(png), "--size", "64", "64", "--out", str(tmp_path / "x.tif"))
    assert r.returncode == 2 and "records no pixel size" in r.stderr
    r = run_cli("sim-grab", "--specimen", str(png), "--specimen-pixel-size-nm", "5", "--size", "64", "64",
                "--out", str(tmp_path / "x.tif"))
    assert r.returncode == 0, r.stderr
