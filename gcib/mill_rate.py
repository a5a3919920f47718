"""Mill-rate and electron-dose models for GCIB milling of irradiated resin sections.

Thick epoxy sections must be irradiated with electrons before imaging (otherwise
they charge), and irradiation cross-links the resin so the ion beam removes it
more slowly. The model here is built from a table of measurements: for each prior
irradiation energy density, the volume removed per second at a known ion current
and scan area. Dividing by the current gives the volume removed per coulomb of
cluster ions, which is what transfers to other currents; dividing a volume rate by
the scanned area gives the depth rate.

Doses are energy densities (energy deposited per volume of section). Interfaces
take SI (J/m^3); the customary unit in the literature is eV/cm^3, so converters
for it sit next to the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.integrate import simpson
from scipy.interpolate import PchipInterpolator

from hardware.errors import LimitError, check_range

ELEMENTARY_CHARGE_C = 1.602176634e-19
_J_PER_M3_PER_EV_PER_CM3 = ELEMENTARY_CHARGE_C * 1e6  # 1 eV/cm^3 = e J / 1e-6 m^3


def ev_per_cm3_to_j_per_m3(dose_ev_per_cm3: float) -> float:
    return float(dose_ev_per_cm3) * _J_PER_M3_PER_EV_PER_CM3


def j_per_m3_to_ev_per_cm3(dose_j_per_m3: float) -> float:
    return float(dose_j_per_m3) / _J_PER_M3_PER_EV_PER_CM3


# ----------------------------------------------------------------------------- measured table
@dataclass(frozen=True)
class MillRateMeasurement:
    """One row of a mill-rate experiment: a section of known thickness milled through completely."""
    dose_j_per_m3: float          # prior electron irradiation energy density
    mill_time_s: float            # total ion-beam time until the section was gone
    fov_edge_m: float             # edge of the square ion scan field
    thickness_m: float            # section thickness

    @property
    def volume_rate_m3_per_s(self) -> float:
        return self.fov_edge_m ** 2 * self.thickness_m / self.mill_time_s


@dataclass(frozen=True)
class MillRateTable:
    """Measurements at fixed milling conditions (gas, cluster energy, glancing angle, ion current)."""
    rows: tuple[MillRateMeasurement, ...]
    beam_current_a: float
    gas: str
    cluster_energy_ev: float
    cluster_size_atoms: int
    glancing_angle_deg: float
    source: str

    def doses_j_per_m3(self) -> np.ndarray:
        return np.array([r.dose_j_per_m3 for r in self.rows])

    def volume_per_charge_m3_per_c(self) -> np.ndarray:
        """Volume removed per coulomb of ion current, the quantity that carries over to other currents."""
        return np.array([r.volume_rate_m3_per_s / self.beam_current_a for r in self.rows])


def _thesis_row(dose_1e27_ev_per_cm3: float, mill_time_s: float, fov_edge_um: float) -> MillRateMeasurement:
    return MillRateMeasurement(dose_j_per_m3=ev_per_cm3_to_j_per_m3(dose_1e27_ev_per_cm3 * 1e27),
                               mill_time_s=mill_time_s, fov_edge_m=fov_edge_um * 1e-6, thickness_m=200e-9)


# Schubert 2022, Table 2.1 (raw columns: mill time and scan field edge); 38 nA measured with the SEM's
# current detector, Ionoptika GCIB 10S, Corgon-18 (Ar 82 % / CO2 18 %), 10 kV, about 2000-atom clusters,
# 30 degree glancing angle, 200 nm sections on gold-coated silicon.
SCHUBERT2022_CORGON18 = MillRateTable(
    rows=(
        _thesis_row(0.0, 8640.0, 9462.0),
        _thesis_row(0.25, 10080.0, 7885.0),
        _thesis_row(0.5, 16800.0, 7885.0),
        _thesis_row(1.0, 31680.0, 9462.0),
    ),
    beam_current_a=38e-9,
    gas="Corgon-18 (Ar/CO2 82/18)",
    cluster_energy_ev=10e3,
    cluster_size_atoms=2000,
    glancing_angle_deg=30.0,
    source="Schubert 2022, dissertation LMU Munich, Table 2.1",
)


# ----------------------------------------------------------------------------- model
class MillRateModel:
    """Mill rate as a function of prior irradiation dose, ion current and scanned area.

    Interpolation: monotone cubic (PCHIP) of log(volume per charge) against dose.
    PCHIP keeps the curve monotone between measurements and never overshoots, so
    the model cannot claim that more irradiation mills faster; working in the
    logarithm keeps every interpolated rate positive and matches the roughly
    exponential fall at low doses (the first three points lie almost on a line in
    log space).

    Doses above the last measurement are refused rather than extrapolated: the
    measured curve flattens towards the highest dose, and any continuation
    (constant, exponential, linear) differs by a factor of two within another
    1e27 eV/cm^3, which would silently turn into days of milling in a plan. Pass
    ``max_extrapolation_j_per_m3`` to accept a bounded hold of the last value.
    """

    def __init__(self, table: MillRateTable = SCHUBERT2022_CORGON18, max_extrapolation_j_per_m3: float = 0.0):
        doses = table.doses_j_per_m3()
        per_charge = table.volume_per_charge_m3_per_c()
        order = np.argsort(doses)
        doses, per_charge = doses[order], per_charge[order]
        if len(doses) < 2 or np.any(np.diff(doses) <= 0):
            raise ValueError(f"mill-rate table needs at least two distinct doses, got {doses.tolist()} J/m^3")
        if np.any(per_charge <= 0):
            raise ValueError(f"mill-rate table has non-positive rates {per_charge.tolist()} m^3/C")
        if max_extrapolation_j_per_m3 < 0:
            raise ValueError(f"max_extrapolation_j_per_m3 must be >= 0, got {max_extrapolation_j_per_m3}")
        self.table = table
        self.dose_min_j_per_m3 = float(doses[0])
        self.dose_max_j_per_m3 = float(doses[-1])
        self.max_extrapolation_j_per_m3 = float(max_extrapolation_j_per_m3)
        self._log_rate = PchipInterpolator(doses, np.log(per_charge), extrapolate=False)

    def _check_dose(self, dose_j_per_m3: float) -> float:
        d = float(dose_j_per_m3)
        if not math.isfinite(d) or d < 0:
            raise LimitError("irradiation dose", d, 0.0, self.dose_max_j_per_m3, "J/m^3")
        if d < self.dose_min_j_per_m3:
            raise LimitError("irradiation dose (below the lowest measured)", d, self.dose_min_j_per_m3,
                             self.dose_max_j_per_m3, "J/m^3")
        limit = self.dose_max_j_per_m3 + self.max_extrapolation_j_per_m3
        if d > limit:
            raise LimitError(
                f"irradiation dose ({j_per_m3_to_ev_per_cm3(d):.3g} eV/cm^3; the mill-rate table ends at "
                f"{j_per_m3_to_ev_per_cm3(self.dose_max_j_per_m3):.3g} eV/cm^3 and is not extrapolated)",
                d, self.dose_min_j_per_m3, limit, "J/m^3")
        return d

    def volume_per_charge_m3_per_c(self, dose_j_per_m3: float) -> float:
        d = min(self._check_dose(dose_j_per_m3), self.dose_max_j_per_m3)
        return float(np.exp(self._log_rate(d)))

    def volume_rate_m3_per_s(self, dose_j_per_m3: float, beam_current_a: float) -> float:
        current = check_range("ion beam current", beam_current_a, 0.0, 1e-3, "A")
        if current == 0:
            raise LimitError("ion beam current", current, 1e-15, 1e-3, "A")
        return self.volume_per_charge_m3_per_c(dose_j_per_m3) * current

    def depth_rate_m_per_s(self, dose_j_per_m3: float, beam_current_a: float, area_m2: float) -> float:
        """Depth removed per second when the current is spread over ``area_m2`` (the scanned field)."""
        return self.volume_rate_m3_per_s(dose_j_per_m3, beam_current_a) / _check_area(area_m2)

    def mill_time_s(self, depth_m: float, dose_j_per_m3: float, beam_current_a: float, area_m2: float) -> float:
        """Beam-on time to remove ``depth_m`` over ``area_m2`` (excludes stage moves and azimuth delays)."""
        depth = float(depth_m)
        if not math.isfinite(depth) or depth < 0:
            raise LimitError("mill depth", depth, 0.0, math.inf, "m")
        return depth / self.depth_rate_m_per_s(dose_j_per_m3, beam_current_a, area_m2)


def _check_area(area_m2: float) -> float:
    a = float(area_m2)
    if not math.isfinite(a) or a <= 0:
        raise LimitError("milled area", a, 1e-18, math.inf, "m^2")
    return a


# ----------------------------------------------------------------------------- irradiation dose
def integrated_charge_c(times_s, currents_a) -> float:
    """Charge delivered by a sampled current (Simpson's rule); returns its magnitude.

    Magnitude because a current preamplifier on the sample reads electron current
    as negative or positive depending on how it is wired; the sign carries no
    information for the dose.
    """
    t = np.asarray(times_s, dtype=float)
    i = np.asarray(currents_a, dtype=float)
    if t.ndim != 1 or i.ndim != 1 or t.shape != i.shape:
        raise ValueError(f"times_s and currents_a must be 1-D arrays of equal length, got shapes {t.shape} "
                         f"and {i.shape}")
    if t.size < 2:
        raise ValueError(f"need at least 2 current samples to integrate, got {t.size}")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(i))):
        bad = int(np.count_nonzero(~np.isfinite(t)) + np.count_nonzero(~np.isfinite(i)))
        raise ValueError(f"{bad} current-meter samples are NaN or infinite")
    steps = np.diff(t)
    if np.any(steps <= 0):
        k = int(np.argmax(steps <= 0))
        raise ValueError(f"sample times must increase strictly; t[{k + 1}] = {t[k + 1]:g} s follows "
                         f"t[{k}] = {t[k]:g} s")
    return float(abs(simpson(i, x=t)))


def energy_density_j_per_m3(charge_c: float, accel_voltage_v: float, area_m2: float, thickness_m: float) -> float:
    """Energy deposited per volume, rho_E = U q / (A d), assuming the beam stops within the section."""
    q = float(charge_c)
    if not math.isfinite(q) or q < 0:
        raise LimitError("irradiation charge", q, 0.0, math.inf, "C")
    u = check_range("irradiation accelerating voltage", accel_voltage_v, 1.0, 1e6, "V")
    d = float(thickness_m)
    if not math.isfinite(d) or d <= 0:
        raise LimitError("section thickness", d, 1e-12, math.inf, "m")
    return u * q / (_check_area(area_m2) * d)


def irradiation_energy_density_j_per_m3(times_s, currents_a, accel_voltage_v: float, area_m2: float,
                                        thickness_m: float) -> float:
    """rho_E from a current meter's samples (times in s, currents in A) during irradiation."""
    return energy_density_j_per_m3(integrated_charge_c(times_s, currents_a), accel_voltage_v, area_m2,
                                   thickness_m)


def irradiation_time_s(dose_j_per_m3: float, current_a: float, accel_voltage_v: float, area_m2: float,
                       thickness_m: float) -> float:
    """Time for a constant current to reach ``dose_j_per_m3`` over ``area_m2`` of ``thickness_m``."""
    dose = float(dose_j_per_m3)
    if not math.isfinite(dose) or dose < 0:
        raise LimitError("irradiation dose", dose, 0.0, math.inf, "J/m^3")
    i = float(current_a)
    if not math.isfinite(i) or i <= 0:
        raise LimitError("irradiation current", i, 1e-15, math.inf, "A")
    per_second = energy_density_j_per_m3(i, accel_voltage_v, area_m2, thickness_m)
    return dose / per_second
