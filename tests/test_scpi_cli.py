"""``gcibsem waveform ...`` through acquisition.cli.main and as a subprocess, against the 33522A emulator."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from acquisition.cli import main
from hardware.instruments.emulator_33522a import Emulated33522A

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def emu():
    with Emulated33522A() as server:
        yield server


def configure_args(url, x_vpp="20", y_vpp="20"):
    return ["waveform", "configure", "--url", url, "--x-hz", "100", "--y-hz", "1", "--x-vpp", x_vpp,
            "--y-vpp", y_vpp]


def test_configure_sets_both_channels_and_switches_them_on(emu, capsys):
    assert main(configure_args(emu.url, y_vpp="12")) == 0
    snap = emu.snapshot()
    assert [(c.function, c.frequency_hz, c.amplitude_vpp, c.output_on) for c in snap.channels] == \
        [("RAMP", 100.0, 20.0, True), ("RAMP", 1.0, 12.0, True)]
    assert "outputs on" in capsys.readouterr().out


def test_refused_value_exits_non_zero_before_contacting_the_instrument(emu, capsys):
    assert main(configure_args(emu.url, x_vpp="25")) == 2
    err = capsys.readouterr().err
    assert "25 Vpp" in err and "20" in err
    assert emu.connections_accepted == 0 and emu.received_lines() == []


def test_instrument_error_exits_non_zero_with_the_instruments_message(emu, capsys):
    emu.device.inject_error_on("SOUR2:VOLT ", -222, "Data out of range")
    assert main(configure_args(emu.url)) == 2
    err = capsys.readouterr().err
    assert '-222,"Data out of range"' in err and "SOUR2:VOLT 20" in err
    assert not emu.snapshot().channel(2).output_on  # it stopped at the refused setting


def test_unreachable_instrument_exits_non_zero_naming_the_url(capsys):
    with Emulated33522A() as gone:
        url = gone.url
    assert main(["waveform", "off", "--url", url]) == 2
    assert url in capsys.readouterr().err


def test_status_text_and_json_and_off(emu, capsys):
    assert main(configure_args(emu.url, y_vpp="8")) == 0
    capsys.readouterr()
    assert main(["waveform", "status", "--url", emu.url]) == 0
    text = capsys.readouterr().out
    assert "33522A" in text and "channel 2: output ON" in text and "8 Vpp" in text and "high impedance" in text
    assert main(["waveform", "off", "--url", emu.url]) == 0
    capsys.readouterr()
    assert main(["waveform", "status", "--url", emu.url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identity"]["model"] == "33522A"
    ch1, ch2 = report["channels"]
    assert (ch1["function"], ch1["frequency_hz"], ch1["amplitude_vpp"], ch1["output_on"]) == ("ramp", 100.0, 20.0, False)
    assert ch2["amplitude_vpp"] == 8.0 and ch2["high_impedance"] is True and ch2["load_ohm"] is None
    assert not any(c.output_on for c in emu.snapshot().channels)


def test_command_runs_as_a_subprocess(emu):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "acquisition.cli", *configure_args(emu.url, x_vpp="16")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    x = emu.snapshot().channel(1)
    assert (x.amplitude_vpp, x.frequency_hz, math.isinf(x.load_ohm), x.output_on) == (16.0, 100.0, True, True)
