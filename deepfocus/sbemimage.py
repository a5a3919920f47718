"""DeepFocus as an autofocus method of SBEMimage (or any software with its SEM API).

Dependency-light on purpose: numpy, pyzmq, and tifffile or Pillow to read the
frames the microscope saved. The models run in the DeepFocus daemon, not here;
how their answers become steps (the learned scale and stigmator map, the stigmator
answers weighed near focus, the guard against growing ones) is the closed loop's
own (``deepfocus.steps.StepPlanner``).

The SEM object needs SBEMimage's SEM methods::

    get_wd() -> float                 # metres
    set_wd(target_wd)                 # metres
    get_stig_xy() -> (x, y)           # stigmator units (SmartSEM: %)
    set_stig_xy(target_x, target_y)
    apply_frame_settings(frame_size_selector, pixel_size, dwell_time)   # nm, us
    acquire_frame(save_path_filename, extra_delay=0) -> bool
    STORE_RES                         # optional: [(width, height), ...] per frame size selector
    DWELL_TIME                        # optional: the dwell times (us) the SEM offers

With ``STORE_RES`` the daemon is asked before the first frame whether its model
answers frames of that size at this pixel size; a scan it cannot answer ends the
run before any dose is spent. A setter that returns False (the SEM did not take
the setting) ends the run at once.
``run_deepfocus_af(sem, settings)`` runs the loop and returns a ``DeepFocusResult``;
``DeepFocusAutofocus.run()`` returns SBEMimage's message string, containing
``ERROR`` on failure, which its acquisition loop already checks. A correction
is never applied blindly: one that would move wd or stigmators further from
where the run started than ``max_wd_stig_diff`` allows, or that is not finite,
ends the run with the original settings restored.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from .client import (CurveClientKeys, DaemonUnavailable, DeepFocusClient, RemoteError, microscope_changes,
                     microscope_of)
from .correction import far_pair_answered_m, far_perturbation_m, in_perturbation_range, pair_perturbation_m
from .image_files import read_image
from .steps import StepPlanner, StepSettings, StigmatorsDiverging, overshoot_m

# as hardware.config's (this module does without the hardware package)
MAX_LENS_PLAY_UM = 5.0
# max_wd_stig_diff's wd limit above this is taken for a value in other units than metres
MAX_WD_DIFF_M = 1e-3
# the SEM read back this far from the start after a failed run: not restored
WD_READBACK_M = 0.1e-6
STIG_READBACK = 0.01


def _three_numbers(raw: str) -> tuple[float, float, float]:
    """SBEMimage's ``max_wd_stig_diff``: a JSON list, or three comma-separated numbers."""
    try:
        values = json.loads(raw)
    except json.JSONDecodeError:
        values = [v for v in raw.strip("()[] ").split(",")]
    values = [float(v) for v in (values if isinstance(values, list) else [values])]
    if len(values) != 3:
        raise ValueError(f"three values [wd in metres, stig x, stig y] are needed, got {len(values)}")
    return values[0], values[1], values[2]


# optional [autofocus] keys: (key, settings field, conversion)
CONFIG_KEYS_READ: tuple = tuple(
    (f"deepfocus_{name}", name, conv) for name, conv in (
        ("address", str), ("timeout_s", float), ("retries", int), ("frame_size_selector", int),
        ("pixel_size_nm", float), ("dwell_time_us", float), ("perturbation_um", float), ("max_iterations", int),
        ("wd_tolerance_um", float), ("stig_tolerance", float), ("far_perturbation_factor", float),
        ("lens_play_um", float), ("curve_server_public_key", str), ("curve_client_secret_key", str)))
CONFIG_KEYS = frozenset(key for key, _, _ in CONFIG_KEYS_READ)
READS_AS = {float: "a number", int: "a whole number", _three_numbers: "three numbers [wd in metres, stig x, stig y]"}


class SBEMimageSEM(Protocol):
    def get_wd(self) -> float: ...
    def set_wd(self, target_wd: float) -> Any: ...
    def get_stig_xy(self) -> tuple[float, float]: ...
    def set_stig_xy(self, target_stig_x: float, target_stig_y: float) -> Any: ...
    def apply_frame_settings(self, frame_size_selector: int, pixel_size: float,
                             dwell_time: float) -> Any: ...
    def acquire_frame(self, save_path_filename: str, extra_delay: float = 0) -> Any: ...


@dataclass
class DeepFocusSettings:
    """Settings in SBEMimage's own units (nm, us, metres for wd, % for stig)."""
    address: str = "tcp://127.0.0.1:5555"
    timeout_s: float = 30.0
    retries: int = 1
    # SBEMimage's store-resolution index of the focus frames; None: the SEM's index of 1024 x 768 (STORE_RES; 0 on
    # SBEMimage's ZEISS presets, 13 on its TESCAN ones), 0 where the SEM object has no STORE_RES
    frame_size_selector: int | None = None
    pixel_size_nm: float = 10.0
    dwell_time_us: float = 0.2
    # None: the pair the daemon's model wants on its microscope's beam at this pixel size (5 um at 10 nm on a
    # 4 mrad beam, further apart on narrower beams or coarser pixels; deepfocus/README.md "Which pair ...")
    perturbation_um: float | None = None
    max_iterations: int = 3
    # converged when the last correction is smaller than these (thesis margins)
    wd_tolerance_um: float = 1.0
    stig_tolerance: float = 0.25
    # SBEMimage's [autofocus] max_wd_stig_diff: largest change from the start (m, %, %)
    max_wd_stig_diff: tuple[float, float, float] = (10e-6, 1.0, 1.0)
    # SBEMimage's aberr_mode_bools: correct focus, stig x, stig y
    aberr_mode: tuple[bool, bool, bool] = (True, True, True)
    settle_s: float = 0.2               # after large wd changes, before scanning
    # a pair the daemon refuses because its patches disagree on wd (far beyond its model's range) is taken once
    # more at this many times the perturbation, where the model answers it, and its wd answer applied; 0: never
    far_perturbation_factor: float = 3.0
    # half-width of the objective lens' play as `deepfocus calibrate` measured it (the daemon profile's
    # autofocus.lens_play_um): each wd step then ends coming down, offset by it; 0: not compensated
    lens_play_um: float = 0.0
    frame_suffix: str = ".tif"
    # CURVE key files for a daemon on another machine (docs/sbemimage.md, "Remote daemon"): the daemon's public
    # .key file and this client's .key_secret file; both or neither
    curve_server_public_key: str | None = None
    curve_client_secret_key: str | None = None
    workdir: str | None = None           # None: a temporary directory, removed afterwards
    options: dict[str, Any] = field(default_factory=dict)  # passed to the daemon's estimator

    @classmethod
    def from_sbemimage_config(cls, cfg: Any, section: str = "autofocus", **overrides: Any
                              ) -> "DeepFocusSettings":
        """Read the keys SBEMimage already has plus optional ``deepfocus_*`` keys; a key left empty is unset. A
        value that does not read, or a ``deepfocus_*`` key this version does not know (a typo would otherwise be
        ignored), is refused by name."""
        s = cfg[section]
        unknown = sorted(k for k in s if k.startswith("deepfocus_") and k not in CONFIG_KEYS)
        if unknown:
            raise ValueError(f"[{section}] has unknown DeepFocus key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(CONFIG_KEYS))}")

        def read(key: str, conv: Any) -> Any:
            raw = str(s[key]).strip() if key in s else ""
            if not raw:
                return None
            try:
                return conv(raw)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"[{section}] {key} = {raw!r} is not {READS_AS.get(conv, conv.__name__)} ({exc})") \
                    from None

        kw: dict[str, Any] = {}
        for key, field_name, conv in (("max_wd_stig_diff", "max_wd_stig_diff", _three_numbers),
                                      ("pixel_size", "pixel_size_nm", float)) + CONFIG_KEYS_READ:
            value = read(key, conv)
            if value is not None:
                kw[field_name] = value
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self) -> None:
        # named by their SBEMimage config keys, with the unit each is in: a value in another unit is the
        # likely slip (nm for um, um for m), and some would run on, at 1000 x the dose or without a limit
        def need(ok: bool, key: str, what: str, value: Any) -> None:
            if not ok:
                raise ValueError(f"{key} must be {what}, got {value!r}")

        def finite(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(isinstance(self.address, str) and self.address.split("://")[0] in ("tcp", "ipc", "inproc"),
             "deepfocus_address", "a ZeroMQ address such as tcp://127.0.0.1:5555", self.address)
        need(self.frame_size_selector is None or (isinstance(self.frame_size_selector, int)
                                                 and self.frame_size_selector >= 0),
             "deepfocus_frame_size_selector", "an index into the SEM's store resolutions (0 or more)",
             self.frame_size_selector)
        need(finite(self.pixel_size_nm) and 0.1 <= self.pixel_size_nm <= 1000,
             "pixel_size (or deepfocus_pixel_size_nm)", "the focus frames' pixel size in nanometres (0.1-1000)",
             self.pixel_size_nm)
        need(finite(self.dwell_time_us) and 0.01 <= self.dwell_time_us <= 100, "deepfocus_dwell_time_us",
             "the focus frames' dwell time in microseconds (0.01-100; 0.2 is 200 ns)", self.dwell_time_us)
        need(isinstance(self.max_iterations, int) and self.max_iterations >= 1, "deepfocus_max_iterations",
             "1 or more", self.max_iterations)
        lim = tuple(self.max_wd_stig_diff)
        need(len(lim) == 3 and all(finite(v) and v > 0 for v in lim) and lim[0] <= MAX_WD_DIFF_M,
             "max_wd_stig_diff", f"three positive limits [wd in metres (at most {MAX_WD_DIFF_M:g}: 10 um is "
             "1e-05), stig x, stig y]", self.max_wd_stig_diff)
        need(finite(self.lens_play_um) and 0 <= self.lens_play_um <= MAX_LENS_PLAY_UM, "deepfocus_lens_play_um",
             f"between 0 (not compensated) and {MAX_LENS_PLAY_UM:g} um", self.lens_play_um)
        need((self.curve_server_public_key is None) == (self.curve_client_secret_key is None),
             "deepfocus_curve_server_public_key and deepfocus_curve_client_secret_key",
             "given both or neither", (self.curve_server_public_key, self.curve_client_secret_key))

    def client(self) -> DeepFocusClient:
        """A client for the daemon these settings name (with CURVE keys where given)."""
        curve = None
        if self.curve_server_public_key:
            curve = CurveClientKeys(Path(self.curve_server_public_key), Path(self.curve_client_secret_key or ""))
        return DeepFocusClient(self.address, self.timeout_s, self.retries, curve=curve)


@dataclass
class DeepFocusIteration:
    wd_before_m: float
    stig_before: tuple[float, float]
    correction: dict[str, Any]
    applied: bool
    far: bool = False            # the pair was taken at the far perturbation, its wd answer alone applied


@dataclass
class DeepFocusResult:
    ok: bool
    message: str
    wd_m: float
    stig_xy: tuple[float, float]
    start_wd_m: float
    start_stig_xy: tuple[float, float]
    converged: bool = False
    iterations: list[DeepFocusIteration] = field(default_factory=list)
    duration_s: float = 0.0
    # what the daemon's hello said of the microscope its answers are for (client.microscope_of)
    daemon_microscope: dict[str, Any] = field(default_factory=dict)

    @property
    def new_wd_stig(self) -> tuple[float | None, float | None, float | None]:
        """SBEMimage's ``(wd, stig_x, stig_y)`` triple; Nones on failure."""
        if not self.ok:
            return None, None, None
        return self.wd_m, self.stig_xy[0], self.stig_xy[1]


class AutofocusAbort(RuntimeError):
    """Ends a run; the message becomes the ERROR message SBEMimage logs."""


def run_deepfocus_af(sem: SBEMimageSEM, settings: DeepFocusSettings | None = None,
                     client: DeepFocusClient | None = None,
                     expect_microscope: dict[str, Any] | None = None) -> DeepFocusResult:
    """Focus and stigmate with DeepFocus through the daemon; never leaves an unchecked jump. ``expect_microscope``:
    an earlier run's ``daemon_microscope``; a daemon that now answers for another microscope is refused."""
    st = settings or DeepFocusSettings()
    own_client = client is None
    client = client or st.client()
    t_start = time.monotonic()
    start_wd = float(sem.get_wd())
    start_stig = tuple(float(v) for v in sem.get_stig_xy())
    workdir = Path(st.workdir) if st.workdir else Path(tempfile.mkdtemp(prefix="deepfocus_af_"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = DeepFocusResult(ok=False, message="", wd_m=start_wd, stig_xy=start_stig,  # type: ignore[arg-type]
                             start_wd_m=start_wd, start_stig_xy=start_stig)  # type: ignore[arg-type]
    try:
        # before any frame: the daemon is there, and says whether its answers share one scale and which pairs
        # its model answers
        hello = _hello(client)
        if hello:
            result.daemon_microscope = microscope_of(hello)
            changed = microscope_changes(result.daemon_microscope, expect_microscope) if expect_microscope else ""
            if changed:
                raise AutofocusAbort(f"the daemon now answers for another microscope: {changed}; it was restarted "
                                     "with another profile. Restart it with this microscope's profile (or restart "
                                     "SBEMimage if the change was meant); no frame was taken")
        planner = _planner(hello, st)
        d = _pair_perturbation(hello, st)
        far_d = _far_perturbation(hello, d, st)
        selector, shape = _focus_frames(sem, st)
        _check_scan(client, hello, shape, st, d)
        far_d = _far_answered(client, hello, shape, st, d, far_d)
        pair_d, far_taken = d, False
        _sem_call(sem.apply_frame_settings, f"the frame settings (deepfocus_frame_size_selector {selector}, "
                  f"pixel size {st.pixel_size_nm:g} nm, dwell {st.dwell_time_us:g} us)",
                  selector, st.pixel_size_nm, st.dwell_time_us)
        wd, stig = start_wd, start_stig
        for it in range(1, st.max_iterations + 1):
            far = pair_d != d
            minus, plus = _acquire_pair(sem, wd, pair_d, st, workdir, it)
            try:
                corr = client.estimate(minus, plus, st.pixel_size_nm * 1e-9, pair_d, options=st.options or None)
            except DaemonUnavailable as exc:
                raise AutofocusAbort(str(exc)) from exc
            except RemoteError as exc:
                raise AutofocusAbort(f"daemon rejected the image pair: {exc}") from exc
            if far_d is not None and not far and not far_taken and it < st.max_iterations \
                    and corr.status == "uncertain" and corr.extra.get("wd_uncertain"):
                # far beyond the model's range (deepfocus.autofocus, "far pairs"): once more at the far perturbation
                result.iterations.append(DeepFocusIteration(wd, stig, corr.to_dict(), False))
                pair_d = far_d
                continue
            if st.lens_play_um and math.isfinite(corr.wd_um):
                # the pair ended coming down onto wd, so the lens rests the play above it (as in
                # deepfocus.autofocus): the lens is to move the answer less the play
                corr = replace(corr, wd_um=corr.wd_um - st.lens_play_um)
            try:
                d_wd_m, d_sx, d_sy = _masked_correction(corr, st.aberr_mode)
            except AutofocusAbort as exc:
                raise AutofocusAbort(f"at the far perturbation {pair_d * 1e6:g} um, {exc}" if far else str(exc)) \
                    from None
            if far:
                # wd alone (the astigmatism was read through tens of micrometres of blur); unclipped, as every step
                # here, so it lands within the model's range and the run goes on at the usual perturbation
                new_wd = wd + d_wd_m
                _check_within_limits(new_wd, stig, start_wd, start_stig, st, it)
                _set_wd_coming_down(sem, wd, new_wd, start_wd, st)
                time.sleep(st.settle_s)
                result.iterations.append(DeepFocusIteration(wd, stig, corr.to_dict(), True, far=True))
                wd, pair_d, far_taken = new_wd, d, True
                planner = _planner(hello, st)       # nothing learned from pairs taken where the run no longer is
                continue
            try:
                step = planner.plan(corr)
            except StigmatorsDiverging as exc:
                raise AutofocusAbort(f"iteration {it}: {exc} (is the daemon profile's stigmator "
                                     "calibration this microscope's? deepfocus calibrate measures it).") from exc
            on_wd, on_x, on_y = st.aberr_mode
            step = replace(step, wd_m=step.wd_m if on_wd else 0.0,
                           stig=(step.stig[0] if on_x else 0.0, step.stig[1] if on_y else 0.0))
            planner.taken(step)
            new_wd, new_stig = wd + step.wd_m, (stig[0] + step.stig[0], stig[1] + step.stig[1])
            _check_within_limits(new_wd, new_stig, start_wd, start_stig, st, it)
            _set_wd_coming_down(sem, wd, new_wd, start_wd, st)
            _sem_call(sem.set_stig_xy, f"stig ({new_stig[0]:.3f}, {new_stig[1]:.3f})", *new_stig)
            time.sleep(st.settle_s)
            result.iterations.append(DeepFocusIteration(wd, stig, corr.to_dict(), True))
            wd, stig = new_wd, new_stig  # type: ignore[assignment]
            # a wd-only answer (astigmatism too uncertain to answer, stig 0) says nothing about the stigmators
            wd_only = bool(corr.extra.get("astig_uncertain")) and (on_x or on_y)
            if not wd_only and abs(d_wd_m) * 1e6 <= st.wd_tolerance_um and max(abs(d_sx), abs(d_sy)) <= \
                    st.stig_tolerance:
                result.converged = True
                break
        result.ok = True
        result.wd_m, result.stig_xy = float(sem.get_wd()), tuple(sem.get_stig_xy())  # type: ignore[assignment]
        state = "converged" if result.converged else \
            f"not converged after {st.max_iterations} iterations"
        result.message = (
            f"CTRL: Completed DeepFocus AF ({state}): wd {start_wd * 1e3:.5f} -> "
            f"{result.wd_m * 1e3:.5f} mm, stig ({start_stig[0]:.3f}, {start_stig[1]:.3f}) -> "
            f"({result.stig_xy[0]:.3f}, {result.stig_xy[1]:.3f}).")
    except Exception as exc:
        restored = _restore(sem, start_wd, start_stig)
        reason = str(exc) if isinstance(exc, AutofocusAbort) else f"{type(exc).__name__}: {exc}"
        result.ok = False
        result.wd_m, result.stig_xy = start_wd, start_stig  # type: ignore[assignment]
        reason = reason.rstrip()
        stop = "" if reason.endswith((".", "?", "!")) else "."
        result.message = f"CTRL: ERROR during DeepFocus AF: {reason}{stop} {restored}"
    finally:
        if own_client:
            client.close()
        if not st.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        result.duration_s = time.monotonic() - t_start
    return result


def _acquire_pair(sem: SBEMimageSEM, wd: float, d: float, st: DeepFocusSettings, workdir: Path, it: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    images = []
    try:
        for sign, tag in ((-1, "minus"), (+1, "plus")):
            _sem_call(sem.set_wd, f"wd {(wd + sign * d) * 1e3:.5f} mm", wd + sign * d)
            time.sleep(st.settle_s)
            path = workdir / f"deepfocus_{it:02d}_{tag}{st.frame_suffix}"
            ok = sem.acquire_frame(str(path))
            # SBEMimage's acquire_frame returns False on failure (and older ones None on success)
            if ok is False or not path.is_file():
                detail = getattr(sem, "error_info", "") or "no frame file was written"
                raise AutofocusAbort(f"frame acquisition at wd {(wd + sign * d) * 1e3:.5f} mm "
                                     f"failed ({detail}).")
            images.append(read_image(path))
    finally:
        _sem_call(sem.set_wd, f"wd {wd * 1e3:.5f} mm", wd)
    if images[0].shape != images[1].shape:
        raise AutofocusAbort(f"the two frames differ in size: {images[0].shape} vs "
                             f"{images[1].shape}.")
    return images[0], images[1]


def _set_wd_coming_down(sem: SBEMimageSEM, wd: float, new_wd: float, start_wd: float, st: DeepFocusSettings
                        ) -> None:
    """Set ``new_wd``; with lens play a step up first goes beyond it (``steps.overshoot_m``), never further from
    the start than ``max_wd_stig_diff``."""
    over = overshoot_m(st.lens_play_um * 1e-6, wd, new_wd, start_wd + st.max_wd_stig_diff[0] - new_wd)
    if over > 0:
        _sem_call(sem.set_wd, f"wd {(new_wd + over) * 1e3:.5f} mm", new_wd + over)
    _sem_call(sem.set_wd, f"wd {new_wd * 1e3:.5f} mm", new_wd)


def _hello(client: DeepFocusClient) -> dict[str, Any]:
    try:
        return client.hello()
    except DaemonUnavailable as exc:
        raise AutofocusAbort(str(exc)) from exc
    except RemoteError:
        return {}                   # a daemon that does not describe its answers: none learned from stigmators


def _sem_call(method: Any, what: str, *args: Any) -> None:
    """An SBEMimage SEM setter; SBEMimage's SEM classes report a refused setting by returning False."""
    if method(*args) is False:
        raise AutofocusAbort(f"the SEM refused {what}")


def _focus_frames(sem: SBEMimageSEM, st: DeepFocusSettings) -> tuple[int, tuple[int, int] | None]:
    """The store-resolution index of the focus frames (the settings', else the SEM's index of 1024 x 768) and
    their (rows, columns) where the SEM lists its store resolutions (SBEMimage's ``STORE_RES``, (width, height)
    each); the selector and the dwell time checked against the SEM's lists where it has them."""
    store = getattr(sem, "STORE_RES", None)
    known = [(int(r[0]), int(r[1])) for r in store] if isinstance(store, (list, tuple)) else None
    selector = st.frame_size_selector
    if selector is None:
        selector = known.index((1024, 768)) if known and (1024, 768) in known else 0
    elif known is not None and selector >= len(known):
        raise AutofocusAbort(f"deepfocus_frame_size_selector {selector} is not one of this SEM's store "
                             f"resolutions (0-{len(known) - 1}: {', '.join(f'{w} x {h}' for w, h in known)})")
    dwells = getattr(sem, "DWELL_TIME", None)
    if isinstance(dwells, (list, tuple)) and dwells and \
            not any(abs(float(v) - st.dwell_time_us) < 1e-9 for v in dwells):
        raise AutofocusAbort(f"deepfocus_dwell_time_us {st.dwell_time_us:g} is not one of this SEM's dwell times "
                             f"({', '.join(f'{float(v):g}' for v in dwells)} us)")
    shape = (known[selector][1], known[selector][0]) if known and selector < len(known) else None
    return selector, shape


def _check_scan(client: DeepFocusClient, hello: dict[str, Any], shape: tuple[int, int] | None,
                st: DeepFocusSettings, d: float) -> None:
    """Asks the daemon, before any frame is taken, whether its model answers this scan (frame size, pixel size,
    pair) and whether it takes frames of this size at all: a scan it cannot answer would otherwise cost a pair of
    frames of dose before the daemon refused it. Skipped where the frame size is not known or the daemon
    predates the question."""
    if shape is None or "check" not in (hello.get("capabilities") or ()):
        return
    lim = client.limits
    if max(shape) > lim.max_side_px or shape[0] * shape[1] > lim.max_array_bytes:
        raise AutofocusAbort(f"the daemon takes frames of at most {lim.max_side_px} px a side and "
                             f"{lim.max_array_bytes} bytes, not {shape[1]} x {shape[0]} px: choose a smaller "
                             "deepfocus_frame_size_selector; no frame was taken")
    try:
        client.check_frames(shape, st.pixel_size_nm * 1e-9, d)
    except DaemonUnavailable as exc:
        raise AutofocusAbort(str(exc)) from exc
    except RemoteError as exc:
        raise AutofocusAbort(f"the daemon's model cannot answer {shape[1]} x {shape[0]} px frames at "
                             f"{st.pixel_size_nm:g} nm with a pair at -/+ {d * 1e6:g} um ({exc}); no frame was "
                             "taken") from exc


def _pair_perturbation(hello: dict[str, Any], st: DeepFocusSettings) -> float:
    """The pair's perturbation (m): the settings' where set, else the one the daemon's model wants on its beam at
    these pixels (``correction.pair_perturbation_m``), else 5 um."""
    if st.perturbation_um is not None:
        return st.perturbation_um * 1e-6
    own = hello.get("perturbation_m")
    if not own:
        return 5e-6
    return pair_perturbation_m(float(own), hello.get("perturbation_range_m"), hello.get("alpha_ref_mrad"),
                               hello.get("aperture_angle_mrad"), st.pixel_size_nm * 1e-9)


def _far_perturbation(hello: dict[str, Any], d: float, st: DeepFocusSettings) -> float | None:
    """The far perturbation (m) for pairs at ``d``, where it is on and the daemon's model answers it; else None."""
    rng = hello.get("perturbation_range_m")
    if not st.aberr_mode[0] or not rng:
        return None
    far = far_perturbation_m(d, st.far_perturbation_factor, rng)
    return far if far is not None and in_perturbation_range(far, rng) else None


def _far_answered(client: DeepFocusClient, hello: dict[str, Any], shape: tuple[int, int] | None,
                  st: DeepFocusSettings, d: float, far_d: float | None) -> float | None:
    """``far_d``, or as far apart as the daemon's model still answers on these frames
    (``correction.far_pair_answered_m``), asked as ``_check_scan`` asks; unchanged where it cannot be asked."""
    if far_d is None or shape is None or "check" not in (hello.get("capabilities") or ()):
        return far_d

    def answered(fd: float) -> bool:
        try:
            client.check_frames(shape, st.pixel_size_nm * 1e-9, fd)
        except DaemonUnavailable as exc:
            raise AutofocusAbort(str(exc)) from exc
        except RemoteError:
            return False
        return True
    return far_pair_answered_m(far_d, d, answered)


def _planner(hello: dict[str, Any], st: DeepFocusSettings) -> StepPlanner:
    max_wd, max_sx, max_sy = st.max_wd_stig_diff
    # steps are not clipped here: one beyond max_wd_stig_diff ends the run instead (_check_within_limits)
    settings = StepSettings(max_step_wd_m=max(2 * max_wd, 1e-9), max_step_stig=max(2 * max_sx, 2 * max_sy, 1e-9),
                            correct_stig=bool(st.aberr_mode[1] or st.aberr_mode[2]),
                            # as in deepfocus.autofocus: the wd answers weighed only where the play is compensated
                            fuse_wd=st.lens_play_um > 0)
    return StepPlanner(settings, bool(hello.get("stig_shares_wd_scale")), st.stig_tolerance)


def _masked_correction(corr: Any, mode: Sequence[bool]) -> tuple[float, float, float]:
    values = (corr.wd_um * 1e-6, corr.stig_x, corr.stig_y)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise AutofocusAbort(f"the estimate is not finite (wd {corr.wd_um} um, stig "
                             f"{corr.stig_x}, {corr.stig_y}).")
    if getattr(corr, "status", "ok") not in ("ok", ""):
        spread = (f"uncertainty wd {corr.uncertainty_wd_um:.2f} um, stig {corr.uncertainty_stig:.3f}"
                  if math.isfinite(corr.uncertainty_wd_um) and math.isfinite(corr.uncertainty_stig) else "")
        why = "; ".join(v for v in (str((corr.extra or {}).get("reason", "")), spread) if v)
        raise AutofocusAbort(f"the estimate is marked '{corr.status}'{f' ({why})' if why else ''}; not applied.")
    return tuple(v if on else 0.0 for v, on in zip(values, mode))  # type: ignore[return-value]


def _check_within_limits(new_wd: float, new_stig: tuple[float, float], start_wd: float,
                         start_stig: tuple[float, float], st: DeepFocusSettings, it: int) -> None:
    max_wd, max_sx, max_sy = st.max_wd_stig_diff
    dwd = new_wd - start_wd
    dsx, dsy = new_stig[0] - start_stig[0], new_stig[1] - start_stig[1]
    if abs(dwd) > max_wd or abs(dsx) > max_sx or abs(dsy) > max_sy:
        raise AutofocusAbort(
            f"iteration {it} would change wd by {dwd * 1e6:+.2f} um and stig by "
            f"({dsx:+.3f}, {dsy:+.3f}) from the start, beyond max_wd_stig_diff "
            f"({max_wd * 1e6:.2f} um, {max_sx:.3f}, {max_sy:.3f}); not applied.")


def _restore(sem: SBEMimageSEM, wd: float, stig: tuple[float, float]) -> str:
    """Sets the start back and reads it back; what to tell SBEMimage's log about it."""
    problems = []
    for what, call in (("wd", lambda: sem.set_wd(wd)), ("stig", lambda: sem.set_stig_xy(*stig))):
        try:
            if call() is False:
                problems.append(f"the SEM refused to set {what} back")
        except Exception as exc:            # the run's own error is reported beside this one
            problems.append(f"setting {what} back failed ({type(exc).__name__}: {exc})")
    try:
        now_wd, now_stig = float(sem.get_wd()), tuple(float(v) for v in sem.get_stig_xy())
    except Exception as exc:
        return (f"Previous wd/stig NOT restored: reading them back failed ({type(exc).__name__}: {exc}). Check the "
                "microscope before going on.")
    if abs(now_wd - wd) <= WD_READBACK_M and max(abs(now_stig[0] - stig[0]), abs(now_stig[1] - stig[1])) <= \
            STIG_READBACK:
        return "Previous wd/stig restored."          # read back at the start, whatever a setter answered
    problems.append(f"the SEM reads wd {now_wd * 1e3:.5f} mm, stig ({now_stig[0]:.3f}, {now_stig[1]:.3f}) against "
                    f"the start's {wd * 1e3:.5f} mm, ({stig[0]:.3f}, {stig[1]:.3f})")
    return f"Previous wd/stig NOT restored: {'; '.join(problems)}. Check the microscope before going on."


class DeepFocusAutofocus:
    """What SBEMimage's ``Autofocus`` holds for its DeepFocus method.

    ``run()`` returns the message string SBEMimage logs; ``last_result`` keeps the
    structured result (``new_wd_stig`` and the per-iteration corrections).
    """

    def __init__(self, sem: SBEMimageSEM, settings: DeepFocusSettings | None = None):
        self.sem = sem
        self.settings = settings or DeepFocusSettings()
        self.client = self.settings.client()
        self.last_result: DeepFocusResult | None = None
        self._microscope: dict[str, Any] | None = None      # the daemon's, at the first run that reached it

    def run(self, autofocus: bool = True, autostig: bool = True) -> str:
        st = self.settings
        if not (autofocus or autostig):
            return "CTRL: DeepFocus AF not run: neither focus nor stigmation asked for."
        mode = (autofocus, autostig, autostig)
        if mode != tuple(st.aberr_mode):
            st = DeepFocusSettings(**{**st.__dict__, "aberr_mode": mode})
        self.last_result = run_deepfocus_af(self.sem, st, client=self.client, expect_microscope=self._microscope)
        if self._microscope is None and self.last_result.daemon_microscope:
            self._microscope = self.last_result.daemon_microscope
        return self.last_result.message

    def daemon_available(self) -> bool:
        try:
            return self.client.health(timeout_s=2.0, retries=0).get("status") == "ok"
        except (DaemonUnavailable, RemoteError):
            return False

    def close(self) -> None:
        self.client.close()
