"""What `pip install` (not the editable checkout) gives a user: the shipped weights, profiles and configs."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("runs", "__pycache__", "*.egg-info")
    for pkg in ("hardware", "deepfocus", "gcib", "acquisition"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(out), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{r.stderr[-2000:]}")
    return zipfile.ZipFile(next(out.glob("*.whl")))


def test_the_wheel_carries_the_default_model_its_card_and_the_microscope_profiles(wheel):
    from deepfocus.estimator import DEFAULT_MODEL
    names = set(wheel.namelist())
    assert f"deepfocus/models/{DEFAULT_MODEL.name}" in names, sorted(n for n in names if "models" in n)
    assert "deepfocus/models/README.md" in names
    assert {"hardware/profiles/setup_a.yaml", "hardware/profiles/setup_b.yaml"} <= names
    assert "deepfocus/configs/spectral_video.yaml" in names
    # the measurements behind the model card stay in the repository, not in every installation
    assert not any("/bench/" in n for n in names)
