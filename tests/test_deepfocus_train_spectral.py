"""The spectral training path end to end: feature shards, resume, best.pt + kept snapshots, averaging."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from deepfocus import datagen
from deepfocus.model_files import load_estimator
from deepfocus.train import TrainConfig, average_weights, generate, shard_paths, train

SYNTHETIC = [datagen.SpecimenSpec("synthetic:11")]
VAL_SYNTHETIC = [datagen.SpecimenSpec("synthetic:21")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(datagen, "TRAIN_SPECIMENS", SYNTHETIC)
    mp.setattr(datagen, "VAL_SPECIMENS", VAL_SYNTHETIC)
    run_dir = tmp_path_factory.mktemp("run") / "spectral"
    # |wd| <= 8 um keeps every validation group within 10 um of focus: the selection figure is finite
    cfg = TrainConfig(run_dir=str(run_dir), seed=5, threads=1, train_shards=2, val_shards=1, groups_per_shard=4,
                      steps=400, batch_groups=4, validate_every=100, min_train_shards=2, checkpoint_every_s=1e9,
                      gen={"perturbation_um": 5.0, "wd_range_um": 8.0, "stig_range": 2.0, "pairs_per_microscope": 4,
                           "alpha_ref_mrad": 4.0})
    try:
        generate(cfg, log=lambda s: None)
        train(replace(cfg, steps=200), log=lambda s: None)
        logs: list[str] = []
        train(cfg, log=logs.append)
    finally:
        mp.undo()
    return run_dir, logs


def test_training_resumes_and_keeps_every_best_as_a_snapshot(run):
    run_dir, logs = run
    assert any("resumed" in s and "step 200" in s for s in logs)
    snaps = sorted((run_dir / "snapshots").glob("best_step*.pt"))
    assert snaps, "no snapshot kept"
    assert any(s.read_bytes() == (run_dir / "best.pt").read_bytes() for s in snaps)
    est = load_estimator(run_dir / "best.pt", device="cpu")
    assert est.alpha_ref_mrad == 4.0


def test_a_shard_still_being_written_is_not_read(run):
    run_dir, _ = run
    data = run_dir / "data"
    (data / "train_0002.tmp.npz").write_bytes(b"half a file")
    try:
        assert [p.name for p in shard_paths(data, "train")] == ["train_0000.npz", "train_0001.npz"]
    finally:
        (data / "train_0002.tmp.npz").unlink()


def test_the_runs_checkpoint_and_best_average_into_a_working_model(run, tmp_path):
    run_dir, _ = run
    average_weights([run_dir / "best.pt", run_dir / "checkpoint.pt"], tmp_path / "avg.pt")
    est = load_estimator(tmp_path / "avg.pt", device="cpu")
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter
    base = gaussian_filter(rng.random((384, 512)), 3)
    minus = (gaussian_filter(base, 1.0) * 60000).astype(np.uint16)
    plus = (gaussian_filter(base, 2.0) * 60000).astype(np.uint16)
    c = est.estimate(minus, plus, 10e-9)
    assert np.isfinite([c.wd_um, c.astig_x_um, c.astig_y_um]).all()


def test_a_fresh_run_starts_from_the_init_model_and_refuses_a_mismatched_one(run, tmp_path):
    import torch

    from deepfocus.estimator import DEFAULT_MODEL
    run_dir, _ = run
    fresh = tmp_path / "finetune"
    fresh.mkdir()
    (fresh / "data").symlink_to(run_dir / "data")
    cfg = TrainConfig(run_dir=str(fresh), seed=5, threads=1, train_shards=2, val_shards=1, groups_per_shard=4,
                      steps=0, batch_groups=4, validate_every=100, min_train_shards=2, checkpoint_every_s=1e9,
                      init_from=str(DEFAULT_MODEL), gen={"alpha_ref_mrad": 4.0})
    logs: list[str] = []
    train(cfg, log=logs.append)
    assert any("starting from the weights" in s for s in logs)
    shipped = torch.jit.load(str(DEFAULT_MODEL), map_location="cpu").state_dict()
    started = torch.load(fresh / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(shipped[k], started[k]) for k in shipped)
    # a checkpoint exists now: a second start resumes it rather than reloading the init model
    logs.clear()
    train(cfg, log=logs.append)
    assert any("resumed" in s for s in logs) and not any("starting from" in s for s in logs)
    with pytest.raises(ValueError, match="init_from"):
        train(replace(cfg, run_dir=str(tmp_path / "other"), model={"width": 8}), log=lambda s: None)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(replace(cfg, run_dir=str(tmp_path / "other2"), init_from=str(tmp_path / "nope.pt")), log=lambda s: None)


def test_generator_draws_aperture_profiles_only_when_asked():
    plain = datagen.GenConfig()
    assert datagen.sample_overrides(np.random.default_rng(3)) == \
        datagen.sample_overrides(np.random.default_rng(3), plain)
    assert not any("aperture_taper" in o for o in datagen.sample_overrides(np.random.default_rng(3), plain))
    cfg = datagen.GenConfig(aperture_taper=(-2.0, 3.0), halo_fraction=(0.0, 0.3), uniform_share=0.25)
    rng = np.random.default_rng(4)
    draws = [dict(o.split("=") for o in datagen.sample_overrides(rng, cfg)) for _ in range(400)]
    profiled = [d for d in draws if "optics.aperture_taper" in d]
    assert 0.65 < len(profiled) / len(draws) < 0.85
    tapers = np.array([float(d["optics.aperture_taper"]) for d in profiled])
    halos = np.array([float(d["optics.halo_fraction"]) for d in profiled])
    assert tapers.min() >= -2.0 and tapers.max() <= 3.0 and (tapers < -1).any() and (tapers > 2).any()
    assert 0.35 < (halos > 0).mean() < 0.65 and halos.max() <= 0.3


def test_generator_draws_beam_angles_within_the_configured_range():
    """A wider range of beam half-angles changes the angles drawn and nothing else in the stream; the model's
    pixel range (aperture-normalised) widens with it."""
    wide = datagen.GenConfig(aperture_range_mrad=(1.5, 6.0), alpha_ref_mrad=4.0)
    plain = dict(o.split("=") for o in datagen.sample_overrides(np.random.default_rng(5), datagen.GenConfig()))
    rng = np.random.default_rng(5)
    draws = [dict(o.split("=") for o in datagen.sample_overrides(rng, wide)) for _ in range(300)]
    angles = np.array([float(d["optics.aperture_angle_mrad"]) for d in draws])
    assert angles.min() >= 1.5 and angles.max() <= 6.0 and (angles < 2.5).mean() > 0.15 and (angles > 5.5).any()
    assert {k: v for k, v in draws[0].items() if k != "optics.aperture_angle_mrad"} == \
        {k: v for k, v in plain.items() if k != "optics.aperture_angle_mrad"}
    lo, hi = datagen.model_pixel_range_nm(wide)
    assert lo == pytest.approx(7.0 * 4 / 6.0, abs=0.01) and hi == pytest.approx(14.0 * 4 / 1.5, abs=0.01)


def test_evaluate_reads_feature_shards_with_spectral_models_only(run, tmp_path):
    import torch

    from deepfocus.evaluate import evaluate_models
    from deepfocus.models import BaselineNet
    from deepfocus.train import _load_shards, evaluate
    from deepfocus.train import export as export_model
    run_dir, _ = run
    res = evaluate_models([run_dir / "best.pt"], run_dir / "data")
    net = torch.jit.load(str(run_dir / "best.pt"))
    from deepfocus.models import SpectralNet
    plain = SpectralNet()
    plain.load_state_dict(net.state_dict())
    direct = evaluate(plain, *_load_shards(shard_paths(run_dir / "data", "val")))
    assert res[str(run_dir / "best.pt")]["mae_wd_um"] == pytest.approx(direct["mae_wd_um"])
    export_model(BaselineNet(channels=(4, 4, 4, 4, 4, 4, 4)), tmp_path / "base.pt", {"arch": "baseline"})
    with pytest.raises(ValueError, match="evaluate it on pair shards"):
        evaluate_models([tmp_path / "base.pt"], run_dir / "data")


def test_a_run_can_train_on_anothers_shards_leaving_specimens_out(run, tmp_path):
    from deepfocus.evaluate import evaluate_models
    from deepfocus.train import _load_shards
    run_dir, _ = run
    shared = tmp_path / "shared"
    shared.mkdir()
    counts = {"train": 0, "val": 0}
    for kind in counts:
        for p in shard_paths(run_dir / "data", kind):
            with np.load(p) as d:
                arrays = dict(d)
            # two specimens taking turns, so that leaving one out halves the groups
            arrays["specimen"] = (np.arange(len(arrays["targets"])) % 2).astype(np.int16)
            counts[kind] += len(arrays["targets"])
            np.savez(shared / p.name, **arrays)
    names = sorted(p.name for p in shared.iterdir())
    cfg = TrainConfig(run_dir=str(tmp_path / "leave_out"), data_dir=str(shared), exclude_specimens=[1], seed=5,
                      threads=1, train_shards=2, val_shards=1, groups_per_shard=4, steps=100, batch_groups=4,
                      validate_every=100, min_train_shards=2, checkpoint_every_s=1e9, gen={"alpha_ref_mrad": 4.0})
    logs: list[str] = []
    generate(cfg, log=logs.append)
    train(cfg, log=logs.append)
    assert any(f"training on 2 shards, {counts['train'] // 2} groups" in s for s in logs), logs
    assert (tmp_path / "leave_out" / "best.pt").is_file()
    assert sorted(p.name for p in shared.iterdir()) == names           # nothing written into the other run's data
    res = evaluate_models([run_dir / "best.pt"], shared, specimen=1)[str(run_dir / "best.pt")]
    assert res["n_groups"] == counts["val"] // 2
    with pytest.raises(ValueError, match="no groups left"):
        _load_shards(shard_paths(shared, "val"), only=7)


def test_level_anisotropy_adds_one_oriented_term_per_chosen_group_to_the_level_alone():
    import math

    import torch

    from deepfocus.features import SpectralFrontEnd, with_level_anisotropy
    torch.manual_seed(3)
    # real maps: 2 groups of 4 patch pairs of a smooth field and its blur, through the front end
    x = torch.nn.functional.avg_pool2d(torch.randn(8, 2, 256, 256), 5, 1, 2)
    x[:, 1] = torch.nn.functional.avg_pool2d(x[:, 1:2], 3, 1, 1)[:, 0]
    with torch.no_grad():
        feats = SpectralFrontEnd()(x, 10.0).reshape(2, 4, 3, 20, 12)
    assert torch.equal(with_level_anisotropy(feats, 0.6, 0.0), feats)
    out = with_level_anisotropy(feats, 0.6, 1.0)
    assert torch.equal(out[:, :, 0], feats[:, :, 0]) and torch.equal(out[:, :, 2], feats[:, :, 2])
    added = (out[:, :, 1] - feats[:, :, 1]) / 0.25              # natural log power
    assert added.abs().max() <= 0.6 + 1e-6 and added.abs().max() > 0
    assert torch.all(added[feats[:, :, 2] == 0] == 0)            # bins outside the map stay empty
    theta = (torch.arange(12) + 0.5) / 12 * math.pi
    for g in range(2):
        rows = added[g].reshape(-1, 12)
        full = (feats[g, :, 2].reshape(-1, 12) > 0).all(dim=1)
        rows = rows[full & (rows.abs().sum(dim=1) > 1e-4)]
        # every whole ring of every patch of the group: a cos 2 (theta - phi) of one phi
        phase = torch.angle((rows * torch.exp(2j * theta)).sum(dim=1))
        assert torch.allclose(phase, phase[0].expand_as(phase), atol=1e-3)
        assert torch.all(rows.sum(dim=1).abs() < 1e-4)            # nothing added to the rings' mean


def test_a_run_trains_with_level_anisotropy(run, tmp_path):
    run_dir, _ = run
    cfg = TrainConfig(run_dir=str(tmp_path / "aniso"), data_dir=str(run_dir / "data"), seed=5, threads=1,
                      train_shards=2, val_shards=1, groups_per_shard=4, steps=100, batch_groups=4,
                      validate_every=100, min_train_shards=2, checkpoint_every_s=1e9, gen={"alpha_ref_mrad": 4.0},
                      level_anisotropy=0.6, level_anisotropy_share=1.0)
    train(cfg, log=lambda s: None)
    assert load_estimator(tmp_path / "aniso" / "best.pt", device="cpu").alpha_ref_mrad == 4.0


@pytest.mark.parametrize("kw, says", [({"level_anisotropy": -0.1}, "level_anisotropy must be 0 or more"),
                                      ({"level_anisotropy_share": 1.5}, "within 0-1"),
                                      ({"arch": "baseline", "level_anisotropy": 0.5}, "reads raw patch pairs")])
def test_a_recipe_with_a_level_anisotropy_beyond_reason_is_refused_by_name(kw, says):
    with pytest.raises(ValueError, match=says):
        TrainConfig(**kw)
