"""Time budget of a wafer-based GCIB-SEM volume: irradiation, milling and imaging.

The arithmetic follows the estimate in Schubert 2022 (section 2.3.2): every
sampled volume is a stack of thick sections side by side on one wafer, all
milled together, so the milling time is set by the section thickness and the
depth rate over the scanned field, while the imaging time grows with the number
of sections. Imaging is pixel time of a full tile grid per section and slice
(tiles overfill the tissue, which is why the effective rate is below 1/dwell).

The thesis' figures contain no stage-move or autofocus time; those overheads are
parameters here and default to zero so that the defaults reproduce the thesis.
Section and tile counts are plain numbers: nothing here depends on how sections
are found or tiles laid out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from hardware.errors import LimitError

from .mill_rate import MillRateModel, ev_per_cm3_to_j_per_m3, irradiation_time_s, j_per_m3_to_ev_per_cm3

DAY_S = 86400.0


@dataclass(frozen=True)
class CampaignParameters:
    n_sections: int = 500
    section_thickness_m: float = 500e-9
    tissue_width_m: float = 250e-6
    tissue_height_m: float = 250e-6
    pixel_size_m: float = 10e-9                # x and y
    slice_thickness_m: float = 20e-9           # z step, i.e. depth milled between two images
    dwell_s: float = 200e-9
    tile_px: int = 6000                        # square tiles
    tile_overlap_fraction: float = 0.0
    tile_overhead_s: float = 0.0               # stage move and settling per tile
    section_overhead_s: float = 0.0            # autofocus and approach per section and slice
    # milling
    mill_beam_current_a: float = 38e-9
    mill_field_edge_m: float = 22e-3           # square ion scan field covering all sections
    dose_j_per_m3: float = ev_per_cm3_to_j_per_m3(0.5e27)
    mill_s_per_m_override: float | None = None  # use a measured depth rate instead of the dose model
    cycles_per_slice: int = 1
    mill_cycle_overhead_s: float = 0.0         # stage to the ion gun and back, tilt, azimuth delays
    # irradiation before milling
    irradiation_voltage_v: float = 5e3
    # The thesis states neither its irradiation current nor the irradiated area;
    # 11.2 uA over the milled field is what its 4-day figure implies at 0.5e27 eV/cm^3.
    irradiation_current_a: float = 11.2e-6
    irradiated_area_m2: float | None = None    # None: the milled field

    def validate(self) -> None:
        def number(value) -> float:
            try:
                return float(value)
            except (TypeError, ValueError):
                return math.nan

        def positive(name: str, value: float, unit: str) -> None:
            v = number(value)
            if not (math.isfinite(v) and v > 0):
                raise LimitError(name, v, 0.0, math.inf, unit)

        def non_negative(name: str, value: float, unit: str) -> None:
            v = number(value)
            if not (math.isfinite(v) and v >= 0):
                raise LimitError(name, v, 0.0, math.inf, unit)

        for name, value, unit in (("number of sections", self.n_sections, ""),
                                  ("section thickness", self.section_thickness_m, "m"),
                                  ("tissue width", self.tissue_width_m, "m"),
                                  ("tissue height", self.tissue_height_m, "m"),
                                  ("pixel size", self.pixel_size_m, "m"),
                                  ("slice thickness", self.slice_thickness_m, "m"),
                                  ("dwell time", self.dwell_s, "s"),
                                  ("tile size", self.tile_px, "px"),
                                  ("mill beam current", self.mill_beam_current_a, "A"),
                                  ("mill field edge", self.mill_field_edge_m, "m"),
                                  ("cycles per slice", self.cycles_per_slice, ""),
                                  ("irradiation voltage", self.irradiation_voltage_v, "V"),
                                  ("irradiation current", self.irradiation_current_a, "A")):
            positive(name, value, unit)
        for name, value, unit in (("tile overhead", self.tile_overhead_s, "s"),
                                  ("section overhead", self.section_overhead_s, "s"),
                                  ("mill cycle overhead", self.mill_cycle_overhead_s, "s"),
                                  ("irradiation dose", self.dose_j_per_m3, "J/m^3")):
            non_negative(name, value, unit)
        for name, value in (("number of sections", self.n_sections), ("tile size", self.tile_px),
                            ("cycles per slice", self.cycles_per_slice)):
            if int(value) != value:
                raise ValueError(f"{name} must be a whole number, got {value}")
        if not 0 <= self.tile_overlap_fraction < 0.5:
            raise LimitError("tile overlap fraction", self.tile_overlap_fraction, 0.0, 0.5)
        if self.mill_s_per_m_override is not None:
            positive("mill time per depth", self.mill_s_per_m_override, "s/m")
        if self.irradiated_area_m2 is not None:
            positive("irradiated area", self.irradiated_area_m2, "m^2")
        if self.slice_thickness_m > self.section_thickness_m:
            raise LimitError("slice thickness", self.slice_thickness_m, 0.0, self.section_thickness_m, "m")


@dataclass(frozen=True)
class CampaignEstimate:
    parameters: CampaignParameters
    slices_per_section: int
    section_slices: int
    voxels: float
    volume_m3: float
    tiles_per_section: int
    pixels_per_section_slice: float
    imaging_pixel_time_s: float
    imaging_overhead_s: float
    imaging_s: float
    effective_rate_voxels_per_s: float
    mill_depth_rate_m_per_s: float
    mill_cycles: int
    mill_beam_time_s: float
    mill_overhead_s: float
    milling_s: float
    irradiation_s: float
    tissue_area_fraction: float               # packing: tissue area / milled field area per section

    @property
    def acquisition_s(self) -> float:
        """Milling plus imaging: the time on the microscope (irradiation happens beforehand, elsewhere)."""
        return self.imaging_s + self.milling_s

    @property
    def total_with_irradiation_s(self) -> float:
        return self.acquisition_s + self.irradiation_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parameters"]["dose_ev_per_cm3"] = j_per_m3_to_ev_per_cm3(self.parameters.dose_j_per_m3)
        d["mill_s_per_nm"] = 1e-9 / self.mill_depth_rate_m_per_s
        d["acquisition_s"] = self.acquisition_s
        d["total_with_irradiation_s"] = self.total_with_irradiation_s
        d["days"] = {"imaging": self.imaging_s / DAY_S, "milling": self.milling_s / DAY_S,
                     "acquisition": self.acquisition_s / DAY_S, "irradiation": self.irradiation_s / DAY_S,
                     "total_with_irradiation": self.total_with_irradiation_s / DAY_S}
        return d

    def to_text(self) -> str:
        p = self.parameters
        lines = [
            f"volume            {p.n_sections} sections x {p.section_thickness_m * 1e9:g} nm, "
            f"{p.tissue_width_m * 1e3:g} x {p.tissue_height_m * 1e3:g} mm tissue = "
            f"{self.volume_m3 * 1e9:.4g} mm^3, {self.voxels / 1e12:.3g} teravoxels "
            f"({p.pixel_size_m * 1e9:g} x {p.pixel_size_m * 1e9:g} x {p.slice_thickness_m * 1e9:g} nm)",
            f"images            {self.slices_per_section} slices per section, {self.tiles_per_section} tiles of "
            f"{p.tile_px} px per section and slice, {self.section_slices} section-slices",
            f"imaging           {_days(self.imaging_s)}  (pixel time {_days(self.imaging_pixel_time_s)}, "
            f"overheads {_days(self.imaging_overhead_s)}; effective {self.effective_rate_voxels_per_s / 1e6:.3g} "
            f"MHz at {1e-6 / p.dwell_s:.3g} MHz scan)",
            f"milling           {_days(self.milling_s)}  ({self.mill_cycles} cycles, "
            f"{1e-9 / self.mill_depth_rate_m_per_s:.0f} s/nm over a {p.mill_field_edge_m * 1e3:g} mm field "
            f"at {p.mill_beam_current_a * 1e9:g} nA, dose {j_per_m3_to_ev_per_cm3(p.dose_j_per_m3):.3g} eV/cm^3; "
            f"overheads {_days(self.mill_overhead_s)})",
            f"on the microscope {_days(self.acquisition_s)}",
            f"irradiation       {_days(self.irradiation_s)}  ({p.irradiation_current_a * 1e6:g} uA at "
            f"{p.irradiation_voltage_v / 1e3:g} kV, beforehand)",
            f"total             {_days(self.total_with_irradiation_s)}",
            f"packing           tissue covers {100 * self.tissue_area_fraction:.1f} % of the milled field",
        ]
        return "\n".join(lines)


def _days(seconds: float) -> str:
    return f"{seconds / DAY_S:6.2f} d"


def estimate_campaign(params: CampaignParameters | None = None, model: MillRateModel | None = None
                      ) -> CampaignEstimate:
    p = params or CampaignParameters()
    p.validate()
    model = model or MillRateModel()

    slices = p.section_thickness_m / p.slice_thickness_m
    slices_per_section = int(round(slices))
    if abs(slices - slices_per_section) > 1e-6 * slices:
        raise ValueError(f"section thickness {p.section_thickness_m:g} m is not a whole number of "
                         f"{p.slice_thickness_m:g} m slices ({slices:.4g})")
    planes = p.n_sections * slices_per_section

    step_m = p.tile_px * p.pixel_size_m * (1.0 - p.tile_overlap_fraction)
    # Tiles beyond the first advance by the step; the last tile may hang over the tissue.
    def tiles_along(extent_m: float) -> int:
        tile_m = p.tile_px * p.pixel_size_m
        return 1 if extent_m <= tile_m else 1 + math.ceil((extent_m - tile_m) / step_m - 1e-9)

    tiles = tiles_along(p.tissue_width_m) * tiles_along(p.tissue_height_m)
    pixels = tiles * float(p.tile_px) ** 2
    pixel_time = planes * pixels * p.dwell_s
    imaging_overhead = planes * (tiles * p.tile_overhead_s + p.section_overhead_s)
    imaging = pixel_time + imaging_overhead

    voxels = (p.tissue_width_m / p.pixel_size_m) * (p.tissue_height_m / p.pixel_size_m) * planes
    volume = p.tissue_width_m * p.tissue_height_m * p.section_thickness_m * p.n_sections

    field_area = p.mill_field_edge_m ** 2
    if p.mill_s_per_m_override is not None:
        depth_rate = 1.0 / p.mill_s_per_m_override
    else:
        depth_rate = model.depth_rate_m_per_s(p.dose_j_per_m3, p.mill_beam_current_a, field_area)
    cycles = slices_per_section * p.cycles_per_slice
    mill_beam = p.section_thickness_m / depth_rate
    mill_overhead = cycles * p.mill_cycle_overhead_s

    irradiated = p.irradiated_area_m2 if p.irradiated_area_m2 is not None else field_area
    irradiation = irradiation_time_s(p.dose_j_per_m3, p.irradiation_current_a, p.irradiation_voltage_v,
                                     irradiated, p.section_thickness_m)
    return CampaignEstimate(
        parameters=p, slices_per_section=slices_per_section, section_slices=planes, voxels=voxels,
        volume_m3=volume, tiles_per_section=tiles, pixels_per_section_slice=pixels,
        imaging_pixel_time_s=pixel_time, imaging_overhead_s=imaging_overhead, imaging_s=imaging,
        effective_rate_voxels_per_s=voxels / imaging, mill_depth_rate_m_per_s=depth_rate, mill_cycles=cycles,
        mill_beam_time_s=mill_beam, mill_overhead_s=mill_overhead, milling_s=mill_beam + mill_overhead,
        irradiation_s=irradiation,
        tissue_area_fraction=p.n_sections * p.tissue_width_m * p.tissue_height_m / field_area,
    )
