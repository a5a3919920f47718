"""Single-shot wd answers on pairs blurred by probe shapes other than the simulator's.

The simulated defocused probe is the aperture disc mapped by the aberration (DESIGN.md,
geometric spot). A real column departs from it: the aperture is not illuminated quite
uniformly, spherical aberration piles current towards the rim of the defocused spot, and
scattered electrons put a faint wide halo around it. A network that learned only the
disc could mis-scale its answers on such a microscope. This check takes a specimen (a
held-out real micrograph), blurs it for focus at z -/+ d with four probe profiles of the
same geometric radius alpha |z|, adds Poisson noise at the profile's dose, and fits the
predicted against the true wd correction for each profile and method.

- ``disc``: uniform disc (what the simulator and the training data use);
- ``gauss``: Gaussian of the disc's rms radius (MAPFoSt's probe model);
- ``halo``: 70 % of the current in the disc, 30 % in a Gaussian 1.5 x wider;
- ``rim``: current density rising with radius (0.4 + (r / R)^2), a caustic-like spot.

It says how much a probe-shape mismatch scales the first correction; the closed loop's
online wd gain (``AutofocusSettings.learn_gain``) absorbs a scale error from the second
correction on. Astigmatism is zero in these pairs, so any astigmatism answered is false.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import fftconvolve

from hardware.config import load_profile
from hardware.sem import ELEMENTARY_CHARGE_C
from hardware.sim.specimen import load_specimen

from .bench import make_method

SHAPES = ("disc", "gauss", "halo", "rim")


def probe_kernel(shape: str, radius_px: float) -> np.ndarray:
    """Normalised 2-D kernel of one probe profile with geometric radius ``radius_px``."""
    r_geo = max(float(radius_px), 0.3)
    n = int(np.ceil(3 * r_geo)) + 2
    y, x = np.mgrid[-n:n + 1, -n:n + 1].astype(np.float64)
    r = np.hypot(x, y)
    disc = np.clip(r_geo + 0.5 - r, 0.0, 1.0)          # anti-aliased edge
    if shape == "disc":
        k = disc
    elif shape == "gauss":
        s = r_geo / 2.0                                  # the disc's rms radius is R / sqrt(2)
        k = np.exp(-r ** 2 / (2 * s * s))
    elif shape == "halo":
        wide = np.exp(-r ** 2 / (2 * (1.5 * r_geo) ** 2))
        k = 0.7 * disc / disc.sum() + 0.3 * wide / wide.sum()
    elif shape == "rim":
        k = disc * (0.4 + (r / max(r_geo, 1.0)) ** 2)
    else:
        raise ValueError(f"unknown probe shape {shape!r}; known: {', '.join(SHAPES)}")
    return k / k.sum()


def run_probe_shapes(profile: str, overrides: list[str], specimen_path: str, methods: list[str],
                     model: str | None, dwell_ns: float, n: int = 16, wd_range_um: tuple[float, float] = (1.0, 20.0),
                     seed: int = 0, shapes: tuple[str, ...] = SHAPES, log=print) -> dict:
    """Per shape and method: slope and offset of predicted vs true wd correction, MAE, false astigmatism."""
    cfg = load_profile(profile, overrides)
    spec = load_specimen(specimen_path)
    p_m = spec.pixel_size_m
    alpha = cfg.calibration.aperture_angle_mrad * 1e-3
    # detected electrons per pixel at the profile's current and this dwell
    counts = cfg.beam.current_na * 1e-9 * dwell_ns * 1e-9 / ELEMENTARY_CHARGE_C * cfg.detector.efficiency
    rng = np.random.default_rng(seed)
    truths = rng.uniform(*wd_range_um, n) * rng.choice([-1.0, 1.0], n)
    slices = rng.integers(0, spec.slices.shape[0], n)
    if "sweep" in methods:
        log("sweep takes its own frames through the microscope: not part of this check")
        methods = [m for m in methods if m != "sweep"]
    estimators = {m: make_method(m, cfg, model) for m in methods}
    d_um = 5.0
    out: dict[str, dict] = {}
    for shape in shapes:
        pred = {m: [] for m in methods}
        astig = {m: [] for m in methods}
        for corr, k in zip(truths, slices):
            img = spec.slices[int(k)].astype(np.float64)
            frames = []
            # the aberration is minus the correction to add; the frames are taken at it -/+ d
            for z in (-corr - d_um, -corr + d_um):
                blurred = fftconvolve(img, probe_kernel(shape, alpha * abs(z) * 1e-6 / p_m), mode="same")
                # BSE-like contrast on a floor, Poisson at the dose, video-normalised to 16 bit
                lam = counts * (0.2 + 0.8 * np.clip(blurred, 0.0, 1.0))
                frames.append(np.clip(rng.poisson(lam) / counts / 1.2 * 65535, 0, 65535).astype(np.uint16))
            for m, est in estimators.items():
                c = est.estimate(frames[0], frames[1], p_m, d_um * 1e-6)
                pred[m].append(c.wd_um if c.status == "ok" else np.nan)
                astig[m].append(float(np.hypot(c.astig_x_um, c.astig_y_um)) if c.status == "ok" else np.nan)
        out[shape] = {}
        for m in methods:
            p = np.array(pred[m])
            ok = np.isfinite(p)
            fit = np.polyfit(truths[ok], p[ok], 1) if ok.sum() >= 3 else (np.nan, np.nan)
            out[shape][m] = {"slope": float(fit[0]), "offset_um": float(fit[1]),
                             "mae_wd_um": float(np.abs(p[ok] - truths[ok]).mean()) if ok.any() else float("nan"),
                             "false_astig_um_median": float(np.nanmedian(astig[m])) if ok.any() else float("nan"),
                             "uncertain": int((~ok).sum()),
                             "pairs": [[float(t), float(v)] for t, v in zip(truths, p)]}
            r = out[shape][m]
            log(f"{shape:6s} {m:9s} slope {r['slope']:.2f} offset {r['offset_um']:+.2f} um  "
                f"MAE {r['mae_wd_um']:.2f} um  false astig {r['false_astig_um_median']:.2f} um  "
                f"uncertain {r['uncertain']}/{n}")
    return {"config": {"profile": profile, "overrides": overrides, "specimen": str(specimen_path), "model": model,
                       "dwell_ns": dwell_ns, "n": n, "wd_range_um": list(wd_range_um), "seed": seed,
                       "pixel_size_nm": p_m * 1e9, "aperture_angle_mrad": alpha * 1e3,
                       "detected_e_per_px": counts},
            "shapes": out}
