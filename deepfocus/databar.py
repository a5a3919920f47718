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


@dataclass(frozen=True)
class ScannedRegion:
    rows: slice
    cols: slice
    dropped_px: tuple[int, int, int, int]     # top, bottom, left, right

    @property
    def any_dropped(self) -> bool:
        return any(self.dropped_px)


def _edge_run(same: np.ndarray, limit: int) -> int:
    """Length of the run of True at the start of ``same``, or 0 when it exceeds ``limit``."""
    n = int(np.argmin(same)) if not same.all() else same.size
    return n if n <= limit else 0


def scanned_region(minus: np.ndarray, plus: np.ndarray) -> ScannedRegion:
    """Rows and columns of a checked pair that were scanned, not drawn."""
    h, w = minus.shape
    # every STRIDE-th pixel along a row (column) tells the agreeing fraction well enough, at a fraction of the
    # cost of comparing whole frames
    rows = np.count_nonzero(minus[:, ::STRIDE] == plus[:, ::STRIDE], axis=1)
    cols = np.count_nonzero(minus[::STRIDE] == plus[::STRIDE], axis=0)
    row_same = rows >= SAME_FRACTION * len(range(0, w, STRIDE))
    col_same = cols >= SAME_FRACTION * len(range(0, h, STRIDE))
    top = _edge_run(row_same, int(h * MAX_BAND_FRACTION))
    bottom = _edge_run(row_same[::-1], int(h * MAX_BAND_FRACTION))
    left = _edge_run(col_same, int(w * MAX_BAND_FRACTION))
    right = _edge_run(col_same[::-1], int(w * MAX_BAND_FRACTION))
    return ScannedRegion(slice(top, h - bottom), slice(left, w - right), (top, bottom, left, right))
