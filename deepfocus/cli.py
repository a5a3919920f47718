"""The ``deepfocus`` command: predict, autofocus, bench, train, evaluate (and the daemon's serve / ping)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .jsonio import json_safe

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 4
PATCHES_HELP = ("patch pairs per estimate on a 1024 x 768 frame (default 8; larger frames get as many per 1024 x 768 "
                "of their area, up to 16); 12 cover a 1024 x 768 frame: more precise, more compute")
SPECIMEN_HELP = ("TIFF/PNG image or stack to image (default: the synthetic neuropil); STACK.tif[A:B] keeps "
                 "slices A to B-1")


def _estimator_from_args(args):
    """The shipped or named model, calibrated for ``--profile`` (stigmator units, aperture angle) if given."""
    from hardware.config import load_profile

    from .model_files import load_estimator, load_estimator_for
    settings = _estimator_settings(args)
    if getattr(args, "profile", None):
        return load_estimator_for(load_profile(args.profile, args.set or []), args.model, device=args.device,
                                  settings=settings)
    return load_estimator(args.model, device=args.device, settings=settings)


def _estimator_settings(args):
    return estimator_settings(getattr(args, "patches", None))


def estimator_settings(n: int | None):
    """``--patches N``: more patch pairs, more single-shot precision, proportionally more compute."""
    if n is None:
        return None
    if n < 3:
        raise ValueError(f"--patches must be at least 3 (the estimator needs 3 patches with structure), got {n}")
    from .estimator import EstimatorSettings
    return EstimatorSettings(n_patches=int(n))


def perturbation_m_from_args(args) -> float | None:
    """``--perturbation-um D`` in metres (None: the one the method wants on these frames); the estimator says which
    it answers."""
    d = getattr(args, "perturbation_um", None)
    if d is None:
        return None
    if not (math.isfinite(d) and 0.1 <= d <= 100):
        raise ValueError(f"--perturbation-um must be the wd step of the pair in micrometres (e.g. 5), got {d:g}")
    return d * 1e-6


def check_pixel_size_nm(pixel_size_nm: float) -> None:
    from .estimator import PIXEL_SIZE_RANGE_M
    lo_nm, hi_nm = (v * 1e9 for v in PIXEL_SIZE_RANGE_M)
    # to 1e-9 nm: the range's ends in metres do not come back exactly in nanometres
    if not (math.isfinite(pixel_size_nm) and lo_nm * (1 - 1e-9) <= pixel_size_nm <= hi_nm * (1 + 1e-9)):
        # the usual slip is a pixel size in um or m: name the flag and its unit, not the internal metres
        raise ValueError(f"--pixel-size-nm {pixel_size_nm:g} is outside {lo_nm:g}-{hi_nm:g} nm; give the "
                         "pixel size in nanometres (10 nm pixels: --pixel-size-nm 10)")


def predict_command(args) -> int:
    if getattr(args, "connect", None):
        local = [f for f, v in (("--profile", args.profile), ("--set", args.set),
                                ("--aperture-angle-mrad", args.aperture_angle_mrad)) if v]
        if local:
            print(f"deepfocus predict: {', '.join(local)} cannot go with --connect: the daemon converts with the "
                  "microscope config it was started with", file=sys.stderr)
            return EXIT_INPUT
        from .service.cli import predict_remote
        return predict_remote(args)
    try:
        if args.set and not args.profile:
            raise ValueError("--set changes a profile's keys: give the profile (--profile NAME|PATH) it changes")
        check_pixel_size_nm(args.pixel_size_nm)
        d = perturbation_m_from_args(args)
        from .image_files import read_image, recorded_notes
        minus, plus = read_image(args.minus), read_image(args.plus)
        est = _estimator_from_args(args)
        if args.aperture_angle_mrad is not None:
            est.aperture_angle_mrad = est._check_alpha(args.aperture_angle_mrad)
        # frames recorded the other way round are refused here (ValueError)
        for note in recorded_notes(args.minus, args.plus, args.pixel_size_nm, d or est.perturbation_m):
            print(f"deepfocus predict: {note}", file=sys.stderr)
        corr = est.estimate(minus, plus, args.pixel_size_nm * 1e-9, d)
    except (OSError, ValueError) as exc:
        print(f"deepfocus predict: {exc}", file=sys.stderr)
        return EXIT_INPUT
    alpha = getattr(est, "alpha_ref_mrad", None) and (est.aperture_angle_mrad or est.alpha_ref_mrad)
    if alpha and est.aperture_angle_mrad is None:
        # the answers scale with the beam half-angle: say which one they assume
        print(f"deepfocus predict: no --aperture-angle-mrad or --profile: assuming the model's reference "
              f"{est.alpha_ref_mrad:g} mrad (answers scale with it; `deepfocus calibrate` measures it)",
              file=sys.stderr)
    want = est.pair_perturbation_m(args.pixel_size_nm * 1e-9)
    took = d if d is not None else est.perturbation_m
    if want > 1.1 * took:
        # answered, but less precisely than it could be: say which pair to take next time
        print(f"deepfocus predict: on a {alpha:g} mrad beam at {args.pixel_size_nm:g} nm pixels the model reads a "
              f"pair at wd -/+ {want * 1e6:.3g} um best (this pair: -/+ {took * 1e6:.3g} um; "
              "deepfocus/README.md, \"Which pair the loop takes\")", file=sys.stderr)
    if args.json:
        print(json.dumps(json_safe(dict(corr.to_dict(), aperture_angle_mrad=alpha or None))))
    else:
        print(f"add wd {corr.wd_um:+.3f} um (+- {corr.uncertainty_wd_um:.3f}), stig x {corr.stig_x:+.4f}, "
              f"stig y {corr.stig_y:+.4f} (+- {corr.uncertainty_stig:.4f}); status {corr.status}"
              + (f" ({corr.extra['reason']})" if corr.extra.get("reason") else ""))
    return EXIT_OK


def _method(name: str, scope, model, n_patches: int | None = None):
    from .bench import make_method
    return make_method(name, scope.config, model, n_patches)


def _open_scope(args):
    """The microscope of ``--profile``/``--set`` (with ``--specimen``), scanning as the arguments say."""
    from hardware.factory import open_microscope
    from hardware.sim.specimen import load_specimen
    spec = load_specimen(args.specimen) if args.specimen else None
    scope = open_microscope(args.profile, args.set or [], specimen=spec)
    try:
        scope.sem.set_scan(pixel_size_m=args.pixel_size_nm * 1e-9, width_px=args.frame_px[0],
                           height_px=args.frame_px[1], dwell_s=args.dwell_ns * 1e-9)
    except ValueError as exc:           # the limit in SI units: name the flags the user typed
        raise ValueError(f"--pixel-size-nm {args.pixel_size_nm:g}, --dwell-ns {args.dwell_ns:g}, --frame-px "
                         f"{args.frame_px[0]} {args.frame_px[1]}: {exc}") from None
    return scope


def autofocus_command(args) -> int:
    import numpy as np

    from .autofocus import AutofocusSettings, autofocus, summarise
    try:
        # a broken profile, a scan or start beyond the microscope's limits: named, no traceback
        scope = _open_scope(args)
        sem = scope.sem
        if scope.sim is not None and (args.start_wd_um or args.start_stig):
            ts = np.array(scope.sim.true_stig())
            sem.set_stig(*(ts + np.array(args.start_stig or (0.0, 0.0))))
            sem.set_wd_m(scope.sim.true_wd_m() + args.start_wd_um * 1e-6)
        # the loop's limits and tolerances are the microscope's (its YAML's autofocus section)
        changes = {} if args.iterations is None else {"max_iterations": args.iterations}
        settings = AutofocusSettings.from_config(scope.config.autofocus, perturbation_m=perturbation_m_from_args(args),
                                                 **changes)
        _estimator_settings(args)
        if args.method != "deepfocus" and (args.patches is not None or args.model is not None):
            raise ValueError(f"--patches and --model are DeepFocus's: --method {args.method} takes neither")
        method = _method(args.method, scope, args.model, args.patches)
    except (ValueError, OSError, ImportError) as exc:
        print(f"deepfocus autofocus: {exc}", file=sys.stderr)
        return EXIT_INPUT
    res = autofocus(sem, method, settings)
    out = {"outcome": res.outcome, "message": res.message, "iterations": summarise(res),
           "images_taken": res.images_taken, "dose_e_per_nm2": res.dose_e_per_nm2, "elapsed_s": res.elapsed_s,
           "compute_s": res.compute_s, "lens_play_compensated_um": res.extra.get("lens_play_m", 0.0) * 1e6,
           # the pair's wd -/+ (the model's choice for this beam and pixel size unless --perturbation-um set it)
           "perturbation_um": res.extra.get("perturbation_m", math.nan) * 1e6}
    if scope.sim is not None:
        ab = scope.sim.aberration()
        out["final_truth"] = {"defocus_um": ab.defocus_um, "stig_error": list(np.subtract(sem.get_stig(),
                                                                                         scope.sim.true_stig()))}
    print(json.dumps(json_safe(out), indent=None if args.json else 1, default=float))
    return EXIT_OK if res.ok else EXIT_FAILED


def calibrate_command(args) -> int:
    from .autofocus import AutofocusSettings, autofocus, pinned_perturbation_m
    from .calibrate import CalibrationSettings, calibrate
    from .model_files import load_estimator_for
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    try:
        d = perturbation_m_from_args(args)
        scope = _open_scope(args)
        d = d or pinned_perturbation_m(scope.config.autofocus)
        est = load_estimator_for(scope.config, args.model, settings=_estimator_settings(args)) \
            if args.method == "deepfocus" else _method(args.method, scope, None)
    except (OSError, ValueError, ImportError) as exc:
        print(f"deepfocus calibrate: {exc}", file=sys.stderr)
        return EXIT_INPUT
    sem = scope.sem
    steps = args.stig_steps
    if steps is not None and not all(math.isfinite(v) and v > 0 for v in steps):
        print(f"deepfocus calibrate: --stig-steps must be positive numbers of stigmator units, got {steps}",
              file=sys.stderr)
        return EXIT_INPUT
    try:
        focus_settings = AutofocusSettings.from_config(scope.config.autofocus, max_iterations=args.iterations,
                                                       perturbation_m=d)
        cal_settings = CalibrationSettings(perturbation_m=d) if steps is None else \
            CalibrationSettings(perturbation_m=d, stig_offsets=tuple(sorted(-v for v in steps)) + tuple(sorted(steps)))
    except ValueError as exc:
        print(f"deepfocus calibrate: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if args.focus_first:
        # with the old calibration the loop may stop short of the margin; near focus is enough for the fits
        r = autofocus(sem, est, focus_settings)
        log(f"focus first: {r.outcome} after {len(r.trace)} corrections")
    try:
        res = calibrate(sem, est, scope.config.calibration.aperture_angle_mrad, scope.config.scan.rotation_deg,
                        cal_settings, log=log)
    except ValueError as exc:           # a step beyond the microscope's limits (LimitError is one)
        print(f"deepfocus calibrate: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except RuntimeError as exc:
        print(f"deepfocus calibrate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    out = res.to_dict()
    if scope.sim is not None:
        st = scope.config.stigmator
        out["simulated_truth"] = {"stig_rotation_deg": st.rotation_deg, "stig_scale_um_per_unit": st.scale_um_per_unit,
                                  "optics.aperture_angle_mrad": scope.config.optics.aperture_angle_mrad,
                                  "optics.hysteresis_um": scope.config.optics.hysteresis_um}
    if args.json:
        print(json.dumps(json_safe(out)))
    else:
        print(f"# wd answers scaled by {res.wd_scale:.3f} with the configured angle, {res.final_wd_scale:.3f} with "
              f"{res.aperture_angle_mrad:.3f} mrad (rms misfit {res.wd_residual_um:.2f} um), stigmator fit "
              f"rms {res.stig_residual_um:.2f} um, lens play {res.lens_play_um:.3f} +- {res.lens_play_se_um:.3f} um, "
              f"{res.frames} frames; merge into the microscope's YAML (into the sections it has, not as second ones):")
        print(res.yaml_snippet(), end="")
    return EXIT_OK


def bench_command(args) -> int:
    from hardware.config import load_profile

    from .bench import BenchConfig, check_scans, check_start_ranges, run_bench, write
    try:
        cfg = BenchConfig(profile=args.profile, overrides=args.set or [], specimens=args.specimens or [],
                          methods=[m.strip() for m in args.methods.split(",") if m.strip()], model=args.model,
                          trials=args.trials, iterations=args.iterations, dwell_ns=args.dwell_ns,
                          start_range_um=args.start_range_um, start_range_stig=args.start_range_stig,
                          starts=args.starts,
                          margin_wd_um=args.margin_wd_um, margin_stig=args.margin_stig, seed=args.seed,
                          n_patches=args.patches, pixel_size_nm=args.pixel_size_nm, frame_px=tuple(args.frame_px),
                          perturbation_um=args.perturbation_um, blank_fraction=args.blank_fraction)
        _estimator_settings(args)
        perturbation_m_from_args(args)
        for flag, n in (("--fidelity", args.fidelity), ("--probe-shapes", args.probe_shapes)):
            if 0 < n < 3:
                raise ValueError(f"{flag} {n}: a slope and offset are fitted, give at least 3 pairs")
        check_scans(cfg)
        if (args.probe_shapes or args.frame_artefacts or args.fidelity) and any("@" in m for m in cfg.methods):
            raise ValueError("a method's own scan (NAME@...) is for closed-loop runs; single pairs take "
                             "--dwell-ns, --pixel-size-nm and --frame-px")
        if not (args.probe_shapes or args.frame_artefacts or args.fidelity):
            # run_bench checks this too; here it is refused before any output, as an input error
            check_start_ranges(cfg, load_profile(cfg.profile, cfg.overrides))
    except ValueError as exc:   # also a scan beyond the microscope's limits (LimitError) or a broken profile
        print(f"deepfocus bench: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if args.probe_shapes:
        return _probe_shapes(args, cfg)
    if args.frame_artefacts:
        from .frame_artefacts import run_frame_artefacts
        res = run_frame_artefacts(cfg, args.frame_artefacts, log=lambda s: print(s, file=sys.stderr))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(json_safe(res), indent=1))
        print(json.dumps(json_safe(res["changes"])))
        return EXIT_OK
    if args.fidelity:
        from .bench import fidelity
        try:
            res = {"fidelity": fidelity(cfg, args.fidelity, cfg.methods[0])}
        except ValueError as exc:          # a pixel size or perturbation the estimator does not answer
            print(f"deepfocus bench: {exc}", file=sys.stderr)
            return EXIT_INPUT
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res["fidelity"].items() if k != "pairs"}))
        return EXIT_OK
    try:
        res = run_bench(cfg, log=lambda s: print(s, file=sys.stderr))
    except (OSError, ValueError) as exc:     # a specimen file that is missing or unreadable
        print(f"deepfocus bench: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        write(res, Path(args.json))
    print(json.dumps(json_safe(res["methods"]), indent=1, default=float))
    return EXIT_OK


def _probe_shapes(args, cfg) -> int:
    from .probe_shapes import run_probe_shapes
    if len(cfg.specimens) != 1:
        print("deepfocus bench --probe-shapes: give exactly one specimen image (--specimens PATH)", file=sys.stderr)
        return EXIT_INPUT
    try:
        res = run_probe_shapes(cfg.profile, cfg.overrides, cfg.specimens[0], cfg.methods, cfg.model, cfg.dwell_ns,
                               n=args.probe_shapes, seed=cfg.seed, log=lambda s: print(s, file=sys.stderr))
    except (OSError, ValueError) as exc:
        print(f"deepfocus bench: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(json_safe(res), indent=1))
    print(json.dumps({s: {m: {k: v for k, v in r.items() if k != "pairs"} for m, r in per.items()}
                      for s, per in json_safe(res)["shapes"].items()}))
    return EXIT_OK


def average_command(args) -> int:
    from .train import average_weights
    try:
        meta = average_weights(args.inputs, args.out)
    except (OSError, ValueError) as exc:
        print(f"deepfocus average: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(json.dumps({"out": str(args.out), "averaged_from": meta["averaged_from"]}))
    return EXIT_OK


def evaluate_command(args) -> int:
    from .evaluate import evaluate_models
    try:
        res = evaluate_models(args.model, args.shards, args.kind, args.specimen)
    except (OSError, ValueError) as exc:
        print(f"deepfocus evaluate: {exc}", file=sys.stderr)
        return EXIT_INPUT
    for path, m in res.items():
        print(json.dumps(json_safe(dict(m, model=path))) if args.json else
              f"{path}: MAE wd {m['mae_wd_um']:.3f} um, astig {m['mae_astig_um']:.3f} um; within 10 um of focus "
              f"{m['mae_wd_um_within_10um']:.3f} / {m['mae_astig_um_within_10um']:.3f} um; within 1 um and "
              f"0.5 um {m['within_1um_0.5um']:.3f}; slope {m['slope_wd_1_20um']:.3f} ({m['n_groups']} groups)")
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def train_command(args) -> int:
    from .train import TrainConfig, generate, train
    if args.generate_only and args.train_only:
        print("deepfocus train: --generate-only and --train-only exclude each other (neither: generate, then train)",
              file=sys.stderr)
        return EXIT_INPUT
    try:
        cfg = TrainConfig.load(args.config)
    except (OSError, ValueError, TypeError) as exc:
        print(f"deepfocus train: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if args.threads is not None:
        # the machine's cores, not the recipe: a run resumed with other threads trains the same model
        cfg.threads = args.threads
    if not args.train_only:
        generate(cfg)
    if not args.generate_only:
        best = train(cfg, max_seconds=args.max_seconds)
        print(json.dumps(json_safe(best)))
    return EXIT_OK


def speed_command(args) -> int:
    from dataclasses import asdict

    from .models import ARCHITECTURES
    from .perf import measure
    unknown = [a for a in (args.archs.split(",") if args.archs else []) if a not in ARCHITECTURES]
    if unknown:
        print(f"deepfocus speed: unknown architecture(s) {', '.join(unknown)}; known: {', '.join(ARCHITECTURES)}",
              file=sys.stderr)
        return EXIT_INPUT
    try:
        rows = measure(args.archs.split(",") if args.archs else None, tuple(args.threads), args.patches,
                       args.patch_px, args.repeats, args.idle_ms * 1e-3)
    except ValueError as exc:
        print(f"deepfocus speed: --idle-ms {args.idle_ms:g}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    for r in rows:
        print(json.dumps(asdict(r)) if args.json else
              f"{r.arch:12s} {r.variant:14s} threads {r.threads}  {r.n_patches} x {r.patch_px} px  "
              f"{r.median_s * 1e3:8.1f} ms" + (f"  (after {r.idle_s * 1e3:g} ms idle)" if r.idle_s else ""))
    return EXIT_OK


def survey_command(args) -> int:
    from .survey import survey

    def report(run) -> None:
        print(f"{run.index:3d} {run.profile} {' '.join(run.overrides)} {run.pixel_size_nm:g} nm "
              f"{run.frame_px[0]}x{run.frame_px[1]} {run.dwell_ns:g} ns from {run.start_wd_um:+g} um "
              f"{run.start_stig}: {run.outcome}, {'within' if run.within_margin else 'OUTSIDE'} the margin "
              f"after {run.pairs} pairs {run.message[:100]}", file=sys.stderr, flush=True)
    try:
        out = survey(args.kind, args.runs, args.seed, args.specimens or [], args.model, on_run=report)
    except (ValueError, OSError) as exc:
        print(f"deepfocus survey: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe(out), indent=1, default=float))
    print(json.dumps({k: out[k] for k in ("kind", "seed", "ends", "converged_outside_margin")}))
    # a run that says it converged outside the margin is the loop answering wrong without saying so
    return EXIT_FAILED if out["converged_outside_margin"] else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepfocus", description="DeepFocus autofocus and autostigmation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="correction for an image pair taken at wd -/+ perturbation")
    p.add_argument("minus", type=Path)
    p.add_argument("plus", type=Path)
    p.add_argument("--pixel-size-nm", type=float, required=True)
    p.add_argument("--perturbation-um", type=float, default=None)
    p.add_argument("--model", default=None, help="TorchScript model (default: the shipped model)")
    p.add_argument("--profile", default=None, help="microscope profile whose calibration converts um to units")
    p.add_argument("--set", action="append", metavar="K=V")
    p.add_argument("--aperture-angle-mrad", type=float, default=None,
                   help="beam half-angle of the microscope that took the pair (default: the profile's calibration, "
                        "else the model's reference)")
    p.add_argument("--device", default="auto")
    p.add_argument("--patches", type=int, default=None, metavar="N", help=PATCHES_HELP)
    p.add_argument("--json", action="store_true")
    try:
        from .service.cli import add_connect_arguments
        add_connect_arguments(p)
    except Exception:  # noqa: BLE001 - the local path works without the daemon's dependencies
        pass
    p.set_defaults(func=predict_command)

    def sim_args(q):
        q.add_argument("--profile", default="setup_a")
        q.add_argument("--set", action="append", metavar="K=V", help="profile override, repeatable")
        q.add_argument("--model", default=None)
        q.add_argument("--dwell-ns", type=float, default=200.0)
        q.add_argument("--iterations", type=_positive_int, default=5)
        q.add_argument("--patches", type=int, default=None, metavar="N", help=PATCHES_HELP)
        q.add_argument("--perturbation-um", type=float, default=None, metavar="D",
                       help="take the pairs at wd -/+ D um (default: the one the method wants on this beam and "
                            "pixel size: DeepFocus 5 um at 4 mrad and 10 nm, further apart on narrower beams or "
                            "coarser pixels; MAPFoSt 5 um)")

    a = sub.add_parser("autofocus", help="run the closed loop on the simulated microscope and print the trace")
    sim_args(a)
    a.add_argument("--method", default="deepfocus", choices=("deepfocus", "mapfost", "sweep"))
    a.add_argument("--specimen", default=None, help=SPECIMEN_HELP)
    a.add_argument("--pixel-size-nm", type=float, default=10.0)
    a.add_argument("--frame-px", type=int, nargs=2, default=(1024, 768))
    a.add_argument("--start-wd-um", type=float, default=0.0, help="initial defocus set before the loop")
    a.add_argument("--start-stig", type=float, nargs=2, default=None, help="initial stigmator offset (units)")
    a.add_argument("--json", action="store_true", help="one line of JSON")
    # without --iterations the profile's autofocus.max_iterations
    a.set_defaults(func=autofocus_command, iterations=None)

    c = sub.add_parser("calibrate", help="measure the wd scale (effective aperture angle) and the stigmator "
                                         "matrix from known steps, for the microscope's YAML")
    sim_args(c)
    c.set_defaults(dwell_ns=100.0, iterations=4)
    c.add_argument("--specimen", default=None, help=SPECIMEN_HELP)
    c.add_argument("--method", default="deepfocus", choices=("deepfocus", "mapfost"),
                   help="the estimator to calibrate (each answers with its own scale)")
    c.add_argument("--pixel-size-nm", type=float, default=10.0)
    c.add_argument("--frame-px", type=int, nargs=2, default=(512, 512))
    c.add_argument("--stig-steps", type=float, nargs="+", default=None, metavar="UNITS",
                   help="stigmator steps, each taken both ways along x and along y (default: "
                        "calibrate.CalibrationSettings' +-2 and +-4; small astigmatism is answered short on a "
                        "narrow beam, so steps of 1 unit understate the scale)")
    c.add_argument("--no-focus-first", dest="focus_first", action="store_false",
                   help="calibrate around the current settings without running the autofocus first")
    c.add_argument("--json", action="store_true", help="one line of JSON")
    c.set_defaults(func=calibrate_command)

    b = sub.add_parser("bench", help="closed-loop comparison of methods on the simulated microscope")
    sim_args(b)
    b.set_defaults(dwell_ns=50.0, iterations=3)
    b.add_argument("--specimens", nargs="*", default=[], help=SPECIMEN_HELP + " (one per trial in turn)")
    b.add_argument("--pixel-size-nm", type=float, default=10.0)
    b.add_argument("--frame-px", type=int, nargs=2, default=(1024, 768))
    b.add_argument("--methods", default="deepfocus,mapfost,sweep",
                   help="comma-separated deepfocus, mapfost, sweep; NAME@25ns:20nm:512x384 takes that method's "
                        "focus frames at its own dwell, pixel size and frame size (any of the three); a method may "
                        "appear at several such operating points")
    b.add_argument("--trials", type=_positive_int, default=10)
    b.add_argument("--start-range-um", type=float, default=30.0)
    b.add_argument("--start-range-stig", type=float, default=6.0)
    b.add_argument("--starts", choices=("uniform", "corners"), default="uniform",
                   help="uniform: each trial starts within +-the ranges; corners: at the ranges' corners, the 8 sign "
                        "combinations in turn from (+wd, +x, -y) (the thesis' convergence start)")
    b.add_argument("--margin-wd-um", type=float, default=1.0)
    b.add_argument("--margin-stig", type=float, default=0.25)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--fidelity", type=int, default=0, metavar="N",
                   help="instead: single-iteration fidelity of the first method over N pairs (|wd| 1-20 um)")
    b.add_argument("--probe-shapes", type=int, default=0, metavar="N",
                   help="instead: N single pairs per probe shape (disc, gauss, halo, rim) blurred from one specimen "
                        "image, predicted vs true wd per shape and method")
    b.add_argument("--blank-fraction", type=float, default=0.0, metavar="F",
                   help="make this share of each specimen's field bare dark ground, as where a section is milled "
                        "through to the wafer (the frames show blank and tissue bands in these shares)")
    b.add_argument("--frame-artefacts", type=int, default=0, metavar="N",
                   help="instead: N single pairs changed after acquisition as real saved frames are (the wd + d "
                        "frame's gain, gamma, shading, a shift; a data bar, detector bandwidth, smoothing, clipping, "
                        "JPEG or line offsets on both); wd bias and MAE, astigmatism MAE per change and method")
    b.add_argument("--json", default=None, metavar="OUT", help="write the results here (and a PNG beside it)")
    b.set_defaults(func=bench_command)

    u = sub.add_parser("survey", help="the closed loop once on each of many simulated microscopes drawn at random")
    u.add_argument("--kind", choices=("geometry", "detector"), default="geometry",
                   help="geometry: beam angle, pixel size, frame, dwell, scan rotation, setup_a or setup_b; "
                        "detector: detector, probe shape and drift on setup_a at 10 nm")
    u.add_argument("--runs", type=_positive_int, default=60)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--specimens", nargs="*", default=[], help=SPECIMEN_HELP + " (one drawn per run)")
    u.add_argument("--model", default=None)
    u.add_argument("--json", default=None, metavar="OUT", help="write every run's microscope and end here")
    u.set_defaults(func=survey_command)

    t = sub.add_parser("train", help="generate training data on the simulator and train (resumes)")
    t.add_argument("--config", required=True, type=Path)
    t.add_argument("--generate-only", action="store_true")
    t.add_argument("--train-only", action="store_true")
    t.add_argument("--max-seconds", type=float, default=None)
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for rendering and training (default: the config's `threads`)")
    t.set_defaults(func=train_command)

    e = sub.add_parser("evaluate", help="validation figures of exported models on a training run's shards")
    e.add_argument("--model", type=Path, action="append", required=True, help="exported model (repeat to compare)")
    e.add_argument("--shards", type=Path, required=True, help="a run's data folder (RUN_DIR/data)")
    e.add_argument("--kind", choices=["val", "train"], default="val")
    e.add_argument("--specimen", type=int, default=None, metavar="I",
                   help="only the groups of one specimen: an index into datagen.VAL_SPECIMENS (0 FlyEM 520, "
                        "1 EPFL slices 27-31) or, with --kind train, TRAIN_SPECIMENS")
    e.add_argument("--json", action="store_true", help="one JSON line per model")
    e.set_defaults(func=evaluate_command)

    w = sub.add_parser("average", help="average the weights of snapshots of one training run into one model")
    w.add_argument("inputs", type=Path, nargs="+", help="best.pt exports and/or checkpoint.pt files of one run")
    w.add_argument("--out", type=Path, required=True)
    w.set_defaults(func=average_command)

    v = sub.add_parser("speed", help="time the models per correction (eager, TorchScript, threads, int8)")
    v.add_argument("--archs", default=None, help="comma-separated (default: all)")
    v.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    v.add_argument("--patches", type=int, default=8)
    v.add_argument("--patch-px", type=int, default=256)
    v.add_argument("--repeats", type=int, default=5)
    v.add_argument("--idle-ms", type=float, default=0.0,
                   help="leave the machine idle this long before each timed call, as the loop does while it "
                        "acquires the pair (default 0: calls back to back)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=speed_command)

    try:
        from .service.cli import register_service_commands
        register_service_commands(sub)
    except Exception:  # noqa: BLE001 - serve/ping need pyzmq; the rest does not
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
