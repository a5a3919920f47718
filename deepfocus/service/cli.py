"""Command-line verbs of the daemon: ``serve``, ``ping`` and the remote path of ``predict``.

``register_service_commands(subparsers)`` adds ``serve`` and ``ping`` to the
``deepfocus`` command; ``add_connect_arguments(parser)`` adds ``--connect`` and
``--timeout-s`` to a ``predict`` parser, whose handler calls
``predict_remote(args)`` when ``args.connect`` is set.

Exit codes: 0 success; 1 daemon answered but is not healthy (no model);
2 daemon not answering; 3 daemon rejected the request; 4 bad local input.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import logging
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_UNHEALTHY, EXIT_UNAVAILABLE, EXIT_REJECTED, EXIT_INPUT = 0, 1, 2, 3, 4

log = logging.getLogger("deepfocus.service")


def register_service_commands(subparsers: Any) -> None:
    """Add ``serve`` and ``ping`` to an ``argparse`` subparsers object."""
    from .server import DEFAULT_ADDRESS

    s = subparsers.add_parser("serve", help="run the DeepFocus daemon (ZeroMQ)",
                              description="Serve autofocus estimates over ZeroMQ. Binds loopback "
                              "by default; a non-loopback address needs CURVE keys.")
    s.add_argument("--bind", default=DEFAULT_ADDRESS, metavar="ADDR",
                   help=f"ZeroMQ endpoint to bind (default {DEFAULT_ADDRESS})")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where models run (auto: GPU when there is one)")
    s.add_argument("--models", type=Path, metavar="DIR",
                   help="directory of TorchScript model files the 'models' operation can load")
    s.add_argument("--model", metavar="NAME",
                   help="model to activate at start: a file in --models DIR, a shipped model's name, or a file's path")
    s.add_argument("--estimator", metavar="MODULE:CALLABLE",
                   help="an Estimator factory to serve instead of (or besides) model files")
    s.add_argument("--curve-secret-key", type=Path, metavar="FILE",
                   help="the daemon's CURVE '.key_secret' file (zmq.auth.create_certificates)")
    s.add_argument("--curve-authorized-keys", type=Path, metavar="DIR",
                   help="directory of public '.key' files of clients allowed to connect")
    s.add_argument("--profile", metavar="NAME|PATH",
                   help="microscope profile whose calibration (stigmator units, aperture angle) the models use")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key of --profile (repeatable)")
    s.add_argument("--patches", type=int, default=None, metavar="N",
                   help="patch pairs per estimate on a 1024 x 768 frame for the model files it loads (default 8; "
                        "larger frames get as many per 1024 x 768 of their area, up to 16); 12 cover a "
                        "1024 x 768 frame: more precise, most of all at low dose, 30-40 %% more compute")
    s.add_argument("--queue-size", type=int, default=64, help="requests queued before 'busy'")
    s.add_argument("--max-side-px", type=int, default=8192, help="largest image side accepted")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.set_defaults(func=serve_command)

    p = subparsers.add_parser("ping", help="check that a DeepFocus daemon answers and is healthy")
    add_connect_arguments(p, required=True, default_timeout_s=2.0)
    p.add_argument("--json", action="store_true", help="print the health reply as JSON")
    p.set_defaults(func=ping_command)


def add_connect_arguments(parser: argparse.ArgumentParser, required: bool = False,
                          default_timeout_s: float = 30.0) -> None:
    """``--connect ADDR [--timeout-s T] [--retries N]`` and the client's CURVE key options."""
    parser.add_argument("--connect", metavar="ADDR", required=required,
                        help="address of a running daemon, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--timeout-s", type=float, default=default_timeout_s, metavar="T",
                        help=f"seconds to wait for each attempt (default {default_timeout_s:g})")
    parser.add_argument("--retries", type=int, default=1, metavar="N",
                        help="resends after a timeout before giving up (default 1)")
    parser.add_argument("--curve-server-key", type=Path, metavar="FILE",
                        help="daemon's public CURVE '.key' file (non-loopback daemons)")
    parser.add_argument("--curve-client-key", type=Path, metavar="FILE",
                        help="this client's CURVE '.key_secret' file")


def _client_from_args(args: argparse.Namespace):
    from ..client import CurveClientKeys, DeepFocusClient

    curve = None
    server_key = getattr(args, "curve_server_key", None)
    client_key = getattr(args, "curve_client_key", None)
    if server_key or client_key:
        if not (server_key and client_key):
            raise ValueError("CURVE needs both --curve-server-key and --curve-client-key")
        curve = CurveClientKeys(server_key, client_key)
    return DeepFocusClient(args.connect, timeout_s=getattr(args, "timeout_s", 30.0) or 30.0,
                           retries=getattr(args, "retries", 1), curve=curve)


# -- serve ----------------------------------------------------------------------------

def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    if importlib.util.find_spec("torch") is None:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_estimator_factory(spec: str, device: str):
    """Build an Estimator from ``module:callable``; the callable gets ``device=`` if it takes it."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--estimator must look like module:callable, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    try:
        takes_device = "device" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_device = False
    return factory(device=device) if takes_device else factory()


def _shipped_model(models_dir: Path | None) -> tuple[Path | None, str | None]:
    """The models directory and model to start with when none was named: the shipped default."""
    try:
        from ..estimator import DEFAULT_MODEL, MODELS_DIR
    except Exception:  # torch missing or the estimator package unusable: start without a model
        return models_dir, None
    models_dir = models_dir or MODELS_DIR
    default = Path(models_dir) / DEFAULT_MODEL.name
    return models_dir, (default.name if default.is_file() else None)


def daemon_model_loader(profile: str | None, overrides: list[str], patches: int | None = None):
    """A model loader for the one microscope a daemon serves: every model calibrated for it (``profile``) and
    answering from ``patches`` patch pairs; either may be None (uncalibrated, the estimator's default)."""
    from ..cli import estimator_settings

    cfg = None
    if profile:
        from hardware.config import load_profile
        cfg = load_profile(profile, overrides)
    elif overrides:
        raise ValueError("--set needs --profile")
    settings = estimator_settings(patches)

    def load(path: Path, device: str = "cpu"):
        from ..model_files import load_estimator, load_estimator_for
        if cfg is None:
            return load_estimator(path, device=device, settings=settings)
        return load_estimator_for(cfg, path, device=device, settings=settings)
    return load


def serve_command(args: argparse.Namespace) -> int:
    from .protocol import Limits
    from .server import CurveServerKeys, Server, ServerConfig, ServiceConfigError, \
        configure_json_logging

    configure_json_logging(args.log_level)
    curve = None
    if args.curve_secret_key or args.curve_authorized_keys:
        if not (args.curve_secret_key and args.curve_authorized_keys):
            log.error("CURVE needs both --curve-secret-key and --curve-authorized-keys")
            return EXIT_INPUT
        curve = CurveServerKeys(args.curve_secret_key, args.curve_authorized_keys)
    try:
        device = resolve_device(args.device)
        estimator = load_estimator_factory(args.estimator, device) if args.estimator else None
        models_dir, model = args.models, args.model
        if estimator is None and model is None:
            models_dir, model = _shipped_model(models_dir)
        elif model is not None and models_dir is None:
            # a model file's path serves from its folder; a bare name is one of the shipped models
            models_dir, model = (Path(model).parent, Path(model).name) if Path(model).parent != Path(".") \
                else (_shipped_model(None)[0], model)
        config = ServerConfig(bind=args.bind, device=device, models_dir=models_dir,
                              model=model, curve=curve, queue_size=args.queue_size,
                              limits=Limits(max_side_px=args.max_side_px))
        extra = {}
        if args.profile or args.set or args.patches is not None:
            extra["loader"] = daemon_model_loader(args.profile, args.set, args.patches)
        server = Server(config, estimator=estimator,
                        estimator_name=(args.estimator or "builtin").rpartition(":")[2], **extra)
    except (ServiceConfigError, ValueError, ImportError, AttributeError, OSError) as exc:
        log.error("cannot start", extra={"fields": {"error": str(exc)}})
        print(f"deepfocus serve: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # model load failures and the like
        log.error("cannot start", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}})
        print(f"deepfocus serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    server.install_signal_handlers()
    try:
        server.serve_forever()
    except Exception as exc:  # e.g. address already in use
        log.error("daemon failed", extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}})
        print(f"deepfocus serve: cannot serve on {args.bind}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


# -- ping -----------------------------------------------------------------------------

def _ask_daemon(args: argparse.Namespace, command: str, call):
    """Run ``call(client)``; returns (result, None) or (None, exit code) after printing why it failed."""
    from ..client import DaemonUnavailable, RemoteError

    try:
        with _client_from_args(args) as client:
            return call(client), None
    except DaemonUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return None, EXIT_UNAVAILABLE
    except RemoteError as exc:
        print(str(exc), file=sys.stderr)
        return None, EXIT_REJECTED
    except (ValueError, OSError) as exc:
        print(f"deepfocus {command}: {exc}", file=sys.stderr)
        return None, EXIT_INPUT


def ping_command(args: argparse.Namespace) -> int:
    health, code = _ask_daemon(args, "ping", lambda client: client.health())
    if code is not None:
        return code
    healthy = health.get("status") == "ok"
    if args.json:
        print(json.dumps(health))
    else:
        print(f"{args.connect}: {health.get('status')} (model {health.get('active_model')}, "
              f"queue {health.get('queue_depth')}, device {health.get('device')})")
    return EXIT_OK if healthy else EXIT_UNHEALTHY


# -- predict --connect ----------------------------------------------------------------

def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``predict`` contract's arguments (for parsers that do not define them already)."""
    parser.add_argument("minus", type=Path, help="image taken at wd - perturbation")
    parser.add_argument("plus", type=Path, help="image taken at wd + perturbation")
    parser.add_argument("--pixel-size-nm", type=float, required=True)
    parser.add_argument("--perturbation-um", type=float, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def predict_remote(args: argparse.Namespace) -> int:
    """``deepfocus predict MINUS PLUS ... --connect ADDR``: ask the daemon for the correction."""
    from ..cli import check_pixel_size_nm, perturbation_m_from_args
    from ..image_files import read_image, recorded_pair_note, recorded_pixel_size_note
    from .protocol import json_safe

    try:
        # checked here, by flag and unit: 0 or NaN must not reach the daemon as "no perturbation given"
        check_pixel_size_nm(args.pixel_size_nm)
        perturbation_m = perturbation_m_from_args(args)
        minus, plus = read_image(args.minus), read_image(args.plus)
        recorded_pair_note(args.minus, args.plus, None)        # frames recorded the other way round: refused
    except (OSError, ValueError) as exc:
        print(f"deepfocus predict: {exc}", file=sys.stderr)
        return EXIT_INPUT
    note = recorded_pixel_size_note(args.minus, args.pixel_size_nm)
    if note:
        print(f"deepfocus predict: {note}", file=sys.stderr)

    def ask(client):
        # hello first: the daemon's own size limits, and the beam its answers assume (printed as the local predict
        # prints it)
        hello = client.hello()
        return client.estimate(minus, plus, args.pixel_size_nm * 1e-9, perturbation_m), hello

    answer, code = _ask_daemon(args, "predict", ask)
    if code is not None:
        return code
    corr, hello = answer
    # the daemon's own pair where none was given: known from its hello
    note = recorded_pair_note(args.minus, args.plus, perturbation_m or hello.get("perturbation_m"))
    if note:
        print(f"deepfocus predict: {note}", file=sys.stderr)
    if getattr(args, "json", False):
        alpha = hello.get("aperture_angle_mrad") or hello.get("alpha_ref_mrad")
        print(json.dumps(json_safe(dict(corr.to_dict(), aperture_angle_mrad=alpha))))
    else:
        print(f"add wd {corr.wd_um:+.3f} um (+- {corr.uncertainty_wd_um:.3f}), "
              f"stig x {corr.stig_x:+.4f}, stig y {corr.stig_y:+.4f} "
              f"(+- {corr.uncertainty_stig:.4f}); model {corr.model_id}, status {corr.status}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the daemon's verbs (``python -m deepfocus.service``)."""
    parser = argparse.ArgumentParser(prog="python -m deepfocus.service",
                                     description="DeepFocus daemon and its client")
    sub = parser.add_subparsers(dest="command", required=True)
    register_service_commands(sub)
    p = sub.add_parser("predict", help="ask a running daemon for the correction of an image pair")
    add_predict_arguments(p)
    add_connect_arguments(p, required=True)
    p.set_defaults(func=predict_remote)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
