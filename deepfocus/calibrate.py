"""Measure a microscope's DeepFocus calibration with DeepFocus itself: wd scale (effective aperture) and stigmators.

A model answers in um of aberration by reading how wide the defocused spot is, which it
converts with the aperture angle in the microscope's YAML. A column whose aperture is
not filled uniformly, or whose aperture angle is not what the facility believes, makes
the spot narrower or wider than that angle says, and every answer comes out scaled
(on the simulator, an aperture filled as exp(-2.5 rho^2) scales them by 0.79 and the
loop needs a third iteration). The stigmators' rotation and scale are unknown on a new
installation (``setup_b``).

Both are linear, so both are measured from known steps around the current setting,
without knowing where focus is:

- wd: pairs at wd0 + D_i. The correction to add is c - D_i for an unknown c, and the
  model answers s (c - D_i): the fitted slope of answers against D_i is -s. The
  answers do not scale exactly as 1 / aperture angle (measured: believing 5.2 mrad on a
  4.0 mrad column scales them by 0.63, not 0.77), so the angle is searched: the series
  is repeated with the angle updated (a secant in log-log, kept inside the bracket once one
  angle answered too large and another too small) until s is 1
  within ``scale_tolerance`` or ``max_rounds`` series were taken.
- stigmators: pairs at stig0 + delta_j. The astigmatism answered (um, image frame, divided
  by s) is b - A delta_j, A being the um per unit matrix: a least-squares fit gives A,
  and ``calibration.stig_matrix`` = inverse of A (units per um). Its nearest rotation
  and scale (in the scan's own frame, like the YAML keys) are reported beside it.
- lens play: pairs at wd0 whose two frames are both approached from below, and pairs whose
  frames are both approached from above. A lens with play h rests h below a set value it
  came up to and h above one it came down to, so the first pairs are centred h below wd0,
  the second h above it, and their answers differ by 2 h (``autofocus.lens_play_um``, which
  the loop then compensates).

Start near focus (run the autofocus first, even with the old calibration): the answers
are most precise there. Settings are restored afterwards, also on errors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from hardware.sem import SEM

from .autofocus import acquire_pair
from .correction import chosen_perturbation_m


@dataclass
class CalibrationSettings:
    wd_offsets_um: tuple[float, ...] = (-12.0, -8.0, -4.0, 0.0, 4.0, 8.0, 12.0)
    stig_offsets: tuple[float, ...] = (-4.0, -2.0, 2.0, 4.0)     # units, along x then along y
    perturbation_m: float | None = None          # None: the one the estimator wants on these frames
    min_points: int = 5                                           # per fit, after refusals
    max_rounds: int = 5                                           # wd series, each with an updated angle
    scale_tolerance: float = 0.03                                 # |s - 1| that ends the search
    play_pairs: int = 6                                           # per way of approach (lens play)
    # how far beyond each frame's wd the lens goes before coming back to it: more than twice any play measured
    play_overshoot_um: float = 2.0

    def __post_init__(self):
        # refused here, before the first frame, not after minutes of measurement
        need = max(self.min_points, 3)
        if 2 * len(self.stig_offsets) < need:
            n = len(self.stig_offsets)
            raise ValueError(f"{n} stigmator offsets make {2 * n} steps (along x, then y) and the fit needs {need}: "
                             f"take at least {math.ceil(need / 2)} offsets (--stig-steps takes each size both ways: "
                             "give two sizes or more)")
        if len(self.wd_offsets_um) < self.min_points:
            raise ValueError(f"{len(self.wd_offsets_um)} wd offsets, the fit needs {self.min_points}")


@dataclass
class CalibrationResult:
    wd_scale: float                      # answers / true corrections with the configured angle (1: it is right)
    final_wd_scale: float                # the same with the angle found (within the tolerance unless rounds ran out)
    configured_aperture_angle_mrad: float
    aperture_angle_mrad: float           # effective: what calibration.aperture_angle_mrad should say
    wd_residual_um: float                # rms of the wd fit
    stig_matrix: list[list[float]]       # units per um of image-frame astigmatism (calibration.stig_matrix)
    stig_rotation_deg: float             # nearest rotation and scale, scan frame (calibration.stig_*)
    stig_scale_um_per_unit: float
    stig_non_similarity: float           # relative misfit of rotation + scale against the full matrix
    stig_residual_um: float              # rms of the astigmatism fit
    lens_play_um: float                  # half-width of the objective lens' play (autofocus.lens_play_um)
    lens_play_se_um: float               # its standard error
    frames: int
    rounds: list = field(default_factory=list)     # [aperture angle mrad, scale] per wd series
    points: dict = field(default_factory=dict)

    def yaml_snippet(self) -> str:
        m = self.stig_matrix
        return ("calibration:\n"
                f"  aperture_angle_mrad: {self.aperture_angle_mrad:.3f}\n"
                f"  stig_rotation_deg: {self.stig_rotation_deg:.1f}\n"
                f"  stig_scale_um_per_unit: {self.stig_scale_um_per_unit:.3f}\n"
                + (f"  stig_matrix: [[{m[0][0]:.4f}, {m[0][1]:.4f}], [{m[1][0]:.4f}, {m[1][1]:.4f}]]\n"
                   if self.stig_non_similarity > 0.05 else "")
                + "autofocus:\n"
                f"  lens_play_um: {max(self.lens_play_um, 0.0):.2f}\n")

    def to_dict(self) -> dict:
        return asdict(self)


def _answer(sem: SEM, estimator, d: float):
    minus, plus = acquire_pair(sem, d)
    c = estimator.estimate(minus.image, plus.image, minus.scan.pixel_size_m, d)
    return c if c.status == "ok" and not c.extra.get("astig_uncertain") else None


def _wd_series(sem: SEM, estimator, wd0: float, d: float, s: CalibrationSettings, log) -> list[tuple[float, float]]:
    pts = []
    for off in s.wd_offsets_um:
        sem.set_wd_m(wd0 + off * 1e-6)
        c = _answer(sem, estimator, d)
        log(f"wd {off:+.1f} um: " + (f"answer {c.wd_um:+.2f} um" if c else "refused"))
        if c is not None:
            pts.append((off, c.wd_um))
    sem.set_wd_m(wd0)
    if len(pts) < s.min_points:
        raise RuntimeError(f"only {len(pts)} of {len(s.wd_offsets_um)} wd steps were answered (need "
                           f"{s.min_points}): is there structure in the field of view and is focus near?")
    return pts


def _pair_approached(sem: SEM, wd0: float, d: float, over: float, from_below: bool):
    """A pair at wd0 -/+ d whose frames are both approached from below (or both from above), back at wd0 after."""
    frames = []
    try:
        for target in (wd0 - d, wd0 + d):
            sem.set_wd_m(target - over if from_below else target + over)
            sem.set_wd_m(target)
            frames.append(sem.grab_frame())
    finally:
        sem.set_wd_m(wd0)
    return frames


def _play_series(sem: SEM, estimator, wd0: float, d: float, scale: float, s: CalibrationSettings,
                 log) -> tuple[float, float, dict]:
    """Half-width of the lens' play and its standard error (um), from the two ways of approach alternated (so
    that a slow drift of focus falls on both alike)."""
    answers: dict[str, list[float]] = {"below": [], "above": []}
    over = s.play_overshoot_um * 1e-6
    for i in range(2 * s.play_pairs):
        way = ("below", "above")[i % 2]
        minus, plus = _pair_approached(sem, wd0, d, over, way == "below")
        c = estimator.estimate(minus.image, plus.image, minus.scan.pixel_size_m, d)
        ok = c.status == "ok"
        log(f"play, frames approached from {way}: " + (f"answer {c.wd_um:+.3f} um" if ok else "refused"))
        if ok:
            # the answers with the angle found, corrected for the scale left (within the tolerance)
            answers[way].append(c.wd_um / scale)
    n_b, n_a = len(answers["below"]), len(answers["above"])
    if min(n_b, n_a) < 2:
        raise RuntimeError(f"only {n_b} and {n_a} of {s.play_pairs} pairs per way of approach were answered "
                           "(need 2 each) to measure the lens' play")
    b, a = np.array(answers["below"]), np.array(answers["above"])
    # centred h below wd0 the answers are h larger, centred h above h smaller
    play = float(b.mean() - a.mean()) / 2.0
    se = float(np.sqrt(b.var(ddof=1) / n_b + a.var(ddof=1) / n_a)) / 2.0
    if play > 0.4 * s.play_overshoot_um:
        log(f"lens play {play:.2f} um is near half the overshoot {s.play_overshoot_um:g} um: measure it again with a "
            "larger play_overshoot_um")
    return play, se, answers


def _fit_scale(pts: list[tuple[float, float]]) -> tuple[float, float]:
    off, ans = np.array(pts).T
    slope, intercept = np.polyfit(off, ans, 1)
    scale = -float(slope)
    if not scale > 0.2:
        raise RuntimeError(f"the wd answers do not follow the wd steps (fitted scale {scale:.2f}); "
                           "the estimator does not see this microscope's blur")
    return scale, float(np.sqrt(np.mean((ans - (slope * off + intercept)) ** 2)))


def calibrate(sem: SEM, estimator, configured_aperture_angle_mrad: float, scan_rotation_deg: float = 0.0,
              settings: CalibrationSettings | None = None, log=lambda s: None) -> CalibrationResult:
    """Find the aperture angle that makes the wd answers true to scale, then fit the stigmator matrix.

    ``estimator`` answers in um and has an ``aperture_angle_mrad`` (DeepFocus, MAPFoSt), varied during the search and
    set back afterwards). The microscope's wd and stigmators are restored afterwards, also on errors.
    """
    s = settings or CalibrationSettings()
    # the pair the loop takes on this beam, chosen once: the angle varied below is the one searched for
    d = s.perturbation_m if s.perturbation_m is not None else \
        chosen_perturbation_m(estimator, sem.get_scan().pixel_size_m)
    wd0, stig0 = sem.get_wd_m(), sem.get_stig()
    reach = max(abs(o) for o in s.stig_offsets)
    lim = float(sem.limits.stig_max)
    if max(abs(stig0[0]), abs(stig0[1])) + reach > lim:
        # refuse before any frame: the steps would leave the stigmators' range
        raise ValueError(f"stigmators at ({stig0[0]:+.2f}, {stig0[1]:+.2f}) with steps of +-{reach:g} units would "
                         f"leave their range +-{lim:g}: centre them first (or take smaller steps: stig_offsets, "
                         "deepfocus calibrate --stig-steps)")
    alpha_was = estimator.aperture_angle_mrad
    st_pts: list[tuple[float, float, float, float]] = []
    rounds: list[list[float]] = []
    try:
        alpha = float(configured_aperture_angle_mrad)
        series: dict[float, tuple[list, float]] = {}
        while True:
            estimator.aperture_angle_mrad = alpha
            wd_pts = _wd_series(sem, estimator, wd0, d, s, log)
            scale, wd_res = _fit_scale(wd_pts)
            rounds.append([alpha, scale])
            series[alpha] = (wd_pts, wd_res)
            log(f"aperture angle {alpha:.3f} mrad: answers scaled by {scale:.3f}")
            if abs(scale - 1.0) <= s.scale_tolerance or len(rounds) >= s.max_rounds:
                break
            alpha = _next_angle(rounds)
        # the best series found (the last one unless the rounds ran out on noisy answers)
        alpha, scale = min(rounds, key=lambda r: abs(math.log(r[1])))
        wd_pts, wd_res = series[alpha]
        estimator.aperture_angle_mrad = alpha
        play, play_se, play_answers = _play_series(sem, estimator, wd0, d, scale, s, log)
        log(f"lens play {play:.3f} +- {play_se:.3f} um (half-width)")
        for axis in (0, 1):
            for off in s.stig_offsets:
                delta = (off, 0.0) if axis == 0 else (0.0, off)
                sem.set_stig(stig0[0] + delta[0], stig0[1] + delta[1])
                c = _answer(sem, estimator, d)
                log(f"stig {'xy'[axis]} {off:+.2f}: " +
                    (f"astig {c.astig_x_um:+.2f}, {c.astig_y_um:+.2f} um" if c else "refused"))
                if c is not None:
                    st_pts.append((delta[0], delta[1], c.astig_x_um, c.astig_y_um))
    finally:
        estimator.aperture_angle_mrad = alpha_was
        sem.set_wd_m(wd0)
        sem.set_stig(*stig0)
    if len(st_pts) < max(s.min_points, 3):
        raise RuntimeError(f"only {len(st_pts)} of {2 * len(s.stig_offsets)} stigmator steps were answered "
                           f"(need {max(s.min_points, 3)})")
    pts = np.array(st_pts)
    design = np.column_stack([np.ones(len(pts)), pts[:, 0], pts[:, 1]])
    # the astigmatism answered with the angle found, corrected for the scale left (within the tolerance)
    coef, *_ = np.linalg.lstsq(design, pts[:, 2:] / scale, rcond=None)
    # astig answered = b - A delta: the (2 x 2) block of the fit is -A transposed
    um_per_unit = -coef[1:].T
    st_res = float(np.sqrt(np.mean((design @ coef - pts[:, 2:] / scale) ** 2)))
    rot_img, sc = _nearest_similarity(um_per_unit)
    sim = sc * np.array([[math.cos(math.radians(rot_img)), -math.sin(math.radians(rot_img))],
                         [math.sin(math.radians(rot_img)), math.cos(math.radians(rot_img))]])
    non_sim = float(np.linalg.norm(um_per_unit - sim) / np.linalg.norm(um_per_unit))
    # the YAML's rotation is in the scan's own frame; a scan rotated by phi turns astigmatism by -2 phi
    rot_scan = (rot_img + 2.0 * scan_rotation_deg + 180.0) % 360.0 - 180.0
    frames = 2 * (len(rounds) * len(s.wd_offsets_um) + 2 * len(s.stig_offsets) + 2 * s.play_pairs)
    return CalibrationResult(
        wd_scale=rounds[0][1], final_wd_scale=scale, configured_aperture_angle_mrad=configured_aperture_angle_mrad,
        aperture_angle_mrad=alpha, wd_residual_um=wd_res,
        stig_matrix=np.linalg.inv(um_per_unit).tolist(), stig_rotation_deg=rot_scan,
        stig_scale_um_per_unit=sc, stig_non_similarity=non_sim, stig_residual_um=st_res, lens_play_um=play,
        lens_play_se_um=play_se, frames=frames, rounds=rounds,
        points={"wd": [list(p) for p in wd_pts], "stig": [list(p) for p in st_pts], "play": play_answers})


def _next_angle(rounds: list[list[float]]) -> float:
    """The next angle to try from [angle, scale] so far: answers shrink as the believed angle grows.

    Unbracketed: angle x scale (exact if the answers went as 1 / angle). Bracketed (a scale above 1 at
    a smaller angle, one below 1 at a larger): secant in log-log between the tightest pair, kept inside
    the bracket, and the bracket's geometric middle when noise has made it inconsistent.
    """
    alpha, scale = rounds[-1]
    above = [a for a, sc in rounds if sc > 1.0]
    below = [a for a, sc in rounds if sc < 1.0]
    if not above or not below:
        return float(np.clip(alpha * scale, alpha / 2, alpha * 2))
    lo, hi = max(above), min(below)
    if lo >= hi:
        return math.sqrt(lo * hi)
    s_lo = dict((a, sc) for a, sc in rounds)[lo]
    s_hi = dict((a, sc) for a, sc in rounds)[hi]
    la, lb = math.log(lo), math.log(hi)
    t = math.log(s_lo) / (math.log(s_lo) - math.log(s_hi))      # where log s crosses 0, as a share of the bracket
    return math.exp(la + float(np.clip(t, 0.1, 0.9)) * (lb - la))


def _nearest_similarity(m: np.ndarray) -> tuple[float, float]:
    """Rotation (deg) and scale of the similarity [[a, -b], [b, a]] nearest to ``m`` (least squares)."""
    a = (m[0, 0] + m[1, 1]) / 2.0
    b = (m[1, 0] - m[0, 1]) / 2.0
    return math.degrees(math.atan2(b, a)), math.hypot(a, b)
