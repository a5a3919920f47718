"""Take per-line brightness offsets out of the patches before their spectra are read.

A detector or video amplifier that flickers, or mains pick-up not locked to the line
rate, adds one brightness offset to each scan line, independently in the two frames.
That puts power in the kx = 0 column of each frame's spectrum that has nothing to do with
the probe; against the blurred frame's weaker high frequencies it weighs more than against the
sharp frame's, and the ratio reads it as astigmatism (0.3 frame s.d. per line raised the astigmatism error of
the shipped model from 0.14 to 0.55 um on simulated pairs).

Line offsets live in the kx = 0 column of a patch's spectrum alone. The specimen's spectrum is
smooth across kx near 0, so the rows' weighted means at a few cycles per patch width (kx = 2-4)
vary at short range about as much as the plain row means do, unless line offsets add to the
latter. Only then are the short-range variations of the row means taken out. (Column means
make a poorer reference: a detector's bandwidth low-passes along the lines and smooths them,
so filtered frames would pass for frames with line offsets.) Over 576 patches of the four simulated specimens (synthetic and
the three real ones) at 1-30 um defocus and 25-200 ns dwell, as rendered and after detector
bandwidths and smoothing, the ratio stays within 0.72-2.3; offsets of 0.1 frame s.d. give 3.7-23.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SMOOTH_ROWS = 9        # row means are compared with their running mean over this many rows
MIN_RATIO = 3.0        # kx = 0 over kx = 2-4 short-range power above which offsets are removed
REF_CYCLES = (2, 3, 4)

_BASIS: dict[int, torch.Tensor] = {}


# the basis is padded with zero columns to this many: a product with 7 columns took 0.73 ms for 16 patches of
# 256 px on an AMD EPYC (MKL), with 16 columns 0.23 ms
BASIS_COLUMNS = 16


def _basis(w: int) -> torch.Tensor:
    """(w, BASIS_COLUMNS): the plain mean, then cosines and sines at REF_CYCLES cycles per ``w``, each divided by
    ``w``, then zeros."""
    if w not in _BASIS:
        x = torch.arange(w, dtype=torch.float64).unsqueeze(1)
        k = torch.tensor(REF_CYCLES, dtype=torch.float64).unsqueeze(0)
        ph = 2.0 * math.pi * x * k / w
        b = torch.zeros(w, BASIS_COLUMNS, dtype=torch.float64)
        b[:, :1 + 2 * len(REF_CYCLES)] = torch.cat([torch.ones(w, 1, dtype=torch.float64), torch.cos(ph),
                                                    torch.sin(ph)], dim=1) / w
        _BASIS[w] = b.float()
    return _BASIS[w]


def _short_range(v: torch.Tensor) -> torch.Tensor:
    """(M, P) profiles minus their running mean over SMOOTH_ROWS (edges replicated)."""
    k = SMOOTH_ROWS
    sm = F.avg_pool1d(F.pad(v.unsqueeze(1), (k // 2, k // 2), mode="replicate"), k, 1).squeeze(1)
    return v - sm


def offset_ratio(x: torch.Tensor) -> torch.Tensor:
    """(M, H, W) patches (rows are scan lines) -> (M,) short-range power of the row means over that of the rows'
    weighted means at REF_CYCLES (about 1 without line offsets)."""
    m, h, w = x.shape
    # one product gives the plain and the weighted row means of every row
    used = 1 + 2 * len(REF_CYCLES)
    means = (x.reshape(m * h, w) @ _basis(w))[:, :used].reshape(m, h, used).transpose(1, 2).reshape(-1, h)
    power = _short_range(means).pow(2).mean(dim=1).reshape(m, -1)
    # a complex weighted mean's power is the sum of its cosine and sine parts'
    return power[:, 0] / (power[:, 1:].sum(dim=1) / len(REF_CYCLES)).clamp(min=1e-30)


def remove_line_offsets_(x: torch.Tensor) -> torch.Tensor:
    """In place on (N, 2, P, P) patch pairs (rows are scan lines): each patch of each frame whose offset ratio
    exceeds MIN_RATIO loses the short-range variation of its row means. Returns which were changed, (N, 2) bool:
    their smooth remainder (the running mean over SMOOTH_ROWS is left) stays in the fx = 0 column of their
    spectra."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h, w)
    hit = offset_ratio(flat) > MIN_RATIO
    if bool(hit.any()):
        flat[hit] -= _short_range(flat[hit].mean(dim=2)).unsqueeze(2)
    return hit.reshape(n, c)
