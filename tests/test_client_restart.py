"""The Lazy Pirate client across a daemon crash and restart."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import zmq

from deepfocus.client import DaemonUnavailable, DeepFocusClient, RemoteEstimator
from deepfocus.service import protocol as P

try:
    from test_service_estimator import PowerRatioEstimator, image_pair
    from test_service_process import Daemon
except ImportError:
    from tests.test_service_estimator import PowerRatioEstimator, image_pair
    from tests.test_service_process import Daemon

pytestmark = pytest.mark.timeout(60)


def test_call_fails_clearly_while_daemon_is_down_and_same_client_recovers(tmp_path):
    addr = f"ipc://{tmp_path}/deepfocus.sock"
    minus, plus = image_pair(3.0, shape=(256, 256))
    expected = PowerRatioEstimator().estimate(minus, plus, 10e-9).wd_um
    remote = RemoteEstimator(addr, timeout_s=0.5, retries=2)
    try:
        with Daemon(bind=addr) as first:
            assert remote.estimate(minus, plus, 10e-9).wd_um == expected
            first.terminate(signal.SIGKILL)

            t0 = time.monotonic()
            with pytest.raises(DaemonUnavailable) as err:
                remote.estimate(minus, plus, 10e-9)
            elapsed = time.monotonic() - t0
        # three attempts of 0.5 s each, then a clear error naming the address
        assert 1.4 <= elapsed <= 3.0
        assert addr in str(err.value) and "not answering" in str(err.value)
        assert err.value.attempts == 3

        with Daemon(bind=addr):
            assert remote.estimate(minus, plus, 10e-9).wd_um == expected
    finally:
        remote.close()


def test_request_sent_before_the_daemon_starts_is_answered_by_a_retry(tmp_path):
    addr = f"ipc://{tmp_path}/late.sock"
    client = DeepFocusClient(addr, timeout_s=4.0, retries=3)
    daemons = []
    starter = threading.Timer(0.3, lambda: daemons.append(Daemon(bind=addr)))
    starter.start()
    try:
        t0 = time.monotonic()
        health = client.health()
        assert health["status"] == "ok" and time.monotonic() - t0 < 16
    finally:
        starter.join()
        client.close()
        for d in daemons:
            d.terminate()


def test_late_reply_to_an_abandoned_attempt_is_not_taken_for_the_next_answer():
    """A reply with another request's id must never be returned as this call's result."""
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    client = DeepFocusClient(f"tcp://127.0.0.1:{port}", timeout_s=2.0, retries=0)
    def serve_once() -> None:
        frames = fake.recv_multipart()
        ident, header = frames[0], frames[2]
        rid = json_id(header)
        # first a stale reply for some other request, then the real one
        fake.send_multipart([ident, b""] + P.encode_reply(P.Reply("stale-1", True, {"status": "x"})))
        fake.send_multipart([ident, b""] + P.encode_reply(P.Reply(rid, True, {"status": "ok"})))

    t = threading.Thread(target=serve_once)
    t.start()
    try:
        assert client.health()["status"] == "ok"
    finally:
        t.join(5)
        client.close()
        fake.close()


def json_id(header: bytes) -> str:
    import json

    return json.loads(header)["id"]
