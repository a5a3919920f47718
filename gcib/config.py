"""The ion gun and milling plan of a microscope, built from the ``ion_gun:`` section of its profile.

One YAML profile per microscope holds everything a milling cycle needs, so a
facility runs one cycle with::

    gcibsem mill-cycle --profile setup_a --log mill.jsonl --cycle-id slice-0001 [--json]

The ``ion_gun:`` section (``hardware.config.IonGunConfig``) is what the control
software knows, measured on the instrument: ``waveform_url`` of the 33522A
(``socket://HOST:5025``), the measured ``current_na``, the scan calibration as a
straight line per axis (field edge = ``calibration_m_per_vpp`` * Vpp +
``calibration_offset_m``, fitted from washer scans with
``gcib.ion_gun.ScanCalibration.fit``), the sawtooth frequencies ``x_hz``/``y_hz``,
the ``blanker`` (``outputs``, ``rts`` with ``blanker_port``, or ``none``), where
and how to mill (``mill_position_mm``, ``mill_z_mm``, ``mill_rotation_deg``,
``travel_z_mm``, ``glancing_angle_deg``, ``gun_elevation_deg``, ``field_mm``) and
the azimuth schedule (``mill_time_s``, ``azimuths_deg``, ``azimuth_dwell_s``,
``continuous`` with ``continuous_turn_s`` and ``continuous_step_deg``). On a
simulated microscope it is deliberately separate from ``ion_beam:``, the
simulator's truth: a wrong calibration mills a wrong depth there, as on a real gun.

Everything is checked here before the instrument or the stage is touched: a
field the calibration cannot reach within the generator's 20 Vpp is a
``ConfigError`` naming the key, the amplitude it needs and the limit.
"""
from __future__ import annotations

from typing import Any, Callable

from hardware.clock import Clock
from hardware.config import IonGunConfig, MicroscopeConfig
from hardware.errors import ConfigError
from hardware.stage import StagePosition

from .ion_gun import (MAX_SCAN_VPP, AxisCalibration, BeamBlanker, IonGun, MillHook, ScanCalibration, ScanDriver,
                      ScanOutputsBlanker, SerialRTSBlanker, SimulatedBlanker)
from .milling import AzimuthSchedule, MillingPlan

__all__ = ["ion_gun_section", "calibration_from_config", "plan_from_config", "blanker_from_config",
           "gun_from_config", "NoBlanker"]


class NoBlanker(SimulatedBlanker):
    """``blanker: none``: no blanking line under our control; the beam is switched at the gun itself.

    Only the state is kept, so the charge accounting still counts the exposure
    windows; the operator is responsible for the beam between them.
    """


def ion_gun_section(cfg: IonGunConfig | MicroscopeConfig) -> IonGunConfig:
    return cfg.ion_gun if isinstance(cfg, MicroscopeConfig) else cfg


def calibration_from_config(cfg: IonGunConfig | MicroscopeConfig) -> ScanCalibration:
    g = ion_gun_section(cfg)
    (kx, ky), (ox, oy) = g.calibration_m_per_vpp, g.calibration_offset_m
    return ScanCalibration(AxisCalibration(kx, ox, max_vpp=MAX_SCAN_VPP),
                           AxisCalibration(ky, oy, max_vpp=MAX_SCAN_VPP))


def _check_field_reachable(g: IonGunConfig, cal: ScanCalibration) -> None:
    # said in the profile's terms (key, mm, Vpp) rather than as the gun's LimitError in metres,
    # because the operator fixes it in the YAML
    for i, (axis, name, ac) in enumerate((("X", "width", cal.x), ("Y", "height", cal.y))):
        field_m = g.field_mm[i] * 1e-3
        vpp = (field_m - ac.offset_m) / ac.slope_m_per_vpp
        largest_mm = ac.field_m(ac.max_vpp) * 1e3
        if vpp > ac.max_vpp:
            raise ConfigError(
                f"ion_gun.field_mm: {name} {g.field_mm[i]:g} mm needs {vpp:.3g} Vpp on the {axis} scan, above the "
                f"{ac.max_vpp:g} Vpp limit of the scan generator (largest {name} with ion_gun.calibration_m_per_vpp: "
                f"{largest_mm:.4g} mm)")
        if vpp <= 0:
            raise ConfigError(
                f"ion_gun.field_mm: {name} {g.field_mm[i]:g} mm is at or below the field at 0 Vpp "
                f"({ac.offset_m * 1e3:g} mm, ion_gun.calibration_offset_m); the {axis} scan cannot make it")


def plan_from_config(cfg: IonGunConfig | MicroscopeConfig) -> MillingPlan:
    """The milling plan of the profile, with the field checked against the scan calibration and 20 Vpp."""
    g = ion_gun_section(cfg)
    _check_field_reachable(g, calibration_from_config(g))
    schedule = AzimuthSchedule(mill_time_s=g.mill_time_s, azimuths_deg=tuple(g.azimuths_deg),
                               dwell_s=g.azimuth_dwell_s, continuous=g.continuous, turn_s=g.continuous_turn_s,
                               step_deg=g.continuous_step_deg)
    schedule.validate()
    mx, my = g.mill_position_mm
    return MillingPlan(
        mill_position=StagePosition(x_m=mx * 1e-3, y_m=my * 1e-3, z_m=g.mill_z_mm * 1e-3,
                                    rotation_deg=g.mill_rotation_deg),
        travel_z_m=g.travel_z_mm * 1e-3, glancing_angle_deg=g.glancing_angle_deg,
        gun_elevation_deg=g.gun_elevation_deg, field_m=(g.field_mm[0] * 1e-3, g.field_mm[1] * 1e-3),
        schedule=schedule)


def blanker_from_config(cfg: IonGunConfig | MicroscopeConfig, driver: ScanDriver,
                        open_port: Callable[[str], Any] | None = None) -> BeamBlanker:
    """The profile's blanker; ``rts`` opens ``blanker_port`` (``open_port`` defaults to pyserial's URL opener)."""
    g = ion_gun_section(cfg)
    if g.blanker == "outputs":
        return ScanOutputsBlanker(driver)
    if g.blanker == "rts":
        if not g.blanker_port:
            raise ConfigError("ion_gun.blanker is 'rts' but ion_gun.blanker_port is empty")
        if open_port is None:
            import serial

            def open_port(url: str) -> Any:
                return serial.serial_for_url(url)
        return SerialRTSBlanker(open_port(g.blanker_port), blank_level=g.blanker_rts_blanks_high)
    if g.blanker == "none":
        return NoBlanker()
    raise ConfigError(f"ion_gun.blanker must be one of outputs, rts, none, got {g.blanker!r}")


def gun_from_config(cfg: IonGunConfig | MicroscopeConfig, driver: ScanDriver, clock: Clock,
                    on_exposure: MillHook | None = None, blanker: BeamBlanker | None = None) -> IonGun:
    """An ``IonGun`` on ``driver`` with the profile's calibration, current, frequencies and blanker."""
    g = ion_gun_section(cfg)
    return IonGun(driver, blanker or blanker_from_config(g, driver), calibration_from_config(g),
                  g.current_na * 1e-9, clock, x_hz=g.x_hz, y_hz=g.y_hz, on_exposure=on_exposure)
