"""Probe and image formation of the simulated SEM.

The geometric probe follows MAPFoSt's aberration model (Binding et al. 2013)
with a uniform rather than Gaussian spot: a ray leaving the aperture at angle
theta (|theta| <= alpha) lands at r = M theta with

    M = [[z + ax, ay], [ay, z - ax]]     (z defocus, (ax, ay) astigmatism, metres)

so the spot is the aperture disc mapped by M, filled uniformly. Its optical
transfer function is 2 J1(u)/u with u = alpha |M k| (M is symmetric). The spot is
convolved with a Gaussian in-focus probe (source size, diffraction, spherical and
chromatic aberration), so even a perfectly focused image has a finite resolution.

Axes: the image frame has x along columns and y along rows (rows point down). In
that frame this model equals MAPFoSt's with its y axis pointing up.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.fft
from scipy import special

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def jinc(u: np.ndarray) -> np.ndarray:
    """2 J1(u) / u, equal to 1 at u = 0."""
    out = np.ones_like(u)
    nz = u > 1e-6
    out[nz] = 2.0 * special.j1(u[nz]) / u[nz]
    return out


def probe_otf(kx: np.ndarray, ky: np.ndarray, defocus_m: float, astig_m: tuple[float, float],
              alpha_rad: float, floor_fwhm_m: float) -> np.ndarray:
    """Optical transfer function at angular spatial frequencies (kx, ky) in rad/m (image frame)."""
    ax, ay = astig_m
    mkx = (defocus_m + ax) * kx + ay * ky
    mky = ay * kx + (defocus_m - ax) * ky
    u = alpha_rad * np.sqrt(mkx * mkx + mky * mky)
    sigma = floor_fwhm_m / FWHM_PER_SIGMA
    return jinc(u) * np.exp(-0.5 * sigma * sigma * (kx * kx + ky * ky))


def blur_radius_m(defocus_m: float, astig_m: tuple[float, float], alpha_rad: float, floor_fwhm_m: float) -> float:
    """Radius that contains the whole geometric spot plus 3 sigma of the in-focus floor."""
    ax, ay = astig_m
    # largest singular value of M bounds the spot's semi-axis
    lam = abs(defocus_m) + math.hypot(ax, ay)
    return alpha_rad * lam + 3.0 * floor_fwhm_m / FWHM_PER_SIGMA


def apply_probe(image: np.ndarray, pixel_size_m: float, defocus_m: float, astig_m: tuple[float, float],
                alpha_rad: float, floor_fwhm_m: float) -> np.ndarray:
    """Convolve a (padded) sharp image with the probe; circular, so pad by ``blur_radius_m`` first."""
    h, w = image.shape
    spec = scipy.fft.rfft2(image, workers=1)
    kx = (2.0 * np.pi * scipy.fft.rfftfreq(w, d=pixel_size_m)).astype(np.float32)[None, :]
    ky = (2.0 * np.pi * scipy.fft.fftfreq(h, d=pixel_size_m)).astype(np.float32)[:, None]
    otf = probe_otf(kx, ky, defocus_m, astig_m, alpha_rad, floor_fwhm_m)
    return scipy.fft.irfft2(spec * otf, s=(h, w), workers=1).astype(np.float32)


def rotate_astigmatism(astig: tuple[float, float], angle_deg: float) -> tuple[float, float]:
    """Express astigmatism in a frame rotated by ``angle_deg``.

    Astigmatism is a two-fold quantity: rotating the frame by phi rotates the
    (ax, ay) vector by -2 phi.
    """
    c = math.cos(math.radians(-2.0 * angle_deg))
    s = math.sin(math.radians(-2.0 * angle_deg))
    ax, ay = astig
    return (c * ax - s * ay, s * ax + c * ay)


def stigmator_astigmatism_m(stig_set: tuple[float, float], stig_true: tuple[float, float],
                            rotation_deg: float, scale_um_per_unit: float) -> tuple[float, float]:
    """Astigmatism (m, column frame) left by stigmator setting ``stig_set`` when ``stig_true`` cancels it."""
    dx = stig_set[0] - stig_true[0]
    dy = stig_set[1] - stig_true[1]
    c = math.cos(math.radians(rotation_deg))
    s = math.sin(math.radians(rotation_deg))
    k = scale_um_per_unit * 1e-6
    return (k * (c * dx - s * dy), k * (s * dx + c * dy))
