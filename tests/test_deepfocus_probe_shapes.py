"""The probe-shape check: its kernels, and that it reads the shipped model's behaviour on a held-out specimen."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from deepfocus.estimator import DEFAULT_MODEL
from deepfocus.probe_shapes import SHAPES, probe_kernel, run_probe_shapes


@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_hold_the_current_and_grow_with_defocus(shape):
    small, large = probe_kernel(shape, 3.0), probe_kernel(shape, 9.0)
    for k in (small, large):
        assert k.sum() == pytest.approx(1.0)
        assert (k >= 0).all()
        c = k.shape[0] // 2
        assert np.allclose(k, k[::-1, ::-1])          # centred, point-symmetric
        assert k[c, c] > 0

    def rms(k):
        c = k.shape[0] // 2
        y, x = np.mgrid[-c:c + 1, -c:c + 1]
        return float(np.sqrt((k * (x * x + y * y)).sum()))
    assert rms(large) == pytest.approx(3 * rms(small), rel=0.15)


def test_rim_and_disc_share_their_edge_but_not_their_profile():
    disc, rim = probe_kernel("disc", 8.0), probe_kernel("rim", 8.0)
    c = disc.shape[0] // 2
    assert np.count_nonzero(disc) == np.count_nonzero(rim)
    assert rim[c, c] < disc[c, c] and rim[c, c + 7] > disc[c, c + 7]


def test_unknown_shape_is_named():
    with pytest.raises(ValueError, match="ring.*disc, gauss, halo, rim"):
        probe_kernel("ring", 3.0)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no shipped model")
def test_shipped_model_reads_disc_blurred_real_pairs(em_dir):
    # the simulator's own probe on a specimen held out of training: the answers follow the truth
    res = run_probe_shapes("setup_a", [], str(em_dir / "flyem_fib25_8nm_520.ome.tif"), ["deepfocus"], None,
                           dwell_ns=50.0, n=6, shapes=("disc",), log=lambda s: None)
    r = res["shapes"]["disc"]["deepfocus"]
    assert r["uncertain"] == 0
    pairs = np.array(r["pairs"])
    assert np.all(np.sign(pairs[:, 0]) == np.sign(pairs[:, 1]))
    assert r["mae_wd_um"] < 1.5
    assert 0.8 < r["slope"] < 1.2


def test_cli_wants_one_specimen(tmp_path):
    run = subprocess.run([sys.executable, "-m", "deepfocus.cli", "bench", "--probe-shapes", "3",
                          "--methods", "deepfocus"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "exactly one specimen" in run.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no shipped model")
def test_cli_writes_json(em_dir, tmp_path):
    out = tmp_path / "shapes.json"
    run = subprocess.run([sys.executable, "-m", "deepfocus.cli", "bench", "--profile", "setup_a", "--specimens",
                          str(em_dir / "flyem_fib25_8nm_520.ome.tif"), "--methods", "deepfocus,sweep",
                          "--probe-shapes", "3", "--dwell-ns", "50", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert set(data["shapes"]) == set(SHAPES)
    assert all(set(v) == {"deepfocus"} for v in data["shapes"].values())
    assert "sweep takes its own frames" in run.stderr
    assert len(data["shapes"]["gauss"]["deepfocus"]["pairs"]) == 3
