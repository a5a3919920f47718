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
