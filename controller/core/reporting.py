"""What a pass tells: its report, built once from what it saw, planned and did.

Also the backlog of each kind, what the clocks did, why what should have gone is still
there, and a pass that failed as a whole. Pure functions over records.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from controller.core import ages
from controller.core.executor import PassResult
from controller.model.disk import DiskDrift
from controller.model.outcome import (
    BACKLOG_KINDS,
    ActionResult,
    Backlog,
    ClockReport,
    Outcome,
    PassReport,
    Stuck,
)
from controller.model.plan import Kind, Mode, Plan, Rule
from controller.model.records import History, Observation

_DRIFT_OF_ACTION = {
    Kind.SNAPSHOT: "orphan_snapshots",
    Kind.CONTAINER: "leftover_containers",
    Kind.RESULT_TMP: "stale_result_tmp",
}


@dataclass(frozen=True)
class PassFacts:
    """Everything a pass's report is made of."""

    number: int
    dry_run: bool
    plan: Plan
    result: PassResult
    #: What the plan was made on (with the Created it read), and the memory the pass leaves.
    observation: Observation
    history: History
    now: datetime
    ended: datetime
    seconds: float
    clock: ages.ClockRead
    disk: DiskDrift | None
    #: Owned objects it could not judge: containers ctr could not describe, snapshots it could not date.
    uninspectable: Mapping[str, str]
    undated: Mapping[str, str]
    ctr_calls: int
    #: Bytes orphans hold (measured), and of those removed, what left the disk.
    sizes: Mapping[str, int] | None
    reclaimed_bytes: int | None
    trigger: str | None


def pass_report(f: PassFacts) -> PassReport:
    """The report of a pass that ran to its end."""
    plan, results = f.plan, f.result.results
    counts = PassReport.counts(results)
    done = {r.name for r in results if r.kind is Kind.SNAPSHOT and r.outcome.done}
    orphans = {*plan.snapshots, *plan.deferred}
    unjudged = unjudged_stuck(f.uninspectable, f.undated)
    stuck = tuple(_diagnose(r, f.observation, done, plan.mode) for r in f.result.failures()) + unjudged
    young = sum(1 for rule, _ in plan.snapshot_keeps.values() if rule is Rule.GRACE)
    return PassReport(
        number=f.number,
        mode=plan.mode,
        time=f.ended,
        seconds=round(f.seconds, 3),
        dry_run=f.dry_run,
        planned=planned(plan),
        removed=counts["removed"],
        already_gone=counts["already_gone"],
        failed=counts["failed"],
        changed=sum(1 for r in results if r.outcome is Outcome.CHANGED),
        stuck=stuck,
        unjudged=unjudged,
        drift=_drift(plan, results, len(stuck)),
        backlog=len(plan.deferred) + young,
        waiting={"grace": young, "deferred": len(plan.deferred)},
        backlogs=backlogs(plan, f.now, stuck),
        store_drift=plan.drift,
        owned={
            "snapshot": len(plan.snapshot_keeps) + len(orphans),
            "container": len(plan.kept(Kind.CONTAINER)) + len(plan.containers),
        },
        kept_snapshots=len(plan.snapshot_keeps),
        warnings=plan.warnings,
        requeue_after=_requeue(plan, counts["removed"]),
        ctr_calls=f.ctr_calls,
        recheck_window=round(max(f.result.recheck_windows), 4) if f.result.recheck_windows else None,
        orphan_bytes=None if f.sizes is None else sum(v for k, v in f.sizes.items() if k in orphans and k not in done),
        reclaimed_bytes=f.reclaimed_bytes,
        trigger=f.trigger,
        disk=f.disk,
        clock=clock_report(plan, f.clock),
        plan=plan,
        history=f.history,
        observation=f.observation,
    )


def measured_reclaim(sizes: Mapping[str, int] | None, result: PassResult) -> int | None:
    """Bytes containerd measured for the snapshots this pass removed (None: not measured)."""
    if sizes is None:
        return None
    done = {r.name for r in result.results if r.kind is Kind.SNAPSHOT and r.outcome.done}
    return sum(v for k, v in sizes.items() if k in done)


def _drift(plan: Plan, results: Sequence[ActionResult], stuck: int) -> dict[str, int]:
    drift = plan.drift_counts()
    for r in results:
        kind = _DRIFT_OF_ACTION.get(r.kind)
        if kind is not None and r.outcome.done:
            drift[kind] -= 1
    drift["stuck"] = stuck
    return drift


def _requeue(plan: Plan, removed: Mapping[str, int]) -> float | None:
    if sum(removed.values()) or plan.deferred:
        return 0.0  # level-triggered: look again at once until nothing moves
    return plan.requeue_after.total_seconds() if plan.requeue_after is not None else None


def unjudged_stuck(uninspectable: Mapping[str, str], undated: Mapping[str, str]) -> tuple[Stuck, ...]:
    """What the pass kept because it could not judge it, with why."""
    out = [
        Stuck(kind=Kind.CONTAINER, name=name, reason=f"could not be inspected, so kept with what it may use: {why}")
        for name, why in uninspectable.items()
    ]
    out += [
        Stuck(kind=Kind.SNAPSHOT, name=name, reason=f"containerd could not date it, so kept with its ancestors: {why}")
        for name, why in undated.items()
    ]
    return tuple(sorted(out, key=lambda s: s.name))


def backlogs(plan: Plan, now: datetime, stuck: Sequence[Stuck]) -> dict[str, Backlog]:
    """Per kind: planned, waiting (gracePeriod, staleAfter) and when the first is eligible, deferred
    (maxDeletionsPerPass), stuck. Only the daemon waits: at boot nothing is kept for now."""
    stuck_by = Counter(s.kind for s in stuck)
    counts = planned(plan)
    out = {}
    for kind in BACKLOG_KINDS:
        waiting = plan.waiting_until.get(kind, ())
        times = [t for t in waiting if t is not None]
        out[kind.value] = Backlog(
            planned=counts[kind.value],
            waiting=len(waiting),
            next_eligible=max(min(times), now) if times else None,
            deferred=len(plan.deferred) if kind is Kind.SNAPSHOT else 0,
            stuck=stuck_by[kind],
        )
    return out


def clock_report(plan: Plan, clock: ages.ClockRead) -> ClockReport:
    """What the pass saw of the clocks: a step of the wall clock since the last pass, and stamps
    lying ahead of it."""
    ahead = plan.stamped_ahead
    return ClockReport(
        step=None if clock.step is None else round(clock.step, 3),
        net_step=round(clock.clock.net_step, 3),
        steps=clock.clock.steps,
        stamped_ahead=len(ahead),
        most_ahead=round(max(ahead.values()), 3) if ahead else None,
    )


def error_report(
    number: int,
    mode: Mode,
    started: datetime,
    now: datetime,
    error: str,
    *,
    containerd_up: bool,
    prior: PassReport | None,
    trigger: str | None = None,
    retry_in: float | None = None,
    traceback: str | None = None,
) -> PassReport:
    """A pass that failed as a whole: what it left is what the last one left."""
    return PassReport(
        number=number,
        mode=mode,
        time=now,
        seconds=(now - started).total_seconds(),
        outcome="error",
        error=error,
        containerd_up=containerd_up,
        drift=prior.drift if prior else {},
        backlog=prior.backlog if prior else 0,
        backlogs=prior.backlogs if prior else {},
        stuck=prior.stuck if prior else (),
        owned=prior.owned if prior else {},
        trigger=trigger,
        retry_in=retry_in,
        traceback=traceback,
    )


def planned(plan: Plan) -> dict[str, int]:
    return {
        Kind.CONTAINER.value: len(plan.containers),
        Kind.SNAPSHOT.value: sum(len(level) for level in plan.snapshot_levels),
        Kind.RESULT_TMP.value: len(plan.tmp_entries),
        Kind.CACHE_TMP.value: len(plan.cache_tmp),
    }


def _diagnose(failure: ActionResult, observation: Observation, removed: set[str], mode: Mode) -> Stuck:
    """Why an object that should have gone is still there."""
    reason = failure.message or failure.outcome.value
    if failure.outcome is Outcome.HAS_CHILD:
        children = defaultdict(set)
        for s in observation.containerd.snapshots:
            if s.parent is not None:
                children[s.parent].add(s.key)
        if children[failure.name] <= removed:
            since = "; or a build started on it since this pass looked" if mode is Mode.DAEMON else ""
            reason = (
                "containerd says it still has a child, but lists none (a known containerd bug; "
                f"restarting containerd clears it{since}): {failure.message}"
            )
    return Stuck(kind=failure.kind, name=failure.name, reason=reason)


def run_stuck(reports: Sequence[PassReport], limit_hit: bool, max_passes: int) -> list[Stuck]:
    """What a run leaves, and why: the last acting pass's failures, or the pass limit."""
    acting = [r for r in reports if not r.dry_run]
    failed = {(s.kind, s.name): s for s in acting[-1].stuck} if acting else {}
    last = reports[-1]
    if not limit_hit or last.plan is None:
        return list(failed.values())
    p = last.plan
    names = [(Kind.CONTAINER, c.id) for c in p.containers] + [(Kind.SNAPSHOT, k) for k in p.snapshots]
    names += [(Kind.RESULT_TMP, t.id) for t in p.tmp_entries] + [(Kind.CACHE_TMP, c.name) for c in p.cache_tmp]
    return [failed.get(n) or Stuck(kind=n[0], name=n[1], reason=f"pass limit ({max_passes}) reached") for n in names]
