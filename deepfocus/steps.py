"""From an estimator's answers to the steps a focus loop takes.

``StepPlanner`` learns from the steps already taken how the answers relate to the truth on this microscope and
specimen (their scale and stigmator map), weighs the stigmator answers near focus against the earlier ones, clips
each step to the loop's limits and stops stigmator answers that grow. ``autofocus`` drives it; so can a loop that
runs inside other acquisition software.
"""
from __future__ import annotations

import cmath
import math
from dataclasses import dataclass, replace

import numpy as np

from .correction import Correction


# A wd step up with lens play goes this many play half-widths beyond its target first (at least MIN_OVERSHOOT_M),
# so that coming down the lens follows even where the play is somewhat larger than measured
PLAY_OVERSHOOT = 4.0
MIN_OVERSHOOT_M = 1e-6


def overshoot_m(play_m: float, wd_m: float, target_m: float, room_m: float) -> float:
    """How far beyond ``target_m`` a wd step from ``wd_m`` goes before coming down onto it, 0 for straight there.

    A lens with play (half-width h) follows a set value only once it has moved more than h, so where it rests
    depends on the way it came: h above the set value coming down, h below coming up, anywhere between after a step
    smaller than 2 h. A focus pair ends coming down (from wd + d to wd); a loop that keeps to that way knows the lens
    rests h above the set value. Only steps up with play go beyond, no further than ``room_m``.
    """
    if play_m <= 0 or target_m <= wd_m:
        return 0.0
    return max(0.0, min(max(PLAY_OVERSHOOT * play_m, MIN_OVERSHOOT_M), room_m))


@dataclass
class StepSettings:
    """How a loop turns answers into steps. ``AutofocusSettings`` has these fields too, with these defaults; a loop
    that runs elsewhere (the SBEMimage plug-in, which needs no more than numpy here) makes one of these."""
    max_step_wd_m: float                   # each step is clipped to these
    max_step_stig: float
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
    # near focus, average each stigmator answer with what the earlier ones said is left (see _AnswerFusion)
    fuse_stig: bool = True
    # the same for the wd answers (see _AnswerFusion); loops pass it on only where the lens' play is compensated
    fuse_wd: bool = True


class _AnswerScale:
    """How the estimator's answers relate to the truth on this microscope and specimen, learned from two consecutive
    answers around the step the loop applied between them (``StepSettings.learn_gain``).

    DeepFocus reads its wd and stigmator answers against the perturbation through the same blur, so a wrong
    aperture angle (or perturbation) scales them alike, about as (alpha_true / alpha_believed)^2: for such an
    estimator the scale divides the stigmator steps too, and a stigmator step tells it where the wd steps are too
    small to. Left undivided, a 1.4x angle error made the stigmators overshoot back and forth near focus (setup_a:
    0.15 of 20 far starts within the margin after 3 corrections). A stigmator calibration that is not this
    microscope's maps the stigmator answers through a 2 x 2 matrix; see ``_StigMap`` for what the loop learns of it
    and how. MAPFoSt's far wd answers are off through its probe model, not by a common scale: its stigmator steps
    are left as answered.
    """

    def __init__(self, settings: StepSettings, stig_shares: bool, stig_unit: float):
        self.s = settings
        self.stig_shares = stig_shares
        self.gain = 1.0
        self.stig = _StigMap(stig_unit)
        self._last: tuple[Correction, float | None, tuple[float, float] | None] | None = None

    def learn(self, corr: Correction, wd_only: bool) -> None:
        if not self.s.learn_gain or self._last is None:
            return
        before, step_wd_um, step_stig = self._last
        if "beyond_trained_wd_um" in before.extra or "beyond_trained_wd_um" in corr.extra:
            # short of the truth by a factor that depends on the distance, not by a common scale: a +-3 um pair's
            # answer 29 um from focus (0.79 of the way) and the next one, true to scale, gave a gain of 0.73 that
            # made the stigmator steps overshoot by a third near focus
            return
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
        # least squares for one complex number in each model: a large step's answers weigh more than a small
        # one's noise
        norm = float(np.sum(np.abs(s) ** 2))
        r_turn, r_mirror = complex(np.sum(np.conj(s) * d)) / norm, complex(np.sum(s * d)) / norm
        unit = s / np.abs(s)
        spread = max((abs((a.conjugate() * b).imag) for i, a in enumerate(unit) for b in unit[i + 1:]), default=0.0)
        if spread >= self.MIN_SIN:
            miss_turn = float(np.sum(np.abs(d - r_turn * s) ** 2))
            miss_mirror = float(np.sum(np.abs(d - r_mirror * np.conj(s)) ** 2))
            fits, misses = (len(s) * (k * self.tol) ** 2 for k in (self.FITS, self.MISSES))
            if miss_turn <= fits or miss_turn < self.RATIO * miss_mirror:
                self.kind = "turn"
            elif miss_turn >= misses and miss_mirror < self.RATIO * miss_turn:
                self.kind = "mirror"
        if self.kind == "mirror":
            return self._set(0j, r_mirror, "mirror")
        return self._set(r_turn, 0j, "turn")

    def invert(self, answer: complex) -> complex:
        """The truth that gives this answer under the unit-determinant map."""
        p, q = self.p, self.q
        return (p.conjugate() * answer - q * answer.conjugate()) / (abs(p) ** 2 - abs(q) ** 2)


class _AnswerFusion:
    """Near focus, a stigmator answer is mostly noise around a small truth, and the step it asks for adds that
    noise to the setting. The answers before it, less the steps applied since, estimate the same truth with
    noise of their own: the loop steps by the variance-weighted mean of both (a Kalman filter on the correction
    still needed). An answer's variance is its patches' spread squared over their number (the estimator's
    ``uncertainty_stig``; measured on setup_b at 100 ns near focus: spread 0.23 units over 8 patches, answers
    scattering 0.08 from pair to pair). A step adds ``MODEL_ERROR`` of itself to the variance (the truth may
    differ from a step by a scale or turn not yet learned), so after a large step the next answer counts almost
    alone. Far from focus (wd answer beyond ``NEAR_WD_UM``), when the learned map changes, and for estimators
    that report no spread over two or more patches (MAPFoSt) the filter starts again from the answer.

    A second one weighs the wd answers (``fuse_wd``, with ``uncertainty_wd_um``), but only where the lens' play is
    compensated: with play left a step moves the lens by up to the play more or less than itself, and the filter
    made the wd MAE after five corrections from the setup_b corners 0.210 um instead of 0.177. With the play
    compensated it lowered the wd MAE after the last correction in all six runs tried, from the setup_b corners
    0.103 to 0.066 um (deepfocus/README.md, "Lens play").
    """

    MODEL_ERROR = 0.2
    NEAR_WD_UM = 3.0

    def __init__(self) -> None:
        self.est: complex | None = None
        self.var = 0.0
        self.key: tuple | None = None

    def weigh(self, corr: Correction, value: complex, uncertainty: float, gain: float, key: tuple) -> complex:
        """The variance-weighted mean of ``value`` and what the earlier answers said; ``value``'s variance is that
        of the mean of ``corr.n_patches`` answers spread by ``uncertainty``, in steps (divided by ``gain``)."""
        var = (uncertainty / gain) ** 2 / max(corr.n_patches, 1)
        spread_known = corr.n_patches >= 2 and math.isfinite(var) and var > 0
        if not spread_known or abs(corr.wd_um) > self.NEAR_WD_UM or key != self.key:
            self.est = None
        self.key = key
        if self.est is None:
            self.est, self.var = value, var
        else:
            k = self.var / (self.var + var)
            self.est, self.var = self.est + k * (value - self.est), (1 - k) * self.var
        return self.est

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

    def __init__(self, stig_unit: float):
        self.stig_scale = stig_unit
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


class StigmatorsDiverging(RuntimeError):
    """Stigmator answers near focus grew from step to step (see ``_Divergence``)."""


@dataclass
class PlannedStep:
    """The step the loop takes for one answer (metres, stigmator units), clipped to the step limits."""
    wd_m: float
    stig: tuple[float, float]
    wd_clipped: bool
    stig_clipped: bool
    gain: float                    # the scale of the answers divided out
    stig_turn_deg: float
    stig_map: str

    @property
    def clipped(self) -> bool:
        return self.wd_clipped or self.stig_clipped


class StepPlanner:
    """Turns each answer of an estimator into the step a focus loop takes, learning from the steps taken before:
    the scale and stigmator map of the answers (``_AnswerScale``, ``_StigMap``), near focus the stigmator answers
    (and, where the lens' play is compensated, the wd answers) weighed against the earlier ones (``_AnswerFusion``),
    and a guard against stigmator answers that grow
    (``_Divergence``). ``autofocus`` drives it, and so does a loop that runs elsewhere (the SBEMimage plug-in):
    ``plan(answer)``, apply the step (or less of it, a part switched off), then ``taken(step)`` with what was
    applied."""

    def __init__(self, settings: StepSettings, stig_shares_wd_scale: bool, stig_unit: float):
        if not (math.isfinite(stig_unit) and stig_unit > 0):
            raise ValueError(f"stig_unit must be a positive number of stigmator units, got {stig_unit!r}")
        self.s = settings
        self.scale = _AnswerScale(settings, stig_shares_wd_scale, stig_unit)
        self.divergence = _Divergence(stig_unit)
        self.fusion = _AnswerFusion()
        self.wd_fusion = _AnswerFusion()
        self._corr: Correction | None = None

    def plan(self, corr: Correction) -> PlannedStep:
        """The step for an accepted answer; raises ``StigmatorsDiverging`` when the guard fires."""
        s, scale = self.s, self.scale
        # a wd-only answer (astigmatism left for later, see the estimator) carries no stigmator step
        wd_only = bool(corr.extra.get("astig_uncertain"))
        kind = scale.stig.kind
        scale.learn(corr, wd_only)
        if scale.stig.kind != kind:
            self.divergence.answers.clear()     # the answers grew while the map was wrong; it has just changed
        diverging = self.divergence.add(corr, s.correct_stig and not wd_only)
        if diverging:
            raise StigmatorsDiverging(diverging)
        gain = scale.gain
        want_wd = corr.wd_um / gain * 1e-6
        if s.fuse_wd:
            want_wd = self.wd_fusion.weigh(corr, complex(want_wd * 1e6), corr.uncertainty_wd_um, gain,
                                           (gain,)).real * 1e-6
        dwd = _clip(want_wd, s.max_step_wd_m)
        sx, sy = scale.stig_step(corr)
        if s.fuse_stig and s.correct_stig and not wd_only:
            est = self.fusion.weigh(corr, complex(sx, sy), corr.uncertainty_stig, gain,
                                    (scale.stig.kind, scale.stig.p, gain))
            sx, sy = est.real, est.imag
        else:
            self.fusion.reset()
        dsx = _clip(sx, s.max_step_stig) if s.correct_stig else 0.0
        dsy = _clip(sy, s.max_step_stig) if s.correct_stig else 0.0
        self._corr = corr
        return PlannedStep(dwd, (dsx, dsy), abs(dwd) < abs(want_wd) - 1e-12,
                           s.correct_stig and (dsx, dsy) != (sx, sy), gain, math.degrees(scale.stig.turn_rad),
                           scale.stig.kind)

    def taken(self, step: PlannedStep) -> None:
        """Record the step applied for the last planned answer (``plan``'s, or less of it)."""
        if self._corr is None:
            raise RuntimeError("taken() without a planned step")
        wd_only = bool(self._corr.extra.get("astig_uncertain"))
        # a clipped step says nothing trustworthy about the scale
        self.scale.remember(self._corr, None if step.wd_clipped else step.wd_m * 1e6,
                            step.stig if self.s.correct_stig and not step.stig_clipped and not wd_only else None)
        self.fusion.applied(step.stig)
        self.wd_fusion.applied((step.wd_m * 1e6, 0.0))
        self._corr = None


def within_stigmator_range(step: PlannedStep, stig: tuple[float, float], lo: float, hi: float) -> PlannedStep:
    """``step`` from the stigmators at ``stig`` with its target held within the stigmators' range [lo, hi].

    The true setting lies within the range (or no setting corrects the microscope), and holding a target within
    a box that holds the truth never moves it further from the truth; an overshoot past the range's edge (a noisy
    answer far from focus, very fine pixels) otherwise ends the run on the hardware's refusal and throws away the
    steps that worked. A step held here is ``stig_clipped``, so the loop learns no scale from it."""
    want = (stig[0] + step.stig[0], stig[1] + step.stig[1])
    if all(lo <= v <= hi for v in want):
        return step
    held = (min(max(want[0], lo), hi) - stig[0], min(max(want[1], lo), hi) - stig[1])
    return replace(step, stig=held, stig_clipped=True)


def _clip(v: float, lim: float) -> float:
    return float(min(max(v, -lim), lim))
