"""Training pairs from the simulated microscope.

Each *group* is one pair of 512 x 512 frames taken at wd - d and wd + d on a randomly
drawn microscope (profile parameters sampled around setup_a / setup_b), cut into 2 x 2
patch pairs of 256 px. The target is the correction to add, minus the effective
aberration midway between the two frames, read from the truth recorded with the frames
(the lens has hysteresis, so what was set is not what the beam saw).

Validation uses specimens never seen in training (split by specimen, never by crop).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hardware.factory import open_microscope
from hardware.sim.specimen import Specimen, SyntheticSpecimen, load_specimen

PATCH_PX = 256
APERTURE_RANGE_MRAD = (2.5, 5.5)         # beam half-angles of the drawn microscopes
FRAME_PX = 512


def shared_data_dir() -> Path:
    """``$GCIBSEM_SHARED/data/em`` (default ``../shared`` beside the repository)."""
    root = os.environ.get("GCIBSEM_SHARED")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared"
    return base / "data" / "em"


@dataclass
class SpecimenSpec:
    """A specimen by file name (under the shared EM folder) or ``synthetic:SEED``, with a slice range."""
    name: str
    slices: tuple[int, int] | None = None

    def load(self) -> Specimen:
        if self.name.startswith("synthetic:"):
            return SyntheticSpecimen(seed=int(self.name.split(":", 1)[1]), size_px=2048, n_slices=8)
        path = Path(self.name)
        if not path.is_absolute():
            path = shared_data_dir() / self.name
        if self.slices is not None:
            a, b = self.slices
            return load_specimen(f"{path}[{a}:{b}]")
        return load_specimen(path)


TRAIN_SPECIMENS = [SpecimenSpec("synthetic:11"), SpecimenSpec("synthetic:12"), SpecimenSpec("synthetic:13"),
                   SpecimenSpec("epfl_ca1_fibsem_5nm.ome.tif", (0, 27)),
                   SpecimenSpec("flyem_fib25_8nm_250.ome.tif")]
VAL_SPECIMENS = [SpecimenSpec("flyem_fib25_8nm_520.ome.tif"), SpecimenSpec("epfl_ca1_fibsem_5nm.ome.tif", (27, 32))]


@dataclass
class GenConfig:
    perturbation_um: float = 5.0
    wd_range_um: float = 34.0
    stig_range: float = 7.0               # stigmator units, scaled by each microscope's um per unit
    near_fraction: float = 0.35           # share of pairs drawn close to focus (where the loop ends)
    pixel_size_nm: tuple[float, float] = (7.0, 14.0)
    dwell_ns: tuple[float, float] = (40.0, 400.0)
    pairs_per_microscope: int = 16
    extra: list[str] = field(default_factory=list)
    # when set, features are binned in aperture-normalised frequency (alpha k): the pixel size handed
    # to the front end is p * alpha_ref / alpha, which makes one map layout mean the same aberration
    # on every aperture angle (the blur depends on alpha |M k| only)
    alpha_ref_mrad: float | None = None
    # aperture filling other than uniform (optics.aperture_taper, optics.halo_fraction; hardware/sim/optics.py):
    # [low, high] to draw a profile per microscope, a share ``uniform_share`` of microscopes keeping the disc.
    # None (the default) draws nothing, which keeps the seeded stream of the runs made before these keys.
    aperture_taper: tuple[float, float] | None = None
    halo_fraction: tuple[float, float] | None = None
    uniform_share: float = 0.25
    # share of augmented copies whose two frames also pass through one common linear filter (``video_filter``):
    # 0 (the default) draws nothing, which keeps the seeded stream of the runs made before this key
    video_filter_fraction: float = 0.0
    # > 1: the augmented copies' features are computed for an aperture angle believed wrong by a factor drawn
    # log-uniform within 1 / f .. f (copy 0 keeps the true angle). A wrong angle makes the pair look like one at
    # another perturbation, which the map shows (the two frames' blurs no longer differ by the trained amount), so
    # a model can learn to answer true to scale where the angle is known only roughly: far from focus it does, near
    # focus it cannot (models/README.md, "An aperture angle nobody measured"). 1 (the default) draws nothing,
    # which keeps the seeded stream of the runs made before this key.
    aperture_error_factor: float = 1.0
    # beam half-angles of the drawn microscopes (drawn uniformly: the same draws from the stream for any range)
    aperture_range_mrad: tuple[float, float] = APERTURE_RANGE_MRAD
    # [low, high]: each microscope images its specimen stretched along x by a factor drawn log-uniform in this
    # range (any direction, with the drawn scan rotation), for tissue more oriented than the specimens are: an
    # oriented specimen's spectrum is anisotropic like an astigmatic probe's. None (the default) draws nothing,
    # which keeps the seeded stream of the runs made before this key.
    specimen_stretch: tuple[float, float] | None = None


def sample_overrides(rng: np.random.Generator, cfg: GenConfig | None = None) -> list[str]:
    """A microscope drawn around setup_a / setup_b: optics, beam, detector, stigmator, scan rotation
    (and the aperture's filling when ``cfg`` asks for it)."""
    u = rng.uniform
    drawn = [
        f"seed={int(rng.integers(1, 2**31))}",
        f"optics.aperture_angle_mrad={u(*(cfg.aperture_range_mrad if cfg else APERTURE_RANGE_MRAD)):.3f}",
        f"optics.in_focus_probe_nm={u(2.0, 6.5):.2f}",
        f"optics.hysteresis_um={u(0.0, 0.4):.3f}",
        f"optics.image_rotation_deg_per_mm={u(-3, 3):.2f}",
        f"beam.current_na={math.exp(u(math.log(0.4), math.log(2.5))):.3f}",
        f"detector.efficiency={u(0.05, 0.2):.3f}",
        f"detector.bit_depth={int(rng.choice([8, 16]))}",
        f"detector.line_jitter_px={u(0.0, 0.4):.3f}",
        f"stigmator.rotation_deg={u(-180, 180):.1f}",
        f"stigmator.scale_um_per_unit={u(1.2, 2.6):.3f}",
        f"scan.rotation_deg={u(-180, 180):.1f}",
    ]
    if cfg is not None and (cfg.aperture_taper is not None or cfg.halo_fraction is not None):
        # the same draws whichever branch is taken, so one microscope's profile does not shift the next's stream
        keep_uniform = rng.random() < cfg.uniform_share
        taper = u(*cfg.aperture_taper) if cfg.aperture_taper is not None else 0.0
        with_halo = rng.random() < 0.5
        halo = u(*cfg.halo_fraction) if cfg.halo_fraction is not None else 0.0
        halo = halo if with_halo else 0.0
        width = u(1.2, 2.5)
        if not keep_uniform:
            drawn += [f"optics.aperture_taper={taper:.3f}", f"optics.halo_fraction={halo:.3f}",
                      f"optics.halo_width={width:.3f}"]
    return drawn


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Detector counts -> float32 in [-1, 1] by the image's integer range (floats: by their own extent)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 127.5 - 1.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 32767.5 - 1.0
    x = image.astype(np.float32)
    lo, hi = float(np.min(x)), float(np.max(x))
    return (x - lo) / max(hi - lo, 1e-12) * 2.0 - 1.0


def augment(pair: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The thesis' augmentations on a (.., 2, H, W) pair in [-1, 1]: noise, gamma, brightness/contrast."""
    x = pair.copy()
    if rng.random() < 0.75:
        x = x + rng.normal(0, rng.uniform(0, 0.2), x.shape).astype(np.float32)
    if rng.random() < 0.75:
        g = max(0.3, rng.normal(1.0, 0.25))
        x = np.sign(x + 1) * np.abs((x + 1) / 2) ** g * 2 - 1
    if rng.random() < 0.75:
        x = x * max(0.2, rng.normal(1.0, 0.25)) + rng.normal(0, 0.25)
    return x.astype(np.float32)


def lowpass_fast_axis(image: np.ndarray, tau_px: float) -> np.ndarray:
    """A one-pole low-pass along each scan line (the last axis, scanned left to right), as a detector and video
    amplifier of finite bandwidth leave it: time constant ``tau_px`` in pixels (= tau / dwell)."""
    import scipy.signal
    if tau_px <= 0:
        return image.astype(np.float32)
    a = math.exp(-1.0 / tau_px)
    x = image.astype(np.float32)
    # started in steady state on each line's first value, as the amplifier is during the fly-back
    y, _ = scipy.signal.lfilter([1.0 - a], [1.0, -a], x, axis=-1, zi=a * x[..., :1])
    return y.astype(np.float32)


def smooth_frames(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """A Gaussian smoothing of each frame (the last two axes) of ``sigma_px``, as resampling or a noise filter."""
    import scipy.ndimage
    sig = (0.0,) * (image.ndim - 2) + (sigma_px, sigma_px)
    return scipy.ndimage.gaussian_filter(image.astype(np.float32), sig, mode="reflect").astype(np.float32)


def video_filter(pair: np.ndarray, rng: np.random.Generator, max_tau_px: float = 2.5,
                 max_sigma_px: float = 1.3) -> np.ndarray:
    """One linear filter applied alike to every frame in ``pair`` (.., H, W) after detection: the finite bandwidth
    of the detector chain (a low-pass along the scan lines), a smoothing of the saved frame (resampling, noise
    reduction), or both. Both frames keep their shot noise, now coloured; real frames come this way, the
    simulator's do not."""
    kind = rng.integers(3)
    tau = rng.uniform(0.2, max_tau_px)
    sigma = rng.uniform(0.3, max_sigma_px)
    x = pair.astype(np.float32)
    if kind in (0, 2):
        x = lowpass_fast_axis(x, tau)
    if kind in (1, 2):
        x = smooth_frames(x, sigma)
    return x


def sample_aberration(rng: np.random.Generator, cfg: GenConfig) -> tuple[float, float, float]:
    r = rng.random()
    if r < cfg.near_fraction * 0.5:
        scale = 0.08
    elif r < cfg.near_fraction:
        scale = 0.25
    else:
        scale = 1.0
    return (rng.uniform(-1, 1) * cfg.wd_range_um * scale,
            rng.uniform(-1, 1) * cfg.stig_range * scale,
            rng.uniform(-1, 1) * cfg.stig_range * scale)


def render_groups(specimen: Specimen, overrides: list[str], n: int, cfg: GenConfig,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``n`` groups of 4 patch pairs from one microscope: (n, 4, 2, P, P) in [-1, 1], targets (n, 3), pixel nm,
    aperture angle mrad."""
    base = "setup_a" if rng.random() < 0.6 else "setup_b"
    m = open_microscope(base, list(overrides) + list(cfg.extra), specimen=specimen)
    sem, sim, stage = m.sem, m.sim, m.stage
    p_nm = float(rng.uniform(*cfg.pixel_size_nm))
    dwell = math.exp(rng.uniform(math.log(cfg.dwell_ns[0]), math.log(cfg.dwell_ns[1]))) * 1e-9
    sem.set_scan(pixel_size_m=p_nm * 1e-9, width_px=FRAME_PX, height_px=FRAME_PX, dwell_s=dwell)
    d = cfg.perturbation_um * 1e-6
    pairs = np.empty((n, 4, 2, PATCH_PX, PATCH_PX), np.float32)
    targets = np.empty((n, 3), np.float32)
    start = stage.position()
    for i in range(n):
        stage.move_to(x_m=start.x_m + rng.uniform(-3e-4, 3e-4), y_m=start.y_m + rng.uniform(-3e-4, 3e-4))
        z, sx, sy = sample_aberration(rng, cfg)
        ts = sim.true_stig()
        lim = cfg_stig_limit(sem)
        sem.set_stig(float(np.clip(ts[0] + sx, -lim, lim)), float(np.clip(ts[1] + sy, -lim, lim)))
        c = sim.true_wd_m() + z * 1e-6
        sem.set_wd_m(c)
        sem.set_wd_m(c - d)
        f_minus = sem.grab_frame()
        sem.set_wd_m(c + d)
        f_plus = sem.grab_frame()
        tm, tp = f_minus.metadata["truth"], f_plus.metadata["truth"]
        targets[i] = [-(tm[k] + tp[k]) / 2 for k in ("defocus_um", "astig_x_um", "astig_y_um")]
        a, b = to_unit_range(f_minus.image), to_unit_range(f_plus.image)
        for q, (r0, c0) in enumerate(((0, 0), (0, PATCH_PX), (PATCH_PX, 0), (PATCH_PX, PATCH_PX))):
            pairs[i, q, 0] = a[r0:r0 + PATCH_PX, c0:c0 + PATCH_PX]
            pairs[i, q, 1] = b[r0:r0 + PATCH_PX, c0:c0 + PATCH_PX]
    return pairs, targets, p_nm, float(m.config.optics.aperture_angle_mrad)


def model_pixel_range_nm(cfg: GenConfig) -> tuple[float, float]:
    """The pixel sizes a model trained on ``cfg`` saw, aperture-normalised when ``cfg`` asks for it."""
    lo, hi = cfg.pixel_size_nm
    if cfg.alpha_ref_mrad is None:
        return float(lo), float(hi)
    return (effective_pixel_size_nm(lo, cfg.aperture_range_mrad[1], cfg.alpha_ref_mrad),
            effective_pixel_size_nm(hi, cfg.aperture_range_mrad[0], cfg.alpha_ref_mrad))


def effective_pixel_size_nm(pixel_size_nm: float, alpha_mrad: float | None, alpha_ref_mrad: float | None) -> float:
    """Pixel size handed to the spectral front end: scaled by alpha_ref / alpha when the model is normalised."""
    if alpha_ref_mrad is None or alpha_mrad is None:
        return pixel_size_nm
    return pixel_size_nm * alpha_ref_mrad / alpha_mrad


def cfg_stig_limit(sem) -> float:
    return float(sem.limits.stig_max)


def stretched(specimen: Specimen, factor: float) -> Specimen:
    """``specimen`` stretched ``factor`` x along x (its pixel size kept): structure elongated along x."""
    import cv2
    s = specimen.slices
    w = max(1, int(round(s.shape[2] * factor)))
    out = np.stack([cv2.resize(sl, (w, s.shape[1]), interpolation=cv2.INTER_LINEAR) for sl in s])
    return Specimen(out, specimen.pixel_size_m, specimen.slice_thickness_m, name=f"{specimen.name} x{factor:.2f}")


def rendered_blocks(specimens: list[SpecimenSpec], n_groups: int, cfg: GenConfig, rng: np.random.Generator,
                    loaded: dict | None = None):
    """Yield (pairs, targets, effective pixel nm, aperture mrad, specimen index) per microscope until ``n_groups``.

    The caller may draw from ``rng`` between blocks (augmentation): the sequence stays one seeded stream.
    """
    loaded = loaded if loaded is not None else {}
    done = 0
    while done < n_groups:
        spec_i = int(rng.integers(len(specimens)))
        spec = specimens[spec_i]
        if spec.name not in loaded or loaded[spec.name][0] != spec.slices:
            loaded[spec.name] = (spec.slices, spec.load())
        k = min(cfg.pairs_per_microscope, n_groups - done)
        specimen = loaded[spec.name][1]
        if cfg.specimen_stretch is not None:
            factor = math.exp(rng.uniform(*np.log(cfg.specimen_stretch)))
            # the generated neuropil is drawn, not sampled from an image: it keeps its own shapes
            specimen = specimen if isinstance(specimen, SyntheticSpecimen) else stretched(specimen, factor)
        pairs, targets, p_nm, alpha = render_groups(specimen, sample_overrides(rng, cfg), k, cfg, rng)
        yield pairs, targets, effective_pixel_size_nm(p_nm, alpha, cfg.alpha_ref_mrad), alpha, spec_i
        done += k


def generate_shard(path: Path, specimens: list[SpecimenSpec], n_groups: int, cfg: GenConfig, seed: int,
                   copies: int = 2, loaded: dict | None = None) -> None:
    """Render ``n_groups`` groups, keep ``copies`` augmented spectral-feature versions of each, save as .npz."""
    import torch

    from .features import SpectralFrontEnd
    front = SpectralFrontEnd()
    rng = np.random.default_rng(seed)
    feats, targs, meta = [], [], []
    for pairs, targets, p_nm, _, spec_i in rendered_blocks(specimens, n_groups, cfg, rng, loaded):
        k = pairs.shape[0]
        for c in range(copies):
            x = _copy(pairs, c, rng, cfg)
            with torch.no_grad():
                f = front(torch.from_numpy(x.reshape(-1, 2, PATCH_PX, PATCH_PX)), _believed_pixel_nm(p_nm, c, rng, cfg))
            feats.append(f.numpy().reshape(k, 4, *f.shape[1:]).astype(np.float16))
            targs.append(targets)
            meta.append(np.full(k, spec_i, np.int16))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=np.concatenate(feats), targets=np.concatenate(targs), specimen=np.concatenate(meta))
    tmp.rename(path)


def _filter_some(groups: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """``video_filter`` on a share ``fraction`` of the (n, 4, 2, P, P) groups, one draw per group (one frame pair)."""
    out = groups.copy()
    for i in range(groups.shape[0]):
        if rng.random() < fraction:
            out[i] = video_filter(groups[i], rng)
    return out


def _copy(groups: np.ndarray, c: int, rng: np.random.Generator, cfg: GenConfig) -> np.ndarray:
    """Copy ``c`` of rendered groups for a feature shard: 0 as rendered, the others augmented and partly filtered."""
    if c == 0:
        return groups
    x = augment(groups, rng)
    return _filter_some(x, rng, cfg.video_filter_fraction) if cfg.video_filter_fraction > 0 else x


def _believed_pixel_nm(p_eff: float, c: int, rng: np.random.Generator, cfg: GenConfig) -> float:
    """Pixel size the front end gets for copy ``c`` when the aperture angle is believed wrong by a drawn factor m
    (``cfg.aperture_error_factor``): p * alpha_ref / (alpha / m). Copy 0 and the default draw nothing."""
    if c == 0 or cfg.aperture_error_factor <= 1.0:
        return p_eff
    return p_eff * math.exp(rng.uniform(-1.0, 1.0) * math.log(cfg.aperture_error_factor))


def features_from_pair_shard(src: Path, dst: Path, cfg: GenConfig, seed: int, copies: int = 2) -> None:
    """Spectral-feature shard ``dst`` from a raw pair shard ``src`` (``generate_pair_shard``) without rendering
    again: copy 0 as rendered, the others augmented (``augment``, then ``video_filter`` on a share
    ``cfg.video_filter_fraction``). Pixel sizes become aperture-normalised when ``cfg.alpha_ref_mrad`` is set."""
    import torch

    from .features import SpectralFrontEnd
    if not Path(src).exists():
        raise FileNotFoundError(f"pair shard {str(src)!r} not found (pair_data must hold the shards written by "
                                f"an image-model run, e.g. deepfocus/configs/baseline.yaml)")
    with np.load(src) as d:
        pairs_u8, targets, spec = d["pairs"], d["targets"], d["specimen"]
        p_nm, alpha = d["pixel_size_nm"], d["aperture_angle_mrad"]
    front = SpectralFrontEnd()
    rng = np.random.default_rng(seed)
    n = pairs_u8.shape[0]
    feats = np.empty((copies, n, 4, 3, front.n_r, front.n_theta), np.float16)
    for i in range(n):
        group = pairs_from_uint8(pairs_u8[i:i + 1])
        p_eff = effective_pixel_size_nm(float(p_nm[i]), float(alpha[i]), cfg.alpha_ref_mrad)
        for c in range(copies):
            x = _copy(group, c, rng, cfg)
            p_believed = _believed_pixel_nm(p_eff, c, rng, cfg)
            with torch.no_grad():
                f = front(torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 2, *x.shape[-2:]))), p_believed)
            feats[c, i] = f.numpy().astype(np.float16)
    tmp = Path(dst).with_suffix(".tmp.npz")
    np.savez(tmp, features=feats.reshape(copies * n, 4, *feats.shape[3:]), targets=np.tile(targets, (copies, 1)),
             specimen=np.tile(spec, copies))
    tmp.rename(dst)


def pairs_to_uint8(pairs: np.ndarray) -> np.ndarray:
    """[-1, 1] -> 0..255 by x * 127.5 + 127.5, the inverse of ``to_unit_range`` for 8-bit frames.

    uint8 rather than float16: half the disk and memory (0.5 MB per group of 4 pairs of 256 px), exact for the
    8-bit detectors, and for 16-bit frames (which fill the range) the rounding error (0.0023 rms) is
    far below the shot noise of the brightest, slowest scans the generator draws (~0.03).
    """
    return np.clip(np.rint((pairs + 1.0) * 127.5), 0, 255).astype(np.uint8)


def pairs_from_uint8(pairs_u8: np.ndarray) -> np.ndarray:
    return pairs_u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def generate_pair_shard(path: Path, specimens: list[SpecimenSpec], n_groups: int, cfg: GenConfig, seed: int,
                        loaded: dict | None = None) -> None:
    """Render ``n_groups`` groups and save the raw patch pairs (uint8) for the image networks, as .npz.

    No augmented copies: image models are augmented at training time, a fresh draw every time a group is used.
    Keys: ``pairs`` (n, 4, 2, P, P) uint8, ``targets`` (n, 3) um, ``specimen`` (n,), ``pixel_size_nm`` (n,)
    (effective: scaled by alpha_ref / alpha when ``cfg.alpha_ref_mrad`` is set), ``aperture_angle_mrad`` (n,).
    """
    rng = np.random.default_rng(seed)
    pairs_l, targs, spec, px, alpha_l = [], [], [], [], []
    for pairs, targets, p_nm, alpha, spec_i in rendered_blocks(specimens, n_groups, cfg, rng, loaded):
        k = pairs.shape[0]
        pairs_l.append(pairs_to_uint8(pairs))
        targs.append(targets)
        spec.append(np.full(k, spec_i, np.int16))
        px.append(np.full(k, p_nm, np.float32))
        alpha_l.append(np.full(k, alpha, np.float32))
    tmp = path.with_suffix(".tmp.npz")
    # uncompressed: noisy images barely compress, and the trainer reads them whole
    np.savez(tmp, pairs=np.concatenate(pairs_l), targets=np.concatenate(targs), specimen=np.concatenate(spec),
             pixel_size_nm=np.concatenate(px), aperture_angle_mrad=np.concatenate(alpha_l))
    tmp.rename(path)
