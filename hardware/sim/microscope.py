"""The simulated SEM and stage: one shared physical state, rendered on demand.

``SimulatedMicroscope`` holds the truth (lens state, stage position and its
hidden errors, the wafer, drift) and renders frames. ``SimSEM`` and ``SimStage``
are the device backends that expose it through the ordinary interfaces, so code
that runs here runs unchanged on a real microscope.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np
import scipy.fft

from ..clock import Clock, VirtualClock
from ..config import MicroscopeConfig
from ..errors import ConfigError
from ..sem import ELEMENTARY_CHARGE_C, SEM, Frame, ScanSettings, SEMLimits
from ..stage import Stage, StageLimits, StagePosition
from . import optics
from .specimen import Specimen, SyntheticSpecimen, load_specimen
from .wafer import VirtualWafer


@dataclass(frozen=True)
class Aberration:
    """True aberration of the probe in the image frame, micrometres (defocus = wd set - best wd)."""
    defocus_um: float
    astig_x_um: float
    astig_y_um: float


def sem_limits(cfg: MicroscopeConfig) -> SEMLimits:
    lim = cfg.limits
    return SEMLimits(
        wd_min_m=lim.wd_mm[0] * 1e-3, wd_max_m=lim.wd_mm[1] * 1e-3,
        stig_min=-cfg.stigmator.range, stig_max=cfg.stigmator.range,
        pixel_size_min_m=lim.pixel_size_nm[0] * 1e-9, pixel_size_max_m=lim.pixel_size_nm[1] * 1e-9,
        dwell_min_s=lim.dwell_ns[0] * 1e-9, dwell_max_s=lim.dwell_ns[1] * 1e-9,
        frame_min_px=int(lim.frame_px[0]), frame_max_px=int(lim.frame_px[1]),
        wd_step_max_m=lim.wd_step_um * 1e-6)


def stage_limits(cfg: MicroscopeConfig) -> StageLimits:
    s = cfg.stage
    return StageLimits(x_m=(s.x_mm[0] * 1e-3, s.x_mm[1] * 1e-3), y_m=(s.y_mm[0] * 1e-3, s.y_mm[1] * 1e-3),
                       z_m=(s.z_mm[0] * 1e-3, s.z_mm[1] * 1e-3), tilt_deg=tuple(s.tilt_deg),
                       rotation_deg=tuple(s.rotation_deg))


class SimulatedMicroscope:
    def __init__(self, cfg: MicroscopeConfig, clock: Clock | None = None, specimen: Specimen | None = None):
        self.cfg = cfg
        self.clock = clock or VirtualClock()
        root = np.random.SeedSequence(int(cfg.seed))
        wafer_ss, stage_ss, drift_ss, self._frame_ss = root.spawn(4)
        if specimen is None:
            if cfg.specimen:
                px = cfg.specimen_pixel_size_nm * 1e-9 if cfg.specimen_pixel_size_nm else None
                specimen = load_specimen(cfg.specimen, pixel_size_m=px)
            else:
                specimen = SyntheticSpecimen(seed=int(cfg.seed))
        self.specimen = specimen
        self.wafer = VirtualWafer(cfg.wafer, np.random.default_rng(wafer_ss),
                                  tuple(cfg.stigmator.true_center), cfg.stigmator.center_spread)
        self._stage_rng = np.random.default_rng(stage_ss)
        self._drift_rng = np.random.default_rng(drift_ss)
        self.frames_taken = 0
        # lens
        self.wd_set_m = cfg.optics.wd_nominal_mm * 1e-3
        self.wd_lens_m = self.wd_set_m
        self.stig = (0.0, 0.0)
        self.blanked = False
        self.scan = ScanSettings(pixel_size_m=10e-9, width_px=1024, height_px=768, dwell_s=200e-9,
                                 rotation_deg=cfg.scan.rotation_deg)
        # stage: commanded, encoder read-back, and hidden errors
        first = self.wafer.sections[0].center_m if self.wafer.sections else (0.0, 0.0)
        self.stage_target = StagePosition(x_m=first[0], y_m=first[1])
        self.stage_readback = self.stage_target
        self.stage_offset_xy_m = (0.0, 0.0)        # backlash: not seen by the encoders
        self.stage_z_error_m = 0.0
        self._last_dir = (0, 0)
        self._move_from = self.stage_target
        self._move_start_s = self.clock.now_s()
        self._move_end_s = self._move_start_s
        # drift: steady velocity plus a random walk, both in the lab frame
        ang = self._drift_rng.uniform(0, 2 * np.pi)
        self._drift_v = cfg.drift.rate_nm_per_s * 1e-9 * np.array([math.cos(ang), math.sin(ang)])
        self._drift_walk = np.zeros(2)
        self._drift_t = self.clock.now_s()
        self._brightness_phase = float(self._drift_rng.uniform(0, 2 * np.pi))

    # ------------------------------------------------------------------ truth
    def beam_position_m(self) -> tuple[float, float]:
        """Wafer coordinates under the centre of the field (with hidden stage errors)."""
        p = self.stage_position_actual()
        return p.x_m + self.stage_offset_xy_m[0], p.y_m + self.stage_offset_xy_m[1]

    def stage_position_actual(self) -> StagePosition:
        now = self.clock.now_s()
        if now >= self._move_end_s or self._move_end_s <= self._move_start_s:
            return self.stage_readback
        f = (now - self._move_start_s) / (self._move_end_s - self._move_start_s)
        a, b = self._move_from, self.stage_readback
        return StagePosition(*(getattr(a, n) + f * (getattr(b, n) - getattr(a, n))
                               for n in ("x_m", "y_m", "z_m", "tilt_deg", "rotation_deg")))

    def true_wd_m(self) -> float:
        """Working distance that focuses the surface under the beam now."""
        x, y = self.beam_position_m()
        z = self.stage_position_actual().z_m + self.stage_z_error_m
        return self.cfg.optics.wd_nominal_mm * 1e-3 - z - self.wafer.top_height_m(x, y)

    def true_stig(self) -> tuple[float, float]:
        x, y = self.beam_position_m()
        s = self.wafer.section_at(x, y)
        return s.stig_center if s is not None else tuple(self.cfg.stigmator.true_center)

    def image_rotation_deg(self) -> float:
        dwd_mm = (self.wd_lens_m - self.cfg.optics.wd_nominal_mm * 1e-3) * 1e3
        return self.scan.rotation_deg + self.cfg.optics.image_rotation_deg_per_mm * dwd_mm

    def aberration(self) -> Aberration:
        st = self.cfg.stigmator
        col = optics.stigmator_astigmatism_m(self.stig, self.true_stig(), st.rotation_deg, st.scale_um_per_unit)
        ax, ay = optics.rotate_astigmatism(col, self.image_rotation_deg())
        return Aberration((self.wd_lens_m - self.true_wd_m()) * 1e6, ax * 1e6, ay * 1e6)

    # ------------------------------------------------------------------ lens
    def set_wd(self, wd_m: float) -> None:
        # objective lens play: the effective focus follows the set value only
        # once it has moved more than the hysteresis half-width
        h = self.cfg.optics.hysteresis_um * 1e-6
        self.wd_set_m = wd_m
        if wd_m > self.wd_lens_m + h:
            self.wd_lens_m = wd_m - h
        elif wd_m < self.wd_lens_m - h:
            self.wd_lens_m = wd_m + h

    # ------------------------------------------------------------------ stage
    def start_move(self, target: StagePosition) -> float:
        cfg = self.cfg.stage
        cur = self.stage_position_actual()
        d_xy = math.hypot(target.x_m - cur.x_m, target.y_m - cur.y_m)
        t = max(d_xy * 1e3 / cfg.speed_mm_per_s, abs(target.z_m - cur.z_m) * 1e3 / cfg.z_speed_mm_per_s,
                abs(target.tilt_deg - cur.tilt_deg) / cfg.tilt_speed_deg_per_s,
                abs(target.rotation_deg - cur.rotation_deg) / cfg.rotation_speed_deg_per_s)
        rng = self._stage_rng
        rep = cfg.repeatability_um * 1e-6
        moved = d_xy > 0
        readback = replace(target, x_m=target.x_m + (rng.normal(0, rep) if moved else 0.0),
                           y_m=target.y_m + (rng.normal(0, rep) if moved else 0.0))
        # backlash: lost motion depends on the direction of approach, unseen by the encoders
        dirs = (int(np.sign(target.x_m - cur.x_m)), int(np.sign(target.y_m - cur.y_m)))
        dirs = tuple(d if d != 0 else last for d, last in zip(dirs, self._last_dir))
        self._last_dir = dirs
        b = cfg.backlash_um * 1e-6 / 2
        self.stage_offset_xy_m = (-dirs[0] * b, -dirs[1] * b)
        if moved:
            # long moves tilt/settle the stage differently: the specimen height changes
            f = min(1.0, d_xy * 1e3 / cfg.z_error_length_mm)
            self.stage_z_error_m = (1 - f) * self.stage_z_error_m + f * rng.normal(0, cfg.z_error_um * 1e-6)
        self._move_from = cur
        self.stage_target = target
        self.stage_readback = readback
        self._move_start_s = self.clock.now_s()
        self._move_end_s = self._move_start_s + (t + cfg.settle_s if t > 0 or moved else 0.0)
        return t

    def stage_is_moving(self) -> bool:
        return self.clock.now_s() < self._move_end_s

    def stop_stage(self) -> None:
        here = self.stage_position_actual()
        self.stage_readback = here
        self.stage_target = here
        self._move_end_s = self.clock.now_s()

    # ------------------------------------------------------------------ frames
    def frame_time_s(self, scan: ScanSettings) -> float:
        c = self.cfg.scan
        return scan.height_px * (scan.width_px * scan.dwell_s + c.line_overhead_s) + c.frame_overhead_s

    def _drift_offset_m(self, t: float) -> np.ndarray:
        dt = t - self._drift_t
        if dt > 0:
            self._drift_walk = self._drift_walk + self._drift_rng.normal(
                0, self.cfg.drift.random_walk_nm_per_sqrt_s * 1e-9 * math.sqrt(dt), 2)
            self._drift_t = t
        return self._drift_v * t + self._drift_walk

    def render(self) -> Frame:
        """Acquire one frame at the current settings, advancing the clock by the frame time."""
        cfg = self.cfg
        scan = self.scan
        t0 = self.clock.now_s()
        rng = np.random.default_rng(np.random.SeedSequence(self._frame_ss.entropy,
                                                           spawn_key=(3, self.frames_taken)))
        self.frames_taken += 1
        ab = self.aberration()
        current_a = cfg.beam.current_na * 1e-9
        truth = {"defocus_um": ab.defocus_um, "astig_x_um": ab.astig_x_um, "astig_y_um": ab.astig_y_um,
                 "true_wd_m": self.true_wd_m(), "true_stig": list(self.true_stig()),
                 "image_rotation_deg": self.image_rotation_deg(), "frame_index": self.frames_taken - 1}
        if self.blanked:
            yield_img = np.zeros((scan.height_px, scan.width_px), np.float32)
        else:
            yield_img = self._render_yield(scan, ab, t0, rng)
        image = self._detect(yield_img, scan, current_a, t0, rng)
        duration = self.frame_time_s(scan)
        self.clock.sleep(duration)
        x, y = self.beam_position_m()
        sec = self.wafer.section_at(x, y)
        meta = {"simulated": True, "truth": truth, "blanked": self.blanked,
                "section": sec.index if sec is not None else None, "specimen": self.specimen.name,
                "stage": asdict(self.stage_readback)}
        return Frame(image=image, scan=scan, wd_m=self.wd_set_m, stig=self.stig, beam_current_a=current_a,
                     timestamp_s=t0, duration_s=duration, metadata=meta)

    def _render_yield(self, scan: ScanSettings, ab: Aberration, t0: float, rng: np.random.Generator) -> np.ndarray:
        cfg = self.cfg
        p = scan.pixel_size_m
        alpha = cfg.optics.aperture_angle_mrad * 1e-3
        floor = cfg.optics.in_focus_probe_nm * 1e-9
        defocus = ab.defocus_um * 1e-6
        astig = (ab.astig_x_um * 1e-6, ab.astig_y_um * 1e-6)
        profile = optics.ApertureProfile(cfg.optics.aperture_taper, cfg.optics.halo_fraction, cfg.optics.halo_width)
        jitter_px = cfg.detector.line_jitter_px
        margin = int(math.ceil(optics.blur_radius_m(defocus, astig, alpha, floor, profile) / p + 4 * jitter_px)) + 4
        margin = min(margin, 2 * max(scan.width_px, scan.height_px))
        hp = scipy.fft.next_fast_len(scan.height_px + 2 * margin, real=True)
        wp = scipy.fft.next_fast_len(scan.width_px + 2 * margin, real=True)
        # beam position in wafer coordinates and the section under it
        bx, by = self.beam_position_m()
        drift = self._drift_offset_m(t0)
        bx, by = bx + drift[0], by + drift[1]
        sec = self.wafer.section_at(bx, by)
        dmin, dmax = cfg.detector.yield_min, cfg.detector.yield_max
        wafer_yield = cfg.detector.wafer_yield
        if sec is None:
            sharp = np.full((hp, wp), wafer_yield, np.float32)
        else:
            sharp = self._sample_section(sec, bx, by, scan, hp, wp, dmin, dmax, wafer_yield)
        blurred = optics.apply_probe(sharp, p, defocus, astig, alpha, floor, profile)
        # line jitter: each line starts at a slightly different x (scan generator noise)
        cy0 = (hp - scan.height_px) // 2
        cx0 = (wp - scan.width_px) // 2
        dx = rng.normal(0, jitter_px, scan.height_px).astype(np.float32) if jitter_px > 0 else \
            np.zeros(scan.height_px, np.float32)
        gx = np.arange(scan.width_px, dtype=np.float32)[None, :] + cx0 + dx[:, None]
        gy = np.broadcast_to(np.arange(scan.height_px, dtype=np.float32)[:, None] + cy0, gx.shape)
        return cv2.remap(blurred, gx, np.ascontiguousarray(gy), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)

    def _sample_section(self, sec, bx: float, by: float, scan: ScanSettings, hp: int, wp: int,
                        dmin: float, dmax: float, wafer_yield: float) -> np.ndarray:
        cfg = self.cfg
        p = scan.pixel_size_m
        u0, v0 = sec.to_local(bx, by)
        depth = sec.removed_at_local(float(u0), float(v0))
        img, ps = self.specimen.slice_at(self.specimen.slice_index(depth), p)
        # pixel (j, i) of the padded frame -> section-local metres -> specimen pixel
        dwd_mm = (self.wd_lens_m - cfg.optics.wd_nominal_mm * 1e-3) * 1e3
        scale = 1.0 + cfg.optics.image_scale_per_mm * dwd_mm
        theta = math.radians(self.image_rotation_deg() - self.stage_position_actual().rotation_deg
                             - sec.orientation_deg)
        c, s = math.cos(theta), math.sin(theta)
        k = p * scale / ps
        cx_s = (sec.specimen_origin_m[0] + float(u0)) / ps + img.shape[1] / 2
        cy_s = (sec.specimen_origin_m[1] + float(v0)) / ps + img.shape[0] / 2
        jc, ic = (wp - 1) / 2, (hp - 1) / 2
        A = np.array([[k * c, -k * s, 0.0], [k * s, k * c, 0.0]])
        A[0, 2] = cx_s - A[0, 0] * jc - A[0, 1] * ic
        A[1, 2] = cy_s - A[1, 0] * jc - A[1, 1] * ic
        sharp = cv2.warpAffine(img, A, (wp, hp), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT_101)
        y = dmin + (dmax - dmin) * sharp
        # where the frame leaves the section or milling has reached the wafer, show bare silicon
        half = 0.5 * math.hypot(wp, hp) * p * scale
        corners_inside = abs(float(u0)) + half <= sec.size_m[0] / 2 and abs(float(v0)) + half <= sec.size_m[1] / 2
        if not corners_inside or float(sec.removed_m.max()) >= sec.thickness_m - 1e-12:
            jj, ii = np.meshgrid(np.arange(wp, dtype=np.float32) - jc, np.arange(hp, dtype=np.float32) - ic)
            phi = math.radians(self.image_rotation_deg() - self.stage_position_actual().rotation_deg)
            cp, sp = math.cos(phi) * p * scale, math.sin(phi) * p * scale
            wx = bx + cp * jj - sp * ii
            wy = by + sp * jj + cp * ii
            uu, vv = sec.to_local(wx, wy)
            outside = (np.abs(uu) > sec.size_m[0] / 2) | (np.abs(vv) > sec.size_m[1] / 2)
            through = sec.removed_at_local(uu, vv) >= sec.thickness_m - 1e-12
            y = np.where(outside | through, np.float32(wafer_yield), y)
        return y.astype(np.float32)

    def _detect(self, yield_img: np.ndarray, scan: ScanSettings, current_a: float, t: float,
                rng: np.random.Generator) -> np.ndarray:
        """Poisson detection, normalised per dwell as an SEM's video chain does, then gain, offset, ADC."""
        d = self.cfg.detector
        electrons = current_a * scan.dwell_s / ELEMENTARY_CHARGE_C
        mean_counts = d.efficiency * electrons
        if self.blanked:
            signal = np.zeros_like(yield_img)
        else:
            counts = rng.poisson(np.maximum(yield_img, 0.0) * mean_counts).astype(np.float32)
            signal = counts / np.float32(mean_counts)
        bright = 1.0 + d.brightness_drift * math.sin(2 * math.pi * t / d.brightness_drift_period_s
                                                     + self._brightness_phase)
        value = d.offset + d.gain * bright * signal
        if d.read_noise > 0:
            value = value + rng.normal(0, d.read_noise, value.shape).astype(np.float32)
        full = float(2 ** d.bit_depth - 1)
        out = np.clip(np.rint(value * full), 0, full)
        return out.astype(np.uint8 if d.bit_depth == 8 else np.uint16)


class SimSEM(SEM):
    def __init__(self, sim: SimulatedMicroscope):
        super().__init__(sem_limits(sim.cfg), sim.clock)
        self.sim = sim

    def _do_get_wd_m(self) -> float:
        return self.sim.wd_set_m

    def _do_set_wd_m(self, wd_m: float) -> None:
        self.sim.set_wd(wd_m)

    def _do_get_stig(self) -> tuple[float, float]:
        return self.sim.stig

    def _do_set_stig(self, x: float, y: float) -> None:
        self.sim.stig = (x, y)

    def _do_get_scan(self) -> ScanSettings:
        return self.sim.scan

    def _do_set_scan(self, settings: ScanSettings) -> None:
        self.sim.scan = settings

    def _do_frame_time_s(self, settings: ScanSettings) -> float:
        return self.sim.frame_time_s(settings)

    def _do_grab_frame(self) -> Frame:
        return self.sim.render()

    def _do_set_blanked(self, blanked: bool) -> None:
        self.sim.blanked = blanked

    def _do_is_blanked(self) -> bool:
        return self.sim.blanked

    def _do_get_beam_current_a(self) -> float:
        return self.sim.cfg.beam.current_na * 1e-9


class SimStage(Stage):
    def __init__(self, sim: SimulatedMicroscope):
        super().__init__(stage_limits(sim.cfg), sim.clock)
        self.sim = sim

    def _do_get_position(self) -> StagePosition:
        return self.sim.stage_position_actual()

    def _do_start_move(self, target: StagePosition) -> None:
        self.sim.start_move(target)

    def _do_is_moving(self) -> bool:
        return self.sim.stage_is_moving()

    def _do_stop(self) -> None:
        self.sim.stop_stage()


def check_specimen_config(cfg: MicroscopeConfig) -> None:
    if cfg.specimen_pixel_size_nm is not None and not (
            isinstance(cfg.specimen_pixel_size_nm, (int, float)) and cfg.specimen_pixel_size_nm > 0):
        raise ConfigError(f"specimen_pixel_size_nm must be a positive number, got {cfg.specimen_pixel_size_nm!r}")
