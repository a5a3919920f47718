"""Validation figures of exported models on a run's shards (what the model cards and ``log.jsonl`` report).

``deepfocus evaluate --model A.pt --model B.pt --shards RUN/data`` scores every model on the same
held-out groups. Pair shards (image runs) hold raw patch pairs, so any exported model reads them,
the spectral ones through their own front end. Feature shards (spectral runs) hold the front end's
output and only spectral models with that front end read them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .train import _load_shards, evaluate, load_exported, shard_paths


def shard_kind(paths: list[Path]) -> str:
    """``'pairs'`` or ``'features'`` from the first shard's keys."""
    with np.load(paths[0]) as d:
        if "pairs" in d.files:
            return "pairs"
        if "features" in d.files:
            return "features"
    raise ValueError(f"{paths[0]} holds neither patch pairs nor spectral features")


def evaluate_models(models: list[Path], shards_dir: Path, kind: str = "val",
                    specimen: int | None = None) -> dict[str, dict]:
    """Figures per model (keyed by path) on the ``kind`` shards in ``shards_dir``; with ``specimen``, on that
    specimen's groups alone (an index into ``datagen.VAL_SPECIMENS`` or ``TRAIN_SPECIMENS``)."""
    from .models import build
    from .train_images import PairShards, evaluate_pairs
    from .datagen import TRAIN_SPECIMENS, VAL_SPECIMENS
    listed = VAL_SPECIMENS if kind == "val" else TRAIN_SPECIMENS
    if specimen is not None and not 0 <= specimen < len(listed):
        names = ", ".join(f"{i}: {sp.name}" for i, sp in enumerate(listed))
        raise ValueError(f"--specimen {specimen} is not one of the {kind} specimens ({names})")
    paths = shard_paths(Path(shards_dir), kind)
    if not paths:
        raise FileNotFoundError(f"no {kind}_*.npz shards in {str(shards_dir)!r}")
    what = shard_kind(paths)
    pairs = PairShards.load(paths, only=specimen) if what == "pairs" else None
    feats = _load_shards(paths, only=specimen) if what == "features" else None
    out = {}
    for path in models:
        model, meta = load_exported(path)
        if what == "pairs":
            out[str(path)] = evaluate_pairs(model, pairs, torch.device("cpu"), alpha_ref_mrad=meta.get("alpha_ref_mrad"))
            continue
        if meta.get("arch", "spectral") != "spectral":
            raise ValueError(f"{str(path)!r} is a {meta.get('arch')!r} network: feature shards hold spectral "
                             "front-end maps that only spectral models read; evaluate it on pair shards")
        net = build("spectral", **(meta.get("model_args") or {}))
        net.load_state_dict(model.state_dict())
        expected = (net.conv1.in_channels, net.front.n_r, net.front.n_theta)
        got = tuple(feats[0].shape[2:])
        if got != expected:
            raise ValueError(f"{str(path)!r} reads feature maps {expected}, the shards hold {got}")
        out[str(path)] = evaluate(net, *feats)
    return out
