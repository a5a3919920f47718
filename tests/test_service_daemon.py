"""The daemon in-process: operations, concurrency, deadlines, model swaps, bind policy."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import zmq

from deepfocus.client import DeepFocusClient, RemoteError, RemoteEstimator
from deepfocus.service import Server, ServerConfig, ServiceConfigError, is_loopback
from deepfocus.service import protocol as P
from deepfocus.service.server import CurveServerKeys

try:
    from test_service_estimator import PowerRatioEstimator, image_pair
except ImportError:  # tests collected as a package
    from tests.test_service_estimator import PowerRatioEstimator, image_pair

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def serve():
    """Start daemons on ephemeral loopback ports; all are stopped afterwards."""
    servers = []

    def start(estimator=None, **cfg):
        cfg.setdefault("bind", "tcp://127.0.0.1:0")
        loader = cfg.pop("loader", _json_loader)
        srv = Server(ServerConfig(**cfg), estimator=estimator, loader=loader)
        srv.start_in_thread()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()
    for srv in servers:
        srv.join()


def _json_loader(path: Path, device: str) -> PowerRatioEstimator:
    """Model files in these tests are JSON parameter sets for the power-ratio estimator."""
    spec = json.loads(path.read_text())
    return PowerRatioEstimator(model_id=path.name, **spec)


def test_hello_and_health_describe_the_daemon(serve):
    srv = serve(PowerRatioEstimator())
    with DeepFocusClient(srv.address, timeout_s=5) as c:
        hello = c.hello()
        health = c.health()
    assert hello["protocol"] == P.PROTOCOL_VERSION
    assert {"hello", "health", "estimate", "score", "models"} <= set(hello["capabilities"])
    assert hello["active_model"] == "builtin" and hello["perturbation_m"] == 5e-6
    assert health["status"] == "ok" and health["queue_depth"] == 0


def test_the_loop_learns_the_daemons_perturbation_range_and_refuses_outside_it(serve, scope):
    from deepfocus.autofocus import AutofocusSettings, autofocus
    est = PowerRatioEstimator()
    est.perturbation_range_m = (2.5e-6, 15e-6)
    srv = serve(est)
    remote = RemoteEstimator(srv.address, timeout_s=5)
    try:
        assert remote.perturbation_range_m == (2.5e-6, 15e-6)
        frames0 = scope.sim.frames_taken
        res = autofocus(scope.sem, remote, AutofocusSettings(perturbation_m=20e-6))
    finally:
        remote.close()
    assert res.outcome == "failed" and "2.5-15 um" in res.message
    assert scope.sim.frames_taken == frames0 and est.calls == 0


class _WantsLargeFrames(PowerRatioEstimator):
    """Answers frames of at least 256 px a side, and says so when asked before."""

    def check_frames(self, shape, pixel_size_m, perturbation_m):
        if min(shape) < 256:
            raise ValueError(f"frames of {shape[1]} x {shape[0]} px are too small: need at least 256 px per side")


def test_through_the_daemon_a_scan_its_model_cannot_answer_is_refused_before_the_first_pair(serve, scope):
    from deepfocus.autofocus import AutofocusSettings, autofocus
    est = _WantsLargeFrames()
    srv = serve(est)
    remote = RemoteEstimator(srv.address, timeout_s=5)
    try:
        assert "check" in remote._described()["capabilities"]
        with DeepFocusClient(srv.address, timeout_s=5, retries=0) as c:
            c.check_frames((256, 512), 10e-9)                                    # answered: nothing raised
            with pytest.raises(RemoteError, match="bad_request.*512 x 128 px are too small") as err:
                c.check_frames((128, 512), 10e-9, 5e-6)
            assert err.value.code == "bad_request"
            with pytest.raises(RemoteError, match="'shape' must be \\[rows, columns\\]"):
                c.request("check", {"shape": [128], "pixel_size_m": 1e-8})
        scope.sem.set_scan(pixel_size_m=10e-9, width_px=512, height_px=128, dwell_s=50e-9)
        frames0 = scope.sim.frames_taken
        res = autofocus(scope.sem, remote, AutofocusSettings(max_iterations=2))
        assert res.outcome == "failed" and "512 x 128 px are too small" in res.message
        assert scope.sim.frames_taken == frames0 and res.dose_e_per_nm2 == 0 and est.calls == 0
        # a scan it answers runs as before
        scope.sem.set_scan(pixel_size_m=10e-9, width_px=256, height_px=256, dwell_s=50e-9)
        assert autofocus(scope.sem, remote, AutofocusSettings(max_iterations=1)).images_taken == 2
    finally:
        remote.close()


def test_the_client_learns_whether_the_daemons_stigmator_answers_share_the_wd_scale(serve):
    # the loop divides the stigmator steps by its learned wd gain only for estimators that say so (DeepFocus)
    est = PowerRatioEstimator()
    for says in (False, True):
        est.stig_shares_wd_scale = says
        srv = serve(est)
        remote = RemoteEstimator(srv.address, timeout_s=5)
        try:
            assert remote.stig_shares_wd_scale is says
        finally:
            remote.close()


def test_remote_estimate_equals_in_process_estimate(serve):
    est = PowerRatioEstimator()
    srv = serve(est)
    minus, plus = image_pair(-6.0, seed=5)
    local = PowerRatioEstimator().estimate(minus, plus, 10e-9, 5e-6)
    remote = RemoteEstimator(srv.address, timeout_s=10)
    try:
        got = remote.estimate(minus, plus, 10e-9, 5e-6)
    finally:
        remote.close()
    assert got.wd_um == local.wd_um and got.stig_x == local.stig_x and got.stig_y == local.stig_y
    assert got.uncertainty_wd_um == local.uncertainty_wd_um
    assert got.model_id == "power-ratio" and got.n_patches == local.n_patches
    assert got.timings_s["round_trip"] >= got.timings_s["estimate"] > 0


def test_four_concurrent_clients_get_their_own_answers(serve):
    srv = serve(PowerRatioEstimator(patch_px=128))
    defocus = [-7.0, -2.5, 3.0, 6.5]
    pairs = [image_pair(z, shape=(256, 384), seed=10 + i) for i, z in enumerate(defocus)]
    expected = [PowerRatioEstimator(patch_px=128).estimate(m, p, 10e-9).wd_um for m, p in pairs]
    got: dict[int, list[float]] = {i: [] for i in range(4)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        try:
            with DeepFocusClient(srv.address, timeout_s=20, retries=0) as c:
                barrier.wait()
                for _ in range(6):
                    got[i].append(c.estimate(*pairs[i], 10e-9).wd_um)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in range(4):
        assert got[i] == [expected[i]] * 6, f"client {i} got another client's answer"


def test_health_is_answered_while_a_long_estimate_runs(serve):
    srv = serve(PowerRatioEstimator(delay_s=1.5, patch_px=128))
    minus, plus = image_pair(3.0, shape=(256, 256))
    done = threading.Event()

    def long_call() -> None:
        with DeepFocusClient(srv.address, timeout_s=10, retries=0) as c:
            c.estimate(minus, plus, 10e-9)
        done.set()

    t = threading.Thread(target=long_call)
    t.start()
    time.sleep(0.3)
    with DeepFocusClient(srv.address, timeout_s=1.0, retries=0) as c:
        t0 = time.monotonic()
        health = c.health()
        elapsed = time.monotonic() - t0
    assert health["busy_s"] > 0 and elapsed < 0.5
    assert not done.is_set()
    t.join(10)
    assert done.is_set()


def test_work_past_its_deadline_is_dropped_not_run(serve):
    est = PowerRatioEstimator(delay_s=0.6, patch_px=128)
    srv = serve(est)
    minus, plus = image_pair(3.0, shape=(256, 256))
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.address)
    try:
        for i in range(3):
            frames = P.encode_request(P.Request(id=f"r{i}", op="estimate",
                                                params={"pixel_size_m": 1e-8},
                                                arrays=[minus, plus], timeout_s=0.3))
            sock.send_multipart([b""] + frames)
        replies = {}
        for _ in range(3):
            assert sock.poll(5000)
            rep = P.decode_reply(sock.recv_multipart()[1:])
            replies[rep.id] = rep
    finally:
        sock.close()
    assert replies["r0"].ok
    assert [replies[k].error_code for k in ("r1", "r2")] == ["deadline_exceeded"] * 2
    assert est.calls == 1


def test_model_swap_keeps_queued_requests_and_switches_in_order(serve, tmp_path):
    (tmp_path / "a.pt").write_text(json.dumps({"blur_px_per_um": 0.6, "patch_px": 128,
                                               "delay_s": 0.1}))
    (tmp_path / "b.pt").write_text(json.dumps({"blur_px_per_um": 0.3, "patch_px": 128,
                                               "delay_s": 0.1}))
    (tmp_path / "notes.txt").write_text("not a model")
    srv = serve(models_dir=tmp_path, model="a.pt")
    minus, plus = image_pair(4.0, shape=(256, 256))
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.address)
    order = []
    try:
        def send(rid, op, params, arrays=()):
            order.append(rid)
            sock.send_multipart([b""] + P.encode_request(P.Request(rid, op, params, list(arrays))))

        for i in range(4):
            send(f"e{i}", "estimate", {"pixel_size_m": 1e-8}, (minus, plus))
        send("swap", "models", {"action": "activate", "name": "b.pt"})
        for i in range(4, 8):
            send(f"e{i}", "estimate", {"pixel_size_m": 1e-8}, (minus, plus))
        replies = {}
        while len(replies) < len(order):
            assert sock.poll(10000), f"missing replies: {set(order) - set(replies)}"
            rep = P.decode_reply(sock.recv_multipart()[1:])
            replies[rep.id] = rep
    finally:
        sock.close()
    assert all(r.ok for r in replies.values()), {k: r.error_message for k, r in replies.items()}
    assert [replies[f"e{i}"].result["model_id"] for i in range(8)] == ["a.pt"] * 4 + ["b.pt"] * 4
    assert replies["swap"].result["active"] == "b.pt"
    assert replies["swap"].result["available"] == ["a.pt", "b.pt"]
    # a model with half the blur per um reads the same images as four times the defocus
    wd_a, wd_b = replies["e0"].result["wd_um"], replies["e4"].result["wd_um"]
    assert wd_b == pytest.approx(4 * wd_a, rel=1e-6)


def test_models_errors_name_the_problem(serve, tmp_path):
    (tmp_path / "broken.pt").write_text("{not json")
    srv = serve(PowerRatioEstimator(), models_dir=tmp_path)
    with DeepFocusClient(srv.address, timeout_s=5, retries=0) as c:
        with pytest.raises(RemoteError, match="no model named 'missing.pt'.*broken.pt"):
            c.models("activate", "missing.pt")
        with pytest.raises(RemoteError, match="loading broken.pt failed"):
            c.models("load", "broken.pt")
        with pytest.raises(RemoteError, match="no model named '../etc/passwd'"):
            c.models("activate", "../etc/passwd")
        # the daemon still serves with the model it had
        assert c.models()["active"] == "builtin"
        assert c.health()["status"] == "ok"


def test_without_a_model_estimate_says_so(serve):
    srv = serve()
    minus, plus = image_pair(1.0, shape=(128, 128))
    with DeepFocusClient(srv.address, timeout_s=5, retries=0) as c:
        assert c.health()["status"] == "no_model"
        with pytest.raises(RemoteError, match="no model is active"):
            c.estimate(minus, plus, 1e-8)


def test_estimator_exception_is_an_error_reply_and_daemon_continues(serve):
    srv = serve(PowerRatioEstimator(patch_px=256))
    small = image_pair(1.0, shape=(64, 64))  # smaller than one patch: the estimator raises
    ok = image_pair(1.0, shape=(256, 256))
    with DeepFocusClient(srv.address, timeout_s=5, retries=0) as c:
        with pytest.raises(RemoteError, match="bad_request.*smaller than one 256 px patch"):
            c.estimate(*small, 1e-8)
        with pytest.raises(RemoteError, match="option.*'n_pairs'"):
            c.estimate(*ok, 1e-8, options={"n_pairs": 3})
        assert c.estimate(*ok, 1e-8, options={"max_patches": 1}).n_patches == 1


class _BrokenEstimator(PowerRatioEstimator):
    def estimate(self, minus, plus, pixel_size_m, perturbation_m=None):
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_an_estimator_fault_is_told_apart_from_bad_input_and_the_daemon_continues(serve):
    srv = serve(_BrokenEstimator())
    with DeepFocusClient(srv.address, timeout_s=5, retries=0) as c:
        with pytest.raises(RemoteError, match="estimator_failed.*RuntimeError: CUDA error") as err:
            c.estimate(*image_pair(1.0, shape=(256, 256)), 1e-8)
        assert err.value.code == "estimator_failed"
        health = c.health()
        assert health["status"] == "ok" and health["completed"] == health["failed"] == 1


def test_the_client_refuses_what_the_daemon_would_misread_or_drop(serve):
    srv = serve(PowerRatioEstimator(patch_px=256))
    pair = image_pair(1.0, shape=(256, 256))
    with DeepFocusClient(srv.address, timeout_s=5, retries=0) as c:
        # a NaN travels as JSON null, which means "not given": the model's own pair would be assumed
        for bad in (float("nan"), 0.0, -5e-6):
            with pytest.raises(ValueError, match="perturbation_m must be a positive length"):
                c.estimate(*pair, 1e-8, bad)
        with pytest.raises(ValueError, match="pixel_size_m must be a positive length"):
            c.estimate(*pair, float("nan"))
        # beyond the daemon's size limit its socket drops the connection without a reply: said before sending
        c.hello()
        assert c.limits.max_side_px == P.Limits().max_side_px
        c.limits = P.Limits(max_array_bytes=200_000)
        with pytest.raises(ValueError, match=r"256 x 256 px float64 image \(0.524 MB\) is more than the daemon"):
            c.estimate(pair[0].astype("float64"), pair[1].astype("float64"), 1e-8)
        assert c.estimate(*pair, 1e-8).status == "ok"


def test_score_runs_the_active_models_score(serve):
    srv = serve(PowerRatioEstimator())
    sharp, _ = image_pair(5.0, shape=(256, 256))  # minus image: 0 um from focus
    _, blurred = image_pair(5.0, shape=(256, 256))  # plus image: 10 um from focus
    with DeepFocusClient(srv.address, timeout_s=5) as c:
        s_sharp, s_blur = c.score(sharp, 1e-8)["score"], c.score(blurred, 1e-8)["score"]
    assert s_sharp < s_blur


def test_non_loopback_bind_requires_curve_keys():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("ipc:///tmp/x")
    assert is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:5")
    assert not is_loopback("tcp://*:5555") and not is_loopback("tcp://0.0.0.0:5555")
    assert not is_loopback("tcp://eth0:5555") and not is_loopback("tcp://192.168.1.7:5555")
    with pytest.raises(ServiceConfigError, match="requires CURVE keys"):
        Server(ServerConfig(bind="tcp://0.0.0.0:5555"))


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_daemon_serves_authorized_clients_only(serve, tmp_path):
    import zmq.auth

    from deepfocus.client import CurveClientKeys, DaemonUnavailable

    keys, allowed, other = tmp_path / "keys", tmp_path / "allowed", tmp_path / "other"
    for d in (keys, allowed, other):
        d.mkdir()
    server_pub, server_sec = zmq.auth.create_certificates(keys, "server")
    client_pub, client_sec = zmq.auth.create_certificates(keys, "client")
    _, stranger_sec = zmq.auth.create_certificates(other, "stranger")
    Path(client_pub).rename(allowed / "client.key")
    srv = serve(PowerRatioEstimator(), curve=CurveServerKeys(Path(server_sec), allowed))
    good = DeepFocusClient(srv.address, timeout_s=3, retries=0,
                           curve=CurveClientKeys(Path(server_pub), Path(client_sec)))
    bad = DeepFocusClient(srv.address, timeout_s=0.5, retries=0,
                          curve=CurveClientKeys(Path(server_pub), Path(stranger_sec)))
    plain = DeepFocusClient(srv.address, timeout_s=0.5, retries=0)
    try:
        assert good.health()["status"] == "ok"
        for c in (bad, plain):
            with pytest.raises(DaemonUnavailable):
                c.health()
    finally:
        for c in (good, bad, plain):
            c.close()


def test_busy_reply_when_queue_is_full(serve):
    srv = serve(PowerRatioEstimator(delay_s=0.3, patch_px=128), queue_size=1)
    minus, plus = image_pair(3.0, shape=(128, 128))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.address)
    try:
        for i in range(4):
            sock.send_multipart([b""] + P.encode_request(P.Request(
                f"q{i}", "estimate", {"pixel_size_m": 1e-8}, [minus, plus])))
        codes = []
        for _ in range(4):
            assert sock.poll(5000)
            rep = P.decode_reply(sock.recv_multipart()[1:])
            codes.append("ok" if rep.ok else rep.error_code)
    finally:
        sock.close()
    # one runs, at most one waits; the rest are refused at once rather than queued without bound
    assert codes.count("busy") >= 2 and codes.count("ok") >= 1
    assert codes.count("ok") + codes.count("busy") == 4


def test_an_address_already_in_use_is_reported_as_such(serve):
    first = serve(PowerRatioEstimator())
    second = Server(ServerConfig(bind=first.address), estimator=PowerRatioEstimator())
    with pytest.raises(zmq.ZMQError, match="Address already in use"):
        second.serve_forever()
