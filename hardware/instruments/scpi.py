"""SCPI instruments over pyserial: one transport for LAN, RS-232/USB serial and test doubles.

``serial.serial_for_url`` gives the same byte-stream interface for
``socket://HOST:5025`` (the raw SCPI socket of LAN instruments), a port name
(``/dev/ttyUSB0``, ``COM3``) and ``loop://``, so a driver written once reaches the
instrument however it is cabled.

Every setting is followed by draining the instrument's error queue
(``SYST:ERR?`` until ``+0,...``): many instruments, the 33500 series among them,
clamp an out-of-range value silently and only queue an error, so a setting that
is not checked this way may leave the instrument doing something else than asked.

Errors are split by who is at fault:

* ``LimitError`` (and ``ChoiceError``): the caller asked for something the
  driver knows the instrument cannot do; raised before anything is sent.
* ``InstrumentError`` (a ``BackendError``): the instrument refused, with its own
  error text.
* ``CommunicationError``: the link failed (refused, closed, timed out, garbled);
  the message names the URL.
"""
from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import serial

from ..errors import BackendError, CommunicationError, ConfigError, HardwareError, LimitError, check_range

log = logging.getLogger(__name__)

# The 488.2 error queue of most instruments holds 20 to 30 entries; reading more
# than this without a "+0" means the instrument is not answering SYST:ERR? sanely.
MAX_ERROR_READS = 40

_ERROR_REPLY = re.compile(r'^\s*([+-]?\d+)\s*,\s*"?(.*?)"?\s*$')


# ----------------------------------------------------------------------------- errors
class InstrumentError(BackendError):
    """The instrument queued one or more errors after a command; ``errors`` holds (code, text) pairs."""

    def __init__(self, url: str, command: str, errors: list[tuple[int, str]]):
        self.url = url
        self.command = command
        self.errors = list(errors)
        text = "; ".join(f'{code},"{message}"' for code, message in self.errors)
        super().__init__(f"{url}: instrument reported {text} after {command!r}")


class ChoiceError(LimitError):
    """A setting must be one of a fixed set of values; nothing was sent to the device."""

    def __init__(self, quantity: str, value: Any, choices: Iterable[Any]):
        self.quantity = quantity
        self.value = value
        self.choices = tuple(choices)
        self.low = self.high = None
        self.unit = ""
        # LimitError's constructor formats a numeric range; a choice has none.
        HardwareError.__init__(self, f"{quantity} = {value!r} is not one of "
                                     f"{', '.join(repr(c) for c in self.choices)}")


class _LinkDropped(Exception):
    """The connection broke mid-exchange; the caller may reconnect once and retry."""


class _ReplyTimeout(CommunicationError):
    """No complete reply line arrived in time (internal: ``query`` may still explain it)."""


# ----------------------------------------------------------------------------- identity
@dataclass(frozen=True)
class Identity:
    """The four fields of an IEEE 488.2 ``*IDN?`` reply."""
    manufacturer: str
    model: str
    serial_number: str
    firmware: str

    @classmethod
    def parse(cls, reply: str) -> "Identity":
        parts = [p.strip() for p in reply.split(",")]
        if len(parts) != 4 or not parts[1]:
            raise ValueError(f"not an *IDN? reply: {reply!r}")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.manufacturer} {self.model} (serial {self.serial_number}, firmware {self.firmware})"


# ----------------------------------------------------------------------------- formatting
def format_number(value: float) -> str:
    """Shortest exact decimal form of ``value`` that SCPI numeric parsers accept (``100``, ``0.001``, ``1e-06``)."""
    v = float(value) + 0.0  # folds -0.0 into 0.0, which some parsers read as a sign error
    if not math.isfinite(v):
        raise ValueError(f"cannot send non-finite number {value!r}")
    return f"{v:.15g}"


def parse_number(reply: str) -> float:
    return float(reply.strip())


def format_on_off(value: Any) -> str:
    return "ON" if value else "OFF"


def parse_on_off(reply: str) -> bool:
    text = reply.strip().upper()
    if text in ("1", "ON"):
        return True
    if text in ("0", "OFF"):
        return False
    raise ValueError(f"not a boolean reply: {reply!r}")


# ----------------------------------------------------------------------------- validators
# A validator takes the object the property lives on (so it may look at other
# settings) and the requested value, and returns the value to send or raises
# LimitError. It runs before anything is written.
Validator = Callable[[Any, Any], Any]


def in_range(quantity: str, low: float, high: float, unit: str = "") -> Validator:
    def check(_owner: Any, value: Any) -> float:
        return check_range(quantity, value, low, high, unit)
    return check


def one_of(quantity: str, choices: Iterable[Any]) -> Validator:
    allowed = tuple(choices)

    def check(_owner: Any, value: Any) -> Any:
        for choice in allowed:
            if value == choice or (isinstance(value, str) and isinstance(choice, str)
                                   and value.upper() == choice.upper()):
                return choice
        raise ChoiceError(quantity, value, allowed)
    return check


def boolean(quantity: str) -> Validator:
    def check(_owner: Any, value: Any) -> bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ChoiceError(quantity, value, (True, False))
    return check


class Control:
    """A declarative instrument setting: ``frequency_hz = Control("FREQ?", "FREQ {value}", ...)``.

    Command templates are filled with the owner's ``scpi_fields()`` (e.g.
    ``{ch}`` for a channel) and, for the set command, ``{value}``. Reading
    queries the instrument every time: front-panel changes and resets must show.
    """

    def __init__(self, get_cmd: str | None, set_cmd: str | None, doc: str = "", *,
                 validator: Validator | None = None, parse: Callable[[str], Any] = parse_number,
                 format: Callable[[Any], str] = format_number):
        self.get_cmd = get_cmd
        self.set_cmd = set_cmd
        self.validator = validator
        self.parse = parse
        self.format = format
        self.name = "?"
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        if self.get_cmd is None:
            raise AttributeError(f"{self.name} cannot be read back")
        cmd = self.get_cmd.format_map(obj.scpi_fields())
        reply = obj.query(cmd)
        try:
            return self.parse(reply)
        except (ValueError, KeyError):
            raise CommunicationError(f"{obj.url}: garbled reply {reply!r} to {cmd!r}") from None

    def __set__(self, obj: Any, value: Any) -> None:
        if self.set_cmd is None:
            raise AttributeError(f"{self.name} cannot be set")
        if self.validator is not None:
            value = self.validator(obj, value)
        obj.command(self.set_cmd.format_map({**obj.scpi_fields(), "value": self.format(value)}))


def control(get_cmd: str | None, set_cmd: str | None, doc: str = "", **kwargs: Any) -> Control:
    """Shorthand for ``Control(...)`` that reads like a property declaration."""
    return Control(get_cmd, set_cmd, doc, **kwargs)


# ----------------------------------------------------------------------------- instrument
class SCPIInstrument:
    """One SCPI instrument on one pyserial connection.

    ``url`` is anything ``serial.serial_for_url`` opens. The connection is opened
    on construction (unless ``connect=False``) and identified with ``*IDN?``; if
    ``expected_model`` is given the reply must contain it. All exchanges on one
    connection are serialised by a lock, so threads may share an instrument.

    If the instrument drops the connection (power cycle, LAN hiccup), the
    operation reconnects once, re-identifies and is repeated; settings are
    idempotent, so repeating one is safe. A second failure raises
    ``CommunicationError``.
    """

    #: substring the ``*IDN?`` model field must contain; None accepts any instrument
    expected_model: str | None = None

    def __init__(self, url: str, *, expected_model: str | None = None, timeout_s: float = 2.0,
                 baudrate: int = 9600, termination: str = "\n", connect: bool = True,
                 serial_factory: Callable[..., Any] = serial.serial_for_url):
        if not timeout_s > 0:
            raise LimitError("SCPI read timeout", timeout_s, 0.0, math.inf, "s")
        self._url = str(url)
        if expected_model is not None:
            self.expected_model = expected_model
        self.timeout_s = float(timeout_s)
        self.baudrate = int(baudrate)
        self._term = termination.encode("ascii")
        self._serial_factory = serial_factory
        self._port: Any = None
        self._identity: Identity | None = None
        # RLock: a Control validator may query the instrument while a caller holds the lock.
        self._lock = threading.RLock()
        if connect:
            self.open()

    # ------------------------------------------------------------------ connection
    @property
    def url(self) -> str:
        return self._url

    @property
    def identity(self) -> Identity:
        """What the instrument answered to ``*IDN?`` on the last (re)connect."""
        with self._lock:
            if self._identity is None:
                self._connect()
            assert self._identity is not None
            return self._identity

    @property
    def is_open(self) -> bool:
        return self._port is not None

    def scpi_fields(self) -> Mapping[str, Any]:
        return {}

    def open(self) -> None:
        with self._lock:
            if self._port is None:
                self._connect()

    def close(self) -> None:
        with self._lock:
            self._drop_port()

    def __enter__(self) -> "SCPIInstrument":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._url!r})"

    def _connect(self) -> None:
        try:
            port = self._serial_factory(self._url, baudrate=self.baudrate, timeout=self.timeout_s,
                                        write_timeout=self.timeout_s)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise CommunicationError(f"cannot connect to {self._url}: {exc}") from None
        self._port = port
        try:
            # stale bytes from an earlier, interrupted exchange would be read as our reply
            port.reset_input_buffer()
            self._write_line("*IDN?")
            reply = self._read_line_or_fail("*IDN?")
        except _LinkDropped as exc:
            self._drop_port()
            raise CommunicationError(f"{self._url} closed the connection while being identified: {exc}") from None
        try:
            identity = Identity.parse(reply)
        except ValueError:
            self._drop_port()
            raise CommunicationError(f"{self._url}: garbled reply {reply!r} to '*IDN?'") from None
        if self.expected_model and self.expected_model.upper() not in identity.model.upper():
            self._drop_port()
            raise ConfigError(f"{self._url} is a {identity}, not the expected model {self.expected_model!r}")
        self._identity = identity
        # errors left by an earlier client must not be blamed on our first setting
        try:
            stale = self._read_errors()
        except _LinkDropped as exc:
            self._drop_port()
            raise CommunicationError(f"{self._url} closed the connection while being identified: {exc}") from None
        for code, message in stale:
            log.warning("%s: discarding error queued before connecting: %d,%r", self._url, code, message)

    def _drop_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:  # a half-dead socket may fail to close; it is discarded either way
                pass

    # ------------------------------------------------------------------ raw I/O (lock held)
    def _write_line(self, text: str) -> None:
        if self._port is None:
            raise _LinkDropped("not connected")
        try:
            self._port.write(text.encode("ascii") + self._term)
        except serial.SerialTimeoutException:
            self._drop_port()
            raise CommunicationError(f"{self._url}: writing {text!r} timed out after {self.timeout_s:g} s") from None
        except (serial.SerialException, OSError) as exc:
            raise _LinkDropped(f"write of {text!r} failed: {exc}") from None

    def _read_line(self, cmd: str) -> str:
        if self._port is None:
            raise _LinkDropped("not connected")
        try:
            data = self._port.read_until(self._term)
        except (serial.SerialException, OSError) as exc:
            raise _LinkDropped(f"reading the reply to {cmd!r} failed: {exc}") from None
        if not data.endswith(self._term):
            raise _ReplyTimeout(f"{self._url}: no complete reply to {cmd!r} within {self.timeout_s:g} s"
                                + (f" (got {data!r})" if data else ""))
        try:
            return data[: -len(self._term)].decode("ascii").rstrip("\r")
        except UnicodeDecodeError:
            self._drop_port()
            raise CommunicationError(f"{self._url}: garbled reply {data!r} to {cmd!r}") from None

    def _read_errors(self, asked: bool = False) -> list[tuple[int, str]]:
        """Drain the error queue; ``asked``: the first ``SYST:ERR?`` went out with the command."""
        errors: list[tuple[int, str]] = []
        for i in range(MAX_ERROR_READS):
            if i > 0 or not asked:
                self._write_line("SYST:ERR?")
            reply = self._read_line_or_fail("SYST:ERR?")
            m = _ERROR_REPLY.match(reply)
            if not m:
                self._drop_port()
                raise CommunicationError(f"{self._url}: garbled reply {reply!r} to 'SYST:ERR?'")
            code = int(m.group(1))
            if code == 0:
                return errors
            errors.append((code, m.group(2)))
        raise CommunicationError(f"{self._url}: error queue still not empty after {MAX_ERROR_READS} reads "
                                 f"(last: {errors[-1]})")

    def _read_line_or_fail(self, cmd: str) -> str:
        try:
            return self._read_line(cmd)
        except _ReplyTimeout as exc:
            # a late reply would be taken for the answer to the next query: start afresh
            self._drop_port()
            raise CommunicationError(str(exc)) from None

    def _run(self, operation: Callable[[], Any]) -> Any:
        with self._lock:
            if self._port is None:
                self._connect()
            try:
                return operation()
            except _LinkDropped as first:
                self._drop_port()
                log.warning("%s: connection lost (%s); reconnecting once", self._url, first)
            self._connect()
            try:
                return operation()
            except _LinkDropped as second:
                self._drop_port()
                raise CommunicationError(f"{self._url}: connection lost again after reconnecting: {second}") from None

    # ------------------------------------------------------------------ public exchanges
    def command(self, cmd: str) -> None:
        """Send a setting and drain the error queue; raise ``InstrumentError`` with the instrument's text."""
        if cmd.rstrip().endswith("?"):
            # its reply would be read as the answer to SYST:ERR?
            raise ValueError(f"{cmd!r} is a query: use query(), not command()")

        def op() -> None:
            # One write for the setting and the first error query: two small writes in a
            # row would wait for the first one's delayed TCP acknowledgement (Nagle), ~40 ms.
            self._write_line(f"{cmd}{self._term.decode('ascii')}SYST:ERR?")
            errors = self._read_errors(asked=True)
            if errors:
                raise InstrumentError(self._url, cmd, errors)
        self._run(op)

    def query(self, cmd: str) -> str:
        """Send a query and return its reply line (without termination)."""
        def op() -> str:
            self._write_line(cmd)
            try:
                return self._read_line(cmd)
            except _ReplyTimeout as exc:
                # an instrument answers a query it does not understand with silence and a queued error
                try:
                    errors = self._read_errors()
                except CommunicationError:
                    raise CommunicationError(str(exc)) from None
                if errors:
                    raise InstrumentError(self._url, cmd, errors) from None
                self._drop_port()
                raise CommunicationError(str(exc)) from None
        return self._run(op)

    def query_float(self, cmd: str) -> float:
        reply = self.query(cmd)
        try:
            return parse_number(reply)
        except ValueError:
            raise CommunicationError(f"{self._url}: garbled reply {reply!r} to {cmd!r}") from None

    def check_errors(self) -> None:
        """Drain the error queue and raise ``InstrumentError`` if it held anything."""
        errors = self._run(self._read_errors)
        if errors:
            raise InstrumentError(self._url, "(error queue check)", errors)

    def write_unchecked(self, cmd: str) -> None:
        """Send a line without draining the error queue (for commands that reset the queue, or diagnostics)."""
        self._run(lambda: self._write_line(cmd))

    def reset(self) -> None:
        """``*RST`` then ``*CLS``: factory settings, empty error queue."""
        self.command("*RST")
        self.command("*CLS")


class Channel:
    """One channel of a multi-channel instrument: Controls on it fill ``{ch}`` in their commands."""

    def __init__(self, instrument: SCPIInstrument, number: int):
        self.instrument = instrument
        self.number = int(number)

    @property
    def url(self) -> str:
        return self.instrument.url

    def scpi_fields(self) -> Mapping[str, Any]:
        return {"ch": self.number}

    def command(self, cmd: str) -> None:
        self.instrument.command(cmd)

    def query(self, cmd: str) -> str:
        return self.instrument.query(cmd)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.instrument.url!r}, {self.number})"
