"""Mill rate from sub-stacks and computational flattening on synthetic, unevenly milled sections."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from acquisition.cli import main
from gcib.stacks import (OmeStack, estimate_mill_rate, flatten_stack, last_tissue_index, read_ome_stack,
                         smooth_index, write_ome_stack)
from hardware.errors import LimitError

THICKNESS_NM = 500.0


def tissue_grey(depth_nm: np.ndarray) -> np.ndarray:
    """Grey value of the section at a depth: a ramp plus bands, so a wrong depth mapping shows."""
    return 60.0 + 120.0 * depth_nm / THICKNESS_NM + 25.0 * np.sin(2 * np.pi * depth_nm / 150.0)


def uneven_rate_nm_per_cycle(ny: int, nx: int, mean: float = 10.0) -> np.ndarray:
    """A tilted and curved mill-rate map (+-15 % tilt, a central bump): the surface a real gun leaves."""
    y, x = np.mgrid[0:ny, 0:nx]
    u, v = x / (nx - 1) - 0.5, y / (ny - 1) - 0.5
    return mean * (1.0 + 0.3 * u + 0.1 * v + 0.15 * np.exp(-(u * u + v * v) / 0.05))


def mill_stack(rate: np.ndarray, cycles_per_slice: int, nz: int, noise: float = 2.0, seed: int = 0) -> np.ndarray:
    """Slice k is imaged after k * cycles_per_slice cycles; milled-through pixels show the dark wafer."""
    rng = np.random.default_rng(seed)
    depth = np.arange(nz)[:, None, None] * cycles_per_slice * rate[None]
    tissue = depth < THICKNESS_NM
    # shot noise: the dark wafer (grey ~2) is quieter than tissue, as with a gold-coated wafer
    grey = np.where(tissue, tissue_grey(depth), 2.0)
    grey = grey + rng.normal(0.0, noise, grey.shape) * np.where(tissue, 1.0, 0.5)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def test_last_tissue_index_ignores_dark_tissue_pixels():
    column = np.array([80, 5, 90, 70, 2, 1, 2], dtype=np.uint8)   # dark stain at 1, wafer from 4
    stack = np.stack([column, np.full(7, 1, np.uint8), np.full(7, 200, np.uint8)], axis=1)[:, :, None]
    np.testing.assert_array_equal(last_tissue_index(stack, 10)[:, 0], [3, -1, 6])


@pytest.mark.parametrize("cycles_per_slice", [1, 3])
def test_mill_rate_recovers_known_rate_within_its_uncertainty(cycles_per_slice):
    rate = uneven_rate_nm_per_cycle(160, 200)
    nz = int(THICKNESS_NM / rate.min() / cycles_per_slice) + 4
    stack = mill_stack(rate, cycles_per_slice, nz)
    r = estimate_mill_rate(stack, THICKNESS_NM * 1e-9, cycles_per_slice, thickness_sd_m=5e-9)
    true_cycles = THICKNESS_NM / rate
    truth_nm = THICKNESS_NM / true_cycles.mean()        # thickness over the mean cycle count
    est_nm, sd_nm = r.depth_per_cycle_m * 1e9, r.depth_per_cycle_sd_m * 1e9
    assert abs(est_nm - truth_nm) < sd_nm
    assert est_nm == pytest.approx(truth_nm, rel=0.02)
    # the stated spread is that of the true cycle counts plus the one-step discretisation
    expected_sd = np.sqrt(true_cycles.var() + cycles_per_slice ** 2 / 12)
    assert r.cycles_sd == pytest.approx(expected_sd, rel=0.2)
    assert r.pixels_used == rate.size and r.pixels_not_milled_through == 0


def test_uniform_rate_still_reports_discretisation_uncertainty():
    rate = np.full((40, 40), 12.0)                      # 500 / 12 = 41.7 cycles: wafer shows at slice 42
    stack = mill_stack(rate, 1, 50, noise=0.0)
    r = estimate_mill_rate(stack, THICKNESS_NM * 1e-9, 1)
    assert r.cycles_mean == pytest.approx(41.5)
    assert r.cycles_sd == pytest.approx(1 / np.sqrt(12), rel=1e-6)
    assert abs(r.depth_per_cycle_m * 1e9 - 12.0) < r.depth_per_cycle_sd_m * 1e9


def test_mill_rate_with_cycle_time_and_roi():
    rate = uneven_rate_nm_per_cycle(64, 64)
    stack = mill_stack(rate, 2, 40)
    r = estimate_mill_rate(stack, THICKNESS_NM * 1e-9, 2, cycle_time_s=360.0, roi=(8, 16, 32, 24))
    assert r.roi == (8, 16, 32, 24) and r.pixels_used == 32 * 24
    assert r.depth_rate_m_per_s == pytest.approx(r.depth_per_cycle_m / 360.0)
    sub = rate[8:40, 16:40]
    assert r.depth_per_cycle_m * 1e9 == pytest.approx(THICKNESS_NM / (THICKNESS_NM / sub).mean(), rel=0.03)


def test_mill_rate_bad_input():
    rate = np.full((16, 16), 10.0)
    through = mill_stack(rate, 1, 60)
    with pytest.raises(ValueError, match="no pixel was milled through"):
        estimate_mill_rate(mill_stack(rate, 1, 20), 500e-9, 1)
    with pytest.raises(ValueError, match="all wafer"):
        estimate_mill_rate(np.zeros((5, 8, 8), np.uint8), 500e-9, 1)
    with pytest.raises(LimitError, match="section thickness"):
        estimate_mill_rate(through, -1.0, 1)
    with pytest.raises(LimitError, match="cycles per slice"):
        estimate_mill_rate(through, 500e-9, 0)
    with pytest.raises(ValueError, match="does not fit"):
        estimate_mill_rate(through, 500e-9, 1, roi=(10, 10, 10, 10))
    with pytest.raises(ValueError, match=r"\(z, y, x\)"):
        estimate_mill_rate(np.zeros((8, 8)), 500e-9, 1)


def test_smoothing_keeps_no_tissue_pixels_out():
    index = np.full((9, 9), 20)
    index[:, :3] = -1
    smooth = smooth_index(index, 2.0)
    assert np.all(np.isnan(smooth[:, :3]))
    np.testing.assert_allclose(smooth[:, 3:], 20.0)


def test_flattening_a_tilted_curved_section_makes_it_flat():
    rate = uneven_rate_nm_per_cycle(96, 128)            # tissue lasts 40 to 60 slices across the section
    nz = 64
    stack = mill_stack(rate, 1, nz)
    flat = flatten_stack(stack)
    assert flat.shape == stack.shape and flat.dtype == np.uint8
    depth_out = np.arange(nz) / (nz - 1) * THICKNESS_NM
    expected = tissue_grey(depth_out)
    # interior planes: compare to the grey value of that depth; the input's planes mix many depths
    for k in range(2, nz - 2):
        plane_in = stack[k].astype(float)
        plane_out = flat[k].astype(float)
        assert plane_out.std() < 0.35 * plane_in.std() + 4.0
        assert plane_out.std() < 5.0
        assert abs(plane_out.mean() - expected[k]) < 6.0
    # the input really was uneven: its deep planes mix tissue and wafer
    assert stack[45].std() > 30


def test_flatten_fills_columns_without_tissue_and_threads_agree():
    rate = uneven_rate_nm_per_cycle(48, 40)
    stack = mill_stack(rate, 1, 64)
    stack[:, :, :5] = 1                                 # a strip of bare wafer
    one = flatten_stack(stack, workers=1, fill_value=7, n_out=30)
    two = flatten_stack(stack, workers=2, fill_value=7, n_out=30)
    np.testing.assert_array_equal(one, two)
    assert one.shape == (30, 48, 40)
    assert np.all(one[:, :, :5] == 7)
    assert one[:, :, 5:].min() > 20                     # no wafer mixed into tissue columns


def test_flatten_with_given_index_is_a_linear_resampling():
    stack = np.broadcast_to(np.arange(11, dtype=np.float32)[:, None, None] * 10, (11, 2, 3)).copy()
    last = np.array([[9.5, 4.5, 10.0], [0.0, -1.0, 2.5]])
    flat = flatten_stack(stack, last, n_out=5)
    # column (0, 0): source z = j/4 * 10 clipped at 9.5
    np.testing.assert_allclose(flat[:, 0, 0], [0, 25, 50, 75, 95])
    np.testing.assert_allclose(flat[:, 0, 1], [0, 12.5, 25, 37.5, 45])
    np.testing.assert_allclose(flat[:, 1, 0], 0)
    np.testing.assert_allclose(flat[:, 1, 1], 0)        # no tissue: fill value


def test_ome_round_trip(tmp_path):
    data = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    path = tmp_path / "s.ome.tif"
    write_ome_stack(path, OmeStack(data, 10e-9, 12e-9, 20e-9))
    back = read_ome_stack(path)
    np.testing.assert_array_equal(back.data, data)
    assert back.physical_size_x_m == pytest.approx(10e-9)
    assert back.physical_size_y_m == pytest.approx(12e-9)
    assert back.physical_size_z_m == pytest.approx(20e-9)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and 'PhysicalSizeZ="20.0"' in tif.ome_metadata


def test_commands_on_ome_stacks(tmp_path, capsys):
    rate = uneven_rate_nm_per_cycle(64, 80)
    stack = mill_stack(rate, 2, 32)
    path = tmp_path / "section.ome.tif"
    write_ome_stack(path, OmeStack(stack, 10e-9, 10e-9, 20e-9))
    assert main(["mill-rate", str(path), "--thickness-nm", "500", "--cycles-per-slice", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    truth = THICKNESS_NM / (THICKNESS_NM / rate).mean()
    assert abs(d["depth_per_cycle_nm"] - truth) < d["depth_per_cycle_sd_nm"]
    out = tmp_path / "flat.ome.tif"
    assert main(["flatten", str(path), "--out", str(out), "--thickness-nm", "500"]) == 0
    flat = read_ome_stack(out)
    assert flat.data.shape == stack.shape
    assert flat.physical_size_z_m == pytest.approx(500e-9 / 32)
    assert flat.physical_size_x_m == pytest.approx(10e-9)
    assert np.std(flat.data[20].astype(float)) < 0.35 * np.std(stack[20].astype(float))
    capsys.readouterr()
    assert main(["mill-rate", str(tmp_path / "missing.ome.tif"), "--thickness-nm", "500",
                 "--cycles-per-slice", "1"]) == 2
    assert "no such stack" in capsys.readouterr().err
    assert main(["flatten", str(path), "--out", str(path)]) == 2


def test_isolated_debris_on_the_wafer_does_not_shift_the_rate():
    rate = uneven_rate_nm_per_cycle(64, 64)
    stack = mill_stack(rate, 1, 70)
    rng = np.random.default_rng(5)
    ys, xs = rng.integers(2, 62, 25), rng.integers(2, 62, 25)
    stack[66, ys, xs] = 180                             # bright specks in the last, all-wafer slice
    clean = estimate_mill_rate(stack, THICKNESS_NM * 1e-9, 1)
    truth = THICKNESS_NM / (THICKNESS_NM / rate).mean()
    assert clean.depth_per_cycle_m * 1e9 == pytest.approx(truth, rel=0.02)
    raw = estimate_mill_rate(stack, THICKNESS_NM * 1e-9, 1, median_px=0)
    assert raw.cycles_mean > clean.cycles_mean + 0.1   # without the median the specks pull the count up
    flat = flatten_stack(stack)
    assert flat[-3:].min() > 20                         # and no speck drags wafer into the flattened tissue
