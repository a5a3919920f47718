"""Round trip of a 2 x 1024 x 768 uint16 pair through the daemon vs the in-process estimate.

Run with ``pytest tests/test_service_bench.py --benchmark-only``; the remote
benchmark stores the in-process median and the ratio in its ``extra_info``
(target: ratio <= 1.1).
"""
from __future__ import annotations

import statistics
import time

import pytest

from deepfocus.client import RemoteEstimator

try:
    from test_service_estimator import PowerRatioEstimator, image_pair
    from test_service_process import Daemon
except ImportError:
    from tests.test_service_estimator import PowerRatioEstimator, image_pair
    from tests.test_service_process import Daemon

GROUP = "estimate 2 x 1024 x 768 uint16"


@pytest.fixture(scope="module")
def pair():
    minus, plus = image_pair(-6.0, shape=(768, 1024), seed=4, noise=100)
    return minus, plus


def _median_in_process(est, minus, plus, n: int = 15) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        est.estimate(minus, plus, 10e-9, 5e-6)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.benchmark(group=GROUP)
def test_bench_in_process_estimate(benchmark, pair):
    est = PowerRatioEstimator()
    corr = benchmark.pedantic(est.estimate, args=(*pair, 10e-9, 5e-6), rounds=20, warmup_rounds=2)
    assert corr.n_patches == 12


@pytest.mark.benchmark(group=GROUP)
def test_bench_remote_estimate_tcp_loopback(benchmark, pair):
    with Daemon(bind="tcp://127.0.0.1:0") as d:
        remote = RemoteEstimator(d.address, timeout_s=30, retries=0)
        try:
            corr = benchmark.pedantic(remote.estimate, args=(*pair, 10e-9, 5e-6), rounds=20,
                                      warmup_rounds=2)
        finally:
            remote.close()
    local = _median_in_process(PowerRatioEstimator(), *pair)
    remote_median = benchmark.stats.stats.median
    benchmark.extra_info["in_process_median_s"] = local
    benchmark.extra_info["ratio_remote_over_in_process"] = remote_median / local
    print(f"\nremote median {remote_median * 1e3:.2f} ms, in-process median {local * 1e3:.2f} ms, "
          f"ratio {remote_median / local:.3f}")
    assert corr.n_patches == 12
