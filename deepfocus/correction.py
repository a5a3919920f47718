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
from dataclasses import asdict, dataclass, field
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


class Estimator(ABC):
    """Anything that turns a defocused image pair into a correction."""

    #: the wd perturbation (m) the estimator wants the pair taken at (+-)
    perturbation_m: float = 5e-6
    #: whether a scale error of the wd answers scales the stigmator answers alike, so that the closed loop may
    #: learn one scale (and a turn of the stigmator answers) from either and divide it out of both
    #: (``steps.StepSettings.learn_gain``)
    stig_shares_wd_scale: bool = False

    @abstractmethod
    def estimate(self, minus: np.ndarray, plus: np.ndarray, pixel_size_m: float,
                 perturbation_m: float | None = None) -> Correction:
        """Correction for a pair taken at wd - perturbation and wd + perturbation."""
