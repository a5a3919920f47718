"""Specimens for the simulated microscope: sharp grey-value volumes with a known voxel size.

A specimen is a stack of slices (z, y, x) of values in [0, 1] (0 darkest). It is
either read from a TIFF/PNG stack (real EM images) or generated: a
neuropil-like texture with membranes, vesicle clouds, mitochondria and myelin at
realistic sizes, so that the product runs without any data on disk.

Coordinates outside the stored field are mirrored (the field repeats as a
reflection), which keeps large frames and long stage moves on real data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError

TARGETS = ("gold-on-carbon",)     # generated test specimens (see ``targets``), loaded by name


@dataclass
class Specimen:
    """A sharp specimen volume. ``slices[k]`` lies at depth ``k * slice_thickness_m`` below the surface."""
    slices: np.ndarray            # float32 (n, h, w) in [0, 1]
    pixel_size_m: float
    slice_thickness_m: float
    name: str = "specimen"

    def __post_init__(self) -> None:
        if self.slices.ndim != 3 or min(self.slices.shape) < 1:
            raise ConfigError(f"specimen {self.name}: expected a (slices, height, width) stack, "
                              f"got shape {self.slices.shape}")
        if not (self.pixel_size_m > 0 and np.isfinite(self.pixel_size_m)):
            raise ConfigError(f"specimen {self.name}: pixel size must be positive, got {self.pixel_size_m}")
        if min(self.slices.shape[1:]) < 16:
            raise ConfigError(f"specimen {self.name}: slices of {self.slices.shape[1:]} px are too small")
        self._scaled: dict[tuple[int, int], np.ndarray] = {}

    @property
    def depth_m(self) -> float:
        return self.slices.shape[0] * self.slice_thickness_m

    def slice_index(self, depth_m: float) -> int:
        """Slice shown after ``depth_m`` of material has been removed (mirrored beyond the stack)."""
        n = self.slices.shape[0]
        k = int(np.floor(max(depth_m, 0.0) / self.slice_thickness_m))
        if n == 1:
            return 0
        period = 2 * (n - 1)
        k %= period
        return k if k < n else period - k

    def slice_at(self, index: int, pixel_size_m: float) -> tuple[np.ndarray, float]:
        """Slice ``index`` resampled to roughly ``pixel_size_m``; returns (image, its pixel size).

        Down-sampling uses area averaging (what a scan pixel integrates); the result
        is cached because a frame series at one pixel size reuses it.
        """
        factor = pixel_size_m / self.pixel_size_m
        if factor <= 1.25:
            return self.slices[index], self.pixel_size_m
        step = int(np.floor(factor))
        key = (index, step)
        img = self._scaled.get(key)
        if img is None:
            src = self.slices[index]
            h, w = src.shape
            img = cv2.resize(src, (max(w // step, 4), max(h // step, 4)), interpolation=cv2.INTER_AREA)
            if len(self._scaled) > 16:
                self._scaled.clear()
            self._scaled[key] = img
        return img, self.pixel_size_m * self.slices.shape[2] / img.shape[1]


# --------------------------------------------------------------------------- files
def ome_pixel_size_m(tif) -> float | None:
    """The pixel size (m) an OME-TIFF records (its PhysicalSizeX), None where it records none."""
    meta = tif.ome_metadata
    if not meta:
        return None
    m = re.search(r'PhysicalSizeX="([^"]+)"', meta)
    if not m:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', meta)
    scale = {"nm": 1e-9, "µm": 1e-6, "um": 1e-6, "mm": 1e-3, "m": 1.0}.get(unit.group(1) if unit else "µm")
    if scale is None:
        return None
    return float(m.group(1)) * scale


_SLICE_SUFFIX = re.compile(r"(.+)\[(\d*):(\d*)\]")


def _normalise(stack: np.ndarray) -> np.ndarray:
    stack = stack.astype(np.float32)
    lo, hi = np.percentile(stack, [0.1, 99.9])
    if not hi > lo:
        raise ConfigError("specimen has no contrast (all pixels nearly equal)")
    return np.clip((stack - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def load_specimen(path: str | Path, pixel_size_m: float | None = None,
                  slice_thickness_m: float | None = None) -> Specimen:
    """Read a TIFF/OME-TIFF stack or a PNG/JPEG image as a specimen (or generate a named test target, see
    ``targets``: ``"gold-on-carbon"``).

    The pixel size comes from the OME metadata when present; ``pixel_size_m``
    overrides it and is required for files that do not record one. ``stack.tif[27:32]``
    keeps slices 27-31 only (Python's slice notation), e.g. the slices of a volume that
    training left out; grey values are normalised over the whole stack first, as training does.
    """
    p = Path(path)
    if str(path) in TARGETS and not p.exists():
        from .targets import gold_on_carbon
        return gold_on_carbon(pixel_size_m=pixel_size_m or 4e-9)
    keep = None
    m = _SLICE_SUFFIX.fullmatch(str(path))
    if m and not p.is_file():
        p = Path(m.group(1))
        keep = slice(int(m.group(2)) if m.group(2) else None, int(m.group(3)) if m.group(3) else None)
    if not p.is_file():
        raise ConfigError(f"specimen file {str(p)!r} does not exist (generated test targets: {', '.join(TARGETS)})")
    recorded = None
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile
            with tifffile.TiffFile(p) as tif:
                data = tif.series[0].asarray()
                recorded = ome_pixel_size_m(tif)
        else:
            data = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if data is None:
                raise ValueError("OpenCV could not decode it")
    except ConfigError:
        raise
    except Exception as exc:  # any decoder failure: name the file and the reason
        raise ConfigError(f"cannot read specimen {str(p)!r}: {exc}") from None
    if data.ndim == 3 and data.shape[-1] in (3, 4) and p.suffix.lower() not in (".tif", ".tiff"):
        data = cv2.cvtColor(data[..., :3], cv2.COLOR_BGR2GRAY)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ConfigError(f"specimen {str(p)!r}: expected a 2-D image or a 3-D stack, got shape {data.shape}")
    size = pixel_size_m if pixel_size_m is not None else recorded
    if size is None:
        raise ConfigError(f"specimen {str(p)!r} records no pixel size; give one (specimen_pixel_size_nm)")
    if not np.isfinite(data).all() if data.dtype.kind == "f" else False:
        raise ConfigError(f"specimen {str(p)!r} contains NaN or infinite values")
    stack, name = _normalise(data), p.name
    if keep is not None:
        n = stack.shape[0]
        stack = stack[keep].copy()
        if stack.shape[0] == 0:
            raise ConfigError(f"specimen {str(path)!r}: the stack has {n} slices, none of them in "
                              f"[{m.group(2)}:{m.group(3)}]")
        name = f"{p.name}[{m.group(2)}:{m.group(3)}]"
    return Specimen(stack, float(size), float(slice_thickness_m or size), name=name)


# --------------------------------------------------------------------------- synthetic neuropil
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Band-limited Gaussian noise of unit s.d. with correlation length ``scale_px``."""
    small = (max(int(shape[0] / scale_px) + 3, 4), max(int(shape[1] / scale_px) + 3, 4))
    coarse = rng.standard_normal(small).astype(np.float32)
    up = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return up / (up.std() + 1e-6)


def _disc_stamp(img: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, value: float,
                thickness: int = -1) -> None:
    for x, y, rr in zip(cx, cy, r):
        cv2.circle(img, (int(x), int(y)), max(int(rr), 1), float(value), thickness, lineType=cv2.LINE_AA)


def synthetic_neuropil(size_px: int = 2048, pixel_size_m: float = 5e-9, seed: int = 0) -> np.ndarray:
    """One slice of neuropil-like texture, values in [0, 1] (membranes dark, cytoplasm light).

    Sizes follow mammalian neuropil: neurite profiles 0.1-1.5 um, membranes about
    8-10 nm, synaptic vesicles about 40 nm in clusters, mitochondria 0.2-0.5 um wide
    with cristae, occasional myelinated axons with 0.1-0.2 um sheaths.
    """
    rng = np.random.default_rng(seed)
    nm = pixel_size_m * 1e9
    n = size_px
    area_um2 = (n * nm / 1000.0) ** 2
    # neurite seeds: a mix of small (axons, spine necks) and large (dendrites) profiles
    n_cells = int(area_um2 * 9)
    seeds = np.zeros((n, n), np.uint8)
    pts = rng.integers(0, n, size=(n_cells, 2))
    seeds[pts[:, 1], pts[:, 0]] = 1
    _, labels = cv2.distanceTransformWithLabels(1 - seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    # warp the tessellation so boundaries are curved like real membranes
    warp = 0.35 / (nm / 1000.0)  # displacement field amplitude ~0.35 um in px
    dx = _smooth_noise(rng, (n, n), 0.6 / (nm / 1000.0)) * warp * 0.5
    dy = _smooth_noise(rng, (n, n), 0.6 / (nm / 1000.0)) * warp * 0.5
    gx, gy = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32))
    labels = cv2.remap(labels.astype(np.float32), gx + dx, gy + dy, cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_REFLECT_101).astype(np.int32)
    edge = np.zeros((n, n), bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    n_lab = int(labels.max()) + 1
    # cytoplasm: per-neurite grey level plus fine granular texture
    cell_grey = rng.normal(0.72, 0.07, n_lab).astype(np.float32)
    img = cell_grey[labels] + 0.04 * _smooth_noise(rng, (n, n), 25.0 / nm)
    # myelin: a few neurites get a thick dark lamellar sheath
    dist_in = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 5)
    myelinated = rng.random(n_lab) < 0.04
    sheath_px = rng.uniform(100, 200, n_lab) / nm
    in_sheath = myelinated[labels] & (dist_in < sheath_px[labels])
    lamellae = 0.5 + 0.5 * np.cos(2 * np.pi * dist_in / (12.0 / nm))
    img = np.where(in_sheath, 0.18 + 0.08 * lamellae, img)
    # mitochondria: ellipses inside one neurite each, with cristae (folded inner membranes)
    mito = np.zeros((n, n), np.float32)
    n_mito = int(area_um2 * 0.8)
    for _ in range(n_mito):
        cx, cy = rng.integers(0, n, 2)
        w = rng.uniform(200, 400) / nm / 2
        length = w * rng.uniform(1.2, 3.5)
        r = int(length) + 2
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, n), max(cx - r, 0), min(cx + r, n)
        one = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.ellipse(one, (int(cx - x0), int(cy - y0)), (int(length), int(w)), float(rng.uniform(0, 180)),
                    0, 360, 1, -1)
        inside = (one > 0) & (labels[y0:y1, x0:x1] == labels[cy, cx])  # a mitochondrion stays in its neurite
        mito[y0:y1, x0:x1] = np.maximum(mito[y0:y1, x0:x1], inside)
    crist = _smooth_noise(rng, (n, n), 18.0 / nm)
    cristae = (np.abs(crist) < 0.35).astype(np.float32)
    img = np.where(mito > 0.5, 0.5 - 0.25 * cristae, img)
    mito_edge = cv2.morphologyEx((mito > 0.5).astype(np.uint8), cv2.MORPH_GRADIENT,
                                 np.ones((max(int(round(8 / nm)), 2),) * 2, np.uint8))
    # vesicle clouds: clusters of ~40 nm vesicles (dark membrane ring, light lumen)
    ves = np.zeros((n, n), np.float32)
    for _ in range(int(area_um2 * 2.5)):
        cx, cy = rng.integers(0, n, 2)
        k = rng.integers(30, 120)
        spread = rng.uniform(80, 180) / nm
        vx = cx + rng.normal(0, spread, k)
        vy = cy + rng.normal(0, spread, k)
        vr = rng.normal(20, 3, k) / nm
        _disc_stamp(ves, vx, vy, vr, 1.0, thickness=max(int(round(6 / nm)), 1))
    img = img - 0.35 * ves
    # membranes (~9 nm): dark lines, widened to their physical thickness
    memb = edge.astype(np.float32)
    k = max(int(round(9.0 / nm)), 1)
    if k > 1:
        memb = cv2.dilate(memb, np.ones((k, k), np.uint8))
    memb = np.maximum(memb, mito_edge.astype(np.float32))
    img = np.where(memb > 0, 0.12 + 0.05 * rng.random((n, n), dtype=np.float32), img)
    # postsynaptic densities: short thick dark segments on some membranes
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


class SyntheticSpecimen(Specimen):
    """Generated neuropil: each slab of ``slice_thickness_m`` is a new texture (milling reveals new content)."""

    def __init__(self, seed: int = 0, size_px: int = 3072, pixel_size_m: float = 5e-9,
                 slice_thickness_m: float = 50e-9, n_slices: int = 64):
        self.seed = int(seed)
        self.size_px = int(size_px)
        self.n_slices = int(n_slices)
        placeholder = np.zeros((1, 16, 16), np.float32)
        super().__init__(placeholder, pixel_size_m, slice_thickness_m, name=f"synthetic-neuropil-{seed}")

    @property
    def depth_m(self) -> float:
        return self.n_slices * self.slice_thickness_m

    def slice_index(self, depth_m: float) -> int:
        return int(np.floor(max(depth_m, 0.0) / self.slice_thickness_m)) % self.n_slices

    def slice_at(self, index: int, pixel_size_m: float) -> tuple[np.ndarray, float]:
        full = _cached_neuropil(self.size_px, self.pixel_size_m, self.seed * 1000 + int(index))
        factor = pixel_size_m / self.pixel_size_m
        if factor <= 1.25:
            return full, self.pixel_size_m
        step = int(np.floor(factor))
        key = (index, step)
        img = self._scaled.get(key)
        if img is None:
            img = cv2.resize(full, (self.size_px // step, self.size_px // step), interpolation=cv2.INTER_AREA)
            if len(self._scaled) > 16:
                self._scaled.clear()
            self._scaled[key] = img
        return img, self.pixel_size_m * self.size_px / img.shape[1]


@lru_cache(maxsize=6)
def _cached_neuropil(size_px: int, pixel_size_m: float, seed: int) -> np.ndarray:
    return synthetic_neuropil(size_px, pixel_size_m, seed)
