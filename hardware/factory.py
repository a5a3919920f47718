"""Open a microscope from its profile: the one place that maps ``backend:`` to classes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .clock import Clock, make_clock
from .config import MicroscopeConfig, load_profile
from .errors import ConfigError
from .sem import SEM
from .stage import Stage


@dataclass
class Microscope:
    """The devices of one microscope, sharing one clock."""
    config: MicroscopeConfig
    sem: SEM
    stage: Stage
    clock: Clock
    sim: object | None = None     # the SimulatedMicroscope behind a simulated backend, for ground truth


def open_microscope(profile: str | Path | MicroscopeConfig = "setup_a", overrides: Iterable[str] = (),
                    specimen=None, clock: Clock | None = None) -> Microscope:
    cfg = profile if isinstance(profile, MicroscopeConfig) else load_profile(profile, overrides)
    clock = clock or make_clock(cfg.clock)
    if cfg.backend == "sim":
        from .sim.microscope import SimSEM, SimStage, SimulatedMicroscope, check_specimen_config
        check_specimen_config(cfg)
        sim = SimulatedMicroscope(cfg, clock=clock, specimen=specimen)
        return Microscope(cfg, SimSEM(sim), SimStage(sim), clock, sim)
    raise ConfigError(f"backend {cfg.backend!r} is not available; known backends: sim")
