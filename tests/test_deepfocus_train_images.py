"""Training the thesis' image networks: pair shards, on-the-fly augmentation, checkpoint/resume, export."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import yaml

from deepfocus import datagen
from deepfocus.autofocus import acquire_pair
from deepfocus.cli import main as cli_main
from deepfocus.model_files import load_estimator, read_meta
from deepfocus.train import TrainConfig, group_loss, train
from deepfocus.train_images import PairShards

# the simulator's synthetic neuropil: no shared EM files needed, and quick to render
SYNTHETIC = [datagen.SpecimenSpec("synthetic:11")]
VAL_SYNTHETIC = [datagen.SpecimenSpec("synthetic:21")]


def tiny_config(run_dir, steps: int) -> TrainConfig:
    # small channel counts keep a CPU step well under a second; |wd| <= 8 um keeps every validation
    # group within 10 um of focus, so the selection figure is finite and best.pt gets written
    return TrainConfig(arch="baseline", run_dir=str(run_dir), seed=3, threads=1, train_shards=2, val_shards=1,
                       groups_per_shard=2, steps=steps, batch_groups=2, validate_every=2, min_train_shards=2,
                       checkpoint_every_s=1e9, model={"channels": [8, 8, 8, 8, 8, 8, 8]},
                       gen={"perturbation_um": 5.0, "wd_range_um": 8.0, "stig_range": 2.0,
                            "pairs_per_microscope": 2})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """generate + train 3 steps through the CLI, then resume to 5 steps."""
    mp = pytest.MonkeyPatch()
    mp.setattr(datagen, "TRAIN_SPECIMENS", SYNTHETIC)
    mp.setattr(datagen, "VAL_SPECIMENS", VAL_SYNTHETIC)
    run = tmp_path_factory.mktemp("run") / "baseline"
    cfg_path = run.parent / "baseline.yaml"
    cfg_path.write_text(yaml.safe_dump(asdict(tiny_config(run, 3))))
    try:
        assert cli_main(["train", "--config", str(cfg_path)]) == 0
        first = torch.load(run / "checkpoint.pt", weights_only=False)
        logs: list[str] = []
        cfg = tiny_config(run, 5)
        train(cfg, log=logs.append)
    finally:
        mp.undo()
    return run, first, logs


def test_generator_writes_compact_pair_shards(trained):
    run, _, _ = trained
    names = sorted(p.name for p in (run / "data").iterdir())
    assert names == ["train_0000.npz", "train_0001.npz", "val_0000.npz"]
    with np.load(run / "data" / "train_0000.npz") as d:
        assert d["pairs"].dtype == np.uint8 and d["pairs"].shape == (2, 4, 2, 256, 256)
        assert d["targets"].shape == (2, 3) and np.abs(d["targets"][:, 0]).max() < 10
        assert d["specimen"].shape == (2,)
        assert np.all((d["pixel_size_nm"] >= 7) & (d["pixel_size_nm"] <= 14))
        assert d["pairs"].std() > 10           # real images, not a constant


def test_training_checkpoints_and_resumes_where_it_stopped(trained):
    run, first, logs = trained
    assert first["step"] == 3 and first["config"]["arch"] == "baseline"
    assert any("resumed from" in s and "at step 3" in s for s in logs)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 5
    steps = [json.loads(s)["step"] for s in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_validation_figures_have_the_spectral_names(trained):
    run, _, _ = trained
    rec = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    names = {"mae_wd_um", "mae_astig_um", "mae_wd_um_within_10um", "mae_astig_um_within_10um", "within_1um_0.5um",
             "slope_wd_1_20um", "n_groups", "step", "train_loss"}
    assert names <= set(rec) and rec["n_groups"] == 2
    assert math.isfinite(rec["mae_wd_um_within_10um"]) and rec["s_per_step"] > 0


def test_exported_model_runs_through_the_estimator(trained):
    run, _, _ = trained
    meta = read_meta(run / "best.pt")
    assert meta["arch"] == "baseline" and meta["patch_px"] == 256 and meta["perturbation_um"] == 5.0
    assert meta["alpha_ref_mrad"] is None and "validation" in meta
    # every new best is also kept, so late snapshots can be averaged after best.pt moved on
    kept = run / "snapshots" / f"best_step{meta['validation']['step']}.pt"
    assert kept.read_bytes() == (run / "best.pt").read_bytes()
    from hardware.factory import open_microscope
    sem = open_microscope("setup_a").sem
    sem.set_scan(pixel_size_m=10e-9, width_px=512, height_px=384, dwell_s=100e-9)
    a, b = (f.image for f in acquire_pair(sem, 5e-6))
    est = load_estimator(run / "best.pt", device="cpu")
    c = est.estimate(a, b, 10e-9)
    assert c.model_id == "best.pt" and c.n_patches == 8
    assert all(math.isfinite(v) for v in (c.wd_um, c.astig_x_um, c.astig_y_um, c.stig_x, c.stig_y))


def test_baseline_without_score_is_weighted_by_the_plain_mean():
    torch.manual_seed(0)
    pred = torch.randn(5, 4, 4)
    pred[..., 3] = 0.0                      # what BaselineNet returns in the score column
    target = torch.randn(5, 3)
    mean_loss = (pred[..., :3].mean(dim=1) - target).abs().mean()
    ind_loss = (pred[..., :3] - target.unsqueeze(1)).abs().mean()
    assert torch.allclose(group_loss(pred, target), 0.75 * mean_loss + 0.25 * ind_loss)


def test_uint8_storage_is_exact_for_8_bit_frames():
    frame = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = datagen.to_unit_range(frame)
    assert np.array_equal(datagen.pairs_to_uint8(x), frame)
    assert np.allclose(datagen.pairs_from_uint8(frame), x, atol=1e-6)


def test_unknown_arch_names_the_known_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("arch: resnet\n")
    with pytest.raises(ValueError, match=r"arch 'resnet'.*baseline, patch_score, pixel_score, spectral"):
        TrainConfig.load(p)


def test_shipped_configs_pick_their_network():
    from pathlib import Path
    configs = Path(__file__).resolve().parents[1] / "deepfocus" / "configs"
    assert TrainConfig.load(configs / "spectral.yaml").arch == "spectral"
    assert TrainConfig.load(configs / "spectral_alpha.yaml").arch == "spectral"
    for arch in ("baseline", "patch_score"):
        cfg = TrainConfig.load(configs / f"{arch}.yaml")
        assert cfg.arch == arch and cfg.image_model and cfg.run_dir == f"deepfocus/runs/{arch}"
        assert cfg.gen.get("alpha_ref_mrad") is None


@pytest.mark.parametrize("config, shares_with", [("pairs_v6.yaml", "baseline.yaml"),
                                                 ("spectral_v6.yaml", "spectral_video.yaml")])
def test_the_twice_the_data_configs_draw_the_shards_they_tell_users_to_link(config, shares_with):
    # their headers say to link the other run's shards rather than make them again: that holds only while shard i
    # comes from the same seed, recipe, size and augmentation in both
    from pathlib import Path
    configs = Path(__file__).resolve().parents[1] / "deepfocus" / "configs"
    cfg, other = TrainConfig.load(configs / config), TrainConfig.load(configs / shares_with)
    for key in ("seed", "gen", "groups_per_shard", "val_shards", "copies"):
        assert getattr(cfg, key) == getattr(other, key), key
    assert cfg.train_shards == 2 * other.train_shards
    assert cfg.image_model == other.image_model
    if not cfg.image_model:
        assert cfg.pair_data == "deepfocus/runs/pairs_v6/data"


def test_the_any_aperture_config_links_validation_shards_of_the_same_recipe_at_the_true_angle():
    # its header says to link spectral_video.yaml's validation shards, so that log.jsonl compares with v5's: that
    # holds while everything but the believed-angle draw is that run's
    from pathlib import Path
    configs = Path(__file__).resolve().parents[1] / "deepfocus" / "configs"
    cfg = TrainConfig.load(configs / "spectral_any_aperture.yaml")
    other = TrainConfig.load(configs / "spectral_video.yaml")
    for key in ("seed", "groups_per_shard", "val_shards", "copies"):
        assert getattr(cfg, key) == getattr(other, key), key
    gen = dict(cfg.gen)
    assert gen.pop("aperture_error_factor") > 1 and gen == other.gen
    assert cfg.pair_data == "deepfocus/runs/pairs_v6/data"


def test_spectral_shards_are_refused_by_the_image_trainer(tmp_path):
    p = tmp_path / "train_0000.npz"
    np.savez(p, features=np.zeros((2, 4, 3, 20, 12), np.float16), targets=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="own run_dir"):
        PairShards().add(p)


def test_any_exported_model_scores_on_the_same_validation_groups(trained):
    # the like-for-like comparison: the spectral network run end to end on the image run's validation pairs
    from deepfocus.models import SpectralNet
    from deepfocus.train_images import evaluate_pairs, shard_paths
    run, _, _ = trained
    val = PairShards.load(shard_paths(run / "data", "val"))
    m = evaluate_pairs(SpectralNet().eval(), val, torch.device("cpu"), chunk_groups=1, alpha_ref_mrad=4.0)
    assert m["n_groups"] == 2 and math.isfinite(m["mae_wd_um"])


def test_evaluate_command_scores_models_side_by_side_and_names_bad_input(trained, tmp_path, capsys):
    from deepfocus.estimator import DEFAULT_MODEL
    from deepfocus.train_images import evaluate_pairs, shard_paths
    run, _, _ = trained
    assert cli_main(["evaluate", "--model", str(run / "best.pt"), "--model", str(DEFAULT_MODEL),
                     "--shards", str(run / "data"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == [str(run / "best.pt"), str(DEFAULT_MODEL)]
    direct = evaluate_pairs(torch.jit.load(str(run / "best.pt")), PairShards.load(shard_paths(run / "data", "val")),
                            torch.device("cpu"))
    assert rows[0]["mae_wd_um"] == pytest.approx(direct["mae_wd_um"]) and rows[0]["n_groups"] == 2
    assert cli_main(["evaluate", "--model", str(tmp_path / "none.pt"), "--shards", str(run / "data")]) == 4
    assert "none.pt' does not exist" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", str(DEFAULT_MODEL), "--shards", str(tmp_path)]) == 4
    assert "no val_*.npz shards" in capsys.readouterr().err


def test_train_threads_option_overrides_the_config_and_refuses_nonsense(tmp_path, monkeypatch, capsys):
    import deepfocus.train as train_mod
    seen: list[int] = []
    monkeypatch.setattr(train_mod, "generate", lambda cfg: seen.append(cfg.threads))
    monkeypatch.setattr(train_mod, "train", lambda cfg, max_seconds=None: seen.append(cfg.threads) or {})
    cfg_path = tmp_path / "baseline.yaml"
    cfg_path.write_text(yaml.safe_dump(asdict(tiny_config(tmp_path / "run", 3))))
    assert cli_main(["train", "--config", str(cfg_path), "--threads", "2"]) == 0
    assert seen == [2, 2]
    seen.clear()
    assert cli_main(["train", "--config", str(cfg_path)]) == 0
    assert seen == [1, 1]                   # the config's value
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--config", str(cfg_path), "--threads", "0"])
    assert exc.value.code == 2 and "--threads: must be at least 1" in capsys.readouterr().err
