"""An image pair checked before it is estimated: two grey frames of one shape and type, finite, not wrapped around;
and the (scale, offset) that maps both to [-1, 1] the same way."""
from __future__ import annotations

import numpy as np


def check_pair(minus: np.ndarray, plus: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Check a pair; return it with the (scale, offset) that maps both to [-1, 1] the same way."""
    a, b = np.asarray(minus), np.asarray(plus)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"expected two 2-D grey images, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"the two images differ in shape: {a.shape} (wd - d) vs {b.shape} (wd + d); "
                         "take both with the same scan settings")
    if a.dtype != b.dtype:
        raise ValueError(f"the two images differ in type: {a.dtype} vs {b.dtype}")
    if a.dtype == np.uint8:
        return a, b, 1 / 127.5, 1.0
    if a.dtype == np.uint16:
        return a, b, 1 / 32767.5, 1.0
    if a.dtype.kind not in "fiu":
        raise ValueError(f"unsupported image type {a.dtype}")
    if a.dtype.kind == "i" and a.dtype.itemsize <= 2:
        for name, img in (("wd - d", a), ("wd + d", b)):
            _check_no_wrap(name, img)
    if a.dtype.kind == "f":
        for name, img in (("wd - d", a), ("wd + d", b)):
            bad = int(img.size - np.count_nonzero(np.isfinite(img)))
            if bad:
                raise ValueError(f"the {name} image contains {bad} NaN or infinite pixel(s)")
    lo = float(min(a.min(), b.min()))
    hi = float(max(a.max(), b.max()))
    if a.dtype.kind == "f" and max(-lo, hi) > 1e6:
        # frames in counts or physical units: their squares overflow the float32 spectra and sums downstream
        a, b = (((img - lo) / ((hi - lo) or 1.0)).astype(np.float32) for img in (a, b))
        lo, hi = 0.0, 1.0
    scale = 2.0 / max(hi - lo, 1e-12)
    return a, b, scale, 1.0 + lo * scale


# Neighbouring pixels more than half a signed type's range apart, as a share of all neighbours, beyond which a frame
# is taken for an unsigned one read as signed. Measured on simulated 1024 x 768 frames at 50 ns, scaled to span most
# of 16 bits: 1-2e-4 as int16 (the shot noise spans the range), 0.19-0.23 as uint16 read as int16.
MAX_WRAPPED_SHARE = 0.01


def _check_no_wrap(name: str, img: np.ndarray) -> None:
    """Refuse a signed frame whose grey levels wrap around: an unsigned frame read as signed (a uint16 file read as
    int16) turns its brightest pixels into its darkest, and the model reads the edges this paints as sharp structure
    at any focus."""
    half = 1 << (8 * img.dtype.itemsize - 1)
    # every 4th line: the share is the same, at a quarter of the time (0.4 ms a 1024 x 768 pair)
    jumps = np.abs(np.diff(img[::4].astype(np.int32), axis=1)) > half
    n = int(np.count_nonzero(jumps))
    if n > MAX_WRAPPED_SHARE * jumps.size:
        raise ValueError(f"the {name} image's grey levels wrap around: {n} neighbouring pixels differ by more than "
                         f"half the {img.dtype} range, as where an unsigned ({img.dtype.name.replace('int', 'uint')}) "
                         f"frame was read as signed; read it as {img.dtype.name.replace('int', 'uint')}")
