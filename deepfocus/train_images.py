"""Training the thesis' image networks (``baseline``, ``patch_score``, ``pixel_score``) on raw patch pairs.

``train.generate`` writes shards of rendered groups as uint8 (``datagen.generate_pair_shard``); here they
are held in memory as uint8 (0.5 MB per group), each batch is converted to [-1, 1] and augmented on the
fly (a fresh draw every time a group is used, as in the thesis), and the whole network is trained with
the thesis patch-score loss (``train.group_loss``). Checkpoint, resume, validation figures and the
TorchScript ``best.pt`` are those of the spectral path, so ``log.jsonl`` files of both compare line by line.
The GPU is used when there is one; the same config runs on a CPU.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import datagen
from .estimator import pick_device
from .models import build
from .train import (Optimisation, TrainConfig, consensus, export_best, group_loss, group_metrics, model_meta,
                    record_validation, shard_paths, specimen_mask, check_groups_left,
                    wait_for_shards)

# as the spectral shards (one plain and one augmented copy of each group): the plain images are what a
# microscope delivers, so half of what the network sees stays unaltered
AUGMENT_FRACTION = 0.5
SHARD_POLL_S = 60.0       # how often training looks for shards the generator has finished
# Planar Conv3d bodies train 1.7x faster on a CPU with channels-last weights (baseline, batch 32 pairs of
# 256 px, 1 thread: 5.3 -> 3.2 s per step); exports are converted back to the default layout.
CHANNELS_LAST_ARCHS = ("baseline", "patch_score")


@dataclass
class PairShards:
    """Shards of raw patch pairs kept as uint8 and indexed across shards (no concatenated copy)."""
    paths: list[Path] = field(default_factory=list)
    pairs: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    pixel_size_nm: list[np.ndarray] = field(default_factory=list)
    aperture_angle_mrad: list[np.ndarray] = field(default_factory=list)
    _ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    exclude: tuple = ()                # specimen indices left out
    only: int | None = None            # the one specimen kept

    @classmethod
    def load(cls, paths: list[Path], exclude: list[int] | tuple = (), only: int | None = None) -> "PairShards":
        shards = cls(exclude=tuple(exclude), only=only)
        for p in paths:
            shards.add(p)
        check_groups_left(shards.n_groups, paths, exclude, only)
        return shards

    @property
    def n_groups(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def add(self, path: Path) -> None:
        with np.load(path) as d:
            if "pairs" not in d.files:
                raise ValueError(f"{path} holds no raw patch pairs (keys {sorted(d.files)}); shards for the "
                                 "spectral network cannot train an image model: give it its own run_dir")
            pairs = d["pairs"]
            shape = (4, 2, datagen.PATCH_PX, datagen.PATCH_PX)
            if pairs.dtype != np.uint8 or pairs.shape[1:] != shape:
                raise ValueError(f"{path}: pairs are {pairs.dtype} {pairs.shape}, expected uint8 (n, "
                                 f"{', '.join(map(str, shape))})")
            keep = specimen_mask(d, path, self.exclude, self.only)
            sel = (lambda a: a) if keep is None else (lambda a: a[keep])
            self.pairs.append(sel(pairs))
            self.targets.append(sel(d["targets"]).astype(np.float32))
            self.pixel_size_nm.append(sel(d["pixel_size_nm"]).astype(np.float32))
            self.aperture_angle_mrad.append(sel(d["aperture_angle_mrad"]).astype(np.float32))
        self.paths.append(path)
        self._ends = np.cumsum([len(t) for t in self.targets])

    def take(self, idx: np.ndarray, alpha_ref_mrad: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Groups by global index: pairs (b, 4, 2, P, P) uint8, targets (b, 3) um, pixel sizes (b,) nm.

        With ``alpha_ref_mrad`` the pixel sizes are scaled by alpha_ref / alpha (what an aperture-normalised
        model expects; only for shards generated without ``gen.alpha_ref_mrad``, which are scaled already).
        """
        shard = np.searchsorted(self._ends, idx, side="right")
        local = idx - np.concatenate([[0], self._ends])[shard]
        pairs = np.stack([self.pairs[s][i] for s, i in zip(shard, local)])
        targets = np.stack([self.targets[s][i] for s, i in zip(shard, local)])
        px = np.array([self.pixel_size_nm[s][i] for s, i in zip(shard, local)], np.float32)
        if alpha_ref_mrad is not None:
            px = px * np.float32(alpha_ref_mrad) / np.array([self.aperture_angle_mrad[s][i]
                                                             for s, i in zip(shard, local)], np.float32)
        return pairs, targets, px


def to_device(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(x)
    if device.type == "cuda":
        # a fresh pinned copy per batch, never written again: the transfer may overlap the previous step
        return t.pin_memory().to(device, non_blocking=True)
    return t


def make_batch(shards: PairShards, idx: np.ndarray, rng: np.random.Generator,
               augment_fraction: float = AUGMENT_FRACTION) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups ``idx`` in [-1, 1], each augmented (one draw for its 4 pairs: one frame pair) with the given chance."""
    pairs_u8, targets, px = shards.take(idx)
    x = datagen.pairs_from_uint8(pairs_u8)
    for i in range(len(x)):
        if rng.random() < augment_fraction:
            x[i] = datagen.augment(x[i], rng)
    return x, targets, px


def _runs(px: np.ndarray) -> list[tuple[int, int]]:
    """Index ranges of consecutive equal pixel sizes (the generator writes one microscope's groups together)."""
    cuts = [0] + [i for i in range(1, len(px)) if px[i] != px[i - 1]] + [len(px)]
    return list(zip(cuts[:-1], cuts[1:]))


def evaluate_pairs(model: torch.nn.Module, shards: PairShards, device: torch.device, chunk_groups: int = 8,
                   alpha_ref_mrad: float | None = None) -> dict:
    """``train.evaluate`` for any network run end to end on patch pairs: same figures, same names.

    Each call sees groups of one pixel size, so a network that reads it gets every group's own. Any exported
    model scores on the same groups: ``evaluate_pairs(torch.jit.load(path), PairShards.load(paths), device,
    alpha_ref_mrad=meta["alpha_ref_mrad"])`` (e.g. the shipped SpectralNet on an image run's validation shards).
    """
    model.eval()
    preds, targets = [], []
    p = datagen.PATCH_PX
    with torch.no_grad():
        for start in range(0, shards.n_groups, chunk_groups):
            pairs_u8, t, px = shards.take(np.arange(start, min(start + chunk_groups, shards.n_groups)), alpha_ref_mrad)
            x = to_device(datagen.pairs_from_uint8(pairs_u8), device)
            for a, b in _runs(px):
                out = model(x[a:b].reshape(-1, 2, p, p), float(px[a]))
                preds.append(out.float().reshape(b - a, 4, 4).cpu())
            targets.append(t)
    c = consensus(torch.cat(preds)).numpy()
    return group_metrics(c, np.concatenate(targets))


def train_images(cfg: TrainConfig, log=print, max_seconds: float | None = None) -> dict:
    """Train ``cfg.arch`` end to end on the run's pair shards; resumes from ``checkpoint.pt``. Returns the best
    validation figures."""
    if not cfg.image_model:
        raise ValueError(f"train_images trains image networks; arch {cfg.arch!r} trains with train.train")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device("auto")
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)     # the shards may live elsewhere (data_dir)
    data = cfg.data
    model = build(cfg.arch, **cfg.model).to(device)
    if cfg.arch in CHANNELS_LAST_ARCHS:
        model = model.to(memory_format=torch.channels_last_3d)
    optim = Optimisation(model, cfg)
    step, best = optim.resume(log)
    log(f"training {cfg.arch} on {device}")
    if cfg.gen.get("alpha_ref_mrad") is not None:
        log("note: gen.alpha_ref_mrad only rescales the pixel size handed to the model; "
            f"{cfg.arch} reads raw pixels and ignores it")
    wait_for_shards(cfg, data)
    val = PairShards.load(shard_paths(data, "val"))
    train_set = PairShards(exclude=tuple(cfg.exclude_specimens))
    rng = np.random.default_rng(cfg.seed + step)
    meta_base = model_meta(cfg)

    p = datagen.PATCH_PX
    t0 = time.time()
    last_poll = -math.inf
    step_s, steps_timed = 0.0, 0
    while step < cfg.steps:
        if time.time() - last_poll > SHARD_POLL_S:
            known = set(train_set.paths)
            new = [q for q in shard_paths(data, "train") if q not in known]
            for q in new:
                train_set.add(q)
            if new:
                log(f"step {step}: training on {len(train_set.paths)} shards, {train_set.n_groups} groups")
            last_poll = time.time()
        model.train()
        ts = time.perf_counter()
        x, y, px = make_batch(train_set, rng.integers(0, train_set.n_groups, cfg.batch_groups), rng)
        g = x.shape[0]
        # one call per batch keeps BatchNorm statistics over the whole batch; the image networks ignore the
        # pixel size (their input is raw pixels), so the batch mean stands in for the groups' own
        pred = model(to_device(x, device).reshape(g * 4, 2, p, p), float(px.mean())).reshape(g, 4, 4)
        loss = group_loss(pred, to_device(y, device), cfg.relative_loss_scale_um)
        optim.step(loss)
        step += 1
        train_loss = loss.item()            # also waits for the GPU, so the step time below is real
        step_s += time.perf_counter() - ts
        steps_timed += 1
        if step % cfg.validate_every == 0:
            m = evaluate_pairs(model, val, device, cfg.batch_groups)
            m.update(step=step, train_loss=train_loss, s_per_step=step_s / steps_timed)
            step_s, steps_timed = 0.0, 0
            # best.pt is exported from a CPU copy so that it opens on any machine
            best = record_validation(run, m, best, log, lambda m: export_best(
                copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format), run,
                dict(meta_base, validation=m, train_groups=train_set.n_groups), step))
        optim.save_if_due(step, best)
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    optim.save(step, best)
    return best
