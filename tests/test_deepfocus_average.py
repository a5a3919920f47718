"""``deepfocus average``: snapshots of one run averaged into one model that the estimator opens."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepfocus.model_files import load_estimator
from deepfocus.models import BaselineNet, SpectralNet
from deepfocus.train import average_weights, export

REPO = Path(__file__).resolve().parents[1]
META = {"arch": "spectral", "model_args": {}, "perturbation_um": 5.0, "patch_px": 256, "alpha_ref_mrad": 4.0,
        "validation": {"mae_wd_um": 1.0}}


def _snapshot(path: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    net = SpectralNet()
    export(net, path, META)
    return net.state_dict()


def test_average_of_snapshots_is_the_mean_of_their_weights(tmp_path):
    a = _snapshot(tmp_path / "a.pt", 1)
    torch.manual_seed(2)
    b_net = SpectralNet()
    # a training checkpoint counts as a snapshot too
    torch.save({"model": b_net.state_dict(), "step": 10}, tmp_path / "checkpoint.pt")
    b = b_net.state_dict()
    meta = average_weights([tmp_path / "a.pt", tmp_path / "checkpoint.pt"], tmp_path / "avg.pt")
    assert meta["averaged_from"] == ["a.pt", "checkpoint.pt"] and "validation" not in meta
    avg = torch.jit.load(str(tmp_path / "avg.pt")).state_dict()
    for k in a:
        assert torch.allclose(avg[k], (a[k] + b[k]) / 2, atol=1e-6), k
    est = load_estimator(tmp_path / "avg.pt", device="cpu")
    assert est.alpha_ref_mrad == 4.0 and est.settings.patch_px == 256


def test_snapshots_of_different_networks_are_refused(tmp_path):
    _snapshot(tmp_path / "a.pt", 1)
    torch.save({"model": BaselineNet().state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other layers"):
        average_weights([tmp_path / "a.pt", tmp_path / "other.pt"], tmp_path / "avg.pt")
    with pytest.raises(ValueError, match="at least two"):
        average_weights([tmp_path / "a.pt"], tmp_path / "avg.pt")
    assert not (tmp_path / "avg.pt").exists()


def test_average_command_names_a_missing_file(tmp_path):
    _snapshot(tmp_path / "a.pt", 1)
    out = subprocess.run([sys.executable, "-m", "deepfocus.cli", "average", str(tmp_path / "a.pt"),
                          str(tmp_path / "gone.pt"), "--out", str(tmp_path / "avg.pt")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 4 and "gone.pt" in out.stderr
    (tmp_path / "junk.pt").write_text("not a model")
    out = subprocess.run([sys.executable, "-m", "deepfocus.cli", "average", str(tmp_path / "a.pt"),
                          str(tmp_path / "junk.pt"), "--out", str(tmp_path / "avg.pt")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 4 and "junk.pt" in out.stderr, out.stderr
