"""The planner: a pure function from what was observed to what one pass removes.

No I/O, no clock, no logging: ``plan(observation, options, now, mode)`` reads the
records and returns a :class:`~controller.model.plan.Plan`. It applies DESIGN.md's keep
rules; everything owned and not kept is an orphan, removed leaves first.
"""

from __future__ import annotations

import hashlib
import ntpath
import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase

from controller.model.plan import (
    CacheTmpRemoval,
    ContainerRemoval,
    Decision,
    Mode,
    Plan,
    PlanOptions,
    StoreDrift,
    TmpRemoval,
)
from controller.model.records import Container, Observation, StoreEntry, TaskStatus, container_identity

_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:|\\\\)|\\")
_LIVE_TASK = frozenset({TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.PAUSING, TaskStatus.CREATED})
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


@dataclass
class _Keep:
    """The kept set as it grows: key -> (rule, reason), first rule wins."""

    owned: set[str]
    why: dict[str, tuple[str, str]] = field(default_factory=dict)

    def add(self, key: str, rule: str, reason: str) -> None:
        if key in self.owned and key not in self.why:
            self.why[key] = (rule, reason)


def plan(observation: Observation, options: PlanOptions, now: datetime, mode: Mode) -> Plan:
    store, cd, history = observation.store, observation.containerd, observation.history
    parent_of = {s.key: s.parent for s in cd.snapshots}
    owned = {k for k in parent_of if k.startswith(options.snapshot_prefix)}
    keep = _Keep(owned=owned)
    decisions: list[Decision] = []
    warnings: list[str] = []
    #: When something kept only for now (grace, staleAfter) may change its verdict.
    wake: list[datetime] = []

    # Containers first: which are kept decides rules 2 and 4.
    task_of = {t.id: t.status for t in cd.tasks}
    kept_containers: list[Container] = []
    leftover_containers: list[Container] = []
    removals: list[ContainerRemoval] = []
    for c in sorted(cd.containers, key=lambda c: c.id):
        if not c.id.startswith(options.container_prefix):
            continue
        status = task_of.get(c.id, TaskStatus.ABSENT)
        idle_since = history.containers_idle_since.get(container_identity(c))
        rule, reason = _judge_container(c, status, options, now, mode, idle_since)
        if rule == "grace":
            wake.append((idle_since or now) + options.grace_period)
        if rule == "leftover":
            removals.append(ContainerRemoval(id=c.id, task=status, reason=reason))
            leftover_containers.append(c)
        else:
            kept_containers.append(c)
        decisions.append(Decision(kind="container", name=c.id, keep=rule != "leftover", rule=rule, reason=reason))

    # Which build each layer folder belongs to, for containers that name folders, not keys.
    entries = (*store.results, *store.tmp)
    folder_owner: dict[str, StoreEntry] = {}
    key_owner: dict[str, StoreEntry] = {}
    for e in entries if cd.containers else ():  # only containers ask
        if e.layerinfo is not None and e.layerinfo.source:
            folder_owner.setdefault(path_identity(e.layerinfo.source), e)
        for key in e.snapshot_keys:
            key_owner.setdefault(key, e)

    # Rule 4: kept containers keep what they use; they also keep their build live.
    used_entries: set[str] = set()
    for c in kept_containers:
        if c.snapshot_key:
            keep.add(c.snapshot_key, "container", f"container {c.id} uses it as its snapshot")
        for folder, user in _builds_run_on(c, folder_owner):
            used_entries.add(f"{user.area}/{user.id}")
            why = f"container {c.id} runs on its folder {folder} ({user.area}/{user.id})"
            for key in _active_and_committed(user):
                keep.add(key, "container", why)
        if c.snapshot_key in key_owner:
            user = key_owner[c.snapshot_key]
            used_entries.add(f"{user.area}/{user.id}")

    # What leftover containers use waits for them to go (Windows holds a running
    # container's layers open); every other orphan may go while they are removed.
    pinned_by_containers = {c.snapshot_key for c in leftover_containers if c.snapshot_key}
    containers_first = False
    for c in leftover_containers:
        builds = _builds_run_on(c, folder_owner)
        for _, user in builds:
            pinned_by_containers.update(_active_and_committed(user))
        # A folder no build names (its result-tmp/ entry is gone) could be any
        # orphan's: then nothing goes until the containers have.
        containers_first |= len(builds) < len(_run_folders(c))

    # Rule 1: finished results keep their committed snapshot.
    for e in store.results:
        if e.layerinfo_error is not None:
            decisions.append(_keep_unreadable(e, keep, warnings))
            continue
        for key in e.snapshot_keys:
            keep.add(key + "-committed", "result", f"result/{e.id} exists (its snapshot is {key})")

    # Rule 2: live builds keep both their active and committed snapshot.
    tmp_removals: list[TmpRemoval] = []
    key_to_tmp: dict[str, StoreEntry] = {}
    for e in store.tmp:
        for key in e.snapshot_keys:
            key_to_tmp[key] = key_to_tmp[key + "-committed"] = e
        name = f"result-tmp/{e.id}"
        if e.layerinfo_error is not None and mode is Mode.DAEMON:
            decisions.append(_keep_unreadable(e, keep, warnings))
            continue
        if e.layerinfo_error is not None:
            warnings.append(f"unreadable layerinfo (removed with the keys OBuilder derives): {e.layerinfo_error}")
        live, reason = _judge_tmp(e, name in used_entries, options, now, mode)
        if live and mode is Mode.DAEMON and name not in used_entries:
            wake.append((e.changed_at or now) + options.stale_after)
        if live:
            for key in e.snapshot_keys:
                keep.add(key, "live-build", f"{name} is a live build")
                keep.add(key + "-committed", "live-build", f"{name} is a live build")
        else:
            after = tuple(k for key in e.snapshot_keys for k in (key, key + "-committed") if k in owned)
            tmp_removals.append(TmpRemoval(id=e.id, after=after, reason=reason))
        decisions.append(
            Decision(
                kind="result-tmp", name=e.id, keep=live, rule="live-build" if live else "interrupted", reason=reason
            )
        )

    # Rule 3: the policy protects keys by glob and base images by reference.
    for pattern in options.protect_keys:
        matched = [k for k in owned if fnmatchcase(k, pattern)]
        for k in matched:
            keep.add(k, "protected", f"protected by snapshotKeys glob {pattern!r}")
        if not matched:
            warnings.append(f"protection rule snapshotKeys {pattern!r} matches no snapshot")
    for ref in options.protect_images:
        base = base_image_key(ref)
        found = [k for k in (base, base + "-committed") if k in owned]
        for k in found:
            keep.add(k, "protected", f"protected base image {ref}")
        if not found:
            warnings.append(f"protection rule baseImages {ref!r} ({base}) matches no snapshot")

    # Owned snapshots under a snapshot we do not own cannot go without touching it.
    for s in cd.snapshots:
        if s.key not in owned and s.parent in owned:
            keep.add(s.parent, "foreign-child", f"snapshot {s.key}, which we do not own, is its child")

    # Rule 5 for what is kept so far, so their ancestors are not asked their age below.
    _keep_ancestors(keep, parent_of)

    # Rule 6: in daemon mode OBuilder prepares a snapshot before it writes layerinfo.
    # Age is containerd's Created, not when we first saw the key: keys are deleted and
    # re-created (build ids repeat), and a re-created key must get a fresh grace period.
    unaged: list[str] = []
    created_of = {s.key: s.created for s in cd.snapshots}
    if mode is Mode.DAEMON:
        for k in sorted(owned - keep.why.keys()):
            created = created_of.get(k)
            if created is None:
                unaged.append(k)
                keep.add(k, "grace", "its age is not read yet (containerd's Created); asked before removal")
            elif now - created < options.grace_period:
                keep.add(k, "grace", f"created {_age(now - created)} ago, less than gracePeriod {options.grace_period}")
                wake.append(created + options.grace_period)

    # Rule 5: the ancestors of anything kept.
    _keep_ancestors(keep, parent_of)

    children: dict[str, list[str]] = defaultdict(list)
    for k, p in parent_of.items():
        if p is not None:
            children[p].append(k)
    orphans = owned - keep.why.keys()
    levels = _levels_leaves_first(orphans, children, parent_of)
    removal_reason = {k: _orphan_reason(k, key_to_tmp, mode) for k in orphans}
    flat = [k for level in levels for k in level]
    limit = options.max_deletions_per_pass
    deferred: tuple[str, ...] = ()
    if limit is not None and len(flat) > limit:
        allowed = set(flat[:limit])
        deferred = tuple(flat[limit:])
        levels = [[k for k in level if k in allowed] for level in levels]
        levels = [level for level in levels if level]

    # Kept snapshots only: an orphan's decision is its reason in the plan (decision_for).
    for k in sorted(owned & keep.why.keys()):
        rule, reason = keep.why[k]
        decisions.append(Decision(kind="snapshot", name=k, keep=True, rule=rule, reason=reason))

    cache_tmp: tuple[CacheTmpRemoval, ...] = ()
    if mode is Mode.BOOT:
        why = "boot: cache-tmp/ only holds leftovers when the worker is not running"
        cache_tmp = tuple(CacheTmpRemoval(name=n, reason=why) for n in sorted(store.cache_tmp))
        decisions += [
            Decision(kind="cache-tmp", name=n, keep=False, rule="leftover", reason=why) for n in sorted(store.cache_tmp)
        ]

    return Plan(
        mode=mode,
        containers=tuple(removals),
        snapshot_levels=tuple(tuple(level) for level in levels),
        snapshot_reasons=removal_reason,
        snapshot_parents={k: parent_of[k] for level in levels for k in level},
        snapshot_created={k: c for k, c in created_of.items() if c is not None and k in removal_reason}
        if mode is Mode.DAEMON
        else {},
        unaged=tuple(unaged),
        pinned=tuple(sorted(pinned_by_containers & orphans)),
        containers_first=containers_first,
        tmp_entries=tuple(tmp_removals),
        cache_tmp=cache_tmp,
        deferred=deferred,
        decisions=tuple(decisions),
        drift=_drift(observation, set(parent_of)),
        warnings=tuple(warnings),
        requeue_after=max(min(wake) - now, timedelta(0)) if wake else None,
    )


def _age(delta: timedelta) -> str:
    return f"{delta.total_seconds():.0f} s" if delta < timedelta(minutes=2) else str(delta).split(".")[0]


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
    c: Container,
    status: TaskStatus,
    options: PlanOptions,
    now: datetime,
    mode: Mode,
    since: datetime | None,
) -> tuple[str, str]:
    task = "no task" if status is TaskStatus.ABSENT else f"task {status.value.lower()}"
    if mode is Mode.BOOT:
        return (
            "leftover",
            f"boot: the worker is not running, so this container ({task}) is left over from an interrupted build",
        )
    if status in _LIVE_TASK:
        age = now - c.created_at if c.created_at else None
        if options.max_task_age is not None and age is not None and age > options.max_task_age:
            return "leftover", f"{task} for {age}, longer than maxTaskAge {options.max_task_age}"
        return "running", f"{task}: a live build is never disturbed"
    if since is None or now - since < options.grace_period:
        return "grace", f"{task}, but for less than the grace period {options.grace_period}"
    return "leftover", f"{task} for longer than the grace period {options.grace_period}"


def _judge_tmp(e: StoreEntry, used: bool, options: PlanOptions, now: datetime, mode: Mode) -> tuple[bool, str]:
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
    if e.changed_at is None or now - e.changed_at < options.stale_after:
        return True, f"{name} changed less than staleAfter {options.stale_after} ago"
    return False, f"{name} unchanged for longer than staleAfter {options.stale_after} and no container uses it"


def _keep_unreadable(e: StoreEntry, keep: _Keep, warnings: list[str]) -> Decision:
    # We cannot know which snapshot the entry names, so we keep every key OBuilder
    # would have used for it and never delete on a guess.
    why = f"{e.area}/{e.id} has an unreadable layerinfo; kept until a human looks"
    for key in e.fallback_keys:
        keep.add(key, "unreadable-layerinfo", why)
        keep.add(key + "-committed", "unreadable-layerinfo", why)
    warnings.append(f"unreadable layerinfo: {e.layerinfo_error}")
    return Decision(
        kind=e.area,
        name=e.id,
        keep=True,
        rule="unreadable-layerinfo",
        reason=f"{e.area}/{e.id}: {e.layerinfo_error}; kept with its snapshots until a human looks",
    )


def _keep_ancestors(keep: _Keep, parent_of: dict[str, str | None]) -> None:
    walked: set[str] = set()
    for root, (rule, _) in list(keep.why.items()):
        key = parent_of.get(root)
        while key is not None and key not in walked:
            walked.add(key)
            keep.add(key, "ancestor", f"ancestor of {root} (kept: {rule})")
            key = parent_of.get(key)


def _levels_leaves_first(
    orphans: set[str], children: dict[str, list[str]], parent_of: dict[str, str | None]
) -> list[list[str]]:
    """Group orphans by height: level 0 has no children, level n only children below n.

    Leaves first, each parent once its last child is placed: linear in the orphans.
    An orphan with a child that is not an orphan can never be placed, so it is never
    planned (the keep rules already keep such a parent; this is a second fence).
    """
    waiting = {k: len(children.get(k, ())) for k in orphans}
    height = dict.fromkeys((k for k, n in waiting.items() if n == 0), 0)
    queue = list(height)
    for k in queue:  # the queue grows while we walk it
        p = parent_of.get(k)
        if p in waiting:
            height[p] = max(height.get(p, 0), height[k] + 1)
            waiting[p] -= 1
            if waiting[p] == 0:
                queue.append(p)
    by_level: dict[int, list[str]] = defaultdict(list)
    for k in queue:
        by_level[height[k]].append(k)
    return [sorted(by_level[h]) for h in sorted(by_level)]


def _orphan_reason(key: str, key_to_tmp: dict[str, StoreEntry], mode: Mode) -> str:
    e = key_to_tmp.get(key)
    if e is not None:
        state = "interrupted" if mode is Mode.BOOT else "stale"
        return f"snapshot of {state} build result-tmp/{e.id}: {_ORPHAN}"
    return f"orphan: {_ORPHAN}"


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
