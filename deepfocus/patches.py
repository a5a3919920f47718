"""Where the estimator's patch pairs go on a frame, and how their answers combine."""
from __future__ import annotations

import math

import numpy as np

from .registration import bin_mean


def patch_offsets(shape: tuple[int, int], patch: int, n: int, layout: str = "grid",
                  seed: int = 0) -> list[tuple[int, int]]:
    """Top-left corners of ``n`` patches: an even grid over the frame, or seeded random."""
    h, w = shape
    if layout == "random":
        rng = np.random.default_rng(seed)
        return [(int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))) for _ in range(n)]
    if layout != "grid":
        raise ValueError(f"patch layout must be 'grid' or 'random', got {layout!r}")
    rows = max(1, min(int(round(math.sqrt(n * h / w))), h // patch if h >= 2 * patch else 1))
    rows = max(1, min(rows, n))
    cols = max(1, math.ceil(n / rows))
    ys = np.linspace(0, h - patch, rows).round().astype(int) if rows > 1 else [(h - patch) // 2]
    xs = np.linspace(0, w - patch, cols).round().astype(int) if cols > 1 else [(w - patch) // 2]
    return [(int(y), int(x)) for y in ys for x in xs][:n]


class PatchFrames:
    """A pair's frames as patch pairs are cut from them: binned ``nbin`` x ``nbin`` once, where the model reads
    coarser pixels than the frames have, rather than patch by patch (the grid's patches overlap: 8 patches of 512
    px hold 2.7 x the pixels of a 1024 x 768 frame; binned once, an estimate at 4 nm pixels took 1.5 ms less
    on 2 cores). Offsets stay in the frames' own pixels, ``shape`` is the frames' own."""

    def __init__(self, minus: np.ndarray, plus: np.ndarray, nbin: int):
        self.shape = minus.shape
        self.nbin = nbin
        self.frames = (minus, plus) if nbin == 1 else (bin_mean(minus, nbin), bin_mean(plus, nbin))

    def cut(self, offsets: list[tuple[int, int]], patch: int) -> np.ndarray:
        """(N, 2, patch, patch) float32: the pairs at ``offsets`` (frame pixels, rounded down to whole bins)."""
        a, b = self.frames
        pairs = np.empty((len(offsets), 2, patch, patch), np.float32)
        for i, (y, x) in enumerate(offsets):
            y, x = y // self.nbin, x // self.nbin
            # converted while copied: of the unbinned frames only the patches are ever converted
            pairs[i, 0] = a[y:y + patch, x:x + patch]
            pairs[i, 1] = b[y:y + patch, x:x + patch]
        return pairs


def count_tiles(shape: tuple[int, int], patch: int) -> int:
    """How many patches of ``patch`` px fit side by side without overlapping."""
    return (shape[0] // patch) * (shape[1] // patch)


# the frame n_patches is meant for, in the model's pixels (after any binning of fine pixels)
REFERENCE_FRAME_PX = 1024 * 768


def patch_count(shape: tuple[int, int], nbin: int, n: int, scale_with_frame: bool = True,
                max_patches: int = 16) -> int:
    """Patch pairs for a frame of ``shape`` px binned ``nbin`` x ``nbin`` for the model: ``n`` for a frame of
    REFERENCE_FRAME_PX or smaller, as many per REFERENCE_FRAME_PX of a larger one, up to ``max_patches``."""
    if not scale_with_frame:
        return n
    scaled = int(round(n * (shape[0] // nbin) * (shape[1] // nbin) / REFERENCE_FRAME_PX))
    return max(n, min(scaled, max_patches))


def tile_offsets(shape: tuple[int, int], patch: int, n: int | None = None) -> list[tuple[int, int]]:
    """Top-left corners of up to ``n`` (None: all) non-overlapping patches, the grid centred in the frame."""
    rows, cols = shape[0] // patch, shape[1] // patch
    y0, x0 = (shape[0] - rows * patch) // 2, (shape[1] - cols * patch) // 2
    return [(y0 + r * patch, x0 + c * patch) for r in range(rows) for c in range(cols)][:n]


# a patch added to those kept may share at most this share of its area with each of them
MAX_PATCH_OVERLAP = 0.25


def overlaps_little(o: tuple[int, int], others: list[tuple[int, int]], patch: int) -> bool:
    """Whether a ``patch`` px patch at ``o`` shares at most MAX_PATCH_OVERLAP of its area with each of ``others``:
    overlapping crops see the same pixels and would agree whatever the error."""
    return all(max(0, patch - abs(o[0] - k[0])) * max(0, patch - abs(o[1] - k[1])) <= MAX_PATCH_OVERLAP * patch ** 2
               for k in others)


def consensus(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score-weighted mean of per-patch (wd, ax, ay, score) answers and the weighted spread around it."""
    w = np.exp(pred[:, 3] - pred[:, 3].max())
    w /= w.sum()
    mean = (pred[:, :3] * w[:, None]).sum(axis=0)
    return mean, np.sqrt((w[:, None] * (pred[:, :3] - mean) ** 2).sum(axis=0))


# Two scans share no shot noise, so their pixel-to-pixel differences correlate only through the specimen, and
# weakly: over simulated pairs at 4-20 nm pixels, 50-4000 ns, 0.15-2.5 nA and 0-30 um from focus at most 0.94 (20
# nm pixels at -/+ 5 um, 4000 ns and 2.5 nA, in focus; 0.91 at 2000 ns, 0.11 at 50 ns). Copies of one frame,
# re-saved, offset or scaled, correlate 0.99-1.
MAX_NOISE_CORRELATION = 0.98


def noise_correlation(x) -> float:
    """Median over (N, 2, P, P) patch pairs of the correlation of their two frames' differences between
    neighbouring pixels along the lines (every 16th line: enough to tell copies, at 0.1 ms for 12 patch pairs)."""
    v = np.asarray(x[:, :, ::16])
    d = np.diff(v, axis=-1)
    a, b = d[:, 0].reshape(len(d), -1), d[:, 1].reshape(len(d), -1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return float(np.median((a * b).sum(axis=1) / np.maximum(den, 1e-30)))
