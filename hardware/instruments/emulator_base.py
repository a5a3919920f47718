"""Building blocks of SCPI instrument emulators: command parsing, error queue, loopback TCP server.

An emulator is split in two so that tests can use either half:

* a ``ScpiDevice`` holds the instrument's state and answers one line at a time
  (``handle_line``), with no I/O of its own;
* an ``EmulatorServer`` puts a device behind a TCP socket on loopback, speaking
  newline-terminated SCPI exactly like the raw socket (port 5025) of a LAN
  instrument, so the real driver runs unchanged over a real socket.
"""
from __future__ import annotations

import argparse
import math
import re
import socket
import socketserver
import sys
import threading
from collections import deque
from typing import Any, Callable, Iterable

HandlerFn = Callable[[tuple, str], "str | None"]


class ScpiCommandError(Exception):
    """Raised by a command handler; the device queues it as ``code,"message"``."""

    def __init__(self, code: int, message: str):
        super().__init__(f'{code},"{message}"')
        self.code = code
        self.message = message


UNDEFINED_HEADER = (-113, "Undefined header")
HEADER_SUFFIX_OUT_OF_RANGE = (-114, "Header suffix out of range")
DATA_TYPE_ERROR = (-104, "Data type error")
MISSING_PARAMETER = (-109, "Missing parameter")
PARAMETER_NOT_ALLOWED = (-108, "Parameter not allowed")
SETTINGS_CONFLICT = (-221, "Settings conflict")
DATA_OUT_OF_RANGE = (-222, "Data out of range")
ILLEGAL_PARAMETER_VALUE = (-224, "Illegal parameter value")
QUEUE_OVERFLOW = (-350, "Queue overflow")


def header_regex(pattern: str) -> re.Pattern:
    """Compile a SCPI header pattern in manual notation into a regex.

    ``[SOURce#:]VOLTage:OFFSet?`` accepts ``SOUR1:VOLT:OFFS?``,
    ``source2:voltage:offset?`` and ``VOLT:OFFS?``: upper-case letters are the
    short form, the whole word the long form, ``[...]`` is optional and ``#`` a
    numeric suffix (captured as a group, ``''`` when left out, ``None`` when its
    optional node is).
    """
    out = []
    for tok in re.findall(r"[A-Za-z]+|[\[\]:#?*]", pattern):
        if tok == "[":
            out.append("(?:")
        elif tok == "]":
            out.append(")?")
        elif tok == "#":
            out.append(r"(\d*)")
        elif tok in ":?*":
            out.append(re.escape(tok))
        else:
            short = re.match(r"[A-Z]*", tok).group()
            long = tok.upper()
            out.append(f"(?:{long}|{short})" if short and short != long else long)
    return re.compile("".join(out), re.IGNORECASE)


def parse_numeric(args: str, low: float, high: float, default: float,
                  specials: dict[str, float] | None = None) -> tuple[float, bool]:
    """Parse a numeric parameter (or MIN, MAX, DEF); return (value clamped to [low, high], clamped?)."""
    text = args.strip()
    if not text:
        raise ScpiCommandError(*MISSING_PARAMETER)
    word = text.upper()
    named = {"MIN": low, "MINIMUM": low, "MAX": high, "MAXIMUM": high, "DEF": default, "DEFAULT": default}
    named.update(specials or {})
    if word in named:
        return named[word], False
    try:
        value = float(text)
    except ValueError:
        raise ScpiCommandError(*DATA_TYPE_ERROR) from None
    if not math.isfinite(value):
        raise ScpiCommandError(*DATA_TYPE_ERROR)
    if value < low:
        return low, True
    if value > high:
        return high, True
    return value, False


def format_nr3(value: float) -> str:
    """The 33500 series' number format: ``+2.000000000000000E+01``.

    Rounded to 15 significant digits so that decimal values read back as typed
    (9.9e37 as ``+9.900000000000000E+37``, not ``+9.899999999999999E+37``).
    """
    mantissa, exponent = f"{float(value) + 0.0:+.14E}".split("E")
    return f"{mantissa}0E{exponent}"


class ScpiDevice:
    """State, error queue and command table of one emulated instrument.

    Subclasses list ``(pattern, handler)`` pairs in ``commands()``; a handler
    gets the regex groups (numeric suffixes) and the parameter text and returns
    the reply of a query, or None. Out-of-range values are clamped and
    ``-222`` queued, as the real instruments do.
    """

    identity = "Emulated,SCPI device,0,0"
    max_errors = 20

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._errors: deque[tuple[int, str]] = deque()
        self._injected: list[tuple[str, int, str]] = []
        common: list[tuple[str, HandlerFn]] = [
            ("*IDN?", lambda g, a: self.identity),
            ("*RST", self._rst),
            ("*CLS", self._cls),
            ("*OPC?", lambda g, a: "1"),
            ("*OPC", lambda g, a: None),
            ("*WAI", lambda g, a: None),
            ("SYSTem:ERRor[:NEXT]?", self._next_error),
        ]
        self._table = [(header_regex(p), fn) for p, fn in common + list(self.commands())]

    # ------------------------------------------------------------------ for subclasses
    def commands(self) -> Iterable[tuple[str, HandlerFn]]:
        return []

    def reset_state(self) -> None:
        """Factory settings (``*RST``); the error queue is left alone, as IEEE 488.2 says."""

    # ------------------------------------------------------------------ error queue
    def push_error(self, code: int, message: str) -> None:
        with self.lock:
            if len(self._errors) >= self.max_errors:
                self._errors[-1] = QUEUE_OVERFLOW
            else:
                self._errors.append((code, message))

    def errors(self) -> list[tuple[int, str]]:
        with self.lock:
            return list(self._errors)

    def inject_error_on(self, prefix: str, code: int, message: str) -> None:
        """Queue ``code,"message"`` whenever a received command starts with ``prefix`` (fault injection)."""
        with self.lock:
            self._injected.append((prefix.upper(), int(code), message))

    def _next_error(self, groups: tuple, args: str) -> str:
        with self.lock:
            code, message = self._errors.popleft() if self._errors else (0, "No error")
        return f'{code:+d},"{message}"'

    def _rst(self, groups: tuple, args: str) -> None:
        self.reset_state()

    def _cls(self, groups: tuple, args: str) -> None:
        with self.lock:
            self._errors.clear()

    # ------------------------------------------------------------------ parsing
    def handle_line(self, line: str) -> str | None:
        """Execute one received line (``;``-separated commands); return the reply line, if any."""
        replies = []
        with self.lock:
            for part in line.split(";"):
                part = part.strip()
                if not part:
                    continue
                for prefix, code, message in self._injected:
                    if part.upper().startswith(prefix):
                        self.push_error(code, message)
                m = re.match(r"^(\S+)\s*(.*)$", part)
                assert m is not None
                header, args = m.group(1).lstrip(":"), m.group(2)
                for regex, fn in self._table:
                    hit = regex.fullmatch(header)
                    if hit:
                        try:
                            reply = fn(hit.groups(), args)
                        except ScpiCommandError as exc:
                            self.push_error(exc.code, exc.message)
                            reply = None
                        if reply is not None:
                            replies.append(reply)
                        break
                else:
                    # a real instrument stays silent on a query it does not know, so the reader times out
                    self.push_error(*UNDEFINED_HEADER)
        return ";".join(replies) if replies else None


# ----------------------------------------------------------------------------- in-process link
class DeviceSerial:
    """A pyserial-like port wired straight to a ``ScpiDevice``: no socket, no thread.

    For a simulation that wants the real driver in-process, and for tests that
    check the exact bytes a driver writes (``writes``).
    """

    def __init__(self, device: ScpiDevice, termination: bytes = b"\n"):
        self.device = device
        self.termination = termination
        self.writes: list[bytes] = []
        self._out = b""
        self.is_open = True

    def write(self, data: bytes) -> int:
        self.writes.append(bytes(data))
        for line in bytes(data).split(self.termination)[:-1]:
            reply = self.device.handle_line(line.decode("ascii", errors="replace"))
            if reply is not None:
                self._out += reply.encode("ascii") + self.termination
        return len(data)

    def read_until(self, expected: bytes = b"\n", size: int | None = None) -> bytes:
        i = self._out.find(expected)
        if i < 0:  # as pyserial on a timeout: whatever has arrived
            data, self._out = self._out, b""
            return data
        cut = i + len(expected)
        data, self._out = self._out[:cut], self._out[cut:]
        return data

    def reset_input_buffer(self) -> None:
        self._out = b""

    def close(self) -> None:
        self.is_open = False


def serial_factory(device: ScpiDevice) -> Callable[..., DeviceSerial]:
    """``serial_factory`` for ``SCPIInstrument`` that opens a ``DeviceSerial`` on ``device`` whatever the URL."""
    def open_port(url: str, **kwargs: Any) -> DeviceSerial:
        return DeviceSerial(device)
    return open_port


# ----------------------------------------------------------------------------- TCP server
class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        emulator = self.server.emulator
        emulator._register(self.request)
        try:
            while True:
                try:
                    raw = self.rfile.readline()
                except OSError:
                    return
                if not raw:
                    return
                line = raw.decode("ascii", errors="replace").strip()
                emulator._log(line)
                reply = emulator.device.handle_line(line)
                if reply is not None:
                    try:
                        self.wfile.write(reply.encode("ascii") + b"\n")
                    except OSError:
                        return
        finally:
            emulator._unregister(self.request)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: "EmulatorServer"


class EmulatorServer:
    """A ``ScpiDevice`` behind a TCP socket; a context manager whose ``url`` pyserial opens.

    ``port=0`` picks a free ephemeral port. ``received_lines()`` is the log of
    every line received (over all connections), ``drop_connections()`` closes
    every open connection from the instrument's side.
    """

    def __init__(self, device: ScpiDevice, host: str = "127.0.0.1", port: int = 0):
        self.device = device
        self._server = _Server((host, port), _Handler, bind_and_activate=True)
        self._server.emulator = self
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._connections: set[socket.socket] = set()
        self._accepted = 0

    @property
    def host(self) -> str:
        return self._server.server_address[0]

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"socket://{self.host}:{self.port}"

    def start(self) -> "EmulatorServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"{type(self.device).__name__} emulator", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.drop_connections()
        self._server.server_close()

    def __enter__(self) -> "EmulatorServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def serve_forever(self) -> None:
        """Serve in the calling thread (the process entry point)."""
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._server.server_close()

    # ------------------------------------------------------------------ test hooks
    def received_lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def clear_log(self) -> None:
        with self._lock:
            self._lines.clear()

    @property
    def connections_accepted(self) -> int:
        """How many connections were opened to this emulator so far."""
        with self._lock:
            return self._accepted

    def drop_connections(self) -> int:
        """Close every open connection, as an instrument does on power loss; return how many."""
        with self._lock:
            conns = list(self._connections)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(conns)

    def _register(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.add(sock)
            self._accepted += 1

    def _unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.discard(sock)

    def _log(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)


def run_main(device_factory: Callable[[argparse.Namespace], ScpiDevice], description: str,
             argv: list[str] | None = None, default_port: int = 5025,
             add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Entry point of ``python -m hardware.instruments.emulator_*``: serve until interrupted."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=default_port, help="TCP port; 0 picks a free one")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    server = EmulatorServer(device_factory(args), args.host, args.port)
    # the first line tells a parent process (or a person) where to connect, also when --port 0 was given
    print(server.url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover - the per-instrument modules are the entry points
    sys.exit("run python -m hardware.instruments.emulator_33522a or emulator_34461a")
