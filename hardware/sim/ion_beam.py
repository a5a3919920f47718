"""What the gas cluster ion beam does to the simulated wafer.

The simulated gun reads the scan amplitudes actually set on the waveform
generator (or its emulator) and turns them into a field through its own true
calibration, so a wrong calibration on the control side shows up as a wrong
mill depth, as it would on a real gun. Material is removed at a rate per charge
that falls with the sections' prior electron irradiation (Schubert 2022, Table
2.1: 200 nm sections, Corgon-18, 10 kV, 30 degree glancing angle), times a
smooth local inhomogeneity per section.

The table is repeated here rather than imported from ``gcib``: this is the
simulated world's truth, the ``gcib`` model is what the control software
believes, and the hardware layer depends on nothing above it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import LimitError
from .wafer import MILL_GRID

# irradiation energy density (eV/cm3) -> milled volume per charge (m3/C)
_DOSE_EV_PER_CM3 = np.array([0.0, 0.25e27, 0.5e27, 1.0e27])
_VOLUME_PER_CHARGE_M3_PER_C = np.array([5.453e-8, 3.246e-8, 1.948e-8, 1.487e-8])


def volume_per_charge_m3_per_c(irradiation_ev_per_cm3: float) -> float:
    """Interpolated in log rate; held constant beyond the table (the truth must exist for any dose)."""
    d = float(np.clip(irradiation_ev_per_cm3, _DOSE_EV_PER_CM3[0], _DOSE_EV_PER_CM3[-1]))
    return float(np.exp(np.interp(d, _DOSE_EV_PER_CM3, np.log(_VOLUME_PER_CHARGE_M3_PER_C))))


@dataclass(frozen=True)
class ScanState:
    x_vpp: float
    y_vpp: float
    outputs_on: bool


def scan_state_from_33522a(snapshot_source) -> Callable[[], ScanState]:
    """Read channel 1 (x) and channel 2 (y) of a 33522A emulator's ``snapshot()``."""
    def read() -> ScanState:
        snap = snapshot_source.snapshot()
        x, y = snap.channel(1), snap.channel(2)
        return ScanState(float(x.amplitude_vpp), float(y.amplitude_vpp), bool(x.output_on and y.output_on))
    return read


class SimulatedIonBeam:
    """Removes material from the simulated wafer while the ion beam is on.

    Call it with the seconds the beam was on (it matches ``gcib.ion_gun.MillHook``;
    the charge and field the control side believes are ignored, the truth is
    computed from the instrument's amplitudes and the true beam current).
    """

    def __init__(self, sim, scan_state: Callable[[], ScanState]):
        self.sim = sim
        self.cfg = sim.cfg.ion_beam
        self.scan_state = scan_state
        self.charge_delivered_c = 0.0

    def field_m(self) -> tuple[float, float] | None:
        s = self.scan_state()
        if not s.outputs_on:
            return None   # without deflection the beam is parked; treated as a beam dump
        kx, ky = self.cfg.field_m_per_vpp
        return s.x_vpp * kx, s.y_vpp * ky

    def field_center_on_wafer_m(self) -> tuple[float, float]:
        p = self.sim.stage_position_actual()
        mx, my = (v * 1e-3 for v in self.cfg.mill_position_mm)
        return p.x_m - mx, p.y_m - my

    def __call__(self, seconds: float, charge_c: float | None = None, width_m: float | None = None,
                 height_m: float | None = None) -> None:
        self.expose(seconds)

    def expose(self, seconds: float) -> float:
        """Mill for ``seconds`` (the clock is not advanced here: the gun's ``expose`` does that).

        Returns the mean depth removed from the sections under the field (m).
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise LimitError("ion exposure time", seconds, 0.0, math.inf, "s")
        field = self.field_m()
        if field is None or seconds == 0:
            return 0.0
        width, height = field
        current = self.cfg.current_na * 1e-9
        charge = current * seconds
        self.charge_delivered_c += charge
        cx, cy = self.field_center_on_wafer_m()
        rot = math.radians(self.sim.stage_position_actual().rotation_deg)
        c, s = math.cos(rot), math.sin(rot)
        depths = []
        for sec in self.sim.wafer.sections:
            # cell centres of the section's mill grid in wafer coordinates
            g = (np.arange(MILL_GRID) + 0.5) / MILL_GRID - 0.5
            uu, vv = np.meshgrid(g * sec.size_m[0], g * sec.size_m[1])
            co, so = math.cos(math.radians(sec.orientation_deg)), math.sin(math.radians(sec.orientation_deg))
            wx = sec.center_m[0] + co * uu - so * vv - cx
            wy = sec.center_m[1] + so * uu + co * vv - cy
            # the field is fixed in the lab; the wafer turns with the stage rotation
            fx, fy = c * wx - s * wy, s * wx + c * wy
            inside = (np.abs(fx) <= width / 2) & (np.abs(fy) <= height / 2)
            if not inside.any():
                continue
            depth = (volume_per_charge_m3_per_c(sec.irradiation_ev_per_cm3) * self.cfg.rate_scale
                     * charge / (width * height))
            sec.mill(np.where(inside, depth * sec.mill_rate_map, 0.0).astype(np.float32))
            depths.append(depth)
        return float(np.mean(depths)) if depths else 0.0
