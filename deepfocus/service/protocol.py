"""Wire format of the DeepFocus daemon.

A message is a multipart ZeroMQ message: one JSON header frame followed by
zero or more raw array frames. The header describes every array frame
(``dtype`` and ``shape``); the frame holds exactly ``prod(shape) * itemsize``
bytes, little endian, C order. Nothing is ever pickled, so a daemon can serve
clients written in any language and a malformed message can never execute code.

Request header::

    {"v": 1, "id": "3f2a...", "op": "estimate", "timeout_s": 10.0,
     "params": {"pixel_size_m": 1e-8, "perturbation_m": 5e-6, "options": {}},
     "arrays": [{"dtype": "uint16", "shape": [768, 1024]}, {...}]}

Reply header::

    {"v": 1, "id": "3f2a...", "ok": true, "result": {...}}
    {"v": 1, "id": "3f2a...", "ok": false,
     "error": {"code": "bad_request", "message": "..."}}

``timeout_s`` is the request's deadline relative to its arrival, so clocks of
client and daemon need not agree; work still queued past it is dropped.
Non-finite floats travel as JSON ``null`` so that strict JSON parsers in other
languages accept every reply.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

PROTOCOL_VERSION = 1

#: dtypes accepted in array frames; images are integer counts, float for
#: pre-processed data. Everything is little endian on the wire.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "int16": np.dtype("<i2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

OPS = ("hello", "health", "estimate", "score", "models", "check")


class ProtocolError(ValueError):
    """A message that does not follow the wire format; ``code`` goes into the error reply."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What the daemon accepts; anything outside gets an error reply before any allocation."""
    max_header_bytes: int = 64 * 1024
    max_arrays: int = 4
    min_side_px: int = 16
    max_side_px: int = 8192
    max_array_bytes: int = 8192 * 8192 * 4
    max_timeout_s: float = 3600.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Request:
    id: str | None
    op: str
    params: dict[str, Any]
    arrays: list[np.ndarray]
    timeout_s: float | None = None


@dataclass
class Reply:
    id: str | None
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    arrays: list[np.ndarray] = field(default_factory=list)


# -- JSON helpers ---------------------------------------------------------------

def json_safe(obj: Any) -> Any:
    """Replace non-finite floats by None and numpy scalars by Python ones, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any) -> bytes:
    return json.dumps(json_safe(obj), allow_nan=False, separators=(",", ":")).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"header contains the non-standard JSON constant {name}")


def loads_header(raw: bytes | memoryview, limits: Limits) -> dict[str, Any]:
    raw = bytes(raw)
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError(f"header is {len(raw)} bytes, more than the limit of "
                            f"{limits.max_header_bytes}", "too_large")
    if not raw:
        raise ProtocolError("header frame is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError("header JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"header is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(header).__name__}")
    return header


# -- arrays ---------------------------------------------------------------------

def array_descriptor(a: np.ndarray) -> dict[str, Any]:
    name = a.dtype.name
    if name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {name} cannot be sent; allowed: {', '.join(ALLOWED_DTYPES)}",
                            "bad_array")
    return {"dtype": name, "shape": list(a.shape)}


def array_frame(a: np.ndarray) -> np.ndarray:
    """The array as a contiguous little-endian buffer, without copying when it already is one."""
    wire = ALLOWED_DTYPES[a.dtype.name]
    return np.ascontiguousarray(a, dtype=wire)


def decode_arrays(descriptors: Any, frames: Sequence[Any], limits: Limits) -> list[np.ndarray]:
    """Arrays from their header descriptors and raw frames; checks everything before trusting sizes."""
    if descriptors is None:
        descriptors = []
    if not isinstance(descriptors, list):
        raise ProtocolError("'arrays' must be a list of {dtype, shape} objects", "bad_array")
    if len(descriptors) > limits.max_arrays:
        raise ProtocolError(f"{len(descriptors)} arrays declared, at most {limits.max_arrays} "
                            "are accepted", "too_large")
    if len(descriptors) != len(frames):
        raise ProtocolError(f"header declares {len(descriptors)} array(s) but the message "
                            f"carries {len(frames)} data frame(s)", "bad_array")
    out = []
    for i, (desc, frame) in enumerate(zip(descriptors, frames)):
        if not isinstance(desc, dict):
            raise ProtocolError(f"array {i}: descriptor must be an object", "bad_array")
        dtype_name = desc.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {i}: dtype {dtype_name!r} is not accepted; allowed: "
                                f"{', '.join(ALLOWED_DTYPES)}", "bad_array")
        dtype = ALLOWED_DTYPES[dtype_name]
        shape = desc.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            raise ProtocolError(f"array {i}: shape must be a list of two integers "
                                f"[rows, columns], got {shape!r}", "bad_array")
        rows, cols = shape
        if not (limits.min_side_px <= rows <= limits.max_side_px
                and limits.min_side_px <= cols <= limits.max_side_px):
            raise ProtocolError(f"array {i}: shape {rows} x {cols} is outside the accepted "
                                f"range {limits.min_side_px}..{limits.max_side_px} px per side",
                                "too_large" if max(rows, cols) > limits.max_side_px else "bad_array")
        nbytes = rows * cols * dtype.itemsize
        if nbytes > limits.max_array_bytes:
            raise ProtocolError(f"array {i}: {nbytes} bytes exceed the limit of "
                                f"{limits.max_array_bytes}", "too_large")
        buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
        if buf.nbytes != nbytes:
            raise ProtocolError(f"array {i}: shape {rows} x {cols} {dtype_name} needs {nbytes} "
                                f"bytes but the frame has {buf.nbytes}", "bad_array")
        a = np.frombuffer(buf, dtype=dtype).reshape(rows, cols)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ProtocolError(f"array {i} contains NaN or infinite values", "bad_array")
        out.append(a)
    return out


# -- requests and replies ---------------------------------------------------------

def encode_request(req: Request) -> list[Any]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": req.id, "op": req.op,
                              "params": req.params,
                              "arrays": [array_descriptor(a) for a in req.arrays]}
    if req.timeout_s is not None:
        header["timeout_s"] = req.timeout_s
    return [dumps(header)] + [array_frame(a) for a in req.arrays]


def decode_request(frames: Sequence[Any], limits: Limits) -> Request:
    """Parse a request body (header + array frames).

    On failure raises ``ProtocolError``; its ``request_id`` attribute carries the id
    when the header was readable so that the error reply can still echo it.
    """
    if not frames:
        raise ProtocolError("message has no frames; expected a JSON header frame")
    header = loads_header(_frame_bytes(frames[0], limits), limits)
    rid = header.get("id")
    if rid is not None and not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ProtocolError("'id' must be a string or an integer")
    if isinstance(rid, str) and len(rid) > 256:
        raise ProtocolError("'id' is longer than 256 characters")
    try:
        v = header.get("v", PROTOCOL_VERSION)
        if v != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {v!r} is not supported; this daemon speaks "
                                f"version {PROTOCOL_VERSION}", "unsupported_version")
        op = header.get("op")
        if not isinstance(op, str):
            raise ProtocolError(f"'op' must be one of {', '.join(OPS)}, got {op!r}", "unknown_op")
        if op not in OPS:
            raise ProtocolError(f"unknown operation {op[:64]!r}; known: {', '.join(OPS)}",
                                "unknown_op")
        params = header.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ProtocolError("'params' must be a JSON object")
        timeout_s = header.get("timeout_s")
        if timeout_s is not None:
            if (not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool)
                    or not math.isfinite(timeout_s) or timeout_s <= 0
                    or timeout_s > limits.max_timeout_s):
                raise ProtocolError(f"'timeout_s' must be a number in (0, {limits.max_timeout_s}],"
                                    f" got {timeout_s!r}")
            timeout_s = float(timeout_s)
        arrays = decode_arrays(header.get("arrays"), frames[1:], limits)
    except ProtocolError as exc:
        exc.request_id = rid  # type: ignore[attr-defined]
        raise
    return Request(id=rid, op=op, params=params, arrays=arrays, timeout_s=timeout_s)


def _frame_bytes(frame: Any, limits: Limits) -> memoryview:
    buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
    if buf.nbytes > limits.max_header_bytes:
        raise ProtocolError(f"header is {buf.nbytes} bytes, more than the limit of "
                            f"{limits.max_header_bytes}", "too_large")
    return buf


def encode_reply(reply: Reply) -> list[Any]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": reply.id, "ok": reply.ok}
    if reply.ok:
        header["result"] = reply.result
    else:
        header["error"] = {"code": reply.error_code, "message": reply.error_message}
    if reply.arrays:
        header["arrays"] = [array_descriptor(a) for a in reply.arrays]
    return [dumps(header)] + [array_frame(a) for a in reply.arrays]


def error_reply(request_id: Any, code: str, message: str) -> list[Any]:
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        request_id = None
    return encode_reply(Reply(id=request_id, ok=False, error_code=code, error_message=message))


def decode_reply(frames: Sequence[Any], limits: Limits | None = None) -> Reply:
    limits = limits or Limits(max_header_bytes=16 * 1024 * 1024)
    if not frames:
        raise ProtocolError("empty reply")
    header = loads_header(_frame_bytes(frames[0], limits), limits)
    arrays = decode_arrays(header.get("arrays"), frames[1:], limits)
    ok = bool(header.get("ok"))
    err = header.get("error") or {}
    return Reply(id=header.get("id"), ok=ok, result=header.get("result") or {},
                 error_code=str(err.get("code", "")) if isinstance(err, dict) else "",
                 error_message=str(err.get("message", "")) if isinstance(err, dict) else str(err),
                 arrays=arrays)


def correction_from_result(result: dict[str, Any]):
    """A ``Correction`` from a reply's result, turning JSON nulls back into NaN."""
    from ..correction import Correction

    fields = Correction.__dataclass_fields__
    clean: dict[str, Any] = {}
    for k, v in result.items():
        if k not in fields:
            continue
        if v is None and fields[k].type in ("float", float):
            v = float("nan")
        clean[k] = v
    return Correction.from_dict(clean)
