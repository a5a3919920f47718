"""The closed loop: restores the microscope on failure, refuses uncertain corrections, converges on the simulator."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deepfocus.autofocus import AutofocusSettings, autofocus
from deepfocus.correction import Correction, Estimator
from hardware.factory import open_microscope


class Scripted(Estimator):
    """Returns prepared corrections in turn; raises when told to."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.calls = 0

    def estimate(self, minus, plus, pixel_size_m, perturbation_m=None):
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        if isinstance(step, Exception):
            raise step
        return step


def corr(wd_um=0.0, sx=0.0, sy=0.0, status="ok", unc=0.1):
    return Correction(wd_um, 0.0, 0.0, sx, sy, unc, 0.01, status=status)


@pytest.fixture
def small_scope():
    scope = open_microscope("setup_a")
    scope.sem.set_scan(pixel_size_m=10e-9, width_px=128, height_px=128, dwell_s=50e-9)
    return scope


def test_error_in_a_later_iteration_restores_wd_and_stig(small_scope):
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    res = autofocus(sem, Scripted([corr(8.0, 0.5, -0.3), RuntimeError("detector lost")]))
    assert res.outcome == "failed" and "detector lost" in res.message
    assert sem.get_wd_m() == pytest.approx(wd0, abs=1e-12)
    assert sem.get_stig() == pytest.approx(st0)
    assert res.images_taken == 4 and res.dose_e_per_nm2 > 0


def test_uncertain_correction_is_refused_and_the_start_restored(small_scope):
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    res = autofocus(sem, Scripted([corr(5.0, 0.2, 0.2), corr(30.0, status="uncertain")]))
    assert res.outcome == "uncertain"
    assert (sem.get_wd_m(), sem.get_stig()) == (pytest.approx(wd0, abs=1e-12), pytest.approx(st0))


def test_too_uncertain_correction_is_refused(small_scope):
    res = autofocus(small_scope.sem, Scripted([corr(5.0, unc=9.0)]),
                    AutofocusSettings(max_uncertainty_wd_m=4e-6, far_perturbation_factor=0))
    assert res.outcome == "uncertain" and res.iterations == 1


@pytest.mark.parametrize("answer", [corr(5.0, unc=float("nan")), corr(float("nan"))])
def test_a_non_finite_answer_or_uncertainty_is_refused(small_scope, answer):
    sem = small_scope.sem
    wd0 = sem.get_wd_m()
    res = autofocus(sem, Scripted([answer]), AutofocusSettings(far_perturbation_factor=0))
    assert res.outcome == "uncertain" and "non-finite correction or uncertainty" in res.message
    assert sem.get_wd_m() == pytest.approx(wd0, abs=1e-12)


def test_a_refusal_names_the_loops_reason_not_a_note_the_answer_carries(small_scope):
    c = corr(25.0, unc=9.0)
    c.extra.update(astig_uncertain=True, reason="patches disagree on astigmatism by 7.1 um: wd only")
    res = autofocus(small_scope.sem, Scripted([c]), AutofocusSettings(far_perturbation_factor=0))
    assert res.outcome == "uncertain" and "uncertainty wd 9.00 um" in res.message
    assert "astigmatism" not in res.message


class Perturbations(Scripted):
    """Scripted, and remembers the perturbation of every pair it was given."""

    def __init__(self, steps, perturbation_range_m=None):
        super().__init__(steps)
        self.asked: list[float] = []
        if perturbation_range_m is not None:
            self.perturbation_range_m = perturbation_range_m

    def estimate(self, minus, plus, pixel_size_m, perturbation_m=None):
        self.asked.append(perturbation_m)
        return super().estimate(minus, plus, pixel_size_m, perturbation_m)


def disagree_on_wd(wd_um=-20.0, spread_um=9.0):
    """What the estimator answers far beyond its range: patches that disagree on wd."""
    c = corr(wd_um, 0.5, 0.5, status="uncertain", unc=spread_um)
    c.extra.update(wd_uncertain=True, reason=f"patches disagree on wd by {spread_um} um")
    return c


def test_steps_are_clipped_and_small_corrections_converge(small_scope):
    sem = small_scope.sem
    wd0 = sem.get_wd_m()
    res = autofocus(sem, Scripted([corr(500.0, 20.0, 0.0), corr(0.1, 0.01, 0.0)]),
                    AutofocusSettings(max_step_wd_m=40e-6, max_step_stig=3.0))
    assert res.outcome == "converged" and res.iterations == 2
    assert res.trace[0].clipped
    assert sem.get_wd_m() - wd0 == pytest.approx(40.1e-6, abs=1e-9)


def test_a_loop_out_of_iterations_says_what_its_last_answer_was(small_scope):
    res = autofocus(small_scope.sem, Scripted([corr(3.0, 0.5, 0.0), corr(2.0, 0.4, -0.3)]),
                    AutofocusSettings(max_iterations=2, tol_wd_m=0.6e-6, tol_stig=0.15))
    assert res.outcome == "iteration_limit"
    assert res.message.startswith("no convergence in 2 iteration(s): the last answer was wd +2.00 um (+- 0.10), "
                                  "stig +0.400, -0.300 (tolerances 0.6 um and 0.15 units)")


def test_abort_restores_the_start(small_scope):
    sem = small_scope.sem
    wd0 = sem.get_wd_m()
    calls = iter([False, True])
    res = autofocus(sem, Scripted([corr(6.0)]), should_abort=lambda: next(calls))
    assert res.outcome == "aborted" and sem.get_wd_m() == pytest.approx(wd0, abs=1e-12)


def test_the_scan_is_restored_after_the_loop(small_scope):
    from hardware.sem import ScanSettings
    sem = small_scope.sem
    before = sem.get_scan()
    autofocus(sem, Scripted([corr(0.0)]), AutofocusSettings(scan=ScanSettings(width_px=256, height_px=256)))
    assert sem.get_scan() == before


def _truth(scope):
    ab = scope.sim.aberration()
    return abs(ab.defocus_um), np.abs(np.subtract(scope.sem.get_stig(), scope.sim.true_stig()))


@pytest.mark.parametrize("profile, start_um, start_stig", [("setup_a", 14.0, (1.5, -1.2)),
                                                            ("setup_a", -10.0, (-1.0, 2.0))])
def test_shipped_model_converges_from_a_moderate_aberration(profile, start_um, start_stig):
    from deepfocus.calibration import StigCalibration
    from deepfocus.model_files import load_estimator
    scope = open_microscope(profile)
    sem, sim = scope.sem, scope.sim
    sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=100e-9)
    sem.set_stig(*(np.array(sim.true_stig()) + start_stig))
    sem.set_wd_m(sim.true_wd_m() + start_um * 1e-6)
    est = load_estimator(calibration=StigCalibration.from_config(scope.config), device="cpu")
    res = autofocus(sem, est, AutofocusSettings(max_iterations=4))
    wd_err, stig_err = _truth(scope)
    assert res.ok, res.message
    assert wd_err < 1.0 and stig_err.max() < 0.25, (wd_err, stig_err, res.trace)


@pytest.mark.parametrize("start_um", [90.0, -90.0])
def test_shipped_model_finds_focus_from_three_times_the_range_it_was_trained_for(start_um):
    # trained on +-34 um at +-5 um; at 90 um its patches disagree, and the loop takes the pair again at +-15 um
    from deepfocus.model_files import load_estimator_for
    scope = open_microscope("setup_a")
    sem, sim = scope.sem, scope.sim
    sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=50e-9)
    sem.set_stig(*(np.array(sim.true_stig()) + (1.0, -1.0)))
    sem.set_wd_m(sim.true_wd_m() + start_um * 1e-6)
    res = autofocus(sem, load_estimator_for(scope.config, device="cpu"),
                    AutofocusSettings.from_config(scope.config.autofocus, max_iterations=6))
    wd_err, stig_err = _truth(scope)
    assert res.ok, res.message
    assert any(r.far for r in res.trace)
    assert wd_err < 1.0 and stig_err.max() < 0.25, (wd_err, stig_err, res.trace)


def test_a_consistent_scale_error_is_learned_and_divided_out(small_scope):
    # an estimator that answers 0.7 x the truth: 10 -> applied 10 (true 14.3), leaving 4.3 true -> says 3.0
    sem = small_scope.sem
    wd0 = sem.get_wd_m()
    res = autofocus(sem, Scripted([corr(10.0), corr(3.0), corr(0.0)]), AutofocusSettings(max_iterations=3))
    assert res.trace[1].wd_gain == pytest.approx(0.7)
    assert (sem.get_wd_m() - wd0) * 1e6 == pytest.approx(10.0 + 3.0 / 0.7, abs=1e-6)


class ScaledDeepFocus(Scripted):
    stig_shares_wd_scale = True


def test_the_learned_scale_divides_the_stigmator_steps_of_an_estimator_whose_answers_share_it(small_scope):
    # both answers 0.7 x the truth (a wrong aperture angle): the second stigmator step is divided by the learned gain
    sem = small_scope.sem
    st0 = sem.get_stig()
    steps = [corr(10.0, 0.7, -0.35), corr(3.0, 0.21, -0.105), corr(0.0)]
    autofocus(sem, ScaledDeepFocus(steps), AutofocusSettings(max_iterations=3))
    assert sem.get_stig()[0] - st0[0] == pytest.approx(0.7 + 0.21 / 0.7, abs=1e-9)
    assert sem.get_stig()[1] - st0[1] == pytest.approx(-0.35 - 0.105 / 0.7, abs=1e-9)
    # an estimator that does not say so (MAPFoSt) keeps its stigmator steps as answered
    sem.set_stig(*st0)
    autofocus(sem, Scripted(steps), AutofocusSettings(max_iterations=3))
    assert sem.get_stig()[0] - st0[0] == pytest.approx(0.7 + 0.21, abs=1e-9)


def test_near_focus_a_stigmator_step_tells_the_scale_the_small_wd_steps_cannot(small_scope):
    # answers 0.7 x the truth, wd steps below gain_min_step_m: the first stigmator step (1.4 units) tells the scale
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    steps = [corr(0.7, 1.4, 0.0), corr(0.21, 0.42, 0.0), corr(0.0)]
    res = autofocus(sem, ScaledDeepFocus(steps), AutofocusSettings(max_iterations=3))
    assert res.trace[1].wd_gain == pytest.approx(0.7)
    assert sem.get_stig()[0] - st0[0] == pytest.approx(2.0, abs=1e-9)
    assert (sem.get_wd_m() - wd0) * 1e6 == pytest.approx(0.7 + 0.21 / 0.7, abs=1e-6)
    # MAPFoSt's stigmator answers do not share the wd scale: nothing learned, nothing divided
    sem.set_wd_m(wd0)
    sem.set_stig(*st0)
    res = autofocus(sem, Scripted(steps), AutofocusSettings(max_iterations=3))
    assert res.trace[1].wd_gain == 1.0 and sem.get_stig()[0] - st0[0] == pytest.approx(1.82, abs=1e-9)


def test_a_stigmator_calibration_off_in_angle_is_learned_from_one_step_and_turned_back(small_scope):
    # the answers turned 60 degrees from the truth (1, 0): alone the loop would never get closer than it started
    sem = small_scope.sem
    st0 = sem.get_stig()
    c, s60 = 0.5, math.sqrt(3) / 2
    steps = [corr(0.1, c, s60), corr(0.0, 1.0, 0.0), corr(0.0)]
    res = autofocus(sem, ScaledDeepFocus(steps), AutofocusSettings(max_iterations=3))
    assert res.trace[1].stig_turn_deg == pytest.approx(60.0) and res.trace[1].wd_gain == pytest.approx(1.0)
    assert sem.get_stig()[0] - st0[0] == pytest.approx(1.0, abs=1e-9)
    assert sem.get_stig()[1] - st0[1] == pytest.approx(0.0, abs=1e-9)


class Oracle(Estimator):
    """Answers the simulator's true correction through a stigmator map (a 2 x 2 matrix on (x, y)), plus noise."""
    stig_shares_wd_scale = True

    def __init__(self, scope, stig_map, noise=0.0, seed=0, patches=0):
        self.scope, self.map, self.noise, self.patches = scope, np.asarray(stig_map, float), noise, patches
        self.rng = np.random.default_rng(seed)

    def estimate(self, minus, plus, pixel_size_m, perturbation_m=None):
        sem, sim = self.scope.sem, self.scope.sim
        truth = np.asarray(sim.true_stig()) - np.asarray(sem.get_stig())
        sx, sy = self.map @ truth + self.noise * self.rng.standard_normal(2)
        c = corr((sim.true_wd_m() - sem.get_wd_m()) * 1e6, sx, sy)
        if self.patches:
            # a spread over the patches that tells the answer's noise: s.d. per axis = spread / sqrt(2 n)
            c.n_patches, c.uncertainty_stig = self.patches, self.noise * math.sqrt(2 * self.patches)
        return c


def _start(scope, stig_off):
    sem, sim = scope.sem, scope.sim
    sem.set_wd_m(sim.true_wd_m() + 2e-6)
    sem.set_stig(*(np.asarray(sim.true_stig()) + stig_off))


def test_a_stigmator_axis_the_other_way_round_is_learned_from_two_steps_and_mirrored_back(small_scope):
    # stigmator y the other way round: each step alone doubles the y error, and no turn undoes a mirror
    _start(small_scope, (1.0, 1.0))
    res = autofocus(small_scope.sem, Oracle(small_scope, [[1, 0], [0, -1]]),
                    AutofocusSettings(max_iterations=5, tol_stig=0.01))
    assert res.outcome == "converged", res.message
    assert [r.stig_map for r in res.trace][:3] == ["turn", "turn", "mirror"]
    assert res.trace[2].stig_turn_deg == pytest.approx(0.0, abs=1e-6)       # a reflection about the x axis
    assert np.abs(np.asarray(small_scope.sim.true_stig()) - small_scope.sem.get_stig()).max() < 1e-6


@pytest.mark.parametrize("stig_map", [[[1, 0], [0, 0.5]], [[0.3, -0.6], [0.87, 0.5]]],
                         ids=["y_half_scale", "turned60_x_half_scale"])
def test_answers_that_scatter_are_never_taken_for_a_mirror(small_scope, stig_map):
    # stigmator axes of unequal scale (neither a turn nor a mirror) change the steps' direction from step to step,
    # and single answers on noisy frames scatter: neither may pass for a mirror
    for seed in range(10):
        _start(small_scope, (2.0, -2.0))
        res = autofocus(small_scope.sem, Oracle(small_scope, stig_map, noise=0.06, seed=seed),
                        AutofocusSettings(max_iterations=5, tol_wd_m=-1.0, tol_stig=-1.0))
        assert all(r.stig_map != "mirror" for r in res.trace), seed
        assert np.abs(np.asarray(small_scope.sim.true_stig()) - small_scope.sem.get_stig()).max() < 0.5, seed


def test_near_focus_the_stigmator_steps_average_the_noise_of_successive_answers(small_scope):
    # answers scattering 0.08 units per axis around a truth 0.3 units off: each full step would leave the last
    # answer's noise on the setting; weighing each answer against the earlier ones leaves less
    def final_errors(fuse):
        errors = []
        for seed in range(20):
            _start(small_scope, (0.3, -0.2))
            autofocus(small_scope.sem, Oracle(small_scope, np.eye(2), noise=0.08, seed=seed, patches=8),
                      AutofocusSettings(max_iterations=6, tol_wd_m=-1.0, tol_stig=-1.0, fuse_stig=fuse))
            errors.append(np.hypot(*(np.asarray(small_scope.sim.true_stig()) - small_scope.sem.get_stig())))
        return np.array(errors)
    fused, alone = final_errors(True), final_errors(False)
    assert np.sqrt(np.mean(alone ** 2)) == pytest.approx(0.08 * math.sqrt(2), rel=0.35)
    assert np.sqrt(np.mean(fused ** 2)) < 0.6 * np.sqrt(np.mean(alone ** 2))


def test_answers_that_grow_step_after_step_stop_the_loop_and_restore_the_start(small_scope):
    # stigmator answers no map explains (this estimator does not let the loop learn one): every step adds error
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    steps = [corr(0.5, 0.5, 0.0), corr(0.3, 0.0, 0.8), corr(0.2, -1.2, 0.0), corr(0.1, 0.0, -1.8)]
    res = autofocus(sem, Scripted(steps), AutofocusSettings(max_iterations=5))
    assert res.outcome == "failed" and "diverging" in res.message and "calibrat" in res.message
    assert len(res.trace) == 3 and res.trace[-1].applied_stig == res.trace[-1].stig
    assert sem.get_wd_m() == wd0 and sem.get_stig() == st0


def test_a_first_answer_below_the_truth_far_from_focus_is_not_taken_for_divergence(small_scope):
    # far from focus an estimator may answer less astigmatism than there is, then more, then converge
    sem = small_scope.sem
    steps = [corr(20.0, 0.3, 0.0), corr(5.0, 0.6, 0.0), corr(2.0, 1.5, 0.0), corr(0.2, 0.1, 0.0),
             corr(0.1, 0.02, 0.0)]
    res = autofocus(sem, Scripted(steps), AutofocusSettings(max_iterations=5))
    assert res.outcome == "converged", res.message


def wd_only(wd_um):
    return Correction(wd_um, 0.0, 0.0, 0.0, 0.0, 0.5, 5.0,
                      extra={"astig_uncertain": True, "reason": "patches disagree on astigmatism: wd only"})


def test_a_wd_only_answer_moves_wd_keeps_the_stigmators_and_goes_on(small_scope):
    sem = small_scope.sem
    wd0, st0 = sem.get_wd_m(), sem.get_stig()
    # the stigmator uncertainty (5 units) would refuse a full answer; a wd-only one carries no stigmator step
    res = autofocus(sem, Scripted([wd_only(12.0), corr(1.0, 0.3, -0.2), corr(0.1, 0.01, 0.0)]))
    assert res.outcome == "converged" and res.iterations == 3
    first = res.trace[0]
    assert first.applied_wd_m - wd0 == pytest.approx(12e-6, abs=1e-9)
    assert first.applied_stig == pytest.approx(st0)
    assert res.trace[1].applied_stig == pytest.approx((st0[0] + 0.3, st0[1] - 0.2))


def test_a_small_wd_only_answer_never_counts_as_converged(small_scope):
    # wd is within tolerance but the astigmatism is unknown: the loop must not stop there
    res = autofocus(small_scope.sem, Scripted([wd_only(0.1)]), AutofocusSettings(max_iterations=3))
    assert res.outcome == "iteration_limit" and res.iterations == 3


def test_an_overshoot_from_the_largest_start_is_not_clipped_onto_the_truth(small_scope):
    # from 6 units off (the largest start the loop must recover from) a 10 % overshoot must stay an overshoot:
    # a step limit of exactly 6 would land every overshoot on the true value and hide the estimator's error
    sem = small_scope.sem
    sx0, sy0 = sem.get_stig()
    autofocus(sem, Scripted([corr(0.0, 6.6, -6.6)]), AutofocusSettings(max_iterations=1))
    sx, sy = sem.get_stig()
    assert (sx - sx0, sy - sy0) == (pytest.approx(6.6), pytest.approx(-6.6))


def test_a_stigmator_step_past_the_range_is_held_at_its_edge_and_the_loop_goes_on(small_scope):
    # an overshoot past the stigmators' range ended the run "failed" on the hardware's refusal and restored the start
    sem = small_scope.sem
    hi = sem.limits.stig_max
    sem.set_stig(hi - 1.0, -2.0)
    res = autofocus(sem, Scripted([corr(2.0, 3.0, 1.0), corr(0.1, -0.5, 0.0), corr(0.1, 0.01, 0.0)]),
                    AutofocusSettings(max_iterations=3, fuse_stig=False))
    assert res.outcome == "converged" and res.iterations == 3, res.message
    first = res.trace[0]
    assert first.clipped and first.applied_stig == (pytest.approx(hi), pytest.approx(-1.0))
    assert sem.get_stig() == (pytest.approx(hi - 0.49), pytest.approx(-1.0))


def test_settings_default_to_the_profile_section_and_take_a_microscopes_own():
    from hardware.config import AutofocusConfig, load_profile
    base = AutofocusSettings.from_config(AutofocusConfig())
    plain = AutofocusSettings()
    for key in ("max_iterations", "tol_wd_m", "tol_stig", "max_step_wd_m", "max_step_stig", "max_total_wd_m",
                "max_uncertainty_wd_m", "max_uncertainty_stig", "far_perturbation_factor", "lens_play_m"):
        assert getattr(base, key) == pytest.approx(getattr(plain, key)), key
    own = AutofocusSettings.from_config(load_profile("setup_a", ["autofocus.max_step_stig=3",
                                                                 "autofocus.tol_wd_um=1.5"]).autofocus,
                                        max_iterations=2)
    assert (own.max_step_stig, own.tol_wd_m, own.max_iterations) == (3.0, pytest.approx(1.5e-6), 2)


@pytest.mark.parametrize("changes, message", [
    ({"max_step_stig": -1.0}, "max_step_stig must be a positive number"),
    ({"max_step_wd_m": float("nan")}, "max_step_wd_m must be a positive number"),
    ({"tol_wd_m": float("inf")}, "tol_wd_m must be a finite number"),
    ({"max_iterations": 0}, "max_iterations must be an integer of at least 1"),
    ({"perturbation_m": -5e-6}, "perturbation_m must be a positive number of metres"),
    ({"gain_limits": (1.2, 1.6)}, "gain_limits must be"),
    ({"far_perturbation_factor": 1.2}, "far_perturbation_factor must be 0"),
])
def test_settings_out_of_range_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message):
        AutofocusSettings(**changes)


def test_the_loop_clips_to_the_microscopes_own_step_limit():
    scope = open_microscope("setup_a", ["autofocus.max_step_stig=2"])
    scope.sem.set_scan(pixel_size_m=10e-9, width_px=128, height_px=128, dwell_s=50e-9)
    sem = scope.sem
    sx0, _ = sem.get_stig()
    settings = AutofocusSettings.from_config(scope.config.autofocus, max_iterations=1)
    res = autofocus(sem, Scripted([corr(0.0, 5.0, 0.0)]), settings)
    assert res.trace[0].clipped and sem.get_stig()[0] - sx0 == pytest.approx(2.0)


def test_the_autofocus_command_runs_the_profiles_loop_and_names_a_broken_one(capsys):
    import json

    from deepfocus.cli import EXIT_INPUT, main
    main(["autofocus", "--profile", "setup_a", "--set", "autofocus.max_iterations=1", "--start-wd-um", "10",
          "--dwell-ns", "50", "--frame-px", "512", "512", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert len(out["iterations"]) == 1 and out["images_taken"] == 2
    # a first iteration has nothing to learn from yet: the profile's calibration is taken as it is
    assert out["iterations"][0]["gain"] == 1.0 and out["iterations"][0]["stig_turn_deg"] == 0.0
    assert out["iterations"][0]["stig_map"] == "turn"
    # the profile's lens play (none measured in the shipped one) is what the loop compensated
    assert out["lens_play_compensated_um"] == 0.0
    assert out["perturbation_um"] == pytest.approx(5.0)        # the model's own pair on setup_a's 4 mrad beam
    main(["autofocus", "--profile", "setup_a", "--set", "autofocus.max_iterations=1", "--set",
          "autofocus.lens_play_um=0.17", "--start-wd-um", "10", "--dwell-ns", "50", "--frame-px", "512", "512",
          "--set", "optics.aperture_angle_mrad=2", "--set", "calibration.aperture_angle_mrad=2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["lens_play_compensated_um"] == pytest.approx(0.17)
    assert out["perturbation_um"] == pytest.approx(10.0)       # a beam half as wide: a pair twice as far apart
    assert main(["autofocus", "--profile", "setup_a", "--set", "autofocus.max_step_stig=30"]) == EXIT_INPUT
    assert "autofocus.max_step_stig = 30 exceeds" in capsys.readouterr().err
    assert main(["autofocus", "--profile", "setup_a", "--model", "nope.pt"]) == EXIT_INPUT
    assert "model file 'nope.pt' does not exist" in capsys.readouterr().err
    assert main(["autofocus", "--profile", "setup_a", "--set", "calibration.stig_matrix=[[0,0],[0,0]]"]) == EXIT_INPUT
    assert "stigmator calibration must be an invertible 2x2 matrix" in capsys.readouterr().err


def test_a_scan_the_estimator_cannot_answer_is_refused_before_any_frame(small_scope):
    from deepfocus.model_files import load_estimator_for
    sem = small_scope.sem
    est = load_estimator_for(small_scope.config)
    wd0 = sem.get_wd_m()
    for pixel_m, height, named in ((200e-9, 512, "the model would see 66.7 nm pixels"), (10e-9, 60, "too small"),
                                   (3e-9, 200, "(binned 2 x 2 for this model) are too small: need at least 256 px")):
        sem.set_scan(pixel_size_m=pixel_m, width_px=512, height_px=height, dwell_s=50e-9)
        res = autofocus(sem, est, AutofocusSettings(max_iterations=1))
        assert res.outcome == "failed" and named in res.message
        assert res.images_taken == 0 and res.dose_e_per_nm2 == 0 and sem.get_wd_m() == wd0


class WantsItsOwnPair(Perturbations):
    """Wants its pairs 1000 x the frames' pixel size apart."""

    def pair_perturbation_m(self, pixel_size_m=None):
        return 1000 * pixel_size_m


def test_the_loop_takes_the_pair_the_estimator_wants_on_the_focus_frames(small_scope):
    sem = small_scope.sem
    sem.set_scan(pixel_size_m=8e-9)
    est = WantsItsOwnPair([corr(0.1)], perturbation_range_m=(2.5e-6, 15e-6))
    res = autofocus(sem, est, AutofocusSettings(max_iterations=1))
    assert est.asked == pytest.approx([8e-6]) and res.extra["perturbation_m"] == pytest.approx(8e-6)
    # a perturbation set in the settings wins
    est = WantsItsOwnPair([corr(0.1)], perturbation_range_m=(2.5e-6, 15e-6))
    autofocus(sem, est, AutofocusSettings(max_iterations=1, perturbation_m=5e-6))
    assert est.asked == pytest.approx([5e-6])


def test_a_profile_may_pin_the_pair_and_a_setting_given_overrides_it(small_scope):
    from hardware.config import ConfigError, load_profile
    cfg = load_profile("setup_a", ["autofocus.perturbation_um=8"]).autofocus
    assert AutofocusSettings.from_config(cfg).perturbation_m == pytest.approx(8e-6)
    # None from a command line that gave no --perturbation-um keeps the profile's; a value replaces it
    assert AutofocusSettings.from_config(cfg, perturbation_m=None).perturbation_m == pytest.approx(8e-6)
    assert AutofocusSettings.from_config(cfg, perturbation_m=5e-6).perturbation_m == pytest.approx(5e-6)
    # 0, the shipped profiles' value: the estimator's choice
    assert AutofocusSettings.from_config(load_profile("setup_a").autofocus).perturbation_m is None
    est = WantsItsOwnPair([corr(0.1)], perturbation_range_m=(2.5e-6, 15e-6))
    autofocus(small_scope.sem, est, AutofocusSettings.from_config(cfg, max_iterations=1))
    assert est.asked == pytest.approx([8e-6])
    with pytest.raises(ConfigError, match="autofocus.perturbation_um"):
        load_profile("setup_a", ["autofocus.perturbation_um=0.1"])


def _walk_wd(sem, target_m):
    while abs(sem.get_wd_m() - target_m) > 1e-12:
        w = sem.get_wd_m()
        step = 0.9 * sem.limits.wd_step_max_m
        sem.set_wd_m(w + max(-step, min(step, target_m - w)))


def test_a_pair_chosen_wider_than_the_estimators_own_narrows_to_fit_the_lens_range(small_scope):
    sem = small_scope.sem
    sem.set_scan(pixel_size_m=10e-9)                   # WantsItsOwnPair: +-10 um here, its own +-5 um
    _walk_wd(sem, sem.limits.wd_max_m - 7e-6)
    est = WantsItsOwnPair([corr(0.1)], perturbation_range_m=(2.5e-6, 15e-6))
    res = autofocus(sem, est, AutofocusSettings(max_iterations=1))
    assert res.ok and est.asked == pytest.approx([7e-6])
    # no room for its own pair either: refused by the lens's limits as before, the start kept
    _walk_wd(sem, sem.limits.wd_max_m - 3e-6)
    wd0 = sem.get_wd_m()
    est = WantsItsOwnPair([corr(0.1)], perturbation_range_m=(2.5e-6, 15e-6))
    res = autofocus(sem, est, AutofocusSettings(max_iterations=1))
    assert res.outcome == "failed" and "working distance" in res.message and sem.get_wd_m() == wd0


def test_mapfost_refuses_frames_too_small_for_its_crop_before_any_frame(small_scope):
    pytest.importorskip("mapfost")
    from deepfocus.methods import MapfostEstimator
    sem = small_scope.sem
    sem.set_scan(pixel_size_m=10e-9, width_px=200, height_px=200, dwell_s=50e-9)
    res = autofocus(sem, MapfostEstimator(4e-3), AutofocusSettings(max_iterations=1))
    assert res.outcome == "failed" and "too small for MAPFoSt" in res.message and res.images_taken == 0
