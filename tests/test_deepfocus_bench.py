"""The bench command writes the documented JSON and a PNG (a one-trial smoke run; figures come from real runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepfocus.bench import BenchConfig, run_bench, write
from deepfocus.estimator import DEFAULT_MODEL


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no shipped model")
def test_bench_reports_every_method_per_iteration(tmp_path):
    pytest.importorskip("mapfost.mapfost")
    cfg = BenchConfig(methods=["deepfocus", "mapfost"], trials=1, iterations=1, frame_px=(512, 512),
                      start_range_um=8.0, start_range_stig=1.0)
    res = run_bench(cfg, log=lambda s: None)
    out = tmp_path / "bench.json"
    write(res, out)
    data = json.loads(out.read_text())
    assert set(data["methods"]) == {"deepfocus", "mapfost"}
    for m in data["methods"].values():
        assert [r["iteration"] for r in m["iterations"]] == [0, 1]
        assert {"mae_wd_um", "mae_stig", "within_margin"} <= set(m["iterations"][0])
        assert {"compute_s_median", "time_to_focus_s_median", "dose_to_focus_e_per_nm2_median", "failed"} <= set(m)
        # one correction from a moderate start must reduce the defocus
        assert m["iterations"][1]["mae_wd_um"] < m["iterations"][0]["mae_wd_um"]
    assert Path(out.with_suffix(".png")).stat().st_size > 1000


def test_a_blank_fraction_makes_that_share_of_each_specimen_bare_ground(em_dir):
    from deepfocus.bench import specimens
    path = str(em_dir / "flyem_fib25_8nm_520.ome.tif")
    whole, = specimens(BenchConfig(specimens=[path]))
    part, = specimens(BenchConfig(specimens=[path], blank_fraction=0.75))
    cols = whole.slices.shape[2]
    assert (part.slices[:, :, : 3 * cols // 4] == 0).all()
    assert (part.slices[:, :, 3 * cols // 4 + 1:] == whole.slices[:, :, 3 * cols // 4 + 1:]).all()
    with pytest.raises(ValueError, match="below 1"):
        BenchConfig(specimens=[path], blank_fraction=1.0)
    with pytest.raises(ValueError, match="needs specimen images"):
        BenchConfig(blank_fraction=0.5)
