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

What the rules take from the store alone (each result's claim, the drift report's id sets,
which build owns a folder) is kept between plans by the identity of the store's records
(:mod:`controller.core.store_index`): a daemon's pass over 50,000 unchanged results costs a
few set operations over the owned keys, not a claim per result. Same inputs, same plan.
"""

from __future__ import annotations

import gc
import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from itertools import chain, compress, repeat
from operator import attrgetter, itemgetter, not_
from typing import Protocol

from controller.core import ages
from controller.core.store_index import Claim, ResultIndex, index_results, path_identity
from controller.model.plan import (
    CacheTmpRemoval,
    ContainerRemoval,
    Decision,
    Kind,
    Mode,
    Plan,
    PlanOptions,
    Rule,
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
_KEY = attrgetter("key")
_RULE = itemgetter(1)
_RULE_AND_REASON = itemgetter(1, 2)

_ORPHAN = (
    "no result/ entry names it, no live build, no protection rule matches, "
    "no kept container uses it, and nothing kept descends from it"
)


def base_image_key(reference: str) -> str:
    """OBuilder's snapshot key for a base image: ``obuilder-base-`` + SHA256 of the reference."""
    return "obuilder-base-" + hashlib.sha256(reference.encode()).hexdigest()


@dataclass
class _World:
    """The observation, indexed once for the rules."""

    observation: Observation
    options: PlanOptions
    now: datetime
    mode: Mode
    parent_of: dict[str, str | None]
    owned: set[str]
    #: What the store's results give, derived once per results tuple (controller.core.store_index).
    results: ResultIndex
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


def result_claims(e: StoreEntry) -> tuple[Claim, ...]:
    """Rule 1 for one result: derived once per entry object, kept in the store's index."""
    return tuple(_claims_of_result(e))


def _claims_of_result(e: StoreEntry) -> Iterator[Claim]:
    if e.layerinfo_error is None:
        for key in e.snapshot_keys:
            yield Claim(key + "-committed", Rule.RESULT, f"result/{e.id} exists (its snapshot is {key})")


def keep_results(w: _World) -> Iterator[Claim]:
    """Rule 1: a finished result keeps its committed snapshot.

    The rule as written; a plan takes the same claims, merged already, from ``w.results`` (see
    :func:`_firm_keeps`), so that 50,000 unchanged results cost no claim each at every pass."""
    for e in w.observation.store.results:
        yield from _claims_of_result(e)


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
    for e in (*w.results.unreadable, *w.observation.store.tmp):
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
    snapshots = w.observation.containerd.snapshots
    # Only a snapshot we do not own can be such a child: those are picked out in C, in their order.
    for s in compress(snapshots, map(not_, map(w.owned.__contains__, map(_KEY, snapshots)))):
        if s.key not in w.owned and s.parent in w.owned:
            yield Claim(s.parent, Rule.FOREIGN_CHILD, f"snapshot {s.key}, which we do not own, is its child")


def keep_young(w: _World, loose: Set[str], unaged: list[str]) -> Iterator[Claim]:
    """Rule 6, daemon only: OBuilder prepares a snapshot before it writes the layerinfo.

    ``loose``: the owned keys nothing else keeps. Age is containerd's Created, not when we
    first saw the key: keys are deleted and re-created (build ids repeat), and a re-created
    key must get a fresh grace period. A snapshot whose age was not read is kept and listed
    in ``unaged``.
    """
    young = sorted(loose) if w.mode is Mode.DAEMON else []
    if not young:
        return
    created_of = {s.key: s.created for s in w.observation.containerd.snapshots}
    watches = w.observation.history.snapshots
    grace = w.options.grace_period
    for k in young:
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


def keep_what_uninspectable_containers_may_use(w: _World, kept: Collection[str]) -> Iterator[Claim]:
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
        for k in sorted(w.owned.difference(kept)):
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


class _Parents(Protocol):
    def get(self, key: str, /) -> str | None: ...


class _Below:
    """``parent_of`` ending below a kept key: a young snapshot's ancestors stop at the first one
    something else keeps (it has its reason already)."""

    def __init__(self, parent_of: Mapping[str, str | None], kept: Mapping[str, Claim]) -> None:
        self.parent_of, self.kept = parent_of, kept

    def get(self, key: str, /) -> str | None:
        parent = self.parent_of.get(key)
        return None if parent in self.kept else parent


def ancestors_of(kept: Mapping[str, Claim], parent_of: _Parents, owned: Set[str]) -> dict[str, Claim]:
    """Rule 5: the owned ancestors of everything kept that are not kept themselves, each explained
    by the best-ranked root below it (among equals, the first in ``kept``)."""
    climbing = _climbing(set(map(parent_of.get, kept)), parent_of.get, owned, kept)
    if not climbing:
        return {}
    # Only the roots right below where a walk can claim something walk at all. Taken in the order
    # a stable sort by rank gives all of kept, their walks are the ones all roots' would be.
    roots = list(compress(kept.values(), map(climbing.__contains__, map(parent_of.get, kept))))
    ranks = list(map(_RANK.__getitem__, map(_RULE, roots)))
    out: dict[str, Claim] = {}
    walked: set[str] = set()
    for root in map(roots.__getitem__, sorted(range(len(roots)), key=ranks.__getitem__)):
        key = parent_of.get(root.key)
        while key is not None and key not in kept and key not in out and key not in walked:
            walked.add(key)
            if key in owned:
                out[key] = Claim(key, Rule.ANCESTOR, f"ancestor of {root.key} (kept: {root.rule})")
            key = parent_of.get(key)
    return out


def _climbing(
    above: set[str | None], up: Callable[[str], str | None], owned: Set[str], kept: Mapping[str, Claim]
) -> set[str]:
    """Of the keys right above a kept one, those from which a walk up meets an owned key before a
    kept one (or the top). A walk through any other claims nothing, whoever walks it first, and
    stops no walk that would: its keys are foreign up to where every walk stops."""
    meets: dict[str, bool] = {}
    for start in above:
        path: list[str] = []
        key, found = start, False
        while key is not None and key not in kept:
            known = meets.get(key)
            if known is not None or key in owned:
                found = known is not False
                break
            meets[key] = False  # met again on this path: a loop without an owned key
            path.append(key)
            key = up(key)
        meets.update(dict.fromkeys(path, found))
        if start is not None and start not in kept:
            meets[start] = found
    return {key for key, found in meets.items() if found and key in above}


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
    orphans, unaged, held, snapshot_keeps = _keeps(w)
    # A result-tmp/ entry goes only after its snapshots: it is the record of which one it used.
    tmp_removals = [t for t in tmp_removals if not held.keys() & set(t.after)]
    levels, deferred = _orphan_levels(orphans, parent_of, options.max_deletions_per_pass)
    removal_reason = _removal_reasons(orphans, key_to_tmp, mode)
    cache_tmp = _cache_tmp(w)
    pinned_by, runs_on_unknown = _pinned_by_leftover_containers(w, orphans)
    planned = list(chain.from_iterable(levels))
    created_of: dict[str, datetime] = {}
    if mode is Mode.DAEMON and removal_reason:
        created_of = {s.key: s.created for s in cd.snapshots if s.created is not None}
    # Built without validation: every value comes from the records above, and a week-old store
    # gives maps of tens of thousands of keys that validation would copy for nothing.
    return Plan.model_construct(
        mode=mode,
        containers=tuple(removals),
        snapshot_levels=tuple(tuple(level) for level in levels),
        snapshot_reasons=removal_reason,
        snapshot_parents=dict(zip(planned, map(parent_of.__getitem__, planned), strict=True)),
        snapshot_created={k: c for k in removal_reason if (c := created_of.get(k)) is not None},
        unaged=tuple(unaged),
        pinned_by=pinned_by,
        runs_on_unknown=runs_on_unknown,
        tmp_entries=tuple(tmp_removals),
        cache_tmp=cache_tmp,
        deferred=deferred,
        decisions=tuple(w.decisions),
        snapshot_keeps=snapshot_keeps,
        drift=w.results.drift(observation.store.db_rows, parent_of),
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
    results = index_results(store.results, result_claims)
    folder_owner: dict[str, StoreEntry] = {}
    key_owner: dict[str, StoreEntry] = {}
    if cd.containers:  # only containers ask; the results' part is the index's, the first owner wins
        by_folder, by_key = results.owners()
        folder_owner, key_owner = dict(by_folder), dict(by_key)
    for e in store.tmp if cd.containers else ():
        if e.layerinfo is not None and e.layerinfo.source:
            folder_owner.setdefault(path_identity(e.layerinfo.source), e)
        for key in e.snapshot_keys:
            key_owner.setdefault(key, e)
    return _World(observation, options, now, mode, parent_of, owned, results, folder_owner, key_owner)


def _keeps(w: _World) -> tuple[set[str], list[str], dict[str, Claim], dict[str, tuple[Rule, str]]]:
    """What is kept, and why: the rules that keep for good with their ancestors, then grace for what
    nothing else keeps, then what an uninspectable container may use. Gives the orphans (what none
    keeps), the keys whose age was not read, what that last rule holds, and every kept key's
    (rule, reason)."""
    owned, parent_of = w.owned, w.parent_of
    by_results, results_keep = w.results.on(owned)
    before, other = _firm_keeps(w, by_results)
    # In the order merge() of all claims would hold them: it decides which root explains an ancestor.
    kept = {**before, **by_results, **other}
    other.update(ancestors := ancestors_of(kept, parent_of, owned))
    kept.update(ancestors)
    unaged: list[str] = []
    loose = owned.difference(kept)
    young = merge(keep_young(w, loose, unaged), owned)
    if young:
        young.update(ancestors_of(young, _Below(parent_of, kept), owned))
        kept.update(young)
        other.update(young)
    held = merge(keep_what_uninspectable_containers_may_use(w, kept), owned)
    kept.update(held)
    other.update(held)
    snapshot_keeps = {**_keeps_of(before), **results_keep, **_keeps_of(other)}
    # Grace and the uninspectable containers keep only loose keys: what is left of them is orphaned.
    return loose.difference(young, held), unaged, held, snapshot_keeps


def _keeps_of(claims: Mapping[str, Claim]) -> dict[str, tuple[Rule, str]]:
    return dict(zip(claims, map(_RULE_AND_REASON, claims.values()), strict=True))


def _firm_keeps(w: _World, results: Mapping[str, Claim]) -> tuple[dict[str, Claim], dict[str, Claim]]:
    """``merge`` of every rule in RULES, given keep_results's claims on owned keys merged already
    (``results``): the claims of the rules before keep_results, merged, and of all the other rules'
    claims those that win: outrank a result's, or keep what no result does. A few keys, where the
    results' claims are 50,000."""
    at = RULES.index(keep_results)
    before = merge((c for rule in RULES[:at] for c in rule(w)), w.owned)
    after = merge((c for rule in RULES[at + 1 :] for c in rule(w)), w.owned)
    won: dict[str, Claim] = {}
    for key, c in after.items():
        result = results.get(key)
        if result is None or _RANK[c.rule] < _RANK[result.rule]:  # among equals the earlier: the result
            won[key] = c
    for key, c in before.items():
        best = won.get(key) or results.get(key)
        if best is None or _RANK[c.rule] <= _RANK[best.rule]:  # among equals the earlier: this one
            won[key] = c
    return before, won


def _orphan_levels(
    orphans: set[str], parent_of: dict[str, str | None], limit: int | None
) -> tuple[list[list[str]], tuple[str, ...]]:
    """The orphans leaves first, at most ``limit`` of them (maxDeletionsPerPass); the rest deferred."""
    if not orphans:  # counting every snapshot's children is for placing orphans
        return [], ()
    levels = _levels_leaves_first(orphans, Counter(parent_of.values()), parent_of)
    flat = list(chain.from_iterable(levels))
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
    for e in w.results.unreadable:
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

    Leaves first, a level at a time: a parent's last child is placed in the level below its
    own, so it is ready right after that level. Linear in the orphans, and a level's parents
    are counted in C: a week-old store has hundreds of thousands of orphans, most of them
    leaves. An orphan with a child that is not an orphan can never be placed, so it is
    never planned (the keep rules already keep such a parent; this is a second fence).
    """
    waiting = dict(zip(orphans, map(children.get, orphans, repeat(0)), strict=True))
    level = list(compress(waiting, map(not_, waiting.values())))
    levels: list[list[str]] = []
    while level:
        levels.append(sorted(level))
        ready: list[str] = []
        for parent, placed in Counter(map(parent_of.get, level)).items():
            if parent is not None and (left := waiting.get(parent)) is not None:
                waiting[parent] = left = left - placed
                if left == 0:
                    ready.append(parent)
        level = ready
    return levels


__all__: Sequence[str] = (
    "KEEP_PRIORITY",
    "RULES",
    "Claim",
    "ancestors_of",
    "base_image_key",
    "merge",
    "path_identity",
    "plan",
    "result_claims",
)
