"""The stage device interface: x, y, z, tilt and rotation with limits and move completion."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace

from .clock import Clock, RealClock
from .errors import HardwareTimeoutError, LimitError, check_range


@dataclass(frozen=True)
class StagePosition:
    x_m: float = 0.0
    y_m: float = 0.0
    z_m: float = 0.0
    tilt_deg: float = 0.0
    rotation_deg: float = 0.0

    def distance_xy_m(self, other: "StagePosition") -> float:
        return float(((self.x_m - other.x_m) ** 2 + (self.y_m - other.y_m) ** 2) ** 0.5)


@dataclass(frozen=True)
class StageLimits:
    x_m: tuple[float, float] = (-55e-3, 55e-3)
    y_m: tuple[float, float] = (-55e-3, 55e-3)
    z_m: tuple[float, float] = (-5e-3, 25e-3)
    tilt_deg: tuple[float, float] = (-5.0, 70.0)
    rotation_deg: tuple[float, float] = (-360.0, 360.0)

    def check(self, pos: StagePosition) -> None:
        for f in fields(StagePosition):
            lo, hi = getattr(self, f.name)
            unit = "m" if f.name.endswith("_m") else "deg"
            check_range(f"stage {f.name.rsplit('_', 1)[0]}", getattr(pos, f.name), lo, hi, unit)


class Stage(ABC):
    """A motorised specimen stage. ``move_to`` returns when the move has completed."""

    poll_interval_s = 0.05

    def __init__(self, limits: StageLimits | None = None, clock: Clock | None = None):
        self.limits = limits or StageLimits()
        self.clock = clock or RealClock()

    def position(self) -> StagePosition:
        return self._do_get_position()

    def move_to(self, target: StagePosition | None = None, timeout_s: float = 120.0, **axes: float) -> StagePosition:
        """Move to ``target`` (or the current position with some ``axes`` changed) and wait for completion.

        Raises ``LimitError`` before moving if any axis is outside its limits and
        ``HardwareTimeoutError`` if the stage has not arrived within ``timeout_s``.
        """
        base = target if target is not None else self.position()
        unknown = set(axes) - {f.name for f in fields(StagePosition)}
        if unknown:
            raise TypeError(f"unknown stage axes {sorted(unknown)}; axes are x_m, y_m, z_m, tilt_deg, rotation_deg")
        goal = replace(base, **{k: float(v) for k, v in axes.items()})
        self.limits.check(goal)
        if not timeout_s > 0:
            raise LimitError("stage move timeout", timeout_s, 0.0, float("inf"), "s")
        start = self.clock.now_s()
        self._do_start_move(goal)
        while self._do_is_moving():
            if self.clock.now_s() - start > timeout_s:
                self._do_stop()
                raise HardwareTimeoutError(
                    f"stage did not reach {goal} within {timeout_s:g} s (stopped at {self.position()})")
            self.clock.sleep(self.poll_interval_s)
        return self.position()

    def stop(self) -> None:
        self._do_stop()

    def is_moving(self) -> bool:
        return bool(self._do_is_moving())

    @abstractmethod
    def _do_get_position(self) -> StagePosition: ...

    @abstractmethod
    def _do_start_move(self, target: StagePosition) -> None: ...

    @abstractmethod
    def _do_is_moving(self) -> bool: ...

    @abstractmethod
    def _do_stop(self) -> None: ...
