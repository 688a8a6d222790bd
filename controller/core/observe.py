"""A pass's look at the world: both sides observed, the clocks read, the daemon's memory brought
up to date, and the snapshotter's folder when it is due.

containerd before the store: a build that starts after the listing is not in it, and one that
starts before it (prepare, then ``result-tmp/``) is in both or young; what changes after is
caught by the last look before each removal (daemon, controller.core.identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from controller.core import ages
from controller.core.options import PassOptions
from controller.core.ports import Ports
from controller.model.disk import DiskDrift
from controller.model.records import LIVE_TASKS, ContainerdState, History, Observation, StoreState

#: After removals, the collector deletes their folders within a second or so; until then a
#: folder of a removed snapshot would look like one containerd does not know.
DISK_SETTLE = timedelta(seconds=60)


@dataclass(frozen=True)
class Look:
    """What one pass saw, and when."""

    observation: Observation
    now: datetime
    clock: ages.ClockRead
    #: The snapshotter's folder, when this pass looked at it.
    disk: DiskDrift | None
    #: ctr processes the look at the disk started.
    disk_calls: int


def look(ports: Ports, options: PassOptions, history: History) -> Look:
    containerd = ports.containerd.observe()
    store = ports.store.observe()
    now, monotonic = ports.clock.now(), ports.clock.monotonic()
    clock = ages.watch_clock(history.clock, now, monotonic)
    history = remember(history, containerd, store, clock)
    disk, disk_calls = None, 0
    if ports.disk is not None and _disk_due(options, history, monotonic):
        before = ports.disk.calls
        disk = ports.disk.observe_states(containerd, store)
        disk_calls = ports.disk.calls - before
        history = history.model_copy(update={"disk_looked_at": monotonic})
    return Look(Observation(store=store, containerd=containerd, history=history), now, clock, disk, disk_calls)


def _disk_due(options: PassOptions, history: History, monotonic: float) -> bool:
    if options.disk_every is None:
        return False
    looked, removed = history.disk_looked_at, history.snapshots_removed_at
    return (looked is None or monotonic - looked >= options.disk_every.total_seconds()) and (
        removed is None or monotonic - removed >= DISK_SETTLE.total_seconds()
    )


def remember(history: History, containerd: ContainerdState, store: StoreState, clock: ages.ClockRead) -> History:
    """The daemon's memory, brought up to date with one observation: how long this process has
    watched each object in its present state (see controller.core.ages). What went is forgotten;
    an object under a new stamp (ids and keys repeat) is watched from zero. A snapshot's Created
    is read later in the pass, where it decides something (``plan_with_ages`` restamps)."""
    live = {t.id for t in containerd.tasks if t.status in LIVE_TASKS}
    idle_now = {c.id: ages.container_stamp(c) for c in containerd.containers if c.id not in live}
    live_now = {c.id: ages.container_stamp(c) for c in containerd.containers if c.id in live}
    snapshots_now: dict[str, str | None] = {
        s.key: None if s.created is None else ages.stamp_of(s.created) for s in containerd.snapshots
    }
    now = clock.clock.monotonic
    return history.model_copy(
        update={
            "clock": clock.clock,
            "snapshots": ages.carry(history.snapshots, snapshots_now, now),
            "idle_containers": ages.carry(history.idle_containers, idle_now, now),
            "live_containers": ages.carry(history.live_containers, live_now, now),
            "tmp_entries": ages.carry(history.tmp_entries, {e.id: ages.entry_stamp(e) for e in store.tmp}, now),
        }
    )
