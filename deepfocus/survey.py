"""The closed loop over microscopes drawn at random: how it ends where no table of the README looked.

``deepfocus bench`` compares methods on one microscope from many starts; ``deepfocus survey`` runs the shipped loop
once on each of many microscopes, each drawn from a seed, and lists how every run ended. Two kinds:

- ``geometry``: setup_a or setup_b (the latter with its true stigmator calibration, as after ``deepfocus
  calibrate``), beam half-angle 1.2-14 mrad (log-uniform, the profile's calibration knowing it), pixels 2-40 nm
  (log-uniform), frames 512-2048 px wide at 2:1, 4:3 or 1:1, dwell 25-500 ns, a third with a random scan rotation;
- ``detector``: setup_a at 10 nm, 1024 x 768, 25-100 ns, with the detector, probe and drift drawn: efficiency,
  gain, offset, read noise, 8 or 16 bit, line jitter, brightness drift, specimen drift, aperture taper and halo,
  in-focus probe size, beam current, lens play, image rotation and scale with wd.

Each run starts within +-30 um and +-6 units of the truth, on one of the given specimens, and is the loop as
``deepfocus autofocus`` runs it (the profile's ``autofocus`` section). A run that ends "failed" before any frame
(frames too small for the binning their pixels need) is a refusal by name; one that ends "converged" outside the
margin would be a silent wrong answer. Measured figures: deepfocus/README.md, "Surveys over microscopes".
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

KINDS = ("geometry", "detector")
# the thesis' margin: within it after the loop, a run found focus
MARGIN_WD_UM = 1.0
MARGIN_STIG = 0.25


@dataclass
class SurveyRun:
    """One microscope of a survey and how the loop ended on it."""
    index: int
    profile: str
    overrides: list[str]
    specimen: str
    pixel_size_nm: float
    frame_px: tuple[int, int]
    dwell_ns: float
    start_wd_um: float
    start_stig: tuple[float, float]
    outcome: str = ""
    message: str = ""
    pairs: int = 0
    final_wd_um: float = math.nan
    final_stig: tuple[float, float] = (math.nan, math.nan)
    within_margin: bool = False
    extra: dict = field(default_factory=dict)


def _r(x: float, digits: int = 3) -> float:
    return float(round(float(x), digits))


def draw(kind: str, index: int, rng: np.random.Generator, specimens: list[str]) -> SurveyRun:
    """The ``index``-th microscope, scan and start of a survey of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"survey kind must be one of {', '.join(KINDS)}, got {kind!r}")
    spec = str(rng.choice(specimens)) if specimens else ""
    if kind == "geometry":
        profile = str(rng.choice(["setup_a", "setup_b"]))
        alpha = _r(math.exp(rng.uniform(math.log(1.2), math.log(14.0))), 2)
        over = [f"optics.aperture_angle_mrad={alpha}", f"calibration.aperture_angle_mrad={alpha}"]
        if profile == "setup_b":        # its true stigmator calibration, as deepfocus calibrate finds it
            over += ["calibration.stig_rotation_deg=35", "calibration.stig_scale_um_per_unit=1.4"]
        if rng.random() < 1 / 3:
            over.append(f"scan.rotation_deg={_r(rng.uniform(-180, 180), 1)}")
        px = _r(math.exp(rng.uniform(math.log(2.0), math.log(40.0))), 2)
        w = int(rng.choice([512, 640, 768, 1024, 1536, 2048]))
        frame = (w, int(w * float(rng.choice([0.5, 0.75, 1.0]))))
        dwell = float(rng.choice([25, 50, 100, 200, 500]))
    else:
        profile, px, frame = "setup_a", 10.0, (1024, 768)
        dwell = float(rng.choice([25, 50, 100]))
        ranges = {"detector.efficiency": (0.03, 0.4), "detector.gain": (0.3, 1.0), "detector.offset": (0.0, 0.3),
                  "detector.read_noise": (0.0, 0.02), "detector.line_jitter_px": (0.0, 0.8),
                  "detector.brightness_drift": (0.0, 0.2), "drift.rate_nm_per_s": (0.0, 3.0),
                  "drift.random_walk_nm_per_sqrt_s": (0.0, 1.0), "optics.aperture_taper": (-1.0, 2.5),
                  "optics.halo_fraction": (0.0, 0.3), "optics.in_focus_probe_nm": (1.5, 8.0),
                  "beam.current_na": (0.2, 3.0), "optics.hysteresis_um": (0.0, 0.5),
                  "optics.image_rotation_deg_per_mm": (-5.0, 5.0), "optics.image_scale_per_mm": (0.0, 0.01)}
        over = [f"{k}={_r(rng.uniform(lo, hi), 4)}" for k, (lo, hi) in ranges.items()]
        over.append(f"detector.bit_depth={int(rng.choice([8, 16]))}")
    start_wd = _r(rng.uniform(-30, 30), 1)
    start_stig = (_r(rng.uniform(-6, 6), 2), _r(rng.uniform(-6, 6), 2))
    return SurveyRun(index, profile, over, spec, px, frame, dwell, start_wd, start_stig)


def run_one(run: SurveyRun, model: str | None = None) -> SurveyRun:
    """The loop on ``run``'s microscope from its start, as ``deepfocus autofocus`` runs it; ``run`` filled in."""
    from hardware.factory import open_microscope
    from hardware.sim.specimen import load_specimen

    from .autofocus import AutofocusSettings, autofocus
    from .model_files import load_estimator_for

    try:
        scope = open_microscope(run.profile, run.overrides,
                                specimen=load_specimen(run.specimen) if run.specimen else None)
        sem = scope.sem
        sem.set_scan(pixel_size_m=run.pixel_size_nm * 1e-9, width_px=run.frame_px[0], height_px=run.frame_px[1],
                     dwell_s=run.dwell_ns * 1e-9)
        centre = np.array(scope.sim.true_stig())
        sem.set_stig(*(centre + np.array(run.start_stig)))
        sem.set_wd_m(scope.sim.true_wd_m() + run.start_wd_um * 1e-6)
        estimator = load_estimator_for(scope.config, model)
        settings = AutofocusSettings.from_config(scope.config.autofocus)
    except (ValueError, OSError) as exc:    # a microscope the draw made impossible: named, as the CLI names it
        run.outcome, run.message = "not run", str(exc)
        return run
    res = autofocus(sem, estimator, settings)
    run.outcome, run.message, run.pairs = res.outcome, res.message, res.images_taken // 2
    run.final_wd_um = _r(scope.sim.aberration().defocus_um)
    run.final_stig = tuple(_r(v) for v in np.subtract(sem.get_stig(), scope.sim.true_stig()))
    run.within_margin = abs(run.final_wd_um) <= MARGIN_WD_UM and max(map(abs, run.final_stig)) <= MARGIN_STIG
    run.extra = {"perturbation_um": _r(res.extra.get("perturbation_m", math.nan) * 1e6)}
    return run


def survey(kind: str, runs: int, seed: int, specimens: list[str], model: str | None = None,
          on_run: Callable[[SurveyRun], None] | None = None) -> dict:
    """``runs`` microscopes of ``kind`` drawn from ``seed``; the runs and a summary of how they ended."""
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    rng = np.random.default_rng(seed)
    done = []
    for i in range(runs):
        run = run_one(draw(kind, i, rng, specimens), model)
        done.append(run)
        if on_run is not None:
            on_run(run)
    ends = Counter(f"{r.outcome}, {'within' if r.within_margin else 'outside'} the margin" for r in done)
    # a loop that says it converged where it is not within the margin answered wrong without saying so
    silent = [r.index for r in done if r.outcome == "converged" and not r.within_margin]
    return {"kind": kind, "seed": seed, "specimens": specimens, "ends": dict(ends.most_common()),
            "converged_outside_margin": silent, "runs": [asdict(r) for r in done]}
