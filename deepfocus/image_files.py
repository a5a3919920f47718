"""Image files as microscopes and their software save them: the grey frame, and the pixel size and working distance
they record.

``read_image`` takes TIFF (tifffile, else Pillow), PNG, JPEG and ``.npy``; grey saved as RGB(A), a leading single
page axis and palette images are read as the grey frame they hold. ``recorded_pixel_size_m`` reads what a TIFF says
its pixels are, where its writer recorded it: OME-TIFF (PhysicalSizeX), Zeiss SmartSEM (the CZ_SEM tag's
"Image Pixel Size") and FEI / Thermo Fisher ([Scan] PixelWidth). The estimator's answer scales with the pixel size it
is given, so ``deepfocus predict`` compares the two. ``recorded_wd_m`` reads the working distance a Zeiss or FEI /
Thermo Fisher TIFF records: the order of a pair's frames is the one thing about it the images cannot tell.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

_UNITS_M = {"pm": 1e-12, "nm": 1e-9, "µm": 1e-6, "um": 1e-6, "mm": 1e-3, "m": 1.0}


def read_image(path: str | Path) -> np.ndarray:
    """A 2-D image from TIFF (tifffile or Pillow), PNG or ``.npy``, in its stored dtype."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"{path} is a directory, not an image file")
    if not path.is_file():
        raise OSError(f"image file {path} does not exist")
    try:
        img = _read(path)
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        # the readers' own messages ("corrupted IFD structure", "failed to read 1572864 bytes") name no file
        raise ValueError(f"cannot read image file {path}: {exc or type(exc).__name__}") from None
    # a single page saved with a leading axis (1, H, W), as some acquisition tools write it
    while img.ndim > 2 and img.shape[0] == 1:
        img = img[0]
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        rgb = img[..., :3]
        if not (rgb == rgb[..., :1]).all():
            raise ValueError(f"{str(path)!r} is a colour image: give the detector's grey image")
        img = rgb[..., 0]                   # grey some software saved as RGB(A)
    if img.ndim != 2:
        raise ValueError(f"{str(path)!r}: expected a single grey image, got shape {img.shape}")
    return img


def _read(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.asarray(np.load(path, allow_pickle=False))
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            pass
        else:
            return np.asarray(tifffile.imread(path))
    from PIL import Image

    with Image.open(path) as im:
        # a palette image's pixels are indices into its palette, not grey levels
        return np.asarray(im.convert("RGB") if im.mode == "P" else im)


def _tiff_metadata(path: str | Path):
    """(OME pixel size in m or None, Zeiss SmartSEM dict, FEI / Thermo Fisher dict) of a TIFF; None for other files
    and files that cannot be read (``read_image`` says why)."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        from hardware.sim.specimen import ome_pixel_size_m
        with tifffile.TiffFile(path) as tif:
            return ome_pixel_size_m(tif), tif.sem_metadata or {}, tif.fei_metadata or {}
    except (ImportError, OSError, ValueError, TypeError, KeyError, IndexError):
        return None


def _zeiss_length_m(sem: dict, *keys: str) -> float | None:
    # a SmartSEM entry reads ("Image Pixel Size", 2.233, "nm")
    for key in keys:
        v = sem.get(key)
        try:
            if v and len(v) >= 3 and v[2] in _UNITS_M and float(v[1]) > 0:
                return float(v[1]) * _UNITS_M[v[2]]
        except (TypeError, ValueError):
            continue
    return None


def _fei_value(fei: dict, section: str, key: str) -> float | None:
    try:
        v = float((fei.get(section) or {}).get(key))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def recorded_pixel_size_m(path: str | Path) -> tuple[float, str] | None:
    """(pixel size in m, where it was read) as the TIFF at ``path`` records it; None for other files, TIFFs that
    record none, and files that cannot be read (``read_image`` says why)."""
    meta = _tiff_metadata(path)
    if meta is None:
        return None
    ome, sem, fei = meta
    if ome:
        return ome, "OME metadata"
    # older SmartSEM versions write AP_PIXEL_SIZE instead
    zeiss = _zeiss_length_m(sem, "ap_image_pixel_size", "ap_pixel_size")
    if zeiss:
        return zeiss, "Zeiss SEM metadata"
    width = _fei_value(fei, "Scan", "PixelWidth")
    return (width, "FEI / Thermo Fisher metadata") if width else None


def recorded_wd_m(path: str | Path) -> tuple[float, str] | None:
    """(working distance in m, where it was read) as a Zeiss SmartSEM (AP_WD) or FEI / Thermo Fisher ([EBeam] WD)
    TIFF records it; None for other files and TIFFs that record none. The stage's own "WorkingDistance" is not the
    lens's and is not read."""
    meta = _tiff_metadata(path)
    if meta is None:
        return None
    _, sem, fei = meta
    zeiss = _zeiss_length_m(sem, "ap_wd")
    if zeiss:
        return zeiss, "Zeiss SEM metadata"
    wd = _fei_value(fei, "EBeam", "WD")
    return (wd, "FEI / Thermo Fisher metadata") if wd else None


def recorded_pair_note(minus_path: str | Path, plus_path: str | Path, perturbation_m: float | None) -> str | None:
    """What the two files of a pair record of their working distances, against how they are passed.

    Raises ValueError where the frame passed as taken at wd - d records a larger wd than the one passed as taken at
    wd + d: swapped, the pair answers the opposite correction, as sure as the right one, so nothing in the images
    can tell. Returns a note where they record a pair further or closer apart than ``perturbation_m`` (the answer
    scales with it); None where they agree, or where either file records no wd."""
    a, b = recorded_wd_m(minus_path), recorded_wd_m(plus_path)
    if a is None or b is None:
        return None
    if a[0] > b[0]:
        raise ValueError(f"{minus_path} records wd {a[0] * 1e3:.4f} mm and {plus_path} {b[0] * 1e3:.4f} mm "
                         f"({a[1]}): the first image is the frame taken at wd - d, the second at wd + d; pass them "
                         "the other way round (swapped, the pair answers the opposite correction)")
    half = (b[0] - a[0]) / 2
    # metadata rounded to the micrometre moves a 5 um half-difference by up to 1 um
    if perturbation_m is None or half == 0 or abs(half - perturbation_m) <= max(0.25 * perturbation_m, 1e-6):
        return None
    return (f"{minus_path} and {plus_path} record wd {a[0] * 1e3:.4f} and {b[0] * 1e3:.4f} mm ({a[1]}): a pair at "
            f"wd -/+ {half * 1e6:.3g} um, taken here as -/+ {perturbation_m * 1e6:.3g} um; the answer scales with "
            f"the perturbation: give --perturbation-um {half * 1e6:.3g} if the pair was taken so")


def recorded_pixel_size_note(path: str | Path, pixel_size_nm: float) -> str | None:
    """A note where the file records another pixel size than the one given: the answer scales with the pixel size,
    and a slip there is silent."""
    rec = recorded_pixel_size_m(path)
    if rec is None or abs(rec[0] * 1e9 / pixel_size_nm - 1) <= 0.02:
        return None
    return (f"{path} records {rec[0] * 1e9:.4g} nm pixels ({rec[1]}), --pixel-size-nm gives {pixel_size_nm:g}: the "
            "answer scales with the pixel size; give the one the frames were taken at")


def recorded_notes(minus_path: str | Path, plus_path: str | Path, pixel_size_nm: float,
                   perturbation_m: float | None) -> list[str]:
    """``recorded_pixel_size_note`` and ``recorded_pair_note`` for a pair of files (ValueError: frames swapped)."""
    notes = [recorded_pixel_size_note(minus_path, pixel_size_nm),
             recorded_pair_note(minus_path, plus_path, perturbation_m)]
    return [n for n in notes if n]
