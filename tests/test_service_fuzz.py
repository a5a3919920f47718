"""Thousands of malformed messages: each gets an error reply, the daemon keeps serving."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfocus.client import DeepFocusClient
from deepfocus.service import protocol as P

try:
    from test_service_estimator import image_pair
    from test_service_process import Daemon
except ImportError:
    from tests.test_service_estimator import image_pair
    from tests.test_service_process import Daemon

pytestmark = pytest.mark.timeout(90)

N_MESSAGES = 3000


def _hdr(**kw) -> bytes:
    h = {"v": 1, "id": "x", "op": "estimate", "params": {"pixel_size_m": 1e-8}}
    h.update(kw)
    return json.dumps(h).encode()


def _u16(rows: int, cols: int, rng: random.Random) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(16)) * (rows * cols * 2 // 16) + b"\0" * (
        rows * cols * 2 % 16)


def malformed_messages(seed: int, n: int):
    """A seeded stream of (kind, frames) that no daemon may accept."""
    rng = random.Random(seed)
    good = {"dtype": "uint16", "shape": [32, 32]}
    img = b"\x01\x02" * (32 * 32)
    f32_nan = np.full((32, 32), np.nan, np.float32).tobytes()
    f32_inf = np.where(np.arange(1024).reshape(32, 32) == 77, np.inf, 1.0).astype(np.float32)
    valid_header = _hdr(arrays=[good, good])
    kinds = [
        ("random frames", lambda: [rng.randbytes(rng.randint(1, 600))
                                   for _ in range(rng.randint(1, 5))]),
        ("truncated json", lambda: [valid_header[:rng.randint(1, len(valid_header) - 1)],
                                    img, img]),
        ("json not an object", lambda: [json.dumps(rng.choice(
            [[1, 2], "estimate", 42, None, True, 3.5])).encode()]),
        ("non-standard json", lambda: [b'{"v": 1, "op": "estimate", "params": '
                                       b'{"pixel_size_m": NaN}}', img, img]),
        ("not utf-8", lambda: [b'{"op": "\xff\xfe"}']),
        ("deeply nested", lambda: [b"[" * 100000 + b"]" * 100000]),
        ("oversized header", lambda: [b'{"op": "hello", "pad": "' + b"a" * 70000 + b'"}']),
        ("unknown op", lambda: [_hdr(op=rng.choice(["estimat", "", "EXEC", "__import__",
                                                    "x" * 500]))]),
        ("op not a string", lambda: [_hdr(op=rng.choice([1, None, ["hello"], {"a": 1}]))]),
        ("missing op", lambda: [json.dumps({"v": 1, "id": "m"}).encode()]),
        ("bad version", lambda: [_hdr(op="hello", v=rng.choice([0, 2, "1", None, 1.5]))]),
        ("bad id", lambda: [_hdr(op="hello", id=rng.choice([{"a": 1}, [1], 1.5, True,
                                                           "i" * 300]))]),
        ("params not an object", lambda: [_hdr(params=rng.choice([[1], "p", 3])), img, img]),
        ("bad timeout", lambda: [_hdr(arrays=[good, good], timeout_s=rng.choice(
            [-1, 0, "5", 1e9, [1]])), img, img]),
        ("bad dtype", lambda: [_hdr(arrays=[{"dtype": rng.choice(
            ["int64", "object", "<f8", "O", "|S10", 5, None, "uint16 "]), "shape": [32, 32]},
            good]), img, img]),
        ("bad shape", lambda: [_hdr(arrays=[{"dtype": "uint16", "shape": rng.choice(
            [[32], [32, 32, 1], [-32, 32], [32.0, 32], "32x32", None, [True, 32], [0, 0],
             [8, 8]])}, good]), img, img]),
        ("huge declared size", lambda: [_hdr(arrays=[{"dtype": "float32", "shape": rng.choice(
            [[10 ** 9, 10 ** 9], [2 ** 62, 2], [8193, 8193], [100000, 16]])}, good]),
            img, img]),
        ("shape bigger than buffer", lambda: [_hdr(arrays=[{"dtype": "uint16", "shape": [64, 64]},
                                                           {"dtype": "uint16", "shape": [64, 64]}]),
                                              img, img]),
        ("buffer bigger than shape", lambda: [_hdr(arrays=[good, good]), img + b"\0\0", img]),
        ("frames without descriptors", lambda: [_hdr(), img, img]),
        ("descriptors without frames", lambda: [_hdr(arrays=[good, good])]),
        ("too many arrays", lambda: [_hdr(arrays=[good] * 5)] + [img] * 5),
        ("nan image", lambda: [_hdr(arrays=[{"dtype": "float32", "shape": [32, 32]}] * 2),
                               f32_nan, f32_nan]),
        ("inf image", lambda: [_hdr(arrays=[{"dtype": "float32", "shape": [32, 32]}] * 2),
                               f32_inf.tobytes(), f32_inf.tobytes()]),
        ("one image", lambda: [_hdr(arrays=[good]), img]),
        ("shapes differ", lambda: [_hdr(arrays=[good, {"dtype": "uint16", "shape": [16, 64]}]),
                                   img, img]),
        ("bad pixel size", lambda: [_hdr(arrays=[good, good], params={"pixel_size_m": rng.choice(
            [-1e-8, 0, "10nm", None, 1e300, 1e-20, [1e-8]])}), img, img]),
        ("bad perturbation", lambda: [_hdr(arrays=[good, good], params={
            "pixel_size_m": 1e-8, "perturbation_m": rng.choice([-5e-6, 0, 1.0, "5um"])}),
            img, img]),
        ("bad options", lambda: [_hdr(arrays=[good, good], params={
            "pixel_size_m": 1e-8, "options": rng.choice([[1], "fast", {"no_such": 1}])}),
            img, img]),
        ("score with two images", lambda: [_hdr(op="score", arrays=[good, good]), img, img]),
        ("models bad action", lambda: [_hdr(op="models", params={"action": rng.choice(
            ["delete", "exec", 5, None])})]),
        ("models without name", lambda: [_hdr(op="models", params={"action": "activate"})]),
        ("models path escape", lambda: [_hdr(op="models", params={
            "action": "load", "name": rng.choice(["../../etc/passwd", "/etc/passwd", "a/b.pt"])})]),
        ("empty body", lambda: []),
        ("empty header frame", lambda: [b"", img]),
    ]
    for i in range(n):
        kind, make = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        yield kind, make()


def test_thousands_of_malformed_messages_each_get_an_error_reply():
    minus, plus = image_pair(-4.0, shape=(256, 256))
    with Daemon() as d:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(d.address)
        rss_after_warmup = None
        codes: dict[str, set[str]] = {}
        try:
            for i, (kind, frames) in enumerate(malformed_messages(seed=1234, n=N_MESSAGES)):
                sock.send_multipart([b""] + frames)
                assert sock.poll(5000), f"no reply to message {i} ({kind})"
                reply_frames = sock.recv_multipart()
                assert reply_frames[0] == b""
                rep = P.decode_reply(reply_frames[1:])
                assert not rep.ok, f"message {i} ({kind}) was accepted"
                assert rep.error_code and len(rep.error_message) > 10, (kind, rep)
                codes.setdefault(kind, set()).add(rep.error_code)
                if i == 500:
                    rss_after_warmup = d.rss_bytes()
            rss_end = d.rss_bytes()
        finally:
            sock.close()
        assert d.proc.poll() is None, "daemon died"
        # valid requests still work afterwards
        with DeepFocusClient(d.address, timeout_s=10, retries=0) as c:
            corr = c.estimate(minus, plus, 10e-9)
            health = c.health()
    assert corr.wd_um == pytest.approx(4.0, abs=1.5)
    assert health["errors"] >= N_MESSAGES * 0.5 and health["queue_depth"] == 0
    assert rss_end - rss_after_warmup < 16 * 2 ** 20, "memory grows with malformed messages"
    assert codes["unknown op"] == {"unknown_op"}
    assert codes["huge declared size"] == {"too_large"}
    assert codes["nan image"] == {"bad_array"}


def test_error_replies_echo_the_request_id_when_readable():
    from deepfocus.service import Server, ServerConfig

    srv = Server(ServerConfig(bind="tcp://127.0.0.1:0"))
    srv.start_in_thread()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.address)
    try:
        sock.send_multipart([b"", _hdr(id="abc-17", arrays=[{"dtype": "int64", "shape": [32, 32]}]),
                             b"\0" * 8192])
        assert sock.poll(5000)
        rep = P.decode_reply(sock.recv_multipart()[1:])
        assert rep.id == "abc-17" and rep.error_code == "bad_array" and "int64" in rep.error_message
        # a bare DEALER (no delimiter frame) is answered the same way
        sock.send_multipart([_hdr(id=7, op="nope")])
        assert sock.poll(5000)
        rep = P.decode_reply(sock.recv_multipart())
        assert rep.id == 7 and rep.error_code == "unknown_op"
    finally:
        sock.close()
        srv.stop()
        srv.join()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.sampled_from(
                               ["v", "id", "op", "params", "arrays", "timeout_s", "dtype",
                                "shape", "pixel_size_m", "x"]), kids, max_size=6),
                           max_leaves=20),
       frames=st.lists(st.binary(max_size=64), max_size=3))
def test_decoder_raises_only_protocol_errors(header, frames):
    raw = json.dumps(header).encode()
    try:
        req = P.decode_request([raw, *frames], P.Limits())
    except P.ProtocolError as exc:
        assert exc.message
    else:
        assert req.op in P.OPS
