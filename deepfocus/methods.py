"""Comparison methods behind the same loop: MAPFoSt and a sharpness sweep.

``MapfostEstimator`` wraps the ``mapfost`` package (optional extra). Its probe model is
Gaussian with numerical aperture ``alpha * radial_aperture``; any other value biases the
answer. Its result is the current aberration in the image frame, so the correction is
its negative. ``SweepFocus`` is the kind of autofocus microscope software ships: frames
over a range of wd, then of each stigmator, a sharpness measure, a parabola through the
best points.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np

from hardware.sem import SEM, Frame

from .calibration import StigCalibration
from .correction import Correction, Estimator


MAPFOST_MIN_CROP_PX = 128


class MapfostEstimator(Estimator):
    def __init__(self, aperture_angle_rad: float, calibration: StigCalibration | None = None,
                 crop_px: int = 512, radial_aperture: float = 0.25, perturbation_m: float = 5e-6,
                 register_margin_px: int = 64):
        try:
            from mapfost.mapfost import est_aberr
        except ImportError as exc:
            raise ImportError("MAPFoSt needs the optional 'mapfost' extra: pip install 'gcibsem[mapfost]'") from exc
        self._est = est_aberr
        self.alpha = float(aperture_angle_rad)
        self.calibration = calibration or StigCalibration()
        self.crop_px = int(crop_px)
        self.radial_aperture = float(radial_aperture)
        self.perturbation_m = float(perturbation_m)
        self.register_margin_px = int(register_margin_px)

    @property
    def aperture_angle_mrad(self) -> float:
        """The aperture angle MAPFoSt models the probe with (what ``deepfocus calibrate`` searches)."""
        return self.alpha * 1e3

    @aperture_angle_mrad.setter
    def aperture_angle_mrad(self, value: float) -> None:
        self.alpha = float(value) * 1e-3

    def _crop_side(self, shape: tuple[int, int]) -> int:
        h, w = shape
        # mapfost registers the two crops and moves the second by the shift it finds; a crop filling the frame
        # has nowhere to move, and on strongly blurred pairs it then fails (measured on 512 x 512 frames: 5 of
        # 20 starts beyond +21 um). So the crop leaves a margin, as on a larger frame.
        side = min(self.crop_px, h - 2 * self.register_margin_px, w - 2 * self.register_margin_px)
        if side < MAPFOST_MIN_CROP_PX:
            raise ValueError(f"a {w} x {h} frame is too small for MAPFoSt: it needs a crop of at least "
                             f"{MAPFOST_MIN_CROP_PX} px and {self.register_margin_px} px around it")
        return side

    def check_frames(self, shape: tuple[int, int], pixel_size_m: float, perturbation_m: float) -> None:
        self._crop_side(shape)

    def estimate(self, minus: np.ndarray, plus: np.ndarray, pixel_size_m: float,
                 perturbation_m: float | None = None) -> Correction:
        t0 = time.perf_counter()
        a, b = np.asarray(minus, np.float64), np.asarray(plus, np.float64)
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"expected two 2-D images of one shape, got {a.shape} and {b.shape}")
        d_um = (perturbation_m or self.perturbation_m) * 1e6
        h, w = a.shape
        cy = cx = self._crop_side(a.shape)
        ok, _, res = self._est([a, b], [-d_um, d_um], pix_size_um=pixel_size_m * 1e6,
                               num_aperture=self.alpha * self.radial_aperture, stig_rot_deg=0, stig_scale=[1, 1],
                               crop_ref=((w - cx) // 2, (h - cy) // 2), crop_size=(cx, cy),
                               radial_aperture=self.radial_aperture)
        dt = time.perf_counter() - t0
        if res is None:
            return Correction(0.0, 0.0, 0.0, 0.0, 0.0, float("inf"), float("inf"), status="uncertain",
                              model_id="mapfost", timings_s={"total": dt},
                              extra={"reason": f"mapfost failed: {str(ok).strip().splitlines()[-1] if ok else ''}"})
        z, ax, ay = (-float(v) for v in res.x)
        sx, sy = self.calibration.units(ax, ay)
        return Correction(z, ax, ay, sx, sy, 0.0, 0.0, model_id="mapfost", n_patches=1, timings_s={"total": dt})


def sharpness(image: np.ndarray) -> float:
    """Normalised variance of a lightly smoothed Laplacian (smoothing keeps shot noise from dominating)."""
    x = image.astype(np.float32)
    m = float(x.mean())
    x = cv2.GaussianBlur(x, (0, 0), 1.0)
    lap = cv2.Laplacian(x, cv2.CV_32F)
    return float(lap.var()) / max(m * m, 1e-12)


def _peak(values: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Location of the maximum by a parabola through the best point and its neighbours; contrast of the curve."""
    i = int(np.argmax(scores))
    contrast = float(scores.max() / max(scores.min(), 1e-30))
    if 0 < i < len(values) - 1:
        c = np.polyfit(values[i - 1:i + 2], np.log(scores[i - 1:i + 2] + 1e-30), 2)
        if c[0] < 0:
            v = -c[1] / (2 * c[0])
            return float(np.clip(v, values[i - 1], values[i + 1])), contrast
    return float(values[i]), contrast


@dataclass
class SweepFocus:
    """Through-focus and through-stigmation sweeps; the ranges shrink after each call."""
    calibration: StigCalibration | None = None
    span_wd_m: float = 36e-6
    span_stig: float = 6.0
    n_wd: int = 9
    n_stig: int = 7
    shrink: float = 0.35
    min_span_wd_m: float = 3e-6
    min_span_stig: float = 0.5
    min_contrast: float = 1.03
    perturbation_m: float = 5e-6

    def __post_init__(self) -> None:
        self._start = (self.span_wd_m, self.span_stig)

    def reset(self) -> None:
        self.span_wd_m, self.span_stig = self._start

    def measure(self, sem: SEM, settings=None) -> tuple[Correction, list[Frame]]:
        wd0, st0 = sem.get_wd_m(), sem.get_stig()
        frames: list[Frame] = []
        compute = 0.0

        def sweep(values: np.ndarray, setter) -> tuple[float, float]:
            nonlocal compute
            scores = []
            for v in values:
                setter(float(v))
                f = sem.grab_frame()
                frames.append(f)
                t = time.perf_counter()
                scores.append(sharpness(f.image))
                compute += time.perf_counter() - t
            return _peak(values, np.array(scores))

        lim = sem.limits
        try:
            wds = wd0 + np.linspace(-self.span_wd_m, self.span_wd_m, self.n_wd)
            best_wd, c_wd = sweep(wds, sem.set_wd_m)
            sem.set_wd_m(best_wd)
            xs = np.clip(st0[0] + np.linspace(-self.span_stig, self.span_stig, self.n_stig), lim.stig_min, lim.stig_max)
            best_x, c_x = sweep(xs, lambda v: sem.set_stig(v, st0[1]))
            ys = np.clip(st0[1] + np.linspace(-self.span_stig, self.span_stig, self.n_stig), lim.stig_min, lim.stig_max)
            best_y, c_y = sweep(ys, lambda v: sem.set_stig(best_x, v))
        finally:
            sem.set_wd_m(wd0)
            sem.set_stig(*st0)
        self.span_wd_m = max(self.min_span_wd_m, self.span_wd_m * self.shrink)
        self.span_stig = max(self.min_span_stig, self.span_stig * self.shrink)
        cal = self.calibration or StigCalibration()
        dsx, dsy = best_x - st0[0], best_y - st0[1]
        ax, ay = cal.astig_um(dsx, dsy)
        status = "ok" if min(c_wd, c_x, c_y) >= self.min_contrast else "uncertain"
        corr = Correction((best_wd - wd0) * 1e6, ax, ay, dsx, dsy, 0.0, 0.0, status=status, model_id="sweep",
                          n_patches=len(frames), timings_s={"total": compute},
                          extra={} if status == "ok" else {"reason": "sharpness does not change over the sweep"})
        return corr, frames
