"""The in-process DeepFocus estimator: patch pairs, batched inference, consensus, uncertainty.

``model_files.load_estimator(path)`` opens a TorchScript model written by ``deepfocus train`` (its
``meta.json`` says which perturbation and patch size it was trained for). ``estimate``
crops N patch pairs at the same offsets in both images (once the frames are registered,
``deepfocus.registration``), rejects patches without
structure (a constant or pure-noise patch says nothing about focus), runs one batch,
and combines the per-patch corrections by their softmax-weighted scores. The spread
of the patch predictions around the consensus is the uncertainty.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .calibration import StigCalibration
from .contrast import contrast_ratio, equalising_maps
from .correction import Correction, Estimator, answers_perturbation, pair_perturbation_m
from .databar import scanned_region
from .features import structure_ratio
from .models import cpu_head, symmetry_averaged
from .pair_check import check_pair
from .patches import (MAX_NOISE_CORRELATION, PatchFrames, consensus, count_tiles, noise_correlation, overlaps_little,
                      patch_count, patch_offsets, tile_offsets)
from .line_offsets import remove_line_offsets_
from .registration import (BIN, MIN_FIELD_CORRELATION, bin_frame, bin_mean, binned_shift, common_field,
                           field_correlation, measure_shift)

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = MODELS_DIR / "spectral_v7.pt"
PIXEL_SIZE_RANGE_M = (0.5e-9, 200e-9)
# perturbations other than the model's, as fractions of it, that an aperture-normalised model answers
PERTURBATION_RANGE = (0.5, 3.0)
# Pixel sizes (aperture-normalised) seen in training by models whose meta.json predates
# ``model_pixel_nm_range`` (spectral_v4, v5): 7-14 nm on 2.5-5.5 mrad, alpha_ref 4 mrad.
DEFAULT_MODEL_PIXEL_RANGE_NM = (5.1, 22.4)
# The |wd| range (at the model's perturbation) of the training pairs of models whose meta.json predates
# ``wd_range_um`` (spectral_v1-v5: 34 um at 5 um)
DEFAULT_TRAINED_WD_RANGE_UM = 34.0
# Coarser than the trained range by this factor still answers to within 0.05 of scale (measured:
# model card, "Pixel sizes and perturbations"); coarser still is refused. Finer is binned into range.
MAX_COARSE_FACTOR = 1.4
# Few training pairs had pixels near the finest (3 % of v7's below 6 nm against its 4.7 nm), and there the model
# answered worse: pixels finer than this many times the finest are binned as well (4 mrad at 5 nm pixels, or 8 mrad
# at 10 nm: within the margin after one correction 0.55 unbinned, 0.85 and 1.00 binned; deepfocus/README.md,
# "Which pair the loop takes"). Not further: 3 nm pixels binned 3 x 3 answered no better than 2 x 2. Frames too
# small for this margin's binning give it up first (``_frame_sampling``).
WELL_TRAINED_FACTOR = 1.25
# a shift up to 1 / this of the patch is left in where cropping it away would leave no patch (``estimate``)
MAX_SHIFT_LEFT_IN = 32


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here: use 'cpu' or 'auto'")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from None


@dataclass
class EstimatorSettings:
    n_patches: int = 8                   # on a frame of 1024 x 768 px (in the model's pixels) or smaller
    patch_px: int | None = None          # None: the size the model was trained on (its meta.json)
    layout: str = "grid"
    seed: int = 0
    min_patches: int = 3
    min_structure: float = 3.0           # low/high-frequency power ratio; ~1 for noise or a blank frame
    max_spread_wd_um: float = 3.0        # spread allowed on top of 20 % of |wd| before the answer is "uncertain"
    max_spread_astig_um: float = 1.5
    match_contrast: bool = True          # divide out a contrast change between the two frames (deepfocus.contrast)
    max_contrast_ratio: float = 1.5      # frames differing more than this in contrast: "uncertain", not a move
    drop_databar: bool = True            # leave out drawn rows/columns at the frame's edge (deepfocus.databar)
    register: bool = True                # cut patches where the frames show the same field (deepfocus.registration)
    # registered frames whose structure correlates less than this show different fields: "uncertain" (0: no check)
    min_field_correlation: float = MIN_FIELD_CORRELATION
    remove_line_offsets: bool = True     # per-line brightness offsets out of the patches (deepfocus.line_offsets)
    bin_fine_pixels: bool = True         # pixels finer than the model saw in training: bin them into its range
    # each patch pair also answered mirrored left to right and the two answers averaged, where the model can
    # (spectral models exported since; see models/README.md, "Mirror averaging")
    mirror_average: bool = True
    # and swapped (the wd + d frame first, answers turned over), where the model has a spectral front end
    # (models.symmetry_averaged)
    swap_average: bool = True
    # A frame larger than 1024 x 768 (in the model's pixels) gets n_patches for each 1024 x 768 of its area, up to
    # max_patches: 8 patches of 256 px read a sixth of a 2048 x 1536 frame, and far from focus the first
    # correction's error is much of it the field's own structure, which more of the field averages down (from the
    # corners of the range 16 patches left 0.16 units of stigmator error after it, 8 patches 0.19; models/README.md,
    # "Larger frames")
    patches_scale_with_frame: bool = True
    max_patches: int = 16
    # An answer at least far_wd_um from focus is taken again with far_patches patch pairs (the patches already
    # answered and as many new ones as fit beside them, where the frame shows structure everywhere): far from
    # focus the answer's error is mostly the field's own structure, which more of the field averages down, and
    # near focus, where most corrections are, the cheaper count answers as well (deepfocus/README.md, "More of
    # the field far from focus"). 0 or a count no larger than n_patches: never.
    far_patches: int = 12
    far_wd_um: float = 10.0
    # far_patches grows with the frame as n_patches does, up to this: far from focus a 2048 x 1536 frame's 16 patches
    # landed 0.70 of 128 first steps from the corners within the margin, 30 patches 0.85
    far_max_patches: int = 32


class DeepFocusEstimator(Estimator):
    """CNN (or spectral-network) estimator over N patch pairs."""

    stig_shares_wd_scale = True

    def __init__(self, model: torch.nn.Module, meta: dict | None = None, calibration: StigCalibration | None = None,
                 settings: EstimatorSettings | None = None, device: str = "auto", threads: int | None = None,
                 model_id: str = "", aperture_angle_mrad: float | None = None):
        self.meta = dict(meta or {})
        # models trained on aperture-normalised features need the microscope's beam half-angle
        self.alpha_ref_mrad = self.meta.get("alpha_ref_mrad")
        self.aperture_angle_mrad = self._check_alpha(aperture_angle_mrad)
        self.settings = settings or EstimatorSettings()
        if self.settings.patch_px is None:
            self.settings = replace(self.settings, patch_px=int(self.meta.get("patch_px", 256)))
        self.calibration = calibration or StigCalibration()
        self.device = pick_device(device)
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.model = model.to(self.device).eval()
        self._symmetry_averaged: dict = {}
        self.model_id = model_id or str(self.meta.get("arch", "model"))
        self.perturbation_m = float(self.meta.get("perturbation_um", 5.0)) * 1e-6
        rng = self.meta.get("model_pixel_nm_range") or (DEFAULT_MODEL_PIXEL_RANGE_NM if self.alpha_ref_mrad else None)
        self.model_pixel_range_nm = (float(rng[0]), float(rng[1])) if rng else None
        self.trained_wd_range_um = float(self.meta.get("wd_range_um", DEFAULT_TRAINED_WD_RANGE_UM))
        self._warm_up()

    @property
    def perturbation_range_m(self) -> tuple[float, float]:
        """The perturbations this model answers: any within PERTURBATION_RANGE of its own for a model that
        reads blur in aperture-normalised pixels (see ``estimate``), its own alone otherwise."""
        if self.alpha_ref_mrad is None:
            return self.perturbation_m, self.perturbation_m
        return self.perturbation_m * PERTURBATION_RANGE[0], self.perturbation_m * PERTURBATION_RANGE[1]

    def pair_perturbation_m(self, pixel_size_m: float | None = None,
                            aperture_angle_mrad: float | None = None) -> float:
        """The pair's perturbation (m) on this beam at ``pixel_size_m`` (``correction.pair_perturbation_m``)."""
        alpha = self._check_alpha(aperture_angle_mrad) or self.aperture_angle_mrad
        return pair_perturbation_m(self.perturbation_m, self.perturbation_range_m, self.alpha_ref_mrad, alpha,
                                   pixel_size_m)

    def _warm_up(self) -> None:
        # TorchScript optimises on its first calls: pay that at load, not in the first correction
        # (the batches of the usual estimate and of the patches a far answer adds)
        s, p = self.settings, self.settings.patch_px
        for n in {s.n_patches, s.far_patches - s.n_patches}:
            if n <= 0:
                continue
            x = torch.zeros(n, 2, p, p, device=self.device)
            x[:, :, ::7, ::5] = 1.0
            try:
                with torch.no_grad():
                    for _ in range(3):
                        out = self._forward()(x, 10.0)
            except (RuntimeError, TypeError, torch.jit.Error) as exc:
                raise ValueError(f"model {self.model_id} cannot answer patch pairs of {p} px: {exc}") from None
            # a file of another kind fails here, not in the first correction
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            if got == (n, 4) and not bool(out.isfinite().all()):
                got = "non-finite values"
            if got != (n, 4):
                raise ValueError(f"model {self.model_id} answers {n} patch pairs with {got}: a DeepFocus model "
                                 f"answers ({n}, 4) finite values (wd, astigmatism x and y, score)")

    def _forward(self):
        """The model's answer for a batch of patch pairs: averaged over the pair swapped and mirrored where the
        model allows."""
        s = self.settings
        if s.swap_average:
            # kept per setting: the settings may be replaced between estimates
            key = bool(s.mirror_average)
            if key not in self._symmetry_averaged:
                head = cpu_head(self.model) if self.device.type == "cpu" and hasattr(self.model, "head") else None
                self._symmetry_averaged[key] = symmetry_averaged(self.model, mirror=key, head=head)
            if self._symmetry_averaged[key] is not None:
                return self._symmetry_averaged[key]
        if s.mirror_average and hasattr(self.model, "forward_mirror_averaged"):
            return self.model.forward_mirror_averaged
        return self.model

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_alpha(alpha_mrad: float | None) -> float | None:
        if alpha_mrad is None:
            return None
        if not (isinstance(alpha_mrad, (int, float)) and math.isfinite(alpha_mrad) and 0.3 <= alpha_mrad <= 50):
            raise ValueError(f"aperture_angle_mrad must be the beam half-angle in mrad (0.3 to 50), "
                             f"got {alpha_mrad!r}")
        return float(alpha_mrad)

    def model_pixel_size_nm(self, pixel_size_m: float, aperture_angle_mrad: float | None = None) -> float:
        """Pixel size handed to the model: scaled by alpha_ref / alpha for aperture-normalised models.

        A model without ``alpha_ref_mrad`` in its metadata sees the plain pixel size; a
        normalised model given no angle assumes the reference microscope's.
        """
        p_nm = float(pixel_size_m) * 1e9
        alpha = self._check_alpha(aperture_angle_mrad) or self.aperture_angle_mrad
        if self.alpha_ref_mrad is None or alpha is None:
            return p_nm
        return p_nm * float(self.alpha_ref_mrad) / alpha

    def sampling(self, pixel_size_m: float, perturbation_m: float | None = None,
                 aperture_angle_mrad: float | None = None) -> tuple[float, int]:
        """(pixel size handed to the model in nm, bin factor) for frames of this pixel size and perturbation.

        The blur of a pair depends on alpha |z -/+ d| alone (DESIGN.md, the defocused spot), so a pair at -/+ d
        is the model's pair at -/+ d0 on a beam of half-angle alpha d / d0: the model sees pixels d0 / d as
        large (and its answers are d0 / d of the true ones). Pixels finer than the model saw well in training
        are binned (WELL_TRAINED_FACTOR; binning keeps the blur, averages noise); much coarser ones are refused."""
        d = self.perturbation_m if perturbation_m is None else float(perturbation_m)
        m_nm = self.model_pixel_size_nm(pixel_size_m, aperture_angle_mrad) * self.perturbation_m / d
        if self.model_pixel_range_nm is None:
            return m_nm, 1
        lo, hi = self.model_pixel_range_nm
        if m_nm > hi * MAX_COARSE_FACTOR:
            raise ValueError(
                f"the model would see {m_nm:.1f} nm pixels (pixel size {pixel_size_m * 1e9:g} nm x alpha_ref / alpha "
                f"x {self.perturbation_m * 1e6:g} um / perturbation {d * 1e6:g} um) but answers up to "
                f"{hi * MAX_COARSE_FACTOR:.1f} nm: take the pair with smaller pixels or a larger perturbation")
        return m_nm, max(1, math.ceil(WELL_TRAINED_FACTOR * lo / m_nm - 1e-9))

    def _frame_sampling(self, shape: tuple[int, int], pixel_size_m: float, perturbation_m: float,
                        aperture_angle_mrad: float | None = None) -> tuple[float, int, int]:
        """(pixel size handed to the model in nm before binning, bin factor, patch px in the model's pixels) for
        frames of ``shape``; ValueError where they hold no patch. The binning is ``sampling``'s or, where the frames
        hold no patch binned that much, the most they hold that keeps the model's pixels within its trained range
        (the margin WELL_TRAINED_FACTOR is given up before the frames are: 640 x 320 px at 4.7 nm on 6.9 mrad,
        binned 3 x 3 for the margin, were refused before any frame, and 640 x 640 that registration cropped to 627
        rows ended a run after its pair)."""
        m_nm, nbin = self.sampling(pixel_size_m, perturbation_m, aperture_angle_mrad)
        if not self.settings.bin_fine_pixels:
            nbin = 1
        elif self.model_pixel_range_nm is not None:
            least = max(1, math.ceil(self.model_pixel_range_nm[0] / m_nm - 1e-9))
            while nbin > least and min(shape) // nbin < self.min_patch_px:
                nbin -= 1
        return m_nm, nbin, self._patch_px(shape, nbin, pixel_size_m)

    @property
    def min_patch_px(self) -> int:
        # Patches under half the model's are answered short: 1024 px wide strips (FlyEM 520, setup_a, 50 ns) gave
        # a 15 um step as 9-10 um at 64 of 256 px, 13.3 um at 96 px, in full from 128 px, all with small spreads
        return max(64, self.settings.patch_px // 2)

    def _patch_px(self, shape: tuple[int, int], nbin: int, pixel_size_m: float) -> int:
        """The patch size (model pixels) frames of ``shape`` give binned ``nbin`` x ``nbin``; too small: ValueError."""
        patch = min(self.settings.patch_px, min(shape) // nbin)
        if patch < self.min_patch_px:
            raise ValueError(f"frames of {shape[1]} x {shape[0]} px at {pixel_size_m * 1e9:g} nm"
                             f"{f' (binned {nbin} x {nbin} for this model)' if nbin > 1 else ''} are too small: need "
                             f"at least {self.min_patch_px * nbin} px per side")
        return patch

    def check_frames(self, shape: tuple[int, int], pixel_size_m: float, perturbation_m: float) -> None:
        d = self._check(shape, pixel_size_m, perturbation_m)
        self._frame_sampling(shape, pixel_size_m, d)

    def _check(self, shape: tuple[int, int], pixel_size_m: float, perturbation_m: float | None) -> float:
        lo, hi = PIXEL_SIZE_RANGE_M
        # any real number (numpy's float32 too); the ends with slack (200 nm is 2.0000000000000002e-07 m)
        if not (isinstance(pixel_size_m, numbers.Real) and not isinstance(pixel_size_m, (bool, np.bool_))
                and math.isfinite(pixel_size_m) and lo * (1 - 1e-9) <= pixel_size_m <= hi * (1 + 1e-9)):
            raise ValueError(f"pixel_size_m must be in metres between {lo:g} and {hi:g} (e.g. 10e-9), "
                             f"got {pixel_size_m!r}")
        d = self.perturbation_m if perturbation_m is None else float(perturbation_m)
        if not answers_perturbation(self, d):
            lo_d, hi_d = self.perturbation_range_m
            took = (f"pairs at wd -/+ {lo_d * 1e6:g} to {hi_d * 1e6:g} um" if hi_d > lo_d
                    else f"only pairs at wd -/+ {lo_d * 1e6:g} um (it was trained for them)")
            raise ValueError(f"model {self.model_id} answers {took}, got perturbation {d * 1e6:g} um "
                             "(perturbation_m is in metres)")
        if min(shape) < self.min_patch_px:
            raise ValueError(f"frames of {shape[1]} x {shape[0]} px are too small: need at least "
                             f"{self.min_patch_px} px per side")
        return d

    # ------------------------------------------------------------------ estimate
    def estimate(self, minus: np.ndarray, plus: np.ndarray, pixel_size_m: float,
                 perturbation_m: float | None = None, aperture_angle_mrad: float | None = None) -> Correction:
        t0 = time.perf_counter()
        a, b, scale, off = check_pair(minus, plus)
        d = self._check(a.shape, pixel_size_m, perturbation_m)
        region = scanned_region(a, b) if self.settings.drop_databar else None
        if region is not None and region.any_dropped:
            a, b = a[region.rows, region.cols], b[region.rows, region.cols]
            self._check(a.shape, pixel_size_m, perturbation_m)
        s = self.settings
        # each frame binned once for registration, the contrast measurement and the same-field check
        binned = bin_frame(a), bin_frame(b)
        shift = measure_shift(a, b, binned) if s.register else None
        uncropped = False
        if shift is not None and shift.any:
            ca, cb = common_field(a, b, shift)
            try:
                model_px_nm, nbin, patch = self._frame_sampling(ca.shape, pixel_size_m, d, aperture_angle_mrad)
            except ValueError as exc:
                # the frames held a patch and the field they share does not: the image moved between the scans. A
                # shift small against the patch is left in (4 px on 256 px patches: wd MAE 0.18 against 0.17 um
                # registered; 24 px: 0.43), so frames cut to the patch size do not fail on a pixel of drift
                model_px_nm, nbin, patch = self._frame_sampling(a.shape, pixel_size_m, d, aperture_angle_mrad)
                if max(abs(shift.dy_px), abs(shift.dx_px)) * MAX_SHIFT_LEFT_IN > patch * nbin:
                    return self._uncertain(
                        f"the image moved {shift.dy_px}, {shift.dx_px} px (rows, columns) between the two frames, and "
                        f"the field they share is too small: {exc}; let the image settle or take larger frames",
                        {"total": time.perf_counter() - t0}, 0)
                uncropped = True
            else:
                a, b = ca, cb
                binned = common_field(*binned, binned_shift(shift))
        else:
            model_px_nm, nbin, patch = self._frame_sampling(a.shape, pixel_size_m, d, aperture_angle_mrad)
        d_ratio = d / self.perturbation_m          # answers come back d0 / d too small (see ``sampling``)
        model_px_nm *= nbin
        src = patch * nbin
        # identical crops (a frame no larger than one patch) carry no independent information
        n = patch_count(a.shape, nbin, s.n_patches, s.patches_scale_with_frame, s.max_patches)
        frames = PatchFrames(a, b, nbin)
        offs = list(dict.fromkeys(patch_offsets(a.shape, src, n, s.layout, s.seed)))
        cr = contrast_ratio(a, b, pixel_size_m, binned) if s.match_contrast else None
        maps = ((scale, off), (scale, off))
        if cr is not None and cr.ratio is not None and 1 / s.max_contrast_ratio <= cr.ratio <= s.max_contrast_ratio:
            maps = equalising_maps(cr.applied, cr.mean_minus, cr.mean_plus, scale, off)
        x, lined = self._cut(frames, offs, patch, maps)
        valid = self._structured(x, lined)
        # a frame too small for min_patches patches side by side checks their agreement on tiles (below)
        small = count_tiles(a.shape, src) < s.min_patches
        filled = 0
        if not small and valid.sum() < len(offs):
            x, valid, filled = self._fill_up(frames, offs, x, valid, patch, maps, binned)
        t1 = time.perf_counter()
        need = 1 if small else s.min_patches
        if valid.sum() < need:
            return self._uncertain(f"only {int(valid.sum())} of {len(offs)} patches show structure "
                                   f"(need {need}): constant, blank or noise-only image",
                                   {"prepare": t1 - t0, "total": time.perf_counter() - t0}, int(valid.sum()))
        nc = noise_correlation(x)
        if nc > MAX_NOISE_CORRELATION:          # two scans never share their noise: one frame passed twice
            return self._uncertain(f"the two images are copies of one frame (their pixel noise agrees: correlation "
                                   f"{nc:.3f}): pass the frame taken at wd - d and the one at wd + d",
                                   {"total": time.perf_counter() - t0}, int(valid.sum()))
        extra: dict = {"databar_px": list(region.dropped_px)} if region is not None and region.any_dropped else {}
        if s.min_field_correlation > 0:
            fc = field_correlation(a, b, binned)
            if math.isfinite(fc):
                extra["field_correlation"] = round(fc, 3)
                if fc < s.min_field_correlation:
                    # moved by more than registration finds (a quarter of the frame): patches at equal offsets
                    # would compare different specimen and answer several micrometres off
                    return self._uncertain(
                        f"the two frames do not show the same field (structure correlates {fc:.2f}, need "
                        f"{s.min_field_correlation:g}): the stage or the image moved between them by more than a "
                        "quarter of the frame; take the pair again once the stage has settled",
                        {"total": time.perf_counter() - t0}, int(valid.sum()), extra)
        if shift is not None and shift.any:
            extra["shift_px_left_in" if uncropped else "shift_px"] = [shift.dy_px, shift.dx_px]
        if nbin > 1:
            extra["binned"] = nbin
        if lined.any():
            extra["line_offsets_removed"] = int(lined.sum())
        if filled:
            extra["patches_moved_to_structure"] = filled
        if cr is not None and cr.ratio is not None:
            extra["contrast_ratio"] = round(cr.ratio, 4)
            # what was divided out: the ratio shrunk towards 1 by its own noise (deepfocus.contrast)
            extra["contrast_ratio_applied"] = round(cr.applied, 4)
            if not 1 / s.max_contrast_ratio <= cr.ratio <= s.max_contrast_ratio:
                return self._uncertain(
                    f"the wd + d frame has {cr.ratio:.2f} x the contrast of the wd - d frame on micrometre "
                    "scales, which defocus does not change: charging, a gain change or automatic "
                    "brightness/contrast between the frames", {"total": time.perf_counter() - t0},
                    int(valid.sum()), extra)
        pred = self._infer(x, valid, model_px_nm, d_ratio)
        if not np.isfinite(pred).all():
            return self._uncertain(f"model {self.model_id} answered non-finite values for these frames",
                                   {"total": time.perf_counter() - t0}, int(valid.sum()), extra)
        mean, spread = consensus(pred)
        if not small and not filled and abs(mean[0]) >= s.far_wd_um:
            more = self._far_patches(frames, offs, patch, maps, model_px_nm, d_ratio)
            if more is not None:
                pred = np.concatenate([pred, more])
                mean, spread = consensus(pred)
                extra["far_patches_added"] = len(more)
        if small:
            # Fewer than min_patches patches fit side by side: the crops overlap, see mostly the same pixels
            # and agree whatever the error (measured: at 384 x 384 px the spread was 0.4 x the error, at
            # 256 x 256 zero). Their agreement is measured instead on half-size tiles that do not overlap;
            # each tile answers less precisely than a whole patch, so this spread errs on the safe side.
            half = patch // 2
            tiles = tile_offsets(a.shape, half * nbin, s.n_patches) if half >= 64 else []
            xt, lined_t = self._cut(frames, tiles, half, maps) if tiles else (None, None)
            valid_t = self._structured(xt, lined_t) if xt is not None else np.zeros(0, bool)
            if valid_t.sum() < s.min_patches:
                return self._uncertain(
                    f"a frame of {a.shape[1]} x {a.shape[0]} px holds too few patches side by side to check that "
                    f"they agree (need {s.min_patches} of {max(half, 64) * nbin} px with structure): take a larger "
                    "frame", {"total": time.perf_counter() - t0}, int(valid.sum()), extra)
            spread = np.maximum(spread, consensus(self._infer(xt, valid_t, model_px_nm, d_ratio))[1])
            extra["spread_from_tiles"] = [int(valid_t.sum()), half * nbin]
        t2 = time.perf_counter()
        unc_stig = float(np.linalg.norm(self.calibration.matrix, 2) * math.hypot(spread[1], spread[2]))
        status = "ok"
        ax, ay = float(mean[1]), float(mean[2])
        astig_spread = math.hypot(spread[1], spread[2])
        wd_only = ""
        if spread[0] > s.max_spread_wd_um + 0.2 * abs(mean[0]):
            status = "uncertain"
            # machine-readable: far from focus a pair at a larger perturbation may still answer (autofocus)
            extra["wd_uncertain"] = True
            extra["reason"] = f"patches disagree on wd by {spread[0]:.2f} um"
        elif astig_spread > s.max_spread_astig_um + 0.2 * math.hypot(ax, ay):
            # the patches agree on wd long before they agree on astigmatism: the wd step alone rather than nothing
            # (the astigmatism is measured again closer to focus)
            wd_only = f"patches disagree on astigmatism by {astig_spread:.2f} um: wd only"
        if abs(mean[0]) > self.trained_wd_range_um * d_ratio:
            # The pair looks like one further from focus than any in training (it is read as a pair at the
            # model's perturbation): answers there come back short of the truth, by a factor that depends on the
            # distance (a +-3 um pair 29 um from focus answered 0.79 of the way), so the loop learns no scale from
            # them (``steps``).
            extra["beyond_trained_wd_um"] = round(self.trained_wd_range_um * d_ratio, 2)
        sx, sy = self.calibration.units(ax, ay)
        answer = Correction(wd_um=float(mean[0]), astig_x_um=ax, astig_y_um=ay,
                            stig_x=sx, stig_y=sy, uncertainty_wd_um=float(spread[0]), uncertainty_stig=unc_stig,
                            score=float(pred[:, 3].mean()), status=status, model_id=self.model_id,
                            n_patches=len(pred),           # the answers of the patches with structure
                            timings_s={"prepare": t1 - t0, "inference": t2 - t1, "total": time.perf_counter() - t0},
                            extra=extra)
        return answer.wd_only(wd_only) if wd_only else answer

    def _cut(self, frames: PatchFrames, offs: list[tuple[int, int]], patch: int,
             maps) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch pairs at ``offs`` (``patch`` px in the model's pixels), scaled, contrast-matched and with line
        offsets removed; and which patches (N, 2) had line offsets removed."""
        # scaled and contrast-matched in place: at these sizes every extra pass over the patches costs as much as
        # the registration
        pairs = frames.cut(offs, patch)
        x = torch.from_numpy(pairs)
        for k, (gain, offset) in enumerate(maps):
            x[:, k].mul_(gain).sub_(offset)
        if self.settings.remove_line_offsets:
            return x, remove_line_offsets_(x)
        return x, torch.zeros(x.shape[:2], dtype=torch.bool)

    def _far_patches(self, frames: PatchFrames, offs: list[tuple[int, int]], patch: int, maps, model_px_nm: float,
                     d_ratio: float) -> np.ndarray | None:
        """Answers of the patch pairs that the far_patches grid adds to the ``offs`` already answered (those
        overlapping them by at most MAX_PATCH_OVERLAP and showing structure); None where it adds none. On a
        1024 x 768 frame the 8-patch grid leaves out the middle band that the 12-patch grid covers."""
        s = self.settings
        nbin = frames.nbin
        n = patch_count(frames.shape, nbin, s.far_patches, s.patches_scale_with_frame, s.far_max_patches) \
            if s.far_patches else 0
        if n <= len(offs):
            return None
        src = patch * nbin
        taken = list(offs)
        new = []
        for o in patch_offsets(frames.shape, src, n, s.layout, s.seed):
            if overlaps_little(o, taken, src):          # also false for a patch already answered
                new.append(o)
                taken.append(o)
        if not new:
            return None
        x, lined = self._cut(frames, new, patch, maps)
        valid = self._structured(x, lined)
        return self._infer(x, valid, model_px_nm, d_ratio) if valid.any() else None

    def _structure(self, x: torch.Tensor, lined: torch.Tensor | None = None) -> np.ndarray:
        """Per patch pair, the least low/high-frequency power ratio (~1: noise only) of its frames' quadrants;
        ``lined`` (N, 2): patches that had line offsets removed, read without the fx = 0 column where their smooth
        remainder stays (``features.structure_ratio``)."""
        # the structure test runs on BIN x BIN (4 x 4) binned patches: binning keeps noise white and texture
        # coloured; bin_mean's two 2 x 2 steps took 0.19 against 0.64 ms for avg_pool2d on 8 pairs of 256 px
        n, patch = x.shape[0], x.shape[-1]
        xb = torch.from_numpy(np.stack([bin_mean(p, BIN) for p in x.numpy().reshape(2 * n, patch, patch)]))
        per = lined.reshape(2 * n) if lined is not None else None
        q = patch // 8
        if q >= 16:
            # Quadrant by quadrant: a patch mostly on blank ground (resin, a vessel, wafer milled bare) still
            # passes as a whole through the edge it holds, and such patches answered wd 6 um off on average
            # (tissue patches 0.3 um), enough to move the consensus. No quadrant may be noise only.
            # (a patch whose side is no multiple of 8, as the frame's short side or a registration crop can make
            # it, leaves a binned row and column out of the quadrants)
            xb = xb[:, :2 * q, :2 * q].reshape(2 * n, 2, q, 2, q).permute(0, 1, 3, 2, 4).reshape(8 * n, q, q)
            per = per.repeat_interleave(4) if per is not None else None
        with torch.no_grad():
            return structure_ratio(xb, per).reshape(n, -1).min(dim=1).values.numpy()

    def _structured(self, x: torch.Tensor, lined: torch.Tensor | None = None) -> np.ndarray:
        """Which patch pairs show structure in both frames."""
        return self._structure(x, lined) > self.settings.min_structure

    def _fill_up(self, frames: PatchFrames, offs: list[tuple[int, int]], x: torch.Tensor, valid: np.ndarray,
                 patch: int, maps, binned: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, np.ndarray, int]:
        """Patches that fell on blank ground (resin, a vessel, wafer milled bare) replaced by patches where the
        frame shows structure, so that part-blank frames are still answered from n_patches patches.

        Candidates lie on a grid of a quarter patch (``_structure_map``: each scored from the frames binned for
        registration, at no cost worth the name); where the patch is too small for that map, two tilings of the
        frame, the second shifted by half a patch. A candidate may overlap the patches already kept by at most a
        quarter of its area, since overlapping crops see the same pixels and would agree whatever the error (see
        the small-frame note in ``estimate``). The most structured are cut and tested as the grid's patches are.
        A frame with structure everywhere never gets here and keeps its grid.
        """
        nbin, shape = frames.nbin, frames.shape
        src = patch * nbin
        kept = [o for o, v in zip(offs, valid) if v]

        scored = self._structure_map(binned, patch, nbin)
        if scored is not None:
            # Half-patch tilings fit a band of tissue narrower than two patches only where the band happens to
            # lie (three quarters of FlyEM 520 blank: 4 of 20 starts "uncertain", 2 structured patches found);
            # quarter-patch steps fit it nearly anywhere. Twice the patches missing are cut, as spares.
            step = (patch // 16) * BIN * nbin          # a quarter patch, in frame pixels
            score, want, cand = scored, 2 * (len(offs) - len(kept)), []
            for flat in np.argsort(-score, axis=None):
                i, j = np.unravel_index(flat, score.shape)
                if score[i, j] <= self.settings.min_structure or len(cand) >= want:
                    break
                o = (int(i) * step, int(j) * step)
                inside = o[0] + src <= shape[0] and o[1] + src <= shape[1]
                if inside and o not in offs and overlaps_little(o, kept + cand, src):
                    cand.append(o)
        else:
            half = src // 2
            # the shifted tiling lies inside the frame less half a patch, so it stays inside the frame
            shifted = [(y + half, x0 + half) for y, x0 in tile_offsets((shape[0] - half, shape[1] - half), src)]
            # only candidates the kept grid patches leave room for are cut and tested
            cand = [o for o in dict.fromkeys(tile_offsets(shape, src) + shifted)
                    if o not in offs and overlaps_little(o, kept, src)]
        if not cand:
            return x, valid, 0
        xc, lined_c = self._cut(frames, cand, patch, maps)
        sc = self._structure(xc, lined_c)
        added: list[int] = []
        for i in np.argsort(-sc):
            if sc[i] <= self.settings.min_structure or len(kept) >= len(offs):
                break
            if overlaps_little(cand[i], kept, src):
                kept.append(cand[i])
                added.append(int(i))
        if not added:
            return x, valid, 0
        x = torch.cat([x[torch.from_numpy(valid)], xc[added]])
        return x, np.ones(len(x), bool), len(added)

    def _structure_map(self, binned: tuple[np.ndarray, np.ndarray], patch: int, nbin: int) -> np.ndarray | None:
        """For patches of ``patch`` model pixels (``patch * nbin`` frame pixels) at every quarter-patch step of the
        frame, the least structure ratio of their quadrants in both frames, as ``_structure`` measures it, read
        from the frames binned for registration ([i, j]: the patch at (i, j) quarter patches); None where the
        patch is too small for quadrants of 16 binned pixels."""
        if patch % 16 or patch // 8 < 16:
            return None
        t = torch.from_numpy(np.stack(binned).astype(np.float32, copy=False))
        if nbin > 1:
            t = torch.nn.functional.avg_pool2d(t[:, None], nbin)[:, 0]
        # in these pixels (BIN x nbin frame pixels; BIN is 4 as _structure's pooling) a patch is patch / 4 wide, a
        # quadrant patch / 8, a step patch / 16
        quad, step = patch // 8, patch // 16
        if t.shape[1] < 2 * quad or t.shape[2] < 2 * quad:
            return None
        blocks = t.unfold(1, quad, step).unfold(2, quad, step)
        rows, cols = blocks.shape[1], blocks.shape[2]
        with torch.no_grad():
            r = structure_ratio(blocks.reshape(-1, quad, quad)).reshape(2, rows, cols).min(dim=0).values.numpy()
        # a patch's quadrants are two steps apart
        return np.minimum.reduce([r[:-2, :-2], r[2:, :-2], r[:-2, 2:], r[2:, 2:]])

    def _infer(self, x: torch.Tensor, valid: np.ndarray, model_px_nm: float, d_ratio: float) -> np.ndarray:
        """Per-patch (wd, ax, ay in um at the pair's perturbation; score) of the structured patches."""
        # all patches valid (the usual case): no copy of the batch (half a millisecond for 8 patch pairs)
        batch = x if valid.all() else x[torch.from_numpy(valid)]
        with torch.no_grad():
            out = self._forward()(batch.to(self.device), model_px_nm).float().cpu()
        pred = out.numpy().astype(np.float64)
        pred[:, :3] *= d_ratio
        return pred

    def _uncertain(self, reason: str, timings: dict, n: int, extra: dict | None = None) -> Correction:
        return Correction(wd_um=0.0, astig_x_um=0.0, astig_y_um=0.0, stig_x=0.0, stig_y=0.0,
                          uncertainty_wd_um=float("inf"), uncertainty_stig=float("inf"), status="uncertain",
                          model_id=self.model_id, n_patches=n, timings_s=timings,
                          extra=dict(extra or {}, reason=reason))
