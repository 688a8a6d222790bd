"""observe -> plan -> execute -> observe, until a pass plans nothing.

Level-triggered: every pass looks at both sides from scratch, so an action that
failed or an object that appeared meanwhile is simply seen again. The reconciler
stops when a pass plans nothing (converged), when a pass removed nothing (another
would only fail the same way), or at the pass limit.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime

from controller.adapters.containerd import ContainerdActuator
from controller.adapters.ctr import Outcome
from controller.adapters.logs import Reporter
from controller.core.executor import ActionResult, StoreActuator, execute
from controller.core.identity import plan_with_ages
from controller.model.plan import Mode, ObjectKind, Plan, PlanOptions, StoreDrift
from controller.model.records import Observation, Record

_KINDS = ("container", "snapshot", "result-tmp", "cache-tmp")


class Stuck(Record):
    kind: ObjectKind
    name: str
    reason: str


class Summary(Record):
    mode: Mode
    dry_run: bool
    converged: bool
    passes: int
    removed: dict[str, int]
    #: Planned but gone before we got there (containerd's own GC takes a removed
    #: container's snapshot, for one): done all the same.
    already_gone: dict[str, int]
    planned: dict[str, int]
    kept_snapshots: int
    stuck: tuple[Stuck, ...]
    #: What is still out of agreement at the end, by drift kind.
    remaining: dict[str, int]
    drift: StoreDrift
    warnings: tuple[str, ...]
    seconds: float
    ctr_calls: int | None = None

    @property
    def exit_code(self) -> int:
        if self.dry_run:
            return 0 if self.converged and not self.stuck else 3
        return 0 if self.converged and not self.stuck else 1


def count_planned(plan: Plan) -> dict[str, int]:
    return {
        "container": len(plan.containers),
        "snapshot": sum(len(level) for level in plan.snapshot_levels),
        "result-tmp": len(plan.tmp_entries),
        "cache-tmp": len(plan.cache_tmp),
    }


def reconcile(
    observe: Callable[[], Observation],
    options: PlanOptions,
    mode: Mode,
    containerd: ContainerdActuator,
    store: StoreActuator,
    *,
    now: Callable[[], datetime],
    max_passes: int = 10,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    ctr_calls: Callable[[], int] | None = None,
    before_pass: Callable[[], None] | None = None,
) -> tuple[Summary, Plan]:
    """Run to convergence (or plan only, with ``dry_run``). Returns the summary and the first plan.

    ``before_pass`` is called before each pass acts; whatever it raises ends the run."""
    started = time.perf_counter()
    report = reporter or Reporter()
    observation = observe()
    first = current = plan_with_ages(observation, options, now(), mode, containerd)
    removed: Counter[str] = Counter()
    gone: Counter[str] = Counter()
    last_failure: dict[tuple[str, str], ActionResult] = {}
    passes = 0
    limit_hit = False
    while not dry_run and not current.empty:
        if passes >= max_passes:
            limit_hit = True
            break
        if before_pass is not None:
            before_pass()
        passes += 1
        report.pass_started(passes, current)
        result = execute(current, containerd, store, report)
        for r in result.results:
            if r.outcome is Outcome.REMOVED:
                removed[r.kind] += 1
            elif r.outcome is Outcome.NOT_FOUND:
                gone[r.kind] += 1
            if r.outcome.done:
                last_failure.pop((r.kind, r.name), None)
            else:
                last_failure[(r.kind, r.name)] = r
        observation = observe()
        current = plan_with_ages(observation, options, now(), mode, containerd)
        if result.progress == 0:
            break

    stuck = [] if dry_run else _stuck(current, observation, last_failure, limit_hit, max_passes)
    stuck += [
        Stuck(kind=d.kind, name=d.name, reason=d.reason) for d in current.decisions if d.rule == "unreadable-layerinfo"
    ]
    summary = Summary(
        mode=mode,
        dry_run=dry_run,
        converged=current.empty,
        passes=passes,
        removed={k: removed.get(k, 0) for k in _KINDS},
        already_gone={k: gone.get(k, 0) for k in _KINDS},
        planned=count_planned(first),
        kept_snapshots=len(current.kept("snapshot")),
        stuck=tuple(stuck),
        remaining=current.drift_counts() | {"stuck": len(stuck)},
        drift=current.drift,
        warnings=current.warnings,
        seconds=round(time.perf_counter() - started, 3),
        ctr_calls=ctr_calls() if ctr_calls else None,
    )
    return summary, first


def _stuck(
    plan: Plan,
    observation: Observation,
    last_failure: dict[tuple[str, str], ActionResult],
    limit_hit: bool,
    max_passes: int,
) -> list[Stuck]:
    """Why each object still planned for removal is still there."""
    has_children = {s.parent for s in observation.containerd.snapshots if s.parent}
    names: list[tuple[ObjectKind, str]] = [("container", c.id) for c in plan.containers]
    names += [("snapshot", k) for k in plan.snapshots]
    names += [("result-tmp", t.id) for t in plan.tmp_entries]
    names += [("cache-tmp", c.name) for c in plan.cache_tmp]
    out = []
    for kind, name in names:
        failure = last_failure.get((kind, name))
        if failure is None:
            reason = f"pass limit ({max_passes}) reached" if limit_hit else "not attempted"
        elif failure.outcome is Outcome.HAS_CHILD and name not in has_children:
            reason = (
                "containerd says it still has a child, but lists none (a known containerd bug; "
                f"restarting containerd clears it): {failure.message}"
            )
        else:
            reason = failure.message or failure.outcome.value
        out.append(Stuck(kind=kind, name=name, reason=reason))
    return out
