"""Test specimens that are not tissue: what a facility images to check focus and resolution.

Gold on carbon is the usual SEM resolution target: bright gold islands of a few to
some hundred nanometres on a faintly textured, dark carbon film, most of the field
bare. An autofocus trained on neuropil meets here sharp round edges, a sparse field
and few mid-sized structures, so it shows whether the method generalises beyond tissue.

``load_specimen("gold-on-carbon")`` returns it, as does a profile's
``specimen: gold-on-carbon``, unless a file of that name exists.
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .specimen import Specimen

CARBON_GREY = 0.2           # film brightness relative to gold (1.0): gold yields several times more signal
CARBON_TEXTURE = 0.03       # s.d. of the film's grain
CARBON_GRAIN_NM = 8.0
GOLD_MEDIAN_RADIUS_NM = 25.0
GOLD_RADIUS_RANGE_NM = (5.0, 150.0)
GOLD_COVER = 0.15           # share of the field under gold


@lru_cache(maxsize=2)
def _gold_on_carbon(size_px: int, pixel_size_nm: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grain = cv2.GaussianBlur(rng.standard_normal((size_px, size_px)).astype(np.float32), (0, 0),
                             CARBON_GRAIN_NM / pixel_size_nm / 2)
    img = CARBON_GREY + CARBON_TEXTURE * grain / (grain.std() + 1e-6)
    lo, hi = GOLD_RADIUS_RANGE_NM
    r_nm = np.clip(rng.lognormal(np.log(GOLD_MEDIAN_RADIUS_NM), 0.6, 400_000), lo, hi)
    covered = np.cumsum(np.pi * r_nm ** 2) / (size_px * pixel_size_nm) ** 2
    r_px = r_nm[covered < GOLD_COVER] / pixel_size_nm
    # OpenCV draws circles at 1/16 px (shift 4), so particles of a few pixels keep their size
    centres = rng.uniform(0, size_px * 16, (len(r_px), 2)).astype(np.int64)
    for (x, y), r in zip(centres, r_px):
        cv2.circle(img, (int(x), int(y)), max(int(r * 16), 16), 1.0, -1, lineType=cv2.LINE_AA, shift=4)
    return np.clip(img, 0.0, 1.0)[None]


def gold_on_carbon(size_px: int = 4096, pixel_size_m: float = 4e-9, seed: int = 0) -> Specimen:
    """A gold-on-carbon field, ``size_px`` square at ``pixel_size_m`` (16 um at the defaults)."""
    if size_px < 64:
        raise ValueError(f"a gold-on-carbon field needs at least 64 px a side, got {size_px}")
    stack = _gold_on_carbon(int(size_px), float(pixel_size_m) * 1e9, int(seed))
    return Specimen(stack, float(pixel_size_m), 50e-9, name="gold-on-carbon")
