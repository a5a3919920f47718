"""Contrast of the two images of a pair, measured where defocus cannot change it.

Both estimators read the aberration from how the two images differ, so a contrast change
between the frames that the optics did not cause (charging or contamination of the area
scanned twice, detector gain drift, automatic brightness/contrast left on) is read as
defocus: on the simulated setup_a a plus image 10 % higher in contrast moved the wd answer
by 1.2 um. The probe blurs at most a few hundred nanometres, so structure on micrometre
scales passes both focus settings unchanged; the ratio of the two images' power in that band
is the contrast change alone, and dividing it out leaves the optics' difference. The ratio is
measured with noise of its own (half a per cent at 50 ns: a frame holds a few dozen
micrometre-sized blobs), so it is shrunk towards 1 by its standard error before it is divided
out (``ContrastRatio.applied``): in full, that noise moved the wd answers near focus more than
the shot noise in the patches did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .registration import BIN

# the band: above every defocus blur the models are trained for (alpha up to 5.5 mrad x |wd| up to 40 um
# is 0.22 um), below the frame size; measured on setup_a pairs the clean ratio stays within 1 % of 1
BAND_SIGMA_UM = 0.6
MIN_SIGMAS_PER_FRAME = 6.0      # a frame narrower than this many inner sigmas has too little band to measure
BLOCKS = (3, 4)                 # rows x columns of blocks whose spread gives the ratio's standard error
# Measured on clean simulated pairs at focus (FlyEM 520, 1024 x 768, 8 fields x 6 pairs): log(ratio) scatters
# 0.0065 rms at 50 ns on setup_a (0.0089 setup_b 100 ns, 0.0026 at 200 ns), the blocks' standard error says 0.0047
# (0.0073, 0.0023): it runs about 0.75 of the scatter, hence 1.5 of it. Divided out in full, that noise moved the
# wd answers near focus 0.077 um rms from pair to pair (setup_b 0.119); without the division 0.036 (0.055).
SHRINK_SE = 1.5


@dataclass(frozen=True)
class ContrastRatio:
    ratio: float | None          # plus over minus contrast; None: the frame is too small to measure it
    band_sigma_px: float
    mean_minus: float = float("nan")    # frame means, in the images' own units
    mean_plus: float = float("nan")
    log_se: float = float("nan")        # standard error of log(ratio), from the blocks' spread

    @property
    def applied(self) -> float | None:
        """The ratio to divide out: the measured one shrunk towards 1 by its own noise (positive-part
        James-Stein on log(ratio) with ``SHRINK_SE`` standard errors), so that a pair without a contrast change
        is left as it is while a real change, many standard errors large, is divided out nearly in full."""
        if self.ratio is None:
            return None
        lr = math.log(self.ratio)
        if not math.isfinite(self.log_se) or lr == 0.0:
            return self.ratio
        return math.exp(lr * max(0.0, 1.0 - (SHRINK_SE * self.log_se / lr) ** 2))


@lru_cache(maxsize=8)
def _surface_basis(h: int, w: int) -> np.ndarray:
    """Orthonormal columns spanning the quadratic surfaces on an h x w grid (projection = q q^T)."""
    y, x = np.mgrid[-1:1:h * 1j, -1:1:w * 1j]
    q, _ = np.linalg.qr(np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1).reshape(-1, 6))
    return np.ascontiguousarray(q, dtype=np.float32)


def _band(image: np.ndarray, pixel_um: float, factor: int) -> tuple[float, float, np.ndarray]:
    """(band std, frame mean, band std per block) of one frame, ``image`` already binned ``factor`` x ``factor``
    or at full resolution with ``factor`` still to apply."""
    small = image
    if factor > 1:
        h, w = (n // factor * factor for n in image.shape)
        src = image if image.dtype in (np.uint8, np.uint16, np.float32) else image.astype(np.float32)
        # block means first (INTER_AREA at a whole-number ratio, cv2's fast path): the band lies far below
        # Nyquist, and blurring the full frame with a sigma of 60+ px would cost more than the network
        small = cv2.resize(np.ascontiguousarray(src[:h, :w]), (w // factor, h // factor),
                           interpolation=cv2.INTER_AREA)
    small = small.astype(np.float32, copy=False)
    mean = float(small.mean())
    # shading across the frame (charging, detector geometry) differs between frames without any optics in
    # it: a quadratic surface fitted and removed takes it out, where a wider Gaussian would leave it at the
    # frame's edges
    q = _surface_basis(*small.shape)
    v = small.reshape(-1)
    flat = (v - q @ (q.T @ v)).reshape(small.shape)
    s1 = BAND_SIGMA_UM / (pixel_um * factor)
    lo = cv2.GaussianBlur(flat, (0, 0), s1, borderType=cv2.BORDER_REFLECT)
    m = int(math.ceil(2 * s1))
    lo = lo[m:-m, m:-m]
    # per-line brightness offsets (detector flicker, mains pick-up) differ between the frames and pass the band
    # as a function of the line alone: measure what varies along the lines
    band = lo - lo.mean(axis=1, keepdims=True)
    return float(band.std()), mean, _block_stds(band)


def _block_stds(band: np.ndarray) -> np.ndarray:
    """The band's std in BLOCKS (rows x columns) blocks of the frame."""
    rows, cols = BLOCKS
    h, w = band.shape[0] // rows * rows, band.shape[1] // cols * cols
    if h == 0 or w == 0:
        return np.zeros(0)
    b = band[:h, :w].reshape(rows, h // rows, cols, w // cols)
    return b.std(axis=(1, 3)).reshape(-1)


def contrast_ratio(minus: np.ndarray, plus: np.ndarray, pixel_size_m: float,
                   binned: tuple[np.ndarray, np.ndarray] | None = None) -> ContrastRatio:
    """Plus-over-minus contrast of a checked pair (same shape), from the micrometre band of both frames.
    ``binned``: the frames binned ``registration.BIN`` x ``BIN`` (``registration.bin_frame``), when the caller
    has them already; used where the band is coarse enough."""
    pixel_um = pixel_size_m * 1e6
    sigma_px = BAND_SIGMA_UM / pixel_um
    if min(minus.shape) < MIN_SIGMAS_PER_FRAME * sigma_px:
        return ContrastRatio(None, sigma_px)
    factor = max(1, int(sigma_px / 4))          # keeps about 4 px per inner sigma
    frames = (minus, plus)
    if binned is not None and factor >= BIN:
        # the rest of the binning on the binned frames (a whole multiple of BIN, so still >= 4 px per sigma)
        frames, pixel_um, factor = binned, pixel_um * BIN, factor // BIN
    s_minus, m_minus, b_minus = _band(frames[0], pixel_um, factor)
    s_plus, m_plus, b_plus = _band(frames[1], pixel_um, factor)
    if not (s_minus > 0 and s_plus > 0):
        return ContrastRatio(None, sigma_px)     # featureless: the structure test decides
    ok = (b_minus > 0) & (b_plus > 0)
    se = float(np.log(b_plus[ok] / b_minus[ok]).std(ddof=1) / math.sqrt(ok.sum())) if ok.sum() >= 4 else float("nan")
    return ContrastRatio(s_plus / s_minus, sigma_px, m_minus, m_plus, se)


def equalising_maps(ratio: float, mean_minus: float, mean_plus: float, scale: float,
                    off: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(gain, offset) per frame, x * gain - offset, that applies the common ``x * scale - off`` and divides the
    contrast change out: the minus frame gains sqrt(ratio), the plus frame loses it, each about its own mean.
    One map per frame, so the patches are scaled in a single pass."""
    g = math.sqrt(ratio)
    m0, m1 = mean_minus * scale - off, mean_plus * scale - off
    return (scale * g, (off + m0) * g - m0), (scale / g, (off + m1) / g - m1)
