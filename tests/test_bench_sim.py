"""Rendering speed of the simulated SEM (run with `make bench` / `pytest --benchmark-only`)."""
import pytest

from hardware.factory import open_microscope


@pytest.mark.parametrize("size", [(1024, 768), (512, 512)])
def test_bench_render_frame(benchmark, size):
    scope = open_microscope("setup_a")
    scope.sem.set_scan(pixel_size_m=10e-9, width_px=size[0], height_px=size[1], dwell_s=50e-9)
    scope.sem.set_wd_m(scope.sem.get_wd_m() + 20e-6)   # a defocused frame needs the widest blur margin
    scope.sem.grab_frame()                            # specimen generation is cached after the first frame
    frame = benchmark(scope.sem.grab_frame)
    assert frame.image.shape == (size[1], size[0])
