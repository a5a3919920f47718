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

The pair is taken at the perturbation the estimator wants on the focus frames' pixel size
(``correction.chosen_perturbation_m``: DeepFocus takes a pair further apart than its own on a narrow beam or
coarse pixels) unless ``AutofocusSettings.perturbation_m`` sets one; near an end of the lens's range such a wider
pair narrows to fit, down to the estimator's own (``fitting_pair_m``).

An answer whose wd is certain but whose astigmatism is not (``extra["astig_uncertain"]``,
typical far from focus, or an uncertainty of the stigmators above ``max_uncertainty_stig``) moves wd only, and the
loop goes on: it never converges on one. A stigmator step that would pass the stigmators' range is held at its
edge (``steps.within_stigmator_range``) rather than refused by the hardware.

Far beyond the estimator's range (DeepFocus: about 35 um at +-5 um) its patches disagree on wd and the pair is
refused. Such a pair is taken again at ``far_perturbation_factor`` times the perturbation, or as far apart as the
estimator answers where that is at least 1.5 times (an aperture-normalised model reads a pair at 3 d as its own pair
on a beam three times narrower, so its range triples): that answer may spread more (``FAR_SPREAD``), moves wd alone
(clipped as any step), and the loop goes on at the usual perturbation with nothing learned kept. After a far step
taken in full, a pair refused again ends the loop as before. Setup_a, 20 starts within +-120 um: 20 instead of 12
within the margin (deepfocus/README.md, "Far from focus").

An objective lens with play rests up to its half-width away from the set wd, on the side it came from. The pair
cancels it (its frames come from opposite sides) and ends coming down onto wd, so with the half-width known
(``lens_play_m``, measured by ``deepfocus calibrate``) the loop takes each wd answer less it and ends every step
coming down (``set_wd_coming_down``): the lens rests on the answer instead of up to the play away from it.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Protocol

import numpy as np

from hardware.config import MAX_LENS_PLAY_UM, AutofocusConfig
from hardware.sem import SEM, Frame, ScanSettings

from .correction import (Correction, Estimator, answers_perturbation, chosen_perturbation_m,
                         far_pair_answered_m, far_perturbation_m)
from .steps import StepPlanner, StepSettings, StigmatorsDiverging, overshoot_m, within_stigmator_range

OUTCOMES = ("converged", "iteration_limit", "uncertain", "failed", "aborted")
# A far pair's wd answer may spread this share of itself on top of max_uncertainty_wd: the step need only land
# within the estimator's own range, where the pairs at the usual perturbation take over.
FAR_SPREAD = 0.2


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
    perturbation_m: float | None = None    # default: what the estimator wants on these frames
    scan: ScanSettings | None = None       # scan for the focus frames (restored afterwards)
    restore_on_failure: bool = True
    correct_stig: bool = True
    # how answers become steps (learning their scale and stigmator map, weighing them near focus): see
    # steps.StepSettings, whose defaults these are
    learn_gain: bool = StepSettings.learn_gain
    gain_min_step_m: float = StepSettings.gain_min_step_m
    gain_min_step_stig: float = StepSettings.gain_min_step_stig
    gain_limits: tuple[float, float] = StepSettings.gain_limits
    fuse_stig: bool = StepSettings.fuse_stig
    fuse_wd: bool = StepSettings.fuse_wd
    # far beyond the estimator's range (see the module text); 0: never
    far_perturbation_factor: float = _PROFILE_DEFAULTS.far_perturbation_factor
    # half-width of the objective lens' play (see ``set_wd_coming_down``); 0: not compensated
    lens_play_m: float = _PROFILE_DEFAULTS.lens_play_um * 1e-6

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
        f = self.far_perturbation_factor
        if not (isinstance(f, numbers.Real) and (f == 0 or 1.5 <= f <= 10)):
            raise ValueError(f"far_perturbation_factor must be 0 (off) or between 1.5 and 10, got {f!r}")
        if not (math.isfinite(self.lens_play_m) and 0 <= self.lens_play_m <= MAX_LENS_PLAY_UM * 1e-6):
            raise ValueError(f"lens_play_m must be between 0 and {MAX_LENS_PLAY_UM:g} um, got {self.lens_play_m!r}")
        lo, hi = self.gain_limits
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"gain_limits must be (low, high) with 0 < low <= 1 <= high, got {self.gain_limits}")

    @classmethod
    def from_config(cls, config: AutofocusConfig, **changes) -> "AutofocusSettings":
        """Settings from a microscope's ``autofocus`` section (``hardware.config.AutofocusConfig``, um in its YAML),
        with ``changes`` (fields of this class) on top; ``perturbation_m=None`` there keeps the section's."""
        if changes.get("perturbation_m", 0.0) is None:
            del changes["perturbation_m"]
        base = dict(perturbation_m=pinned_perturbation_m(config),
                    max_iterations=config.max_iterations, tol_wd_m=config.tol_wd_um * 1e-6,
                    tol_stig=config.tol_stig, max_step_wd_m=config.max_step_wd_um * 1e-6,
                    max_step_stig=config.max_step_stig, max_total_wd_m=config.max_total_wd_um * 1e-6,
                    max_uncertainty_wd_m=config.max_uncertainty_wd_um * 1e-6,
                    max_uncertainty_stig=config.max_uncertainty_stig,
                    far_perturbation_factor=config.far_perturbation_factor,
                    lens_play_m=config.lens_play_um * 1e-6)
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
                                   # loop's own steps; see steps._AnswerScale)
    stig_turn_deg: float = 0.0     # turn of its stigmator answers assumed for this step (likewise)
    stig_map: str = "turn"         # what its stigmator answers were taken for (likewise): "turn" (and scale), or
                                   # "mirror" (an axis the other way round: a reflection about the axis at half
                                   # stig_turn_deg)
    far: bool = False              # the pair was taken at the far perturbation, its wd answer alone stepped on


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


def set_wd_coming_down(sem: SEM, target_m: float, play_m: float, ceiling_m: float) -> None:
    """Set wd to ``target_m`` so that, where the lens has play, it comes down onto it (``steps.overshoot_m``): the
    lens then rests ``play_m`` above the set value, as after a pair. The way beyond stays below ``ceiling_m``."""
    over = overshoot_m(play_m, sem.get_wd_m(), target_m, ceiling_m - target_m)
    if over > 0:
        sem.set_wd_m(target_m + over)
    sem.set_wd_m(target_m)


def pinned_perturbation_m(config: AutofocusConfig) -> float | None:
    """The pair's perturbation (m) a profile pins (``autofocus.perturbation_um``); None where it leaves it to the
    estimator (0)."""
    return config.perturbation_um * 1e-6 if config.perturbation_um > 0 else None


def fitting_pair_m(sem: SEM, wd_m: float, perturbation_m: float, floor_m: float) -> float:
    """``perturbation_m``, or the largest pair the lens's range leaves room for around ``wd_m`` down to ``floor_m``:
    a pair the loop chose wider than the estimator's own must not end a run that its own pair would not."""
    lim = sem.limits
    room = min(wd_m - lim.wd_min_m, lim.wd_max_m - wd_m)
    return perturbation_m if room >= perturbation_m else max(room, floor_m)


def _answers_frames(estimator, scan, perturbation_m: float) -> bool:
    """Whether ``estimator.check_frames`` takes frames of ``scan`` for a pair at -/+ ``perturbation_m``."""
    try:
        estimator.check_frames((scan.height_px, scan.width_px), scan.pixel_size_m, perturbation_m)
    except ValueError:
        return False
    return True


def autofocus(sem: SEM, estimator: Estimator, settings: AutofocusSettings | None = None,
              should_abort: Callable[[], bool] | None = None,
              on_iteration: Callable[[IterationRecord], None] | None = None) -> AutofocusResult:
    """Focus and stigmate ``sem`` with ``estimator``; see the module text for the outcomes."""
    s = settings or AutofocusSettings()
    pixel_size_m = (s.scan or sem.get_scan()).pixel_size_m
    clock = sem.clock
    t_start = clock.now_s()
    wall0 = time.perf_counter()
    start_wd, start_stig = sem.get_wd_m(), sem.get_stig()

    def failed_before_any_frame(message: str, extra: dict) -> AutofocusResult:
        return AutofocusResult("failed", 0, [], 0, 0.0, 0.0, 0.0, start_wd, start_stig, start_wd, start_stig,
                               message, extra)

    try:
        # a remote estimator is asked here first (which pair, which range, whether it answers this scan): an
        # unreachable daemon ends the run as an estimator error later in it does, "failed", nothing moved
        d = s.perturbation_m if s.perturbation_m is not None else chosen_perturbation_m(estimator, pixel_size_m)
        if hasattr(estimator, "reset"):
            estimator.reset()
        # refuse before any frame is taken what the estimator cannot answer: the pair would cost dose for nothing
        refusal = ""
        if not answers_perturbation(estimator, d):
            lo_d, hi_d = estimator.perturbation_range_m
            refusal = (f"perturbation {d * 1e6:g} um is outside the {lo_d * 1e6:g}-{hi_d * 1e6:g} um the estimator "
                       "answers")
        elif hasattr(estimator, "check_frames"):
            scan = s.scan or sem.get_scan()
            try:
                estimator.check_frames((scan.height_px, scan.width_px), scan.pixel_size_m, d)
            except ValueError as exc:
                refusal = str(exc)
        far_d = far_perturbation_m(d, s.far_perturbation_factor, getattr(estimator, "perturbation_range_m", None))
        can_go_far = far_d is not None and not hasattr(estimator, "measure") and answers_perturbation(estimator, far_d)
        if can_go_far and hasattr(estimator, "check_frames"):
            scan = s.scan or sem.get_scan()
            far_d = far_pair_answered_m(far_d, d, lambda fd: _answers_frames(estimator, scan, fd))
            can_go_far = far_d is not None
    except Exception as exc:  # noqa: BLE001 - an estimator error before any frame: reported, nothing moved
        return failed_before_any_frame(f"{type(exc).__name__}: {exc}", {})
    if refusal:
        return failed_before_any_frame(refusal, {"perturbation_m": d})
    prev_scan = sem.get_scan()
    trace: list[IterationRecord] = []
    frames_n, dose, compute = 0, 0.0, 0.0
    outcome, message = "iteration_limit", ""

    # lens play is compensated where the loop takes the pairs itself (their frames come down onto wd at the end)
    play = 0.0 if hasattr(estimator, "measure") else s.lens_play_m
    # near focus the wd answers are weighed against the earlier ones only where the lens goes where it is sent
    # (steps._AnswerFusion): with play left, a step moves the lens by up to the play more or less than itself
    step_settings = replace(s, fuse_wd=s.fuse_wd and play > 0)

    def new_planner() -> StepPlanner:
        # the bench's negative tolerances never stop the loop: then the profile default is the guards' unit
        return StepPlanner(step_settings, bool(getattr(estimator, "stig_shares_wd_scale", False)),
                           s.tol_stig if s.tol_stig > 0 else _PROFILE_DEFAULTS.tol_stig)

    planner = new_planner()

    def move_wd(new_wd: float) -> None:
        check_total(new_wd)
        lim = sem.limits
        # the way beyond a step up stays within the lens's range, one accepted jump and the loop's total travel
        ceiling = min(lim.wd_max_m, sem.get_wd_m() + lim.wd_step_max_m, start_wd + s.max_total_wd_m)
        set_wd_coming_down(sem, new_wd, play, ceiling)

    def check_total(new_wd: float) -> None:
        if abs(new_wd - start_wd) > s.max_total_wd_m:
            raise RuntimeError(f"correction would move wd {abs(new_wd - start_wd) * 1e6:.1f} um from the start "
                               f"(limit {s.max_total_wd_m * 1e6:.0f} um)")

    def elapsed() -> float:
        # a virtual clock does not see computation: add it so times compare with a real microscope
        return clock.now_s() - t_start + (compute if clock.is_virtual else 0.0)

    pair_d = d
    own_d = min(d, float(getattr(estimator, "perturbation_m", d)))
    far_landed = False      # a far step was taken in full: it put the loop within the estimator's range
    try:
        if s.scan is not None:
            sem.set_scan(s.scan)
        for it in range(1, s.max_iterations + 1):
            far = pair_d != d
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
                taken_d = pair_d if far or s.perturbation_m is not None else fitting_pair_m(sem, wd, pair_d, own_d)
                minus, plus = acquire_pair(sem, taken_d)
                frames = [minus, plus]
                # the dose is spent even if the estimate fails below
                frames_n += 2
                dose += minus.dose_e_per_nm2 + plus.dose_e_per_nm2
                t0 = time.perf_counter()
                corr = estimator.estimate(minus.image, plus.image, minus.scan.pixel_size_m, taken_d)
                step_compute = time.perf_counter() - t0
            compute += step_compute
            # an uncertainty of NaN would pass every "above the limit" test below
            values = (corr.wd_um, corr.stig_x, corr.stig_y, corr.uncertainty_wd_um, corr.uncertainty_stig)
            bad = not all(math.isfinite(v) for v in values)
            # a wd-only answer (astigmatism left for later, see the estimator) carries no stigmator step
            wd_only = bool(corr.extra.get("astig_uncertain"))
            wd_unsure = bool(corr.extra.get("wd_uncertain")) or (
                corr.status == "ok" and corr.uncertainty_wd_um * 1e-6 > s.max_uncertainty_wd_m)
            if far:
                too_unsure = corr.uncertainty_wd_um > s.max_uncertainty_wd_m * 1e6 + FAR_SPREAD * abs(corr.wd_um)
            else:
                too_unsure = wd_unsure
                if (s.correct_stig and not wd_only and not wd_unsure and not bad and corr.status == "ok"
                        and corr.uncertainty_stig > s.max_uncertainty_stig):
                    # wd certain, the astigmatism not: the wd step alone, as the estimator answers where its
                    # patches disagree on astigmatism (a 1.3 mrad beam 14 um from focus: wd answered 14.6 um for
                    # 13.9, the stigmators 2.07 units unsure; the whole answer was refused and the start restored)
                    corr = corr.wd_only(f"stigmator uncertainty {corr.uncertainty_stig:.2f} above "
                                        f"max_uncertainty_stig {s.max_uncertainty_stig:g}: wd only")
                    wd_only = True
            if corr.status != "ok" or bad or too_unsure:
                # an answer the estimator gave as "ok" may carry a note (wd only) that is not why it is refused here
                if corr.status != "ok":
                    reason = corr.extra.get("reason") or f"the estimator answered {corr.status!r}"
                elif bad:
                    reason = "non-finite correction or uncertainty"
                else:
                    reason = f"uncertainty wd {corr.uncertainty_wd_um:.2f} um, stig {corr.uncertainty_stig:.2f}"
                rec = IterationRecord(it, wd, stig, corr.to_dict(), wd, stig, False, elapsed(), dose, step_compute,
                                      len(frames), far=far)
                trace.append(rec)
                # (with no pair left to take, or no room for it within the lens's range, the refusal stands)
                lim = sem.limits
                room = can_go_far and lim.wd_min_m <= wd - far_d and wd + far_d <= lim.wd_max_m
                if not far and wd_unsure and not bad and can_go_far and not far_landed and it < s.max_iterations \
                        and room:
                    if on_iteration is not None:
                        on_iteration(rec)
                    pair_d = far_d
                    continue
                far_note = " at the far perturbation" if far else ""
                outcome, message = "uncertain", f"iteration {it}: correction refused{far_note} ({reason})"
                break
            answer = corr
            if play:
                # the pair ended coming down onto wd, so the lens rests play above it, while the answer is measured
                # from the pair's centre, wd itself (the play cancels between its frames): the lens is to move the
                # answer less the play (and rests play above the set value after each step, see move_wd)
                corr = replace(corr, wd_um=corr.wd_um - play * 1e6)
            if far:
                dwd = float(min(max(corr.wd_um * 1e-6, -s.max_step_wd_m), s.max_step_wd_m))
                move_wd(wd + dwd)
                clipped = abs(dwd) < abs(corr.wd_um) * 1e-6
                rec = IterationRecord(it, wd, stig, answer.to_dict(), wd + dwd, stig, clipped, elapsed(), dose,
                                      step_compute, len(frames), far=True)
                trace.append(rec)
                if on_iteration is not None:
                    on_iteration(rec)
                far_landed = not clipped
                # what was learned of the answers' scale and map came from pairs taken where the loop no longer is
                planner = new_planner()
                pair_d = d
                continue
            try:
                step = planner.plan(corr)
            except StigmatorsDiverging as exc:
                trace.append(IterationRecord(it, wd, stig, answer.to_dict(), wd, stig, False, elapsed(), dose,
                                             step_compute, len(frames), planner.scale.gain))
                outcome, message = "failed", (f"iteration {it}: {exc}; start restored (is the profile's "
                                              "calibration this microscope's? deepfocus calibrate measures it)")
                break
            if s.correct_stig:
                step = within_stigmator_range(step, stig, sem.limits.stig_min, sem.limits.stig_max)
            planner.taken(step)
            dwd, (dsx, dsy) = step.wd_m, step.stig
            new_wd, new_stig = wd + dwd, (stig[0] + dsx, stig[1] + dsy)
            move_wd(new_wd)
            if s.correct_stig:
                sem.set_stig(*new_stig)
            rec = IterationRecord(it, wd, stig, answer.to_dict(), new_wd, new_stig, step.clipped, elapsed(), dose,
                                  step_compute, len(frames), step.gain, step.stig_turn_deg, step.stig_map)
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
    if outcome == "iteration_limit" and trace:
        message = _limit_message(trace[-1], s)
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
                           {"wall_s": time.perf_counter() - wall0, "perturbation_m": d, "lens_play_m": play})


def _limit_message(last: IterationRecord, s: AutofocusSettings) -> str:
    """Why a loop that ran out of iterations did not converge: the last answer against the tolerances."""
    c = last.correction
    if (c.get("extra") or {}).get("astig_uncertain"):
        why = "the stigmators were not answered (wd only)"
    elif s.tol_wd_m < 0 or s.tol_stig < 0:
        why = "the tolerances are off"
    else:
        why = f"tolerances {s.tol_wd_m * 1e6:g} um and {s.tol_stig:g} units"
    return (f"no convergence in {last.iteration} iteration(s): the last answer was wd {c['wd_um']:+.2f} um "
            f"(+- {c['uncertainty_wd_um']:.2f}), stig {c['stig_x']:+.3f}, {c['stig_y']:+.3f} ({why}); its step "
            "was applied. Run the loop again; where answers scatter, a longer dwell")


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
                     "stig_map": r.stig_map, **({"far": True} if r.far else {}),
                     "elapsed_s": round(r.elapsed_s, 3), "dose_e_per_nm2": round(r.dose_e_per_nm2, 2)})
    return rows
