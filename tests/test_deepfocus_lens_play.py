"""The objective lens' play: the loop compensates the half-width `deepfocus calibrate` measured."""
from __future__ import annotations

import pytest

from deepfocus.autofocus import AutofocusSettings, autofocus, set_wd_coming_down
from deepfocus.correction import Correction, Estimator
from hardware.config import ConfigError, load_profile
from hardware.factory import open_microscope

PLAY_UM = 0.15      # setup_a's half-width


class PairCentre(Estimator):
    """An ideal estimator: the correction from the pair's centre, which is the set wd whatever the play (the
    pair's two frames come from opposite ways, so the play cancels between them)."""

    def __init__(self, scope):
        self.scope = scope

    def estimate(self, minus, plus, pixel_size_m, perturbation_m=None):
        sim, sem = self.scope.sim, self.scope.sem
        tx, ty = sim.true_stig()
        sx, sy = sem.get_stig()
        return Correction((sim.true_wd_m() - sem.get_wd_m()) * 1e6, 0.0, 0.0, tx - sx, ty - sy, 0.01, 0.001)


@pytest.fixture
def scope():
    s = open_microscope("setup_a")
    assert s.config.optics.hysteresis_um == PLAY_UM
    s.sem.set_scan(pixel_size_m=10e-9, width_px=128, height_px=128, dwell_s=50e-9)
    return s


@pytest.mark.parametrize("start_um", [-3.0, 3.0, -0.2, 0.25, 12.0])
def test_with_the_play_compensated_the_lens_rests_at_focus(scope, start_um):
    sem, sim = scope.sem, scope.sim
    sem.set_wd_m(sim.true_wd_m() + start_um * 1e-6)
    res = autofocus(sem, PairCentre(scope), AutofocusSettings(lens_play_m=PLAY_UM * 1e-6))
    assert res.outcome == "converged"
    assert abs(sim.aberration().defocus_um) < 1e-3
    # the set value sits the play below focus (the lens came down onto it), and the trace keeps the answers as
    # the estimator gave them
    assert sem.get_wd_m() == pytest.approx(sim.true_wd_m() - PLAY_UM * 1e-6, abs=1e-10)
    assert res.trace[0].correction["wd_um"] == pytest.approx(-start_um, abs=1e-6)


@pytest.mark.parametrize("start_um", [-3.0, 3.0, 12.0])
def test_without_it_the_lens_rests_off_focus_by_the_play(scope, start_um):
    sem, sim = scope.sem, scope.sim
    sem.set_wd_m(sim.true_wd_m() + start_um * 1e-6)
    res = autofocus(sem, PairCentre(scope), AutofocusSettings(lens_play_m=0.0))
    assert res.outcome == "converged"
    assert abs(sim.aberration().defocus_um) == pytest.approx(PLAY_UM, abs=1e-6)


def test_a_step_up_smaller_than_the_play_goes_beyond_and_comes_down(scope):
    sem, sim = scope.sem, scope.sim
    sem.set_wd_m(sim.true_wd_m() + 20e-6)
    sem.set_wd_m(sim.true_wd_m())                 # came down: the lens rests the play above the set value
    assert sim.aberration().defocus_um == pytest.approx(PLAY_UM)
    target = sim.true_wd_m() + 0.1e-6             # a plain step there would not move the lens at all
    set_wd_coming_down(sem, target, PLAY_UM * 1e-6, ceiling_m=sem.limits.wd_max_m)
    assert sem.get_wd_m() == pytest.approx(target, abs=1e-12)
    assert sim.aberration().defocus_um == pytest.approx(0.1 + PLAY_UM)


def test_the_way_beyond_stays_below_the_ceiling(scope):
    sem = scope.sem
    wd = sem.get_wd_m()
    seen = []
    set_wd = sem.set_wd_m
    sem.set_wd_m = lambda v: (seen.append(v), set_wd(v))
    set_wd_coming_down(sem, wd + 3e-6, PLAY_UM * 1e-6, ceiling_m=wd + 3.2e-6)
    assert seen == [pytest.approx(wd + 3.2e-6), pytest.approx(wd + 3e-6)]


def test_the_play_comes_from_the_profile_and_nonsense_is_refused_by_name():
    own = AutofocusSettings.from_config(load_profile("setup_a", ["autofocus.lens_play_um=0.17"]).autofocus)
    assert own.lens_play_m == pytest.approx(0.17e-6)
    assert AutofocusSettings().lens_play_m == 0.0         # not measured: not compensated
    with pytest.raises(ConfigError, match="autofocus.lens_play_um"):
        load_profile("setup_a", ["autofocus.lens_play_um=-0.1"])
    with pytest.raises(ValueError, match="lens_play_m"):
        AutofocusSettings(lens_play_m=float("nan"))
    with pytest.raises(ValueError, match="lens_play_m"):
        AutofocusSettings(lens_play_m=20e-6)


class Scripted(Estimator):
    """Prepared answers near focus, each from 8 patches that spread 0.4 um in wd."""

    def __init__(self, wd_answers_um):
        self.answers = list(wd_answers_um)

    def estimate(self, minus, plus, pixel_size_m, perturbation_m=None):
        wd = self.answers.pop(0)
        return Correction(wd, 0.0, 0.0, 0.0, 0.0, 0.4, 0.01, n_patches=8)


def _wd_steps_um(scope, play_um):
    sem = scope.sem
    res = autofocus(sem, Scripted([0.8, -0.6, 0.5]), AutofocusSettings(max_iterations=3, tol_wd_m=-1.0,
                                                                      tol_stig=-1.0, lens_play_m=play_um * 1e-6))
    return [(r.applied_wd_m - r.wd_m) * 1e6 for r in res.trace]


def test_near_focus_the_wd_answers_are_weighed_only_where_the_play_is_compensated(scope):
    # without play compensation a step moves the lens by up to the play more or less than itself, and the
    # answers are taken as they come; with it they are weighed against what the earlier ones said is left
    assert _wd_steps_um(scope, 0.0) == pytest.approx([0.8, -0.6, 0.5])
    play = 0.1
    first, second, third = _wd_steps_um(scope, play)
    assert first == pytest.approx(0.8 - play)
    # the first answer less its step says 0 is left, the second says -0.7: about halfway, the earlier one
    # counting a little less (a step adds a fifth of itself to its variance)
    assert -0.7 < second < -0.3
    assert abs(third) < abs(0.5 - play)


class OwnFrames:
    """A method that takes its own frames (as a sharpness sweep does): its answers are not the pair's."""
    perturbation_m = 5e-6

    def measure(self, sem, settings):
        return Correction(1.0, 0.0, 0.0, 0.0, 0.0, 0.01, 0.001), []


def test_methods_that_take_their_own_frames_are_not_compensated(scope):
    sem = scope.sem
    wd0 = sem.get_wd_m()
    res = autofocus(sem, OwnFrames(), AutofocusSettings(max_iterations=1, lens_play_m=PLAY_UM * 1e-6))
    assert res.extra["lens_play_m"] == 0.0
    assert res.trace[0].applied_wd_m - wd0 == pytest.approx(1e-6, abs=1e-12)
