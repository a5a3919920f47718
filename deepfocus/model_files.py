"""Opening a DeepFocus model file: TorchScript with the ``meta.json`` that ``deepfocus train`` writes into it.

Both are checked before an estimator is built on them (and the estimator then tries the model on a batch of patch
pairs, ``DeepFocusEstimator._warm_up``): a file of another kind fails at once, naming itself and what it lacks,
instead of answering with conventions guessed for it (a model without its meta.json was read as one trained at
5 um pairs on no particular beam, and answered a 3 mrad microscope's pair 35 % short with status "ok").
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .calibration import StigCalibration
from .estimator import DEFAULT_MODEL, MODELS_DIR, DeepFocusEstimator, EstimatorSettings, pick_device
from .models import load_torchscript


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_meta(meta, where: str) -> dict:
    """``meta`` if the estimator can read it, else ValueError naming ``where`` and the entry."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta.json holds {type(meta).__name__}, not an object of the model's settings")
    problems = [f"{k} {meta[k]!r} is not a positive number" for k in ("perturbation_um", "alpha_ref_mrad",
                                                                        "wd_range_um")
                if meta.get(k) is not None and not _positive(meta[k])]      # None: not this kind of model
    px = meta.get("patch_px", 256)
    # the structure test reads each patch in 4 x 4 bins, quadrant by quadrant
    if not (isinstance(px, int) and not isinstance(px, bool) and px >= 64 and px % 8 == 0):
        problems.append(f"patch_px {px!r} is not a whole number of pixels, at least 64 and a multiple of 8")
    rng = meta.get("model_pixel_nm_range")
    if rng is not None and not (isinstance(rng, list) and len(rng) == 2 and all(_positive(v) for v in rng)
                                and rng[0] < rng[1]):
        problems.append(f"model_pixel_nm_range {rng!r} is not [finest, coarsest] in nm")
    if problems:
        raise ValueError(f"{where}: meta.json: {'; '.join(problems)}")
    return meta


def _open(p: Path, device):
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a directory: give the model file (.pt) in it")
    if not p.is_file():
        shipped = sorted(q.name for q in MODELS_DIR.glob("*.pt")) if MODELS_DIR.is_dir() else []
        raise FileNotFoundError(f"model file {str(p)!r} does not exist; shipped models in {MODELS_DIR}: "
                                f"{', '.join(shipped) or 'none'}")
    files = {"meta.json": ""}
    try:
        model = load_torchscript(p, device, files)
    except Exception as exc:  # torch's own message names neither the file nor what was expected
        raise ValueError(f"{str(p)!r} is not a TorchScript DeepFocus model: {exc}") from None
    if not files["meta.json"]:
        raise ValueError(f"{str(p)!r} has no meta.json, so nothing says which pairs, patch size and beam it was "
                         "trained for: use a model written by `deepfocus train`")
    try:
        meta = json.loads(files["meta.json"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(p)!r}: its meta.json is not valid JSON ({exc})") from None
    return model, check_meta(meta, repr(str(p)))


def model_path(path: str | Path | None) -> Path:
    """The model file ``path`` names: a path, or the name of a shipped model (``spectral_v5.pt``); None: the
    shipped default."""
    p = Path(path) if path is not None else DEFAULT_MODEL
    if not p.exists() and len(p.parts) == 1 and (MODELS_DIR / p).is_file():
        return MODELS_DIR / p
    return p


def read_meta(path: str | Path) -> dict:
    """The checked meta.json of a model file."""
    return _open(model_path(path), "cpu")[1]


def load_estimator(path: str | Path | None = None, device: str = "auto", calibration: StigCalibration | None = None,
                   settings: EstimatorSettings | None = None, threads: int | None = None,
                   aperture_angle_mrad: float | None = None) -> DeepFocusEstimator:
    """Open a TorchScript model file (default: the shipped model) as an estimator."""
    p = model_path(path)
    dev = pick_device(device)
    model, meta = _open(p, dev)
    return DeepFocusEstimator(model, meta, calibration, settings, device=str(dev), threads=threads, model_id=p.name,
                              aperture_angle_mrad=aperture_angle_mrad)


def load_estimator_for(cfg, path: str | Path | None = None, **kwargs) -> DeepFocusEstimator:
    """An estimator for the microscope described by a ``hardware.config.MicroscopeConfig``:
    its stigmator calibration and its aperture angle, as the installation knows them."""
    return load_estimator(path, calibration=StigCalibration.from_config(cfg),
                          aperture_angle_mrad=cfg.calibration.aperture_angle_mrad, **kwargs)
