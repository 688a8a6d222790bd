"""Immutable records of what the observers saw: the store and containerd.

Purely data: no I/O. Observers build these; the planner reads them; a JSON case
in ``tests/cases`` is the same records serialised, so a fake world can stand in
for the real one.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LayerInfo(Record):
    """OBuilder's ``layerinfo``: which snapshot backs a build step, and its folders."""

    snapshot_key: str
    source: str
    parent_layer_paths: tuple[str, ...]


class StoreEntry(Record):
    """One directory under ``result/`` or ``result-tmp/``."""

    id: str
    area: Literal["result", "result-tmp"]
    layerinfo: LayerInfo | None = None
    layerinfo_path: str | None = None
    #: Set when a layerinfo exists but does not parse ("path:line:column: message").
    layerinfo_error: str | None = None
    #: ``rootfs/`` exists: a base image (pulled) rather than a build step.
    has_rootfs: bool = False
    #: The entry itself is a symlink or junction (never followed when removing).
    is_link: bool = False
    #: The newest modification time seen in the entry (for ``staleAfter``).
    changed_at: datetime | None = None
    #: A digest of what ``changed_at`` was read from (inode, size, mtime and ctime of the entry
    #: and its top files): any change is a new state, even one whose mtime a step of the clock
    #: set back. ``staleAfter`` counts from when this process first saw these stamps.
    stamps: str | None = None

    @property
    def fallback_keys(self) -> tuple[str, ...]:
        """Keys OBuilder uses when there is no layerinfo: ``obuilder-ID``, bases ``obuilder-base-ID``."""
        if self.has_rootfs:
            return (f"obuilder-base-{self.id}", f"obuilder-{self.id}")
        return (f"obuilder-{self.id}",)

    @property
    def snapshot_keys(self) -> tuple[str, ...]:
        """The active snapshot keys this entry may stand for."""
        if self.layerinfo is not None:
            return (self.layerinfo.snapshot_key,)
        return self.fallback_keys


class DbRow(Record):
    """A row of OBuilder's ``builds`` table."""

    id: str
    rc: int | None = None
    used: str | None = None
    parent: str | None = None


class StoreState(Record):
    """Everything the store observer read, in one pass."""

    root: str
    results: tuple[StoreEntry, ...] = ()
    tmp: tuple[StoreEntry, ...] = ()
    cache_tmp: tuple[str, ...] = ()
    db_rows: tuple[DbRow, ...] = ()


class TaskStatus(StrEnum):
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    CREATED = "CREATED"
    PAUSED = "PAUSED"
    PAUSING = "PAUSING"
    UNKNOWN = "UNKNOWN"
    ABSENT = "ABSENT"


#: A task in one of these is a build under way: its container is never idle.
LIVE_TASKS = frozenset({TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.PAUSING, TaskStatus.CREATED})


class Snapshot(Record):
    key: str
    parent: str | None = None
    kind: str = "Committed"
    #: containerd's own creation time (``ctr snapshots info``): the snapshot's identity,
    #: as keys are deleted and re-created. Read only where it decides something (daemon
    #: mode, for snapshots a plan would remove); None when not read.
    created: datetime | None = None


class Container(Record):
    """An owned container, from ``ctr containers info``.

    A non-owned container is listed by id only: we never ask containerd about it.
    """

    id: str
    image: str = ""
    snapshot_key: str = ""
    snapshotter: str = ""
    #: ``Spec.root.path`` (Linux: equals a snapshot's mount source with ``ctr run --rootfs``).
    root_path: str = ""
    #: ``Spec.windows.layerFolders``: parents first, the step's own folder last.
    layer_folders: tuple[str, ...] = ()
    created_at: datetime | None = None


class Task(Record):
    id: str
    pid: int | None = None
    status: TaskStatus = TaskStatus.UNKNOWN


class ContainerdState(Record):
    """Everything the containerd observer read, in one pass."""

    snapshots: tuple[Snapshot, ...] = ()
    containers: tuple[Container, ...] = ()
    #: Ids of containers we do not own: listed so we know they exist, never inspected.
    foreign_containers: tuple[str, ...] = ()
    tasks: tuple[Task, ...] = ()
    #: Owned containers ctr could not describe, with why: we cannot judge them, so they are
    #: never touched (and listed among the foreign ones) and what they may use is kept.
    uninspectable: dict[str, str] = Field(default_factory=dict)


def container_identity(c: Container) -> str:
    """A container's id and creation time: ``obuilder-run-N`` ids repeat, so an id alone
    would carry one container's idle time over to the next one of that name."""
    return f"{c.id}@{c.created_at.isoformat() if c.created_at else '?'}"


class Watch(Record):
    """Since when this process has watched one object in one state, on its monotonic clock.

    ``stamp`` is what makes the state (a snapshot's Created, a container's creation time, a
    ``result-tmp/`` entry's stamps): names repeat, so time watched under another stamp is
    another object's and counts for nothing. ``since`` is a reading of the monotonic clock
    (``History.clock.monotonic`` is the current pass's): an unchanged watch is carried from pass
    to pass as it is, so a store of 50,000 objects costs no new record a pass."""

    stamp: str
    since: float = 0.0


class ClockWatch(Record):
    """The wall clock against the monotonic one, pass to pass: how a step is seen.

    Between two passes both clocks advance alike unless the wall clock was stepped (a VM
    resumed, a time sync at boot); the difference of their offsets is the step."""

    #: The monotonic reading at the last pass (seconds, this process's own clock).
    monotonic: float
    #: Wall minus monotonic at the last pass (seconds).
    offset: float
    #: Every step seen since this process started, added up (seconds; forward is positive).
    net_step: float = 0.0
    #: How many steps were seen.
    steps: int = 0


class History(Record):
    """What the loop remembers between passes (daemon mode). Empty at boot and in a one-off look.

    Every age that decides a removal is bounded by how long this process has itself watched
    the object in that state (``Watch``), so no step of the wall clock can make a young object
    look old: by key and Created for snapshots, by id and creation time for containers (idle,
    or running for maxTaskAge), by id and stamps for ``result-tmp/`` entries."""

    snapshots: dict[str, Watch] = {}
    #: Containers with no live task, watched since first seen so (the idle time the grace period reads).
    idle_containers: dict[str, Watch] = {}
    #: Containers whose task is live, watched since first seen so (for maxTaskAge).
    live_containers: dict[str, Watch] = {}
    tmp_entries: dict[str, Watch] = {}
    clock: ClockWatch | None = None
    #: When the snapshotter's folder was last looked at, and when snapshots were last removed
    #: (monotonic seconds): the disk is looked at once a resync interval, never while a
    #: collection may be under way.
    disk_looked_at: float | None = None
    snapshots_removed_at: float | None = None


class Observation(Record):
    store: StoreState
    containerd: ContainerdState
    history: History = History()
