"""DeepFocus networks: output shapes, TorchScript round trip, spectral front end physics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepfocus.features import SpectralFrontEnd, structure_ratio
from deepfocus.models import ARCHITECTURES, SpectralNet, build, count_parameters, cpu_head, symmetry_averaged
from deepfocus.train import consensus, export, group_loss


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_model_maps_patch_pairs_to_correction_and_score(arch):
    torch.manual_seed(0)
    model = build(arch).eval()
    x = torch.randn(3, 2, 128, 128)
    with torch.no_grad():
        y = model(x, 10.0)
    assert y.shape == (3, 4)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_torchscript_round_trip_gives_the_same_output(arch, tmp_path):
    torch.manual_seed(1)
    model = build(arch).eval()
    x = torch.randn(2, 2, 128, 128)
    path = tmp_path / f"{arch}.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(model(x, 8.0), loaded(x, 8.0), atol=1e-5)


def test_thesis_model_sizes():
    # thesis: pixel-score U-Net about 0.5 M parameters; baseline 7 blocks + 3 FC layers
    assert 0.2e6 < count_parameters(build("pixel_score")) < 0.8e6
    base = build("baseline")
    assert [m.out_features for m in (base.fc1, base.fc2, base.fc3)] == [250, 50, 3]
    assert build("patch_score").fc3.out_features == 4


def _blurred_pair(z_um: float, ax_um: float, ay_um: float, p_nm: float = 10.0, n: int = 256):
    from hardware.sim import optics
    rng = np.random.default_rng(0)
    img = rng.random((n, n)).astype(np.float32)
    out = []
    for dz in (-5.0, 5.0):
        b = optics.apply_probe(img, p_nm * 1e-9, (z_um + dz) * 1e-6, (ax_um * 1e-6, ay_um * 1e-6), 4e-3, 3e-9)
        out.append(b * 2 - 1)
    return torch.from_numpy(np.stack(out)[None])


def test_spectral_ratio_sign_follows_defocus_and_astigmatism():
    fe = SpectralFrontEnd()
    # below focus the + image is sharper: its high frequencies are stronger
    r_neg = fe(_blurred_pair(-4.0, 0, 0), 10.0)[0, 0]
    r_pos = fe(_blurred_pair(+4.0, 0, 0), 10.0)[0, 0]
    mid = slice(8, 14)
    assert r_neg[mid].mean() > 0.2 and r_pos[mid].mean() < -0.2
    # astigmatism x: the ratio differs between the kx (theta 0) and ky (theta 90 deg) directions
    r_ax = fe(_blurred_pair(0.0, 3.0, 0.0), 10.0)[0, 0]
    assert (r_ax[mid, 0] - r_ax[mid, 6]).mean().abs() > 0.2


def test_front_end_masks_bins_beyond_nyquist():
    fe = SpectralFrontEnd()
    x = torch.randn(1, 2, 128, 128)
    coarse = fe(x, 20.0)[0, 2]      # 20 nm pixels: Nyquist at 157 rad/um, inside the map
    fine = fe(x, 8.0)[0, 2]
    assert coarse[-1].sum() == 0 and fine[-1].sum() > 0


def test_structure_ratio_separates_texture_from_noise_and_blank():
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.normal(size=(1, 128, 128)).astype(np.float32))
    blank = torch.zeros(1, 128, 128)
    texture = torch.from_numpy(np.cumsum(np.cumsum(rng.normal(size=(128, 128)), 0), 1)[None].astype(np.float32))
    assert structure_ratio(noise).item() < 2.0
    assert structure_ratio(blank).item() < 2.0
    assert structure_ratio(texture).item() > 10.0


def test_patch_score_loss_prefers_the_right_patch():
    target = torch.tensor([[5.0, 1.0, -1.0]])
    good = torch.tensor([[5.0, 1.0, -1.0, 3.0], [-20.0, 0.0, 0.0, -3.0]]).unsqueeze(0)
    bad = torch.tensor([[5.0, 1.0, -1.0, -3.0], [-20.0, 0.0, 0.0, 3.0]]).unsqueeze(0)
    assert group_loss(good, target) < group_loss(bad, target)
    assert torch.allclose(consensus(good), target, atol=0.1)


def test_export_carries_metadata(tmp_path):
    from deepfocus.model_files import read_meta
    path = tmp_path / "m.pt"
    export(SpectralNet(), path, {"arch": "spectral", "perturbation_um": 5.0})
    assert read_meta(path)["perturbation_um"] == 5.0
    assert json.dumps(read_meta(path))


@pytest.mark.parametrize("arch", ["baseline", "spectral"])
def test_recalibration_trains_only_the_last_three_layers(arch):
    from deepfocus.train import freeze_all_but_last_three
    model = build(arch)
    keep = freeze_all_but_last_three(model)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1", "fc2", "fc3"} and len(keep) == 6


def test_front_end_keeps_a_few_layouts_and_export_ships_none(tmp_path):
    """The front end keeps the frequency layout of the last few (patch size, pixel size) it saw, so the closed loop
    does not rebuild it every correction; a kept layout never answers for another pixel size, training's endless
    pixel sizes do not grow memory, and an exported model carries none."""
    from deepfocus.features import MAX_LAYOUTS
    torch.manual_seed(0)
    model = SpectralNet().eval()
    x = torch.randn(2, 2, 128, 128)
    with torch.no_grad():
        at_10 = model(x, 10.0)
        at_7 = model(x, 7.0)
        assert not torch.equal(at_10, at_7)
        assert torch.equal(model(x, 10.0), at_10)
        for i in range(3 * MAX_LAYOUTS):
            model(x, 5.0 + i)
        assert 0 < len(model.front._layouts) <= MAX_LAYOUTS
        assert torch.equal(SpectralNet().eval().front(x, 7.0), model.front(x, 7.0))
    path = tmp_path / "m.pt"
    export(model, path, {"arch": "spectral"})
    loaded = torch.jit.load(str(path))
    assert len(loaded.front._layouts) == 0
    with torch.no_grad():
        assert torch.equal(loaded(x, 10.0), at_10)


def test_mirror_averaged_answer_is_the_mean_of_the_pair_and_its_mirror_image():
    """One transform gives both maps; the mirrored pair's diagonal astigmatism counts with the opposite sign."""
    torch.manual_seed(1)
    model = torch.jit.script(SpectralNet().eval())
    x = torch.randn(3, 2, 192, 256)
    with torch.no_grad():
        feat, mirrored = model.front.forward_mirrored(x, 8.0)
        assert torch.allclose(feat, model.front(x, 8.0), atol=1e-4)
        assert torch.allclose(mirrored, model.front(x.flip(-1), 8.0), atol=1e-4)
        assert not torch.allclose(mirrored, feat, atol=1e-2)
        expected = 0.5 * (model(x, 8.0) + model(x.flip(-1), 8.0) * torch.tensor([1.0, 1.0, -1.0, 1.0]))
        assert torch.allclose(model.forward_mirror_averaged(x, 8.0), expected, atol=1e-4)


def test_frozen_cpu_head_answers_as_the_model_does():
    """The head frozen for inference on a CPU (the estimator's default there) gives the model's answers, for a
    model loaded from TorchScript and for one in Python, at any batch size."""
    torch.manual_seed(2)
    eager = SpectralNet().eval()
    for model in (eager, torch.jit.script(eager)):
        head = cpu_head(model)
        assert isinstance(head, torch.jit.ScriptModule)          # frozen, not the model's own method
        for n in (1, 7, 32):
            feat = torch.randn(n, 3, 20, 12)
            with torch.no_grad():
                assert torch.allclose(head(feat), model.head(feat), atol=1e-5)
    # a copy for inference: the model's own weights stay trainable and are not touched
    assert all(p.requires_grad for p in eager.parameters())


class _UnscriptableHead(SpectralNet):
    """A spectral model TorchScript cannot compile (its forward takes **kwargs), as a user's own might be."""

    def forward(self, pair, pixel_size_nm, **kwargs):
        return self.head(self.front(pair, pixel_size_nm))


def test_frozen_cpu_head_falls_back_to_the_models_own_head():
    model = _UnscriptableHead().eval()
    assert cpu_head(model) == model.head
    x = torch.randn(2, 2, 128, 128)
    averaged = symmetry_averaged(model, mirror=False, head=cpu_head(model))
    with torch.no_grad():
        assert averaged(x, 10.0).shape == (2, 4)


def test_speed_table_times_what_the_estimator_runs():
    from deepfocus.perf import measure
    rows = measure(["spectral"], threads=(1,), n_patches=2, patch_px=64, repeats=1)
    assert {r.variant for r in rows} == {"eager", "torchscript", "int8_linear", "frozen_head"}
    assert all(r.median_s > 0 for r in rows)
    # after an idle gap, as the loop's estimates follow the pair's acquisition: never faster than the gap allows
    idle = measure(["spectral"], threads=(1,), n_patches=2, patch_px=64, repeats=2, idle_s=0.02)
    assert all(r.idle_s == 0.02 and 0 < r.median_s < 0.02 for r in idle)
