"""Ages that no step of the wall clock can inflate.

Every age that decides a removal (a snapshot's grace period, a stopped container's grace
period, a running task's maxTaskAge, a ``result-tmp/`` entry's staleAfter) is the smaller of:

* how long this process has itself watched the object in that state, on its monotonic
  clock (:class:`~controller.model.records.Watch`): a fresh object is first seen at most a
  pass after it appears, so this never exceeds its true age, whatever any clock says;
* its wall-clock age (now minus containerd's Created, a file's mtime), read on the wall
  clock as it is now and as it was before the steps this process saw, whichever is later:
  a stamp written before a step was written by the clock as it was then.

A Windows VM steps its clock forward after a resume or a live migration, and at boot; a
wall-clock age alone would then make every live build's fresh snapshot look older than the
grace period. The monotonic bound costs one thing: after a restart, an object waits one
full period again (nothing was watched yet). A stamp later than both readings of the clock
(the clock was set back before we started, or another clock is ahead) gives a negative age:
the object is kept, and the pass reports it.

Pure functions over records: the pass reads the clocks and keeps the watches
(:func:`watch_clock`, :func:`carry`, :func:`restamp`); the planner reads ages (:func:`age`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import NamedTuple

from controller.model.records import ClockWatch, Container, StoreEntry, Watch

#: Between two passes, the wall clock may drift from the monotonic one by this much (or by
#: NTP's fastest slew, 500 ppm, over a longer gap) before a step is seen.
STEP_TOLERANCE = 2.0
SLEW = 0.0005
_UNKNOWN = "?"


def stamp_of(when: datetime | None) -> str:
    """The stamp a time makes (a snapshot's Created, a container's creation time)."""
    return when.isoformat() if when is not None else _UNKNOWN


def container_stamp(c: Container) -> str:
    return stamp_of(c.created_at)


def entry_stamp(e: StoreEntry) -> str:
    return e.stamps or stamp_of(e.changed_at)


class ClockRead(NamedTuple):
    """One pass's reading of the clocks."""

    clock: ClockWatch
    #: Monotonic seconds since the last pass (what every watch grows by).
    elapsed: float
    #: The wall clock's step since the last pass (seconds, forward positive), if one was seen.
    step: float | None


def watch_clock(previous: ClockWatch | None, now: datetime, monotonic: float) -> ClockRead:
    """Compare the wall clock with the monotonic one since the last pass: a step is a change of
    their difference beyond what a slewing clock can drift."""
    offset = now.timestamp() - monotonic
    if previous is None:
        return ClockRead(ClockWatch(monotonic=monotonic, offset=offset), 0.0, None)
    elapsed = max(0.0, monotonic - previous.monotonic)
    step = offset - previous.offset
    if abs(step) <= max(STEP_TOLERANCE, SLEW * elapsed):
        # A slew is followed, not added up: years of it never make a step.
        return ClockRead(previous.model_copy(update={"monotonic": monotonic, "offset": offset}), elapsed, None)
    clock = ClockWatch(
        monotonic=monotonic, offset=offset, net_step=previous.net_step + step, steps=previous.steps + 1
    )
    return ClockRead(clock, elapsed, step)


def carry(watches: Mapping[str, Watch], present: Mapping[str, str | None], monotonic: float) -> dict[str, Watch]:
    """The watches of what is present now: kept where the stamp is the same, started now under a
    new stamp; what went is forgotten. A stamp of None (not read this pass: a snapshot's
    Created) carries the watch as it is, to be checked when it is read."""
    out: dict[str, Watch] = {}
    get = watches.get
    for name, stamp in present.items():
        old = get(name)
        if old is not None and (stamp is None or stamp == old.stamp):
            out[name] = old
        elif stamp is not None:
            out[name] = Watch.model_construct(stamp=stamp, since=monotonic)
    return out


def restamp(watches: Mapping[str, Watch], stamps: Mapping[str, str], monotonic: float) -> dict[str, Watch]:
    """Stamps read during the pass (a snapshot's Created): a watch under another stamp was
    another object's and starts again now."""
    out = dict(watches)
    for name, stamp in stamps.items():
        old = out.get(name)
        if old is None or old.stamp != stamp:
            out[name] = Watch.model_construct(stamp=stamp, since=monotonic)
    return out


def wall_age(stamped_at: datetime, now: datetime, net_step: timedelta) -> timedelta:
    """``now - stamped_at`` on the wall clock as it reads now or as it read before the steps
    seen, whichever is later (a stamp from before a backward step was written by the clock
    as it was)."""
    return max(now, now - net_step) - stamped_at


def watched(watch: Watch | None, stamp: str, monotonic: float) -> timedelta:
    """How long this process has watched the object under this stamp (zero: never), as of the
    monotonic reading ``monotonic``."""
    if watch is None or watch.stamp != stamp:
        return timedelta(0)
    return timedelta(seconds=max(0.0, monotonic - watch.since))


def age(
    watch: Watch | None,
    stamp: str,
    stamped_at: datetime | None,
    now: datetime,
    net_step: timedelta,
    monotonic: float,
) -> timedelta:
    """The age that may decide a removal: never more than watched, nor than the wall-clock age."""
    seen = watched(watch, stamp, monotonic)
    if stamped_at is None:
        return seen
    return min(seen, wall_age(stamped_at, now, net_step))


def ahead(stamped_at: datetime | None, now: datetime, net_step: timedelta) -> float | None:
    """Seconds a stamp lies ahead of both readings of the wall clock (None: it does not)."""
    if stamped_at is None:
        return None
    lead = -wall_age(stamped_at, now, net_step).total_seconds()
    return lead if lead > 0 else None


def net_step(clock: ClockWatch | None) -> timedelta:
    return timedelta(seconds=clock.net_step if clock is not None else 0.0)


def reading(clock: ClockWatch | None) -> float:
    """The monotonic reading of the pass a history was brought up to date in (0: none yet)."""
    return clock.monotonic if clock is not None else 0.0
