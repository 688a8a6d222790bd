"""The plan: what one pass will remove, in order, and why everything else stays.

Purely data: the planner builds a :class:`Plan`, the executor runs it, the report
renders it. Every action and every decision carries a reason a human can read.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import Field

from controller.model.policy import ReconcilePolicySpec
from controller.model.records import Record, TaskStatus


class Mode(StrEnum):
    """Boot: the worker is not running, so every leftover is dead. Daemon: a worker may be live."""

    BOOT = "boot"
    DAEMON = "daemon"


#: Drift kinds, as the metrics and the status file name them.
DRIFT_KINDS = (
    "orphan_snapshots",
    "leftover_containers",
    "stale_result_tmp",
    "db_rows_without_result",
    "results_without_row",
    "results_missing_snapshot",
    "stuck",
)


class Kind(StrEnum):
    """The kinds of object a plan judges."""

    SNAPSHOT = "snapshot"
    CONTAINER = "container"
    RESULT = "result"
    RESULT_TMP = "result-tmp"
    CACHE_TMP = "cache-tmp"


class Rule(StrEnum):
    """Why an object stays or goes; ``--explain`` names it."""

    # Keep rules for snapshots (their priority is the planner's KEEP_PRIORITY).
    CONTAINER = "container"
    RESULT = "result"
    LIVE_BUILD = "live-build"
    UNREADABLE = "unreadable-layerinfo"
    PROTECTED = "protected"
    FOREIGN_CHILD = "foreign-child"
    ANCESTOR = "ancestor"
    GRACE = "grace"
    # Containers and store entries.
    RUNNING = "running"
    LEFTOVER = "leftover"
    INTERRUPTED = "interrupted"
    # What is not kept.
    ORPHAN = "orphan"


class Decision(Record):
    """Why one object stays or goes: the answer to ``--explain``."""

    kind: Kind
    name: str
    keep: bool
    rule: Rule
    reason: str


class ContainerRemoval(Record):
    """Remove a container (and kill its task first, if it has one).

    Its own snapshot is kept by the removal (``--keep-snapshot``) and judged like
    every other snapshot, so we never delete a snapshot with children or a kept one
    as a side effect. (containerd's own GC may still collect a snapshot that ``ctr
    run IMAGE`` made for the container, as it carries no ``gc.root`` label; OBuilder's
    snapshots do.)
    """

    id: str
    task: TaskStatus
    reason: str


class TmpRemoval(Record):
    id: str
    #: Snapshot keys that must be gone (or kept) before the directory goes: the
    #: directory is the only record of which snapshot the build used.
    after: tuple[str, ...]
    reason: str


class CacheTmpRemoval(Record):
    name: str
    reason: str


class StoreDrift(Record):
    """Disagreements inside the store that containerd cannot explain (reported, not repaired)."""

    rows_without_result: tuple[str, ...] = ()
    results_without_row: tuple[str, ...] = ()
    results_missing_snapshot: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return len(self.rows_without_result) + len(self.results_without_row) + len(self.results_missing_snapshot)


class Plan(Record):
    mode: Mode
    containers: tuple[ContainerRemoval, ...] = ()
    #: Orphan snapshot keys by level, leaves first: every key of a level may be removed
    #: once all earlier levels are gone, so one ``ctr`` call per level suffices.
    snapshot_levels: tuple[tuple[str, ...], ...] = ()
    #: Why each orphan (planned or deferred) goes, and the parent of each planned one.
    #: Plain maps, not a record each: a week-old store has tens of thousands of orphans.
    snapshot_reasons: dict[str, str] = Field(default_factory=dict, repr=False)
    snapshot_parents: dict[str, str | None] = Field(default_factory=dict, repr=False)
    #: Daemon: containerd's Created of each orphan as planned. Right before a removal the
    #: key is asked again; a different Created means it was re-created since (build ids
    #: repeat) and it is left alone.
    snapshot_created: dict[str, datetime] = Field(default_factory=dict, repr=False)
    #: Daemon: owned snapshots no rule but grace keeps whose age was not read: the pass
    #: reads their Created (only theirs) and plans again.
    unaged: tuple[str, ...] = Field(default=(), repr=False)
    #: The orphans each leftover container uses: they (and their ancestors) go only once
    #: that container has gone (Windows holds a container's layers while its compute
    #: system lives); every other level is removed while the containers are.
    pinned_by: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    #: Leftover containers that run on a folder no build names: it could be any orphan's,
    #: so every snapshot waits for them, and stays while one of them does.
    runs_on_unknown: tuple[str, ...] = ()
    tmp_entries: tuple[TmpRemoval, ...] = ()
    cache_tmp: tuple[CacheTmpRemoval, ...] = ()
    #: Orphans left for a later pass by ``maxDeletionsPerPass``.
    deferred: tuple[str, ...] = ()
    #: Why each object other than a snapshot stays or goes.
    decisions: tuple[Decision, ...] = Field(default=(), repr=False)
    #: Why each kept snapshot stays: (rule, reason) by key. A plain map, not a Decision each, for the
    #: same reason as snapshot_reasons; ``kept`` and ``decision_for`` give them as decisions.
    snapshot_keeps: dict[str, tuple[Rule, str]] = Field(default_factory=dict, repr=False)
    drift: StoreDrift = StoreDrift()
    #: Things a human must look at that block no action (an unreadable layerinfo...).
    warnings: tuple[str, ...] = ()
    #: Daemon: the soonest an object kept only for now (grace, staleAfter) may go;
    #: the loop comes back then rather than a whole interval later.
    requeue_after: timedelta | None = None
    #: Daemon: objects whose stamp (Created, mtime) lies ahead of this clock, by name, with how
    #: far (seconds): a clock was set back, or another runs ahead. Kept until it catches up.
    stamped_ahead: dict[str, float] = Field(default_factory=dict)
    #: Daemon: by kind, when each object kept only for now (grace, staleAfter) may go (None: its
    #: age is not read yet). The backlog's "waiting" and "next eligible".
    waiting_until: dict[Kind, tuple[datetime | None, ...]] = Field(default_factory=dict)

    @property
    def pinned(self) -> tuple[str, ...]:
        """Every orphan some leftover container uses."""
        return tuple(sorted({k for keys in self.pinned_by.values() for k in keys}))

    @property
    def containers_first(self) -> bool:
        """Every snapshot waits for the containers (one runs on a folder no build names)."""
        return bool(self.runs_on_unknown)

    @property
    def snapshots(self) -> tuple[str, ...]:
        """Planned orphan keys, leaves first."""
        return tuple(k for level in self.snapshot_levels for k in level)

    @property
    def action_count(self) -> int:
        return (
            len(self.containers)
            + sum(len(level) for level in self.snapshot_levels)
            + len(self.tmp_entries)
            + len(self.cache_tmp)
        )

    @property
    def empty(self) -> bool:
        return self.action_count == 0

    def drift_counts(self) -> dict[str, int]:
        """Objects out of agreement, by drift kind (see DRIFT_KINDS)."""
        d = self.drift
        return {
            "orphan_snapshots": sum(len(level) for level in self.snapshot_levels) + len(self.deferred),
            "leftover_containers": len(self.containers),
            "stale_result_tmp": len(self.tmp_entries),
            "db_rows_without_result": len(d.rows_without_result),
            "results_without_row": len(d.results_without_row),
            "results_missing_snapshot": len(d.results_missing_snapshot),
            "stuck": 0,
        }

    def kept(self, kind: Kind) -> list[Decision]:
        """The decisions to keep objects of ``kind``."""
        if kind is Kind.SNAPSHOT:
            return [self._snapshot_kept(k) for k in sorted(self.snapshot_keeps)]
        return [d for d in self.decisions if d.keep and d.kind == kind]

    def _snapshot_kept(self, key: str) -> Decision:
        rule, reason = self.snapshot_keeps[key]
        return Decision(kind=Kind.SNAPSHOT, name=key, keep=True, rule=rule, reason=reason)

    def decision_for(self, name: str) -> list[Decision]:
        found = [d for d in self.decisions if d.name == name]
        if name in self.snapshot_keeps:
            found.append(self._snapshot_kept(name))
        if name in self.snapshot_reasons:
            found.append(
                Decision(
                    kind=Kind.SNAPSHOT, name=name, keep=False, rule=Rule.ORPHAN, reason=self.snapshot_reasons[name]
                )
            )
        return found


_DEFAULTS = ReconcilePolicySpec()


class PlanOptions(Record):
    """What the planner needs to know beyond the observation: ownership, protection, timing.

    Every default is the policy model's (:class:`ReconcilePolicySpec`), the one home of defaults.
    """

    snapshot_prefix: str = _DEFAULTS.ownership.snapshot_prefix
    container_prefix: str = _DEFAULTS.ownership.container_prefix
    #: Globs (fnmatch, case-sensitive) over snapshot keys that are never removed.
    protect_keys: tuple[str, ...] = _DEFAULTS.protect.snapshot_keys
    #: Base image references, protected as ``obuilder-base-SHA256`` and its ``-committed``.
    protect_images: tuple[str, ...] = _DEFAULTS.protect.base_images
    grace_period: timedelta = _DEFAULTS.timing.grace_period
    stale_after: timedelta = _DEFAULTS.timing.stale_after
    #: Daemon mode: a running task older than this is killed. None: never.
    max_task_age: timedelta | None = _DEFAULTS.timing.max_task_age
    #: None: no limit (boot removes everything; the daemon paces itself with the policy's).
    max_deletions_per_pass: int | None = None

    @classmethod
    def from_spec(cls, spec: ReconcilePolicySpec, mode: Mode) -> PlanOptions:
        return cls(
            snapshot_prefix=spec.ownership.snapshot_prefix,
            container_prefix=spec.ownership.container_prefix,
            protect_keys=spec.protect.snapshot_keys,
            protect_images=spec.protect.base_images,
            grace_period=spec.timing.grace_period,
            stale_after=spec.timing.stale_after,
            max_task_age=spec.timing.max_task_age,
            # A daemon paces itself beside a worker; at boot, remove it all.
            max_deletions_per_pass=spec.limits.max_deletions_per_pass if mode is Mode.DAEMON else None,
        )
