"""Astigmatism in um (image frame) <-> stigmator units, from what the installation believes.

The calibration in a microscope's YAML (``calibration.stig_rotation_deg`` and
``calibration.stig_scale_um_per_unit``) describes the stigmator in the scan's own frame:
one unit of stigmator x produces ``scale`` um of astigmatism at ``rotation`` degrees.
Astigmatism is two-fold, so a scan rotated by phi sees it rotated by -2 phi; the
configured scan rotation is folded in here once. ``calibration.stig_matrix``, when
given, is the whole map (units per um of image-frame astigmatism) and is used as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _rot(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s], [s, c]])


@dataclass(frozen=True)
class StigCalibration:
    """``units = units_per_um @ astig_um``; astigmatism in the image frame (x columns, y rows down)."""
    units_per_um: tuple[tuple[float, float], tuple[float, float]] = ((0.5, 0.0), (0.0, 0.5))

    def __post_init__(self) -> None:
        m = np.asarray(self.units_per_um, float)
        if m.shape != (2, 2) or not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
            raise ValueError(f"stigmator calibration must be an invertible 2x2 matrix, got {self.units_per_um!r}")

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.units_per_um, float)

    @classmethod
    def from_rotation_scale(cls, rotation_deg: float, scale_um_per_unit: float,
                            scan_rotation_deg: float = 0.0) -> "StigCalibration":
        if not scale_um_per_unit > 0:
            raise ValueError(f"stigmator scale must be positive (um per unit), got {scale_um_per_unit}")
        um_per_unit = scale_um_per_unit * _rot(rotation_deg - 2.0 * scan_rotation_deg)
        inv = np.linalg.inv(um_per_unit)
        return cls(tuple(map(tuple, inv.tolist())))

    @classmethod
    def from_config(cls, cfg) -> "StigCalibration":
        """From a ``hardware.config.MicroscopeConfig`` (its ``calibration`` and ``scan`` sections)."""
        cal = cfg.calibration
        if cal.stig_matrix is not None:
            return cls(tuple(map(tuple, np.asarray(cal.stig_matrix, float).tolist())))
        return cls.from_rotation_scale(cal.stig_rotation_deg, cal.stig_scale_um_per_unit, cfg.scan.rotation_deg)

    def units(self, astig_x_um: float, astig_y_um: float) -> tuple[float, float]:
        u = self.matrix @ np.array([astig_x_um, astig_y_um])
        return float(u[0]), float(u[1])

    def astig_um(self, stig_x: float, stig_y: float) -> tuple[float, float]:
        a = np.linalg.solve(self.matrix, np.array([stig_x, stig_y]))
        return float(a[0]), float(a[1])
