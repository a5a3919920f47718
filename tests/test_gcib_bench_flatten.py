"""Benchmark: flattening a 500-slice 2048 x 2048 sub-stack (run with ``pytest --benchmark-only``).

Needs about 7 GB of memory (input, output and the index maps).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from gcib.stacks import clean_index, flatten_stack, last_tissue_index, smooth_index, tissue_cap

NZ, NY, NX = 500, 2048, 2048
# scale the benchmark down with GCIB_BENCH_SIZE=1024 (say) on a small machine
SIZE = int(os.environ.get("GCIB_BENCH_SIZE", NX))


@pytest.fixture(scope="module")
def uneven_stack() -> np.ndarray:
    """Tissue lasting 300 to 480 slices across a tilted, curved breakthrough; wafer grey 2 below."""
    ny = nx = SIZE
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    u, v = x / nx - 0.5, y / ny - 0.5
    last = (390 + 120 * u + 40 * v - 80 * (u * u + v * v)).astype(np.float32)
    texture = np.random.default_rng(0).integers(40, 200, (ny, nx), dtype=np.uint8)
    stack = np.empty((NZ, ny, nx), dtype=np.uint8)
    for k in range(NZ):
        plane = texture + np.uint8(k % 50)
        np.putmask(plane, last < k, np.uint8(2))
        stack[k] = plane
    return stack


def test_bench_flatten_full_pipeline(benchmark, uneven_stack):
    flat = benchmark.pedantic(flatten_stack, args=(uneven_stack,), rounds=3, iterations=1, warmup_rounds=0)
    assert flat.shape == uneven_stack.shape
    assert flat[-1].min() > 2                           # deepest output slice is tissue everywhere


def test_bench_flatten_resampling_only(benchmark, uneven_stack):
    raw = last_tissue_index(uneven_stack)
    cleaned = clean_index(raw)
    last = smooth_index(cleaned)
    cap = tissue_cap(uneven_stack, raw, cleaned)
    flat = benchmark.pedantic(flatten_stack, args=(uneven_stack, last), kwargs={"cap_index": cap}, rounds=3,
                              iterations=1, warmup_rounds=0)
    assert flat.shape == uneven_stack.shape
