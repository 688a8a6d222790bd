"""An in-memory containerd and store with containerd's rules, for fast planner tests.

Rules kept: a snapshot with a child cannot be removed, nor one a container uses
(Windows holds a container's layers open); removing what is gone is "not found";
a container's task must be deleted (``--force`` kills it) before the container;
``containers rm --keep-snapshot`` leaves the snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from controller.core.ages import stamp_of
from controller.core.ports import Clock, Ports, Reporter
from controller.model.outcome import Outcome, Result, TrashLeft
from controller.model.records import (
    Container,
    ContainerdState,
    History,
    Snapshot,
    StoreState,
    Task,
    TaskStatus,
    Watch,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class FakeContainerd:
    parents: dict[str, str | None] = field(default_factory=dict)
    containers: dict[str, Container] = field(default_factory=dict)
    tasks: dict[str, TaskStatus] = field(default_factory=dict)
    calls: int = 0
    #: Keys containerd refuses "with child" although none is listed (the known bug).
    phantom_children: set[str] = field(default_factory=set)
    #: containerd's Created of each snapshot (``snapshots info``); a key without one reads as epoch 0.
    created: dict[str, datetime] = field(default_factory=dict)
    #: Bytes each snapshot holds (``snapshots usage``).
    sizes: dict[str, int] = field(default_factory=dict)
    #: Removed snapshots whose layer folder waits for containerd's garbage collection.
    uncollected: set[str] = field(default_factory=set)
    collections: int = 0

    @classmethod
    def from_state(cls, state: ContainerdState) -> FakeContainerd:
        return cls(
            parents={s.key: s.parent for s in state.snapshots},
            containers={c.id: c for c in state.containers},
            tasks={t.id: t.status for t in state.tasks},
            created={s.key: s.created for s in state.snapshots if s.created is not None},
        )

    def observe(self) -> ContainerdState:
        # Like `ctr snapshots ls`: no creation times; `snapshot_created` reads them.
        return ContainerdState(
            snapshots=tuple(Snapshot(key=k, parent=p) for k, p in self.parents.items()),
            containers=tuple(self.containers.values()),
            tasks=tuple(Task(id=i, status=s) for i, s in self.tasks.items()),
        )

    def usage(self, keys: Sequence[str]) -> dict[str, int]:
        self.calls += 1
        return {k: self.sizes.get(k, 0) for k in keys if k in self.parents}

    def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
        self.calls += len(keys)
        return {k: self.created.get(k, _EPOCH) if k in self.parents else None for k in keys}

    def collect_garbage(self) -> Result:
        self.calls += 2
        self.collections += 1
        self.uncollected.clear()
        return Result(Outcome.REMOVED)

    def recreate(self, key: str, parent: str | None, when: datetime) -> None:
        """OBuilder's ``snapshot rm KEY`` then ``snapshot prepare KEY PARENT``: same key, new snapshot."""
        self.parents[key] = parent
        self.created[key] = when

    def delete_tasks(self, ids: Sequence[str]) -> dict[str, Result]:
        self.calls += 1
        out = {}
        for i in ids:
            out[i] = Result(Outcome.REMOVED) if self.tasks.pop(i, None) is not None else Result(Outcome.NOT_FOUND)
        return out

    def remove_containers(self, ids: Sequence[str]) -> dict[str, Result]:
        self.calls += 1
        out = {}
        for i in ids:
            if i not in self.containers:
                out[i] = Result(Outcome.NOT_FOUND, "not found")
            elif self.tasks.get(i) in (TaskStatus.RUNNING, TaskStatus.PAUSED):
                out[i] = Result(Outcome.FAILED, "cannot delete a non stopped container")
            else:
                del self.containers[i]
                self.tasks.pop(i, None)
                out[i] = Result(Outcome.REMOVED)
        return out

    def remove_snapshots(self, keys: Sequence[str]) -> dict[str, Result]:
        out: dict[str, Result] = {}
        pending = list(keys)
        while pending:  # like ctr: one call stops at the first failure
            self.calls += 1
            for n, key in enumerate(pending):
                if key not in self.parents:
                    out[key] = Result(Outcome.NOT_FOUND, "not found")
                elif any(c.snapshot_key == key for c in self.containers.values()):
                    # As on Windows, where a container holds its layers open.
                    out[key] = Result(Outcome.FAILED, "snapshot in use by a container")
                elif key in self.phantom_children or any(p == key for p in self.parents.values()):
                    out[key] = Result(Outcome.HAS_CHILD, "cannot remove snapshot with child: failed precondition")
                else:
                    del self.parents[key]
                    self.created.pop(key, None)
                    self.uncollected.add(key)
                    out[key] = Result(Outcome.REMOVED)
                    continue
                pending = pending[n + 1 :]
                break
            else:
                pending = []
        return out


@dataclass
class FakeStore:
    state: StoreState
    removed: list[str] = field(default_factory=list)
    #: What stays in the trash whatever is tried.
    trash: tuple[TrashLeft, ...] = ()

    @staticmethod
    def empty() -> StoreState:
        return StoreState(root="/store")

    def observe(self) -> StoreState:
        return self.state

    def has_entry(self, area: str, entry_id: str) -> bool:
        entries = self.state.results if area == "result" else self.state.tmp
        return any(e.id == entry_id for e in entries)

    def remove_tmp_entry(self, entry_id: str) -> Result:
        before = len(self.state.tmp)
        tmp = tuple(e for e in self.state.tmp if e.id != entry_id)
        self.state = self.state.model_copy(update={"tmp": tmp})
        self.removed.append(f"result-tmp/{entry_id}")
        return Result(Outcome.REMOVED if len(tmp) < before else Outcome.NOT_FOUND)

    def empty_trash(self) -> tuple[TrashLeft, ...]:
        return self.trash

    def remove_cache_tmp(self, name: str) -> Result:
        rest = tuple(n for n in self.state.cache_tmp if n != name)
        found = len(rest) < len(self.state.cache_tmp)
        self.state = self.state.model_copy(update={"cache_tmp": rest})
        self.removed.append(f"cache-tmp/{name}")
        return Result(Outcome.REMOVED if found else Outcome.NOT_FOUND)


@dataclass
class FakeClock:
    """A clock that moves only when told to: ``advance`` moves the wall and the monotonic clock
    alike (time passes), ``step`` the wall clock alone (a VM resumed, a time sync)."""

    at: datetime
    mono: float = 1000.0

    def now(self) -> datetime:
        return self.at

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def watched(fake: FakeContainerd, seconds: float, **more: dict[str, Watch]) -> History:
    """A daemon's memory that has watched every snapshot of ``fake`` for ``seconds`` under its
    present Created: what a test that is about something else than ages needs for the grace
    period to have run out (ages never exceed what the daemon watched)."""
    # A history not yet brought up to date by a pass reads the monotonic clock as 0: since -seconds.
    snapshots = {k: Watch(stamp=stamp_of(fake.created.get(k, _EPOCH)), since=-seconds) for k in fake.parents}
    return History(snapshots=snapshots, **more)


def fake_ports(
    containerd: FakeContainerd, store: FakeStore, clock: Clock | None = None, reporter: Reporter | None = None
) -> Ports:
    return Ports(
        containerd=containerd,
        store=store,
        reporter=reporter or Reporter(),
        clock=clock or FakeClock(datetime(2026, 11, 29, tzinfo=UTC)),
    )
