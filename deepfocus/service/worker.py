"""Inference worker and model registry of the DeepFocus daemon.

Inference runs in one worker thread so that the socket thread keeps answering
``hello`` and ``health`` while a long estimate runs. Jobs are processed strictly
in arrival order, and model activation is itself a job: requests queued before
a swap finish on the old model, requests queued after it run on the new one,
and none is dropped.
"""
from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from ..correction import Estimator
from . import protocol as P

log = logging.getLogger("deepfocus.service")

#: file suffixes treated as TorchScript models in ``--models DIR``
MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")

ModelLoader = Callable[[Path, str], Estimator]


class ModelError(RuntimeError):
    """A model that cannot be found, loaded or activated."""


def default_model_loader(path: Path, device: str) -> Estimator:
    """Load a TorchScript model file through the in-process estimator package.

    Imported lazily: torch is heavy, and a daemon started with an explicit
    estimator never needs it.
    """
    try:
        from ..model_files import load_estimator
    except ImportError as exc:
        raise ModelError(f"cannot load {path.name}: the in-process estimator "
                         f"(deepfocus.model_files) is not importable: {exc}") from exc
    return load_estimator(path, device=device)


@dataclass
class ModelRegistry:
    """TorchScript files in one directory, the ones loaded, and the active one."""
    models_dir: Path | None
    loader: ModelLoader = default_model_loader
    device: str = "cpu"
    loaded: dict[str, Estimator] = field(default_factory=dict)
    active_name: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def available(self) -> list[str]:
        if self.models_dir is None or not self.models_dir.is_dir():
            return []
        return sorted(p.name for p in self.models_dir.iterdir()
                      if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)

    def _path(self, name: str) -> Path:
        if self.models_dir is None:
            raise ModelError("the daemon was started without --models DIR; no model files to load")
        # Only bare names listed in the directory: a request must not open arbitrary paths.
        if name not in self.available():
            raise ModelError(f"no model named {name!r} in {self.models_dir}; available: "
                             f"{', '.join(self.available()) or 'none'}")
        return self.models_dir / name

    def add(self, name: str, estimator: Estimator, activate: bool = True) -> None:
        """Register an estimator built in-process (no file), e.g. from ``--estimator``."""
        with self._lock:
            self.loaded[name] = estimator
            if activate or self.active_name is None:
                self.active_name = name

    def load(self, name: str) -> Estimator:
        with self._lock:
            if name in self.loaded:
                return self.loaded[name]
        path = self._path(name)
        t0 = time.perf_counter()
        try:
            est = self.loader(path, self.device)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"loading {name} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(est, Estimator):
            raise ModelError(f"loader returned {type(est).__name__} for {name}, not an Estimator")
        with self._lock:
            self.loaded[name] = est
        log.info("model loaded", extra={"fields": {"model": name, "device": self.device,
                                                   "load_s": round(time.perf_counter() - t0, 3)}})
        return est

    def activate(self, name: str) -> None:
        self.load(name)
        with self._lock:
            previous, self.active_name = self.active_name, name
        log.info("model activated", extra={"fields": {"model": name, "previous": previous}})

    def active(self) -> tuple[str | None, Estimator | None]:
        with self._lock:
            if self.active_name is None:
                return None, None
            return self.active_name, self.loaded.get(self.active_name)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            loaded = sorted(self.loaded)
            active = self.active_name
        return {"available": self.available(), "loaded": loaded, "active": active,
                "device": self.device}


@dataclass
class Job:
    envelope: list[bytes]
    request: P.Request
    received_s: float
    deadline_s: float | None


_STOP = object()


class Worker(threading.Thread):
    """Runs queued jobs one at a time and hands finished replies to the socket thread.

    Replies travel over an inproc PAIR socket, the only thread-safe way to get
    them onto the ROUTER socket that the socket thread owns.
    """

    def __init__(self, context: zmq.Context, reply_endpoint: str, registry: ModelRegistry,
                 queue_size: int = 64):
        super().__init__(name="deepfocus-worker", daemon=True)
        self.ctx = context
        self.reply_endpoint = reply_endpoint
        self.registry = registry
        self.jobs: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.busy_since: float | None = None
        self.completed = 0
        self.failed = 0                 # run and answered with an error (bad input, model or estimator fault)
        self.dropped_past_deadline = 0
        self.ready = threading.Event()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 'busy')."""
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    def drain(self) -> list[Job]:
        """Take every queued job out of the queue (used when shutting down)."""
        jobs = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return jobs
            if job is not _STOP:
                jobs.append(job)

    def stop(self) -> None:
        # A blocking put: the sentinel must arrive even when the queue is full.
        self.jobs.put(_STOP)

    def run(self) -> None:
        out = self.ctx.socket(zmq.PAIR)
        out.setsockopt(zmq.LINGER, 1000)
        out.connect(self.reply_endpoint)
        self.ready.set()
        try:
            while True:
                job = self.jobs.get()
                if job is _STOP:
                    break
                self.busy_since = time.monotonic()
                try:
                    frames = self._run_job(job)
                finally:
                    self.busy_since = None
                out.send_multipart(job.envelope + frames, copy=False)
        finally:
            out.close()

    # -- jobs ---------------------------------------------------------------------

    def _run_job(self, job: Job) -> list[Any]:
        req = job.request
        started = time.monotonic()
        if job.deadline_s is not None and started > job.deadline_s:
            self.dropped_past_deadline += 1
            log.info("dropped past deadline", extra={"fields": {
                "id": req.id, "op": req.op, "late_s": round(started - job.deadline_s, 3)}})
            return P.error_reply(req.id, "deadline_exceeded",
                                 f"request waited {started - job.received_s:.3f} s in the queue, "
                                 f"past its timeout of {req.timeout_s} s; it was not run")
        try:
            if req.op == "estimate":
                result = self._estimate(req)
            elif req.op == "score":
                result = self._score(req)
            elif req.op == "models":
                result = self._models(req)
            elif req.op == "check":
                result = self._check(req)
            else:  # the socket thread only queues the ops above
                raise P.ProtocolError(f"operation {req.op!r} is not run by the worker", "unknown_op")
        except Exception as exc:  # an estimator bug must not take the daemon down
            self.failed += 1
            return P.error_reply(req.id, *_error(exc, req))
        finally:
            self.completed += 1
        done = time.monotonic()
        timings = result.setdefault("timings_s", {})
        timings["queue"] = started - job.received_s
        timings["server_total"] = done - job.received_s
        log.info("request done", extra={"fields": {
            "id": req.id, "op": req.op, "queue_s": round(started - job.received_s, 4),
            "run_s": round(done - started, 4)}})
        return P.encode_reply(P.Reply(id=req.id, ok=True, result=result))

    def _active(self) -> tuple[str, Estimator]:
        name, est = self.registry.active()
        if est is None or name is None:
            raise ModelError("no model is active; load one with the 'models' operation "
                             "(action 'activate') or start the daemon with --model")
        return name, est

    def _estimate(self, req: P.Request) -> dict[str, Any]:
        if len(req.arrays) != 2:
            raise P.ProtocolError(f"estimate needs 2 arrays (minus, plus), got {len(req.arrays)}",
                                  "bad_array")
        minus, plus = req.arrays
        if minus.shape != plus.shape:
            raise P.ProtocolError(f"minus and plus images differ in shape: {minus.shape} vs "
                                  f"{plus.shape}", "bad_array")
        pixel_size_m = _positive(req.params, "pixel_size_m", 1e-11, 1e-4, required=True)
        perturbation_m = _positive(req.params, "perturbation_m", 1e-9, 1e-3, required=False)
        options = req.params.get("options") or {}
        if not isinstance(options, dict):
            raise P.ProtocolError("'options' must be a JSON object")
        name, est = self._active()
        kwargs = _accepted_options(est.estimate, options)
        t0 = time.perf_counter()
        corr = est.estimate(minus, plus, pixel_size_m, perturbation_m, **kwargs)
        t1 = time.perf_counter()
        result = corr.to_dict()
        result["model_id"] = result.get("model_id") or name
        result.setdefault("timings_s", {})["estimate"] = t1 - t0
        return result

    def _check(self, req: P.Request) -> dict[str, Any]:
        """Whether the active model answers pairs of frames of ``shape`` [rows, columns] at ``pixel_size_m``
        taken at -/+ ``perturbation_m`` (its own pair when not given): asked before any frame is taken."""
        shape = req.params.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise P.ProtocolError(f"'shape' must be [rows, columns] in pixels, got {str(shape)[:64]}")
        pixel_size_m = _positive(req.params, "pixel_size_m", 1e-11, 1e-4, required=True)
        perturbation_m = _positive(req.params, "perturbation_m", 1e-9, 1e-3, required=False)
        _, est = self._active()
        check = getattr(est, "check_frames", None)
        if callable(check):
            check(tuple(shape), pixel_size_m, perturbation_m or est.perturbation_m)
        return {"answers": True}

    def _score(self, req: P.Request) -> dict[str, Any]:
        if len(req.arrays) != 1:
            raise P.ProtocolError(f"score needs 1 array, got {len(req.arrays)}", "bad_array")
        pixel_size_m = _positive(req.params, "pixel_size_m", 1e-11, 1e-4, required=True)
        name, est = self._active()
        score_fn = getattr(est, "score", None)
        if not callable(score_fn):
            raise P.ProtocolError(f"the active model {name!r} has no DeepScore head; "
                                  "activate a score model", "not_supported")
        t0 = time.perf_counter()
        value = score_fn(req.arrays[0], pixel_size_m)
        t1 = time.perf_counter()
        if isinstance(value, dict):
            result = dict(value)
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            result = {"score_wd": float(value[0]), "score_stig": float(value[1]),
                      "score": float(value[0]) + float(value[1])}
        else:
            result = {"score": float(value)}
        result["model_id"] = name
        result["timings_s"] = {"score": t1 - t0}
        return result

    def _models(self, req: P.Request) -> dict[str, Any]:
        action = req.params.get("action", "list")
        name = req.params.get("name")
        if action in ("load", "activate"):
            if not isinstance(name, str) or not name:
                raise P.ProtocolError(f"models {action} needs 'name', a file name in the models "
                                      "directory")
            if action == "load":
                self.registry.load(name)
            else:
                self.registry.activate(name)
        elif action != "list":
            raise P.ProtocolError(f"unknown models action {str(action)[:32]!r}; use list, load "
                                  "or activate")
        return self.registry.describe()


def _error(exc: Exception, req: P.Request) -> tuple[str, str]:
    """(code, message) of the error reply for what a job raised."""
    if isinstance(exc, P.ProtocolError):
        return exc.code, exc.message
    if isinstance(exc, ModelError):
        return "model_error", str(exc)
    if isinstance(exc, ValueError):
        # estimators raise ValueError for input they cannot answer (frames too small, a perturbation the model was
        # not trained for): the request's fault, not the estimator's
        return "bad_request", str(exc)
    log.exception("estimator failed", extra={"fields": {"id": req.id, "op": req.op}})
    return "estimator_failed", f"{type(exc).__name__}: {exc}"


def _positive(params: dict[str, Any], key: str, lo: float, hi: float, required: bool
              ) -> float | None:
    v = params.get(key)
    if v is None:
        if required:
            raise P.ProtocolError(f"'{key}' is required")
        return None
    if (not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v)
            or not lo <= v <= hi):
        raise P.ProtocolError(f"'{key}' must be a number in [{lo:g}, {hi:g}] (SI units), got {v!r}")
    return float(v)


def _accepted_options(fn: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The options the estimator's ``estimate`` accepts as keywords; unknown ones are an error."""
    if not options:
        return {}
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    fixed = ("minus", "plus", "pixel_size_m", "perturbation_m")      # the request's own fields, not options
    unknown = sorted(k for k in options if k not in params or k in fixed)
    if unknown:
        raise P.ProtocolError(f"the active estimator does not accept option(s) {unknown}; "
                              f"it accepts {sorted(k for k in params if k not in fixed)}")
    return dict(options)
