"""Closed-loop comparison on the simulated microscope: every method from the same starts.

Each trial draws a specimen, a stage position and an initial aberration (wd, stigmator
x, stigmator y); every method then runs on a fresh microscope with the same seed in the
same state. After each correction the true aberration is read from the simulator.

A method may take its focus frames with a scan of its own, written after ``@`` as
colon-separated dwell, pixel size and frame size (``deepfocus@25ns:20nm:512x384``), the
rest from the bench's scan. One run can so hold the same method at several operating
points, all from the same starts: how a facility finds the least dose at which a method
still focuses reliably.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hardware.config import load_profile
from hardware.factory import open_microscope
from hardware.sem import ScanSettings
from hardware.sim.specimen import Specimen, load_specimen

from .autofocus import AutofocusSettings, autofocus
from .calibration import StigCalibration
from .correction import chosen_perturbation_m
from .jsonio import json_safe

START_MODES = ("uniform", "corners")


@dataclass
class BenchConfig:
    profile: str = "setup_a"
    overrides: list[str] = field(default_factory=list)
    specimens: list[str] = field(default_factory=list)     # empty: the synthetic specimen
    methods: list[str] = field(default_factory=lambda: ["deepfocus", "mapfost", "sweep"])
    model: str | None = None
    trials: int = 10
    iterations: int = 3
    dwell_ns: float = 50.0
    pixel_size_nm: float = 10.0
    frame_px: tuple[int, int] = (1024, 768)
    start_range_um: float = 30.0
    start_range_stig: float = 6.0
    # "uniform": each start drawn within +-the ranges; "corners": at the ranges' corners, the 8 sign combinations
    # in turn (the thesis' convergence runs start at (30 um, +6, -6): the hardest starts the range allows)
    starts: str = "uniform"
    margin_wd_um: float = 1.0
    margin_stig: float = 0.25
    seed: int = 0
    n_patches: int | None = None          # DeepFocus patch pairs per estimate (None: the estimator's default)
    perturbation_um: float | None = None  # wd -/+ this for each pair (None: each method's own)
    blank_fraction: float = 0.0           # share of each specimen's field made bare ground (see ``specimens``)

    def __post_init__(self) -> None:
        if not 0.0 <= self.blank_fraction < 1.0:
            raise ValueError(f"blank fraction must be at least 0 and below 1, got {self.blank_fraction:g}")
        if self.blank_fraction and not self.specimens:
            raise ValueError("a blank fraction needs specimen images (--specimens PATH)")
        if self.starts not in START_MODES:
            raise ValueError(f"unknown start mode {self.starts!r}; known: {', '.join(START_MODES)}")


def corner_start(trial: int, range_um: float, range_stig: float) -> tuple[float, np.ndarray]:
    """Trial ``trial``'s start at a corner of the ranges: (+wd, +x, -y) first, as the thesis starts, then the other
    sign combinations in turn."""
    k = trial % 8
    sw, sx, sy = (-1 if k & 4 else 1), (-1 if k & 2 else 1), (1 if k & 1 else -1)
    return sw * range_um, np.array([sx * range_stig, sy * range_stig])


def specimens(cfg: BenchConfig) -> list:
    """The bench's specimens (``[None]``: the synthetic one), with ``blank_fraction`` of each field's width made
    bare dark ground, as where a section is milled through to the wafer or the field reaches resin."""
    specs = [load_specimen(p) for p in cfg.specimens] or [None]
    f = cfg.blank_fraction
    if f == 0.0:
        return specs
    out = []
    for sp in specs:
        s = sp.slices.copy()
        s[:, :, :int(round(f * s.shape[2]))] = 0.0     # the darkest grey of the normalised stack
        # the field repeats mirrored, so the frame shows blank and tissue bands in these shares
        out.append(Specimen(s, sp.pixel_size_m, sp.slice_thickness_m, name=f"{sp.name} ({f:.0%} blank)"))
    return out


METHOD_NAMES = ("deepfocus", "mapfost", "sweep")
_SCAN_TOKEN = re.compile(r"^(?:(?P<dwell>[0-9.]+)ns|(?P<pixel>[0-9.]+)nm|(?P<w>[0-9]+)x(?P<h>[0-9]+))$")


@dataclass(frozen=True)
class MethodRun:
    """One method of a bench run and the scan of its focus frames."""
    label: str                      # as written, e.g. "deepfocus@25ns:512x384"; the key of its results
    method: str                     # deepfocus, mapfost or sweep
    scan: ScanSettings


def method_runs(cfg: BenchConfig) -> list[MethodRun]:
    """``cfg.methods`` parsed; ValueError naming the entry that is malformed or repeated."""
    runs, seen = [], set()
    for label in cfg.methods:
        name, _, spec = label.partition("@")
        if name not in METHOD_NAMES:
            raise ValueError(f"unknown method {name!r} in {label!r}; known: {', '.join(METHOD_NAMES)}")
        if label in seen:
            raise ValueError(f"method {label!r} is listed twice")
        seen.add(label)
        dwell, pixel, (w, h) = cfg.dwell_ns, cfg.pixel_size_nm, cfg.frame_px
        for tok in (spec.split(":") if spec else []):
            m = _SCAN_TOKEN.match(tok.strip())
            if m is None:
                raise ValueError(f"cannot read {tok!r} in {label!r}: write the focus frames' scan as e.g. "
                                 "deepfocus@25ns:20nm:512x384 (dwell, pixel size, frame size)")
            try:
                if m["dwell"]:
                    dwell = float(m["dwell"])
                elif m["pixel"]:
                    pixel = float(m["pixel"])
                else:
                    w, h = int(m["w"]), int(m["h"])
            except ValueError:
                raise ValueError(f"cannot read {tok!r} in {label!r} as a number") from None
        runs.append(MethodRun(label, name, ScanSettings(pixel_size_m=pixel * 1e-9, width_px=w, height_px=h,
                                                        dwell_s=dwell * 1e-9)))
    return runs


def check_start_ranges(cfg: BenchConfig, micro) -> None:
    """ValueError unless the start ranges lie inside the step limits of ``micro``'s focus loop (its YAML's
    ``autofocus``): a start at the limit would turn every overshoot of the first step into the exact answer (the
    clip lands on the truth) and so flatter whichever method overshoots."""
    lim = micro.autofocus
    if cfg.start_range_um >= lim.max_step_wd_um or cfg.start_range_stig >= lim.max_step_stig:
        raise ValueError(f"start range (+-{cfg.start_range_um:g} um, +-{cfg.start_range_stig:g} units) must lie "
                         f"inside the loop's step limits ({lim.max_step_wd_um:g} um, {lim.max_step_stig:g} units; "
                         "autofocus.max_step_wd_um and autofocus.max_step_stig in the profile)")


def check_scans(cfg: BenchConfig) -> None:
    """Every method's focus scan set once on the profile's microscope: LimitError (a ValueError) naming the
    setting beyond its limit, before any trial runs."""
    runs = method_runs(cfg)
    scope = open_microscope(cfg.profile, list(cfg.overrides))
    for r in runs:
        try:
            scope.sem.set_scan(pixel_size_m=r.scan.pixel_size_m, width_px=r.scan.width_px,
                               height_px=r.scan.height_px, dwell_s=r.scan.dwell_s)
        except ValueError as exc:
            raise ValueError(f"{r.label}: {exc}") from None


def check_methods_answer(cfg: BenchConfig, runs) -> None:
    """Each method asked once whether it answers pairs of its focus frames: ValueError naming the method before any
    trial, where every trial would otherwise end "failed" without a frame."""
    config = load_profile(cfg.profile, cfg.overrides)
    for r in runs:
        method = make_method(r.method, config, cfg.model, cfg.n_patches)
        if hasattr(method, "check_frames"):
            d = _perturbation_m(cfg) or chosen_perturbation_m(method, r.scan.pixel_size_m)
            try:
                method.check_frames((r.scan.height_px, r.scan.width_px), r.scan.pixel_size_m, d)
            except ValueError as exc:
                raise ValueError(f"{r.label}: {exc}") from None


def make_method(name: str, cfg_micro, model: str | None, n_patches: int | None = None):
    cal = StigCalibration.from_config(cfg_micro)
    if name == "deepfocus":
        from .estimator import EstimatorSettings
        from .model_files import load_estimator_for
        settings = EstimatorSettings(n_patches=n_patches) if n_patches else None
        return load_estimator_for(cfg_micro, model, settings=settings)
    if name == "mapfost":
        from .methods import MapfostEstimator
        # MAPFoSt gets the aperture angle the installation knows, as DeepFocus does
        return MapfostEstimator(cfg_micro.calibration.aperture_angle_mrad * 1e-3, cal)
    if name == "sweep":
        from .methods import SweepFocus
        return SweepFocus(calibration=cal)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")


def _perturbation_m(cfg: BenchConfig) -> float | None:
    return None if cfg.perturbation_um is None else cfg.perturbation_um * 1e-6


def probe_growth(optics, ab) -> float:
    """How much larger the probe is than in focus (RMS radius, as a fraction) at the true aberration ``ab`` of a
    microscope with ``optics`` (its OpticsConfig): what a residual error costs the image, where the margin only
    says pass or fail."""
    from hardware.sim.optics import ApertureProfile, probe_rms_radius_m
    args = (optics.aperture_angle_mrad * 1e-3, optics.in_focus_probe_nm * 1e-9,
            ApertureProfile(optics.aperture_taper, optics.halo_fraction, optics.halo_width))
    r = probe_rms_radius_m(ab.defocus_um * 1e-6, (ab.astig_x_um * 1e-6, ab.astig_y_um * 1e-6), *args)
    return r / probe_rms_radius_m(0.0, (0.0, 0.0), *args) - 1.0


def _state(scope) -> tuple[float, float, float, float]:
    """|wd error| (um), |stig error| per axis (units), probe growth (fraction)."""
    ab = scope.sim.aberration()
    ts = scope.sim.true_stig()
    st = scope.sem.get_stig()
    return abs(ab.defocus_um), abs(st[0] - ts[0]), abs(st[1] - ts[1]), probe_growth(scope.config.optics, ab)


def run_bench(cfg: BenchConfig, log=print) -> dict:
    check_start_ranges(cfg, load_profile(cfg.profile, cfg.overrides))
    rng = np.random.default_rng(cfg.seed)
    specs = specimens(cfg)
    results: dict[str, dict] = {}
    runs = method_runs(cfg)
    errors = {m: np.full((cfg.trials, cfg.iterations + 1, 4), np.nan) for m in cfg.methods}
    per = {m: {"compute": [], "time": [], "dose": [], "failed": 0, "outcomes": [], "frame_dose": [], "pair": [],
               "far": 0}
           for m in cfg.methods}
    check_methods_answer(cfg, runs)
    for t in range(cfg.trials):
        spec = specs[t % len(specs)]
        seed = int(rng.integers(1, 2**31))
        z = rng.uniform(-1, 1) * cfg.start_range_um
        ds = rng.uniform(-1, 1, 2) * cfg.start_range_stig
        if cfg.starts == "corners":
            # drawn above all the same, so that a corners run keeps the uniform run's microscopes and fields
            z, ds = corner_start(t, cfg.start_range_um, cfg.start_range_stig)
        off = rng.uniform(-2e-4, 2e-4, 2)
        for run in runs:
            name, scan = run.label, run.scan
            scope = open_microscope(cfg.profile, list(cfg.overrides) + [f"seed={seed}"], specimen=spec)
            method = make_method(run.method, scope.config, cfg.model, cfg.n_patches)
            p0 = scope.stage.position()
            scope.stage.move_to(x_m=p0.x_m + off[0], y_m=p0.y_m + off[1])
            # keep the profile's scan rotation: the stigmator calibration was folded for it
            scope.sem.set_scan(pixel_size_m=scan.pixel_size_m, width_px=scan.width_px, height_px=scan.height_px,
                               dwell_s=scan.dwell_s)
            ts = scope.sim.true_stig()
            scope.sem.set_stig(float(ts[0] + ds[0]), float(ts[1] + ds[1]))
            scope.sem.set_wd_m(scope.sim.true_wd_m() + z * 1e-6)
            errors[name][t, 0] = _state(scope)
            hits: list[tuple[float, float]] = []

            def record(rec, name=name, t=t, scope=scope, hits=hits):
                e = _state(scope)
                errors[name][t, rec.iteration] = e
                if not hits and e[0] <= cfg.margin_wd_um and max(e[1], e[2]) <= cfg.margin_stig:
                    hits.append((rec.elapsed_s, rec.dose_e_per_nm2))

            settings = AutofocusSettings.from_config(scope.config.autofocus, max_iterations=cfg.iterations,
                                                     tol_wd_m=-1.0, tol_stig=-1.0,
                                                     perturbation_m=_perturbation_m(cfg))
            res = autofocus(scope.sem, method, settings, on_iteration=record)
            # a loop that stopped early keeps its last state for the remaining iterations
            last = _state(scope)
            for k in range(1, cfg.iterations + 1):
                if np.isnan(errors[name][t, k, 0]):
                    errors[name][t, k] = last
            per[name]["compute"] += [r.compute_s for r in res.trace]
            per[name]["outcomes"].append(res.outcome)
            per[name]["far"] += sum(r.far for r in res.trace)
            if res.images_taken:
                per[name]["frame_dose"].append(res.dose_e_per_nm2 / res.images_taken)
            if "perturbation_m" in res.extra and not hasattr(method, "measure"):     # a sweep takes no pair
                per[name]["pair"].append(res.extra["perturbation_m"] * 1e6)
            if hits:
                per[name]["time"].append(hits[0][0])
                per[name]["dose"].append(hits[0][1])
            else:
                per[name]["failed"] += 1
            e = errors[name][t, -1]
            log(f"trial {t} {name:11s} start ({z:+.1f} um, {ds[0]:+.2f}, {ds[1]:+.2f}) -> "
                f"|wd| {e[0]:.2f} um, |stig| {e[1]:.3f} {e[2]:.3f}, probe +{100 * e[3]:.2f} %  {res.outcome}")
    for run in runs:
        name, sc = run.label, run.scan
        e = errors[name]
        within = (e[..., 0] <= cfg.margin_wd_um) & (np.maximum(e[..., 1], e[..., 2]) <= cfg.margin_stig)
        med = lambda v: float(statistics.median(v)) if v else float("nan")  # noqa: E731
        results[name] = {
            "iterations": [{"iteration": k, "mae_wd_um": float(e[:, k, 0].mean()),
                            "mae_stig": float(e[:, k, 1:3].mean()), "within_margin": float(within[:, k].mean()),
                            "probe_growth_pct_median": 100.0 * float(np.median(e[:, k, 3])),
                            "probe_growth_pct_p95": 100.0 * float(np.percentile(e[:, k, 3], 95))}
                           for k in range(cfg.iterations + 1)],
            "compute_s_median": med(per[name]["compute"]),
            "time_to_focus_s_median": med(per[name]["time"]),
            "dose_to_focus_e_per_nm2_median": med(per[name]["dose"]),
            "failed": per[name]["failed"],
            "outcomes": {o: per[name]["outcomes"].count(o) for o in sorted(set(per[name]["outcomes"]))},
            # pairs taken again at the far perturbation (deepfocus.autofocus), over all trials
            "far_pairs": per[name]["far"],
            "focus_scan": {"dwell_ns": round(sc.dwell_s * 1e9, 6), "pixel_size_nm": round(sc.pixel_size_m * 1e9, 6),
                           "frame_px": [sc.width_px, sc.height_px],
                           "dose_per_frame_e_per_nm2": med(per[name]["frame_dose"]),
                           # wd -/+ this for the usual pair (the method's choice unless --perturbation-um set it)
                           "perturbation_um": med(per[name]["pair"])},
        }
    cfg_dict = dict(cfg.__dict__)
    out = {"config": cfg_dict, "methods": results}
    if "mapfost" in results and len(results) > 1:
        out["ratios_to_mapfost"] = ratios_to(results, "mapfost")
    for line in summary(out):
        log(line)
    return out


RATIO_KEYS = (("compute", "compute_s_median"), ("time_to_focus", "time_to_focus_s_median"),
              ("dose_to_focus", "dose_to_focus_e_per_nm2_median"))


def ratios_to(results: dict, ref: str) -> dict:
    """Each other method's medians over ``ref``'s (the comparison with MAPFoSt is stated in such ratios); NaN where
    either median is missing (a method that never reached the margin has no time to focus)."""
    def ratio(a: float, b: float) -> float:
        return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else float("nan")
    return {name: {k: ratio(r[key], results[ref][key]) for k, key in RATIO_KEYS}
            for name, r in results.items() if name != ref}


def summary(result: dict) -> list[str]:
    """A closed-loop run in a few lines: share within the margin per correction, medians, ratios."""
    lines = []
    for name, r in result["methods"].items():
        within = " / ".join(f"{it['within_margin']:.2f}" for it in r["iterations"][1:])
        last = r["iterations"][-1]
        lines.append(f"{name}: within margin after 1..{len(r['iterations']) - 1}: {within}; compute "
                     f"{r['compute_s_median'] * 1e3:.1f} ms, probe growth at the end "
                     f"{last['probe_growth_pct_median']:.2f} % (95th percentile {last['probe_growth_pct_p95']:.2f} %), "
                     f"time to focus {r['time_to_focus_s_median']:.2f} s, "
                     f"dose to focus {r['dose_to_focus_e_per_nm2_median']:.1f} e/nm2, failed {r['failed']}"
                     + (f", far pairs {r['far_pairs']}" if r.get("far_pairs") else ""))
    for name, q in result.get("ratios_to_mapfost", {}).items():
        lines.append(f"{name} / mapfost: compute {q['compute']:.2f}, time to focus {q['time_to_focus']:.2f}, "
                     f"dose to focus {q['dose_to_focus']:.2f}")
    return lines


def aberrated_scope(cfg: BenchConfig, rng: np.random.Generator, specimen, wd_range_um: tuple[float, float],
                    stig_range: float):
    """A fresh microscope scanning as ``cfg`` says, at a random |wd| in ``wd_range_um`` (either sign) from focus
    and stigmators within +-``stig_range`` of true (none drawn when 0)."""
    scope = open_microscope(cfg.profile, list(cfg.overrides) + [f"seed={int(rng.integers(1, 2**31))}"],
                            specimen=specimen)
    sem = scope.sem
    sem.set_scan(pixel_size_m=cfg.pixel_size_nm * 1e-9, width_px=cfg.frame_px[0], height_px=cfg.frame_px[1],
                 dwell_s=cfg.dwell_ns * 1e-9)
    z = rng.uniform(*wd_range_um) * rng.choice([-1, 1])
    ts = scope.sim.true_stig()
    ds = rng.uniform(-stig_range, stig_range, 2) if stig_range > 0 else np.zeros(2)
    sem.set_stig(float(ts[0] + ds[0]), float(ts[1] + ds[1]))
    sem.set_wd_m(scope.sim.true_wd_m() + z * 1e-6)
    return scope


def true_correction_um(minus, plus) -> float:
    """The wd correction to add, from the simulator's truth in the two frames' metadata."""
    return -(minus.metadata["truth"]["defocus_um"] + plus.metadata["truth"]["defocus_um"]) / 2


def fidelity(cfg: BenchConfig, n: int, method: str = "deepfocus", wd_range_um: tuple[float, float] = (1.0, 20.0),
             stig_range: float = 2.0) -> dict:
    """Single-iteration fidelity (thesis fig.): predicted vs true wd correction from one pair."""
    from .autofocus import acquire_pair, pinned_perturbation_m
    rng = np.random.default_rng(cfg.seed + 7)
    specs = specimens(cfg)
    est = None
    true, pred = [], []
    for i in range(n):
        scope = aberrated_scope(cfg, rng, specs[i % len(specs)], wd_range_um, stig_range)
        if est is None:
            est = make_method(method, scope.config, cfg.model, cfg.n_patches)
            d = _perturbation_m(cfg) or pinned_perturbation_m(scope.config.autofocus) or \
                chosen_perturbation_m(est, scope.sem.get_scan().pixel_size_m)
        minus, plus = acquire_pair(scope.sem, d)
        c = est.estimate(minus.image, plus.image, minus.scan.pixel_size_m, d)
        true.append(true_correction_um(minus, plus))
        pred.append(c.wd_um)
    t, p = np.array(true), np.array(pred)
    slope, offset = np.polyfit(t, p, 1)
    return {"method": method, "n": n, "slope": float(slope), "offset_um": float(offset),
            "mae_wd_um": float(np.abs(p - t).mean()), "pairs": [[float(a), float(b)] for a, b in zip(t, p)]}


def plot(result: dict, path: Path) -> None:
    """Convergence traces (MAE wd and share within margin per iteration) as a PNG, drawn with OpenCV."""
    import cv2
    w, h, pad = 900, 420, 50
    img = np.full((h, w, 3), 255, np.uint8)
    colours = [(200, 80, 20), (30, 30, 200), (30, 150, 30), (120, 0, 120)]
    panels = [("MAE wd (um, log)", "mae_wd_um", True), ("within margin", "within_margin", False)]
    for p, (title, key, logy) in enumerate(panels):
        x0 = pad + p * (w // 2)
        pw, ph = w // 2 - 2 * pad, h - 2 * pad
        cv2.rectangle(img, (x0, pad), (x0 + pw, pad + ph), (0, 0, 0), 1)
        cv2.putText(img, title, (x0, pad - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        for i, (name, r) in enumerate(result["methods"].items()):
            its = r["iterations"]
            n = max(len(its) - 1, 1)
            pts = []
            for row in its:
                v = row[key]
                y = (math.log10(max(v, 0.01)) + 2) / 4 if logy else v      # log: 0.01 .. 100
                pts.append((int(x0 + row["iteration"] / n * pw), int(pad + ph - np.clip(y, 0, 1) * ph)))
            c = colours[i % len(colours)]
            cv2.polylines(img, [np.array(pts, np.int32)], False, c, 2)
            cv2.putText(img, name, (x0 + 10, pad + 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, c, 1)
        cv2.putText(img, "iteration", (x0 + pw // 2 - 30, h - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)


def write(result: dict, out: Path) -> None:
    """The result as standard JSON (a median that does not exist, as for a method that never reached the margin,
    written as null) and its convergence PNG beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=1, default=float))
    plot(result, out.with_suffix(".png"))
