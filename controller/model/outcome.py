"""What happened: to one object (:class:`Result`), in one pass (:class:`PassReport`), in one run.

Purely data. A removal's :class:`Result` comes back from an adapter; the executor
turns each into an :class:`ActionResult`; a pass folds them, with its plan, into
one frozen :class:`PassReport`, the record every reporter (log, progress bar,
status file, metrics) receives, in both modes. ``--once`` is a sequence of passes:
:class:`RunReport`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from controller.model.disk import DiskDrift
from controller.model.plan import DRIFT_KINDS, Kind, Mode, Plan, StoreDrift
from controller.model.records import History, Observation, Record

#: The kinds of object a pass removes, in the order it removes them.
ACTION_KINDS = (Kind.CONTAINER, Kind.SNAPSHOT, Kind.RESULT_TMP, Kind.CACHE_TMP)


class Outcome(StrEnum):
    """What became of one object a removal named."""

    REMOVED = "removed"
    #: Already gone: an idempotent removal counts this as done.
    NOT_FOUND = "not-found"
    #: containerd refused because the snapshot still has a child: retry after it.
    HAS_CHILD = "has-child"
    #: Not attempted: an earlier key of the same ``snapshots rm`` call failed, or a child did.
    NOT_TRIED = "not-tried"
    #: Not attempted: the object changed since it was planned (a snapshot re-created
    #: under the same key, a store entry for its build appeared). The next pass judges it.
    CHANGED = "changed"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (Outcome.REMOVED, Outcome.NOT_FOUND)

    @property
    def failure(self) -> bool:
        """Should have gone and did not (an object that changed under us is not a failure)."""
        return not self.done and self is not Outcome.CHANGED


@dataclass(frozen=True)
class Result:
    """An adapter's answer for one object."""

    outcome: Outcome
    message: str = ""


@dataclass(frozen=True)
class ActionResult:
    kind: Kind
    name: str
    outcome: Outcome
    message: str = ""


class Stuck(Record):
    """An object that should have gone and did not, and why."""

    kind: Kind
    name: str
    reason: str


#: The kinds the backlog is counted for, as the status file and the metrics name them.
BACKLOG_KINDS = (Kind.CONTAINER, Kind.SNAPSHOT, Kind.RESULT_TMP)
#: The states of the backlog: planned this pass, waiting out gracePeriod or staleAfter, held back
#: by maxDeletionsPerPass, stuck (should have gone and did not, or could not be judged).
BACKLOG_STATES = ("planned", "waiting", "deferred", "stuck")


class Backlog(Record):
    """One kind's backlog after a pass: what it set out to remove, and what is left waiting and why."""

    planned: int = 0
    #: Kept only for now: created (or idle) less than gracePeriod ago, unchanged less than staleAfter.
    waiting: int = 0
    #: When the first of those becomes eligible for removal (None: nothing waits).
    next_eligible: datetime | None = None
    #: Orphans held back by maxDeletionsPerPass (snapshots only).
    deferred: int = 0
    stuck: int = 0

    def count(self, state: str) -> int:
        return int(getattr(self, state))


def _by_kind(results: Iterable[ActionResult], keep: Iterable[Outcome]) -> dict[str, int]:
    wanted = set(keep)
    counts = Counter(r.kind.value for r in results if r.outcome in wanted)
    return {k.value: counts.get(k.value, 0) for k in ACTION_KINDS}


class ClockReport(Record):
    """What a pass saw of the clocks (daemon): ages are bounded by what this process watched on its
    monotonic clock, so a step changes no verdict, but an operator should know of it."""

    #: The wall clock's step since the last pass (seconds, forward positive); None: none seen.
    step: float | None = None
    #: Every step seen since the process started, added up, and how many there were.
    net_step: float = 0.0
    steps: int = 0
    #: Objects whose stamp (Created, mtime) lies ahead of the wall clock, and the farthest (seconds).
    stamped_ahead: int = 0
    most_ahead: float | None = None


class PassReport(Record):
    """One pass: what it planned, did, failed and left. The status file is one of these."""

    number: int
    mode: Mode
    #: When the pass ended.
    time: datetime
    seconds: float
    outcome: Literal["success", "error"] = "success"
    error: str | None = None
    containerd_up: bool = True
    dry_run: bool = False
    planned: dict[str, int] = Field(default_factory=dict)
    removed: dict[str, int] = Field(default_factory=dict)
    #: Planned but gone before we got there: done all the same.
    already_gone: dict[str, int] = Field(default_factory=dict)
    failed: dict[str, int] = Field(default_factory=dict)
    #: Planned removals left alone because the object changed since it was planned.
    changed: int = 0
    stuck: tuple[Stuck, ...] = ()
    #: Owned objects the pass could not judge (a container ctr could not describe): kept, with what
    #: they may use, and counted stuck until they can be judged.
    unjudged: tuple[Stuck, ...] = ()
    #: Objects still out of agreement after the pass, by drift kind (see DRIFT_KINDS).
    drift: dict[str, int] = Field(default_factory=dict)
    #: Orphan snapshots waiting: deferred by maxDeletionsPerPass, or kept only by their grace period.
    backlog: int = 0
    #: The backlog by why it waits: ``grace`` (created less than gracePeriod ago, or not yet dated)
    #: and ``deferred`` (maxDeletionsPerPass).
    waiting: dict[str, int] = Field(default_factory=dict)
    #: Per kind (container, snapshot, result-tmp): planned, waiting (and when the first is eligible),
    #: deferred, stuck. What a graph of the leak building up during the grace period reads.
    backlogs: dict[str, Backlog] = Field(default_factory=dict)
    store_drift: StoreDrift = StoreDrift()
    owned: dict[str, int] = Field(default_factory=dict)
    kept_snapshots: int = 0
    warnings: tuple[str, ...] = ()
    #: Daemon: come back after this many seconds (0: at once; None: at the next interval).
    requeue_after: float | None = None
    ctr_calls: int | None = None
    #: Daemon: the longest time from a batch's last check to the end of its removal (seconds).
    recheck_window: float | None = None
    orphan_bytes: int | None = None
    reclaimed_bytes: int | None = None
    #: Daemon: what asked for this pass (start-up, a change in the store, the interval...).
    trigger: str | None = None
    #: A failed pass: when the loop tries again (seconds), and where an unforeseen error arose.
    retry_in: float | None = None
    traceback: str | None = Field(default=None, exclude=True, repr=False)
    #: The snapshotter's folder against containerd's records (when it was looked at).
    disk: DiskDrift | None = None
    #: Daemon: a step of the wall clock, stamps ahead of it.
    clock: ClockReport | None = None
    #: The pass's plan and the daemon's memory after it: for the loop and the CLI, not the status file.
    plan: Plan | None = Field(default=None, exclude=True, repr=False)
    history: History | None = Field(default=None, exclude=True, repr=False)
    observation: Observation | None = Field(default=None, exclude=True, repr=False)

    @property
    def progress(self) -> int:
        """Objects this pass removed."""
        return sum(self.removed.values())

    @property
    def planned_total(self) -> int:
        return sum(self.planned.values())

    @staticmethod
    def counts(results: Sequence[ActionResult]) -> dict[str, dict[str, int]]:
        return {
            "removed": _by_kind(results, [Outcome.REMOVED]),
            "already_gone": _by_kind(results, [Outcome.NOT_FOUND]),
            "failed": _by_kind(results, [o for o in Outcome if o.failure]),
        }


def empty_drift() -> dict[str, int]:
    return dict.fromkeys(DRIFT_KINDS, 0)


class TrashLeft(Record):
    """What a removal moved into our trash and could not delete: gone from the store as OBuilder sees
    it, not from the disk (removed is not reclaimed)."""

    #: The trash entry's name (``result-tmp-ID-N``, ``cache-tmp-NAME-N``) and where it is.
    name: str
    path: str
    #: Bytes of the files under it (what could be read; a hard-linked file once).
    size_bytes: int
    error: str

    @property
    def stuck(self) -> Stuck:
        kind = Kind.CACHE_TMP if self.name.startswith("cache-tmp-") else Kind.RESULT_TMP
        size = f"{self.size_bytes:,}"
        return Stuck(
            kind=kind,
            name=self.name,
            reason=f"moved to the trash ({self.path}) but not deleted: {size} bytes stay on disk: {self.error}",
        )


class RunReport(Record):
    """``--once``: its passes, and how the run ended."""

    passes: tuple[PassReport, ...]
    converged: bool
    #: What is still there and why: the last pass's failures, or the pass limit.
    stuck: tuple[Stuck, ...] = ()
    seconds: float = 0.0
    ctr_calls: int | None = None
    #: containerd's garbage collection after the removals (layer folders are deleted in it),
    #: waited for: "done", why it failed, or None when nothing was removed.
    garbage_collection: str | None = None
    #: The snapshotter's folder once the run (and that collection) ended.
    disk: DiskDrift | None = None
    #: What the run's removals left in our trash (each also among ``stuck``).
    trash: tuple[TrashLeft, ...] = ()
    #: Bytes of removed snapshots whose folders stayed on disk (``rm-*`` grown during the
    #: run; known when bytes are measured): not reclaimed, though containerd's records say so.
    left_on_disk: int | None = None

    @property
    def first(self) -> PassReport:
        return self.passes[0]

    @property
    def last(self) -> PassReport:
        return self.passes[-1]

    @property
    def dry_run(self) -> bool:
        return self.first.dry_run

    @property
    def acted(self) -> int:
        """Passes that had something to do (a pass that plans nothing only confirms)."""
        return sum(1 for p in self.passes if p.planned_total and not p.dry_run)

    def total(self, field: Literal["removed", "already_gone", "failed"]) -> dict[str, int]:
        out = {k.value: 0 for k in ACTION_KINDS}
        for p in self.passes:
            for k, n in getattr(p, field).items():
                out[k] = out.get(k, 0) + n
        return out

    @property
    def orphan_bytes_at_start(self) -> int | None:
        """What the orphans held before the run (``measureBytes``)."""
        first = self.first
        return None if first.orphan_bytes is None else first.orphan_bytes + (first.reclaimed_bytes or 0)

    @property
    def exit_code(self) -> int:
        ok = self.converged and not self.stuck
        if self.dry_run:
            return 0 if ok else 3
        return 0 if ok else 1

    def as_status(self) -> PassReport:
        """The whole run as one report, for the status file: totals, and the state it left."""
        last = self.last
        ok = self.exit_code == 0
        return last.model_copy(
            update={
                "number": self.acted,
                "seconds": round(self.seconds, 3),
                "outcome": "success" if ok else "error",
                "error": None if ok else f"did not converge: {len(self.stuck)} stuck",
                "planned": self.first.planned,
                "removed": self.total("removed"),
                "already_gone": self.total("already_gone"),
                "failed": self.total("failed"),
                "changed": sum(p.changed for p in self.passes),
                "stuck": self.stuck,
                "drift": {**last.drift, "stuck": len(self.stuck)},
                "ctr_calls": self.ctr_calls,
                "reclaimed_bytes": (
                    None
                    if last.orphan_bytes is None
                    else max(0, sum(p.reclaimed_bytes or 0 for p in self.passes) - (self.left_on_disk or 0))
                ),
                "disk": self.disk or last.disk,
            }
        )
