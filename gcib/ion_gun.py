"""The GCIB ion gun: scan-field calibration, the raster, beam blanking, delivered charge.

The gun is scanned by two sawtooth voltages (a waveform generator such as the
33522A in ``hardware.instruments``); each axis' peak-to-peak amplitude sets the
field edge along that axis. The relation is measured, not designed: a target of
known size (a washer) is scanned at a few amplitudes and a straight line is fitted
per axis. The beam current is not set from here; it is measured (Faraday cup or
the SEM's current detector) and given to the gun, which turns beam-on time into
delivered charge.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from hardware.clock import Clock, RealClock
from hardware.errors import LimitError, check_range

MAX_SCAN_VPP = 20.0          # into high impedance: +-10 V centred on 0 V
DEFAULT_X_HZ = 100.0         # fast axis
DEFAULT_Y_HZ = 1.0           # slow axis


# ----------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class CalibrationPoint:
    """A scan amplitude and the field edge it produced along one axis."""
    vpp: float
    field_m: float


def washer_points(diameter_m: float, edge_pairs_v: Iterable[tuple[float, float]]) -> list[CalibrationPoint]:
    """Calibration points from line scans across a washer of known diameter.

    Each pair is the deflection voltage at the washer's two edges along one axis;
    their difference is the amplitude that spans one diameter.
    """
    d = float(diameter_m)
    if not (math.isfinite(d) and d > 0):
        raise LimitError("washer diameter", d, 0.0, math.inf, "m")
    points = [CalibrationPoint(abs(float(b) - float(a)), d) for a, b in edge_pairs_v]
    if not points:
        raise ValueError("no washer edge voltages given")
    return points


@dataclass(frozen=True)
class AxisCalibration:
    """field_m = slope_m_per_vpp * vpp + offset_m, valid from 0 to ``max_vpp``."""
    slope_m_per_vpp: float
    offset_m: float = 0.0
    residual_sd_m: float = 0.0
    n_points: int = 0
    max_vpp: float = MAX_SCAN_VPP

    def field_m(self, vpp: float) -> float:
        v = check_range("scan amplitude", vpp, 0.0, self.max_vpp, "Vpp")
        return self.slope_m_per_vpp * v + self.offset_m

    def vpp_for(self, field_m: float, axis: str = "") -> float:
        lo, hi = self.field_m(0.0), self.field_m(self.max_vpp)
        name = f"ion scan field {axis}".rstrip()
        f = check_range(name, field_m, max(lo, 0.0), hi, "m")
        return (f - self.offset_m) / self.slope_m_per_vpp


def fit_axis(points: Sequence[CalibrationPoint], through_origin: bool = False,
             max_vpp: float = MAX_SCAN_VPP) -> AxisCalibration:
    """Least-squares straight line through the points (through the origin if asked, or with one point)."""
    v = np.array([p.vpp for p in points], dtype=float)
    f = np.array([p.field_m for p in points], dtype=float)
    if v.size == 0:
        raise ValueError("no calibration points")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(f))) or np.any(v <= 0) or np.any(f <= 0):
        raise ValueError(f"calibration points must have positive amplitude and field, got "
                         f"{[(p.vpp, p.field_m) for p in points]}")
    if through_origin or np.unique(v).size < 2:
        slope, offset = float(v @ f / (v @ v)), 0.0
        dof = max(v.size - 1, 1)
    else:
        slope, offset = (float(c) for c in np.polyfit(v, f, 1))
        dof = max(v.size - 2, 1)
    if slope <= 0:
        raise ValueError(f"calibration gives a field that shrinks with amplitude ({slope:g} m/Vpp)")
    residual = f - (slope * v + offset)
    sd = float(math.sqrt(residual @ residual / dof)) if v.size > (1 if offset == 0.0 else 2) else 0.0
    return AxisCalibration(slope, offset, sd, int(v.size), max_vpp)


@dataclass(frozen=True)
class ScanCalibration:
    x: AxisCalibration
    y: AxisCalibration

    @classmethod
    def fit(cls, x_points: Sequence[CalibrationPoint], y_points: Sequence[CalibrationPoint],
            through_origin: bool = False) -> "ScanCalibration":
        return cls(fit_axis(x_points, through_origin), fit_axis(y_points, through_origin))

    def vpp_for_field(self, width_m: float, height_m: float) -> tuple[float, float]:
        return self.x.vpp_for(width_m, "width"), self.y.vpp_for(height_m, "height")

    def field_m(self, x_vpp: float, y_vpp: float) -> tuple[float, float]:
        return self.x.field_m(x_vpp), self.y.field_m(y_vpp)

    def to_dict(self) -> dict[str, Any]:
        return {"x": asdict(self.x), "y": asdict(self.y)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScanCalibration":
        return cls(AxisCalibration(**d["x"]), AxisCalibration(**d["y"]))


# ----------------------------------------------------------------------------- blanking
class BeamBlanker(ABC):
    """Switches the ion beam off the specimen. ``blank`` must be safe to call at any time, repeatedly."""

    @abstractmethod
    def blank(self) -> None: ...

    @abstractmethod
    def unblank(self) -> None: ...

    @abstractmethod
    def is_blanked(self) -> bool: ...


class SerialRTSBlanker(BeamBlanker):
    """Blanking through a serial port's RTS line (a common way to drive a TTL blanker from a PC).

    ``port`` is an open ``serial.Serial`` (or anything with an ``rts`` attribute).
    ``blank_level`` is the RTS state that blanks; the beam is blanked on creation.
    """

    def __init__(self, port: Any, blank_level: bool = True):
        self.port = port
        self.blank_level = bool(blank_level)
        self.blank()

    def blank(self) -> None:
        self.port.rts = self.blank_level

    def unblank(self) -> None:
        self.port.rts = not self.blank_level

    def is_blanked(self) -> bool:
        return bool(self.port.rts) == self.blank_level


class DigitalOutputBlanker(BeamBlanker):
    """Blanking through one digital output line (USB I/O module, DAQ card): ``write(level)`` sets it."""

    def __init__(self, write: Callable[[bool], None], blank_level: bool = True):
        self._write = write
        self.blank_level = bool(blank_level)
        self._blanked = False
        self.blank()

    def blank(self) -> None:
        self._write(self.blank_level)
        self._blanked = True

    def unblank(self) -> None:
        self._write(not self.blank_level)
        self._blanked = False

    def is_blanked(self) -> bool:
        return self._blanked


class ScanDriver(Protocol):
    """What the gun needs of a waveform generator (``hardware.instruments.Waveform33522A`` fits)."""

    def configure_sawtooth_scan(self, x_hz: float, y_hz: float, x_vpp: float, y_vpp: float) -> Any: ...

    def outputs_off(self) -> None: ...


class ScanOutputsBlanker(BeamBlanker):
    """'Blanking' by switching the scan outputs off.

    Without deflection the beam rests on the field centre and keeps milling a
    spot there; use this only where the undeflected beam falls on a beam dump or
    outside the specimen, and prefer a real blanker otherwise.
    """

    def __init__(self, driver: ScanDriver):
        self.driver = driver
        self._scan: tuple[float, float, float, float] | None = None
        self._blanked = False
        self.blank()

    def remember_scan(self, x_hz: float, y_hz: float, x_vpp: float, y_vpp: float) -> None:
        self._scan = (x_hz, y_hz, x_vpp, y_vpp)

    def blank(self) -> None:
        self.driver.outputs_off()
        self._blanked = True

    def unblank(self) -> None:
        if self._scan is None:
            raise RuntimeError("no scan to restore: set the ion gun's field before unblanking")
        self.driver.configure_sawtooth_scan(*self._scan)
        self._blanked = False

    def is_blanked(self) -> bool:
        return self._blanked


class SimulatedBlanker(BeamBlanker):
    def __init__(self) -> None:
        self._blanked = True

    def blank(self) -> None:
        self._blanked = True

    def unblank(self) -> None:
        self._blanked = False

    def is_blanked(self) -> bool:
        return self._blanked


class RecordingScanDriver:
    """A scan driver that checks settings like the instrument would and remembers them (simulation, tests)."""

    def __init__(self) -> None:
        self.scan: tuple[float, float, float, float] | None = None
        self.outputs_on = False

    def configure_sawtooth_scan(self, x_hz: float, y_hz: float, x_vpp: float, y_vpp: float) -> Any:
        from hardware.instruments.waveform_33522a import SawtoothScan

        scan = SawtoothScan(x_hz, y_hz, x_vpp, y_vpp).validated()
        self.scan = (scan.x_hz, scan.y_hz, scan.x_vpp, scan.y_vpp)
        self.outputs_on = True
        return scan

    def outputs_off(self) -> None:
        self.outputs_on = False


# ----------------------------------------------------------------------------- the gun
# Called while the beam is on: (seconds of beam, charge in C, field width m, field height m).
MillHook = Callable[[float, float, float, float], None]


class IonGun:
    """Field, raster and blanking of one gun; ``expose`` keeps the beam on for a time and reports the charge.

    ``on_exposure`` lets a simulated specimen remove material while the beam is on.
    """

    def __init__(self, driver: ScanDriver, blanker: BeamBlanker, calibration: ScanCalibration,
                 current_a: float, clock: Clock | None = None, x_hz: float = DEFAULT_X_HZ,
                 y_hz: float = DEFAULT_Y_HZ, on_exposure: MillHook | None = None):
        self.driver = driver
        self.blanker = blanker
        self.calibration = calibration
        self.clock = clock or RealClock()
        self.x_hz, self.y_hz = float(x_hz), float(y_hz)
        self.on_exposure = on_exposure
        self.current_a = 0.0
        self.set_current_a(current_a)
        self.field_m: tuple[float, float] | None = None
        self.vpp: tuple[float, float] | None = None

    def set_current_a(self, current_a: float) -> None:
        """Record the measured beam current (the charge delivered is based on it)."""
        i = float(current_a)
        if not (math.isfinite(i) and 0 < i <= 1e-5):
            raise LimitError("ion beam current", i, 1e-15, 1e-5, "A")
        self.current_a = i

    def set_field(self, width_m: float, height_m: float) -> tuple[float, float]:
        """Program the raster for a ``width_m`` x ``height_m`` field; the beam stays blanked. Returns (x, y) Vpp."""
        x_vpp, y_vpp = self.calibration.vpp_for_field(width_m, height_m)
        self.blanker.blank()
        if isinstance(self.blanker, ScanOutputsBlanker):
            # switching the outputs on is what unblanks this kind of blanker: only remember the raster
            self.blanker.remember_scan(self.x_hz, self.y_hz, x_vpp, y_vpp)
        else:
            self.driver.configure_sawtooth_scan(self.x_hz, self.y_hz, x_vpp, y_vpp)
        self.field_m = (float(width_m), float(height_m))
        self.vpp = (x_vpp, y_vpp)
        return x_vpp, y_vpp

    @property
    def field_area_m2(self) -> float:
        if self.field_m is None:
            raise RuntimeError("the ion gun's field has not been set")
        return self.field_m[0] * self.field_m[1]

    def blank(self) -> None:
        self.blanker.blank()

    def is_blanked(self) -> bool:
        return self.blanker.is_blanked()

    def expose(self, duration_s: float) -> float:
        """Unblank for ``duration_s`` (on the gun's clock), blank again; return the charge delivered in C."""
        t = float(duration_s)
        if not (math.isfinite(t) and t >= 0):
            raise LimitError("exposure time", t, 0.0, math.inf, "s")
        if self.field_m is None:
            raise RuntimeError("set the ion gun's field before exposing")
        if t == 0:
            return 0.0
        try:
            self.blanker.unblank()
            self.clock.sleep(t)
            charge = self.current_a * t
            if self.on_exposure is not None:
                self.on_exposure(t, charge, *self.field_m)
        finally:
            self.blanker.blank()
        return charge

    def shutdown(self) -> None:
        """Blank and switch the scan outputs off."""
        try:
            self.blanker.blank()
        finally:
            self.driver.outputs_off()
