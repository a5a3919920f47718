"""Shared fixtures: where the shared data lives, and small simulated microscopes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$GCIBSEM_SHARED`` or ``../shared`` beside the repository."""
    return Path(os.environ.get("GCIBSEM_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def em_dir() -> Path:
    d = shared_dir() / "data" / "em"
    if not d.is_dir():
        pytest.skip(f"real EM specimens not found in {d} (set GCIBSEM_SHARED to the folder holding data/em)")
    return d


@pytest.fixture
def scope():
    """setup_a on a virtual clock with the default synthetic specimen."""
    from hardware.factory import open_microscope
    return open_microscope("setup_a")


@pytest.fixture
def pair_8um_short():
    """A 512 x 512 pair at wd -/+ 5 um, 8 um short of focus on setup_a (10 nm pixels, 100 ns): the frames'
    images, as a user would save them for ``deepfocus predict``."""
    from deepfocus.autofocus import acquire_pair
    from hardware.factory import open_microscope
    sem_scope = open_microscope("setup_a")
    sem = sem_scope.sem
    sem.set_scan(pixel_size_m=10e-9, width_px=512, height_px=512, dwell_s=100e-9)
    sem.set_wd_m(sem_scope.sim.true_wd_m() - 8e-6)
    minus, plus = acquire_pair(sem, 5e-6)
    return minus.image, plus.image
