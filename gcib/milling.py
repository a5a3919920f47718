"""One GCIB milling cycle: move under the ion gun, mill through an azimuth schedule, come back.

Order of stage moves (the stage carries a tilted wafer a few millimetres from the
pole piece and the gun, so the order matters):

    there: rotation (at tilt 0), z down to the travel height, x/y, z up to the
           mill height, tilt to the glancing angle
    back:  tilt to 0, z down to the travel height, x/y, rotation, z

Every step is appended to a JSON-lines log and flushed to disk before the next
one starts. A cycle that was interrupted (power cut, exception, operator) is
resumed by running it again with the same log and cycle id: beam time already
logged is not repeated. An exposure that was started but never logged as
finished is counted as complete, so a resumed cycle can fall short by at most
one exposure step but never mills a spot twice.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from hardware.errors import HardwareError, LimitError
from hardware.stage import Stage, StagePosition

from .ion_gun import IonGun


class UnsafeStageStateError(HardwareError, RuntimeError):
    """The stage is where a milling move could collide (tilted away from the mill position, z above travel)."""


@dataclass(frozen=True)
class AzimuthSchedule:
    """How the stage turns during milling.

    Discrete (default, as in Schubert 2022): ``azimuths_deg`` visited in turn, the
    beam on for ``dwell_s`` at each, blanked while the stage rotates, repeated
    until ``mill_time_s`` of beam has been delivered. Continuous: the stage
    advances by ``step_deg`` between exposures so that one turn takes
    ``turn_s`` of beam time, approximating a steady rotation.
    """
    mill_time_s: float = 360.0
    azimuths_deg: tuple[float, ...] = (0.0, 120.0, 240.0)
    dwell_s: float = 10.0
    continuous: bool = False
    turn_s: float = 360.0
    step_deg: float = 2.0

    def validate(self) -> None:
        if not (math.isfinite(self.mill_time_s) and self.mill_time_s >= 0):
            raise LimitError("mill time", self.mill_time_s, 0.0, math.inf, "s")
        if self.continuous:
            if not (self.turn_s > 0 and 0 < self.step_deg <= 180):
                raise LimitError("continuous rotation step", self.step_deg, 1e-3, 180.0, "deg")
        else:
            if not self.azimuths_deg:
                raise ValueError("the azimuth schedule has no azimuths")
            if not (math.isfinite(self.dwell_s) and self.dwell_s > 0):
                raise LimitError("dwell per azimuth", self.dwell_s, 0.0, math.inf, "s")

    def steps(self) -> Iterator[tuple[float, float]]:
        """(azimuth in degrees relative to the start, beam seconds) until the mill time is used up."""
        self.validate()
        remaining = self.mill_time_s
        k = 0
        if self.continuous:
            dwell = self.turn_s * self.step_deg / 360.0
            while remaining > 1e-9:
                yield (k * self.step_deg) % 360.0, min(dwell, remaining)
                remaining -= dwell
                k += 1
        else:
            while remaining > 1e-9:
                yield self.azimuths_deg[k % len(self.azimuths_deg)] % 360.0, min(self.dwell_s, remaining)
                remaining -= self.dwell_s
                k += 1


@dataclass(frozen=True)
class MillingPlan:
    """Where and how to mill. Positions are stage coordinates; rotation of ``mill_position`` is the first azimuth."""
    mill_position: StagePosition             # x, y, z that put the region under the ion field; tilt ignored
    travel_z_m: float                        # z for x/y travel: at or below every working z
    glancing_angle_deg: float = 30.0
    gun_elevation_deg: float = 0.0           # beam below horizontal; stage tilt = glancing - elevation
    field_m: tuple[float, float] = (22e-3, 22e-3)
    schedule: AzimuthSchedule = field(default_factory=AzimuthSchedule)
    tilt_tolerance_deg: float = 0.05
    position_tolerance_m: float = 50e-6

    @property
    def mill_tilt_deg(self) -> float:
        return self.glancing_angle_deg - self.gun_elevation_deg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- log
class MillingLog:
    """Append-only JSON-lines record of milling steps; each line is on disk before the next step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True)
        with open(self.path, "ab") as f:
            if f.tell() and not self._ends_with_newline():
                # a line cut short while writing (the disk full, the power gone) is no record: ``records`` skips it
                # as the last line, but the records appended after it would make it a broken middle line and stop
                # every later run; it is cut off
                f.truncate(self._complete_bytes())
            f.write((line + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _complete_bytes(self) -> int:
        """The length of the log up to and with its last newline."""
        data = self.path.read_bytes()
        return data.rfind(b"\n") + 1

    def records(self, cycle_id: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = [(n, line.strip()) for n, line in
                 enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        out = []
        for k, (n, line) in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if k == len(lines) - 1:
                    break  # cut short by a crash while writing; everything before it is intact
                raise ValueError(f"{self.path}:{n}: not a JSON record: {line[:80]!r}") from None
            problem = _record_problem(rec)
            if problem:
                # a resume reads these to decide what is left to mill and where the stage goes back to: a record
                # that does not say so is refused here, before the stage or the beam is touched
                raise ValueError(f"{self.path}:{n}: {problem}; this is not a record mill-cycle writes: "
                                 f"{line[:80]!r}")
            if cycle_id is None or rec.get("cycle") == cycle_id:
                out.append(rec)
        return out


# what a resume reads from each step's record
_NUMBERS = {"expose-begin": ("index", "duration_s"), "expose-end": ("index", "duration_s", "charge_c")}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _record_problem(rec: Any) -> str:
    """What makes ``rec`` unreadable to a resume; empty where nothing does."""
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), str):
        return "a record is an object with a 'step'"
    missing = [k for k in _NUMBERS.get(rec["step"], ()) if not _finite(rec.get(k))]
    if missing:
        return f"its {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a number"
    if rec["step"] == "start":
        ret = rec.get("return_position")
        fields = StagePosition.__dataclass_fields__
        if not (isinstance(ret, dict) and set(ret) <= set(fields) and all(_finite(v) for v in ret.values())):
            return f"its return_position is not a stage position in numbers ({', '.join(fields)})"
    return ""


@dataclass(frozen=True)
class CycleState:
    """What the log says about one cycle."""
    started: bool
    finished: bool
    milled: bool
    beam_s_done: float
    charge_c: float
    exposures_done: int
    return_position: StagePosition | None


def cycle_state(records: list[dict[str, Any]]) -> CycleState:
    started = any(r["step"] == "start" for r in records)
    finished = any(r["step"] == "done" for r in records)
    milled = any(r["step"] == "milled" for r in records)
    begun = {r["index"]: r for r in records if r["step"] == "expose-begin"}
    ended = {r["index"]: r for r in records if r["step"] == "expose-end"}
    beam_s = sum(r["duration_s"] for r in ended.values())
    charge = sum(r["charge_c"] for r in ended.values())
    # begun but never ended: assume it ran to completion (no double milling)
    for i, r in begun.items():
        if i not in ended:
            beam_s += r["duration_s"]
    exposures = len(set(begun) | set(ended))
    start = next((r for r in records if r["step"] == "start"), None)
    ret = StagePosition(**start["return_position"]) if start else None
    return CycleState(started, finished, milled, beam_s, charge, exposures, ret)


# ----------------------------------------------------------------------------- the cycle
class MillingCycle:
    def __init__(self, stage: Stage, gun: IonGun, plan: MillingPlan, log: MillingLog | str | Path):
        self.stage = stage
        self.gun = gun
        self.plan = plan
        self.log = log if isinstance(log, MillingLog) else MillingLog(log)
        plan.schedule.validate()

    # -- logging
    def _record(self, cycle_id: str, step: str, **data: Any) -> None:
        pos = self.stage.position()
        self.log.append({"cycle": cycle_id, "step": step, "t_s": self.gun.clock.now_s(), "wall_time": time.time(),
                         "stage": asdict(pos), **data})

    def _move(self, cycle_id: str, label: str, **axes: float) -> None:
        self._record(cycle_id, "move-begin", move=label, target=axes)
        self.stage.move_to(**axes)
        self._record(cycle_id, "move-end", move=label)

    # -- checks
    def _planned_positions(self, start: StagePosition) -> list[StagePosition]:
        p, m = self.plan, self.plan.mill_position
        positions = [replace(start, z_m=p.travel_z_m, tilt_deg=0.0),
                     replace(m, z_m=p.travel_z_m, tilt_deg=0.0),
                     replace(m, tilt_deg=0.0), replace(m, tilt_deg=p.mill_tilt_deg)]
        positions += [replace(m, tilt_deg=p.mill_tilt_deg, rotation_deg=self._azimuth(a))
                      for a in {a for a, _ in p.schedule.steps()}]
        return positions

    def _azimuth(self, relative_deg: float) -> float:
        lo, hi = self.stage.limits.rotation_deg
        a = self.plan.mill_position.rotation_deg + relative_deg
        # stay inside the rotation limits by choosing the equivalent angle
        while a > hi:
            a -= 360.0
        while a < lo:
            a += 360.0
        return a

    def check_preconditions(self, here: StagePosition) -> None:
        """Raise before anything moves if the plan or the stage's state is unsafe."""
        p = self.plan
        if abs(here.tilt_deg) > p.tilt_tolerance_deg:
            raise UnsafeStageStateError(
                f"stage tilt is {here.tilt_deg:g} deg; a milling cycle starts at tilt 0 "
                f"(tolerance {p.tilt_tolerance_deg:g} deg)")
        if p.travel_z_m > min(here.z_m, p.mill_position.z_m) + 1e-9:
            raise UnsafeStageStateError(
                f"travel z {p.travel_z_m:g} m lies above the current z {here.z_m:g} m or the mill z "
                f"{p.mill_position.z_m:g} m: x/y travel must happen at or below both")
        if not (0 < p.glancing_angle_deg <= 90):
            raise LimitError("glancing angle", p.glancing_angle_deg, 0.0, 90.0, "deg")
        for pos in self._planned_positions(here):
            self.stage.limits.check(pos)

    def _at_mill_xyz(self, here: StagePosition) -> bool:
        """x, y and z at the mill position (any tilt): tilting there is safe."""
        m, p = self.plan.mill_position, self.plan
        return (math.hypot(here.x_m - m.x_m, here.y_m - m.y_m) <= p.position_tolerance_m
                and abs(here.z_m - m.z_m) <= p.position_tolerance_m)

    # -- run
    def run(self, cycle_id: str) -> CycleState:
        """Run (or resume) the cycle ``cycle_id``; returns the logged state when done."""
        self.gun.blank()
        state = cycle_state(self.log.records(cycle_id))
        if state.finished:
            return state
        here = self.stage.position()
        at_mill = self._at_mill_xyz(here)
        tilted = abs(here.tilt_deg) > self.plan.tilt_tolerance_deg
        if state.started:
            self._record(cycle_id, "resume", beam_s_done=state.beam_s_done, charge_c=state.charge_c)
            if tilted and not at_mill:
                raise UnsafeStageStateError(
                    f"cycle {cycle_id}: stage is tilted ({here.tilt_deg:g} deg) away from the mill position; "
                    "bring it to tilt 0 by hand before resuming")
        else:
            self.check_preconditions(here)
            self._record(cycle_id, "start", plan=self.plan.to_dict(), return_position=asdict(here),
                         ion_current_a=self.gun.current_a)
            state = cycle_state(self.log.records(cycle_id))
        if not state.milled:
            if at_mill:
                # interrupted at the gun (or started there): only the tilt may be missing
                if abs(here.tilt_deg - self.plan.mill_tilt_deg) > self.plan.tilt_tolerance_deg:
                    self._move(cycle_id, "tilt to glancing angle", tilt_deg=self.plan.mill_tilt_deg)
            else:
                self.check_preconditions(here)
                self._go_to_mill_position(cycle_id)
            self._mill(cycle_id, state)
            self._record(cycle_id, "milled")
        self._return(cycle_id, state.return_position or here)
        self._record(cycle_id, "done")
        return cycle_state(self.log.records(cycle_id))

    def _go_to_mill_position(self, cycle_id: str) -> None:
        p, m = self.plan, self.plan.mill_position
        self._move(cycle_id, "rotation", rotation_deg=self._azimuth(0.0))
        self._move(cycle_id, "z to travel height", z_m=p.travel_z_m)
        self._move(cycle_id, "x/y to mill position", x_m=m.x_m, y_m=m.y_m)
        self._move(cycle_id, "z to mill height", z_m=m.z_m)
        self._move(cycle_id, "tilt to glancing angle", tilt_deg=p.mill_tilt_deg)

    def _mill(self, cycle_id: str, state: CycleState) -> None:
        w, h = self.plan.field_m
        x_vpp, y_vpp = self.gun.set_field(w, h)
        self._record(cycle_id, "field", width_m=w, height_m=h, area_m2=w * h, x_vpp=x_vpp, y_vpp=y_vpp,
                     current_a=self.gun.current_a)
        skip_s = state.beam_s_done
        index = state.exposures_done
        for azimuth, beam_s in self.plan.schedule.steps():
            if skip_s > 1e-9:  # already delivered before the interruption
                used = min(skip_s, beam_s)
                skip_s -= used
                beam_s -= used
                if beam_s <= 1e-9:
                    continue
            rotation = self._azimuth(azimuth)
            if abs(self.stage.position().rotation_deg - rotation) > 1e-6:
                self._move(cycle_id, f"azimuth {azimuth:g}", rotation_deg=rotation)
            self._record(cycle_id, "expose-begin", index=index, azimuth_deg=azimuth, duration_s=beam_s,
                         area_m2=w * h)
            charge = self.gun.expose(beam_s)
            self._record(cycle_id, "expose-end", index=index, azimuth_deg=azimuth, duration_s=beam_s,
                         charge_c=charge, area_m2=w * h)
            index += 1
        self.gun.blank()

    def _return(self, cycle_id: str, back: StagePosition) -> None:
        self.gun.blank()
        p = self.plan
        self._move(cycle_id, "tilt to 0", tilt_deg=0.0)
        self._move(cycle_id, "z to travel height", z_m=p.travel_z_m)
        self._move(cycle_id, "x/y back", x_m=back.x_m, y_m=back.y_m)
        self._move(cycle_id, "rotation back", rotation_deg=back.rotation_deg)
        self._move(cycle_id, "z back", z_m=back.z_m)
