"""``gcibsem`` commands of the hardware layer: render frames of the simulated microscope."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ConfigError


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """``--profile NAME|PATH`` and repeated ``--set KEY=VALUE``: shared by every command that opens a microscope."""
    parser.add_argument("--profile", default="setup_a", help="microscope profile: a shipped name or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted profile key, e.g. --set beam.current_na=1.2 (repeatable)")


def _open(args):
    from .factory import open_microscope
    from .sim.specimen import load_specimen
    from .config import load_profile

    cfg = load_profile(args.profile, args.overrides)
    if cfg.backend != "sim":
        raise ConfigError(f"{args.command} renders the simulated microscope; profile {args.profile!r} has "
                          f"backend {cfg.backend!r}")
    specimen = None
    if args.specimen:
        px = args.specimen_pixel_size_nm * 1e-9 if args.specimen_pixel_size_nm else None
        specimen = load_specimen(args.specimen, pixel_size_m=px)
    scope = open_microscope(cfg, specimen=specimen)
    if args.section is not None:
        secs = scope.sim.wafer.sections
        if not 0 <= args.section < len(secs):
            raise ConfigError(f"--section {args.section} does not exist; the wafer has sections 0..{len(secs) - 1}")
        cx, cy = secs[args.section].center_m
        scope.stage.move_to(x_m=cx, y_m=cy)
    scope.sem.set_scan(pixel_size_m=args.pixel_size_nm * 1e-9, width_px=args.size[0], height_px=args.size[1],
                       dwell_s=args.dwell_ns * 1e-9)
    return scope


def _add_scan_arguments(p: argparse.ArgumentParser, size=(1024, 768)) -> None:
    add_profile_arguments(p)
    p.add_argument("--specimen", help="TIFF/PNG image or stack to image instead of the synthetic neuropil "
                   "(STACK.tif[A:B]: slices A to B-1 only)")
    p.add_argument("--specimen-pixel-size-nm", type=float, help="pixel size of --specimen if its file records none")
    p.add_argument("--section", type=int, help="image this wafer section (default: the first)")
    p.add_argument("--pixel-size-nm", type=float, default=10.0)
    p.add_argument("--dwell-ns", type=float, default=200.0)
    p.add_argument("--size", type=int, nargs=2, default=list(size), metavar=("W", "H"))


def cmd_sim_grab(args) -> int:
    from .sim.series import set_relative_aberration, write_frame_tiff

    scope = _open(args)
    set_relative_aberration(scope, args.wd_offset_um, tuple(args.stig_offset))
    frame = scope.sem.grab_frame()
    out = Path(args.out)
    write_frame_tiff(out, frame, scope.config.name)
    t = frame.metadata["truth"]
    print(f"wrote {out}: {frame.scan.width_px}x{frame.scan.height_px} px, defocus {t['defocus_um']:+.3f} um, "
          f"astigmatism ({t['astig_x_um']:+.3f}, {t['astig_y_um']:+.3f}) um, dose {frame.dose_e_per_nm2:.2f} e/nm2")
    return 0


def cmd_sim_series(args) -> int:
    import numpy as np
    from .sim.series import set_relative_aberration, write_series

    scope = _open(args)
    frames, labels = [], []
    for z in np.arange(-args.wd_range_um, args.wd_range_um + 1e-9, args.wd_step_um):
        set_relative_aberration(scope, float(z), (0.0, 0.0))
        frames.append(scope.sem.grab_frame())
        labels.append(f"wd {z:+.1f} um")
    for sx, sy in ((args.stig, 0.0), (-args.stig, 0.0), (0.0, args.stig), (0.0, -args.stig)):
        set_relative_aberration(scope, 0.0, (sx, sy))
        frames.append(scope.sem.grab_frame())
        labels.append(f"stig {sx:+.1f},{sy:+.1f}")
    paths = write_series(Path(args.out), frames, labels, scope.config.name)
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}))
    else:
        for k, v in paths.items():
            print(f"{k}: {v}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("sim-grab", help="render one frame of the simulated microscope to a TIFF",
                       description="Render one frame at a wd and stigmator offset from the true best focus; "
                                   "the TIFF's description records settings and the true aberration as JSON.")
    _add_scan_arguments(p)
    p.add_argument("--wd-offset-um", type=float, default=0.0, help="defocus relative to the true best focus")
    p.add_argument("--stig-offset", type=float, nargs=2, default=[0.0, 0.0], metavar=("SX", "SY"),
                   help="stigmator offset from the true setting, in stigmator units")
    p.add_argument("--out", required=True, help="output TIFF")
    p.set_defaults(func=cmd_sim_grab)

    p = sub.add_parser("sim-series", help="render a through-focus and astigmatism series (OME-TIFF + contact sheet)")
    _add_scan_arguments(p, size=(768, 768))
    p.add_argument("--wd-range-um", type=float, default=20.0)
    p.add_argument("--wd-step-um", type=float, default=5.0)
    p.add_argument("--stig", type=float, default=2.0, help="stigmator offset of the astigmatism frames (units)")
    p.add_argument("--out", default="demo", help="output folder")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")
    p.set_defaults(func=cmd_sim_series)
