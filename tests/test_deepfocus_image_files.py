"""The pixel size an image file records, as the microscopes' software writes it, against the one predict is given."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from deepfocus.image_files import read_image, recorded_pixel_size_m

FRAME = (np.arange(128 * 160).reshape(128, 160) % 251).astype(np.uint8)


def _zeiss(path, pixel_text):
    # SmartSEM's CZ_SEM tag: a parameter's name in capitals, then "Label = value unit"
    text = f"0\r\nAP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = {pixel_text}\r\nAP_WD\r\nWD = 4.5 mm\r\n"
    tifffile.imwrite(path, FRAME, extratags=[(34118, "s", 0, text, False)])


def _fei(path, width_m):
    text = f"[User]\r\nDate=11/23/2026\r\n[Scan]\r\nPixelWidth={width_m}\r\nPixelHeight={width_m}\r\n"
    tifffile.imwrite(path, FRAME, extratags=[(34682, "s", 0, text, False)])


def test_the_recorded_pixel_size_is_read_from_ome_zeiss_and_fei_tiffs(tmp_path):
    tifffile.imwrite(tmp_path / "ome.ome.tif", FRAME, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.008, "PhysicalSizeXUnit": "µm"})
    _zeiss(tmp_path / "zeiss.tif", "5.000 nm")
    _zeiss(tmp_path / "zeiss_pm.tif", "558.2 pm")
    _fei(tmp_path / "fei.tif", "1.2e-08")
    tifffile.imwrite(tmp_path / "plain.tif", FRAME)
    assert recorded_pixel_size_m(tmp_path / "ome.ome.tif") == (pytest.approx(8e-9), "OME metadata")
    assert recorded_pixel_size_m(tmp_path / "zeiss.tif") == (pytest.approx(5e-9), "Zeiss SEM metadata")
    assert recorded_pixel_size_m(tmp_path / "zeiss_pm.tif")[0] == pytest.approx(0.5582e-9)
    assert recorded_pixel_size_m(tmp_path / "fei.tif") == (pytest.approx(12e-9), "FEI / Thermo Fisher metadata")
    assert recorded_pixel_size_m(tmp_path / "plain.tif") is None
    for name in ("ome.ome.tif", "zeiss.tif", "fei.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), FRAME)
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    assert recorded_pixel_size_m(tmp_path / "broken.tif") is None      # read_image says why it cannot be read


def test_predict_warns_when_the_file_records_another_pixel_size(tmp_path, capsys, pair_8um_short):
    from deepfocus.cli import main
    for name, frame in zip(("m.tif", "p.tif"), pair_8um_short):
        text = "AP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = 10.00 nm\r\n"
        tifffile.imwrite(tmp_path / name, frame, extratags=[(34118, "s", 0, text, False)])
    base = ["predict", str(tmp_path / "m.tif"), str(tmp_path / "p.tif"), "--perturbation-um", "5", "--json"]
    assert main(base + ["--pixel-size-nm", "10"]) == 0
    assert "records" not in capsys.readouterr().err
    assert main(base + ["--pixel-size-nm", "5"]) == 0
    err = capsys.readouterr().err
    assert "m.tif records 10 nm pixels (Zeiss SEM metadata), --pixel-size-nm gives 5" in err


def _zeiss_frame(path, frame, wd_mm):
    text = f"AP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = 10.00 nm\r\nAP_WD\r\nWD = {wd_mm:.4f} mm\r\n"
    tifffile.imwrite(path, frame, extratags=[(34118, "s", 0, text, False)])


def test_the_recorded_wd_is_read_from_zeiss_and_fei_tiffs_but_not_the_stages(tmp_path):
    from deepfocus.image_files import recorded_wd_m
    _zeiss_frame(tmp_path / "z.tif", FRAME, 4.505)
    text = "[EBeam]\r\nWD=0.004495\r\n[Stage]\r\nWorkingDistance=0.0041\r\n"
    tifffile.imwrite(tmp_path / "f.tif", FRAME, extratags=[(34682, "s", 0, text, False)])
    tifffile.imwrite(tmp_path / "stage_only.tif", FRAME,
                     extratags=[(34682, "s", 0, "[Stage]\r\nWorkingDistance=0.0041\r\n", False)])
    assert recorded_wd_m(tmp_path / "z.tif") == (pytest.approx(4.505e-3), "Zeiss SEM metadata")
    assert recorded_wd_m(tmp_path / "f.tif") == (pytest.approx(4.495e-3), "FEI / Thermo Fisher metadata")
    assert recorded_wd_m(tmp_path / "stage_only.tif") is None
    tifffile.imwrite(tmp_path / "plain.tif", FRAME)
    assert recorded_wd_m(tmp_path / "plain.tif") is None


def test_predict_refuses_frames_whose_files_record_them_the_other_way_round(tmp_path, capsys, pair_8um_short):
    # swapped, the pair answers the opposite correction as surely as the right one: only the files can tell
    from deepfocus.cli import main
    minus, plus = pair_8um_short
    _zeiss_frame(tmp_path / "m.tif", minus, 4.4950)
    _zeiss_frame(tmp_path / "p.tif", plus, 4.5050)
    base = ["--pixel-size-nm", "10", "--perturbation-um", "5", "--json"]
    assert main(["predict", str(tmp_path / "m.tif"), str(tmp_path / "p.tif")] + base) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["wd_um"] > 4 and "record" not in out.err
    for extra in ([], ["--connect", "tcp://127.0.0.1:1", "--timeout-s", "0.2", "--retries", "0"]):
        assert main(["predict", str(tmp_path / "p.tif"), str(tmp_path / "m.tif")] + base + extra) == 4
        err = capsys.readouterr().err
        assert "records wd 4.5050 mm" in err and "4.4950 mm" in err and "the other way round" in err


def test_predict_notes_a_pair_the_files_record_further_apart_than_it_is_told(tmp_path, capsys, pair_8um_short):
    from deepfocus.cli import main
    minus, plus = pair_8um_short
    _zeiss_frame(tmp_path / "m.tif", minus, 4.4920)
    _zeiss_frame(tmp_path / "p.tif", plus, 4.5080)
    assert main(["predict", str(tmp_path / "m.tif"), str(tmp_path / "p.tif"), "--pixel-size-nm", "10"]) == 0
    assert "a pair at wd -/+ 8 um, taken here as -/+ 5 um" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "m.tif"), str(tmp_path / "p.tif"), "--pixel-size-nm", "10",
                 "--perturbation-um", "8"]) == 0
    assert "record" not in capsys.readouterr().err
