"""``gcibsem`` sub-commands of the GCIB package: campaign estimate, mill rate from a stack, flattening,
one milling cycle from the microscope's profile."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .campaign import CampaignParameters, estimate_campaign
from .mill_rate import MillRateModel, ev_per_cm3_to_j_per_m3, j_per_m3_to_ev_per_cm3

_DEFAULTS = CampaignParameters()


def register(subparsers) -> None:
    _register_estimate(subparsers)
    _register_mill_time(subparsers)
    _register_mill_rate(subparsers)
    _register_flatten(subparsers)
    _register_mill_cycle(subparsers)


def _add_index_options(p: argparse.ArgumentParser) -> None:
    """Options of the per-pixel last-tissue index, shared by mill-rate and flatten (defaults from gcib.stacks)."""
    from .stacks import DEFAULT_MEDIAN_PX, DEFAULT_SIGMA_PX, DEFAULT_WAFER_THRESHOLD

    p.add_argument("--threshold", type=float, default=DEFAULT_WAFER_THRESHOLD, help="grey values below this are wafer")
    p.add_argument("--sigma-px", type=float, default=DEFAULT_SIGMA_PX, help="Gaussian smoothing of the per-pixel index")
    p.add_argument("--median-px", type=int, default=DEFAULT_MEDIAN_PX, help="median filter against outliers (0: none)")


# ----------------------------------------------------------------------------- estimate-campaign
def _register_estimate(subparsers) -> None:
    d = _DEFAULTS
    p = subparsers.add_parser(
        "estimate-campaign",
        help="time budget (irradiation, milling, imaging) of a wafer-based GCIB-SEM volume",
        description="Estimate irradiation, milling and imaging time of a wafer-based GCIB-SEM acquisition. "
                    "Defaults reproduce the estimate of Schubert 2022 (section 2.3.2), which counts no stage-move "
                    "or autofocus time; set the overhead options to include them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("volume and imaging")
    g.add_argument("--sections", type=int, default=d.n_sections, help="number of thick sections")
    g.add_argument("--thickness-nm", type=float, default=d.section_thickness_m * 1e9, help="section thickness")
    g.add_argument("--tissue-width-mm", type=float, default=d.tissue_width_m * 1e3)
    g.add_argument("--tissue-height-mm", type=float, default=d.tissue_height_m * 1e3)
    g.add_argument("--pixel-nm", type=float, default=d.pixel_size_m * 1e9, help="pixel size in x and y")
    g.add_argument("--slice-nm", type=float, default=d.slice_thickness_m * 1e9,
                   help="z step (depth milled between images)")
    g.add_argument("--dwell-ns", type=float, default=d.dwell_s * 1e9)
    g.add_argument("--tile-px", type=int, default=d.tile_px, help="edge of a square tile")
    g.add_argument("--tile-overlap", type=float, default=d.tile_overlap_fraction, help="overlap fraction")
    g.add_argument("--tile-overhead-s", type=float, default=d.tile_overhead_s, help="stage move + settling per tile")
    g.add_argument("--section-overhead-s", type=float, default=d.section_overhead_s,
                   help="autofocus and approach per section and slice")
    g = p.add_argument_group("milling")
    g.add_argument("--mill-current-na", type=float, default=d.mill_beam_current_a * 1e9, help="ion beam current")
    g.add_argument("--mill-field-mm", type=float, default=d.mill_field_edge_m * 1e3,
                   help="edge of the square ion scan field covering all sections")
    g.add_argument("--dose-ev-per-cm3", type=float, default=j_per_m3_to_ev_per_cm3(d.dose_j_per_m3),
                   help="prior electron irradiation energy density (sets the mill rate and the irradiation time)")
    g.add_argument("--mill-s-per-nm", type=float, default=None,
                   help="measured milling time per nm over the field; overrides the dose model")
    g.add_argument("--cycles-per-slice", type=int, default=d.cycles_per_slice)
    g.add_argument("--mill-cycle-overhead-s", type=float, default=d.mill_cycle_overhead_s,
                   help="stage to the ion gun and back, tilt, azimuth delays, per cycle")
    g = p.add_argument_group("irradiation")
    g.add_argument("--irradiation-kv", type=float, default=d.irradiation_voltage_v / 1e3)
    g.add_argument("--irradiation-current-ua", type=float, default=d.irradiation_current_a * 1e6,
                   help="electron current of the irradiation source (not stated in the thesis; the default is "
                        "what its 4-day figure implies)")
    g.add_argument("--irradiated-area-mm2", type=float, default=None, help="default: the milled field")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args: argparse.Namespace) -> int:
    params = CampaignParameters(
        n_sections=args.sections, section_thickness_m=args.thickness_nm * 1e-9,
        tissue_width_m=args.tissue_width_mm * 1e-3, tissue_height_m=args.tissue_height_mm * 1e-3,
        pixel_size_m=args.pixel_nm * 1e-9, slice_thickness_m=args.slice_nm * 1e-9, dwell_s=args.dwell_ns * 1e-9,
        tile_px=args.tile_px, tile_overlap_fraction=args.tile_overlap, tile_overhead_s=args.tile_overhead_s,
        section_overhead_s=args.section_overhead_s, mill_beam_current_a=args.mill_current_na * 1e-9,
        mill_field_edge_m=args.mill_field_mm * 1e-3, dose_j_per_m3=ev_per_cm3_to_j_per_m3(args.dose_ev_per_cm3),
        mill_s_per_m_override=None if args.mill_s_per_nm is None else args.mill_s_per_nm * 1e9,
        cycles_per_slice=args.cycles_per_slice, mill_cycle_overhead_s=args.mill_cycle_overhead_s,
        irradiation_voltage_v=args.irradiation_kv * 1e3, irradiation_current_a=args.irradiation_current_ua * 1e-6,
        irradiated_area_m2=None if args.irradiated_area_mm2 is None else args.irradiated_area_mm2 * 1e-6)
    est = estimate_campaign(params, MillRateModel())
    if args.json:
        json.dump(est.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(est.to_text())
    return 0


# ----------------------------------------------------------------------------- mill-time
def _register_mill_time(subparsers) -> None:
    p = subparsers.add_parser(
        "mill-time", help="beam time to mill a depth, from the dose-dependent mill-rate table",
        description="Mill rate from Schubert 2022 Table 2.1 (Corgon-18, 10 kV, 30 deg), PCHIP-interpolated in "
                    "log rate over the irradiation dose; doses beyond the table are refused.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth-nm", type=float, required=True)
    p.add_argument("--dose-ev-per-cm3", type=float, required=True, help="prior electron irradiation")
    p.add_argument("--current-na", type=float, default=38.0, help="ion beam current")
    p.add_argument("--field-mm", type=float, nargs=2, default=(22.0, 22.0), metavar=("W", "H"),
                   help="scanned field")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_mill_time)


def _cmd_mill_time(args: argparse.Namespace) -> int:
    model = MillRateModel()
    dose = ev_per_cm3_to_j_per_m3(args.dose_ev_per_cm3)
    area = args.field_mm[0] * args.field_mm[1] * 1e-6
    current = args.current_na * 1e-9
    result = {
        "depth_nm": args.depth_nm, "dose_ev_per_cm3": args.dose_ev_per_cm3, "current_a": current, "area_m2": area,
        "volume_per_charge_m3_per_c": model.volume_per_charge_m3_per_c(dose),
        "volume_rate_um3_per_s": model.volume_rate_m3_per_s(dose, current) * 1e18,
        "depth_rate_nm_per_s": model.depth_rate_m_per_s(dose, current, area) * 1e9,
        "mill_time_s": model.mill_time_s(args.depth_nm * 1e-9, dose, current, area),
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(f"{result['volume_rate_um3_per_s']:.4g} um^3/s ({result['volume_per_charge_m3_per_c'] * 1e8:.4g} e-8 "
              f"m^3/C), {1 / result['depth_rate_nm_per_s']:.4g} s/nm over {area * 1e6:g} mm^2: "
              f"{result['mill_time_s']:.4g} s for {args.depth_nm:g} nm")
    return 0


# ----------------------------------------------------------------------------- mill-rate
def _register_mill_rate(subparsers) -> None:
    p = subparsers.add_parser(
        "mill-rate", help="mill rate from a sub-stack milled through to the wafer (OME-TIFF)",
        description="Estimate depth milled per cycle from the per-pixel slice where the wafer appears.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stack", type=Path, help="(z, y, x) OME-TIFF, slice 0 = unmilled surface")
    p.add_argument("--thickness-nm", type=float, required=True, help="nominal section thickness")
    p.add_argument("--thickness-sd-nm", type=float, default=0.0, help="uncertainty of the thickness")
    p.add_argument("--cycles-per-slice", type=int, required=True, help="milling cycles between two slices")
    p.add_argument("--cycle-time-s", type=float, default=None, help="beam time per cycle, to report nm/s")
    _add_index_options(p)
    p.add_argument("--roi", type=int, nargs=4, metavar=("Y0", "X0", "H", "W"), default=None,
                   help="analyse only this rectangle (pixels)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_mill_rate)


def _cmd_mill_rate(args: argparse.Namespace) -> int:
    from .stacks import estimate_mill_rate, read_ome_stack

    stack = read_ome_stack(args.stack)
    r = estimate_mill_rate(stack.data, args.thickness_nm * 1e-9, args.cycles_per_slice,
                           thickness_sd_m=args.thickness_sd_nm * 1e-9, threshold=args.threshold,
                           sigma_px=args.sigma_px, median_px=args.median_px, roi=args.roi, cycle_time_s=args.cycle_time_s)
    if args.json:
        d = r.to_dict()
        d["depth_per_cycle_nm"] = r.depth_per_cycle_m * 1e9
        d["depth_per_cycle_sd_nm"] = r.depth_per_cycle_sd_m * 1e9
        d["stack"] = str(args.stack)
        json.dump(d, sys.stdout, indent=2)
        print()
        return 0
    print(f"stack             {args.stack} ({stack.data.shape[0]} slices, ROI y0 x0 h w = {r.roi})")
    print(f"cycles to mill    {r.cycles_mean:.2f} +- {r.cycles_sd:.2f} ({r.cycles_per_slice} per slice)")
    print(f"depth per cycle   {r.depth_per_cycle_m * 1e9:.3f} +- {r.depth_per_cycle_sd_m * 1e9:.3f} nm")
    if r.depth_rate_m_per_s is not None:
        print(f"depth rate        {r.depth_rate_m_per_s * 1e9:.4g} +- {r.depth_rate_sd_m_per_s * 1e9:.2g} nm/s")
    print(f"pixels            {r.pixels_used} used, {r.pixels_not_milled_through} not milled through, "
          f"{r.pixels_without_tissue} without tissue")
    return 0


# ----------------------------------------------------------------------------- flatten
def _register_flatten(subparsers) -> None:
    p = subparsers.add_parser(
        "flatten", help="stretch each pixel column's tissue over the full z range (OME-TIFF in, OME-TIFF out)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stack", type=Path, help="(z, y, x) OME-TIFF, slice 0 = unmilled surface")
    p.add_argument("--out", type=Path, required=True, help="flattened OME-TIFF to write")
    p.add_argument("--slices", type=int, default=None, help="output slices (default: as many as the input)")
    p.add_argument("--thickness-nm", type=float, default=None,
                   help="section thickness, sets PhysicalSizeZ of the output (default: from the input's z step)")
    _add_index_options(p)
    p.add_argument("--fill", type=float, default=0.0, help="value of columns without tissue")
    p.set_defaults(func=_cmd_flatten)


def _cmd_flatten(args: argparse.Namespace) -> int:
    import numpy as np

    from .stacks import (OmeStack, clean_index, flatten_stack, last_tissue_index, read_ome_stack, smooth_index,
                         tissue_cap, write_ome_stack)

    if args.out.resolve() == args.stack.resolve():
        raise ValueError(f"--out {args.out} would overwrite the input stack")
    stack = read_ome_stack(args.stack)
    raw = last_tissue_index(stack.data, args.threshold)
    if np.all(raw < 0):
        raise ValueError(f"{args.stack}: every pixel is below the wafer threshold {args.threshold:g}")
    cleaned = clean_index(raw, args.median_px)
    last = smooth_index(cleaned, args.sigma_px)
    flat = flatten_stack(stack.data, last, n_out=args.slices, fill_value=args.fill,
                         cap_index=tissue_cap(stack.data, raw, cleaned, args.threshold))
    n_out = flat.shape[0]
    if args.thickness_nm is not None:
        dz = args.thickness_nm * 1e-9 / n_out
    elif stack.physical_size_z_m is not None:
        # tissue depth ~ (mean last index + 1/2) input steps, spread over the output slices
        dz = stack.physical_size_z_m * (float(np.nanmean(last)) + 0.5) / n_out
    else:
        dz = None
    write_ome_stack(args.out, OmeStack(flat, stack.physical_size_x_m, stack.physical_size_y_m, dz))
    through = int(np.count_nonzero((raw >= 0) & (raw < stack.data.shape[0] - 1)))
    z_text = "unknown" if dz is None else f"{dz * 1e9:.3g} nm"
    print(f"wrote {args.out}: {n_out} slices of {flat.shape[1]} x {flat.shape[2]} px, z step {z_text}; "
          f"{through} of {raw.size} pixel columns milled through")
    return 0


# ----------------------------------------------------------------------------- mill-cycle
@contextlib.contextmanager
def _stop_signals_interrupt():
    """While milling, a stop signal blanks the beam as Ctrl+C does: SIGTERM (how services and schedulers stop a
    process) and SIGHUP (a closed terminal) otherwise end the process with the gun scanning and unblanked, and a
    process started in the background from a script ignores SIGINT. SIGKILL cannot be caught: only the
    instrument's own burst or timeout settings end an exposure then."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    wanted = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    try:
        before = {sig: signal.signal(sig, interrupt) for sig in wanted}
    except ValueError:                      # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _register_mill_cycle(subparsers) -> None:
    from hardware.cli import add_profile_arguments

    p = subparsers.add_parser(
        "mill-cycle", help="run (or resume) one GCIB milling cycle configured by the profile's ion_gun section",
        description="Move the wafer under the ion gun, mill through the azimuth schedule and come back, with the "
                    "scan generator, calibration, blanker and plan from the profile's ion_gun section. Every step "
                    "goes to --log; running again with the same --log and --cycle-id resumes an interrupted cycle "
                    "without milling twice and does nothing for a finished one. On a simulated microscope without "
                    "a URL the scan generator is an in-process 33522A emulator that the simulated ion beam reads.")
    add_profile_arguments(p)
    p.add_argument("--log", type=Path, required=True, help="JSON-lines milling log (appended to)")
    p.add_argument("--cycle-id", required=True, help="name of this cycle in the log, e.g. slice-0042")
    p.add_argument("--url", default=None,
                   help="pyserial URL of the 33522A scan generator (default: ion_gun.waveform_url)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_mill_cycle)


def _scan_state_via_driver(driver):
    """What the simulated ion beam reads when the generator is not in this process: the amplitudes read back."""
    from hardware.sim.ion_beam import ScanState

    def read() -> ScanState:
        x, y = driver.status()
        return ScanState(x.amplitude_vpp, y.amplitude_vpp, x.output_on and y.output_on)
    return read


def _check_same_plan(records: list, cycle_id: str, log: Path, plan_dict: dict) -> None:
    """A cycle resumes with the plan it started with, or the log's charge and beam time stop meaning anything."""
    from hardware.errors import ConfigError

    start = next((r for r in records if r["step"] == "start"), None)
    if start is None or start.get("plan") == plan_dict:
        return

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out
    logged, now = flat(start["plan"]), flat(plan_dict)
    diffs = [f"{k}: logged {logged.get(k)!r}, profile {now.get(k)!r}" for k in sorted(set(logged) | set(now))
             if logged.get(k) != now.get(k)]
    raise ConfigError(f"cycle {cycle_id!r} in {log} was started with another plan ({'; '.join(diffs)}); resume it "
                      "with the profile it started with, or start a new --cycle-id")


def _sections_under_field(sim, plan, calibration) -> list:
    """Sections inside the true field at every azimuth: within its inscribed circle, around the true centre."""
    import math

    truth = sim.cfg.ion_beam
    x_vpp, y_vpp = calibration.vpp_for_field(*plan.field_m)
    radius = 0.5 * min(x_vpp * truth.field_m_per_vpp[0], y_vpp * truth.field_m_per_vpp[1])
    cx = plan.mill_position.x_m - truth.mill_position_mm[0] * 1e-3
    cy = plan.mill_position.y_m - truth.mill_position_mm[1] * 1e-3
    return [s for s in sim.wafer.sections
            if math.hypot(s.center_m[0] - cx, s.center_m[1] - cy) + 0.5 * math.hypot(*s.size_m) <= radius]


def _cmd_mill_cycle(args: argparse.Namespace) -> int:
    import contextlib
    import time

    from hardware.config import load_profile
    from hardware.errors import ConfigError
    from hardware.factory import open_microscope
    from hardware.instruments.emulator_33522a import Emulated33522A
    from hardware.instruments.waveform_33522a import Waveform33522A

    from .config import blanker_from_config, calibration_from_config, gun_from_config, plan_from_config
    from .ion_gun import SerialRTSBlanker
    from .milling import MillingCycle, MillingLog, cycle_state

    # everything that can be refused is refused here, before the stage or the instrument is touched
    cfg = load_profile(args.profile, args.overrides)
    plan = plan_from_config(cfg)
    calibration = calibration_from_config(cfg)
    simulated = cfg.backend == "sim"
    url = args.url or cfg.ion_gun.waveform_url
    if not url and not simulated:
        raise ConfigError(f"profile {cfg.name!r} (backend {cfg.backend!r}) names no scan generator: set "
                          "ion_gun.waveform_url (e.g. --set ion_gun.waveform_url=socket://HOST:5025) or pass --url")
    log = MillingLog(args.log)
    records = log.records(args.cycle_id)
    _check_same_plan(records, args.cycle_id, args.log, json.loads(json.dumps(plan.to_dict())))
    before = cycle_state(records)

    scope = open_microscope(cfg)
    wall0, clock0 = time.monotonic(), scope.clock.now_s()
    removed_before = None
    with contextlib.ExitStack() as stack:
        emulator = None
        if not url:
            emulator = stack.enter_context(Emulated33522A())
        driver = stack.enter_context(Waveform33522A(url or emulator.url))
        beam = None
        if simulated:
            from hardware.sim.ion_beam import SimulatedIonBeam, scan_state_from_33522a

            beam = SimulatedIonBeam(scope.sim, scan_state_from_33522a(emulator) if emulator
                                    else _scan_state_via_driver(driver))
            removed_before = [s.removed_m.copy() for s in scope.sim.wafer.sections]
        blanker = blanker_from_config(cfg, driver)
        if isinstance(blanker, SerialRTSBlanker):
            stack.callback(blanker.port.close)
        gun = gun_from_config(cfg, driver, scope.clock, on_exposure=beam, blanker=blanker)
        try:
            with _stop_signals_interrupt():
                after = MillingCycle(scope.stage, gun, plan, log).run(args.cycle_id)
        except KeyboardInterrupt as exc:
            with contextlib.suppress(Exception):
                gun.shutdown()
            how = f" by {exc.args[0]}" if exc.args else ""
            print(f"gcibsem mill-cycle: interrupted{how}; the beam is blanked. Run the same command again to "
                  f"resume cycle {args.cycle_id!r} from {args.log}", file=sys.stderr)
            return 130
        except BaseException:
            with contextlib.suppress(Exception):
                gun.shutdown()
            raise
        gun.shutdown()

    records = log.records(args.cycle_id)
    start = next(r for r in records if r["step"] == "start")
    ended = [r for r in records if r["step"] == "expose-end"]
    x_vpp, y_vpp = calibration.vpp_for_field(*plan.field_m)
    status = ("already finished, nothing done" if before.finished
              else "resumed and finished" if before.started else "finished")
    summary = {
        "profile": cfg.name, "cycle_id": args.cycle_id, "log": str(args.log),
        "scan_generator": url or f"{emulator.url} (in-process 33522A emulator)", "status": status,
        "beam_s": after.beam_s_done, "charge_c": after.charge_c,
        "beam_s_this_run": after.beam_s_done - before.beam_s_done,
        "charge_c_this_run": after.charge_c - before.charge_c,
        "current_a": start.get("ion_current_a", gun.current_a),
        "field_m": list(plan.field_m), "area_m2": plan.field_m[0] * plan.field_m[1], "scan_vpp": [x_vpp, y_vpp],
        "glancing_angle_deg": plan.glancing_angle_deg,
        "azimuths_deg": sorted({round(r["azimuth_deg"], 6) for r in ended}), "exposures": after.exposures_done,
        "wall_s": time.monotonic() - wall0, "clock_s": scope.clock.now_s() - clock0,
        "clock": "virtual" if scope.clock.is_virtual else "real",
    }
    if simulated:
        import numpy as np

        sections = scope.sim.wafer.sections
        depth = {s.index: float(np.mean(s.removed_m - removed_before[k])) for k, s in enumerate(sections)}
        under = _sections_under_field(scope.sim, plan, calibration)
        summary["simulated"] = {
            "sections_under_field": [s.index for s in under],
            "depth_mean_m": float(np.mean([depth[s.index] for s in under])) if under else 0.0,
            "sections_milled": sum(1 for d in depth.values() if d > 0),
            "charge_c_true": beam.charge_delivered_c,
        }
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print(_mill_cycle_text(summary))
    return 0


def _mill_cycle_text(s: dict) -> str:
    az = ", ".join(f"{a:g}" for a in s["azimuths_deg"]) or "none"
    lines = [
        f"cycle {s['cycle_id']} ({s['profile']}): {s['status']}",
        f"beam      {s['beam_s']:g} s, charge {s['charge_c'] * 1e6:.4g} uC at {s['current_a'] * 1e9:g} nA "
        f"(this run: {s['beam_s_this_run']:g} s, {s['charge_c_this_run'] * 1e6:.4g} uC)",
        f"field     {s['field_m'][0] * 1e3:g} x {s['field_m'][1] * 1e3:g} mm ({s['scan_vpp'][0]:.4g} x "
        f"{s['scan_vpp'][1]:.4g} Vpp), glancing angle {s['glancing_angle_deg']:g} deg",
        f"azimuths  {az} deg, {s['exposures']} exposures",
        f"duration  wall {s['wall_s']:.3g} s, {s['clock']} clock {s['clock_s']:.4g} s",
        f"scan gen  {s['scan_generator']}",
        f"log       {s['log']}",
    ]
    sim = s.get("simulated")
    if sim is not None:
        lines.append(f"simulated mean depth milled {sim['depth_mean_m'] * 1e9:.4g} nm on the "
                     f"{len(sim['sections_under_field'])} sections under the field at every azimuth "
                     f"({sim['sections_milled']} sections milled in all)")
    return "\n".join(lines)
