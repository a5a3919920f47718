"""A deterministic image-processing estimator the daemon tests run, and its own checks.

It fits the log ratio of the two images' power spectra, which for a Gaussian
probe is linear in (defocus, astig x, astig y) with the specimen cancelling
out. The service tests need a real estimator whose answer depends on the image
content, so that mixed-up or corrupted replies are detected.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from deepfocus.correction import Correction, Estimator


class PowerRatioEstimator(Estimator):
    """Least-squares fit of log(|F+|^2 / |F-|^2) over patch pairs.

    ``blur_px_per_um`` is the probe's Gaussian sigma (pixels) per um of defocus;
    ``delay_s`` makes the estimator slow on purpose for queueing tests.
    """

    def __init__(self, blur_px_per_um: float = 0.6, patch_px: int = 256, kmax: float = 2.5,
                 model_id: str = "power-ratio", delay_s: float = 0.0):
        self.beta = blur_px_per_um
        self.patch_px = patch_px
        self.kmax = kmax
        self.model_id = model_id
        self.delay_s = delay_s
        self.calls = 0
        p = patch_px
        ky = 2 * np.pi * np.fft.fftfreq(p)[:, None]
        kx = 2 * np.pi * np.fft.rfftfreq(p)[None, :]
        k2 = kx ** 2 + ky ** 2
        self._mask = (k2 > (2 * np.pi * 2 / p) ** 2) & (k2 < kmax ** 2)
        # rows point down in numpy, so the mixed term's sign flips
        self._basis = np.stack([k2[self._mask], (kx ** 2 - ky ** 2 + 0 * k2)[self._mask],
                                (2 * kx * ky + 0 * k2)[self._mask]], axis=1)
        self._window = np.outer(np.hanning(p), np.hanning(p)).astype(np.float32)

    def _patches(self, shape: tuple[int, int]) -> list[tuple[int, int]]:
        p = self.patch_px
        rows = range(0, shape[0] - p + 1, p)
        cols = range(0, shape[1] - p + 1, p)
        return [(r, c) for r in rows for c in cols]

    def estimate(self, minus: np.ndarray, plus: np.ndarray, pixel_size_m: float,
                 perturbation_m: float | None = None, max_patches: int | None = None
                 ) -> Correction:
        self.calls += 1
        t0 = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        d_um = (perturbation_m or self.perturbation_m) * 1e6
        p = self.patch_px
        coords = self._patches(minus.shape)
        if max_patches:
            coords = coords[:max_patches]
        if not coords:
            raise ValueError(f"image {minus.shape} smaller than one {p} px patch")
        fits = []
        for r, c in coords:
            a = minus[r:r + p, c:c + p].astype(np.float32)
            b = plus[r:r + p, c:c + p].astype(np.float32)
            fa = np.abs(np.fft.rfft2((a - a.mean()) * self._window)) ** 2 + 1e-3
            fb = np.abs(np.fft.rfft2((b - b.mean()) * self._window)) ** 2 + 1e-3
            pa, pb = fa[self._mask], fb[self._mask]
            # Only where both spectra stand above the noise floor (the spectrum's
            # outermost band) is the ratio specimen-independent.
            floor = 10.0 * max(np.median(fa[:, -8:]), np.median(fb[:, -8:]))
            keep = (pa > floor) & (pb > floor)
            if keep.sum() < 20:
                continue
            y = np.log(pb[keep] / pa[keep])
            coef, *_ = np.linalg.lstsq(self._basis[keep], y, rcond=None)
            fits.append(coef)
        if not fits:
            raise ValueError("no patch has spectrum above the noise floor; is the image blank?")
        coef = np.mean(fits, axis=0)
        spread = np.std(fits, axis=0) if len(fits) > 1 else np.full(3, np.nan)
        # sigma(+)^2 - sigma(-)^2 = 4 beta^2 d z for a Gaussian probe sigma = beta |z|
        gain = -1.0 / (4 * self.beta ** 2 * d_um)
        z, ax, ay = coef * gain
        return Correction(wd_um=float(-z), astig_x_um=float(-ax), astig_y_um=float(-ay),
                          stig_x=float(-ax), stig_y=float(-ay),
                          uncertainty_wd_um=float(abs(spread[0] * gain)),
                          uncertainty_stig=float(np.hypot(spread[1], spread[2]) * abs(gain)),
                          model_id=self.model_id, n_patches=len(coords),
                          timings_s={"fit": time.perf_counter() - t0})

    def score(self, image: np.ndarray, pixel_size_m: float) -> float:
        """High-frequency energy fraction: lower when sharper is not the goal, so negate."""
        f = np.abs(np.fft.rfft2(image.astype(np.float32) - image.mean())) ** 2
        k = np.hypot(*np.meshgrid(np.fft.rfftfreq(image.shape[1]), np.fft.fftfreq(image.shape[0])))
        return float(1.0 - f[k > 0.15].sum() / max(f.sum(), 1e-12))


def specimen(shape=(768, 1024), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    blobs = ndimage.gaussian_filter((rng.random(shape) > 0.97).astype(float), 3.0)
    img = base / base.std() + 4 * blobs / blobs.std()
    return img


def image_pair(defocus_um: float, shape=(768, 1024), seed=0, d_um=5.0, beta=0.6,
               noise=0.0) -> tuple[np.ndarray, np.ndarray]:
    """uint16 images at wd - d and wd + d for a specimen defocused by ``defocus_um``."""
    spec = specimen(shape, seed)
    rng = np.random.default_rng(seed + 1)
    out = []
    for z in (defocus_um - d_um, defocus_um + d_um):
        im = ndimage.gaussian_filter(spec, beta * abs(z)) if z else spec.copy()
        im = 20000 + 3000 * im + noise * rng.normal(size=shape)
        out.append(np.clip(im, 0, 65535).astype(np.uint16))
    return out[0], out[1]


@pytest.mark.parametrize("defocus_um", [-8.0, -3.0, 2.0, 6.0])
def test_recovers_defocus_of_gaussian_probe(defocus_um):
    minus, plus = image_pair(defocus_um)
    corr = PowerRatioEstimator().estimate(minus, plus, 10e-9)
    # correction is the negative aberration
    assert corr.wd_um == pytest.approx(-defocus_um, abs=0.25 * abs(defocus_um) + 0.3)
    assert abs(corr.stig_x) < 0.5 and abs(corr.stig_y) < 0.5


def test_is_deterministic_and_depends_on_content():
    est = PowerRatioEstimator()
    a = est.estimate(*image_pair(4.0, seed=3), 10e-9)
    b = est.estimate(*image_pair(4.0, seed=3), 10e-9)
    c = est.estimate(*image_pair(-4.0, seed=3), 10e-9)
    assert a.to_dict() | {"timings_s": {}} == b.to_dict() | {"timings_s": {}}
    assert np.sign(a.wd_um) == -np.sign(c.wd_um)
