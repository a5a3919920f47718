"""Compute per correction on this machine: architectures, eager vs TorchScript, threads, channels-last, int8.

Timed on random weights (the cost does not depend on them) with a batch of N patch pairs,
the way the estimator calls the model; ``deepfocus speed`` prints the table.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from .models import ARCHITECTURES, build, cpu_head, quiet_torchscript


@dataclass
class SpeedRow:
    arch: str
    variant: str
    threads: int
    n_patches: int
    patch_px: int
    median_s: float
    idle_s: float = 0.0             # idle before each timed call


class _FrozenHead:
    def __init__(self, scripted):
        self.front, self.head = scripted.front, cpu_head(scripted)

    def __call__(self, pair: torch.Tensor, pixel_size_nm: float) -> torch.Tensor:
        return self.head(self.front(pair, pixel_size_nm))


def _time(fn, repeats: int, idle_s: float = 0.0) -> float:
    fn()
    fn()
    ts = []
    for _ in range(repeats):
        if idle_s > 0:
            # as in the loop, where each estimate follows the pair's acquisition: worker threads that slept since
            # the last call are woken again (on a 2-core virtual machine that took 0.4-8 ms, against 0.03 ms hot)
            time.sleep(idle_s)
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure(archs: list[str] | None = None, threads: tuple[int, ...] = (1, 2), n_patches: int = 8,
            patch_px: int = 256, repeats: int = 5, idle_s: float = 0.0) -> list[SpeedRow]:
    """Median time per call of each architecture and variant; ``idle_s``: the machine left idle that long before
    each timed call, as between the loop's estimates."""
    if not (idle_s >= 0 and idle_s <= 10):
        raise ValueError(f"idle time must be 0-10 s, got {idle_s!r}")
    rows = []
    before = torch.get_num_threads()
    x = torch.randn(n_patches, 2, patch_px, patch_px)
    try:
        for arch in archs or list(ARCHITECTURES):
            model = build(arch).eval()
            with quiet_torchscript():
                variants = {"eager": model, "torchscript": torch.jit.script(model)}
            if arch != "spectral":
                try:
                    variants["channels_last"] = copy.deepcopy(model).to(memory_format=torch.channels_last_3d)
                except RuntimeError:
                    pass            # layers that have no channels-last layout (2-D heads)
            else:
                with warnings.catch_warnings():
                    # torch deprecates its eager int8 path; measured here, int8 being the usual first try on a CPU
                    warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
                    variants["int8_linear"] = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                                                     dtype=torch.qint8)
                # what the estimator runs on a CPU: the front end as scripted, the head frozen (models.cpu_head)
                variants["frozen_head"] = _FrozenHead(variants["torchscript"])
            for nt in threads:
                torch.set_num_threads(nt)
                for name, m in variants.items():
                    inp = x.contiguous(memory_format=torch.channels_last) if name == "channels_last" else x

                    def run(m=m, inp=inp):
                        with torch.no_grad():
                            m(inp, 10.0)
                    rows.append(SpeedRow(arch, name, nt, n_patches, patch_px, _time(run, repeats, idle_s), idle_s))
    finally:
        torch.set_num_threads(before)
    return rows
