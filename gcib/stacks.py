"""Mill-rate estimation and computational flattening from acquired sub-stacks.

A sub-stack is the series of images of one thick section, one image after each
milling step, indexed (z, y, x) with z = 0 the unmilled surface. Milling is not
perfectly even, so the (dark) wafer appears after a different number of steps
at each (y, x). The per-pixel index of the last slice that still shows tissue
gives both the mill rate (section thickness over milling cycles) and the
mapping that stretches every pixel column's tissue over the same output z
range (flattening).

All array work is vectorised over pixels and done in blocks of rows so that a
500 x 2048 x 2048 stack needs little memory beyond its input and output.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from hardware.errors import LimitError

# Grey values of the milled-through wafer lie below this on 8-bit images of a gold-coated wafer.
DEFAULT_WAFER_THRESHOLD = 10.0
# Gaussian s.d. (px) applied to the per-pixel index: suppresses single-pixel noise without blurring
# the real, slowly varying inhomogeneity of the mill rate.
DEFAULT_SIGMA_PX = 1.0
# A single bright wafer pixel (noise, a speck of debris) makes that pixel's last tissue slice jump by
# tens of slices; a 3 x 3 median removes such isolated outliers before the Gaussian spreads them.
DEFAULT_MEDIAN_PX = 3
_BLOCK_ELEMENTS = 1 << 20   # source voxels per block of rows handed to one worker


# ----------------------------------------------------------------------------- OME-TIFF
_UNIT_M = {"m": 1.0, "mm": 1e-3, "µm": 1e-6, "um": 1e-6, "\u03bcm": 1e-6, "nm": 1e-9, "Å": 1e-10, "pm": 1e-12}


@dataclass
class OmeStack:
    data: np.ndarray                          # (z, y, x)
    physical_size_x_m: float | None = None
    physical_size_y_m: float | None = None
    physical_size_z_m: float | None = None


def read_ome_stack(path: str | Path) -> OmeStack:
    """Read a (z, y, x) OME-TIFF; physical sizes come from its OME-XML (OME default unit: um)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such stack: {path}")
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        data = series.asarray()
        axes = series.axes
        ome_xml = tif.ome_metadata
    keep = [i for i, (ax, n) in enumerate(zip(axes, data.shape)) if n > 1 or ax in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a (z, y, x) stack, got axes {axes!r} with shape {series.shape}")
    sizes: dict[str, float | None] = {"X": None, "Y": None, "Z": None}
    if ome_xml:
        pixels = tifffile.xml2dict(ome_xml).get("OME", {}).get("Image", {})
        if isinstance(pixels, list):
            pixels = pixels[0]
        pixels = pixels.get("Pixels", {})
        for ax in sizes:
            value = pixels.get(f"PhysicalSize{ax}")
            if value is not None:
                unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
                if unit not in _UNIT_M:
                    raise ValueError(f"{path}: unknown PhysicalSize{ax}Unit {unit!r}")
                sizes[ax] = float(value) * _UNIT_M[unit]
    return OmeStack(data, sizes["X"], sizes["Y"], sizes["Z"])


def write_ome_stack(path: str | Path, stack: OmeStack) -> None:
    metadata: dict = {"axes": "ZYX"}
    for ax, value in (("X", stack.physical_size_x_m), ("Y", stack.physical_size_y_m),
                      ("Z", stack.physical_size_z_m)):
        if value is not None:
            metadata[f"PhysicalSize{ax}"] = value * 1e9
            metadata[f"PhysicalSize{ax}Unit"] = "nm"
    tifffile.imwrite(path, stack.data, ome=True, photometric="minisblack", metadata=metadata,
                     bigtiff=stack.data.nbytes > 2**31)


# ----------------------------------------------------------------------------- last tissue slice
def _check_stack(stack: np.ndarray) -> np.ndarray:
    stack = np.asarray(stack)
    if stack.ndim != 3 or min(stack.shape) < 1:
        raise ValueError(f"stack must be a non-empty (z, y, x) array, got shape {stack.shape}")
    return stack


def _row_blocks(n_rows: int, row_elements: int) -> list[slice]:
    rows = max(1, _BLOCK_ELEMENTS // max(1, row_elements))
    return [slice(y, min(y + rows, n_rows)) for y in range(0, n_rows, rows)]


def last_tissue_index(stack: np.ndarray, threshold: float = DEFAULT_WAFER_THRESHOLD) -> np.ndarray:
    """Per (y, x): index of the last slice brighter than ``threshold`` (tissue); -1 where every slice is wafer.

    The last occurrence (not the first wafer pixel) is used because dark stained
    structures inside the tissue also fall below the threshold now and then.
    """
    stack = _check_stack(stack)
    nz, ny, nx = stack.shape
    out = np.full((ny, nx), -1, dtype=np.int32)
    # One pass over the planes, each overwriting where it shows tissue: reads every voxel once,
    # in storage order (an argmax along z would first copy the stack into z-contiguous order).
    for k in range(nz):
        np.copyto(out, k, where=stack[k] >= threshold)
    return out


def clean_index(index: np.ndarray, median_px: int = DEFAULT_MEDIAN_PX) -> np.ndarray:
    """Median-filtered last-tissue index; pixels whose neighbourhood median is 'no tissue' keep their own value."""
    if int(median_px) != median_px or median_px < 0:
        raise LimitError("median filter size", median_px, 0, math.inf, "px")
    if median_px <= 1:
        return index.copy()
    med = ndimage.median_filter(index, size=int(median_px), mode="nearest")
    return np.where((index >= 0) & (med < 0), index, med).astype(index.dtype)


def tissue_cap(stack: np.ndarray, raw: np.ndarray, cleaned: np.ndarray,
               threshold: float = DEFAULT_WAFER_THRESHOLD, max_steps: int = 8) -> np.ndarray:
    """Deepest slice, at or above the cleaned index, that still shows tissue in that very pixel.

    Where the median replaced an outlier, the neighbours' value may lie a slice or
    two past this pixel's own breakthrough; stepping up until the pixel is tissue
    keeps the flattening from reading wafer there.
    """
    cap = np.minimum(raw, cleaned).astype(np.int64)
    for _ in range(max_steps):
        grey = np.take_along_axis(stack, np.clip(cap, 0, None)[None], axis=0)[0]
        wafer = (cap > 0) & (grey < threshold)
        if not wafer.any():
            break
        cap[wafer] -= 1
    return cap


def smooth_index(index: np.ndarray, sigma_px: float = DEFAULT_SIGMA_PX) -> np.ndarray:
    """Gaussian-smoothed float index; pixels without tissue (-1) neither contribute nor change (stay NaN)."""
    if sigma_px < 0 or not math.isfinite(sigma_px):
        raise LimitError("smoothing sigma", sigma_px, 0.0, math.inf, "px")
    valid = index >= 0
    values = np.where(valid, index, 0).astype(np.float64)
    if sigma_px == 0:
        smooth = values
    else:
        # Normalised convolution: a Gaussian mean over valid neighbours only, so the
        # no-tissue border does not drag the edge of the section towards -1.
        weight = ndimage.gaussian_filter(valid.astype(np.float64), sigma_px, mode="nearest")
        smooth = ndimage.gaussian_filter(values, sigma_px, mode="nearest")
        smooth = np.divide(smooth, weight, out=np.zeros_like(smooth), where=weight > 1e-12)
    return np.where(valid, smooth, np.nan)


# ----------------------------------------------------------------------------- mill rate
@dataclass(frozen=True)
class StackMillRate:
    """Mill rate measured from a sub-stack; s.d. values describe the spread over the analysed pixels."""
    thickness_m: float
    thickness_sd_m: float
    cycles_per_slice: int
    cycles_mean: float
    cycles_sd: float
    depth_per_cycle_m: float
    depth_per_cycle_sd_m: float
    depth_rate_m_per_s: float | None
    depth_rate_sd_m_per_s: float | None
    pixels_used: int
    pixels_not_milled_through: int
    pixels_without_tissue: int
    roi: tuple[int, int, int, int]            # y0, x0, height, width
    last_index: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "last_index"}


def _crop(stack: np.ndarray, roi: tuple[int, int, int, int] | None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    _, ny, nx = stack.shape
    if roi is None:
        return stack, (0, 0, ny, nx)
    y0, x0, h, w = (int(v) for v in roi)
    if y0 < 0 or x0 < 0 or h < 1 or w < 1 or y0 + h > ny or x0 + w > nx:
        raise ValueError(f"ROI (y0={y0}, x0={x0}, height={h}, width={w}) does not fit the {ny} x {nx} px stack")
    return stack[:, y0:y0 + h, x0:x0 + w], (y0, x0, h, w)


def estimate_mill_rate(stack: np.ndarray, thickness_m: float, cycles_per_slice: int, *,
                       thickness_sd_m: float = 0.0, threshold: float = DEFAULT_WAFER_THRESHOLD,
                       sigma_px: float = DEFAULT_SIGMA_PX, median_px: int = DEFAULT_MEDIAN_PX,
                       roi: tuple[int, int, int, int] | None = None,
                       cycle_time_s: float | None = None) -> StackMillRate:
    """Depth milled per cycle (and per second of beam if ``cycle_time_s`` is given) from a sub-stack.

    Slice k is taken after k milling steps of ``cycles_per_slice`` cycles each, so
    a pixel whose last tissue slice is L broke through during step L + 1: the
    estimate uses the midpoint, (L + 1/2) steps, and adds the uniform
    discretisation variance (one step)^2 / 12 to the pixel spread. Pixels still
    showing tissue in the last slice have not been milled through and are left out.
    Uncertainty of the rate d / n follows by first-order propagation from the
    thickness s.d. and the s.d. of the cycle counts.
    """
    stack = _check_stack(stack)
    if not (math.isfinite(thickness_m) and thickness_m > 0):
        raise LimitError("section thickness", thickness_m, 0.0, math.inf, "m")
    if not (math.isfinite(thickness_sd_m) and thickness_sd_m >= 0):
        raise LimitError("section thickness s.d.", thickness_sd_m, 0.0, math.inf, "m")
    if int(cycles_per_slice) != cycles_per_slice or cycles_per_slice < 1:
        raise LimitError("milling cycles per slice", cycles_per_slice, 1, math.inf)
    if cycle_time_s is not None and not (math.isfinite(cycle_time_s) and cycle_time_s > 0):
        raise LimitError("milling cycle time", cycle_time_s, 0.0, math.inf, "s")
    cropped, roi_t = _crop(stack, roi)
    nz = cropped.shape[0]
    raw = clean_index(last_tissue_index(cropped, threshold), median_px)
    no_tissue = raw < 0
    not_through = raw >= nz - 1
    if np.all(no_tissue):
        raise ValueError(f"no pixel of the {nz}-slice stack is at or above the wafer threshold {threshold:g}: "
                         "all wafer (threshold too high?)")
    smooth = smooth_index(raw, sigma_px)
    used = ~no_tissue & ~not_through
    if not np.any(used):
        raise ValueError(f"no pixel was milled through within the {nz} slices (none falls below the wafer "
                         f"threshold {threshold:g} after its tissue): the rate cannot be measured from this stack")
    steps = smooth[used] + 0.5
    c = int(cycles_per_slice)
    cycles = steps * c
    n_mean = float(cycles.mean())
    n_sd = float(math.sqrt(cycles.var() + c * c / 12.0))
    rate = thickness_m / n_mean
    rel = math.sqrt((thickness_sd_m / thickness_m) ** 2 + (n_sd / n_mean) ** 2)
    return StackMillRate(
        thickness_m=float(thickness_m), thickness_sd_m=float(thickness_sd_m), cycles_per_slice=c,
        cycles_mean=n_mean, cycles_sd=n_sd, depth_per_cycle_m=rate, depth_per_cycle_sd_m=rate * rel,
        depth_rate_m_per_s=None if cycle_time_s is None else rate / cycle_time_s,
        depth_rate_sd_m_per_s=None if cycle_time_s is None else rate * rel / cycle_time_s,
        pixels_used=int(used.sum()), pixels_not_milled_through=int((not_through & ~no_tissue).sum()),
        pixels_without_tissue=int(no_tissue.sum()), roi=roi_t, last_index=smooth,
    )


# ----------------------------------------------------------------------------- flattening
_Z_CHUNK = 32   # output slices per inner step: temporaries of one row stay within the CPU cache


def _flatten_rows(src: np.ndarray, span: np.ndarray, cap: np.ndarray, n_out: int, out: np.ndarray) -> None:
    """Resample the columns of ``src`` (z, rows, x): output slice j reads source z = j / (n_out - 1) * span.

    Source positions are clipped to ``cap`` (the last slice that shows tissue), so
    no output voxel mixes in wafer.
    """
    nz = src.shape[0]
    src = np.ascontiguousarray(src)
    flat = src.reshape(-1)
    plane = span.size
    if nz == 1:
        out[:] = src[0]
        return
    # Flat indices are built in float32 while that is exact (below 2**24), which halves the memory
    # traffic of the index arithmetic; take() then needs them as intp, its native index type.
    exact_f32 = nz * plane < 2 ** 24
    index_dtype = np.float32 if exact_f32 else np.float64
    columns = np.arange(plane, dtype=index_dtype).reshape(span.shape)
    z_all = np.arange(n_out, dtype=np.float32) * np.float32(1.0 / max(n_out - 1, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(span > 0, cap / span, np.inf)
    z_no_cap = float(ratio.min())                      # below this output z no position reaches its cap
    last_reachable = bool(cap.max() >= nz - 1)         # some column has tissue in the stack's last slice
    integer_out = np.issubdtype(out.dtype, np.integer)
    for j in range(0, n_out, _Z_CHUNK):
        z = z_all[j:j + _Z_CHUNK]
        pos = z[:, None, None] * span
        if z[-1] > z_no_cap:
            np.minimum(pos, cap, out=pos)
        lower_z = np.floor(pos).astype(index_dtype, copy=False)
        if last_reachable and z[-1] >= z_no_cap:
            np.minimum(lower_z, nz - 2, out=lower_z)    # so that lower + 1 exists; frac becomes 1 there
        np.subtract(pos, lower_z, out=pos, casting="unsafe")
        lower_z *= plane
        lower_z += columns
        i0 = lower_z.astype(np.intp)
        lower = flat.take(i0, mode="clip").astype(np.float32)
        i0 += plane
        upper = flat.take(i0, mode="clip").astype(np.float32)
        upper -= lower
        upper *= pos
        upper += lower
        if integer_out:
            np.rint(upper, out=upper)
        out[j:j + _Z_CHUNK] = upper


def flatten_stack(stack: np.ndarray, last_index: np.ndarray | None = None, *, n_out: int | None = None,
                  threshold: float = DEFAULT_WAFER_THRESHOLD, sigma_px: float = DEFAULT_SIGMA_PX,
                  median_px: int = DEFAULT_MEDIAN_PX, fill_value: float = 0, cap_index: np.ndarray | None = None,
                  workers: int | None = None) -> np.ndarray:
    """Stretch every pixel column's tissue linearly over ``n_out`` slices (default: as many as the input).

    ``last_index`` is the last slice that shows tissue per pixel (fractional, e.g.
    smoothed, is fine; NaN or negative where there is none). When it is not given it
    is found with ``threshold``, cleaned with a ``median_px`` median and smoothed with
    ``sigma_px``. The breakthrough lies
    on average half a step after the last tissue slice, so the tissue is taken to
    span ``last_index + 1/2`` steps, and source positions are clipped at
    ``cap_index`` (default: ``tissue_cap`` when computed here,
    ``last_index`` itself when given) so that wafer never leaks in. Columns without
    tissue get ``fill_value``. The output has the input's dtype (integers rounded).
    """
    stack = _check_stack(stack)
    nz, ny, nx = stack.shape
    n_out = nz if n_out is None else int(n_out)
    if n_out < 1:
        raise LimitError("output slices", n_out, 1, math.inf)
    if last_index is None:
        raw = last_tissue_index(stack, threshold)
        cleaned = clean_index(raw, median_px)
        last = smooth_index(cleaned, sigma_px)
        cap = tissue_cap(stack, raw, cleaned, threshold) if cap_index is None else cap_index
    else:
        last = np.asarray(last_index, dtype=np.float64)
        if last.shape != (ny, nx):
            raise ValueError(f"last_index has shape {last.shape}, the stack's planes are {(ny, nx)}")
        last = np.where(last < 0, np.nan, last)
        cap = last if cap_index is None else cap_index
    cap = np.asarray(cap, dtype=np.float64)
    if cap.shape != (ny, nx):
        raise ValueError(f"cap_index has shape {cap.shape}, the stack's planes are {(ny, nx)}")
    finite = last[np.isfinite(last)]
    if finite.size and finite.max() > nz - 1:
        raise ValueError(f"last_index reaches {finite.max():g}, beyond the stack's last slice {nz - 1}")
    missing = ~np.isfinite(last) | ~np.isfinite(cap) | (cap < 0)
    span = np.where(missing, 0.0, last + 0.5).astype(np.float32)
    cap32 = np.where(missing, 0.0, np.minimum(cap, nz - 1)).astype(np.float32)

    out = np.empty((n_out, ny, nx), dtype=stack.dtype)
    blocks = _row_blocks(ny, max(nz, 1) * nx)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)

    def work(rows: slice) -> None:
        _flatten_rows(stack[:, rows, :], span[rows], cap32[rows], n_out, out[:, rows, :])

    if workers <= 1 or len(blocks) == 1:
        for rows in blocks:
            work(rows)
    else:
        # numpy releases the GIL in take and in the arithmetic, so threads share the work without copies
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, blocks))
    if missing.any():
        out[:, missing] = fill_value
    return out
