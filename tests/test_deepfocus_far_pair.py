"""The closed loop far from focus: the far pair (taken again further apart where the first pair is refused), how
far apart it may be, and answers sure of wd alone."""
from __future__ import annotations

import pytest

from deepfocus.autofocus import AutofocusSettings, autofocus
from deepfocus.correction import Correction

try:
    from test_deepfocus_autofocus import Perturbations, Scripted, corr, disagree_on_wd, small_scope
except ImportError:
    from tests.test_deepfocus_autofocus import Perturbations, Scripted, corr, disagree_on_wd, small_scope

__all__ = ["small_scope"]           # the fixture, used by name


def test_a_pair_whose_patches_disagree_on_wd_is_taken_again_at_three_times_the_perturbation(small_scope):
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    est = Perturbations([disagree_on_wd(), corr(-80.0, 1.0, 1.0, unc=10.0), corr(0.1, 0.01, 0.0)])
    res = autofocus(sem, est, AutofocusSettings(max_step_wd_m=100e-6))
    assert res.outcome == "converged", res.message
    assert est.asked == pytest.approx([5e-6, 15e-6, 5e-6])
    assert [r.far for r in res.trace] == [False, True, False]
    # the far pair moves wd alone: its astigmatism is read through 80 um of blur
    assert res.trace[1].applied_wd_m - wd0 == pytest.approx(-80e-6, abs=1e-12)
    assert res.trace[1].applied_stig == pytest.approx(st0)
    assert res.images_taken == 6


def test_a_far_answer_whose_patches_disagree_too_much_is_refused_and_the_start_restored(small_scope):
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    # 4 um + a fifth of 80 um is allowed: 30 um is not
    res = autofocus(sem, Perturbations([disagree_on_wd(), corr(-80.0, unc=30.0)]),
                    AutofocusSettings(max_step_wd_m=100e-6))
    assert res.outcome == "uncertain" and "far perturbation" in res.message
    assert (sem.get_wd_m(), sem.get_stig()) == (pytest.approx(wd0, abs=1e-12), pytest.approx(st0))


def test_a_far_step_clipped_by_the_step_limit_may_be_followed_by_another(small_scope):
    sem = small_scope.sem
    wd0 = sem.get_wd_m()
    est = Perturbations([disagree_on_wd(), corr(-90.0, unc=10.0), disagree_on_wd(), corr(-50.0, unc=8.0),
                         corr(-0.1)])
    res = autofocus(sem, est, AutofocusSettings(max_step_wd_m=40e-6, max_iterations=5))
    assert res.outcome == "converged", res.message
    assert [r.far for r in res.trace] == [False, True, False, True, False]
    assert (sem.get_wd_m() - wd0) * 1e6 == pytest.approx(-80.1, abs=1e-6)


def test_once_a_far_step_was_taken_in_full_a_pair_refused_again_ends_the_loop(small_scope):
    # the far step put the loop within the estimator's range: a refusal there is not about distance
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    est = Perturbations([disagree_on_wd(), corr(-10.0, unc=1.0), disagree_on_wd()])
    res = autofocus(sem, est, AutofocusSettings(max_iterations=5))
    assert res.outcome == "uncertain" and res.iterations == 3 and est.asked == pytest.approx([5e-6, 15e-6, 5e-6])
    assert (sem.get_wd_m(), sem.get_stig()) == (pytest.approx(wd0, abs=1e-12), pytest.approx(st0))


def test_a_pair_refused_on_the_last_iteration_leaves_the_run_uncertain(small_scope):
    est = Perturbations([disagree_on_wd(), corr(-10.0)])
    res = autofocus(small_scope.sem, est, AutofocusSettings(max_iterations=1))
    assert res.outcome == "uncertain" and est.asked == [5e-6]


def test_no_far_pair_is_taken_where_it_would_leave_the_lenss_range(small_scope):
    sem = small_scope.sem
    target = sem.limits.wd_min_m + 10e-6
    while sem.get_wd_m() > target:              # in steps the lens accepts
        sem.set_wd_m(max(target, sem.get_wd_m() - 0.9 * sem.limits.wd_step_max_m))
    wd0 = sem.get_wd_m()
    est = Perturbations([disagree_on_wd(), corr(-10.0)])
    res = autofocus(sem, est, AutofocusSettings())
    assert res.outcome == "uncertain" and est.asked == [5e-6] and sem.get_wd_m() == pytest.approx(wd0, abs=1e-12)


@pytest.mark.parametrize("refused, settings, answers", [
    # refused for a blank frame, not for wd: a larger perturbation would not help
    (corr(0.0, status="uncertain", unc=float("inf")), {}, (5e-6, 15e-6)),
    # switched off
    (disagree_on_wd(), {"far_perturbation_factor": 0}, (5e-6, 15e-6)),
    # an estimator that answers its own perturbation alone
    (disagree_on_wd(), {}, (5e-6, 5e-6)),
])
def test_no_far_pair_is_taken_where_it_cannot_help(small_scope, refused, settings, answers):
    est = Perturbations([refused, corr(-10.0)], perturbation_range_m=answers)
    res = autofocus(small_scope.sem, est, AutofocusSettings(**settings))
    assert res.outcome == "uncertain" and est.asked == [5e-6]


def test_a_far_pair_is_taken_as_far_apart_as_the_estimator_answers(small_scope):
    # pairs at +-10 um: three times that is beyond the 15 um answered, 1.5 times is not
    est = Perturbations([disagree_on_wd(), corr(-80.0, unc=10.0), corr(0.1)], perturbation_range_m=(2.5e-6, 15e-6))
    res = autofocus(small_scope.sem, est, AutofocusSettings(perturbation_m=10e-6, max_step_wd_m=100e-6))
    assert res.outcome == "converged", res.message
    assert est.asked == pytest.approx([10e-6, 15e-6, 10e-6])
    # less than 1.5 times as far apart would reach hardly further: the refusal stands
    est = Perturbations([disagree_on_wd()], perturbation_range_m=(2.5e-6, 12e-6))
    res = autofocus(small_scope.sem, est, AutofocusSettings(perturbation_m=10e-6, max_step_wd_m=100e-6))
    assert res.outcome == "uncertain" and est.asked == pytest.approx([10e-6])


class FramesLimited(Perturbations):
    """Answers a far pair on these frames only up to +-11 um (further apart, it would bin them past a patch)."""

    def check_frames(self, shape, pixel_size_m, perturbation_m=None):
        if perturbation_m > 11e-6:
            raise ValueError("frames of 128 x 128 px (binned 7 x 7 for this model) are too small")


def test_a_far_pair_is_taken_only_as_far_apart_as_the_frames_are_answered(small_scope):
    est = FramesLimited([disagree_on_wd(), corr(-40.0, unc=5.0), corr(0.1)], perturbation_range_m=(2.5e-6, 15e-6))
    res = autofocus(small_scope.sem, est, AutofocusSettings(max_step_wd_m=100e-6))
    assert res.outcome == "converged", res.message
    assert est.asked == pytest.approx([5e-6, 10.5e-6, 5e-6])
    # none answered at 1.5 x or more: the first pair's refusal stands, no frame taken that would be refused
    est = FramesLimited([disagree_on_wd()], perturbation_range_m=(2.5e-6, 15e-6))
    res = autofocus(small_scope.sem, est, AutofocusSettings(perturbation_m=8e-6, max_step_wd_m=100e-6))
    assert res.outcome == "uncertain" and est.asked == pytest.approx([8e-6]) and res.images_taken == 2


def test_an_answer_sure_of_wd_but_not_of_the_stigmators_moves_wd_alone_and_never_converges(small_scope):
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    stig_unsure = Correction(-12.0, -3.0, 3.0, -1.5, 1.5, 0.5, 3.5)          # stigmators 3.5 units unsure
    res = autofocus(sem, Scripted([stig_unsure, corr(0.1, 0.01, 0.0)]), AutofocusSettings(max_uncertainty_stig=2.0))
    assert res.outcome == "converged" and res.iterations == 2, res.message
    first = res.trace[0]
    assert first.applied_wd_m - wd0 == pytest.approx(-12e-6, abs=1e-12) and first.applied_stig == pytest.approx(st0)
    assert first.correction["extra"]["astig_um_unapplied"] == [-3.0, 3.0]
    # such answers near focus leave the stigmators unknown: the loop goes on to its limit, never "converged"
    small = Correction(0.1, 0.5, 0.5, 0.25, 0.25, 0.1, 3.5)
    res = autofocus(sem, Scripted([small]), AutofocusSettings(max_uncertainty_stig=2.0, max_iterations=3))
    assert res.outcome == "iteration_limit" and res.iterations == 3
