"""``gcibsem waveform ...``: set up, switch off and inspect the ion gun's scan generator (33522A).

Values are checked before the instrument is even contacted, so a typo in a
scan amplitude never reaches the ion gun.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

from .waveform_33522a import SawtoothScan, Waveform33522A


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "waveform", help="ion-gun scan generator (Keysight/Agilent 33522A over SCPI)",
        description="Configure, switch off or inspect the two-channel waveform generator that scans the ion gun "
                    "(channel 1: X, channel 2: Y).")
    actions = parser.add_subparsers(dest="waveform_action", metavar="ACTION")
    actions.required = True

    def connection_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", required=True,
                       help="pyserial URL of the instrument: socket://HOST:5025 (LAN), or a serial port name")
        p.add_argument("--timeout-s", type=float, default=2.0, help="reply timeout in seconds (default 2)")
        p.add_argument("--model", default=Waveform33522A.expected_model,
                       help="substring the *IDN? model must contain (default %(default)s)")

    configure = actions.add_parser("configure", help="two sawtooth ramps, phase-synchronised, outputs on")
    connection_args(configure)
    configure.add_argument("--x-hz", type=float, required=True, help="X (channel 1) frequency, e.g. 100")
    configure.add_argument("--y-hz", type=float, required=True, help="Y (channel 2) frequency, e.g. 1")
    configure.add_argument("--x-vpp", type=float, required=True, help="X amplitude, peak-to-peak V (<= 20)")
    configure.add_argument("--y-vpp", type=float, required=True, help="Y amplitude, peak-to-peak V (<= 20)")
    configure.set_defaults(func=_configure)

    off = actions.add_parser("off", help="switch both outputs off")
    connection_args(off)
    off.set_defaults(func=_off)

    status = actions.add_parser("status", help="print what both channels are set to")
    connection_args(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_status)


def _connect(args: argparse.Namespace) -> Waveform33522A:
    return Waveform33522A(args.url, timeout_s=args.timeout_s, expected_model=args.model or None)


def _configure(args: argparse.Namespace) -> int:
    scan = SawtoothScan(args.x_hz, args.y_hz, args.x_vpp, args.y_vpp).validated()
    with _connect(args) as gen:
        gen.configure_sawtooth_scan(scan.x_hz, scan.y_hz, scan.x_vpp, scan.y_vpp)
    print(f"{args.url}: X {scan.x_vpp:g} Vpp at {scan.x_hz:g} Hz (channel 1), "
          f"Y {scan.y_vpp:g} Vpp at {scan.y_hz:g} Hz (channel 2), outputs on")
    return 0


def _off(args: argparse.Namespace) -> int:
    with _connect(args) as gen:
        gen.outputs_off()
    print(f"{args.url}: outputs off")
    return 0


def _status(args: argparse.Namespace) -> int:
    with _connect(args) as gen:
        identity = gen.identity
        channels = gen.status()
    if args.json:
        print(json.dumps({"url": args.url, "identity": dataclasses.asdict(identity),
                          "channels": [c.to_dict() for c in channels]}))
        return 0
    print(f"{args.url}: {identity}")
    for c in channels:
        load = "high impedance" if math.isinf(c.load_ohm) else f"{c.load_ohm:g} ohm"
        shape = c.function.name.lower()
        if c.function.name == "RAMP":
            shape += f" (symmetry {c.ramp_symmetry_pct:g} %)"
        print(f"  channel {c.channel}: output {'ON ' if c.output_on else 'off'}  {shape}, {c.frequency_hz:g} Hz, "
              f"{c.amplitude_vpp:g} Vpp, offset {c.offset_v:g} V, load {load}")
    return 0
