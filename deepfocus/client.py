"""Client of the DeepFocus daemon, and ``RemoteEstimator``, a drop-in ``Estimator``.

The client follows ZeroMQ's Lazy Pirate pattern: send, poll for the reply with
a timeout, and when none comes close the socket (so nothing stale is left in
it), reconnect and resend, a bounded number of times; then raise
``DaemonUnavailable`` naming the address. Replies carry the request id, so a
late reply to an earlier attempt is recognised and discarded.

``autofocus(sem, RemoteEstimator(address))`` behaves like
``autofocus(sem, local_estimator)``: same inputs, same ``Correction``.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zmq

from .correction import Correction, Estimator, pair_perturbation_m
from .service import protocol as P

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


class DaemonUnavailable(ConnectionError):
    """The daemon did not answer: not running, wrong address, or too busy for the timeout."""

    def __init__(self, address: str, attempts: int, waited_s: float, timeout_s: float):
        self.address = address
        self.attempts = attempts
        self.waited_s = waited_s
        super().__init__(
            f"DeepFocus daemon at {address} is not answering: no reply after {attempts} "
            f"attempt(s) of {timeout_s:g} s ({waited_s:.1f} s in total). Is "
            f"'deepfocus serve --bind {address}' running on that machine?")


class RemoteError(RuntimeError):
    """The daemon answered with an error reply (bad input, no model, estimator failure...)."""

    def __init__(self, address: str, op: str, code: str, message: str):
        self.address = address
        self.op = op
        self.code = code
        super().__init__(f"DeepFocus daemon at {address} rejected '{op}' ({code}): {message}")


# what a daemon's hello says of the microscope its answers are for (RemoteEstimator.reset)
MICROSCOPE_KEYS = ("aperture_angle_mrad", "stig_units_per_um")


def microscope_of(hello: dict[str, Any]) -> dict[str, Any]:
    """The microscope a daemon's ``hello`` says its answers are for."""
    return {k: hello.get(k) for k in MICROSCOPE_KEYS}


def microscope_changes(now: dict[str, Any], before: dict[str, Any]) -> str:
    """How a daemon's microscope (``microscope_of``) differs from an earlier one; empty where it does not."""
    return ", ".join(f"{k} {now.get(k)} (was {before.get(k)})" for k in MICROSCOPE_KEYS
                     if now.get(k) != before.get(k))


@dataclass(frozen=True)
class CurveClientKeys:
    """CURVE key files for a daemon bound to a non-loopback address.

    ``server_public_key_file`` is the daemon's public ``.key`` file;
    ``client_secret_key_file`` is this client's ``.key_secret`` file, whose public
    half must be in the daemon's authorized keys directory.
    """
    server_public_key_file: Path
    client_secret_key_file: Path

    def apply(self, sock: zmq.Socket) -> None:
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(str(self.server_public_key_file))
        public, secret = zmq.auth.load_certificate(str(self.client_secret_key_file))
        if not secret:
            raise ValueError(f"{self.client_secret_key_file} holds no secret key; give the "
                             "client's '.key_secret' file")
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret


@dataclass
class Response:
    result: dict[str, Any]
    arrays: list[np.ndarray]
    round_trip_s: float
    attempts: int


class DeepFocusClient:
    """Requests to one daemon. Thread-safe: concurrent calls are serialised.

    ``timeout_s`` bounds each attempt, ``retries`` the number of resends, so a call
    gives up after at most ``(retries + 1) * timeout_s`` seconds.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = 10.0, retries: int = 2,
                 curve: CurveClientKeys | None = None, context: zmq.Context | None = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address = address
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._prefix = f"{os.getpid():x}-{uuid.uuid4().hex[:8]}"
        # what the daemon accepts: its defaults until ``hello`` tells this daemon's own
        self.limits = P.Limits()

    # -- socket lifecycle --------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Without this, a request sent while the daemon is down sits in the queue
        # and is delivered to the restarted daemon after we have given up on it.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.address)
        return sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._reset()

    def __enter__(self) -> "DeepFocusClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._reset()
        except Exception:
            pass

    # -- requests ----------------------------------------------------------------

    def request(self, op: str, params: dict[str, Any] | None = None,
                arrays: Sequence[np.ndarray] = (), timeout_s: float | None = None,
                retries: int | None = None) -> Response:
        """Send one request; returns its result or raises ``RemoteError``/``DaemonUnavailable``."""
        timeout = float(timeout_s if timeout_s is not None else self.timeout_s)
        tries = 1 + int(retries if retries is not None else self.retries)
        rid = f"{self._prefix}-{next(self._ids)}"
        # The daemon drops work still queued after this, since we will have given up on it.
        frames = P.encode_request(P.Request(id=rid, op=op, params=params or {},
                                            arrays=list(arrays), timeout_s=timeout))
        t_start = time.monotonic()
        with self._lock:
            for attempt in range(1, tries + 1):
                if self._sock is None:
                    self._sock = self._connect()
                t0 = time.monotonic()
                try:
                    self._sock.send_multipart([b""] + frames, copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:
                    # No connection (IMMEDIATE): the daemon is not there; wait out the
                    # attempt so the retry budget means time, not a tight loop.
                    self._wait_for_peer(t0 + timeout)
                    if not self._resend_if_connected(frames):
                        self._reset()
                        continue
                reply = self._await(rid, t0 + timeout)
                if reply is not None:
                    rt = time.monotonic() - t0
                    if not reply.ok:
                        raise RemoteError(self.address, op, reply.error_code, reply.error_message)
                    return Response(reply.result, reply.arrays, rt, attempt)
                self._reset()
        raise DaemonUnavailable(self.address, tries, time.monotonic() - t_start, timeout)

    def _wait_for_peer(self, until: float) -> None:
        assert self._sock is not None
        while time.monotonic() < until:
            if self._sock.poll(min(50, max(1, int((until - time.monotonic()) * 1000))),
                               zmq.POLLOUT):
                return

    def _resend_if_connected(self, frames: list[Any]) -> bool:
        assert self._sock is not None
        try:
            self._sock.send_multipart([b""] + frames, copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _await(self, rid: str, until: float) -> P.Reply | None:
        assert self._sock is not None
        while True:
            left_ms = int((until - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms, zmq.POLLIN):
                return None
            frames = self._sock.recv_multipart(copy=False)
            if frames and len(frames[0]) == 0:
                frames = frames[1:]
            try:
                reply = P.decode_reply(frames)
            except P.ProtocolError:
                continue  # not something this client sent for; keep waiting
            if reply.id == rid:
                return reply
            # A late answer to an abandoned attempt: ignore.

    # -- operations ----------------------------------------------------------------

    def hello(self, **kw: Any) -> dict[str, Any]:
        result = self.request("hello", **kw).result
        lim = result.get("limits")
        if isinstance(lim, dict):
            try:
                self.limits = P.Limits(**{k: v for k, v in lim.items() if k in P.Limits.__dataclass_fields__})
            except TypeError:
                pass                            # a daemon of another version: keep the defaults
        return result

    def health(self, **kw: Any) -> dict[str, Any]:
        return self.request("health", **kw).result

    def estimate(self, minus: np.ndarray, plus: np.ndarray, pixel_size_m: float,
                 perturbation_m: float | None = None, options: dict[str, Any] | None = None,
                 **kw: Any) -> Correction:
        params = _scan_params(pixel_size_m, perturbation_m)
        if options:
            params["options"] = options
        resp = self.request("estimate", params, [self._image(minus), self._image(plus)], **kw)
        corr = P.correction_from_result(resp.result)
        corr.timings_s = dict(corr.timings_s or {})
        corr.timings_s["round_trip"] = resp.round_trip_s
        return corr

    def score(self, image: np.ndarray, pixel_size_m: float, **kw: Any) -> dict[str, Any]:
        return self.request("score", _scan_params(pixel_size_m), [self._image(image)], **kw).result

    def check_frames(self, shape: tuple[int, int], pixel_size_m: float, perturbation_m: float | None = None,
                     **kw: Any) -> None:
        """Asks the daemon whether its active model answers pairs of frames of ``shape`` (rows, columns) at
        ``pixel_size_m``: ``RemoteError`` (``bad_request``, naming why) where it does not."""
        self.request("check", dict(_scan_params(pixel_size_m, perturbation_m), shape=[int(shape[0]), int(shape[1])]),
                     **kw)

    def models(self, action: str = "list", name: str | None = None, **kw: Any) -> dict[str, Any]:
        params: dict[str, Any] = {"action": action}
        if name is not None:
            params["name"] = name
        return self.request("models", params, **kw).result


    def _image(self, a: np.ndarray) -> np.ndarray:
        """``a`` as the daemon takes it, else ValueError naming why. Above the daemon's size limits its socket
        drops the message without a reply, and the client would wait out its timeouts and report the daemon
        unreachable: such an image is refused here, before sending."""
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"images must be 2-D, got shape {a.shape}")
        if a.dtype.name not in P.ALLOWED_DTYPES:
            raise ValueError(f"image dtype {a.dtype} cannot be sent; use one of "
                             f"{', '.join(P.ALLOWED_DTYPES)}")
        lim = self.limits
        if max(a.shape) > lim.max_side_px or a.nbytes > lim.max_array_bytes:
            raise ValueError(f"a {a.shape[1]} x {a.shape[0]} px {a.dtype} image ({a.nbytes / 1e6:.3g} MB) is more "
                             f"than the daemon at {self.address} takes (at most {lim.max_side_px} px a side and "
                             f"{lim.max_array_bytes / 1e6:.3g} MB): send a smaller frame or fewer bytes per pixel")
        return a


def _scan_params(pixel_size_m: float, perturbation_m: float | None = None) -> dict[str, Any]:
    """The request's pixel size and pair, checked here: a NaN would travel as JSON null, which the daemon reads as
    "not given"."""
    params: dict[str, Any] = {"pixel_size_m": _positive_m("pixel_size_m", pixel_size_m)}
    if perturbation_m is not None:
        params["perturbation_m"] = _positive_m("perturbation_m", perturbation_m)
    return params


def _positive_m(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive length in metres, got {value!r}")
    return v


class RemoteEstimator(Estimator):
    """An ``Estimator`` whose inference runs in the daemon at ``address``."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = 10.0, retries: int = 2,
                 options: dict[str, Any] | None = None, perturbation_m: float | None = None,
                 curve: CurveClientKeys | None = None, client: DeepFocusClient | None = None):
        self.client = client or DeepFocusClient(address, timeout_s, retries, curve)
        self.address = self.client.address
        self.options = dict(options or {})
        self._perturbation_m = perturbation_m
        self._pinned = perturbation_m is not None
        self._hello: dict[str, Any] | None = None

    def reset(self) -> None:
        """At the start of every autofocus run: the daemon's ``hello`` asked again, since a daemon restarted in
        the meantime may serve another model. One restarted for another microscope (another aperture angle or
        stigmator calibration than at the first run) is refused: its stigmator answers would be in another
        microscope's units, which the loop would find out only after several diverging steps."""
        fresh = self.client.hello()
        changed = microscope_changes(microscope_of(fresh), microscope_of(self._hello)) if self._hello else ""
        if changed:
            raise ValueError(f"the DeepFocus daemon at {self.address} now answers for another microscope: {changed}; "
                             "it was restarted with another profile. Restart it with this microscope's profile, or "
                             "start a new loop if the change was meant")
        self._hello = fresh
        if not self._pinned:
            self._perturbation_m = None         # the active model's pair, as the daemon now says

    def _described(self) -> dict[str, Any]:
        """The daemon's ``hello`` (its active model's pair offsets and answers), asked once and remembered."""
        if self._hello is None:
            self._hello = self.client.hello()
        return self._hello

    @property  # type: ignore[override]
    def perturbation_m(self) -> float:
        """The pair offset the daemon's active model expects (unless set here)."""
        if self._perturbation_m is None:
            value = self._described().get("perturbation_m")
            self._perturbation_m = float(value) if value else Estimator.perturbation_m
        return self._perturbation_m

    @perturbation_m.setter
    def perturbation_m(self, value: float) -> None:
        self._perturbation_m = float(value)
        self._pinned = True

    def pair_perturbation_m(self, pixel_size_m: float | None = None) -> float:
        """The pair to take on frames of ``pixel_size_m``: the one set here, else the one the daemon's active model
        wants on the beam of the microscope the daemon was started for (``correction.pair_perturbation_m``)."""
        own = self.perturbation_m
        if self._pinned:
            return own
        h = self._described()
        return pair_perturbation_m(own, h.get("perturbation_range_m"), h.get("alpha_ref_mrad"),
                                   h.get("aperture_angle_mrad"), pixel_size_m)

    @property
    def perturbation_range_m(self) -> tuple[float, float]:
        """The pair offsets the daemon's active model answers (any, from a daemon that does not say)."""
        value = self._described().get("perturbation_range_m")
        return (float(value[0]), float(value[1])) if value else (0.0, float("inf"))

    @property  # type: ignore[override]
    def stig_shares_wd_scale(self) -> bool:
        """Whether the daemon's active model scales its stigmator answers with its wd answers (no, from a daemon
        that does not say)."""
        return bool(self._described().get("stig_shares_wd_scale"))

    def estimate(self, minus: np.ndarray, plus: np.ndarray, pixel_size_m: float,
                 perturbation_m: float | None = None) -> Correction:
        return self.client.estimate(minus, plus, pixel_size_m, perturbation_m,
                                    options=self.options or None)

    def check_frames(self, shape: tuple[int, int], pixel_size_m: float, perturbation_m: float) -> None:
        """The daemon's model asked before the loop's first pair (``Estimator.check_frames``); a daemon that
        predates the question is taken to answer every scan, as before."""
        if "check" not in (self._described().get("capabilities") or ()):
            return
        try:
            self.client.check_frames(shape, pixel_size_m, perturbation_m)
        except RemoteError as exc:          # a scan it cannot answer, or no model active: the loop refuses
            raise ValueError(str(exc)) from None

    def score(self, image: np.ndarray, pixel_size_m: float) -> dict[str, Any]:
        return self.client.score(image, pixel_size_m)

    def close(self) -> None:
        self.client.close()
