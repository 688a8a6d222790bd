"""Applying a reviewed plan exactly: only what was planned, and only what still is what it was.

Pure: given the plan file, the plan made now with the same rules (boot semantics, so every
keep rule still holds) and what containerd says of each planned snapshot now, the plan to
act on and what is left alone, with why. An action goes only when it is in both plans and its
object has the identity it was planned on; what depends on a skipped action (a parent whose
child stays, an entry whose snapshot stays) is skipped with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

from controller.model.plan import Kind, Plan
from controller.model.planfile import PlanFile, Skipped
from controller.model.records import Observation


def restrict(
    planned: PlanFile, now: Plan, observation: Observation, created: Mapping[str, datetime | None]
) -> tuple[Plan, tuple[Skipped, ...]]:
    skipped: list[Skipped] = []
    keep_containers = _containers(planned, now, observation, skipped)
    keep_tmp = _entries(planned, now, observation, skipped)
    # A build whose entry changed is not what was planned: its snapshots stay with it.
    held = {k for t in now.tmp_entries if t.id not in keep_tmp for k in t.after}
    keys = _snapshots(planned, now, created, skipped, held)
    # An entry goes after its snapshots: with one of them staying, it stays (it records which it used).
    going = set(now.snapshots)
    tmp = tuple(
        t for t in now.tmp_entries if t.id in keep_tmp and all(k in keys or k not in going for k in t.after)
    )
    for t in now.tmp_entries:
        if t.id in keep_tmp and t not in tmp:
            skipped.append(Skipped(kind=Kind.RESULT_TMP.value, name=t.id, reason="one of its snapshots stays"))
    cache = set(planned.cache_tmp)
    plan = now.model_copy(
        update={
            "containers": tuple(c for c in now.containers if c.id in keep_containers),
            "snapshot_levels": tuple(
                kept for level in now.snapshot_levels if (kept := tuple(k for k in level if k in keys))
            ),
            "deferred": (),
            "tmp_entries": tmp,
            "cache_tmp": tuple(c for c in now.cache_tmp if c.name in cache),
        }
    )
    return plan, tuple(skipped)


def _containers(planned: PlanFile, now: Plan, observation: Observation, skipped: list[Skipped]) -> set[str]:
    return _still_as_planned(
        Kind.CONTAINER,
        [(c.id, c.created_at) for c in planned.containers],
        {c.id: c.created_at for c in observation.containerd.containers},
        {c.id for c in now.containers},
        skipped,
        changed="re-created since planned",
        no_longer=lambda name: f"no longer a leftover: {now.decision_for(name)[0].reason}",
    )


def _entries(planned: PlanFile, now: Plan, observation: Observation, skipped: list[Skipped]) -> set[str]:
    return _still_as_planned(
        Kind.RESULT_TMP,
        [(e.id, e.stamps) for e in planned.tmp_entries],
        {e.id: e.stamps for e in observation.store.tmp},
        {t.id for t in now.tmp_entries},
        skipped,
        changed="changed since planned",
        no_longer=lambda _: "no longer to be removed",
    )


def _still_as_planned(
    kind: Kind,
    planned: Iterable[tuple[str, object]],
    current: Mapping[str, object],
    planned_now: set[str],
    skipped: list[Skipped],
    *,
    changed: str,
    no_longer: Callable[[str], str],
) -> set[str]:
    """The planned objects that are still there, with the identity they were planned on (a
    container's creation time, an entry's stamps), and that the plan made now still removes;
    each other one is skipped with why."""
    keep = set()
    for name, identity in planned:
        if name not in current:
            reason: str | None = "gone since planned"
        elif current[name] != identity:
            reason = changed
        elif name not in planned_now:
            reason = no_longer(name)
        else:
            reason = None
        if reason is None:
            keep.add(name)
        else:
            skipped.append(Skipped(kind=kind.value, name=name, reason=reason))
    return keep


def _snapshots(
    planned: PlanFile, now: Plan, created: Mapping[str, datetime | None], skipped: list[Skipped], held: set[str]
) -> set[str]:
    """The planned snapshots that still are what they were and still go; a parent stays with a child that stays."""
    orphans, deferred = set(now.snapshots), set(now.deferred)
    keep: set[str] = set()
    for s in planned.snapshots:
        why = _snapshot_skip(s.key, s.created, created, orphans, deferred, now)
        if why is None and s.key in held:
            why = "its build's result-tmp/ entry changed since planned, so it stays with it"
        if why is None:
            keep.add(s.key)
        else:
            skipped.append(Skipped(kind=Kind.SNAPSHOT.value, name=s.key, reason=why))
    # Leaves first: a parent whose child stays cannot go (containerd refuses it); it stays too.
    children: dict[str, list[str]] = {}
    for child, parent in now.snapshot_parents.items():
        if parent is not None:
            children.setdefault(parent, []).append(child)
    for level in now.snapshot_levels:
        for key in level:
            if key in keep and any(child not in keep for child in children.get(key, ())):
                keep.discard(key)
                skipped.append(Skipped(kind=Kind.SNAPSHOT.value, name=key, reason="a child of it stays"))
    return keep


def _snapshot_skip(
    key: str,
    was: datetime | None,
    created: Mapping[str, datetime | None],
    orphans: set[str],
    deferred: set[str],
    now: Plan,
) -> str | None:
    """Why a planned snapshot is left alone (None: it goes)."""
    if created.get(key) is None:
        return "gone since planned (or containerd cannot date it now)"
    if created.get(key) != was:
        return f"re-created since planned (was {was.isoformat() if was else 'not dated'})"
    if key in deferred:
        return "deferred by maxDeletionsPerPass: apply the plan again"
    if key not in orphans:
        return f"no longer an orphan: {now.snapshot_keeps.get(key, (None, 'not listed'))[1]}"
    return None
