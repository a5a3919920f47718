"""The SCPI transport against the 33522A emulator over real loopback sockets, and against fakes for link faults."""
from __future__ import annotations

import socket
import threading

import pytest

from hardware.errors import CommunicationError, ConfigError, LimitError
from hardware.instruments.emulator_33522a import Emulated33522A
from hardware.instruments.scpi import (ChoiceError, InstrumentError, SCPIInstrument, control, format_number, in_range,
                                       one_of)


@pytest.fixture
def emu():
    with Emulated33522A() as server:
        yield server


@pytest.fixture
def inst(emu):
    instrument = SCPIInstrument(emu.url, expected_model="33522A", timeout_s=1.0)
    yield instrument
    instrument.close()


@pytest.fixture(scope="module")
def _shared():
    # one connection for the tests that keep it up: closing a pyserial socket costs 0.3 s
    with Emulated33522A() as server:
        instrument = SCPIInstrument(server.url, expected_model="33522A", timeout_s=1.0)
        yield instrument, server
        instrument.close()


@pytest.fixture
def shared(_shared):
    instrument, server = _shared
    server.device.handle_line("*RST;*CLS")
    server.clear_log()
    return instrument, server


class ScriptedSerial:
    """A pyserial stand-in answering each written line from a dict; records every write."""

    def __init__(self, answers: dict[str, bytes]):
        self.answers = answers
        self.writes: list[bytes] = []
        self._out = b""
        self.closed = False

    def write(self, data: bytes) -> int:
        self.writes.append(data)
        for line in data.decode().splitlines():
            self._out += self.answers.get(line, b"")
        return len(data)

    def read_until(self, expected: bytes = b"\n") -> bytes:
        idx = self._out.find(expected)
        if idx < 0:  # what pyserial returns on timeout: whatever arrived
            data, self._out = self._out, b""
            return data
        data, self._out = self._out[: idx + 1], self._out[idx + 1:]
        return data

    def reset_input_buffer(self) -> None:
        self._out = b""

    def close(self) -> None:
        self.closed = True


IDN = b"Agilent Technologies,33522A,MY00000000,2.05-1.19-2.00-52-00\n"
NO_ERROR = b'+0,"No error"\n'


def scripted(answers: dict[str, bytes]):
    fake = ScriptedSerial({"*IDN?": IDN, "SYST:ERR?": NO_ERROR, **answers})
    return fake, (lambda url, **kwargs: fake)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- identity
def test_identifies_instrument_on_connect(shared):
    inst, _ = shared
    assert inst.identity.manufacturer == "Agilent Technologies"
    assert inst.identity.model == "33522A"
    assert inst.identity.serial_number == "MY00000000"


def test_wrong_model_is_refused_with_both_identities_named(emu):
    with pytest.raises(ConfigError) as info:
        SCPIInstrument(emu.url, expected_model="34461A")
    assert "33522A" in str(info.value) and "34461A" in str(info.value) and emu.url in str(info.value)


def test_errors_left_by_an_earlier_client_are_not_blamed_on_the_first_setting(emu):
    emu.device.push_error(-222, "Data out of range")
    with SCPIInstrument(emu.url) as inst:
        inst.command("SOUR1:FREQ 10")  # would raise if the stale error were still queued
    assert emu.snapshot().channel(1).frequency_hz == 10.0


# ----------------------------------------------------------------------------- instrument errors
def test_clamped_setting_raises_with_the_instruments_own_text(shared):
    inst, emu = shared
    with pytest.raises(InstrumentError) as info:
        inst.command("SOUR1:VOLT 30")  # beyond 10 Vpp into the default 50 ohm load
    assert info.value.errors == [(-222, "Data out of range")]
    assert '-222,"Data out of range"' in str(info.value) and "SOUR1:VOLT 30" in str(info.value)
    # the instrument did not refuse, it clamped: exactly what the error check exists for
    assert emu.snapshot().channel(1).amplitude_vpp == 10.0
    assert emu.device.errors() == []


def test_every_queued_error_is_drained_and_reported(shared):
    inst, emu = shared
    with pytest.raises(InstrumentError) as info:
        inst.command("SOUR1:FOO 1;SOUR3:FREQ 5")
    assert info.value.errors == [(-113, "Undefined header"), (-114, "Header suffix out of range")]
    inst.command("SOUR1:FREQ 5")  # nothing left over to be blamed on the next setting
    assert emu.device.errors() == []


def test_unknown_query_reports_the_instrument_error_and_the_link_stays_usable(emu):
    with SCPIInstrument(emu.url, timeout_s=0.3) as inst:
        with pytest.raises(InstrumentError, match="Undefined header"):
            inst.query("SOUR1:NONSENSE?")
        assert inst.query("SOUR2:FUNC?") == "SIN"


# ----------------------------------------------------------------------------- link failures
def test_reconnects_and_reidentifies_after_the_instrument_drops_the_connection(inst, emu):
    inst.command("SOUR1:FREQ 250")
    assert emu.drop_connections() == 1
    inst.command("SOUR1:FREQ 500")  # transparent
    assert emu.connections_accepted == 2
    assert emu.received_lines().count("*IDN?") == 2
    assert emu.snapshot().channel(1).frequency_hz == 500.0
    assert inst.query_float("SOUR1:FREQ?") == 500.0


def test_raises_communication_error_naming_the_url_when_reconnecting_fails(inst, emu):
    inst.command("SOUR1:FREQ 250")
    emu.close()  # drops the connection and stops listening
    with pytest.raises(CommunicationError) as info:
        inst.command("SOUR1:FREQ 500")
    assert emu.url in str(info.value)


def test_connection_refused_names_the_url():
    url = f"socket://127.0.0.1:{free_port()}"
    with pytest.raises(CommunicationError, match=url):
        SCPIInstrument(url)


def test_silent_instrument_times_out_with_the_url_named():
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts (backlog) but never answers
        url = f"socket://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(CommunicationError) as info:
            SCPIInstrument(url, timeout_s=0.2)
    assert url in str(info.value) and "*IDN?" in str(info.value)


def test_garbled_identity_is_a_communication_error():
    fake, factory = scripted({"*IDN?": b"\xff\xfe\x00garbage\n"})
    with pytest.raises(CommunicationError, match="garbled"):
        SCPIInstrument("loop://", serial_factory=factory)
    assert fake.closed


def test_garbled_error_queue_reply_is_a_communication_error():
    fake, factory = scripted({"SYST:ERR?": b"what?\n"})
    with pytest.raises(CommunicationError, match="SYST:ERR"):
        SCPIInstrument("loop://", serial_factory=factory)


# ----------------------------------------------------------------------------- declarative controls
class Dial(SCPIInstrument):
    level_v = control("LEV?", "LEV {value}", "A test setting.", validator=in_range("level", -1.0, 1.0, "V"))
    mode = control("MODE?", "MODE {value}", validator=one_of("mode", ("FAST", "SLOW")), parse=str.strip, format=str)


def test_control_validates_before_sending_and_formats_exactly():
    fake, factory = scripted({"LEV?": b"+5.000000000000000E-01\n", "MODE?": b"SLOW\n"})
    dial = Dial("loop://", serial_factory=factory)
    fake.writes.clear()
    with pytest.raises(LimitError, match="level = 1.5 V"):
        dial.level_v = 1.5
    with pytest.raises(ChoiceError, match="'TURBO'"):
        dial.mode = "TURBO"
    assert fake.writes == []
    dial.level_v = -0.25
    dial.mode = "fast"
    assert fake.writes == [b"LEV -0.25\nSYST:ERR?\n", b"MODE FAST\nSYST:ERR?\n"]
    assert dial.level_v == 0.5 and dial.mode == "SLOW"


def test_control_garbled_number_is_a_communication_error():
    _, factory = scripted({"LEV?": b"lots\n"})
    with pytest.raises(CommunicationError, match="lots"):
        Dial("loop://", serial_factory=factory).level_v


def test_a_query_sent_as_a_setting_is_refused_before_sending():
    fake, factory = scripted({})
    inst = SCPIInstrument("loop://", serial_factory=factory)
    fake.writes.clear()
    with pytest.raises(ValueError, match="query"):
        inst.command("SOUR1:FREQ?")
    assert fake.writes == []


def test_number_format_is_exact_and_plain():
    assert [format_number(v) for v in (100.0, 20, 0.001, -0.0, 1e-6, 0.1)] == \
        ["100", "20", "0.001", "0", "1e-06", "0.1"]
    with pytest.raises(ValueError):
        format_number(float("nan"))


# ----------------------------------------------------------------------------- threads
def test_lock_keeps_replies_with_their_queries_across_threads(shared):
    inst, _ = shared
    inst.command("SOUR1:FREQ 111")
    inst.command("SOUR2:FREQ 222")
    wrong: list[tuple[int, float]] = []

    def worker(ch: int, expected: float) -> None:
        for _ in range(40):
            value = inst.query_float(f"SOUR{ch}:FREQ?")
            if value != expected:
                wrong.append((ch, value))

    threads = [threading.Thread(target=worker, args=(ch, f)) for ch, f in ((1, 111.0), (2, 222.0)) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
