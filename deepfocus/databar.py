"""The scanned part of a saved SEM frame: data bars and other drawn borders left out.

Microscope software often saves frames with a data bar (high voltage, wd, magnification,
scale bar) drawn over or appended to the bottom rows. It is rendered, not scanned: the same
pixels in both frames of a pair, with no blur. Patches that reach into it tell the model
that the two frames are equally sharp, which drags the consensus towards "in focus" (an
80-row bar on a 1024 x 768 pair moved answers by 1 um on average). Scanned pixels carry
shot noise, so two frames almost never agree exactly on most of a row; a band of rows or
columns at the frame's edge where they do is left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAME_FRACTION = 0.5          # a row (column) whose pixels agree exactly in both frames this often is drawn
MAX_BAND_FRACTION = 0.34     # a larger band is not a data bar: keep the frame and let the other checks judge
STRIDE = 4
CHUNK = 16


@dataclass(frozen=True)
class ScannedRegion:
    rows: slice
    cols: slice
    dropped_px: tuple[int, int, int, int]     # top, bottom, left, right

    @property
    def any_dropped(self) -> bool:
        return any(self.dropped_px)


def _drawn_run(minus: np.ndarray, plus: np.ndarray, limit: int, from_end: bool) -> int:
    """How many rows from the top (bottom: ``from_end``) of the frames are drawn; 0 when more than ``limit``."""
    h, w = minus.shape
    need = SAME_FRACTION * len(range(0, w, STRIDE))
    n = 0
    # CHUNK rows at a time from the edge inwards: a frame without a bar is decided by its first chunk, where
    # comparing the whole frames cost as much as registering them
    while n < h:
        k = min(CHUNK, h - n)
        rows = slice(h - n - k, h - n) if from_end else slice(n, n + k)
        same = np.count_nonzero(minus[rows, ::STRIDE] == plus[rows, ::STRIDE], axis=1) >= need
        if from_end:
            same = same[::-1]
        if not same.all():
            n += int(np.argmin(same))
            break
        n += k
        if n > limit:
            break
    return n if n <= limit else 0


def scanned_region(minus: np.ndarray, plus: np.ndarray) -> ScannedRegion:
    """Rows and columns of a checked pair that were scanned, not drawn."""
    h, w = minus.shape
    # every STRIDE-th pixel along a row (column) tells the agreeing fraction well enough
    top = _drawn_run(minus, plus, int(h * MAX_BAND_FRACTION), False)
    bottom = _drawn_run(minus, plus, int(h * MAX_BAND_FRACTION), True)
    left = _drawn_run(minus.T, plus.T, int(w * MAX_BAND_FRACTION), False)
    right = _drawn_run(minus.T, plus.T, int(w * MAX_BAND_FRACTION), True)
    return ScannedRegion(slice(top, h - bottom), slice(left, w - right), (top, bottom, left, right))
