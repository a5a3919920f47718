"""The DeepFocus daemon: a ZeroMQ ROUTER socket in front of an inference worker.

The socket thread parses and validates every message, answers ``hello`` and
``health`` itself (so they are answered while a long estimate runs), and queues
``estimate``, ``score``, ``models`` and ``check`` (whether the active model
answers frames of a shape and pixel size, asked before a loop's first pair)
for the worker. Every message that cannot
be served gets an error reply naming the problem; nothing a client sends can
stop the daemon.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from ..correction import Estimator
from . import protocol as P
from .worker import Job, ModelLoader, ModelRegistry, Worker, default_model_loader

log = logging.getLogger("deepfocus.service")

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


class ServiceConfigError(ValueError):
    """A daemon configuration that must not be started (e.g. an open port without keys)."""


@dataclass
class CurveServerKeys:
    """CURVE keys from files made by ``zmq.auth.create_certificates``.

    ``secret_key_file`` is the daemon's ``.key_secret`` file; ``authorized_keys_dir``
    holds the public ``.key`` files of the clients allowed to connect.
    """
    secret_key_file: Path
    authorized_keys_dir: Path

    def load(self) -> tuple[bytes, bytes]:
        import zmq.auth

        if not zmq.has("curve"):
            raise ServiceConfigError("this libzmq was built without CURVE support")
        if not Path(self.secret_key_file).is_file():
            raise ServiceConfigError(f"CURVE secret key file {self.secret_key_file} does not exist")
        if not Path(self.authorized_keys_dir).is_dir():
            raise ServiceConfigError(f"CURVE authorized keys directory {self.authorized_keys_dir} "
                                     "does not exist")
        public, secret = zmq.auth.load_certificate(str(self.secret_key_file))
        if not secret:
            raise ServiceConfigError(f"{self.secret_key_file} holds no secret key; give the "
                                     "'.key_secret' file, not the public '.key'")
        return public, secret


@dataclass
class ServerConfig:
    bind: str = DEFAULT_ADDRESS
    device: str = "cpu"
    models_dir: Path | None = None
    model: str | None = None
    curve: CurveServerKeys | None = None
    limits: P.Limits = field(default_factory=P.Limits)
    queue_size: int = 64
    poll_interval_s: float = 0.25


def _units_per_um(est: Any) -> list[list[float]] | None:
    calibration = getattr(est, "calibration", None)
    matrix = getattr(calibration, "units_per_um", None)
    return [[float(v) for v in row] for row in matrix] if matrix is not None else None


def is_loopback(address: str) -> bool:
    """True when ``address`` can only be reached from this machine."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = urlsplit("//" + rest).hostname or ""
    if host == "localhost":
        return True
    if host in ("*", ""):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        # an interface name such as eth0 reaches the network
        return False


class Server:
    """One daemon; ``serve_forever()`` blocks until ``stop()`` or a signal."""

    def __init__(self, config: ServerConfig, estimator: Estimator | None = None,
                 estimator_name: str = "builtin", loader: ModelLoader = default_model_loader,
                 context: zmq.Context | None = None):
        if not is_loopback(config.bind) and config.curve is None:
            raise ServiceConfigError(
                f"refusing to bind {config.bind}: it is reachable from other machines, which "
                "requires CURVE keys (--curve-secret-key FILE and --curve-authorized-keys DIR); "
                "bind tcp://127.0.0.1:PORT to serve this machine only")
        self.config = config
        self.registry = ModelRegistry(config.models_dir, loader=loader, device=config.device)
        if estimator is not None:
            self.registry.add(estimator_name, estimator)
        if config.model:
            self.registry.activate(config.model)
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self._stop = threading.Event()
        self._started = threading.Event()
        self.address: str | None = None
        self.started_s = time.monotonic()
        self.stats = {"requests": 0, "errors": 0, "busy": 0}
        self._auth = None

    # -- lifecycle ----------------------------------------------------------------

    def start_in_thread(self, timeout_s: float = 10.0) -> threading.Thread:
        """Serve from a background thread; returns once bound (``self.address`` is set)."""
        errors: list[BaseException] = []

        def target() -> None:
            try:
                self.serve_forever()
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
                self._started.set()

        t = threading.Thread(target=target, name="deepfocus-server", daemon=True)
        t.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"daemon did not bind {self.config.bind} within {timeout_s} s")
        if errors:
            raise errors[0]
        self._thread = t
        return t

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float = 10.0) -> None:
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join(timeout_s)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            log.info("signal received, shutting down",
                     extra={"fields": {"signal": signal.Signals(signum).name}})
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def serve_forever(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        # Unroutable replies (client gone) are dropped silently rather than raising.
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes())
        if self.config.curve is not None:
            self._enable_curve(router)
        replies = self.ctx.socket(zmq.PAIR)
        replies.setsockopt(zmq.LINGER, 0)
        reply_endpoint = f"inproc://deepfocus-replies-{id(self)}"
        replies.bind(reply_endpoint)
        worker = Worker(self.ctx, reply_endpoint, self.registry, self.config.queue_size)
        self.worker = worker
        try:
            router.bind(self.config.bind)
            self.address = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            worker.start()
            worker.ready.wait(5.0)
            log.info("serving", extra={"fields": {
                "address": self.address, "device": self.config.device,
                "curve": self.config.curve is not None, "pid": os.getpid(),
                "models": self.registry.describe()}})
            self._started.set()
            self._loop(router, replies, worker)
        finally:
            for job in worker.drain():
                router.send_multipart(job.envelope + P.error_reply(
                    job.request.id, "shutting_down", "the daemon is shutting down; the request "
                    "was not run"))
            worker.stop()
            if worker.is_alive():           # not started where the bind failed: its error is the one to report
                worker.join(30.0)
            # Replies the worker finished while we were stopping still go out.
            while replies.poll(0):
                router.send_multipart(replies.recv_multipart(copy=False), copy=False)
            router.close(linger=200)
            replies.close()
            if self._auth is not None:
                self._auth.stop()
            if self._own_ctx:
                self.ctx.term()
            log.info("stopped", extra={"fields": dict(self.stats, failed=worker.failed)})

    def _max_message_bytes(self) -> int:
        # libzmq applies this per frame and disconnects a peer that exceeds it.
        lim = self.config.limits
        return max(lim.max_header_bytes, lim.max_array_bytes) + 1024

    def _enable_curve(self, router: zmq.Socket) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        assert self.config.curve is not None
        public, secret = self.config.curve.load()
        self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("deepfocus.service.auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self.config.curve.authorized_keys_dir))
        router.curve_secretkey = secret
        router.curve_publickey = public
        router.curve_server = True

    def _loop(self, router: zmq.Socket, replies: zmq.Socket, worker: Worker) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        # A bounded poll only so that stop() and signals are noticed; idle cost is a
        # handful of wake-ups per second.
        timeout_ms = int(self.config.poll_interval_s * 1000)
        while not self._stop.is_set():
            events = dict(poller.poll(timeout_ms))
            if replies in events:
                while replies.poll(0):
                    router.send_multipart(replies.recv_multipart(copy=False), copy=False)
            if router in events:
                # Drain what is waiting, but keep forwarding replies between messages.
                for _ in range(64):
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(router, frames, worker)

    # -- one message ----------------------------------------------------------------

    def _handle(self, router: zmq.Socket, frames: list[zmq.Frame], worker: Worker) -> None:
        received = time.monotonic()
        self.stats["requests"] += 1
        envelope, body = _split_envelope(frames)
        try:
            req = P.decode_request(body, self.config.limits)
        except P.ProtocolError as exc:
            self.stats["errors"] += 1
            rid = getattr(exc, "request_id", None)
            log.info("bad request", extra={"fields": {"id": rid if isinstance(rid, (str, int))
                                                      else None, "code": exc.code,
                                                      "error": exc.message[:200]}})
            router.send_multipart(envelope + P.error_reply(rid, exc.code, exc.message))
            return
        if req.op == "hello":
            reply = P.encode_reply(P.Reply(id=req.id, ok=True, result=self.hello()))
        elif req.op == "health":
            reply = P.encode_reply(P.Reply(id=req.id, ok=True, result=self.health()))
        else:
            deadline = received + req.timeout_s if req.timeout_s is not None else None
            if worker.submit(Job(envelope, req, received, deadline)):
                return
            self.stats["busy"] += 1
            reply = P.error_reply(req.id, "busy", f"the daemon's queue is full "
                                  f"({self.config.queue_size} requests); retry later")
        router.send_multipart(envelope + reply, copy=False)

    def hello(self) -> dict[str, Any]:
        name, est = self.registry.active()
        return {
            "protocol": P.PROTOCOL_VERSION,
            "server": "deepfocus",
            "version": _package_version(),
            "capabilities": list(P.OPS),
            "dtypes": list(P.ALLOWED_DTYPES),
            "limits": self.config.limits.to_dict(),
            "models": self.registry.describe(),
            "active_model": name,
            "perturbation_m": getattr(est, "perturbation_m", None),
            "perturbation_range_m": list(getattr(est, "perturbation_range_m", ())) or None,
            # with these a client picks the pair the model wants on its beam (correction.pair_perturbation_m)
            "alpha_ref_mrad": getattr(est, "alpha_ref_mrad", None),
            "aperture_angle_mrad": getattr(est, "aperture_angle_mrad", None),
            "stig_shares_wd_scale": bool(getattr(est, "stig_shares_wd_scale", False)),
            # the microscope the answers are in (its stigmator units): a client notices a daemon restarted with
            # another profile (RemoteEstimator.reset)
            "stig_units_per_um": _units_per_um(est),
            "score_available": callable(getattr(est, "score", None)),
            "device": self.config.device,
            "pid": os.getpid(),
        }

    def health(self) -> dict[str, Any]:
        worker = getattr(self, "worker", None)
        name, est = self.registry.active()
        busy_since = worker.busy_since if worker else None
        return {
            "status": "ok" if est is not None else "no_model",
            "active_model": name,
            "uptime_s": time.monotonic() - self.started_s,
            "queue_depth": worker.jobs.qsize() if worker else 0,
            "busy_s": (time.monotonic() - busy_since) if busy_since else 0.0,
            "completed": worker.completed if worker else 0,
            "failed": worker.failed if worker else 0,       # of those completed: answered with an error
            "dropped_past_deadline": worker.dropped_past_deadline if worker else 0,
            "requests": self.stats["requests"],
            "errors": self.stats["errors"],
            "device": self.config.device,
        }


def _split_envelope(frames: list[zmq.Frame]) -> tuple[list[Any], list[zmq.Frame]]:
    """Routing frames up to the empty delimiter (REQ/DEALER-with-delimiter clients), and the body.

    A bare DEALER client sends no delimiter: then only the identity frame routes.
    """
    for i, f in enumerate(frames[1:], start=1):
        if len(f) == 0:
            return [fr.bytes for fr in frames[: i + 1]], frames[i + 1:]
        if i >= 8:  # deeper than any real proxy chain: treat as bare body
            break
    return [frames[0].bytes], frames[1:]


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("gcibsem")
    except Exception:
        return "unknown"


# -- structured logs -------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 4),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(P.json_safe(out), default=str)


def configure_json_logging(level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("deepfocus")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
