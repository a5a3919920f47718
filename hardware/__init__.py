"""Hardware layer: device interfaces (SEM, stage, clock), their backends and the simulated SEM.

This package imports neither torch nor Qt nor any other package of the product.
"""
from .clock import Clock, RealClock, VirtualClock
from .config import MicroscopeConfig, load_profile
from .errors import (BackendError, CommunicationError, ConfigError, HardwareError, HardwareTimeoutError,
                     LimitError)
from .sem import SEM, Frame, ScanSettings, SEMLimits
from .stage import Stage, StageLimits, StagePosition

__all__ = [
    "Clock", "RealClock", "VirtualClock", "MicroscopeConfig", "load_profile", "BackendError",
    "CommunicationError", "ConfigError", "HardwareError", "HardwareTimeoutError", "LimitError", "SEM", "Frame",
    "ScanSettings", "SEMLimits", "Stage", "StageLimits", "StagePosition",
]
