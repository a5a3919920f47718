"""Microscope profiles: one YAML file per microscope, validated into typed dataclasses.

A profile is named (``setup_a``, a file shipped in ``hardware/profiles``) or given
as a path. Dotted ``KEY=VALUE`` overrides (``--set optics.aperture_angle_mrad=3``)
are applied before validation, so an override goes through exactly the same checks
as the file. Unknown keys are errors, never silently ignored: a typo in a limit
must not leave the default limit in force unnoticed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"


# ----------------------------------------------------------------------------- schema
@dataclass
class OpticsConfig:
    aperture_angle_mrad: float = 4.0          # beam half-angle alpha at the specimen
    in_focus_probe_nm: float = 3.0            # FWHM of the Gaussian in-focus probe (source, diffraction, Cs, Cc)
    wd_nominal_mm: float = 4.5                # wd that focuses the nominal wafer plane at stage z = 0
    hysteresis_um: float = 0.15               # half-width of the objective lens' play (backlash) in focus
    image_rotation_deg_per_mm: float = 1.5    # magnetic lens: image rotation per mm of wd change
    image_scale_per_mm: float = 0.002         # relative magnification change per mm of wd change
    # aperture filling (hardware/sim/optics.py ApertureProfile); 0, 0: uniform, as DESIGN.md's probe
    aperture_taper: float = 0.0               # current density ~ exp(-taper (theta/alpha)^2); < 0: rim-heavy
    halo_fraction: float = 0.0                # share of the current scattered into a wide Gaussian halo
    halo_width: float = 1.5                   # the halo's angular s.d. in units of the aperture angle


@dataclass
class BeamConfig:
    energy_kv: float = 1.5
    current_na: float = 1.5


@dataclass
class StigmatorConfig:
    rotation_deg: float = 0.0                 # rotation of stigmator axes against the image axes
    scale_um_per_unit: float = 2.0            # astigmatism (um) per stigmator unit
    range: float = 10.0                       # stigmator settings are limited to +-range units
    true_center: list = field(default_factory=lambda: [0.0, 0.0])  # setting that cancels the column's astigmatism
    center_spread: float = 0.3                # per-position s.d. of the column astigmatism (units), charging etc.


@dataclass
class DetectorConfig:
    efficiency: float = 0.12                  # detected signal electrons per incident electron at yield 1
    yield_min: float = 0.15                   # relative yield of the darkest specimen grey value
    yield_max: float = 1.0                    # relative yield of the brightest
    wafer_yield: float = 0.08                 # bare silicon (milled through): dark, featureless
    gain: float = 0.7                         # grey level at yield 1, as a fraction of full scale
    offset: float = 0.1                       # black level, fraction of full scale
    read_noise: float = 0.002                 # amplifier noise, fraction of full scale
    bit_depth: int = 16                       # 8 or 16
    line_jitter_px: float = 0.15              # s.d. of the per-line horizontal scan jitter
    brightness_drift: float = 0.03            # relative amplitude of slow brightness drift (charging)
    brightness_drift_period_s: float = 1800.0


@dataclass
class ScanConfig:
    rotation_deg: float = 0.0                 # scan rotation of the microscope's default frame
    line_overhead_s: float = 1.0e-4           # fly-back per line
    frame_overhead_s: float = 0.02            # per frame (settling, readout)


@dataclass
class DriftConfig:
    rate_nm_per_s: float = 0.1                # steady specimen drift
    random_walk_nm_per_sqrt_s: float = 0.2    # diffusive part of the drift


@dataclass
class StageConfig:
    x_mm: list = field(default_factory=lambda: [-55.0, 55.0])
    y_mm: list = field(default_factory=lambda: [-55.0, 55.0])
    z_mm: list = field(default_factory=lambda: [-5.0, 25.0])
    tilt_deg: list = field(default_factory=lambda: [-5.0, 70.0])
    rotation_deg: list = field(default_factory=lambda: [-360.0, 360.0])
    speed_mm_per_s: float = 2.0
    z_speed_mm_per_s: float = 0.5
    tilt_speed_deg_per_s: float = 5.0
    rotation_speed_deg_per_s: float = 10.0
    settle_s: float = 1.0
    repeatability_um: float = 1.0             # s.d. of the xy position error after a move
    backlash_um: float = 2.0                  # lost motion on reversal (x, y)
    z_error_um: float = 2.0                   # s.d. of the z error after a long move (focus shift)
    z_error_length_mm: float = 10.0           # moves of this length or longer get the full z error


@dataclass
class WaferConfig:
    diameter_mm: float = 100.0
    tilt_um_per_mm: list = field(default_factory=lambda: [0.4, -0.25])  # surface slope along x, y
    bow_um: float = 6.0                       # centre above the rim
    section_rows: int = 10
    section_cols: int = 11
    section_pitch_mm: list = field(default_factory=lambda: [7.0, 6.0])
    section_size_mm: list = field(default_factory=lambda: [2.0, 1.5])
    section_thickness_nm: float = 500.0
    section_thickness_sd_nm: float = 20.0
    section_height_sd_um: float = 0.3         # per-section surface height scatter (mounting)
    position_jitter_mm: float = 0.5
    orientation_sd_deg: float = 8.0
    irradiation_ev_per_cm3: float = 0.5e27    # electron pre-irradiation of every section (slows milling)
    mill_inhomogeneity: float = 0.08          # s.d. of the relative local mill rate across a section


@dataclass
class IonBeamConfig:
    """The simulated ion gun's truth: what calibration and the mill-rate model have to find."""
    current_na: float = 38.0
    field_m_per_vpp: list = field(default_factory=lambda: [1.1e-3, 1.05e-3])  # field edge per Vpp (x, y)
    mill_position_mm: list = field(default_factory=lambda: [40.0, 0.0])       # stage xy that puts wafer (0, 0) on the ion axis
    rate_scale: float = 1.0                   # multiplies the Table 2.1 rates (gun-to-gun differences)


@dataclass
class IonGunConfig:
    """What the control software knows about the ion gun (measured, not the simulator's ``ion_beam`` truth).

    The scan calibration is one straight line per axis, field edge = slope * Vpp +
    offset, as fitted from washer scans (``gcib.ion_gun.ScanCalibration.fit``).
    ``blanker``: ``outputs`` switches the scan outputs off (only where the parked
    beam falls on a dump), ``rts`` drives a TTL blanker from ``blanker_port``'s RTS
    line, ``none`` means the beam is switched at the gun itself.
    """
    waveform_url: str = ""                    # pyserial URL of the scan generator; empty: none configured
    current_na: float = 38.0                  # measured beam current (Faraday cup)
    calibration_m_per_vpp: list = field(default_factory=lambda: [1.1e-3, 1.05e-3])  # field edge per Vpp (x, y)
    calibration_offset_m: list = field(default_factory=lambda: [0.0, 0.0])          # field edge at 0 Vpp (x, y)
    x_hz: float = 100.0                       # fast sawtooth
    y_hz: float = 1.0                         # slow sawtooth
    blanker: str = "outputs"
    blanker_port: str = ""                    # serial port (pyserial URL) whose RTS line blanks, for blanker: rts
    blanker_rts_blanks_high: bool = True      # RTS level that blanks the beam
    # stage x, y that put the wafer centre under the ion field
    mill_position_mm: list = field(default_factory=lambda: [40.0, 0.0])
    mill_z_mm: float = 0.0
    mill_rotation_deg: float = 0.0            # stage rotation of the first azimuth
    travel_z_mm: float = -2.0                 # z for x/y travel: at or below every working z
    glancing_angle_deg: float = 30.0
    gun_elevation_deg: float = 0.0            # beam below horizontal; stage tilt = glancing - elevation
    field_mm: list = field(default_factory=lambda: [20.0, 20.0])   # scanned field (w, h)
    mill_time_s: float = 360.0                # beam time per cycle
    azimuths_deg: list = field(default_factory=lambda: [0.0, 120.0, 240.0])
    azimuth_dwell_s: float = 10.0
    continuous: bool = False                  # step the rotation in small increments instead of the azimuths
    continuous_turn_s: float = 360.0          # beam time per full turn, continuous rotation
    continuous_step_deg: float = 2.0


@dataclass
class LimitsConfig:
    wd_mm: list = field(default_factory=lambda: [1.0, 12.0])
    pixel_size_nm: list = field(default_factory=lambda: [0.5, 2000.0])
    dwell_ns: list = field(default_factory=lambda: [25.0, 1.0e6])
    frame_px: list = field(default_factory=lambda: [16, 8192])
    wd_step_um: float = 500.0                 # largest single wd change accepted (protects against wild jumps)


@dataclass
class CalibrationConfig:
    """What this installation believes about its stigmators (used by DeepFocus to convert um to units).

    For a simulated microscope this is deliberately separate from ``stigmator`` (the
    truth): recalibration must find the truth, not read it.
    """
    stig_rotation_deg: float = 0.0
    stig_scale_um_per_unit: float = 2.0
    stig_matrix: Any = None                   # optional 2x2 matrix, units per um, overrides rotation/scale
    aperture_angle_mrad: float = 4.0          # beam half-angle as the facility knows it (aperture radius / wd)


@dataclass
class AutofocusConfig:
    """This microscope's focus-loop policy (``deepfocus.autofocus.AutofocusSettings.from_config`` reads it).

    Per microscope because a stigmator unit is a different astigmatism on each. Each step limit sits above the
    largest error the loop must recover from in one step (30 um, 6 units): a limit equal to it would clip every
    overshoot from there onto the exact answer.
    """
    max_iterations: int = 5
    tol_wd_um: float = 0.6                    # converged once the predicted correction is within these
    tol_stig: float = 0.15
    max_step_wd_um: float = 40.0              # each correction is clipped to these
    max_step_stig: float = 8.0
    max_total_wd_um: float = 120.0            # never wander further than this from the start
    max_uncertainty_wd_um: float = 4.0        # refuse a correction less certain than this
    max_uncertainty_stig: float = 2.0
    # a pair refused because its patches disagree on wd (far beyond the estimator's range) is taken again at this
    # many times the perturbation, and its wd answer stepped on; 0: never
    far_perturbation_factor: float = 3.0
    # half-width of the objective lens' play as `deepfocus calibrate` measures it; each wd step then ends coming
    # down, offset by it, so the lens rests where the answer put it. 0: not measured, not compensated
    lens_play_um: float = 0.0
    # the focus pair at wd -/+ this; 0: the one the estimator wants on this beam and pixel size (DeepFocus: 5 um
    # at 4 mrad and 10 nm pixels, further apart on narrower beams or coarser pixels)
    perturbation_um: float = 0.0


# larger than any objective lens' play: beyond it the figure is a mistake, not play
MAX_LENS_PLAY_UM = 5.0


@dataclass
class MicroscopeConfig:
    name: str = "unnamed"
    description: str = ""
    backend: str = "sim"
    seed: int = 0
    clock: str = "virtual"
    specimen: Any = None                      # TIFF/PNG stack, or "gold-on-carbon"; None: synthetic neuropil
    specimen_pixel_size_nm: Any = None        # needed when the file does not record it
    optics: OpticsConfig = field(default_factory=OpticsConfig)
    beam: BeamConfig = field(default_factory=BeamConfig)
    stigmator: StigmatorConfig = field(default_factory=StigmatorConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    wafer: WaferConfig = field(default_factory=WaferConfig)
    ion_beam: IonBeamConfig = field(default_factory=IonBeamConfig)
    ion_gun: IonGunConfig = field(default_factory=IonGunConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    autofocus: AutofocusConfig = field(default_factory=AutofocusConfig)
    source: str = ""                          # where the profile was read from (filled in by the loader)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading
_EXPONENT_LITERAL = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is Any:
        return value
    if typ is bool:
        # YAML's own true/false only: 0/1 or "yes" in a safety-related switch is more likely a slip
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str) and _EXPONENT_LITERAL.match(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-5 or 1.0e6 as text: it wants a dot and a signed exponent (1.0e+6); meant
            # as a number all the same
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if typ is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{key}: expected a list of finite numbers, got {value!r}")
        return [float(v) for v in value]
    raise ConfigError(f"{key}: unsupported type {typ}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'profile'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"unknown profile key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(prefix + str(u)) for u in unknown)}{where}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(typ):
            kwargs[name] = from_dict(typ, value, key + ".")
        else:
            kwargs[name] = _coerce(value, typ, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optics.aperture_angle_mrad=3.5'`` -> (['optics', 'aperture_angle_mrad'], 3.5)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form KEY=VALUE (e.g. beam.current_na=1.2)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def resolve_profile_path(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    p = Path(text)
    if p.suffix in (".yaml", ".yml") or p.parent != Path(".") or p.exists():
        if not p.is_file():
            raise ConfigError(f"profile file {text!r} does not exist")
        return p
    candidate = PROFILE_DIR / f"{text}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown profile {text!r}; shipped profiles: {', '.join(available_profiles())}; "
                          "or give the path of a YAML file")
    return candidate


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a second
    ``autofocus:`` section pasted below the first would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1});"
                    " merge the two into one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_profile(name_or_path: str | Path = "setup_a", overrides: Iterable[str] = ()) -> MicroscopeConfig:
    """Read, override and validate a microscope profile."""
    path = resolve_profile_path(name_or_path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read profile {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {path} is not valid YAML: {exc}") from None
    if data is None or data == {}:
        # a file emptied or cut short would otherwise pass for a complete microscope made of defaults
        raise ConfigError(f"profile {path} is empty: a profile names at least its microscope's backend")
    if not isinstance(data, dict):
        raise ConfigError(f"profile {path} must be a mapping of keys, not {type(data).__name__}")
    data = apply_overrides(data, overrides)
    cfg = from_dict(MicroscopeConfig, data)
    cfg.source = str(path)
    validate(cfg)
    return cfg


def _check_pair(key: str, pair: list, lo_allowed: float = -math.inf) -> None:
    if len(pair) != 2 or not pair[0] < pair[1] or pair[0] < lo_allowed:
        raise ConfigError(f"{key} must be [low, high] with low < high (and low >= {lo_allowed:g}), got {pair}")


def validate(cfg: MicroscopeConfig) -> None:
    """Physical sanity checks that a type check cannot make."""
    positive = {
        "optics.aperture_angle_mrad": cfg.optics.aperture_angle_mrad,
        "optics.in_focus_probe_nm": cfg.optics.in_focus_probe_nm,
        "optics.wd_nominal_mm": cfg.optics.wd_nominal_mm,
        "beam.current_na": cfg.beam.current_na,
        "beam.energy_kv": cfg.beam.energy_kv,
        "stigmator.scale_um_per_unit": cfg.stigmator.scale_um_per_unit,
        "stigmator.range": cfg.stigmator.range,
        "detector.efficiency": cfg.detector.efficiency,
        "detector.gain": cfg.detector.gain,
        "stage.speed_mm_per_s": cfg.stage.speed_mm_per_s,
        "stage.z_speed_mm_per_s": cfg.stage.z_speed_mm_per_s,
        "stage.tilt_speed_deg_per_s": cfg.stage.tilt_speed_deg_per_s,
        "stage.rotation_speed_deg_per_s": cfg.stage.rotation_speed_deg_per_s,
        "limits.wd_step_um": cfg.limits.wd_step_um,
        "ion_beam.current_na": cfg.ion_beam.current_na,
        "ion_beam.rate_scale": cfg.ion_beam.rate_scale,
        "calibration.stig_scale_um_per_unit": cfg.calibration.stig_scale_um_per_unit,
        "calibration.aperture_angle_mrad": cfg.calibration.aperture_angle_mrad,
    }
    for key, v in positive.items():
        if not v > 0:
            raise ConfigError(f"{key} must be positive, got {v:g}")
    if not 0 < cfg.detector.efficiency <= 1:
        raise ConfigError(f"detector.efficiency must be in (0, 1], got {cfg.detector.efficiency:g}")
    if cfg.detector.bit_depth not in (8, 16):
        raise ConfigError(f"detector.bit_depth must be 8 or 16, got {cfg.detector.bit_depth}")
    nonneg = {
        "optics.hysteresis_um": cfg.optics.hysteresis_um,
        "stigmator.center_spread": cfg.stigmator.center_spread,
        "detector.read_noise": cfg.detector.read_noise,
        "detector.line_jitter_px": cfg.detector.line_jitter_px,
        "stage.settle_s": cfg.stage.settle_s,
        "stage.repeatability_um": cfg.stage.repeatability_um,
        "stage.backlash_um": cfg.stage.backlash_um,
        "stage.z_error_um": cfg.stage.z_error_um,
        "scan.line_overhead_s": cfg.scan.line_overhead_s,
        "scan.frame_overhead_s": cfg.scan.frame_overhead_s,
    }
    for key, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"{key} must not be negative, got {v:g}")
    if not -5.0 <= cfg.optics.aperture_taper <= 5.0:
        raise ConfigError(f"optics.aperture_taper must be in [-5, 5] (exp(-taper rho^2) across the aperture), "
                          f"got {cfg.optics.aperture_taper:g}")
    if not 0 <= cfg.optics.halo_fraction < 1:
        raise ConfigError(f"optics.halo_fraction must be in [0, 1), got {cfg.optics.halo_fraction:g}")
    if not 1 <= cfg.optics.halo_width <= 5:
        raise ConfigError(f"optics.halo_width must be in [1, 5] aperture angles, got {cfg.optics.halo_width:g}")
    if not 0 <= cfg.detector.yield_min < cfg.detector.yield_max:
        raise ConfigError("detector.yield_min must be >= 0 and below detector.yield_max")
    for key in ("x_mm", "y_mm", "z_mm", "tilt_deg", "rotation_deg"):
        _check_pair(f"stage.{key}", getattr(cfg.stage, key))
    _check_pair("limits.wd_mm", cfg.limits.wd_mm, 0.0)
    _check_pair("limits.pixel_size_nm", cfg.limits.pixel_size_nm, 0.0)
    _check_pair("limits.dwell_ns", cfg.limits.dwell_ns, 0.0)
    _check_pair("limits.frame_px", cfg.limits.frame_px, 1.0)
    if len(cfg.stigmator.true_center) != 2:
        raise ConfigError(f"stigmator.true_center must be [x, y], got {cfg.stigmator.true_center}")
    if len(cfg.ion_beam.field_m_per_vpp) != 2 or min(cfg.ion_beam.field_m_per_vpp) <= 0:
        raise ConfigError(f"ion_beam.field_m_per_vpp must be two positive numbers, got {cfg.ion_beam.field_m_per_vpp}")
    if len(cfg.ion_beam.mill_position_mm) != 2:
        raise ConfigError(f"ion_beam.mill_position_mm must be [x, y], got {cfg.ion_beam.mill_position_mm}")
    if cfg.wafer.irradiation_ev_per_cm3 < 0 or cfg.wafer.mill_inhomogeneity < 0:
        raise ConfigError("wafer.irradiation_ev_per_cm3 and wafer.mill_inhomogeneity must not be negative")
    for key in ("tilt_um_per_mm", "section_pitch_mm", "section_size_mm"):
        if len(getattr(cfg.wafer, key)) != 2:
            raise ConfigError(f"wafer.{key} must have two entries, got {getattr(cfg.wafer, key)}")
    _validate_ion_gun(cfg.ion_gun)
    _validate_autofocus(cfg)
    if cfg.clock not in ("virtual", "real"):
        raise ConfigError(f"clock must be 'virtual' or 'real', got {cfg.clock!r}")
    m = cfg.calibration.stig_matrix
    if m is not None:
        ok = (isinstance(m, list) and len(m) == 2 and all(isinstance(r, list) and len(r) == 2 for r in m)
              and all(isinstance(v, (int, float)) and math.isfinite(v) for r in m for v in r))
        if not ok:
            raise ConfigError(f"calibration.stig_matrix must be a 2x2 list of numbers, got {m!r}")


def _validate_autofocus(cfg: MicroscopeConfig) -> None:
    a = cfg.autofocus
    if a.max_iterations < 1:
        raise ConfigError(f"autofocus.max_iterations must be at least 1, got {a.max_iterations}")
    for key in ("tol_wd_um", "tol_stig", "max_step_wd_um", "max_step_stig", "max_total_wd_um",
                "max_uncertainty_wd_um", "max_uncertainty_stig"):
        if not getattr(a, key) > 0:
            raise ConfigError(f"autofocus.{key} must be positive, got {getattr(a, key):g}")
    f = a.far_perturbation_factor
    if not (f == 0 or 1.5 <= f <= 10):
        raise ConfigError(f"autofocus.far_perturbation_factor must be 0 (off) or between 1.5 and 10, got {f:g}")
    if not 0 <= a.lens_play_um <= MAX_LENS_PLAY_UM:
        raise ConfigError(f"autofocus.lens_play_um must be between 0 (not compensated) and {MAX_LENS_PLAY_UM:g} um "
                          f"(the half-width deepfocus calibrate measures), got {a.lens_play_um:g}")
    if not (a.perturbation_um == 0 or 0.5 <= a.perturbation_um and 2 * a.perturbation_um <= cfg.limits.wd_step_um):
        raise ConfigError(f"autofocus.perturbation_um must be 0 (the estimator's choice) or at least 0.5 um with the "
                          f"pair's 2 x {a.perturbation_um:g} um within limits.wd_step_um = {cfg.limits.wd_step_um:g}")
    # steps the hardware would refuse (or that cross the whole stigmator range) are no limit at all
    if a.max_step_wd_um > cfg.limits.wd_step_um:
        raise ConfigError(f"autofocus.max_step_wd_um = {a.max_step_wd_um:g} exceeds limits.wd_step_um = "
                          f"{cfg.limits.wd_step_um:g}, the largest wd change the microscope accepts")
    if a.max_step_stig > 2 * cfg.stigmator.range:
        raise ConfigError(f"autofocus.max_step_stig = {a.max_step_stig:g} exceeds the stigmators' whole range "
                          f"(2 x stigmator.range = {2 * cfg.stigmator.range:g} units)")
    if a.max_total_wd_um < a.max_step_wd_um:
        raise ConfigError(f"autofocus.max_total_wd_um = {a.max_total_wd_um:g} is below autofocus.max_step_wd_um = "
                          f"{a.max_step_wd_um:g}: a single step could never be taken in full")


ION_GUN_BLANKERS = ("outputs", "rts", "none")


def _validate_ion_gun(g: IonGunConfig) -> None:
    # the gun accepts at most 10 uA (IonGun.set_current_a); a GCIB delivers tens of nA
    if not 0 < g.current_na <= 1e4:
        raise ConfigError(f"ion_gun.current_na must be in (0, 10000] nA, got {g.current_na:g}")
    for key in ("x_hz", "y_hz", "azimuth_dwell_s", "continuous_turn_s"):
        if not getattr(g, key) > 0:
            raise ConfigError(f"ion_gun.{key} must be positive, got {getattr(g, key):g}")
    if g.mill_time_s < 0:
        raise ConfigError(f"ion_gun.mill_time_s must not be negative, got {g.mill_time_s:g}")
    if not 0 < g.continuous_step_deg <= 180:
        raise ConfigError(f"ion_gun.continuous_step_deg must be in (0, 180], got {g.continuous_step_deg:g}")
    if not 0 < g.glancing_angle_deg <= 90:
        raise ConfigError(f"ion_gun.glancing_angle_deg must be in (0, 90], got {g.glancing_angle_deg:g}")
    pairs = {"calibration_m_per_vpp": g.calibration_m_per_vpp, "calibration_offset_m": g.calibration_offset_m,
             "mill_position_mm": g.mill_position_mm, "field_mm": g.field_mm}
    for key, pair in pairs.items():
        if len(pair) != 2:
            raise ConfigError(f"ion_gun.{key} must be [x, y], got {pair}")
    if min(g.calibration_m_per_vpp) <= 0:
        raise ConfigError(f"ion_gun.calibration_m_per_vpp must be two positive numbers, got {g.calibration_m_per_vpp}")
    if min(g.field_mm) <= 0:
        raise ConfigError(f"ion_gun.field_mm must be two positive numbers, got {g.field_mm}")
    if not g.azimuths_deg:
        raise ConfigError("ion_gun.azimuths_deg must list at least one azimuth")
    if g.travel_z_mm > g.mill_z_mm:
        raise ConfigError(f"ion_gun.travel_z_mm = {g.travel_z_mm:g} must not lie above ion_gun.mill_z_mm = "
                          f"{g.mill_z_mm:g}: x/y travel happens at or below the mill height")
    if g.blanker not in ION_GUN_BLANKERS:
        raise ConfigError(f"ion_gun.blanker must be one of {', '.join(ION_GUN_BLANKERS)}, got {g.blanker!r}")
    if g.blanker == "rts" and not g.blanker_port:
        raise ConfigError("ion_gun.blanker is 'rts' but ion_gun.blanker_port is empty; give the serial port "
                          "whose RTS line drives the blanker")
