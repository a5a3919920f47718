"""Training: generate shards on the simulator, fit the head, checkpoint, export TorchScript.

``deepfocus train --config FILE`` runs both stages. Everything lives under the config's
``run_dir``: ``data/train_*.npz``, ``data/val_*.npz``, ``checkpoint.pt`` (model,
optimiser, scheduler, step, best validation) and ``best.pt`` (TorchScript; each new best is
also kept as ``snapshots/best_stepN.pt`` for ``deepfocus average``). Running the
same command again resumes: finished shards are kept, training continues from the
checkpoint. ``--generate-only`` / ``--train-only`` split the stages across processes;
training picks up shards that appear while it runs.

``arch`` picks the network: ``spectral`` (default) trains the ``SpectralNet`` head on cached
spectral features (this module); the thesis' image networks (``baseline``, ``patch_score``,
``pixel_score``) train on raw patch pairs, augmented on the fly (``train_images``).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from . import datagen
from .features import with_level_anisotropy
from .models import ARCHITECTURES, SpectralNet, load_torchscript

SCORE_LOSS_MIX = 0.75     # thesis: (1 - 0.25) L1(consensus) + 0.25 L1(individual patches)


@dataclass
class TrainConfig:
    arch: str = "spectral"
    run_dir: str = "deepfocus/runs/spectral"
    seed: int = 0
    threads: int = 1
    train_shards: int = 40
    val_shards: int = 4
    groups_per_shard: int = 128
    copies: int = 2                     # spectral shards only: image models are augmented while training
    steps: int = 200000
    batch_groups: int = 32
    lr: float = 1e-3
    weight_decay: float = 5e-5
    lr_gamma: float = 0.99
    lr_step: int = 2000
    checkpoint_every_s: float = 180.0
    validate_every: int = 1000
    min_train_shards: int = 4
    relative_loss_scale_um: float = 0.0
    # an exported model (TorchScript, same arch and model args) whose weights start a fresh run: fine-tuning
    # a shipped model on data from other microscopes instead of training from scratch
    init_from: str | None = None
    # spectral runs only: a folder of raw pair shards (written by an image-model run such as baseline.yaml) to
    # compute this run's feature shards from, with its own augmentation, instead of rendering new ones
    pair_data: str | None = None
    # a folder of shards another run wrote with the same ``gen`` (and ``copies``), read instead of writing
    # this run's own: models trained on one data set differently (``exclude_specimens``) share it
    data_dir: str | None = None
    # training specimens (indices into datagen.TRAIN_SPECIMENS) whose groups are left out of training: a
    # model that never saw a tissue or microscope, to measure what an unseen one costs (validation unchanged)
    exclude_specimens: list[int] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    gen: dict = field(default_factory=dict)
    # spectral runs only: an oriented specimen's anisotropy added to the level channel of this share of the
    # training groups, up to this amplitude in natural log power, drawn anew at every use
    # (``features.with_level_anisotropy``); 0: none
    level_anisotropy: float = 0.0
    level_anisotropy_share: float = 0.5

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch {self.arch!r} is not a known network; known: {', '.join(ARCHITECTURES)}")
        if not (math.isfinite(self.level_anisotropy) and self.level_anisotropy >= 0
                and 0 <= self.level_anisotropy_share <= 1):
            raise ValueError(f"level_anisotropy must be 0 or more (natural log power) and level_anisotropy_share "
                             f"within 0-1, got {self.level_anisotropy!r} and {self.level_anisotropy_share!r}")
        if self.level_anisotropy > 0 and self.arch != "spectral":
            raise ValueError(f"level_anisotropy augments the spectral model's cached maps; arch {self.arch!r} "
                             "reads raw patch pairs")

    @property
    def data(self) -> Path:
        """Where the shards are: ``data_dir``, else ``run_dir/data``."""
        return Path(self.data_dir) if self.data_dir else Path(self.run_dir) / "data"

    @property
    def image_model(self) -> bool:
        """True for the networks that read raw patch pairs (trained by ``train_images``)."""
        return self.arch != "spectral"

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must be a mapping of training settings, not {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def generate(cfg: TrainConfig, log=print) -> None:
    import cv2
    cv2.setNumThreads(cfg.threads)      # the simulator's warps: keep the machine usable
    torch.set_num_threads(cfg.threads)
    data = cfg.data
    data.mkdir(parents=True, exist_ok=True)
    gen = datagen.GenConfig(**cfg.gen)
    loaded: dict = {}
    jobs = [("val", i, datagen.VAL_SPECIMENS) for i in range(cfg.val_shards)]
    jobs += [("train", i, datagen.TRAIN_SPECIMENS) for i in range(cfg.train_shards)]
    for kind, i, specs in jobs:
        path = data / f"{kind}_{i:04d}.npz"
        if path.exists():
            continue
        t = time.time()
        seed = cfg.seed * 1_000_003 + (0 if kind == "train" else 500_000) + i
        if cfg.image_model:
            datagen.generate_pair_shard(path, specs, cfg.groups_per_shard, gen, seed, loaded)
        elif cfg.pair_data:
            datagen.features_from_pair_shard(Path(cfg.pair_data) / path.name, path, gen, seed, cfg.copies)
        else:
            datagen.generate_shard(path, specs, cfg.groups_per_shard, gen, seed, cfg.copies, loaded)
        log(f"shard {path.name}: {cfg.groups_per_shard} groups in {time.time() - t:.0f} s")


def shard_paths(data: Path, kind: str) -> list[Path]:
    """Finished shards only: the generator writes ``*.tmp.npz`` and renames it when complete."""
    return [p for p in sorted(data.glob(f"{kind}_*.npz")) if not p.name.endswith(".tmp.npz")]


def specimen_mask(d, path: Path, exclude: list[int] | tuple = (), only: int | None = None) -> np.ndarray | None:
    """Which groups of an open shard to keep: None (all) unless specimens are excluded or one is chosen."""
    if not exclude and only is None:
        return None
    if "specimen" not in d.files:
        raise ValueError(f"{path} records no specimen per group: it cannot be split by specimen")
    spec = d["specimen"]
    keep = ~np.isin(spec, list(exclude))
    if only is not None:
        keep &= spec == only
    return keep


def check_groups_left(n_groups: int, paths: list[Path], exclude, only) -> None:
    if paths and not n_groups:
        raise ValueError(f"no groups left in {len(paths)} shards once specimens were chosen "
                         f"(excluded {list(exclude)}, only {only})")


def _load_shards(paths: list[Path], exclude: list[int] | tuple = (),
                 only: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    f, t = [], []
    for p in paths:
        with np.load(p) as d:
            keep = specimen_mask(d, p, exclude, only)
            f.append(d["features"] if keep is None else d["features"][keep])
            t.append(d["targets"] if keep is None else d["targets"][keep])
    check_groups_left(sum(len(x) for x in t), paths, exclude, only)
    return torch.from_numpy(np.concatenate(f).astype(np.float32)), torch.from_numpy(np.concatenate(t))


def consensus(pred: torch.Tensor) -> torch.Tensor:
    """(G, N, 4) per-patch predictions -> (G, 3) softmax(score)-weighted mean."""
    w = torch.softmax(pred[..., 3], dim=1).unsqueeze(-1)
    return (pred[..., :3] * w).sum(dim=1)


def group_loss(pred: torch.Tensor, target: torch.Tensor, relative_scale_um: float = 0.0) -> torch.Tensor:
    """Thesis patch-score loss; with ``relative_scale_um`` > 0 each error is weighted by 1 / (1 + |target| / s).

    The weighting puts the precision where the loop ends (near focus): far from focus a
    20 % error costs one more iteration, near focus 0.5 um decides whether it converges.
    """
    w = 1.0 / (1.0 + target.abs() / relative_scale_um) if relative_scale_um > 0 else torch.ones_like(target)
    mean_loss = (w * (consensus(pred) - target).abs()).mean()
    ind_loss = (w.unsqueeze(1) * (pred[..., :3] - target.unsqueeze(1)).abs()).mean()
    return SCORE_LOSS_MIX * mean_loss + (1 - SCORE_LOSS_MIX) * ind_loss


def selection_score(m: dict) -> float:
    """What picks ``best.pt``: precision within 10 um of focus, where the loop spends its last iterations."""
    v = m.get("mae_wd_um_within_10um", math.inf) + 2 * m.get("mae_astig_um_within_10um", math.inf)
    return v if math.isfinite(v) else math.inf


def fidelity_slope(pred_wd: np.ndarray, true_wd: np.ndarray, lo: float = 1.0, hi: float = 20.0) -> float:
    sel = (np.abs(true_wd) >= lo) & (np.abs(true_wd) <= hi)
    if sel.sum() < 3:
        return float("nan")
    return float(np.polyfit(true_wd[sel], pred_wd[sel], 1)[0])


def evaluate(model: SpectralNet, feats: torch.Tensor, targets: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        g, n = feats.shape[:2]
        pred = model.head(feats.reshape(g * n, *feats.shape[2:])).reshape(g, n, 4)
        c = consensus(pred).numpy()
    return group_metrics(c, targets.numpy())


def group_metrics(c: np.ndarray, t: np.ndarray) -> dict:
    """Validation figures of (G, 3) consensus corrections ``c`` against targets ``t`` (um); what ``log.jsonl`` holds."""
    g = c.shape[0]
    err = np.abs(c - t)
    near = np.abs(t[:, 0]) <= 10
    return {"mae_wd_um": float(err[:, 0].mean()), "mae_astig_um": float(err[:, 1:].mean()),
            "mae_wd_um_within_10um": float(err[near, 0].mean()) if near.any() else float("nan"),
            "mae_astig_um_within_10um": float(err[near, 1:].mean()) if near.any() else float("nan"),
            "within_1um_0.5um": float(((err[:, 0] <= 1) & (err[:, 1:].max(1) <= 0.5)).mean()),
            "slope_wd_1_20um": fidelity_slope(c[:, 0], t[:, 0]), "n_groups": int(g)}


def freeze_all_but_last_three(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Recalibration (thesis): only ``fc1``-``fc3`` learn; returns the parameters left trainable."""
    names = ("fc1.", "fc2.", "fc3.")
    keep = []
    for n, p in model.named_parameters():
        p.requires_grad = n.startswith(names)
        if p.requires_grad:
            keep.append(p)
    if not keep:
        raise ValueError(f"{type(model).__name__} has no fc1-fc3 layers to fine-tune")
    return keep


def export(model: SpectralNet, path: Path, meta: dict) -> None:
    model = model.eval()
    scripted = torch.jit.script(model)
    if hasattr(scripted, "front") and hasattr(scripted.front, "_layouts"):
        # the layouts the front end built while validating are rebuilt on first use, not shipped
        scripted.front._layouts = {}
    tmp = path.with_suffix(".tmp")
    torch.jit.save(scripted, str(tmp), _extra_files={"meta.json": json.dumps(meta)})
    tmp.rename(path)


def export_best(model: torch.nn.Module, run: Path, meta: dict, step: int) -> None:
    """``best.pt``, and a copy under ``snapshots/`` that later improvements do not overwrite (for ``average``)."""
    export(model, run / "best.pt", meta)
    (run / "snapshots").mkdir(exist_ok=True)
    shutil.copyfile(run / "best.pt", run / "snapshots" / f"best_step{step}.pt")


def record_validation(run: Path, m: dict, best: dict, log, save_best) -> dict:
    """Log one validation (console and ``log.jsonl``); call ``save_best(m)`` and return ``m`` if it is the new best."""
    log(json.dumps(m))
    with open(run / "log.jsonl", "a") as fh:
        fh.write(json.dumps(m) + "\n")
    if selection_score(m) < selection_score(best):
        save_best(m)
        return m
    return best


def average_weights(inputs: list[Path], out: Path) -> dict:
    """Average the weights of snapshots of one run (``best.pt`` exports or ``checkpoint.pt``) into ``out``.

    Late snapshots of one run at a small learning rate lie around the same minimum; their
    mean generalises better than any one of them (stochastic weight averaging). The
    metadata of the first TorchScript input is kept, with the inputs recorded.
    """
    from .models import build
    if len(inputs) < 2:
        raise ValueError("give at least two model files to average")
    states, meta = [], None
    for p in inputs:
        if not Path(p).is_file():
            raise FileNotFoundError(f"model file {str(p)!r} does not exist")
        try:
            files = {"meta.json": ""}
            states.append(load_torchscript(p, "cpu", files).state_dict())
            meta = meta or json.loads(files["meta.json"] or "{}")
        except RuntimeError:
            try:
                ck = torch.load(str(p), map_location="cpu", weights_only=False)
            except Exception:  # noqa: BLE001 - torch's unpickling errors name neither the file nor the cause
                ck = None
            if not isinstance(ck, dict) or "model" not in ck:
                raise ValueError(f"{str(p)!r} is neither a TorchScript model nor a training checkpoint") from None
            states.append(ck["model"])
    if meta is None:
        raise ValueError("at least one input must be an exported model (best.pt): its meta.json describes the result")
    keys = set(states[0])
    for p, st in zip(inputs, states):
        if set(st) != keys or any(st[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"{str(p)!r} has other layers than {str(inputs[0])!r}: only snapshots of one "
                             "architecture can be averaged")
    avg = {k: sum(st[k].float() for st in states) / len(states) for k in keys}
    model = build(meta.get("arch", "spectral"), **(meta.get("model_args") or {}))
    model.load_state_dict({k: v.to(states[0][k].dtype) for k, v in avg.items()})
    meta = dict(meta, averaged_from=[Path(p).name for p in inputs])
    meta.pop("validation", None)      # the inputs' figures do not describe the average
    export(model, Path(out), meta)
    return meta


def load_exported(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """An exported model (TorchScript) on the CPU and its ``meta.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    files = {"meta.json": ""}
    try:
        model = load_torchscript(path, "cpu", files)
    except RuntimeError:
        raise ValueError(f"{str(path)!r} is not an exported TorchScript model") from None
    return model, json.loads(files["meta.json"] or "{}")


class Optimisation:
    """Model, AdamW and step schedule of one run, saved to and resumed from ``checkpoint.pt``."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        self.path = Path(cfg.run_dir) / "checkpoint.pt"
        self._last_save = time.time()

    def resume(self, log) -> tuple[int, dict]:
        """(step, best validation) from the checkpoint, or a fresh start (from ``init_from`` when set)."""
        if not self.path.exists():
            if self.cfg.init_from:
                self._load_initial(Path(self.cfg.init_from))
                log(f"starting from the weights of {self.cfg.init_from}")
            return 0, {"mae_wd_um": math.inf}
        # CPU first: a checkpoint written on a GPU resumes on a CPU and the other way round
        ck = torch.load(self.path, map_location="cpu", weights_only=False)
        was = ck.get("config", {}).get("arch", "spectral")
        if was != self.cfg.arch:
            raise ValueError(f"{self.path} is a checkpoint of arch {was!r} but the config asks for "
                             f"{self.cfg.arch!r}: give each network its own run_dir")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        log(f"resumed from {self.path} at step {ck['step']}")
        return ck["step"], ck["best"]

    def _load_initial(self, path: Path) -> None:
        try:
            model, meta = load_exported(path)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"init_from: {exc}") from None
        state = model.state_dict()
        if meta.get("arch", self.cfg.arch) != self.cfg.arch or (meta.get("model_args") or {}) != self.cfg.model:
            raise ValueError(f"init_from: {str(path)!r} is arch {meta.get('arch')!r} with model args "
                             f"{meta.get('model_args') or {}}, the config asks for {self.cfg.arch!r} with {self.cfg.model}")
        self.model.load_state_dict(state)

    def save(self, step: int, best: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(), "step": step, "best": best, "config": asdict(self.cfg)}, tmp)
        tmp.rename(self.path)
        self._last_save = time.time()

    def save_if_due(self, step: int, best: dict) -> None:
        """Write the checkpoint when ``checkpoint_every_s`` has passed since the last one."""
        if time.time() - self._last_save > self.cfg.checkpoint_every_s:
            self.save(step, best)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()


def wait_for_shards(cfg: TrainConfig, data: Path) -> None:
    """Training starts once the validation shards and the first training shards are finished."""
    while len(shard_paths(data, "val")) < cfg.val_shards or \
            len(shard_paths(data, "train")) < min(cfg.min_train_shards, cfg.train_shards):
        time.sleep(10)


def model_meta(cfg: TrainConfig) -> dict:
    """What an exported model's ``meta.json`` says about how it was trained (validation is added per export)."""
    return {"arch": cfg.arch, "model_args": cfg.model, "perturbation_um": cfg.gen.get("perturbation_um", 5.0),
            "wd_range_um": cfg.gen.get("wd_range_um", datagen.GenConfig.wd_range_um),
            "patch_px": datagen.PATCH_PX, "alpha_ref_mrad": cfg.gen.get("alpha_ref_mrad"),
            "model_pixel_nm_range": list(datagen.model_pixel_range_nm(datagen.GenConfig(**cfg.gen))),
            "outputs": "correction to add: wd_um, astig_x_um, astig_y_um (image frame), score"}


def train(cfg: TrainConfig, log=print, max_seconds: float | None = None) -> dict:
    if cfg.image_model:
        from .train_images import train_images
        return train_images(cfg, log, max_seconds)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)     # the shards may live elsewhere (data_dir)
    data = cfg.data
    model = SpectralNet(**cfg.model)
    optim = Optimisation(model, cfg)
    step, best = optim.resume(log)
    wait_for_shards(cfg, data)
    vf, vt = _load_shards(shard_paths(data, "val"))
    known: list[Path] = []
    tf = tt = None
    rng = np.random.default_rng(cfg.seed + step)
    t0 = time.time()
    meta_base = model_meta(cfg)

    while step < cfg.steps:
        shards = shard_paths(data, "train")
        if shards != known:
            known = shards
            tf, tt = _load_shards(known, cfg.exclude_specimens)
            log(f"step {step}: training on {len(known)} shards, {tf.shape[0]} groups")
        model.train()
        for _ in range(200):
            idx = torch.from_numpy(rng.integers(0, tf.shape[0], cfg.batch_groups))
            x, y = tf[idx], tt[idx]
            if cfg.level_anisotropy > 0:
                x = with_level_anisotropy(x, cfg.level_anisotropy, cfg.level_anisotropy_share)
            g, n = x.shape[:2]
            pred = model.head(x.reshape(g * n, *x.shape[2:])).reshape(g, n, 4)
            loss = group_loss(pred, y, cfg.relative_loss_scale_um)
            optim.step(loss)
            step += 1
            if step % cfg.validate_every == 0:
                m = evaluate(model, vf, vt)
                m.update(step=step, train_loss=loss.item())
                best = record_validation(run, m, best, log, lambda m: export_best(
                    model, run, dict(meta_base, validation=m, train_groups=int(tf.shape[0])), step))
                model.train()
        optim.save_if_due(step, best)
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    optim.save(step, best)
    return best
