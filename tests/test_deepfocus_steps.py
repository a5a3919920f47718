"""The loop's step planning: what it learns of the answers' scale, and from which answers it does not."""
from __future__ import annotations

import pytest

from deepfocus.correction import Correction
from deepfocus.steps import StepPlanner, StepSettings


def _answer(wd_um: float, sx: float, sy: float, beyond: bool = False) -> Correction:
    extra = {"beyond_trained_wd_um": 20.4} if beyond else {}
    return Correction(wd_um, 0.0, 0.0, sx, sy, 0.1, 0.05, extra=extra)


def _gain_after(first_beyond: bool) -> float:
    """The gain divided out of the step for the second answer: 29 um from focus a +-3 um pair answers 22.9 (short),
    after that step 6.1 um are left and answered true to scale."""
    planner = StepPlanner(StepSettings(max_step_wd_m=50e-6, max_step_stig=8.0), True, 0.25)
    planner.taken(planner.plan(_answer(22.9, 4.0, -3.0, beyond=first_beyond)))
    return planner.plan(_answer(6.1, 1.0, -0.8)).gain


def test_the_scale_is_not_learned_from_an_answer_beyond_the_trained_range():
    assert _gain_after(first_beyond=True) == pytest.approx(1.0)
    # the same answers without the flag read as a scale of 0.73, which would divide the next steps
    assert _gain_after(first_beyond=False) == pytest.approx((22.9 - 6.1) / 22.9, abs=0.02)
