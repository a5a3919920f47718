"""The estimator contract shared by the in-process estimator, the daemon and its client.

An estimator looks at an image pair taken at wd - d and wd + d around the current
setting and returns the correction to *add* to the current wd and stigmators.
``autofocus(sem, estimator)`` accepts anything that implements ``Estimator``: the
in-process CNN estimator, the ZeroMQ ``RemoteEstimator`` and the comparison
methods (MAPFoSt, sharpness sweep) alike.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np


@dataclass
class Correction:
    """Correction to add to the microscope's current setting.

    Physical parts are in the image frame (x along columns, y along rows, rows
    pointing down); stigmator parts are in the microscope's own units, converted
    once through the microscope's calibration.
    """
    wd_um: float
    astig_x_um: float
    astig_y_um: float
    stig_x: float
    stig_y: float
    uncertainty_wd_um: float = float("nan")
    uncertainty_stig: float = float("nan")
    score: float = float("nan")
    status: str = "ok"                      # "ok" | "uncertain"
    model_id: str = ""
    n_patches: int = 0
    timings_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def wd_only(self, reason: str) -> "Correction":
        """This answer with its astigmatism left for a later pair (``extra["astig_uncertain"]``, the astigmatism
        kept in ``astig_um_unapplied``): far from focus the defocus disc dwarfs the astigmatic ellipticity, so an
        answer can be sure of wd long before it is of the stigmators."""
        extra = dict(self.extra, astig_uncertain=True, astig_um_unapplied=[self.astig_x_um, self.astig_y_um],
                     reason=reason)
        return replace(self, astig_x_um=0.0, astig_y_um=0.0, stig_x=0.0, stig_y=0.0, extra=extra)

    @classmethod
    def from_dict(cls, d: dict) -> "Correction":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


# a perturbation this close to a range's end counts as inside it (set values read back rounded)
PERTURBATION_TOLERANCE = 0.02


def in_perturbation_range(perturbation_m: float, range_m) -> bool:
    """Whether ``perturbation_m`` lies within ``range_m`` (low, high), to ``PERTURBATION_TOLERANCE``."""
    lo, hi = range_m
    return math.isfinite(perturbation_m) and \
        lo * (1 - PERTURBATION_TOLERANCE) <= perturbation_m <= hi * (1 + PERTURBATION_TOLERANCE)


def answers_perturbation(estimator, perturbation_m: float) -> bool:
    """Whether ``estimator`` answers pairs at -/+ ``perturbation_m`` (its ``perturbation_range_m``; any when it
    does not say)."""
    return in_perturbation_range(perturbation_m, getattr(estimator, "perturbation_range_m", (0.0, math.inf)))


# The aperture-normalised pixel (nm) at which the pair at the model's own perturbation is read best: the thesis'
# 10 nm at its 4 mrad. A narrower beam or coarser pixels put less blur per micrometre of defocus into a pixel, and
# the pair at +-5 um then reads little of it; a pair further apart shows the model the blur it reads best
# (measured, deepfocus/README.md "Which pair the loop takes": the first correction within the margin 0.35 -> 0.90
# at 2 mrad with +-10 um, 0.20 -> 0.90 at 1.5 mrad with +-13.3 um). It never takes a closer pair: at 6 mrad
# +-3.3 um lost first corrections (0.85 -> 0.80), as a closer pair narrows the wd range the model reads.
PAIR_MODEL_PIXEL_NM = 10.0
# a far pair must be this many times further apart than the usual one to reach further than it
MIN_FAR_FACTOR = 1.5


def pair_perturbation_m(own_m: float, range_m, alpha_ref_mrad: float | None, aperture_angle_mrad: float | None,
                        pixel_size_m: float | None) -> float:
    """The perturbation (m) at which to take the pair for a model whose own is ``own_m``: larger by the factor
    that brings the aperture-normalised pixel (``pixel_size x alpha_ref / alpha``) down to PAIR_MODEL_PIXEL_NM,
    never smaller, and at most the end of ``range_m``. A beam not known is taken to be the model's reference, as
    the estimator then takes it; the model's own where the model is not aperture-normalised or the pixel size is
    not known."""
    if alpha_ref_mrad is None or pixel_size_m is None:
        return float(own_m)
    alpha = float(aperture_angle_mrad) if aperture_angle_mrad else float(alpha_ref_mrad)
    model_px_nm = pixel_size_m * 1e9 * float(alpha_ref_mrad) / alpha
    d = float(own_m) * max(1.0, model_px_nm / PAIR_MODEL_PIXEL_NM)
    return min(d, float(range_m[1])) if range_m else d


def chosen_perturbation_m(estimator, pixel_size_m: float | None) -> float:
    """The pair ``estimator`` wants on frames of ``pixel_size_m``: its ``pair_perturbation_m`` where it has one,
    else its ``perturbation_m`` (5 um when it says nothing)."""
    pick = getattr(estimator, "pair_perturbation_m", None)
    if callable(pick):
        return float(pick(pixel_size_m))
    return float(getattr(estimator, "perturbation_m", 5e-6))


def far_perturbation_m(perturbation_m: float, factor: float, range_m) -> float | None:
    """The far pair's perturbation: ``factor`` x the usual one, at most the end of ``range_m`` (any when None);
    None where it is off (factor 0) or would not be MIN_FAR_FACTOR x the usual one."""
    if factor <= 0:
        return None
    hi = float(range_m[1]) if range_m else math.inf
    far = min(perturbation_m * factor, hi)
    return far if far >= MIN_FAR_FACTOR * perturbation_m * (1 - PERTURBATION_TOLERANCE) else None


def far_pair_answered_m(far_m: float | None, perturbation_m: float, answered) -> float | None:
    """The far pair's perturbation that the estimator answers on these frames: ``far_m`` where ``answered(d)``
    holds for it, else the largest tenth of it down to MIN_FAR_FACTOR x the usual one that it holds for; None where
    none does. A pair further apart shows the model finer pixels, which it bins: on a wide beam the far pair at
    15 um bins 7.1 nm pixels 7 x 7 (10.8 mrad), and a 768 x 576 frame then holds no patch; the loop took that pair
    and ended "failed" where a far pair at 9 um was answered."""
    if far_m is None or answered(far_m):
        return far_m
    for k in range(9, 0, -1):
        d = far_m * k / 10
        if d < MIN_FAR_FACTOR * perturbation_m * (1 - PERTURBATION_TOLERANCE):
            break
        if answered(d):
            return d
    return None


class Estimator(ABC):
    """Anything that turns a defocused image pair into a correction."""

    #: the wd perturbation (m) of the estimator's own pair (+-); ``pair_perturbation_m`` may want another
    perturbation_m: float = 5e-6
    #: whether a scale error of the wd answers scales the stigmator answers alike, so that the closed loop may
    #: learn one scale (and a turn of the stigmator answers) from either and divide it out of both
    #: (``steps.StepSettings.learn_gain``)
    stig_shares_wd_scale: bool = False

    @abstractmethod
    def estimate(self, minus: np.ndarray, plus: np.ndarray, pixel_size_m: float,
                 perturbation_m: float | None = None) -> Correction:
        """Correction for a pair taken at wd - perturbation and wd + perturbation."""

    def pair_perturbation_m(self, pixel_size_m: float | None = None) -> float:
        """The perturbation (m) at which the loop takes the pair on frames of ``pixel_size_m``: its own."""
        return self.perturbation_m

    def check_frames(self, shape: tuple[int, int], pixel_size_m: float, perturbation_m: float) -> None:
        """ValueError, naming why, where pairs of frames of ``shape`` (rows, columns) and ``pixel_size_m`` taken
        at -/+ ``perturbation_m`` cannot be answered: the loop asks before it spends dose on the first pair.
        By default every scan is taken."""
