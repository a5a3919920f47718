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

With ``STORE_RES`` the daemon is asked before the first frame whether its model
answers frames of that size at this pixel size; a scan it cannot answer ends the
run before any dose is spent.
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

from .client import DaemonUnavailable, DeepFocusClient, RemoteError
from .correction import far_perturbation_m, in_perturbation_range, pair_perturbation_m
from .image_files import read_image
from .steps import StepPlanner, StepSettings, StigmatorsDiverging, overshoot_m

# as hardware.config's (this module does without the hardware package)
MAX_LENS_PLAY_UM = 5.0


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
    frame_size_selector: int = 1         # the microscope's 1024 x 768 store resolution
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
    workdir: str | None = None           # None: a temporary directory, removed afterwards
    options: dict[str, Any] = field(default_factory=dict)  # passed to the daemon's estimator

    @classmethod
    def from_sbemimage_config(cls, cfg: Any, section: str = "autofocus", **overrides: Any
                              ) -> "DeepFocusSettings":
        """Read the keys SBEMimage already has plus optional ``deepfocus_*`` keys."""
        s = cfg[section]

        def get(key: str, default: Any) -> Any:
            return s[key] if key in s else default

        kw: dict[str, Any] = {}
        if "max_wd_stig_diff" in s:
            kw["max_wd_stig_diff"] = tuple(float(v) for v in json.loads(s["max_wd_stig_diff"]))
        if "pixel_size" in s:
            kw["pixel_size_nm"] = float(s["pixel_size"])
        kw["address"] = get("deepfocus_address", cls.address)
        for key, conv in (("timeout_s", float), ("retries", int), ("frame_size_selector", int),
                          ("dwell_time_us", float), ("perturbation_um", float),
                          ("max_iterations", int), ("wd_tolerance_um", float),
                          ("stig_tolerance", float), ("far_perturbation_factor", float),
                          ("lens_play_um", float)):
            if f"deepfocus_{key}" in s:
                kw[key] = conv(s[f"deepfocus_{key}"])
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lens_play_um) and 0 <= self.lens_play_um <= MAX_LENS_PLAY_UM):
            raise ValueError(f"deepfocus_lens_play_um must be between 0 (not compensated) and {MAX_LENS_PLAY_UM:g} "
                             f"um, got {self.lens_play_um!r}")


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

    @property
    def new_wd_stig(self) -> tuple[float | None, float | None, float | None]:
        """SBEMimage's ``(wd, stig_x, stig_y)`` triple; Nones on failure."""
        if not self.ok:
            return None, None, None
        return self.wd_m, self.stig_xy[0], self.stig_xy[1]


class AutofocusAbort(RuntimeError):
    """Ends a run; the message becomes the ERROR message SBEMimage logs."""


def run_deepfocus_af(sem: SBEMimageSEM, settings: DeepFocusSettings | None = None,
                     client: DeepFocusClient | None = None) -> DeepFocusResult:
    """Focus and stigmate with DeepFocus through the daemon; never leaves an unchecked jump."""
    st = settings or DeepFocusSettings()
    own_client = client is None
    client = client or DeepFocusClient(st.address, st.timeout_s, st.retries)
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
        planner = _planner(hello, st)
        d = _pair_perturbation(hello, st)
        far_d = _far_perturbation(hello, d, st)
        _check_scan(client, hello, sem, st, d)
        pair_d, far_taken = d, False
        sem.apply_frame_settings(st.frame_size_selector, st.pixel_size_nm, st.dwell_time_us)
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
            sem.set_stig_xy(*new_stig)
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
        _restore(sem, start_wd, start_stig)
        reason = str(exc) if isinstance(exc, AutofocusAbort) else f"{type(exc).__name__}: {exc}"
        result.ok = False
        result.wd_m, result.stig_xy = start_wd, start_stig  # type: ignore[assignment]
        result.message = f"CTRL: ERROR during DeepFocus AF: {reason} Previous wd/stig restored."
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
            sem.set_wd(wd + sign * d)
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
        sem.set_wd(wd)
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
        sem.set_wd(new_wd + over)
    sem.set_wd(new_wd)


def _hello(client: DeepFocusClient) -> dict[str, Any]:
    try:
        return client.hello()
    except DaemonUnavailable as exc:
        raise AutofocusAbort(str(exc)) from exc
    except RemoteError:
        return {}                   # a daemon that does not describe its answers: none learned from stigmators


def _frame_shape(sem: SBEMimageSEM, selector: int) -> tuple[int, int] | None:
    """(rows, columns) of the frames ``selector`` gives, from SBEMimage's ``STORE_RES`` list of (width, height);
    None where the SEM object has no such list or the selector is not in it."""
    store = getattr(sem, "STORE_RES", None)
    try:
        width, height = store[selector]          # type: ignore[index]
        return int(height), int(width)
    except (TypeError, IndexError, KeyError, ValueError):
        return None


def _check_scan(client: DeepFocusClient, hello: dict[str, Any], sem: SBEMimageSEM, st: DeepFocusSettings,
                d: float) -> None:
    """Asks the daemon, before any frame is taken, whether its model answers this scan (frame size, pixel size,
    pair): a scan it cannot answer would otherwise cost a pair of frames of dose before the daemon refused it.
    Skipped where the frame size is not known or the daemon predates the question."""
    shape = _frame_shape(sem, st.frame_size_selector)
    if shape is None or "check" not in (hello.get("capabilities") or ()):
        return
    try:
        client.check_frames(shape, st.pixel_size_nm * 1e-9, d)
    except DaemonUnavailable as exc:
        raise AutofocusAbort(str(exc)) from exc
    except RemoteError as exc:
        raise AutofocusAbort(f"the daemon's model cannot answer {shape[1]} x {shape[0]} px frames at "
                             f"{st.pixel_size_nm:g} nm with a pair at -/+ {d * 1e6:g} um ({exc}); no frame was "
                             "taken.") from exc


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
        raise AutofocusAbort(f"the estimate is marked '{corr.status}' (uncertainty wd "
                             f"{corr.uncertainty_wd_um:.2f} um, stig {corr.uncertainty_stig:.3f}); "
                             "not applied.")
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


def _restore(sem: SBEMimageSEM, wd: float, stig: tuple[float, float]) -> None:
    try:
        sem.set_wd(wd)
        sem.set_stig_xy(*stig)
    except Exception:
        pass  # the error message already reports the failure that got us here


class DeepFocusAutofocus:
    """What SBEMimage's ``Autofocus`` holds for its DeepFocus method.

    ``run()`` returns the message string SBEMimage logs; ``last_result`` keeps the
    structured result (``new_wd_stig`` and the per-iteration corrections).
    """

    def __init__(self, sem: SBEMimageSEM, settings: DeepFocusSettings | None = None):
        self.sem = sem
        self.settings = settings or DeepFocusSettings()
        self.client = DeepFocusClient(self.settings.address, self.settings.timeout_s,
                                      self.settings.retries)
        self.last_result: DeepFocusResult | None = None

    def run(self, autofocus: bool = True, autostig: bool = True) -> str:
        st = self.settings
        mode = (autofocus, autostig, autostig)
        if mode != tuple(st.aberr_mode):
            st = DeepFocusSettings(**{**st.__dict__, "aberr_mode": mode})
        self.last_result = run_deepfocus_af(self.sem, st, client=self.client)
        return self.last_result.message

    def daemon_available(self) -> bool:
        try:
            return self.client.health(timeout_s=2.0, retries=0).get("status") == "ok"
        except (DaemonUnavailable, RemoteError):
            return False

    def close(self) -> None:
        self.client.close()
