"""Microscope profiles: named or by path, dotted overrides, and clear errors for broken files."""
from __future__ import annotations

import pytest

from hardware.config import available_profiles, load_profile
from hardware.errors import ConfigError

CONTRACT_KEYS = ["optics.aperture_angle_mrad", "optics.in_focus_probe_nm", "stigmator.rotation_deg",
                 "stigmator.scale_um_per_unit", "beam.current_na", "detector.efficiency", "seed"]


def get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_shipped_profiles_hold_the_contract_keys():
    assert {"setup_a", "setup_b"} <= set(available_profiles())
    a, b = load_profile("setup_a"), load_profile("setup_b")
    for key in CONTRACT_KEYS:
        get(a, key), get(b, key)
    # setup_b differs where recalibration matters
    assert b.scan.rotation_deg == 90.0
    assert b.stigmator.rotation_deg != a.stigmator.rotation_deg
    assert b.stigmator.scale_um_per_unit != a.stigmator.scale_um_per_unit
    assert b.beam.energy_kv == 1.2 and a.beam.energy_kv == 1.5


@pytest.mark.parametrize("key, value", [("optics.aperture_angle_mrad", 3.25), ("optics.in_focus_probe_nm", 2.0),
                                        ("stigmator.rotation_deg", -12.0), ("stigmator.scale_um_per_unit", 1.7),
                                        ("beam.current_na", 0.4), ("detector.efficiency", 0.2), ("seed", 99)])
def test_every_contract_key_can_be_overridden(key, value):
    cfg = load_profile("setup_a", [f"{key}={value}"])
    assert get(cfg, key) == value


def test_profile_by_path_and_unknown_keys_in_files(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\noptics:\n  aperture_angle_mrad: 5.0\n")
    cfg = load_profile(str(p))
    assert cfg.name == "mine" and cfg.optics.aperture_angle_mrad == 5.0
    assert cfg.beam.current_na == 1.5      # defaults fill what the file leaves out
    p.write_text("optics:\n  aperture_angle: 5.0\n")
    with pytest.raises(ConfigError, match="unknown profile key 'optics.aperture_angle'"):
        load_profile(str(p))


@pytest.mark.parametrize("text, message", [
    ("optics: [1, 2", "not valid YAML"),
    ("", "is empty: a profile names at least its microscope's backend"),        # emptied or cut short
    ("# setup_c\n", "is empty"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("beam:\n  current_na: -1\n", "beam.current_na must be positive"),
    ("detector:\n  efficiency: 1.5\n", "detector.efficiency must be in (0, 1]"),
    ("detector:\n  bit_depth: 12\n", "bit_depth must be 8 or 16"),
    ("limits:\n  wd_mm: [5, 2]\n", "limits.wd_mm must be [low, high]"),
    ("optics: 3\n", "optics: expected a mapping"),
    ("beam:\n  current_na: .nan\n", "expected a finite number"),
    ("autofocus:\n  max_step_stig: 25\n", "autofocus.max_step_stig = 25 exceeds the stigmators' whole range"),
    ("autofocus:\n  max_step_wd_um: 600\n", "exceeds limits.wd_step_um"),
    ("autofocus:\n  tol_wd_um: 0\n", "autofocus.tol_wd_um must be positive"),
    ("autofocus:\n  max_iterations: 0\n", "autofocus.max_iterations must be at least 1"),
    ("autofocus:\n  far_perturbation_factor: 1.2\n",
     "autofocus.far_perturbation_factor must be 0 (off) or between 1.5 and 10"),
    ("autofocus:\n  max_total_wd_um: 20\n", "a single step could never be taken in full"),
    ("autofocus:\n  lens_play_um: -0.1\n", "autofocus.lens_play_um must be between 0"),
    # a second section pasted below the first (calibrate's snippet) would silently drop the first's keys
    ("autofocus:\n  max_iterations: 4\nbeam:\n  current_na: 1.0\nautofocus:\n  lens_play_um: 0.2\n",
     "key 'autofocus' appears twice (lines 1 and 5); merge the two into one"),
    ("optics:\n  hysteresis_um: 0.1\n  hysteresis_um: 0.2\n", "key 'hysteresis_um' appears twice"),
])
def test_broken_profiles_are_named(tmp_path, text, message):
    p = tmp_path / "broken.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_profile(str(p))
    assert message in str(err.value)


def test_missing_profile_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile("/nonexistent/scope.yaml")


def test_numbers_in_exponent_form_read_as_numbers(tmp_path):
    # PyYAML reads 1e-5 and 1.0e6 as text (YAML 1.1 wants 1.0e+6); people write them as numbers
    p = tmp_path / "m.yaml"
    p.write_text("name: m\nautofocus:\n  max_total_wd_um: 1.0e6\nbeam:\n  current_na: 15e-1\n")
    cfg = load_profile(p)
    assert cfg.autofocus.max_total_wd_um == 1.0e6 and cfg.beam.current_na == 1.5
    p.write_text("name: m\nbeam:\n  current_na: 1e-x\n")
    with pytest.raises(ConfigError, match="beam.current_na: expected a number, got '1e-x'"):
        load_profile(p)
