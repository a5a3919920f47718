"""Render frames at aberrations given relative to the true best focus, and write them as files.

Used by ``gcibsem sim-grab`` and ``gcibsem sim-series``: the way people and tools
outside the code inspect what the simulated microscope produces.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from ..factory import Microscope
from ..sem import Frame


@dataclass(frozen=True)
class AberrationRequest:
    wd_offset_um: float = 0.0
    stig_offset: tuple[float, float] = (0.0, 0.0)


def set_relative_aberration(scope: Microscope, wd_offset_um: float, stig_offset: tuple[float, float]) -> None:
    """Set wd and stigmators to the true best focus plus the given offsets.

    The objective lens has play (hysteresis), so the lens is approached from
    below, as a microscopist normalises a lens: the effective focus then lands on
    the requested offset exactly.
    """
    sim = scope.sim
    h = scope.config.optics.hysteresis_um * 1e-6
    target = sim.true_wd_m() + wd_offset_um * 1e-6
    sem = scope.sem
    cur = sem.get_wd_m()
    below = target - 2 * h - 1e-9
    # walk in steps the SEM accepts (it refuses single jumps above its step limit)
    for goal in (below, target + h):
        while abs(goal - cur) > sem.limits.wd_step_max_m:
            cur += math.copysign(sem.limits.wd_step_max_m, goal - cur)
            sem.set_wd_m(cur)
        sem.set_wd_m(goal)
        cur = goal
    sx, sy = sim.true_stig()
    sem.set_stig(sx + stig_offset[0], sy + stig_offset[1])


def frame_record(frame: Frame) -> dict:
    """What a frame's file records about it (settings and, on the simulator, the truth)."""
    s = frame.scan
    return {
        "pixel_size_m": s.pixel_size_m, "width_px": s.width_px, "height_px": s.height_px, "dwell_s": s.dwell_s,
        "scan_rotation_deg": s.rotation_deg, "wd_m": frame.wd_m, "stig": list(frame.stig),
        "beam_current_a": frame.beam_current_a, "timestamp_s": frame.timestamp_s, "duration_s": frame.duration_s,
        "dose_e_per_nm2": frame.dose_e_per_nm2, **{k: v for k, v in frame.metadata.items()},
    }


def write_frame_tiff(path: Path, frame: Frame, profile: str) -> None:
    """A TIFF with the pixel size in its resolution tags and a JSON description with the settings and truth."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"profile": profile, **frame_record(frame)}
    px_per_cm = 1e-2 / frame.scan.pixel_size_m
    tifffile.imwrite(path, frame.image, description=json.dumps(record), resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER", metadata=None)


def write_series(out_dir: Path, frames: list[Frame], labels: list[str], profile: str) -> dict[str, Path]:
    """The series as one OME-TIFF stack, a JSON record per plane, and a PNG contact sheet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stack = np.stack([f.image for f in frames])
    p_um = frames[0].scan.pixel_size_m * 1e6
    tif_path = out_dir / "series.ome.tif"
    tifffile.imwrite(tif_path, stack, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": p_um, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": p_um, "PhysicalSizeYUnit": "µm",
                               "Description": f"simulated {profile} series: " + "; ".join(labels)})
    json_path = out_dir / "series.json"
    json_path.write_text(json.dumps({"profile": profile,
                                     "planes": [{"label": lab, **frame_record(f)} for lab, f in zip(labels, frames)]},
                                    indent=1))
    png_path = out_dir / "contact_sheet.png"
    cv2.imwrite(str(png_path), contact_sheet(frames, labels))
    return {"tiff": tif_path, "json": json_path, "png": png_path}


def contact_sheet(frames: list[Frame], labels: list[str], tile_px: int = 320, cols: int = 5) -> np.ndarray:
    """Centre crops at full resolution (blur must stay visible), labelled, on a grid."""
    rows = int(math.ceil(len(frames) / cols))
    sheet = np.full((rows * (tile_px + 24), cols * tile_px), 255, np.uint8)
    for n, (f, lab) in enumerate(zip(frames, labels)):
        img = f.image.astype(np.float32)
        h, w = img.shape
        c = img[max((h - tile_px) // 2, 0):max((h - tile_px) // 2, 0) + tile_px,
                max((w - tile_px) // 2, 0):max((w - tile_px) // 2, 0) + tile_px]
        lo, hi = np.percentile(img, [0.5, 99.5])
        c8 = np.clip((c - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
        if c8.shape != (tile_px, tile_px):
            c8 = cv2.resize(c8, (tile_px, tile_px), interpolation=cv2.INTER_NEAREST)
        r, col = divmod(n, cols)
        y0 = r * (tile_px + 24)
        sheet[y0 + 24:y0 + 24 + tile_px, col * tile_px:(col + 1) * tile_px] = c8
        cv2.putText(sheet, lab, (col * tile_px + 4, y0 + 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 0, 1, cv2.LINE_AA)
    return sheet
