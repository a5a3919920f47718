"""``autofocus(sem, RemoteEstimator(addr))`` behaves exactly like the in-process estimator."""
from __future__ import annotations

import pytest

autofocus_mod = pytest.importorskip("deepfocus.autofocus")

from hardware.factory import open_microscope  # noqa: E402
from hardware.sem import ScanSettings  # noqa: E402

from deepfocus.client import RemoteEstimator  # noqa: E402
from deepfocus.service import Server, ServerConfig  # noqa: E402

try:
    from test_service_estimator import PowerRatioEstimator
except ImportError:
    from tests.test_service_estimator import PowerRatioEstimator

pytestmark = pytest.mark.timeout(60)


def _estimator() -> PowerRatioEstimator:
    # about the simulated probe's blur per um of defocus at 10 nm pixels
    return PowerRatioEstimator(blur_px_per_um=0.2, patch_px=128)


def _microscope():
    m = open_microscope("setup_a", ["seed=7"])
    m.sem.set_wd_m(m.sim.true_wd_m() + 6e-6)
    return m


def test_remote_and_local_estimators_drive_the_same_closed_loop():
    settings = autofocus_mod.AutofocusSettings(
        max_iterations=2, max_uncertainty_wd_m=1.0, max_uncertainty_stig=1e3,
        scan=ScanSettings(width_px=384, height_px=256))
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:0"), estimator=_estimator())
    srv.start_in_thread()
    remote = RemoteEstimator(srv.address, timeout_s=20, retries=0)
    try:
        a, b = _microscope(), _microscope()
        local_run = autofocus_mod.autofocus(a.sem, _estimator(), settings)
        remote_run = autofocus_mod.autofocus(b.sem, remote, settings)
    finally:
        remote.close()
        srv.stop()
        srv.join()
    assert remote_run.outcome == local_run.outcome
    assert remote_run.iterations == local_run.iterations == 2
    assert [t.correction["wd_um"] for t in remote_run.trace] == \
        [t.correction["wd_um"] for t in local_run.trace]
    assert remote_run.final_wd_m == local_run.final_wd_m
    assert remote_run.final_stig == local_run.final_stig
    # and the loop did focus: from 6 um off to within 1.5 um
    assert abs(remote_run.final_wd_m - b.sim.true_wd_m()) < 1.5e-6


def test_through_the_daemon_a_pair_far_beyond_the_models_range_is_taken_again_at_the_far_perturbation():
    # the daemon says which perturbations its model answers, and passes on why it refused a pair
    from deepfocus.model_files import load_estimator_for
    m = open_microscope("setup_a")
    m.sem.set_scan(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=50e-9)
    m.sem.set_wd_m(m.sim.true_wd_m() - 90e-6)
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:0"), estimator=load_estimator_for(m.config, device="cpu"))
    srv.start_in_thread()
    remote = RemoteEstimator(srv.address, timeout_s=20, retries=0)
    try:
        res = autofocus_mod.autofocus(m.sem, remote, autofocus_mod.AutofocusSettings.from_config(
            m.config.autofocus, max_iterations=6))
    finally:
        remote.close()
        srv.stop()
        srv.join()
    assert res.ok, res.message
    assert [r.far for r in res.trace][:2] == [False, True]
    assert abs(res.final_wd_m - m.sim.true_wd_m()) < 1e-6


def test_through_the_daemon_the_pair_is_the_one_its_model_wants_on_its_microscopes_beam():
    # a daemon started for a 2 mrad microscope: the client takes the pair at +-10 um on 10 nm frames
    from deepfocus.model_files import load_estimator
    srv = Server(ServerConfig(bind="tcp://127.0.0.1:0"),
                 estimator=load_estimator(device="cpu", aperture_angle_mrad=2.0))
    srv.start_in_thread()
    remote = RemoteEstimator(srv.address, timeout_s=20, retries=0)
    pinned = RemoteEstimator(srv.address, timeout_s=20, retries=0, perturbation_m=5e-6)
    try:
        assert remote.pair_perturbation_m(10e-9) == pytest.approx(10e-6)
        assert remote.pair_perturbation_m(5e-9) == pytest.approx(5e-6)
        assert pinned.pair_perturbation_m(10e-9) == pytest.approx(5e-6)      # set here: that one
    finally:
        remote.close()
        pinned.close()
        srv.stop()
        srv.join()


def test_a_daemon_unreachable_before_the_first_pair_ends_the_loop_failed_with_nothing_moved(tmp_path):
    # an operator's scheduler relies on the outcome: "failed" with the reason, never an exception out of autofocus
    m = _microscope()
    start_wd, start_stig = m.sem.get_wd_m(), m.sem.get_stig()
    remote = RemoteEstimator(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.3, retries=0)
    try:
        res = autofocus_mod.autofocus(m.sem, remote, autofocus_mod.AutofocusSettings(
            scan=ScanSettings(width_px=384, height_px=256)))
    finally:
        remote.close()
    assert res.outcome == "failed" and "DaemonUnavailable" in res.message and "not answering" in res.message
    assert res.images_taken == 0 and m.sem.get_wd_m() == start_wd and m.sem.get_stig() == start_stig


def test_a_daemon_restarted_for_another_microscope_is_refused_at_the_next_run(tmp_path):
    from deepfocus.calibration import StigCalibration

    def daemon(units_per_um):
        est = _estimator()
        est.calibration, est.aperture_angle_mrad = StigCalibration(units_per_um), 4.0
        srv = Server(ServerConfig(bind=f"ipc://{tmp_path}/daemon.sock"), estimator=est)
        srv.start_in_thread()
        return srv

    settings = autofocus_mod.AutofocusSettings(max_iterations=1, max_uncertainty_wd_m=1.0,
                                               max_uncertainty_stig=1e3, scan=ScanSettings(width_px=384, height_px=256))
    remote = RemoteEstimator(f"ipc://{tmp_path}/daemon.sock", timeout_s=5, retries=1)
    try:
        srv = daemon(((0.5, 0.0), (0.0, 0.5)))
        m = _microscope()
        assert autofocus_mod.autofocus(m.sem, remote, settings).images_taken == 2
        srv.stop()
        srv.join()
        # restarted with the same profile: the loop goes on
        srv = daemon(((0.5, 0.0), (0.0, 0.5)))
        assert autofocus_mod.autofocus(m.sem, remote, settings).images_taken == 2
        srv.stop()
        srv.join()
        # restarted with another microscope's stigmator calibration: refused before any frame, nothing moved
        srv = daemon(((0.0, 0.8), (-0.8, 0.0)))
        wd = m.sem.get_wd_m()
        res = autofocus_mod.autofocus(m.sem, remote, settings)
        srv.stop()
        srv.join()
    finally:
        remote.close()
    assert res.outcome == "failed" and res.images_taken == 0 and m.sem.get_wd_m() == wd
    assert "now answers for another microscope: stig_units_per_um" in res.message
