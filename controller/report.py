"""Renders plans, summaries and explanations for people (text) and machines (JSON)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from controller.model.outcome import RunReport
from controller.model.plan import Decision, Kind, Plan, Rule

_SHOWN = 8
_NOUNS = {
    "container": ("container", "containers"),
    "snapshot": ("snapshot", "snapshots"),
    "result-tmp": ("result-tmp entry", "result-tmp entries"),
    "cache-tmp": ("cache-tmp entry", "cache-tmp entries"),
}


def count(n: int, kind: str) -> str:
    one, many = _NOUNS.get(kind, (kind, kind + "s"))
    return f"{n} {one if n == 1 else many}"


def _names(names: list[str], verbose: bool) -> str:
    if verbose or len(names) <= _SHOWN:
        return ", ".join(names)
    return ", ".join(names[:_SHOWN]) + f", ... and {len(names) - _SHOWN} more"


def render_plan(plan: Plan, *, verbose: bool = False) -> str:
    lines = []
    levels = plan.snapshot_levels
    head = [
        count(len(plan.containers), "container"),
        count(sum(len(level) for level in levels), "snapshot")
        + (f" in {len(levels)} level{'s' if len(levels) != 1 else ''}, leaves first" if levels else ""),
        count(len(plan.tmp_entries), "result-tmp"),
        count(len(plan.cache_tmp), "cache-tmp"),
    ]
    lines.append(f"Plan ({plan.mode.value} mode): remove {', '.join(head)}.")
    for c in plan.containers:
        lines.append(f"  remove container {c.id}: {c.reason}")
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key in plan.snapshots:
        by_reason[plan.snapshot_reasons[key]].append(key)
    for reason, keys in by_reason.items():
        lines.append(f"  remove {count(len(keys), 'snapshot')} ({_names(keys, verbose)}): {reason}")
    for t in plan.tmp_entries:
        lines.append(f"  remove result-tmp/{t.id}: {t.reason}")
    for ct in plan.cache_tmp:
        lines.append(f"  remove cache-tmp/{ct.name}: {ct.reason}")
    if plan.deferred:
        lines.append(f"  defer {count(len(plan.deferred), 'snapshot')} to a later pass (maxDeletionsPerPass)")
    kept = plan.kept(Kind.SNAPSHOT)
    if kept:
        rules = Counter(d.rule for d in kept)
        detail = ", ".join(f"{n} {rule}" for rule, n in rules.most_common())
        lines.append(f"Keep {count(len(kept), 'snapshot')} ({detail}).")
        for d in kept:
            if d.rule is Rule.PROTECTED or verbose:
                lines.append(f"  keep {d.name}: {d.reason}")
    for d in plan.kept(Kind.CONTAINER):
        lines.append(f"  keep container {d.name}: {d.reason}")
    lines += _render_drift_and_warnings(plan)
    return "\n".join(lines)


def _render_drift_and_warnings(plan: Plan) -> list[str]:
    d = plan.drift
    groups = [
        (d.rows_without_result, "DB rows without a result/ directory"),
        (d.results_without_row, "result/ directories without a DB row (OBuilder will never prune them)"),
        (
            d.results_missing_snapshot,
            "results whose committed snapshot is missing (OBuilder would take them as cache hits and the build fail)",
        ),
    ]
    lines = ["Store drift (reported, not repaired):"] if d.total else []
    lines += [f"  {len(ids)} {what}: {_names(list(ids), False)}" for ids, what in groups if ids]
    lines += [f"Warning: {w}" for w in plan.warnings]
    return lines


def render_summary(run: RunReport) -> str:
    removed_counts = run.total("removed")
    removed = ", ".join(count(n, kind) for kind, n in removed_counts.items())
    calls = f", {run.ctr_calls} ctr calls" if run.ctr_calls is not None else ""
    if run.dry_run:
        verdict = "nothing to do" if run.exit_code == 0 else "drift found (dry run: nothing changed)"
        lines = [f"Dry run in {run.seconds:.2f} s{calls}: {verdict}."]
    else:
        if not run.converged:
            verdict = "did NOT converge"
        elif run.stuck:
            verdict = "converged, but what is listed below needs a human"
        else:
            verdict = "converged"
        passes = f"{run.acted} pass{'es' if run.acted != 1 else ''}"
        gone = sum(run.total("already_gone").values())
        if gone:
            removed += f" ({gone} more {'was' if gone == 1 else 'were'} already gone)"
        lines = [
            f"Reconciled in {run.seconds:.2f} s, {passes}{calls}: "
            f"removed {removed}; {run.last.kept_snapshots} owned snapshots kept; {verdict}."
        ]
    if run.stuck:
        lines.append(f"Stuck ({len(run.stuck)}):")
        lines += [f"  {s.kind} {s.name}: {s.reason}" for s in run.stuck]
    lines += render_disk(run)
    return "\n".join(lines)


#: Folders of the disk report listed one by one; the rest are counted.
DISK_LISTED = 20


def render_disk(run: RunReport) -> list[str]:
    """What lies in the snapshotter's folder that containerd's records do not know."""
    disk = run.disk
    if disk is None or disk.folder is None:
        return []
    if disk.error is not None:
        return [f"Disk: {disk.error}"]
    lines = []
    if run.left_on_disk:
        lines.append(f"Disk: {run.left_on_disk:,} bytes of the snapshots removed stayed on disk (rm-* folders).")
    if disk.unknown:
        lines.append(
            f"Disk: {len(disk.unknown)} folder(s) in {disk.folder} that containerd does not know hold "
            f"{disk.unknown_bytes:,} bytes (docs/operating.md has the runbook on disk space containerd does not "
            "account for):"
        )
        lines += [
            f"  {f.name} ({f.reason}): " + ("not sized" if f.size_bytes is None else f"{f.size_bytes:,} bytes")
            for f in disk.unknown[:DISK_LISTED]
        ]
        if disk.note:
            lines.append(f"  {disk.unsized} {disk.note}")
        if len(disk.unknown) > DISK_LISTED:
            lines.append(f"  ... and {len(disk.unknown) - DISK_LISTED} more")
    if disk.unattributed:
        lines.append(f"Disk: {disk.unattributed} layer folder(s) more than containerd has snapshots.")
    return lines


def summary_json(run: RunReport) -> dict[str, Any]:
    """The run for machines: totals, and what it left."""
    last = run.last
    return {
        "mode": last.mode.value,
        "dry_run": run.dry_run,
        "converged": run.converged,
        "passes": run.acted,
        "removed": run.total("removed"),
        "already_gone": run.total("already_gone"),
        "failed": run.total("failed"),
        "planned": run.first.planned,
        "kept_snapshots": last.kept_snapshots,
        "stuck": [s.model_dump(mode="json") for s in run.stuck],
        "remaining": {**last.drift, "stuck": len(run.stuck)},
        "drift": last.store_drift.model_dump(mode="json"),
        "warnings": list(last.warnings),
        "seconds": run.seconds,
        "ctr_calls": run.ctr_calls,
        "garbage_collection": run.garbage_collection,
        "disk": run.disk.model_dump(mode="json") if run.disk is not None else None,
        "left_on_disk": run.left_on_disk,
        "trash": [t.model_dump(mode="json") for t in run.trash],
        "exit_code": run.exit_code,
    }


def render_explain(name: str, decisions: list[Decision], *, present: bool, mode_note: str) -> str:
    if not decisions:
        if present:
            return f"{name}: not owned (its name lacks the owned prefix), so it is never touched."
        return f"{name}: no snapshot, container or store entry by that name was found."
    lines = []
    for d in decisions:
        verdict = "kept" if d.keep else "would be removed"
        lines.append(f"{d.kind} {name}: {verdict} [rule: {d.rule}]: {d.reason}")
    lines.append(mode_note)
    return "\n".join(lines)


def to_json(plan: Plan, run: RunReport | None) -> str:
    plain = plan.model_dump(mode="json", exclude={"decisions", "snapshot_parents", "snapshot_keeps"})
    doc: dict[str, Any] = {"plan": plain}
    kept = [*plan.kept(Kind.SNAPSHOT), *(d for d in plan.decisions if d.keep)]
    doc["plan"]["kept"] = [d.model_dump(mode="json") for d in kept]
    if run is not None:
        doc["summary"] = summary_json(run)
    return json.dumps(doc, indent=2)
