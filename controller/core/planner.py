"""The planner: a pure function from what was observed to what one pass removes.

No I/O, no clock, no logging: ``plan(observation, options, now, mode)`` reads the
records and returns a :class:`~controller.model.plan.Plan`. It applies DESIGN.md's
keep rules; everything owned and not kept is an orphan, removed leaves first.

Each keep rule is a small function that claims snapshot keys, each claim a
``(key, rule, reason)``. The claims are merged by :data:`KEEP_PRIORITY`: when several
rules keep one snapshot, the one earliest in that tuple explains it, whatever order
the rules run in, so ``--explain`` gives one answer. The ancestors of everything kept
are kept (:attr:`Rule.ANCESTOR`); grace applies after them, to what nothing else keeps, so
only those snapshots are asked their age; then what a container ctr could not describe may
use, to what even grace does not keep.
"""

from __future__ import annotations

import gc
import hashlib
import ntpath
import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import NamedTuple

from controller.core import ages
from controller.model.plan import (
    CacheTmpRemoval,
    ContainerRemoval,
    Decision,
    Kind,
    Mode,
    Plan,
    PlanOptions,
    Rule,
    StoreDrift,
    TmpRemoval,
)
from controller.model.records import LIVE_TASKS, Container, Observation, StoreEntry, TaskStatus, Watch

#: Which rule explains a snapshot that several keep: the first of these that claims it.
KEEP_PRIORITY: tuple[Rule, ...] = (
    Rule.CONTAINER,
    Rule.RESULT,
    Rule.LIVE_BUILD,
    Rule.UNREADABLE,
    Rule.PROTECTED,
    Rule.FOREIGN_CHILD,
    Rule.ANCESTOR,
    Rule.GRACE,
)
_RANK = {rule: n for n, rule in enumerate(KEEP_PRIORITY)}

_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:|\\\\)|\\")
_ORPHAN = (
    "no result/ entry names it, no live build, no protection rule matches, "
    "no kept container uses it, and nothing kept descends from it"
)


def base_image_key(reference: str) -> str:
    """OBuilder's snapshot key for a base image: ``obuilder-base-`` + SHA256 of the reference."""
    return "obuilder-base-" + hashlib.sha256(reference.encode()).hexdigest()


def path_identity(path: str) -> str:
    """A form of a folder path in which two spellings of one folder compare equal.

    Windows paths (drive letter, UNC or backslashes) compare case-insensitively
    with either slash; others as POSIX. Decided by the path's shape, not the host,
    so Windows inputs are planned the same on any machine.
    """
    if _WINDOWS_PATH.search(path):
        return ntpath.normcase(ntpath.normpath(path))
    return posixpath.normpath(path)


class Claim(NamedTuple):
    """A keep rule's verdict on one snapshot key (a tuple: a large store makes many)."""

    key: str
    rule: Rule
    reason: str


@dataclass
class _World:
    """The observation, indexed once for the rules."""

    observation: Observation
    options: PlanOptions
    now: datetime
    mode: Mode
    parent_of: dict[str, str | None]
    owned: set[str]
    #: Which build each layer folder and each key belongs to (for containers).
    folder_owner: dict[str, StoreEntry]
    key_owner: dict[str, StoreEntry]
    kept_containers: list[Container] = field(default_factory=list)
    leftover_containers: list[Container] = field(default_factory=list)
    #: ``area/id`` of the builds a kept container uses: live whatever their age.
    used_entries: set[str] = field(default_factory=set)
    live_tmp: list[StoreEntry] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: By kind, when each object kept only for now (grace, staleAfter) may go (None: not dated).
    waiting: dict[Kind, list[datetime | None]] = field(default_factory=lambda: defaultdict(list))
    #: Objects whose stamp lies ahead of this clock, and by how many seconds.
    ahead: dict[str, float] = field(default_factory=dict)

    def age(self, watches: Mapping[str, Watch], name: str, stamp: str, stamped_at: datetime | None) -> timedelta:
        """An age that may decide a removal (see controller.core.ages): never more than this
        process has watched the object in this state, nor than its wall-clock age."""
        clock = self.observation.history.clock
        step = ages.net_step(clock)
        lead = ages.ahead(stamped_at, self.now, step)
        if lead is not None:
            self.ahead[name] = lead
        return ages.age(watches.get(name), stamp, stamped_at, self.now, step, ages.reading(clock))

    def wait(self, kind: Kind, period: timedelta, age: timedelta | None) -> None:
        self.waiting[kind].append(None if age is None else self.now + max(period - age, timedelta(0)))


# -- the keep rules ---------------------------------------------------------------------


def keep_what_kept_containers_use(w: _World) -> Iterator[Claim]:
    """Rule 4: a kept container keeps its snapshot, and the build whose folder it runs on."""
    for c in w.kept_containers:
        if c.snapshot_key:
            yield Claim(c.snapshot_key, Rule.CONTAINER, f"container {c.id} uses it as its snapshot")
        for folder, user in _builds_run_on(c, w.folder_owner):
            why = f"container {c.id} runs on its folder {folder} ({user.area}/{user.id})"
            for key in _active_and_committed(user):
                yield Claim(key, Rule.CONTAINER, why)


def keep_results(w: _World) -> Iterator[Claim]:
    """Rule 1: a finished result keeps its committed snapshot."""
    for e in w.observation.store.results:
        if e.layerinfo_error is None:
            for key in e.snapshot_keys:
                yield Claim(key + "-committed", Rule.RESULT, f"result/{e.id} exists (its snapshot is {key})")


def keep_live_builds(w: _World) -> Iterator[Claim]:
    """Rule 2: a live build keeps its active and committed snapshot."""
    for e in w.live_tmp:
        for key in e.snapshot_keys:
            for k in (key, key + "-committed"):
                yield Claim(k, Rule.LIVE_BUILD, f"result-tmp/{e.id} is a live build")


def keep_what_unreadable_layerinfo_could_name(w: _World) -> Iterator[Claim]:
    """We cannot know which snapshot such an entry names: every key OBuilder could have used stays.

    At boot an interrupted build's is removed instead (its keys are OBuilder's derived ones).
    """
    for e in (*w.observation.store.results, *w.observation.store.tmp):
        if e.layerinfo_error is None or (e.area == "result-tmp" and w.mode is Mode.BOOT):
            continue
        why = f"{e.area}/{e.id} has an unreadable layerinfo; kept until a human looks"
        for key in e.fallback_keys:
            yield Claim(key, Rule.UNREADABLE, why)
            yield Claim(key + "-committed", Rule.UNREADABLE, why)


def keep_protected(w: _World) -> Iterator[Claim]:
    """Rule 3: the policy protects keys by glob and base images by reference."""
    owned = sorted(w.owned) if w.options.protect_keys else []
    for pattern in w.options.protect_keys:
        matched = [k for k in owned if fnmatchcase(k, pattern)]
        for k in matched:
            yield Claim(k, Rule.PROTECTED, f"protected by snapshotKeys glob {pattern!r}")
        if not matched:
            w.warnings.append(f"protection rule snapshotKeys {pattern!r} matches no snapshot")
    for ref in w.options.protect_images:
        base = base_image_key(ref)
        found = [k for k in (base, base + "-committed") if k in w.owned]
        for k in found:
            yield Claim(k, Rule.PROTECTED, f"protected base image {ref}")
        if not found:
            w.warnings.append(f"protection rule baseImages {ref!r} ({base}) matches no snapshot")


def keep_parents_of_foreign_snapshots(w: _World) -> Iterator[Claim]:
    """An owned snapshot under one we do not own cannot go without touching it."""
    for s in w.observation.containerd.snapshots:
        if s.key not in w.owned and s.parent in w.owned:
            yield Claim(s.parent, Rule.FOREIGN_CHILD, f"snapshot {s.key}, which we do not own, is its child")


def keep_young(w: _World, kept: set[str], unaged: list[str]) -> Iterator[Claim]:
    """Rule 6, daemon only: OBuilder prepares a snapshot before it writes the layerinfo.

    Age is containerd's Created, not when we first saw the key: keys are deleted and
    re-created (build ids repeat), and a re-created key must get a fresh grace period.
    A snapshot whose age was not read is kept and listed in ``unaged``.
    """
    if w.mode is not Mode.DAEMON:
        return
    created_of = {s.key: s.created for s in w.observation.containerd.snapshots}
    watches = w.observation.history.snapshots
    grace = w.options.grace_period
    for k in sorted(w.owned - kept):
        created = created_of.get(k)
        if created is None:
            unaged.append(k)
            w.wait(Kind.SNAPSHOT, grace, None)
            yield Claim(k, Rule.GRACE, "its age is not read yet (containerd's Created); asked before removal")
            continue
        age = w.age(watches, k, ages.stamp_of(created), created)
        if age < grace:
            w.wait(Kind.SNAPSHOT, grace, age)
            yield Claim(k, Rule.GRACE, f"{_aged(age, w.now - created)}, less than gracePeriod {grace}")


def keep_what_uninspectable_containers_may_use(w: _World, kept: set[str]) -> Iterator[Claim]:
    """A container ctr could not describe cannot be judged, so what it may use stays: the snapshot
    ``ctr run`` names after it, with its ancestors; and while its task is live, every layer (it
    may run on any). Applied last, to what nothing else keeps: one such container explains no
    other keep and stops no other removal."""
    cd = w.observation.containerd
    if not cd.uninspectable:
        return
    live = sorted({t.id for t in cd.tasks if t.status in LIVE_TASKS} & cd.uninspectable.keys())
    if live:
        why = f"container {live[0]} could not be inspected and its task is live: it may run on any layer"
        for k in sorted(w.owned - kept):
            yield Claim(k, Rule.CONTAINER, why)
        return
    claimed = set(kept)
    for cid in sorted(cd.uninspectable):
        why = f"container {cid} could not be inspected: it may use snapshot {cid} and its ancestors"
        key: str | None = cid
        while key is not None and key in w.parent_of and key not in claimed:
            claimed.add(key)
            yield Claim(key, Rule.CONTAINER, why)
            key = w.parent_of[key]


#: The rules that keep for good (grace keeps only for now, and comes last).
RULES = (
    keep_what_kept_containers_use,
    keep_results,
    keep_live_builds,
    keep_what_unreadable_layerinfo_could_name,
    keep_protected,
    keep_parents_of_foreign_snapshots,
)


def merge(claims: Iterable[Claim], owned: set[str]) -> dict[str, Claim]:
    """One claim a key: the best-ranked rule's, the first such claim among equals."""
    best: dict[str, Claim] = {}
    for c in claims:
        if c.key in owned and (c.key not in best or _RANK[c.rule] < _RANK[best[c.key].rule]):
            best[c.key] = c
    return best


def with_ancestors(kept: dict[str, Claim], parent_of: dict[str, str | None], owned: set[str]) -> dict[str, Claim]:
    """Rule 5: the owned ancestors of everything kept, each explained by the best-ranked root below it."""
    out = dict(kept)
    walked: set[str] = set()
    for root in sorted(kept.values(), key=lambda c: _RANK[c.rule]):
        key = parent_of.get(root.key)
        while key is not None and key not in out and key not in walked:
            walked.add(key)
            if key in owned:
                out[key] = Claim(key, Rule.ANCESTOR, f"ancestor of {root.key} (kept: {root.rule})")
            key = parent_of.get(key)
    return out


# -- the plan ------------------------------------------------------------------------------


def plan(observation: Observation, options: PlanOptions, now: datetime, mode: Mode) -> Plan:
    # Planning makes many short-lived, acyclic objects beside a large observation: Python's cycle
    # collector would rescan that observation again and again (a third of the time at 100,000
    # snapshots). Paused for the call; nothing here makes a cycle.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _plan(observation, options, now, mode)
    finally:
        if paused:
            gc.enable()


def _plan(observation: Observation, options: PlanOptions, now: datetime, mode: Mode) -> Plan:
    cd, parent_of = observation.containerd, {s.key: s.parent for s in observation.containerd.snapshots}
    w = _world(observation, options, now, mode, parent_of)
    removals = _judge_containers(w)
    tmp_removals, key_to_tmp = _judge_tmp_entries(w)
    kept, unaged, held = _keeps(w)
    # A result-tmp/ entry goes only after its snapshots: it is the record of which one it used.
    tmp_removals = [t for t in tmp_removals if not held.keys() & set(t.after)]
    orphans = w.owned - kept.keys()
    levels, deferred = _orphan_levels(orphans, parent_of, options.max_deletions_per_pass)
    removal_reason = _removal_reasons(orphans, key_to_tmp, mode)
    cache_tmp = _cache_tmp(w)
    pinned_by, runs_on_unknown = _pinned_by_leftover_containers(w, orphans)
    created_of = {s.key: s.created for s in cd.snapshots if s.created is not None} if mode is Mode.DAEMON else {}
    # Built without validation: every value comes from the records above, and a week-old store
    # gives maps of tens of thousands of keys that validation would copy for nothing.
    return Plan.model_construct(
        mode=mode,
        containers=tuple(removals),
        snapshot_levels=tuple(tuple(level) for level in levels),
        snapshot_reasons=removal_reason,
        snapshot_parents={k: parent_of[k] for level in levels for k in level},
        snapshot_created={k: c for k in removal_reason if (c := created_of.get(k)) is not None},
        unaged=tuple(unaged),
        pinned_by=pinned_by,
        runs_on_unknown=runs_on_unknown,
        tmp_entries=tuple(tmp_removals),
        cache_tmp=cache_tmp,
        deferred=deferred,
        decisions=tuple(w.decisions),
        snapshot_keeps={k: (c.rule, c.reason) for k, c in kept.items()},
        drift=_drift(observation, set(parent_of)),
        warnings=tuple(w.warnings),
        requeue_after=max(min(wake) - now, timedelta(0)) if (wake := _soonest(w.waiting)) else None,
        stamped_ahead=w.ahead,
        waiting_until={kind: tuple(times) for kind, times in w.waiting.items()},
    )


def _world(
    observation: Observation, options: PlanOptions, now: datetime, mode: Mode, parent_of: dict[str, str | None]
) -> _World:
    """The observation indexed once: what is owned, and which build each folder and key belongs to."""
    store, cd = observation.store, observation.containerd
    owned = {k for k in parent_of if k.startswith(options.snapshot_prefix)}
    folder_owner: dict[str, StoreEntry] = {}
    key_owner: dict[str, StoreEntry] = {}
    for e in (*store.results, *store.tmp) if cd.containers else ():  # only containers ask
        if e.layerinfo is not None and e.layerinfo.source:
            folder_owner.setdefault(path_identity(e.layerinfo.source), e)
        for key in e.snapshot_keys:
            key_owner.setdefault(key, e)
    return _World(observation, options, now, mode, parent_of, owned, folder_owner, key_owner)


def _keeps(w: _World) -> tuple[dict[str, Claim], list[str], dict[str, Claim]]:
    """Every kept snapshot with its reason: the rules that keep for good with their ancestors, then
    grace for what nothing else keeps, then what an uninspectable container may use. Also the keys
    whose age was not read, and what that last rule holds."""
    owned, parent_of = w.owned, w.parent_of
    kept = with_ancestors(merge((c for rule in RULES for c in rule(w)), owned), parent_of, owned)
    unaged: list[str] = []
    young = merge(keep_young(w, set(kept), unaged), owned)
    if young:
        # Their ancestors too, up to the first one something else keeps (it has its reason already).
        kept.update(with_ancestors(young, {k: p for k, p in parent_of.items() if p not in kept}, owned))
    held = merge(keep_what_uninspectable_containers_may_use(w, set(kept)), owned)
    kept.update(held)
    return kept, unaged, held


def _orphan_levels(
    orphans: set[str], parent_of: dict[str, str | None], limit: int | None
) -> tuple[list[list[str]], tuple[str, ...]]:
    """The orphans leaves first, at most ``limit`` of them (maxDeletionsPerPass); the rest deferred."""
    levels = _levels_leaves_first(orphans, Counter(parent_of.values()), parent_of)
    flat = [k for level in levels for k in level]
    deferred: tuple[str, ...] = ()
    if limit is not None and len(flat) > limit:
        allowed = set(flat[:limit])
        deferred = tuple(flat[limit:])
        levels = [[k for k in level if k in allowed] for level in levels]
        levels = [level for level in levels if level]
    return levels, deferred


def _removal_reasons(orphans: set[str], key_to_tmp: dict[str, StoreEntry], mode: Mode) -> dict[str, str]:
    removal_reason = dict.fromkeys(orphans, f"orphan: {_ORPHAN}")
    state = "interrupted" if mode is Mode.BOOT else "stale"
    for key, e in key_to_tmp.items():
        if key in removal_reason:
            removal_reason[key] = f"snapshot of {state} build result-tmp/{e.id}: {_ORPHAN}"
    return removal_reason


def _cache_tmp(w: _World) -> tuple[CacheTmpRemoval, ...]:
    """At boot, every cache-tmp/ entry (an orphan's decision is its reason in the plan; these get one)."""
    if w.mode is not Mode.BOOT:
        return ()
    names = sorted(w.observation.store.cache_tmp)
    why = "boot: cache-tmp/ only holds leftovers when the worker is not running"
    w.decisions += [Decision(kind=Kind.CACHE_TMP, name=n, keep=False, rule=Rule.LEFTOVER, reason=why) for n in names]
    return tuple(CacheTmpRemoval(name=n, reason=why) for n in names)


def _soonest(waiting: Mapping[Kind, list[datetime | None]]) -> list[datetime]:
    return [t for times in waiting.values() for t in times if t is not None]


def _judge_containers(w: _World) -> list[ContainerRemoval]:
    """Which containers stay (a live build's) and which are leftovers; kept ones mark their builds used."""
    cd, options, history = w.observation.containerd, w.options, w.observation.history
    task_of = {t.id: t.status for t in cd.tasks}
    removals: list[ContainerRemoval] = []
    for c in sorted(cd.containers, key=lambda c: c.id):
        if not c.id.startswith(options.container_prefix):
            continue
        status = task_of.get(c.id, TaskStatus.ABSENT)
        stamp = ages.container_stamp(c)
        if status in LIVE_TASKS:
            age = w.age(history.live_containers, c.id, stamp, c.created_at)
        else:
            # When its task stopped is nowhere recorded: only how long we have seen it stopped.
            age = w.age(history.idle_containers, c.id, stamp, None)
        rule, reason = _judge_container(c, status, options, w.mode, age)
        if rule is Rule.GRACE:
            w.wait(Kind.CONTAINER, options.grace_period, age)
        if rule is Rule.LEFTOVER:
            removals.append(ContainerRemoval(id=c.id, task=status, reason=reason))
            w.leftover_containers.append(c)
        else:
            w.kept_containers.append(c)
            w.used_entries.update(f"{user.area}/{user.id}" for _, user in _builds_run_on(c, w.folder_owner))
            if c.snapshot_key in w.key_owner:
                user = w.key_owner[c.snapshot_key]
                w.used_entries.add(f"{user.area}/{user.id}")
        w.decisions.append(
            Decision(kind=Kind.CONTAINER, name=c.id, keep=rule is not Rule.LEFTOVER, rule=rule, reason=reason)
        )
    return removals


def _judge_tmp_entries(w: _World) -> tuple[list[TmpRemoval], dict[str, StoreEntry]]:
    """Each result-tmp/ entry: a live build (its keys kept) or interrupted/stale (removed after its keys)."""
    removals: list[TmpRemoval] = []
    key_to_tmp: dict[str, StoreEntry] = {}
    for e in w.observation.store.tmp:
        for key in e.snapshot_keys:
            key_to_tmp[key] = key_to_tmp[key + "-committed"] = e
        name = f"result-tmp/{e.id}"
        if e.layerinfo_error is not None and w.mode is Mode.DAEMON:
            w.decisions.append(_unreadable(e))
            w.warnings.append(f"unreadable layerinfo: {e.layerinfo_error}")
            continue
        if e.layerinfo_error is not None:
            w.warnings.append(f"unreadable layerinfo (removed with the keys OBuilder derives): {e.layerinfo_error}")
        used = name in w.used_entries
        # An entry whose stamps could not be read cannot be dated: it counts as just changed.
        age = timedelta(0)
        if e.changed_at is not None:
            age = w.age(w.observation.history.tmp_entries, e.id, ages.entry_stamp(e), e.changed_at)
        live, reason = _judge_tmp(e, used, w.options, w.mode, age)
        if live and w.mode is Mode.DAEMON and not used:
            w.wait(Kind.RESULT_TMP, w.options.stale_after, age)
        if live:
            w.live_tmp.append(e)
        else:
            after = tuple(k for key in e.snapshot_keys for k in (key, key + "-committed") if k in w.owned)
            removals.append(TmpRemoval(id=e.id, after=after, reason=reason))
        rule = Rule.LIVE_BUILD if live else Rule.INTERRUPTED
        w.decisions.append(Decision(kind=Kind.RESULT_TMP, name=e.id, keep=live, rule=rule, reason=reason))
    for e in w.observation.store.results:
        if e.layerinfo_error is not None:
            w.decisions.append(_unreadable(e))
            w.warnings.append(f"unreadable layerinfo: {e.layerinfo_error}")
    return removals, key_to_tmp


def _pinned_by_leftover_containers(
    w: _World, orphans: set[str]
) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """What each leftover container uses waits for it to go (Windows holds a running
    container's layers open); every other orphan may go while they are removed. A folder no
    build names could be any orphan's: then nothing goes until the containers have."""
    pinned_by: dict[str, tuple[str, ...]] = {}
    unknown: list[str] = []
    for c in w.leftover_containers:
        builds = _builds_run_on(c, w.folder_owner)
        keys = {c.snapshot_key} if c.snapshot_key else set()
        for _, user in builds:
            keys.update(_active_and_committed(user))
        if keys & orphans:
            pinned_by[c.id] = tuple(sorted(keys & orphans))
        if len(builds) < len(_run_folders(c)):
            unknown.append(c.id)
    return pinned_by, tuple(unknown)


def _unreadable(e: StoreEntry) -> Decision:
    return Decision(
        kind=Kind(e.area),
        name=e.id,
        keep=True,
        rule=Rule.UNREADABLE,
        reason=f"{e.area}/{e.id}: {e.layerinfo_error}; kept with its snapshots until a human looks",
    )


def _age(delta: timedelta) -> str:
    return f"{delta.total_seconds():.0f} s" if delta < timedelta(minutes=2) else str(delta).split(".")[0]


def _aged(age: timedelta, wall: timedelta) -> str:
    """How old a snapshot counts, and by which clock."""
    if wall < timedelta(0):
        return f"created {_age(-wall)} ahead of this clock (a clock was set back); kept until it catches up"
    if age < wall:
        return f"watched {_age(age)} by this process (created {_age(wall)} ago by the wall clock)"
    return f"created {_age(wall)} ago"


def _run_folders(c: Container) -> list[str]:
    """The folders a container runs on: Linux ``root.path``, Windows' last layer folder."""
    return ([c.root_path] if c.root_path else []) + list(c.layer_folders[-1:])


def _builds_run_on(c: Container, folder_owner: dict[str, StoreEntry]) -> list[tuple[str, StoreEntry]]:
    """The builds whose folder a container runs on."""
    found = [(folder, folder_owner.get(path_identity(folder))) for folder in _run_folders(c)]
    return [(folder, user) for folder, user in found if user is not None and user.layerinfo is not None]


def _active_and_committed(e: StoreEntry) -> tuple[str, str]:
    # A committed snapshot keeps its active one's folder.
    assert e.layerinfo is not None
    return e.layerinfo.snapshot_key, e.layerinfo.snapshot_key + "-committed"


def _judge_container(
    c: Container, status: TaskStatus, options: PlanOptions, mode: Mode, age: timedelta
) -> tuple[Rule, str]:
    """``age``: how long its task has been live (for maxTaskAge), or how long we have seen it idle."""
    task = "no task" if status is TaskStatus.ABSENT else f"task {status.value.lower()}"
    if mode is Mode.BOOT:
        return (
            Rule.LEFTOVER,
            f"boot: the worker is not running, so this container ({task}) is left over from an interrupted build",
        )
    if status in LIVE_TASKS:
        if options.max_task_age is not None and age > options.max_task_age:
            return Rule.LEFTOVER, f"{task} for {_age(age)}, longer than maxTaskAge {options.max_task_age}"
        return Rule.RUNNING, f"{task}: a live build is never disturbed"
    if age < options.grace_period:
        return Rule.GRACE, f"{task}, but for less than the grace period {options.grace_period}"
    return Rule.LEFTOVER, f"{task} for longer than the grace period {options.grace_period}"


def _judge_tmp(e: StoreEntry, used: bool, options: PlanOptions, mode: Mode, age: timedelta) -> tuple[bool, str]:
    name = f"result-tmp/{e.id}"
    if mode is Mode.BOOT and e.layerinfo_error is not None:
        # OBuilder's own start-up recovery raises on it and the worker does not start. At
        # boot nothing runs, so the keys are the ones OBuilder derives from the id.
        keys = ", ".join(e.fallback_keys)
        return False, f"boot: {name} is an interrupted build with an unreadable layerinfo (its keys: {keys})"
    if mode is Mode.BOOT:
        return False, f"boot: {name} is an interrupted build"
    if used:
        return True, f"{name} is used by a kept container"
    if age < options.stale_after:
        return True, f"{name} unchanged for {_age(age)} as watched, less than staleAfter {options.stale_after}"
    return False, f"{name} unchanged for longer than staleAfter {options.stale_after} and no container uses it"


def _levels_leaves_first(
    orphans: set[str], children: Counter[str | None], parent_of: dict[str, str | None]
) -> list[list[str]]:
    """Group orphans by height: level 0 has no children, level n only children below n.

    Leaves first, each parent once its last child is placed: linear in the orphans.
    An orphan with a child that is not an orphan can never be placed, so it is never
    planned (the keep rules already keep such a parent; this is a second fence).
    """
    waiting = {k: children[k] for k in orphans}
    height = dict.fromkeys((k for k, n in waiting.items() if n == 0), 0)
    queue = list(height)
    get_parent = parent_of.get
    for k in queue:  # the queue grows while we walk it
        p = get_parent(k)
        if p in waiting:
            h = height[k] + 1
            if h > height.get(p, 0):
                height[p] = h
            left = waiting[p] - 1
            waiting[p] = left
            if left == 0:
                queue.append(p)
    by_level: dict[int, list[str]] = defaultdict(list)
    for k in queue:
        by_level[height[k]].append(k)
    return [sorted(by_level[h]) for h in sorted(by_level)]


def _drift(observation: Observation, present: set[str]) -> StoreDrift:
    store = observation.store
    result_ids = {e.id for e in store.results}
    row_ids = {r.id for r in store.db_rows}
    missing = [
        e.id
        for e in store.results
        if e.layerinfo_error is None and not any(k + "-committed" in present for k in e.snapshot_keys)
    ]
    return StoreDrift(
        rows_without_result=_sorted(row_ids - result_ids),
        results_without_row=_sorted(result_ids - row_ids),
        results_missing_snapshot=_sorted(missing),
    )


def _sorted(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(items))


__all__: Sequence[str] = ("KEEP_PRIORITY", "RULES", "Claim", "base_image_key", "merge", "path_identity", "plan")
