"""The ports: all the core knows of the world, and how it reports.

Adapters implement these (``controller.adapters``: ctr, the store on disk, logs,
the status file, metrics); tests implement them in memory (``tests/support/fake.py``).
The core never imports an adapter: the CLI and the daemon wire them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from controller.model.disk import DiskDrift
from controller.model.outcome import Outcome, PassReport, Result, TrashLeft
from controller.model.plan import Kind, Plan
from controller.model.records import ContainerdState, StoreState


class ContainerdPort(Protocol):
    """containerd, as the core needs it; "not found" comes back as done."""

    @property
    def calls(self) -> int:
        """Calls made so far (ctr processes started), for the reports."""
        ...

    def observe(self) -> ContainerdState: ...

    def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
        """containerd's Created of each key; None for a key that is gone."""
        ...

    def delete_tasks(self, ids: Sequence[str]) -> dict[str, Result]: ...

    def remove_containers(self, ids: Sequence[str]) -> dict[str, Result]: ...

    def remove_snapshots(self, keys: Sequence[str]) -> dict[str, Result]: ...

    def usage(self, keys: Sequence[str]) -> dict[str, int]:
        """Bytes each snapshot holds; keys it cannot measure are left out."""
        ...

    def collect_garbage(self) -> Result:
        """containerd's garbage collection, now, returning once it has finished.

        Removing a snapshot drops containerd's record of it; its layer folder goes in a
        later collection. After this the disk is back (or the failure says why not)."""
        ...


class DiskPort(Protocol):
    """The snapshotter's own folder: what lies on disk that containerd's records do not know."""

    @property
    def calls(self) -> int:
        """ctr processes started so far."""
        ...

    def observe_states(self, containerd: ContainerdState, store: StoreState) -> DiskDrift:
        """Folders no snapshot owns (``rm-*`` a collection could not delete...), with their bytes."""
        ...

    def reclaimed(self, removed_bytes: int | None, drift: DiskDrift | None) -> int | None:
        """Of the bytes containerd measured for the snapshots removed, those that left the disk."""
        ...


class StorePort(Protocol):
    """The OBuilder store: read whole, asked about one entry, and its leftovers removed."""

    def observe(self) -> StoreState: ...

    def has_entry(self, area: str, entry_id: str) -> bool: ...

    def remove_tmp_entry(self, entry_id: str) -> Result: ...

    def remove_cache_tmp(self, name: str) -> Result: ...

    def empty_trash(self) -> tuple[TrashLeft, ...]:
        """Delete what our trash holds; what stays, with its bytes and why."""
        ...


class Clock(Protocol):
    def now(self) -> datetime:
        """The wall clock: it can step (a VM resumed, a time sync)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps, for what this process watches itself."""
        ...


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


class Reporter:
    """Hooks with do-nothing bodies: the core calls them, adapters draw, log, count and write."""

    def pass_started(self, number: int, plan: Plan) -> None:
        """A pass has planned and is about to act."""

    def removed(self, kind: Kind, name: str, reason: str, outcome: Outcome) -> None:
        """One object is gone (``outcome`` is REMOVED or NOT_FOUND)."""

    def failed(self, kind: Kind, name: str, result: Result) -> None:
        """One removal did not happen (or was left alone: CHANGED); the next pass looks again."""

    def pass_finished(self, report: PassReport) -> None:
        """A pass is over, successful or not; ``report`` says how it went."""


class Reporters(Reporter):
    """Fans each call out to several reporters, in order."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def pass_started(self, number: int, plan: Plan) -> None:
        for r in self.reporters:
            r.pass_started(number, plan)

    def removed(self, kind: Kind, name: str, reason: str, outcome: Outcome) -> None:
        for r in self.reporters:
            r.removed(kind, name, reason, outcome)

    def failed(self, kind: Kind, name: str, result: Result) -> None:
        for r in self.reporters:
            r.failed(kind, name, result)

    def pass_finished(self, report: PassReport) -> None:
        for r in self.reporters:
            r.pass_finished(report)


@dataclass(frozen=True)
class Ports:
    """Everything a pass touches."""

    containerd: ContainerdPort
    store: StorePort
    reporter: Reporter
    clock: Clock
    #: The snapshotter's folder as it is on disk; None: not looked at.
    disk: DiskPort | None = None
