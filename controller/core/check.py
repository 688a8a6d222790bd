"""``reconcile check``: every inconsistency between the store, its DB and containerd, classified.

Pure: a function from the observations to :class:`~controller.model.check.Finding` records,
and from the store's state to the :class:`~controller.model.check.RepairPlan` of the opt-in
repairs. What containerd disagrees with (orphan snapshots, leftover containers, stale
``result-tmp/``, ``cache-tmp/``) is the planner's verdict; what the store disagrees with itself
is the planner's drift and the rows' reference counts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime

from controller.core.planner import plan
from controller.model.check import (
    BY_RECONCILE,
    Finding,
    FindingClass,
    RepairClass,
    RepairPlan,
    RowDelete,
    Severity,
)
from controller.model.plan import Mode, Plan, PlanOptions
from controller.model.records import ContainerdState, DbRow, History, Observation, StoreState

F = FindingClass

_POISONED = (
    "Db_store.get_build (db_store.ml) treats an existing result/ID as built (it bumps the row's used); the next "
    "step prepares its snapshot from KEY-committed, which is gone: 'Failed to prepare snapshot', and every job "
    "that shares the step fails until the result is deleted"
)
_ROW_ONLY = (
    "Dao.add (dao.ml) raised its parent's rc for it, so while it exists the parent is never a Dao.lru candidate "
    "(rc = 0 only); Dao.lru may pick the row itself, and the prune (Db_store.delete) then deletes a result that "
    "is not there"
)
_RESULT_ONLY = (
    "Db_store.get_build treats it as built (a missing row is not noticed); Dao.lru lists only rows, so the "
    "prune never removes it, nor the snapshots it keeps"
)
_RC_HIGH = "Dao.lru (dao.ml) takes only rc = 0 rows: this row, and so its ancestors, are never pruned"
_RC_LOW = (
    "Dao.lru (dao.ml) may take it (rc = 0) while rows still name it as parent: the prune deletes a step its "
    "children still build on"
)
_ORPHAN = (
    "nothing in OBuilder names it: its prune (Dao.lru, then Db_store.delete) removes only the snapshots of rows "
    "it knows, so it leaks until the reconciler removes it"
)
_CONTAINER = (
    "OBuilder removes obuilder-run-* containers only at its start-up (hcs_sandbox.ml); until then it holds its "
    "layers in use, so their folders cannot be destroyed"
)
_TMP = (
    "OBuilder's start-up recovery (hcs_store.ml) removes the snapshot its layerinfo names and the entry; an "
    "unreadable layerinfo stops the worker from starting"
)
_CACHE_TMP = "OBuilder purges cache-tmp/ at its start-up (hcs_store.ml)"


def check(
    store: StoreState, containerd: ContainerdState, options: PlanOptions, now: datetime, mode: Mode
) -> tuple[Finding, ...]:
    """Every finding, errors first, then by class and object. ``mode``: boot semantics when the worker
    is known to be down (what it left is leftover), daemon semantics otherwise (only what is surely
    dead; this one look has watched nothing, so no age counts)."""
    look = plan(Observation(store=store, containerd=containerd, history=History()), options, now, mode)
    present = {s.key for s in containerd.snapshots}
    actions = _repair_actions(store, present)
    findings = [
        *_store_findings(store, look, actions),
        *_rc_findings(store.db_rows, actions),
        *_containerd_findings(look, mode),
    ]
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return tuple(sorted(findings, key=lambda f: (order[f.severity], f.cls.value, f.object)))


def _store_findings(store: StoreState, look: Plan, actions: dict[tuple[F, str], str]) -> Iterator[Finding]:
    rows = {r.id: r for r in store.db_rows}
    results = {e.id: e for e in store.results}
    for i in look.drift.results_missing_snapshot:
        keys = ", ".join(k + "-committed" for k in results[i].snapshot_keys)
        yield Finding(
            cls=F.RESULT_MISSING_SNAPSHOT,
            object=f"result/{i}",
            evidence=f"its layerinfo names {keys}, which containerd does not have",
            obuilder=_POISONED,
            severity=Severity.ERROR,
            repair=RepairClass.POISONED_RESULT.value,
            repair_action=actions.get((F.RESULT_MISSING_SNAPSHOT, i), ""),
        )
    for i in look.drift.rows_without_result:
        parent = rows[i].parent
        yield Finding(
            cls=F.ROW_WITHOUT_RESULT,
            object=f"row {i}",
            evidence=f"builds has a row for {i} (parent {parent or 'none'}, rc {rows[i].rc}); no result/{i}",
            obuilder=_ROW_ONLY,
            severity=Severity.WARNING,
            repair=RepairClass.ROW_WITHOUT_RESULT.value,
            repair_action=actions.get((F.ROW_WITHOUT_RESULT, i), ""),
        )
    for i in look.drift.results_without_row:
        yield Finding(
            cls=F.RESULT_WITHOUT_ROW,
            object=f"result/{i}",
            evidence=f"result/{i} exists; builds has no row for {i}",
            obuilder=_RESULT_ONLY,
            severity=Severity.WARNING,
            repair=RepairClass.RESULT_WITHOUT_ROW.value,
            repair_action=actions.get((F.RESULT_WITHOUT_ROW, i), ""),
        )


def child_counts(rows: Iterable[DbRow]) -> Counter[str]:
    """How many rows name each id as their parent: what every rc should be."""
    return Counter(r.parent for r in rows if r.parent is not None)


def _rc_findings(rows: Sequence[DbRow], actions: dict[tuple[F, str], str]) -> Iterator[Finding]:
    children = child_counts(rows)
    for r in sorted(rows, key=lambda r: r.id):
        want = children.get(r.id, 0)
        if r.rc == want:
            continue
        yield Finding(
            cls=F.RC_MISMATCH,
            object=f"row {r.id}",
            evidence=f"rc is {r.rc}, but {want} row(s) name {r.id} as their parent",
            obuilder=_RC_HIGH if r.rc is None or r.rc > want else _RC_LOW,
            severity=Severity.WARNING,
            repair=RepairClass.RC.value,
            repair_action=actions.get((F.RC_MISMATCH, r.id), f"set rc to {want}"),
        )


def _containerd_findings(look: Plan, mode: Mode) -> Iterator[Finding]:
    orphans = [*look.snapshots, *look.deferred]
    for key in sorted(orphans):
        why = look.snapshot_reasons.get(key, "no keep rule holds it")
        yield _leftover(F.ORPHAN_SNAPSHOT, key, why, _ORPHAN, Severity.WARNING)
    for key in sorted(look.unaged):
        why = "no keep rule holds it but the grace period, and its age is not known from one look (the worker may run)"
        yield _leftover(F.ORPHAN_SNAPSHOT, key, why, _ORPHAN, Severity.INFO)
    for c in look.containers:
        yield _leftover(F.LEFTOVER_CONTAINER, c.id, f"task {c.task.value}: {c.reason}", _CONTAINER, Severity.WARNING)
    for t in look.tmp_entries:
        yield _leftover(F.STALE_RESULT_TMP, f"result-tmp/{t.id}", t.reason, _TMP, Severity.INFO)
    for ct in look.cache_tmp:
        yield _leftover(F.CACHE_TMP_LEFTOVER, f"cache-tmp/{ct.name}", ct.reason, _CACHE_TMP, Severity.INFO)


def _leftover(cls: F, name: str, evidence: str, obuilder: str, severity: Severity) -> Finding:
    return Finding(
        cls=cls,
        object=name,
        evidence=evidence,
        obuilder=obuilder,
        severity=severity,
        repair=BY_RECONCILE,
        repair_action="removed by the ordinary pass",
    )


# -- the repairs ----------------------------------------------------------------------------


def _repair_actions(store: StoreState, present: set[str]) -> dict[tuple[F, str], str]:
    """What each repair class would do, by the finding it answers (``check`` lists it)."""
    out: dict[tuple[F, str], str] = {}
    for i in _poisoned(store, present):
        p = plan_repairs(store, present, (RepairClass.POISONED_RESULT,), only=(i,))
        out[(F.RESULT_MISSING_SNAPSHOT, i)] = describe(p)
    drift = _drift_sets(store)
    for i in sorted(drift[1]):
        row = next(r for r in store.db_rows if r.id == i)
        out[(F.ROW_WITHOUT_RESULT, i)] = f"delete row {i}" + (f", lower rc of {row.parent}" if row.parent else "")
    for i in sorted(drift[2]):
        out[(F.RESULT_WITHOUT_ROW, i)] = f"remove result/{i}; its snapshots become orphans for the ordinary pass"
    for i, (old, new) in plan_repairs(store, present, (RepairClass.RC,)).rc_changes.items():
        out[(F.RC_MISMATCH, i)] = f"set rc from {old} to {new}"
    return out


def _drift_sets(store: StoreState) -> tuple[set[str], set[str], set[str]]:
    """Result ids, rows without result, results without row."""
    results = {e.id for e in store.results}
    rows = {r.id for r in store.db_rows}
    return results, rows - results, results - rows


def _poisoned(store: StoreState, present: set[str]) -> list[str]:
    """Results whose committed snapshot is gone (the planner's ``results_missing_snapshot``)."""
    return sorted(
        e.id
        for e in store.results
        if e.layerinfo_error is None and not any(k + "-committed" in present for k in e.snapshot_keys)
    )


def implausible_poisoning(store: StoreState, present: set[str]) -> str | None:
    """Why ``poisoned-result`` must not run on this look, or None. When containerd has none of the
    committed snapshots of two or more results, the likelier cause is that we asked the wrong
    containerd (address, namespace, snapshotter), and the repair would delete the whole store."""
    readable = [e for e in store.results if e.layerinfo_error is None]
    poisoned = _poisoned(store, present)
    if len(poisoned) >= 2 and len(poisoned) == len(readable):
        return (
            f"containerd has the committed snapshot of none of the {len(readable)} results: is this the worker's "
            "containerd (address, namespace, snapshotter)? poisoned-result would delete every result; refusing. "
            "If containerd really lost them all, remove the store's result/ and DB by hand with the worker stopped"
        )
    return None


def dependents_first(root: str, children: dict[str, list[str]]) -> list[str]:
    """``root`` and every row whose parent chain leads to it, each after all its own dependents
    (``Db_store.delete`` deletes the dependents first)."""
    order: list[str] = []
    seen: set[str] = set()
    stack: list[tuple[str, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((c, False) for c in sorted(children.get(node, ())) if c not in seen)
    return order


def plan_repairs(
    store: StoreState, present: set[str], classes: Sequence[RepairClass], *, only: Sequence[str] | None = None
) -> RepairPlan:
    """What the chosen repair classes do to this store, in OBuilder's order. ``only``: limit
    ``poisoned-result`` to these result ids (to describe one finding)."""
    rows = {r.id: r for r in store.db_rows}
    children: dict[str, list[str]] = defaultdict(list)
    for r in store.db_rows:
        if r.parent is not None:
            children[r.parent].append(r.id)
    results, rows_only, results_only = _drift_sets(store)
    dirs: list[str] = []
    deletes: list[RowDelete] = []
    gone: set[str] = set()

    def delete(i: str, why: RepairClass) -> None:
        if i in gone:
            return
        gone.add(i)
        if i in results:
            dirs.append(i)
        if i in rows:
            deletes.append(RowDelete(id=i, parent=rows[i].parent, why=why))

    if RepairClass.POISONED_RESULT in classes:
        for x in only if only is not None else _poisoned(store, present):
            for i in dependents_first(x, children):
                delete(i, RepairClass.POISONED_RESULT)
    if RepairClass.ROW_WITHOUT_RESULT in classes:
        for i in sorted(rows_only, key=lambda i: (-_depth(i, rows), i)):
            delete(i, RepairClass.ROW_WITHOUT_RESULT)
    if RepairClass.RESULT_WITHOUT_ROW in classes:
        for i in sorted(results_only - gone):
            gone.add(i)
            dirs.append(i)
    recount = RepairClass.RC in classes
    return RepairPlan(
        classes=tuple(c for c in RepairClass if c in classes),
        remove_results=tuple(dirs),
        rows=tuple(deletes),
        recount=recount,
        rc_changes=_rc_changes(store.db_rows, deletes) if recount else {},
    )


def _depth(i: str, rows: dict[str, DbRow]) -> int:
    depth, seen = 0, {i}
    parent = rows[i].parent if i in rows else None
    while parent is not None and parent in rows and parent not in seen:
        seen.add(parent)
        depth += 1
        parent = rows[parent].parent
    return depth


def _rc_changes(rows: Sequence[DbRow], deletes: Sequence[RowDelete]) -> dict[str, tuple[int | None, int]]:
    """The recount after the deletions (each of which lowered its parent's rc, as ``Dao.delete`` does)."""
    gone = {d.id for d in deletes}
    lowered = Counter(d.parent for d in deletes if d.parent is not None)
    kept = [r for r in rows if r.id not in gone]
    want = child_counts(kept)
    out: dict[str, tuple[int | None, int]] = {}
    for r in sorted(kept, key=lambda r: r.id):
        before = None if r.rc is None else r.rc - lowered.get(r.id, 0)
        if before != want.get(r.id, 0):
            out[r.id] = (before, want.get(r.id, 0))
    return out


def describe(p: RepairPlan) -> str:
    """One line: what a repair plan does."""
    parts = []
    if p.remove_results:
        parts.append("remove " + ", ".join(f"result/{i}" for i in p.remove_results))
    if p.rows:
        lowered = sorted({d.parent for d in p.rows if d.parent is not None} - {d.id for d in p.rows})
        lower = f"; lower rc of {', '.join(lowered)}" if lowered else ""
        parts.append("delete row(s) " + ", ".join(d.id for d in p.rows) + lower)
    for i, (old, new) in p.rc_changes.items():
        parts.append(f"set rc of {i} from {old} to {new}")
    return "; ".join(parts) or "nothing to do"


def parse_repair_classes(values: Iterable[str]) -> tuple[RepairClass, ...]:
    """``a,b`` and repeated values into repair classes; an unknown name raises ValueError naming the known ones."""
    out: list[RepairClass] = []
    for value in values:
        for name in (n.strip() for n in value.split(",")):
            if not name:
                continue
            try:
                cls = RepairClass(name)
            except ValueError:
                known = ", ".join(c.value for c in RepairClass)
                raise ValueError(f"unknown repair class {name!r} (known: {known})") from None
            if cls not in out:
                out.append(cls)
    return tuple(out)
