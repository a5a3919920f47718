"""Probe and image formation of the simulated SEM.

The geometric probe follows MAPFoSt's aberration model (Binding et al. 2013)
with a uniform rather than Gaussian spot: a ray leaving the aperture at angle
theta (|theta| <= alpha) lands at r = M theta with

    M = [[z + ax, ay], [ay, z - ax]]     (z defocus, (ax, ay) astigmatism, metres)

so the spot is the aperture disc mapped by M, filled uniformly. Its optical
transfer function is 2 J1(u)/u with u = alpha |M k| (M is symmetric). The spot is
convolved with a Gaussian in-focus probe (source size, diffraction, spherical and
chromatic aberration), so even a perfectly focused image has a finite resolution.

Uniform filling is the default (DESIGN.md). A real column fills its aperture less
evenly, and a profile may say so (``ApertureProfile``): current density across the
aperture ~ exp(-taper rho^2) (rho = theta / alpha; taper > 0 falls towards the edge,
taper < 0 piles current at the rim as spherical aberration does in a defocused spot),
plus a fraction of the current scattered into a Gaussian halo of angular s.d.
halo_width alpha. Any such rotationally symmetric angular distribution is mapped by
the same M, so its OTF is a function of u = alpha |M k| alone: the Hankel transform
of the profile, which has no closed form for a taper and is tabulated once per profile.

Axes: the image frame has x along columns and y along rows (rows point down). In
that frame this model equals MAPFoSt's with its y axis pointing up.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import integrate, special

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def jinc(u: np.ndarray) -> np.ndarray:
    """2 J1(u) / u, equal to 1 at u = 0."""
    out = np.ones_like(u)
    nz = u > 1e-6
    out[nz] = 2.0 * special.j1(u[nz]) / u[nz]
    return out


@dataclass(frozen=True)
class ApertureProfile:
    """How the current fills the aperture: uniform (taper 0, no halo) unless a profile says otherwise."""
    taper: float = 0.0              # current density ~ exp(-taper rho^2) inside the aperture
    halo_fraction: float = 0.0      # share of the current in a Gaussian halo ...
    halo_width: float = 1.5         # ... of angular s.d. halo_width * alpha

    @property
    def uniform(self) -> bool:
        return self.taper == 0.0 and self.halo_fraction == 0.0

    def otf(self, u: np.ndarray) -> np.ndarray:
        """Transfer function of the defocused spot at u = alpha |M k|."""
        if self.taper == 0.0:
            core = jinc(u)
        else:
            grid, table = _tapered_otf_table(float(self.taper))
            core = np.interp(u, grid, table, right=0.0).astype(u.dtype)
        if self.halo_fraction == 0.0:
            return core
        halo = np.exp(-0.5 * (self.halo_width * u) ** 2)
        return (1.0 - self.halo_fraction) * core + self.halo_fraction * halo

    def mean_square_angle(self) -> float:
        """E[|theta|^2] / alpha^2 over the current: 1/2 for the uniform disc."""
        if self.taper == 0.0:
            core = 0.5
        else:
            def moment(n: int) -> float:
                return integrate.quad(lambda rho: rho ** n * math.exp(-self.taper * rho * rho), 0.0, 1.0)[0]
            core = moment(3) / moment(1)
        # the halo is a 2-D Gaussian of s.d. halo_width per axis
        return (1.0 - self.halo_fraction) * core + self.halo_fraction * 2.0 * self.halo_width ** 2

    def extent(self) -> float:
        """Radius, in units of the aperture disc's, that holds the spot (3 s.d. of the halo when there is one)."""
        return max(1.0, 3.0 * self.halo_width) if self.halo_fraction > 0 else 1.0


UNIFORM = ApertureProfile()
_U_MAX = 400.0     # beyond this the tapered spot's OTF is below 1e-3 of its peak (jinc: 2e-4)


@functools.lru_cache(maxsize=64)
def _tapered_otf_table(taper: float) -> tuple[np.ndarray, np.ndarray]:
    """Hankel transform of exp(-taper rho^2) on the unit disc, normalised to 1 at u = 0, on a grid of u."""
    rho = np.linspace(0.0, 1.0, 2001)
    weight = np.exp(-taper * rho * rho) * rho
    grid = np.linspace(0.0, _U_MAX, 4001)
    rows = []
    for chunk in np.array_split(grid, 8):    # bounded memory: 500 x 2001 Bessel values at a time
        rows.append(integrate.simpson(weight * special.j0(chunk[:, None] * rho[None, :]), x=rho, axis=1))
    table = np.concatenate(rows)
    return grid.astype(np.float32), (table / table[0]).astype(np.float32)


def probe_otf(kx: np.ndarray, ky: np.ndarray, defocus_m: float, astig_m: tuple[float, float],
              alpha_rad: float, floor_fwhm_m: float, profile: ApertureProfile = UNIFORM) -> np.ndarray:
    """Optical transfer function at angular spatial frequencies (kx, ky) in rad/m (image frame)."""
    ax, ay = astig_m
    mkx = (defocus_m + ax) * kx + ay * ky
    mky = ay * kx + (defocus_m - ax) * ky
    u = alpha_rad * np.sqrt(mkx * mkx + mky * mky)
    sigma = floor_fwhm_m / FWHM_PER_SIGMA
    return profile.otf(u) * np.exp(-0.5 * sigma * sigma * (kx * kx + ky * ky))


def blur_radius_m(defocus_m: float, astig_m: tuple[float, float], alpha_rad: float, floor_fwhm_m: float,
                  profile: ApertureProfile = UNIFORM) -> float:
    """Radius that contains the whole geometric spot (and its halo) plus 3 sigma of the in-focus floor."""
    ax, ay = astig_m
    # largest singular value of M bounds the spot's semi-axis
    lam = abs(defocus_m) + math.hypot(ax, ay)
    return alpha_rad * lam * profile.extent() + 3.0 * floor_fwhm_m / FWHM_PER_SIGMA


def probe_rms_radius_m(defocus_m: float, astig_m: tuple[float, float], alpha_rad: float, floor_fwhm_m: float,
                       profile: ApertureProfile = UNIFORM) -> float:
    """Root-mean-square radius of the probe: the in-focus floor and the geometric spot add in quadrature. The
    spot's second moment is E[theta theta^T] = E|theta|^2 / 2 * I mapped by M, i.e. E|theta|^2 (z^2 + ax^2 + ay^2)."""
    ax, ay = astig_m
    sigma = floor_fwhm_m / FWHM_PER_SIGMA
    spot = profile.mean_square_angle() * alpha_rad ** 2 * (defocus_m ** 2 + ax * ax + ay * ay)
    return math.sqrt(2.0 * sigma * sigma + spot)


def apply_probe(image: np.ndarray, pixel_size_m: float, defocus_m: float, astig_m: tuple[float, float],
                alpha_rad: float, floor_fwhm_m: float, profile: ApertureProfile = UNIFORM) -> np.ndarray:
    """Convolve a (padded) sharp image with the probe; circular, so pad by ``blur_radius_m`` first."""
    h, w = image.shape
    spec = scipy.fft.rfft2(image, workers=1)
    kx = (2.0 * np.pi * scipy.fft.rfftfreq(w, d=pixel_size_m)).astype(np.float32)[None, :]
    ky = (2.0 * np.pi * scipy.fft.fftfreq(h, d=pixel_size_m)).astype(np.float32)[:, None]
    otf = probe_otf(kx, ky, defocus_m, astig_m, alpha_rad, floor_fwhm_m, profile)
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
