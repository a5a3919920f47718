"""Single-shot wd answers on pairs with the artefacts of real saved frames.

On a real microscope the second frame of a pair can come back with another contrast than
the first: the area was just scanned (charging, contamination), the detector gain drifted,
or automatic brightness/contrast was left on; and microscope software draws a data bar
over the bottom rows of the frames it saves. The simulator keeps the detector constant
between the frames and saves bare frames, so this check takes simulated pairs and changes
them after acquisition: the wd + d frame gets a linear contrast stretch about its mean, a
gamma, or a brightness ramp across the frame (shading, as charging leaves it); or both
frames get a data bar; or both pass through one linear filter after detection: a detector
chain of finite bandwidth (a low-pass along the scan lines, time constant in pixels = tau /
dwell) or a smoothing of the saved frame (resampling, noise reduction); or the second frame
comes back moved (drift after a stage move, a beam off the lens centre); or both are clipped by
a tight detector offset and gain, saved as JPEG, or carry per-line brightness offsets
(detector flicker, mains pick-up). It reports, per change
and method, the mean error (bias) and the mean absolute error of the wd answer against the
truth, the mean absolute error of the astigmatism answer, and how many answers were "uncertain".
DeepFocus runs twice: as shipped (contrast matched, ``deepfocus.contrast``; data bar left out,
``deepfocus.databar``; frames registered, ``deepfocus.registration``; line offsets removed,
``deepfocus.line_offsets``) and with these off, to show what they buy.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .autofocus import acquire_pair
from .bench import BenchConfig, aberrated_scope, make_method, specimens, true_correction_um
from .datagen import lowpass_fast_axis, smooth_frames

RAW = "deepfocus, no frame checks"
# (name, kind, value): the changes applied to the pair
CHANGES = (("none", "gain", 1.0), ("gain 0.9", "gain", 0.9), ("gain 1.1", "gain", 1.1),
           ("gain 1.25", "gain", 1.25), ("gamma 0.9", "gamma", 0.9), ("gamma 1.1", "gamma", 1.1),
           ("shading 0.5", "shading", 0.5), ("data bar 80 rows", "databar", 80),
           ("bandwidth tau 1 px", "lowpass", 1.0), ("bandwidth tau 2 px", "lowpass", 2.0),
           ("smoothed sigma 0.8 px", "smooth", 0.8), ("shift 4 px", "shift", 4),
           ("shift 24 px", "shift", 24), ("moved 300 px", "shift", 300), ("clipped 2 %", "clip", 2.0),
           ("jpeg quality 75", "jpeg", 75),
           ("line offsets 0.1 s.d.", "lines", 0.1), ("line offsets 0.3 s.d.", "lines", 0.3))


def _full_scale(image: np.ndarray) -> float:
    return 65535.0 if image.dtype == np.uint16 else 255.0 if image.dtype == np.uint8 else float(image.max())


def draw_databar(image: np.ndarray, rows: int, wd_text: str) -> np.ndarray:
    """The frame as float32 with a data bar over its bottom ``rows``: black, white text."""
    import cv2
    x = image.astype(np.float32)
    full = _full_scale(image)
    text = np.zeros(x.shape, np.uint8)
    cv2.putText(text, f"EHT = 1.50 kV   WD = {wd_text} mm   Mag = 10.00 K X   Signal A = EsB",
                (12, x.shape[0] - rows // 2 + 8), cv2.FONT_HERSHEY_SIMPLEX, 0.9, 255, 2)
    x[-rows:] = 0.0
    x[text > 0] = full
    return x


def change_contrast(image: np.ndarray, kind: str, value: float) -> np.ndarray:
    """The frame as float32 with its contrast changed, in the frame's own intensity units."""
    x = image.astype(np.float32)
    full = _full_scale(image)
    if kind == "gain":
        m = float(x.mean())
        return m + (x - m) * np.float32(value)
    if kind == "gamma":
        return (full * (np.clip(x, 0, None) / full) ** np.float32(value)).astype(np.float32)
    if kind == "shading":
        # a brightness ramp across the frame of ``value`` frame standard deviations from edge to edge
        ramp = np.linspace(-0.5, 0.5, x.shape[1], dtype=np.float32)[None, :]
        return x + np.float32(value * float(x.std())) * ramp
    raise ValueError(f"unknown contrast change {kind!r}; known: gain, gamma, shading")


def shift_pair(minus: np.ndarray, plus: np.ndarray, px: int) -> tuple[np.ndarray, np.ndarray]:
    """The pair with the second frame moved by ``px`` pixels along both axes, cropped to their common field: the
    specimen drifting after a stage move, or a beam not quite through the lens centre moving the image with focus.
    Whole pixels: an interpolated shift would filter one frame only."""
    if px == 0:
        return minus.astype(np.float32), plus.astype(np.float32)
    return minus[:-px, :-px].astype(np.float32), plus[px:, px:].astype(np.float32)


def clip_pair(minus: np.ndarray, plus: np.ndarray, percent: float) -> tuple[np.ndarray, np.ndarray]:
    """Both frames clipped at the levels that cut ``percent`` % of the first frame's pixels at either end, as a
    detector offset and gain set too tight clip them; the sharper frame has more extreme pixels and loses more."""
    lo, hi = np.percentile(minus, (percent, 100.0 - percent))
    return (np.clip(minus.astype(np.float32), lo, hi), np.clip(plus.astype(np.float32), lo, hi))


def jpeg_pair(minus: np.ndarray, plus: np.ndarray, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """Both frames saved as 8-bit JPEG at ``quality`` (one scale for both) and read back."""
    import cv2
    scale = 255.0 / _full_scale(minus)
    out = []
    for x in (minus, plus):
        ok, buf = cv2.imencode(".jpg", np.clip(x * scale, 0, 255).astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out.append(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).astype(np.float32))
    return out[0], out[1]


def line_offsets(image: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    """Each scan line shifted in brightness by N(0, ``sd`` frame s.d.), independently per frame: detector and
    amplifier flicker, mains pick-up."""
    x = image.astype(np.float32)
    return x + rng.normal(0.0, sd * float(x.std()), (x.shape[0], 1)).astype(np.float32)


def apply_change(minus: np.ndarray, plus: np.ndarray, kind: str, value: float,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    if kind == "databar":
        # the bar states each frame's own wd, so its text differs a little between the frames
        return draw_databar(minus, int(value), "4.495"), draw_databar(plus, int(value), "4.505")
    if kind == "lowpass":
        return lowpass_fast_axis(minus, value), lowpass_fast_axis(plus, value)
    if kind == "smooth":
        return smooth_frames(minus, value), smooth_frames(plus, value)
    if kind == "shift":
        return shift_pair(minus, plus, int(value))
    if kind == "clip":
        return clip_pair(minus, plus, value)
    if kind == "jpeg":
        return jpeg_pair(minus, plus, int(value))
    if kind == "lines":
        rng = rng if rng is not None else np.random.default_rng(0)
        return line_offsets(minus, value, rng), line_offsets(plus, value, rng)
    return minus.astype(np.float32), change_contrast(plus, kind, value)


def true_astig_um(minus, plus) -> tuple[float, float]:
    """The astigmatism correction to add (image frame, um), from the simulator's truth in the frames' metadata."""
    tm, tp = minus.metadata["truth"], plus.metadata["truth"]
    return -(tm["astig_x_um"] + tp["astig_x_um"]) / 2, -(tm["astig_y_um"] + tp["astig_y_um"]) / 2


def run_frame_artefacts(cfg: BenchConfig, n: int, wd_range_um: tuple[float, float] = (2.0, 20.0),
                         stig_range: float = 2.0, log=print) -> dict:
    rng = np.random.default_rng(cfg.seed + 11)
    specs = specimens(cfg)
    methods = [m for m in cfg.methods if m != "sweep"]
    if len(methods) < len(cfg.methods):
        log("sweep takes its own frames through the microscope: not part of this check")
    truths, pairs = [], []
    cfg_micro = None
    for i in range(n):
        scope = aberrated_scope(cfg, rng, specs[i % len(specs)], wd_range_um, stig_range)
        cfg_micro = scope.config
        minus, plus = acquire_pair(scope.sem, 5e-6)
        truths.append((true_correction_um(minus, plus), *true_astig_um(minus, plus)))
        pairs.append((minus.image, plus.image))
    estimators = {m: make_method(m, cfg_micro, cfg.model, cfg.n_patches) for m in methods}
    if "deepfocus" in estimators:
        raw = make_method("deepfocus", cfg_micro, cfg.model, cfg.n_patches)
        raw.settings = replace(raw.settings, match_contrast=False, drop_databar=False, register=False,
                               min_field_correlation=0.0, remove_line_offsets=False)
        estimators[RAW] = raw
    t = np.array(truths)
    out: dict[str, dict] = {}
    for name, kind, value in CHANGES:
        out[name] = {}
        for m, est in estimators.items():
            pred = []
            # every method sees the same random line offsets
            change_rng = np.random.default_rng(cfg.seed + 12)
            for minus, plus in pairs:
                c = est.estimate(*apply_change(minus, plus, kind, value, change_rng), cfg.pixel_size_nm * 1e-9, 5e-6)
                pred.append((c.wd_um, c.astig_x_um, c.astig_y_um) if c.status == "ok" else (np.nan,) * 3)
            p = np.array(pred)
            ok = np.isfinite(p[:, 0])
            err = p[ok] - t[ok]
            r = {"bias_wd_um": float(err[:, 0].mean()) if ok.any() else float("nan"),
                 "mae_wd_um": float(np.abs(err[:, 0]).mean()) if ok.any() else float("nan"),
                 "mae_astig_um": float(np.abs(err[:, 1:]).mean()) if ok.any() else float("nan"),
                 "uncertain": int((~ok).sum())}
            out[name][m] = r
            log(f"{name:22s} {m:28s} wd bias {r['bias_wd_um']:+.2f} um  MAE {r['mae_wd_um']:.2f} um  "
                f"astig MAE {r['mae_astig_um']:.2f} um  uncertain {r['uncertain']}/{n}")
    return {"config": {"profile": cfg.profile, "overrides": cfg.overrides, "specimens": cfg.specimens,
                       "model": cfg.model, "dwell_ns": cfg.dwell_ns, "pixel_size_nm": cfg.pixel_size_nm,
                       "frame_px": list(cfg.frame_px), "n": n, "wd_range_um": list(wd_range_um),
                       "stig_range": stig_range, "seed": cfg.seed},
            "changes": out}
