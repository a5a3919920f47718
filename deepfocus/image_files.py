"""Image files as microscopes and their software save them: the grey frame, and the pixel size they record.

``read_image`` takes TIFF (tifffile, else Pillow), PNG, JPEG and ``.npy``; grey saved as RGB(A), a leading single
page axis and palette images are read as the grey frame they hold. ``recorded_pixel_size_m`` reads what a TIFF says
its pixels are, where its writer recorded it: OME-TIFF (PhysicalSizeX), Zeiss SmartSEM (the CZ_SEM tag's
"Image Pixel Size") and FEI / Thermo Fisher ([Scan] PixelWidth). The estimator's answer scales with the pixel size it
is given, so ``deepfocus predict`` compares the two.
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


def recorded_pixel_size_m(path: str | Path) -> tuple[float, str] | None:
    """(pixel size in m, where it was read) as the TIFF at ``path`` records it; None for other files, TIFFs that
    record none, and files that cannot be read (``read_image`` says why)."""
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        from hardware.sim.specimen import ome_pixel_size_m
        with tifffile.TiffFile(path) as tif:
            ome = ome_pixel_size_m(tif)
            if ome:
                return ome, "OME metadata"
            sem = tif.sem_metadata or {}
            # ("Image Pixel Size", 2.233, "nm"); older SmartSEM versions write AP_PIXEL_SIZE instead
            for zeiss in (sem.get("ap_image_pixel_size"), sem.get("ap_pixel_size")):
                if zeiss and len(zeiss) >= 3 and zeiss[2] in _UNITS_M and float(zeiss[1]) > 0:
                    return float(zeiss[1]) * _UNITS_M[zeiss[2]], "Zeiss SEM metadata"
            fei = ((tif.fei_metadata or {}).get("Scan") or {}).get("PixelWidth")
            if fei and float(fei) > 0:
                return float(fei), "FEI / Thermo Fisher metadata"
    except (ImportError, OSError, ValueError, TypeError, KeyError, IndexError):
        return None
    return None
