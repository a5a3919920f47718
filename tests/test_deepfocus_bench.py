"""The bench command writes the documented JSON and a PNG (a one-trial smoke run; figures come from real runs)."""
from __future__ import annotations

import json
import math
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
        # and with it the probe: the growth over the in-focus probe the residual error costs the image
        start, after = m["iterations"][0], m["iterations"][1]
        assert after["probe_growth_pct_median"] < start["probe_growth_pct_median"]
        assert start["probe_growth_pct_median"] <= start["probe_growth_pct_p95"]
    assert Path(out.with_suffix(".png")).stat().st_size > 1000
    # the comparison with MAPFoSt is stated as ratios of medians: the run writes them
    m = data["methods"]
    assert data["ratios_to_mapfost"]["deepfocus"]["compute"] == pytest.approx(
        m["deepfocus"]["compute_s_median"] / m["mapfost"]["compute_s_median"])
    # each method's pair is recorded: setup_a's 4 mrad beam at 10 nm takes the model's own +-5 um, as MAPFoSt does
    assert m["deepfocus"]["focus_scan"]["perturbation_um"] == pytest.approx(5.0)
    assert m["mapfost"]["focus_scan"]["perturbation_um"] == pytest.approx(5.0)


def test_the_bench_counts_the_pairs_taken_again_far_from_focus():
    # 80 um off: beyond the shipped model's range at +-5 um, within it at +-15 um (deepfocus.autofocus)
    cfg = BenchConfig(methods=["deepfocus"], trials=1, iterations=3, start_range_um=80.0, start_range_stig=1.0,
                      starts="corners", overrides=["autofocus.max_step_wd_um=100", "autofocus.max_total_wd_um=200"])
    m = run_bench(cfg, log=lambda s: None)["methods"]["deepfocus"]
    assert m["far_pairs"] == 1 and m["outcomes"] == {"iteration_limit": 1}
    assert [it["within_margin"] for it in m["iterations"]] == [0.0, 0.0, 0.0, 1.0]


def test_ratios_to_mapfost_are_nan_where_a_method_never_reached_the_margin():
    import math
    from deepfocus.bench import ratios_to, summary
    res = {"mapfost": {"compute_s_median": 0.1, "time_to_focus_s_median": 1.0, "dose_to_focus_e_per_nm2_median": 20.0},
           "deepfocus": {"compute_s_median": 0.02, "time_to_focus_s_median": 0.3,
                         "dose_to_focus_e_per_nm2_median": 10.0},
           "sweep": {"compute_s_median": 0.1, "time_to_focus_s_median": float("nan"),
                     "dose_to_focus_e_per_nm2_median": float("nan")}}
    q = ratios_to(res, "mapfost")
    assert set(q) == {"deepfocus", "sweep"}
    assert q["deepfocus"] == pytest.approx({"compute": 0.2, "time_to_focus": 0.3, "dose_to_focus": 0.5})
    assert q["sweep"]["compute"] == pytest.approx(1.0) and math.isnan(q["sweep"]["time_to_focus"])
    for r in res.values():
        r.update(iterations=[{"within_margin": 0.0}, {"within_margin": 0.5, "probe_growth_pct_median": 2.0,
                                                      "probe_growth_pct_p95": 4.0}], failed=0)
    lines = summary({"methods": res, "ratios_to_mapfost": q})
    assert "probe growth at the end 2.00 % (95th percentile 4.00 %)" in lines[1]
    assert "deepfocus / mapfost: compute 0.20, time to focus 0.30, dose to focus 0.50" in lines


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


def test_a_method_takes_its_focus_frames_at_its_own_operating_point(tmp_path):
    """``NAME@DWELL:PIXEL:FRAME`` scans that method's focus frames so; the others keep the bench's scan. The dose
    per frame follows I tau / (e p^2): half the dwell and twice the pixel size is an eighth of the dose."""
    cfg = BenchConfig(methods=["sweep", "sweep@25ns:20nm:256x192"], trials=1, iterations=1, frame_px=(256, 192),
                      dwell_ns=50.0, pixel_size_nm=10.0, start_range_um=5.0, start_range_stig=0.5)
    res = run_bench(cfg, log=lambda s: None)["methods"]
    assert set(res) == {"sweep", "sweep@25ns:20nm:256x192"}
    own, bench = res["sweep@25ns:20nm:256x192"]["focus_scan"], res["sweep"]["focus_scan"]
    assert (own["dwell_ns"], own["pixel_size_nm"], own["frame_px"]) == (25.0, 20.0, [256, 192])
    assert (bench["dwell_ns"], bench["pixel_size_nm"], bench["frame_px"]) == (50.0, 10.0, [256, 192])
    assert own["dose_per_frame_e_per_nm2"] == pytest.approx(bench["dose_per_frame_e_per_nm2"] / 8, rel=1e-6)
    assert math.isnan(own["perturbation_um"])          # a sweep takes no pair


@pytest.mark.parametrize("methods, message", [
    (["deepfocus@12ms"], "cannot read '12ms'"),
    (["focus"], "unknown method 'focus'"),
    (["mapfost", "mapfost"], "listed twice"),
])
def test_a_malformed_method_entry_is_named(methods, message):
    from deepfocus.bench import method_runs
    with pytest.raises(ValueError, match=message):
        method_runs(BenchConfig(methods=methods))


def test_a_focus_scan_beyond_the_microscopes_limits_is_refused_before_any_trial(capsys):
    from deepfocus.cli import EXIT_INPUT, main
    assert main(["bench", "--profile", "setup_a", "--methods", "deepfocus,mapfost@12.5ns", "--trials", "1"]) \
        == EXIT_INPUT
    err = capsys.readouterr().err
    assert "mapfost@12.5ns" in err and "dwell time" in err and "outside the limits" in err


def test_single_pair_modes_refuse_a_methods_own_scan(capsys):
    from deepfocus.cli import EXIT_INPUT, main
    assert main(["bench", "--profile", "setup_a", "--methods", "deepfocus@20nm", "--fidelity", "3"]) == EXIT_INPUT
    assert "closed-loop runs" in capsys.readouterr().err


def test_corner_starts_put_every_trial_at_the_ranges_corners_in_turn():
    """The thesis' hardest start first, (+wd, +x, -y), then each other sign combination; the rest of a trial
    (microscope seed, field) stays that of the uniform run."""
    from deepfocus.bench import corner_start
    seen = [(z, *ds) for z, ds in (corner_start(t, 30.0, 6.0) for t in range(8))]
    assert seen[0] == (30.0, 6.0, -6.0)
    assert len(set(seen)) == 8 and all(abs(z) == 30.0 and abs(x) == 6.0 == abs(y) for z, x, y in seen)
    assert corner_start(8, 30.0, 6.0)[0] == 30.0 and list(corner_start(8, 30.0, 6.0)[1]) == [6.0, -6.0]
    cfg = BenchConfig(methods=["deepfocus"], trials=2, iterations=1, frame_px=(512, 512),
                      start_range_um=8.0, start_range_stig=1.0, starts="corners")
    start = run_bench(cfg, log=lambda s: None)["methods"]["deepfocus"]["iterations"][0]
    # the lens does not land exactly where it was set (hysteresis), the stigmators do
    assert start["mae_wd_um"] == pytest.approx(8.0, abs=0.3)
    assert start["mae_stig"] == pytest.approx(1.0, abs=1e-6)
    # 8 um and 1 unit (2 um of astigmatism per axis) at 4 mrad, 3 nm in focus: an RMS radius of
    # sqrt(2 (1.274 nm)^2 + (4 mrad)^2 / 2 (8^2 + 2 * 2^2) um^2) = 24.1 nm, 13.4 times the in-focus 1.80 nm
    assert start["probe_growth_pct_median"] == pytest.approx(1236, rel=0.05)
    with pytest.raises(ValueError, match="unknown start mode 'corner'"):
        BenchConfig(starts="corner")


def test_the_bench_file_is_standard_json_when_a_method_never_reached_the_margin(tmp_path, monkeypatch):
    import deepfocus.bench
    from deepfocus.cli import EXIT_OK, main
    nan = float("nan")
    rows = [{"iteration": k, "mae_wd_um": 9.0, "mae_stig": 1.0, "within_margin": 0.0} for k in (0, 1)]
    fake = {"config": {}, "methods": {m: {"iterations": rows, "compute_s_median": 0.1, "time_to_focus_s_median": nan,
                                          "dose_to_focus_e_per_nm2_median": nan, "failed": 1}
                                      for m in ("deepfocus", "mapfost")},
            "ratios_to_mapfost": {"deepfocus": {"compute": 1.0, "time_to_focus": nan, "dose_to_focus": nan}}}
    monkeypatch.setattr(deepfocus.bench, "run_bench", lambda cfg, log: fake)
    out = tmp_path / "bench.json"
    assert main(["bench", "--profile", "setup_a", "--methods", "deepfocus,mapfost", "--trials", "1",
                 "--json", str(out)]) == EXIT_OK

    def refuse(name):
        raise ValueError(f"{name} in the bench file")
    data = json.loads(out.read_text(), parse_constant=refuse)
    assert data["methods"]["mapfost"]["time_to_focus_s_median"] is None
    assert data["ratios_to_mapfost"]["deepfocus"]["time_to_focus"] is None


def test_a_start_range_at_the_profiles_step_limit_is_refused(capsys):
    # the limits are the profile's: a microscope whose loop clips at 5 units cannot be started 6 units off
    from deepfocus.cli import EXIT_INPUT, main
    with pytest.raises(ValueError, match="step limits"):
        run_bench(BenchConfig(methods=["sweep"], start_range_stig=6.0, overrides=["autofocus.max_step_stig=5"]))
    with pytest.raises(ValueError, match="step limits"):
        run_bench(BenchConfig(methods=["sweep"], start_range_um=40.0, trials=1))
    assert main(["bench", "--methods", "sweep", "--start-range-stig", "8", "--trials", "1"]) == EXIT_INPUT
    assert "autofocus.max_step_stig in the profile" in capsys.readouterr().err
