"""The virtual wafer: where the sections lie, how high their surfaces are, what has been milled.

Focus geometry: the specimen surface under the beam sits at

    height = wafer surface (tilt + bow) + section mounting offset + remaining thickness

above the nominal wafer plane, so the true best working distance is
``wd_nominal - stage_z - height``. Milling removes material and so moves best
focus away from the lens by the depth removed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..config import WaferConfig

MILL_GRID = 32  # cells per section side of the milled-depth map (local mill inhomogeneity)


@dataclass
class Section:
    index: int
    center_m: tuple[float, float]
    size_m: tuple[float, float]
    orientation_deg: float
    thickness_m: float
    height_offset_m: float
    specimen_origin_m: tuple[float, float]   # where the section's centre lies in the specimen's coordinates
    stig_center: tuple[float, float]         # stigmator setting that cancels the astigmatism here (charging)
    irradiation_ev_per_cm3: float = 0.0
    mill_rate_map: np.ndarray = field(default_factory=lambda: np.ones((MILL_GRID, MILL_GRID), np.float32))
    removed_m: np.ndarray = field(default_factory=lambda: np.zeros((MILL_GRID, MILL_GRID), np.float32))

    def to_local(self, x_m, y_m):
        """Wafer coordinates -> section frame (origin at the centre, axes along the section's edges)."""
        c = math.cos(math.radians(self.orientation_deg))
        s = math.sin(math.radians(self.orientation_deg))
        dx = np.asarray(x_m) - self.center_m[0]
        dy = np.asarray(y_m) - self.center_m[1]
        return c * dx + s * dy, -s * dx + c * dy

    def contains(self, x_m: float, y_m: float) -> bool:
        u, v = self.to_local(x_m, y_m)
        return abs(float(u)) <= self.size_m[0] / 2 and abs(float(v)) <= self.size_m[1] / 2

    def removed_at_local(self, u_m, v_m):
        """Milled depth at section-local coordinates (bilinear in the mill grid, clamped at the edges)."""
        g = self.removed_m
        gx = (np.asarray(u_m, np.float32) / self.size_m[0] + 0.5) * (g.shape[1] - 1)
        gy = (np.asarray(v_m, np.float32) / self.size_m[1] + 0.5) * (g.shape[0] - 1)
        if np.ndim(gx) == 0:
            return float(cv2.remap(g, np.array([[gx]], np.float32), np.array([[gy]], np.float32),
                                   cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0, 0])
        return cv2.remap(g, gx.astype(np.float32), gy.astype(np.float32), cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    def remaining_thickness_m(self, x_m: float, y_m: float) -> float:
        u, v = self.to_local(x_m, y_m)
        return max(self.thickness_m - self.removed_at_local(u, v), 0.0)

    def mill(self, depth_m) -> None:
        """Remove ``depth_m`` (a number or a MILL_GRID x MILL_GRID map) of material, stopping at the wafer."""
        self.removed_m = np.minimum(self.removed_m + np.asarray(depth_m, np.float32), np.float32(self.thickness_m))


def _inhomogeneity(rng: np.random.Generator, sd: float) -> np.ndarray:
    """Smooth relative mill-rate map (mean 1) over a section: cluster flux and section surface vary."""
    coarse = rng.standard_normal((5, 5)).astype(np.float32)
    smooth = cv2.resize(coarse, (MILL_GRID, MILL_GRID), interpolation=cv2.INTER_CUBIC)
    smooth /= smooth.std() + 1e-6
    return np.clip(1.0 + sd * smooth, 0.2, None).astype(np.float32)


class VirtualWafer:
    """Sections laid out in rows and columns with per-section scatter, on a tilted, bowed wafer."""

    def __init__(self, cfg: WaferConfig, rng: np.random.Generator,
                 stig_center: tuple[float, float] = (0.0, 0.0), stig_spread: float = 0.0):
        self.cfg = cfg
        self.radius_m = cfg.diameter_mm * 1e-3 / 2
        self.sections: list[Section] = []
        pitch = (cfg.section_pitch_mm[0] * 1e-3, cfg.section_pitch_mm[1] * 1e-3)
        size = (cfg.section_size_mm[0] * 1e-3, cfg.section_size_mm[1] * 1e-3)
        x0 = -(cfg.section_cols - 1) * pitch[0] / 2
        y0 = -(cfg.section_rows - 1) * pitch[1] / 2
        for r in range(cfg.section_rows):
            for c in range(cfg.section_cols):
                cx = x0 + c * pitch[0] + rng.normal(0, cfg.position_jitter_mm * 1e-3 / 3)
                cy = y0 + r * pitch[1] + rng.normal(0, cfg.position_jitter_mm * 1e-3 / 3)
                if math.hypot(cx, cy) + max(size) > self.radius_m * 0.95:
                    continue  # sections are only collected onto the flat part of the wafer
                self.sections.append(Section(
                    index=len(self.sections),
                    center_m=(cx, cy),
                    size_m=size,
                    orientation_deg=float(rng.normal(0, cfg.orientation_sd_deg)),
                    thickness_m=max(float(rng.normal(cfg.section_thickness_nm, cfg.section_thickness_sd_nm)),
                                    10.0) * 1e-9,
                    height_offset_m=float(rng.normal(0, cfg.section_height_sd_um)) * 1e-6,
                    specimen_origin_m=(float(rng.uniform(-2e-6, 2e-6)), float(rng.uniform(-2e-6, 2e-6))),
                    stig_center=(float(stig_center[0] + rng.normal(0, stig_spread)),
                                 float(stig_center[1] + rng.normal(0, stig_spread))),
                    irradiation_ev_per_cm3=cfg.irradiation_ev_per_cm3,
                    mill_rate_map=_inhomogeneity(rng, cfg.mill_inhomogeneity),
                ))

    def surface_height_m(self, x_m: float, y_m: float) -> float:
        """Height of the bare wafer surface above the nominal plane (tilt and bow)."""
        tx, ty = self.cfg.tilt_um_per_mm
        r2 = (x_m * x_m + y_m * y_m) / (self.radius_m * self.radius_m)
        return (tx * x_m * 1e3 + ty * y_m * 1e3) * 1e-6 + self.cfg.bow_um * 1e-6 * (1.0 - r2)

    def section_at(self, x_m: float, y_m: float) -> Section | None:
        for s in self.sections:
            if abs(x_m - s.center_m[0]) < s.size_m[0] and abs(y_m - s.center_m[1]) < s.size_m[0] \
                    and s.contains(x_m, y_m):
                return s
        return None

    def top_height_m(self, x_m: float, y_m: float) -> float:
        """Height of whatever the beam hits: a section's top surface or the bare wafer."""
        h = self.surface_height_m(x_m, y_m)
        s = self.section_at(x_m, y_m)
        if s is not None:
            h += s.height_offset_m + s.remaining_thickness_m(x_m, y_m)
        return h
