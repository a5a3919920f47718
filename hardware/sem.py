"""The SEM device interface.

Public methods validate their arguments against the microscope's limits (and
raise ``LimitError`` before anything reaches the microscope), then call the
backend's ``_do_*`` method. A backend implements only the ``_do_*`` methods and
the capability probes; it never re-checks limits.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .clock import Clock, RealClock
from .errors import LimitError, check_range

ELEMENTARY_CHARGE_C = 1.602176634e-19


@dataclass(frozen=True)
class ScanSettings:
    pixel_size_m: float = 10e-9
    width_px: int = 1024
    height_px: int = 768
    dwell_s: float = 200e-9
    rotation_deg: float = 0.0

    def frame_pixels(self) -> int:
        return self.width_px * self.height_px


@dataclass(frozen=True)
class SEMLimits:
    wd_min_m: float = 1e-3
    wd_max_m: float = 12e-3
    stig_min: float = -10.0
    stig_max: float = 10.0
    pixel_size_min_m: float = 0.5e-9
    pixel_size_max_m: float = 2e-6
    dwell_min_s: float = 25e-9
    dwell_max_s: float = 1e-3
    frame_min_px: int = 16
    frame_max_px: int = 8192
    wd_step_max_m: float = 500e-6


@dataclass
class Frame:
    """One acquired image with what was set when it was taken."""
    image: np.ndarray
    scan: ScanSettings
    wd_m: float
    stig: tuple[float, float]
    beam_current_a: float
    timestamp_s: float
    duration_s: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dose_e_per_nm2(self) -> float:
        """Electron dose this frame delivered per nm^2 of specimen."""
        if self.metadata.get("blanked"):
            return 0.0
        p_nm = self.scan.pixel_size_m * 1e9
        return self.beam_current_a * self.scan.dwell_s / ELEMENTARY_CHARGE_C / (p_nm * p_nm)


def dose_e_per_nm2(current_a: float, dwell_s: float, pixel_size_m: float) -> float:
    p_nm = pixel_size_m * 1e9
    return current_a * dwell_s / ELEMENTARY_CHARGE_C / (p_nm * p_nm)


class SEM(ABC):
    """Working distance, stigmators, scan, frame grab and beam blanking of one microscope."""

    def __init__(self, limits: SEMLimits | None = None, clock: Clock | None = None):
        self.limits = limits or SEMLimits()
        self.clock = clock or RealClock()

    # ------------------------------------------------------------------ working distance
    def get_wd_m(self) -> float:
        return float(self._do_get_wd_m())

    def set_wd_m(self, wd_m: float) -> None:
        lim = self.limits
        wd = check_range("working distance", wd_m, lim.wd_min_m, lim.wd_max_m, "m")
        step = abs(wd - self.get_wd_m())
        if step > lim.wd_step_max_m:
            raise LimitError("working distance step", step, 0.0, lim.wd_step_max_m, "m")
        self._do_set_wd_m(wd)

    # ------------------------------------------------------------------ stigmators
    def has_stigmator(self) -> bool:
        return True

    def get_stig(self) -> tuple[float, float]:
        x, y = self._do_get_stig()
        return float(x), float(y)

    def set_stig(self, x: float, y: float) -> None:
        if not self.has_stigmator():
            raise NotImplementedError(f"{type(self).__name__} has no stigmator")
        lim = self.limits
        sx = check_range("stigmator x", x, lim.stig_min, lim.stig_max)
        sy = check_range("stigmator y", y, lim.stig_min, lim.stig_max)
        self._do_set_stig(sx, sy)

    # ------------------------------------------------------------------ scan
    def has_scan_rotation(self) -> bool:
        return True

    def get_scan(self) -> ScanSettings:
        return self._do_get_scan()

    def set_scan(self, settings: ScanSettings | None = None, **changes: Any) -> ScanSettings:
        """Apply scan settings (a whole ``ScanSettings`` or keyword changes to the current one)."""
        s = settings if settings is not None else self.get_scan()
        if changes:
            s = replace(s, **changes)
        lim = self.limits
        if not s.dwell_s > 0:
            raise LimitError("dwell time", s.dwell_s, lim.dwell_min_s, lim.dwell_max_s, "s")
        s = replace(s, pixel_size_m=check_range("pixel size", s.pixel_size_m, lim.pixel_size_min_m,
                                                lim.pixel_size_max_m, "m"),
                    dwell_s=check_range("dwell time", s.dwell_s, lim.dwell_min_s, lim.dwell_max_s, "s"))
        for name, v in (("frame width", s.width_px), ("frame height", s.height_px)):
            if int(v) != v:
                raise LimitError(name, v, lim.frame_min_px, lim.frame_max_px, "px")
            check_range(name, v, lim.frame_min_px, lim.frame_max_px, "px")
        if not math.isfinite(s.rotation_deg):
            raise LimitError("scan rotation", s.rotation_deg, -360.0, 360.0, "deg")
        if s.rotation_deg != self.get_scan().rotation_deg and not self.has_scan_rotation():
            raise NotImplementedError(f"{type(self).__name__} cannot rotate its scan")
        s = replace(s, width_px=int(s.width_px), height_px=int(s.height_px),
                    rotation_deg=((s.rotation_deg + 180.0) % 360.0) - 180.0)
        self._do_set_scan(s)
        return s

    def frame_time_s(self, settings: ScanSettings | None = None) -> float:
        """Time one frame takes at ``settings`` (default: current)."""
        return self._do_frame_time_s(settings or self.get_scan())

    # ------------------------------------------------------------------ acquisition
    def grab_frame(self) -> Frame:
        frame = self._do_grab_frame()
        if frame.image.ndim != 2 or frame.image.shape != (frame.scan.height_px, frame.scan.width_px):
            from .errors import BackendError
            raise BackendError(f"incomplete frame: got shape {frame.image.shape}, expected "
                               f"{(frame.scan.height_px, frame.scan.width_px)}")
        return frame

    # ------------------------------------------------------------------ beam
    def has_blanker(self) -> bool:
        return True

    def blank_beam(self) -> None:
        if not self.has_blanker():
            raise NotImplementedError(f"{type(self).__name__} has no beam blanker")
        self._do_set_blanked(True)

    def unblank_beam(self) -> None:
        if not self.has_blanker():
            raise NotImplementedError(f"{type(self).__name__} has no beam blanker")
        self._do_set_blanked(False)

    def is_blanked(self) -> bool:
        return bool(self._do_is_blanked())

    def get_beam_current_a(self) -> float:
        return float(self._do_get_beam_current_a())

    # ------------------------------------------------------------------ backend hooks
    @abstractmethod
    def _do_get_wd_m(self) -> float: ...

    @abstractmethod
    def _do_set_wd_m(self, wd_m: float) -> None: ...

    @abstractmethod
    def _do_get_stig(self) -> tuple[float, float]: ...

    @abstractmethod
    def _do_set_stig(self, x: float, y: float) -> None: ...

    @abstractmethod
    def _do_get_scan(self) -> ScanSettings: ...

    @abstractmethod
    def _do_set_scan(self, settings: ScanSettings) -> None: ...

    @abstractmethod
    def _do_frame_time_s(self, settings: ScanSettings) -> float: ...

    @abstractmethod
    def _do_grab_frame(self) -> Frame: ...

    @abstractmethod
    def _do_set_blanked(self, blanked: bool) -> None: ...

    @abstractmethod
    def _do_is_blanked(self) -> bool: ...

    @abstractmethod
    def _do_get_beam_current_a(self) -> float: ...
