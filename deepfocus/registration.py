"""Register the two frames of a pair before patches are cut from them.

The frames at wd - d and wd + d need not show the specimen at the same pixels: the stage
drifts after a long move, and a beam that does not pass through the centre of the
objective lens moves the image when the focus changes. Patches cut at the same offsets
then hold partly different specimen, and the ratio of their spectra no longer cancels the
specimen (on simulated pairs a 24 px shift triples the wd error). The shift is measured by
phase correlation (OpenCV) of the 4 x 4 binned frames (central crops of at most 1024 px):
binning keeps the low frequencies, which both frames still share at large defocus, and
makes it cheap. The whole of a 1024 x 768 frame rather than a central 512 px crop: shifts
up to a quarter of the crop are found (200 px on 1024 x 768), and partly blank or very
noisy frames still give a clear peak (measured on simulated pairs at 2-40 um defocus with
three quarters of the field blank at 0.4 e/nm2 per frame: lowest peak 0.41 instead of
-0.07). Larger frames are registered on their central 1024 px: the specimen drifts no
farther in micrometres on a larger frame, 256 px is 2.6 um at 10 nm pixels, and the whole
of a 2048 x 1536 frame took 3.2 ms more per estimate (the crop and the same-field check,
4.6 ms against 1.4 on 2 cores), about a sixth of the estimate. Whole
pixels are enough: the power spectra do not see a sub-pixel shift, and an interpolated
shift would filter one frame only.

A shift beyond a quarter of the crop is not found, and the patches would then compare
different specimen and answer wd several micrometres off (measured: 3-8 um at 300-450 px
of 1024). ``field_correlation`` tells such pairs apart after registration: the frames'
structure on scales of about 16-128 px correlates 0.976 or more between the two frames of
genuine pairs (3-45 um defocus, FlyEM/EPFL/synthetic, 25-100 ns, 2.5-30 nm pixels, setup_a
and setup_b, half or three quarters blank at 0.15 nA, about 0.5 e/nm2 per frame) and at
most 0.38 between frames moved by 300-500 px (0.64 where a simulated specimen, 5 um across,
repeats within a 30 um field and the moved frame shows its repetition).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BIN = 4
CROP_PX = 1024         # central crop registered (the whole frame up to this): shifts up to a quarter of it
# phase-correlation peak below this: no clear shift, the frames are left as they are (two frames of pure
# noise reach up to about 0.35; whole simulated frames at 2-40 um defocus 0.7-1.3 with tissue all over, down to
# 0.41 with three quarters blank at 0.4 e/nm2)
MIN_RESPONSE = 0.5
# one binned pixel: the measurement's precision far from focus; a shift this small changes nothing measurable
MIN_SHIFT_PX = BIN
# band-pass of the same-field check: bin 8 x 8, then Gaussians of 2 and 16 binned px (16 and 128 px); the defocus
# blur (2 alpha z across: 32 px at 40 um, 4 mrad and 10 nm pixels) leaves most of this band to both frames
FIELD_BIN = 8
FIELD_SIGMA_PX = (2.0, 16.0)
# below this the frames do not show the same field (figures in the module's comment)
MIN_FIELD_CORRELATION = 0.7


@dataclass(frozen=True)
class PairShift:
    dy_px: int          # the plus frame shows at (y + dy, x + dx) what the minus frame shows at (y, x)
    dx_px: int
    response: float     # phase-correlation peak, about 1 for a clear shift

    @property
    def any(self) -> bool:
        return self.dy_px != 0 or self.dx_px != 0


def bin_mean(image: np.ndarray, n: int) -> np.ndarray:
    """``n`` x ``n`` bin means of a whole frame as float32 (rows and columns beyond a multiple of ``n`` dropped).

    As float32 the bin means are not rounded (rounding an 8-bit bin mean to 1 of 255 is coarse beside a dim
    frame's contrast). OpenCV's area interpolation is the bin mean at an integer factor, several times faster
    than numpy's, and takes a fast path at a factor of 2 alone: a 4 x 4 bin as two 2 x 2 steps took 0.07 against
    0.26 ms per 1024 x 768 frame (2 cores)."""
    import cv2
    h, w = image.shape[0] // n * n, image.shape[1] // n * n
    out = np.ascontiguousarray(image[:h, :w], dtype=np.float32)
    while n > 1:
        f = 2 if n % 2 == 0 else n
        out = cv2.resize(out, (out.shape[1] // f, out.shape[0] // f), interpolation=cv2.INTER_AREA)
        n //= f
    return out


def bin_frame(image: np.ndarray) -> np.ndarray:
    """BIN x BIN bin means of a whole frame, float32.

    Registration, the same-field check and the contrast measurement all read the frames at BIN x BIN binning or
    coarser: the estimator bins each frame once and hands the result to all three."""
    return bin_mean(image, BIN)


def _centre(binned: np.ndarray, full_px: int) -> tuple[slice, slice]:
    """The central crop of a binned frame covering at most ``full_px`` unbinned pixels a side."""
    hb, wb = (min(full_px // BIN, n) for n in binned.shape)
    y0, x0 = (binned.shape[0] - hb) // 2, (binned.shape[1] - wb) // 2
    return slice(y0, y0 + hb), slice(x0, x0 + wb)


def measure_shift(minus: np.ndarray, plus: np.ndarray,
                  binned: tuple[np.ndarray, np.ndarray] | None = None) -> PairShift:
    """The whole-pixel shift between two frames of one shape; zero when it is small or unclear. ``binned``: the
    frames' ``bin_frame``, when the caller has them already."""
    import cv2
    bm, bp = binned or (bin_frame(minus), bin_frame(plus))
    rows, cols = _centre(bm, CROP_PX)
    a, b = bm[rows, cols], bp[rows, cols]
    h, w = a.shape[0] * BIN, a.shape[1] * BIN
    if h < 16 * BIN or w < 16 * BIN:
        return PairShift(0, 0, 0.0)
    sa, sb = float(a.std()), float(b.std())
    if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(sa * sb)) or sa == 0 or sb == 0:
        return PairShift(0, 0, 0.0)
    win = cv2.createHanningWindow((a.shape[1], a.shape[0]), cv2.CV_32F)
    # Scaled to unit spread: the cross-power spectrum of frames in the millions (a float image in counts or
    # physical units) overflows float32. Scaled copies, too: phaseCorrelate multiplies its inputs by the window
    # in place (OpenCV 4-5), and the binned frames are read again by the contrast measurement and the same-field
    # check.
    (dx, dy), response = cv2.phaseCorrelate(a * np.float32(1 / sa), b * np.float32(1 / sb), win)
    dy_px, dx_px = int(round(dy * BIN)), int(round(dx * BIN))
    if (response < MIN_RESPONSE or max(abs(dy_px), abs(dx_px)) < MIN_SHIFT_PX
            or abs(dy_px) > h // 4 or abs(dx_px) > w // 4):
        return PairShift(0, 0, float(response))
    return PairShift(dy_px, dx_px, float(response))


def _band(binned: np.ndarray) -> np.ndarray:
    import cv2
    f = FIELD_BIN // BIN
    h, w = binned.shape[0] // f * f, binned.shape[1] // f * f
    b = cv2.resize(np.ascontiguousarray(binned[:h, :w]), (w // f, h // f), interpolation=cv2.INTER_AREA)
    # the wide Gaussian on a 4 x coarser grid, brought back linearly: nearly the same low-pass at a tenth of
    # the cost (the figures above were measured with it)
    bh, bw = b.shape
    small = cv2.resize(b, (max(1, bw // 4), max(1, bh // 4)), interpolation=cv2.INTER_AREA)
    wide = cv2.resize(cv2.GaussianBlur(small, (0, 0), FIELD_SIGMA_PX[1] / 4), (bw, bh),
                      interpolation=cv2.INTER_LINEAR)
    band = cv2.GaussianBlur(b, (0, 0), FIELD_SIGMA_PX[0]) - wide
    return (band - band.mean()).astype(np.float64)


def field_correlation(minus: np.ndarray, plus: np.ndarray,
                      binned: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Correlation of the two frames' band-passed structure: about 1 when they show the same field, whatever the
    defocus and contrast of each; near 0 when they show different parts of the specimen. NaN for frames too
    small to tell (under 16 binned px a side) or without structure in this band. ``binned``: the frames'
    ``bin_frame``, when the caller has them already."""
    bm, bp = binned or (bin_frame(minus), bin_frame(plus))
    # the central crop registration measures (larger frames cost more and tell nothing more)
    rows, cols = _centre(bm, CROP_PX)
    if min(bm[rows, cols].shape) * BIN < 16 * FIELD_BIN:
        return float("nan")
    a, b = _band(bm[rows, cols]), _band(bp[rows, cols])
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if not np.isfinite(norm) or norm == 0.0:
        return float("nan")
    return float((a * b).sum() / norm)


def binned_shift(shift: PairShift) -> PairShift:
    """A shift in ``bin_frame`` pixels, to crop binned frames to their common field with ``common_field`` (to
    the nearest binned pixel: what reads them is blind to a few pixels)."""
    return PairShift(int(round(shift.dy_px / BIN)), int(round(shift.dx_px / BIN)), shift.response)


def common_field(minus: np.ndarray, plus: np.ndarray, shift: PairShift) -> tuple[np.ndarray, np.ndarray]:
    """Both frames cropped to the field they share, so that equal offsets show the same specimen."""
    h, w = minus.shape
    dy, dx = shift.dy_px, shift.dx_px
    a = minus[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    b = plus[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return a, b
