"""The closed loop: acquire a pair, estimate, clip, apply, repeat.

``autofocus(sem, estimator)`` drives any ``Estimator`` (the CNN estimator, the daemon's
``RemoteEstimator``, MAPFoSt) through the SEM interface only. Methods that acquire their
own frames (a sharpness sweep) implement ``measure(sem, settings)`` and are driven the
same way. Outcomes:

- ``converged``: the predicted correction fell below tolerance (it is applied).
- ``iteration_limit``: corrections were confident but never small; the last setting stays.
- ``uncertain``: the estimator refused or was not sure enough; the start is restored.
- ``failed``: an error, a correction outside the limits, or stigmator answers near focus that grow from
  step to step (a stigmator calibration the loop cannot learn); the start is restored.
- ``aborted``: ``should_abort()`` said so; the start is restored.

An answer whose wd is certain but whose astigmatism is not (``extra["astig_uncertain"]``,
typical far from focus) moves wd only, and the loop goes on: it never converges on one.
"""
from __future__ import annotations

import cmath
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from hardware.config import AutofocusConfig
from hardware.sem import SEM, Frame, ScanSettings

from .correction import Correction, Estimator, answers_perturbation

OUTCOMES = ("converged", "iteration_limit", "uncertain", "failed", "aborted")


# the loop's defaults are the profile section's, stated once there
_PROFILE_DEFAULTS = AutofocusConfig()


@dataclass
class AutofocusSettings:
    """The loop's policy. The defaults are ``hardware.config.AutofocusConfig``'s; ``from_config`` takes a
    microscope's own from its YAML. A negative tolerance never stops early (the bench applies every correction)."""
    max_iterations: int = _PROFILE_DEFAULTS.max_iterations
    tol_wd_m: float = _PROFILE_DEFAULTS.tol_wd_um * 1e-6
    tol_stig: float = _PROFILE_DEFAULTS.tol_stig                        # stigmator units
    # each correction is clipped to these; they must sit above the largest start the loop recovers from
    # (see AutofocusConfig)
    max_step_wd_m: float = _PROFILE_DEFAULTS.max_step_wd_um * 1e-6
    max_step_stig: float = _PROFILE_DEFAULTS.max_step_stig
    max_total_wd_m: float = _PROFILE_DEFAULTS.max_total_wd_um * 1e-6     # never wander further from the start
    max_uncertainty_wd_m: float = _PROFILE_DEFAULTS.max_uncertainty_wd_um * 1e-6   # refuse a less certain one
    max_uncertainty_stig: float = _PROFILE_DEFAULTS.max_uncertainty_stig
    perturbation_m: float | None = None    # default: what the estimator wants
    scan: ScanSettings | None = None       # scan for the focus frames (restored afterwards)
    restore_on_failure: bool = True
    correct_stig: bool = True
    # The loop knows the wd step it applied, so the ratio of two consecutive predictions reveals
    # the estimator's scale error on this microscope and specimen: divide it out of every later step.
    learn_gain: bool = True
    gain_min_step_m: float = 2e-6          # only steps this large say anything about the scale
    # near focus the wd steps are too small to tell the scale; a stigmator step this large (units) tells it for an
    # estimator whose stigmator answers share the wd answers' scale (``Estimator.stig_shares_wd_scale``)
    gain_min_step_stig: float = 0.3
    # An aperture angle off by up to about 1.25x either way (answers scale about as its square) is taken out at
    # once, a larger error in steps. Wider limits (0.45, 2.2) let MAPFoSt's far answers, off through its probe
    # model rather than by a scale, set gains that cost it a correction from the corners (0.91 instead of 0.97
    # within the margin after three).
    gain_limits: tuple[float, float] = (0.6, 1.6)
    # near focus, average each stigmator answer with what the earlier ones said is left (see _StigFusion)
    fuse_stig: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_iterations, numbers.Integral) or self.max_iterations < 1:
            raise ValueError(f"max_iterations must be an integer of at least 1, got {self.max_iterations!r}")
        for key in ("max_step_wd_m", "max_step_stig", "max_total_wd_m", "max_uncertainty_wd_m",
                    "max_uncertainty_stig", "gain_min_step_m", "gain_min_step_stig"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{key} must be a positive number, got {v!r}")
        for key in ("tol_wd_m", "tol_stig"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"{key} must be a finite number, got {getattr(self, key)!r}")
        if self.perturbation_m is not None and not (math.isfinite(self.perturbation_m) and self.perturbation_m > 0):
            raise ValueError(f"perturbation_m must be a positive number of metres, got {self.perturbation_m!r}")
        lo, hi = self.gain_limits
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"gain_limits must be (low, high) with 0 < low <= 1 <= high, got {self.gain_limits}")

    @classmethod
    def from_config(cls, config: AutofocusConfig, **changes) -> "AutofocusSettings":
        """Settings from a microscope's ``autofocus`` section (``hardware.config.AutofocusConfig``, um in its YAML),
        with ``changes`` (fields of this class) on top."""
        base = dict(max_iterations=config.max_iterations, tol_wd_m=config.tol_wd_um * 1e-6,
                    tol_stig=config.tol_stig, max_step_wd_m=config.max_step_wd_um * 1e-6,
                    max_step_stig=config.max_step_stig, max_total_wd_m=config.max_total_wd_um * 1e-6,
                    max_uncertainty_wd_m=config.max_uncertainty_wd_um * 1e-6,
                    max_uncertainty_stig=config.max_uncertainty_stig)
        base.update(changes)
        return cls(**base)


@dataclass
class IterationRecord:
    iteration: int
    wd_m: float                    # setting when the pair was taken
    stig: tuple[float, float]
    correction: dict[str, Any]
    applied_wd_m: float
    applied_stig: tuple[float, float]
    clipped: bool
    elapsed_s: float               # since the start: acquisition (microscope clock) plus compute
    dose_e_per_nm2: float          # cumulative
    compute_s: float
    frames: int
    wd_gain: float = 1.0           # scale of the estimator's answers assumed for this step (learned from the
                                   # loop's own steps; see _AnswerScale)
    stig_turn_deg: float = 0.0     # turn of its stigmator answers assumed for this step (likewise)
    stig_map: str = "turn"         # what its stigmator answers were taken for (likewise): "turn" (and scale), or
                                   # "mirror" (an axis the other way round: a reflection about the axis at half
                                   # stig_turn_deg)


@dataclass
class AutofocusResult:
    outcome: str
    iterations: int
    trace: list[IterationRecord]
    images_taken: int
    dose_e_per_nm2: float
    elapsed_s: float
    compute_s: float
    start_wd_m: float
    start_stig: tuple[float, float]
    final_wd_m: float
    final_stig: tuple[float, float]
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome in ("converged", "iteration_limit")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ActiveMethod(Protocol):
    """A focus method that takes its own frames (e.g. a sharpness sweep)."""

    def measure(self, sem: SEM, settings: AutofocusSettings) -> tuple[Correction, list[Frame]]: ...


def acquire_pair(sem: SEM, perturbation_m: float) -> tuple[Frame, Frame]:
    """Frames at wd - d and wd + d; wd is set back to where it was."""
    wd = sem.get_wd_m()
    try:
        sem.set_wd_m(wd - perturbation_m)
        minus = sem.grab_frame()
        sem.set_wd_m(wd + perturbation_m)
        plus = sem.grab_frame()
    finally:
        sem.set_wd_m(wd)
    return minus, plus


class _AnswerScale:
    """How the estimator's answers relate to the truth on this microscope and specimen, learned from two consecutive
    answers around the step the loop applied between them (``AutofocusSettings.learn_gain``).

    DeepFocus reads its wd and stigmator answers against the perturbation through the same blur, so a wrong
    aperture angle (or perturbation) scales them alike, about as (alpha_true / alpha_believed)^2: for such an
    estimator the scale divides the stigmator steps too, and a stigmator step tells it where the wd steps are too
    small to. Left undivided, a 1.4x angle error made the stigmators overshoot back and forth near focus (setup_a:
    0.15 of 20 far starts within the margin after 3 corrections). A stigmator calibration that is not this
    microscope's maps the stigmator answers through a 2 x 2 matrix; see ``_StigMap`` for what the loop learns of it
    and how. MAPFoSt's far wd answers are off through its probe model, not by a common scale: its stigmator steps
    are left as answered.
    """

    def __init__(self, settings: AutofocusSettings, stig_shares: bool):
        self.s = settings
        self.stig_shares = stig_shares
        self.gain = 1.0
        self.stig = _StigMap(settings.tol_stig if settings.tol_stig > 0 else _PROFILE_DEFAULTS.tol_stig)
        self._last: tuple[Correction, float | None, tuple[float, float] | None] | None = None

    def learn(self, corr: Correction, wd_only: bool) -> None:
        if not self.s.learn_gain or self._last is None:
            return
        before, step_wd_um, step_stig = self._last
        lo, hi = self.s.gain_limits
        stig_scale = None
        if self.stig_shares and not wd_only and step_stig is not None \
                and math.hypot(*step_stig) >= self.s.gain_min_step_stig:
            step = complex(*step_stig)
            # answer_now = M (truth_before - step) = answer_before - M step
            change = complex(before.stig_x - corr.stig_x, before.stig_y - corr.stig_y)
            if lo / 2 <= abs(change) / abs(step) <= 2 * hi:   # beyond any scale error allowed: a bad answer
                stig_scale = self.stig.add(step, change)
        g = None
        if step_wd_um is not None and abs(step_wd_um) >= self.s.gain_min_step_m * 1e6:
            # pred = g * true: pred_now = pred_before - g * step  =>  g = (pred_before - pred_now) / step
            g = (before.wd_um - corr.wd_um) / step_wd_um
        elif stig_scale is not None:
            g = stig_scale
        if g is not None:
            self.gain = float(min(max(g, lo), hi))

    def stig_step(self, corr: Correction) -> tuple[float, float]:
        """The stigmator step for an answer: divided by the scale and mapped back, for estimators that share it."""
        if not self.stig_shares:
            return corr.stig_x, corr.stig_y
        c = self.stig.invert(complex(corr.stig_x, corr.stig_y)) / self.gain
        return c.real, c.imag

    def remember(self, corr: Correction, step_wd_um: float | None, step_stig: tuple[float, float] | None) -> None:
        self._last = (corr, step_wd_um, step_stig)


class _StigMap:
    """The map from true stigmator corrections to the estimator's answers, learned from the loop's stigmator steps
    and the change of the answers around each. In complex numbers (x + iy) any 2 x 2 map is
    answer = p * truth + q * conj(truth): a turn and scale has q = 0 (a calibration off in angle or scale), a mirror
    p = 0 (a stigmator axis the other way round). Kept as the scale (square root of the determinant's size) and the
    map of unit determinant.

    One step fits either exactly; it is taken for a turn. With two or three recent steps whose directions differ by
    30 degrees or more (mod 180), the least-squares misses of both decide: a turn that fits them to ``FITS``
    tolerances rms (answers near focus scatter by about one) or ``RATIO`` times better than a mirror is kept; a
    mirror is taken when the turn misses by ``MISSES`` tolerances or more and the mirror fits ``RATIO`` times
    better. Otherwise, or with steps all in about one direction, the kind stays. The map is then the kind's
    least-squares fit to those steps, in which a large step outweighs the noise of a small one near focus (the turn
    learned from the last step alone was up to 40 degrees off on setup_b with the profile right; from the setup_b
    corners the stigmator MAE after five corrections is 0.029 units with the fit, 0.034 with the last step alone).
    Measured (setup_a, stigmator y the other way round, 10 starts within 6 um and 1.5 units): within the margin
    after three corrections 0.80 instead of 0.10 with the turn alone (deepfocus/README.md, "A profile that is not
    quite this microscope's"). Axes of unequal scale are neither, and are taken for the nearer kind. The general map
    (p and q) fitted to two or three noisy steps does no better: on an estimator answering the truth through a 2:1
    map with 0.06 units of scatter, 20 starts 2 units off, within 0.25 units after three steps 0.70 (the nearer
    kind's fit 0.75), worst after four 0.74 units (0.20).
    """

    KEEP = 3
    FITS = 1.0              # tolerances, rms over the steps: about the scatter of answers near focus
    MISSES = 2.0            # tolerances, rms: clearly not the scatter
    RATIO = 0.25
    MIN_SIN = 0.5           # the steps' directions differ by 30 degrees or more (mod 180)

    def __init__(self, tol_stig: float):
        self.tol = tol_stig
        self.pairs: list[tuple[complex, complex]] = []
        self.p, self.q = 1 + 0j, 0j          # unit determinant: |p|^2 - |q|^2 = +-1
        self.kind = "turn"

    @property
    def turn_rad(self) -> float:
        return cmath.phase(self.q if self.kind == "mirror" else self.p)

    def _set(self, p: complex, q: complex, kind: str) -> float:
        scale = math.sqrt(abs(abs(p) ** 2 - abs(q) ** 2))
        self.p, self.q, self.kind = p / scale, q / scale, kind
        return scale

    def add(self, step: complex, change: complex) -> float:
        """Record a step and the answers' change; the scale of the map now held."""
        self.pairs = (self.pairs + [(step, change)])[-self.KEEP:]
        s = np.array([pc[0] for pc in self.pairs])
        d = np.array([pc[1] for pc in self.pairs])
        unit = s / np.abs(s)
        spread = max((abs((a.conjugate() * b).imag) for i, a in enumerate(unit) for b in unit[i + 1:]), default=0.0)
        if spread >= self.MIN_SIN:
            # least squares for one complex number in each model
            norm = float(np.sum(np.abs(s) ** 2))
            miss_turn = float(np.sum(np.abs(d - np.sum(np.conj(s) * d) / norm * s) ** 2))
            miss_mirror = float(np.sum(np.abs(d - np.sum(s * d) / norm * np.conj(s)) ** 2))
            fits, misses = (len(s) * (k * self.tol) ** 2 for k in (self.FITS, self.MISSES))
            if miss_turn <= fits or miss_turn < self.RATIO * miss_mirror:
                self.kind = "turn"
            elif miss_turn >= misses and miss_mirror < self.RATIO * miss_turn:
                self.kind = "mirror"
        # least squares over the recent steps: a large step's answers weigh more than a small one's noise
        norm = float(np.sum(np.abs(s) ** 2))
        if self.kind == "mirror":
            return self._set(0j, complex(np.sum(s * d)) / norm, "mirror")
        return self._set(complex(np.sum(np.conj(s) * d)) / norm, 0j, "turn")

    def invert(self, answer: complex) -> complex:
        """The truth that gives this answer under the unit-determinant map."""
        p, q = self.p, self.q
        return (p.conjugate() * answer - q * answer.conjugate()) / (abs(p) ** 2 - abs(q) ** 2)


class _StigFusion:
    """Near focus, a stigmator answer is mostly noise around a small truth, and the step it asks for adds that
    noise to the setting. The answers before it, less the steps applied since, estimate the same truth with
    noise of their own: the loop steps by the variance-weighted mean of both (a Kalman filter on the correction
    still needed). An answer's variance is its patches' spread squared over their number (the estimator's
    ``uncertainty_stig``; measured on setup_b at 100 ns near focus: spread 0.23 units over 8 patches, answers
    scattering 0.08 from pair to pair). A step adds ``MODEL_ERROR`` of itself to the variance (the truth may
    differ from a step by a scale or turn not yet learned), so after a large step the next answer counts almost
    alone. Far from focus (wd answer beyond ``NEAR_WD_UM``), when the learned map changes, and for estimators
    that report no spread over two or more patches (MAPFoSt) the filter starts again from the answer.
    """

    MODEL_ERROR = 0.2
    NEAR_WD_UM = 3.0

    def __init__(self) -> None:
        self.est: complex | None = None
        self.var = 0.0
        self.key: tuple | None = None

    def step(self, corr: Correction, mapped: tuple[float, float], gain: float, key: tuple) -> tuple[float, float]:
        m = complex(*mapped)
        var = (corr.uncertainty_stig / gain) ** 2 / max(corr.n_patches, 1)
        spread_known = corr.n_patches >= 2 and math.isfinite(var) and var > 0
        if not spread_known or abs(corr.wd_um) > self.NEAR_WD_UM or key != self.key:
            self.est = None
        self.key = key
        if self.est is None:
            self.est, self.var = m, var
        else:
            k = self.var / (self.var + var)
            self.est, self.var = self.est + k * (m - self.est), (1 - k) * self.var
        return self.est.real, self.est.imag

    def applied(self, step: tuple[float, float]) -> None:
        if self.est is not None:
            self.est -= complex(*step)
            self.var += (self.MODEL_ERROR * abs(complex(*step))) ** 2

    def reset(self) -> None:
        self.est = None


class _Divergence:
    """Whether the loop is driving the stigmators away from their best setting, judged by the estimator's answers.

    A stigmator calibration the loop cannot learn makes stigmator steps add error, and the loop would leave the
    stigmators there (setup_a, calibration 100 degrees off, before the turn was learned: 2.9 units off after five
    corrections, from 0.6; MAPFoSt, which learns no turn, there now ends "failed" with the start restored). Only
    answers given near focus in wd count (far from focus an estimator may answer less astigmatism than there is,
    and more once closer), and only growth over two steps in a row beyond a few tolerances (near focus the answers
    scatter around one). Slower growth passes: before the loop learned mirrors, a stigmator axis the other way
    round stopped 3 of 10 small starts here and left 7 at the iteration limit, the stigmators 1.5 units off. The
    answers grow while the loop holds the wrong kind of map, so the count starts again when it changes kind.
    """

    GROWTH = 1.3            # per step, two steps in a row
    FLOOR = 3.0             # tolerances
    NEAR_WD_UM = 3.0

    def __init__(self, s: AutofocusSettings):
        # the bench's negative tolerances never stop the loop: then the profile default sets the scale
        self.stig_scale = s.tol_stig if s.tol_stig > 0 else _PROFILE_DEFAULTS.tol_stig
        self.answers: list[float] = []

    def add(self, corr: Correction, stig_answered: bool) -> str | None:
        """Record an answer; a reason when the last two steps both made the stigmator answers grow."""
        if not stig_answered or abs(corr.wd_um) > self.NEAR_WD_UM:
            self.answers.clear()
            return None
        a = self.answers
        a.append(math.hypot(corr.stig_x, corr.stig_y) / self.stig_scale)
        if len(a) >= 3 and a[-1] > self.FLOOR and a[-1] > self.GROWTH * a[-2] and a[-2] > self.GROWTH * a[-3]:
            return f"diverging: stigmator answers grew {a[-3]:.1f} -> {a[-2]:.1f} -> {a[-1]:.1f} tolerances"
        return None


def _clip(v: float, lim: float) -> float:
    return float(min(max(v, -lim), lim))


def autofocus(sem: SEM, estimator: Estimator, settings: AutofocusSettings | None = None,
              should_abort: Callable[[], bool] | None = None,
              on_iteration: Callable[[IterationRecord], None] | None = None) -> AutofocusResult:
    """Focus and stigmate ``sem`` with ``estimator``; see the module text for the outcomes."""
    s = settings or AutofocusSettings()
    d = s.perturbation_m if s.perturbation_m is not None else float(getattr(estimator, "perturbation_m", 5e-6))
    clock = sem.clock
    t_start = clock.now_s()
    wall0 = time.perf_counter()
    start_wd, start_stig = sem.get_wd_m(), sem.get_stig()
    prev_scan = sem.get_scan()
    trace: list[IterationRecord] = []
    frames_n, dose, compute = 0, 0.0, 0.0
    outcome, message = "iteration_limit", ""
    scale = _AnswerScale(s, bool(getattr(estimator, "stig_shares_wd_scale", False)))
    divergence = _Divergence(s)
    fusion = _StigFusion()

    def elapsed() -> float:
        # a virtual clock does not see computation: add it so times compare with a real microscope
        return clock.now_s() - t_start + (compute if clock.is_virtual else 0.0)

    if hasattr(estimator, "reset"):
        estimator.reset()
    if not answers_perturbation(estimator, d):
        # refuse before any frame is taken: the pair would cost dose and answer nothing
        lo_d, hi_d = estimator.perturbation_range_m
        return AutofocusResult("failed", 0, [], 0, 0.0, 0.0, 0.0, start_wd, start_stig, start_wd, start_stig,
                               f"perturbation {d * 1e6:g} um is outside the {lo_d * 1e6:g}-{hi_d * 1e6:g} um "
                               "the estimator answers", {"perturbation_m": d})
    try:
        if s.scan is not None:
            sem.set_scan(s.scan)
        for it in range(1, s.max_iterations + 1):
            if should_abort is not None and should_abort():
                outcome, message = "aborted", "aborted on request"
                break
            wd, stig = sem.get_wd_m(), sem.get_stig()
            if hasattr(estimator, "measure"):
                t0 = time.perf_counter()
                corr, frames = estimator.measure(sem, s)
                step_compute = corr.timings_s.get("total", time.perf_counter() - t0)
                frames_n += len(frames)
                dose += sum(f.dose_e_per_nm2 for f in frames)
            else:
                minus, plus = acquire_pair(sem, d)
                frames = [minus, plus]
                # the dose is spent even if the estimate fails below
                frames_n += 2
                dose += minus.dose_e_per_nm2 + plus.dose_e_per_nm2
                t0 = time.perf_counter()
                corr = estimator.estimate(minus.image, plus.image, minus.scan.pixel_size_m, d)
                step_compute = time.perf_counter() - t0
            compute += step_compute
            values = (corr.wd_um, corr.stig_x, corr.stig_y)
            bad = not all(math.isfinite(v) for v in values)
            # a wd-only answer (astigmatism left for later, see the estimator) carries no stigmator step
            wd_only = bool(corr.extra.get("astig_uncertain"))
            too_unsure = (corr.uncertainty_wd_um * 1e-6 > s.max_uncertainty_wd_m
                          or (s.correct_stig and not wd_only and corr.uncertainty_stig > s.max_uncertainty_stig))
            if corr.status != "ok" or bad or too_unsure:
                reason = corr.extra.get("reason") or ("non-finite correction" if bad else
                                                      f"uncertainty wd {corr.uncertainty_wd_um:.2f} um, "
                                                      f"stig {corr.uncertainty_stig:.2f}")
                trace.append(IterationRecord(it, wd, stig, corr.to_dict(), wd, stig, False, elapsed(), dose,
                                             step_compute, len(frames)))
                outcome, message = "uncertain", f"iteration {it}: correction refused ({reason})"
                break
            kind = scale.stig.kind
            scale.learn(corr, wd_only)
            if scale.stig.kind != kind:
                divergence.answers.clear()      # the answers grew while the map was wrong; it has just changed
            diverging = divergence.add(corr, s.correct_stig and not wd_only)
            if diverging:
                trace.append(IterationRecord(it, wd, stig, corr.to_dict(), wd, stig, False, elapsed(), dose,
                                             step_compute, len(frames), scale.gain))
                outcome, message = "failed", (f"iteration {it}: {diverging}; start restored (is the profile's "
                                              "calibration this microscope's? deepfocus calibrate measures it)")
                break
            gain = scale.gain
            dwd = _clip(corr.wd_um / gain * 1e-6, s.max_step_wd_m)
            unclipped = abs(dwd) >= abs(corr.wd_um / gain * 1e-6) - 1e-12
            sx, sy = scale.stig_step(corr)
            if s.fuse_stig and s.correct_stig and not wd_only:
                sx, sy = fusion.step(corr, (sx, sy), gain, (scale.stig.kind, scale.stig.p, gain))
            else:
                fusion.reset()
            dsx = _clip(sx, s.max_step_stig) if s.correct_stig else 0.0
            dsy = _clip(sy, s.max_step_stig) if s.correct_stig else 0.0
            stig_unclipped = (dsx, dsy) == (sx, sy)
            clipped = not unclipped or not stig_unclipped
            # a clipped step says nothing trustworthy about the scale
            scale.remember(corr, dwd * 1e6 if unclipped else None,
                           (dsx, dsy) if s.correct_stig and stig_unclipped and not wd_only else None)
            fusion.applied((dsx, dsy))
            new_wd, new_stig = wd + dwd, (stig[0] + dsx, stig[1] + dsy)
            if abs(new_wd - start_wd) > s.max_total_wd_m:
                raise RuntimeError(f"correction would move wd {abs(new_wd - start_wd) * 1e6:.1f} um from the start "
                                   f"(limit {s.max_total_wd_m * 1e6:.0f} um)")
            sem.set_wd_m(new_wd)
            if s.correct_stig:
                sem.set_stig(*new_stig)
            rec = IterationRecord(it, wd, stig, corr.to_dict(), new_wd, new_stig, clipped, elapsed(), dose,
                                  step_compute, len(frames), gain, math.degrees(scale.stig.turn_rad),
                                  scale.stig.kind)
            trace.append(rec)
            if on_iteration is not None:
                on_iteration(rec)
            small = not (wd_only and s.correct_stig) and abs(corr.wd_um) * 1e-6 <= s.tol_wd_m and (
                not s.correct_stig or max(abs(corr.stig_x), abs(corr.stig_y)) <= s.tol_stig)
            if small:
                outcome, message = "converged", f"converged after {it} iteration(s)"
                break
    except Exception as exc:  # hardware or estimator error: report it and restore
        outcome, message = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        try:
            if s.scan is not None:
                sem.set_scan(prev_scan)
        except Exception as exc:  # noqa: BLE001 - the scan restore must not hide the main outcome
            message += f"; could not restore scan: {exc}"
    if outcome in ("uncertain", "failed", "aborted") and s.restore_on_failure:
        try:
            sem.set_wd_m(start_wd)
            if s.correct_stig:
                sem.set_stig(*start_stig)
        except Exception as exc:  # noqa: BLE001
            message += f"; could not restore start: {exc}"
            outcome = "failed"
    return AutofocusResult(outcome, len(trace), trace, frames_n, dose, elapsed(), compute, start_wd, start_stig,
                           sem.get_wd_m(), sem.get_stig(), message,
                           {"wall_s": time.perf_counter() - wall0, "perturbation_m": d})


def summarise(result: AutofocusResult) -> list[dict[str, Any]]:
    """One compact row per iteration (for printing)."""
    rows = []
    for r in result.trace:
        c = r.correction
        rows.append({"iteration": r.iteration, "wd_um": round(r.wd_m * 1e6, 3),
                     "stig": [round(v, 4) for v in r.stig], "status": c["status"],
                     "corr_wd_um": round(c["wd_um"], 3), "corr_stig": [round(c["stig_x"], 4), round(c["stig_y"], 4)],
                     "unc_wd_um": None if not np.isfinite(c["uncertainty_wd_um"]) else round(c["uncertainty_wd_um"], 3),
                     # the scale and turn the loop learned: far from 1 and 0, or a mirror, the profile's
                     # calibration is not this microscope's (deepfocus calibrate)
                     "gain": round(r.wd_gain, 3), "stig_turn_deg": round(r.stig_turn_deg, 1),
                     "stig_map": r.stig_map,
                     "elapsed_s": round(r.elapsed_s, 3), "dose_e_per_nm2": round(r.dose_e_per_nm2, 2)})
    return rows
