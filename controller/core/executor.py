"""Runs one plan: containers, then snapshots level by level, then store directories.

Each step is idempotent ("not found" is done). A step whose prerequisites failed
is skipped, not forced: the next pass observes again and decides afresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from controller.core.ports import ContainerdPort, Reporter, StorePort
from controller.model.outcome import ActionResult, Outcome, Result
from controller.model.plan import Kind, Plan
from controller.model.records import TaskStatus


class Guard(Protocol):
    def check(self, plan: Plan, keys: Sequence[str]) -> dict[str, Result]:
        """Keys that must not be removed now, with why; the others are confirmed."""
        ...


@dataclass
class PassResult:
    results: list[ActionResult] = field(default_factory=list)
    #: Seconds from the start of each batch's last check to the end of its removal:
    #: the window in which a key re-created under us would still be removed.
    recheck_windows: list[float] = field(default_factory=list)

    def failures(self) -> list[ActionResult]:
        """What should have gone and did not (an object that changed since it was planned is not one)."""
        return [r for r in self.results if r.outcome.failure]


def execute(
    plan: Plan,
    containerd: ContainerdPort,
    store: StorePort,
    reporter: Reporter | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    guard: Guard | None = None,
    batch: int | None = None,
) -> PassResult:
    """Run the plan in order. ``should_stop`` is asked before each action (one ctr call
    or one directory): a shutdown finishes the action under way, not the whole pass.

    With a ``guard`` (daemon mode), snapshots go in batches of at most ``batch`` keys,
    each confirmed by the guard right before its removal."""
    report = reporter or Reporter()
    out = PassResult()
    reasons: dict[tuple[Kind, str], str] = {}
    #: Leftover containers still there after their removal was tried (or not tried).
    stayed: set[str] = {c.id for c in plan.containers}

    def record(kind: Kind, name: str, result: Result) -> None:
        out.results.append(ActionResult(kind, name, result.outcome, result.message))
        if result.outcome.done:
            report.removed(kind, name, reasons.get((kind, name), ""), result.outcome)
        else:
            report.failed(kind, name, result)

    def remove_containers() -> None:
        """Kill and delete their tasks, then the containers."""
        for c in plan.containers:
            reasons[(Kind.CONTAINER, c.id)] = c.reason
        with_task = [c.id for c in plan.containers if c.task is not TaskStatus.ABSENT]
        if should_stop():
            return
        task_results = containerd.delete_tasks(with_task) if with_task else {}
        if should_stop():
            return
        for cid, result in containerd.remove_containers([c.id for c in plan.containers]).items():
            task = task_results.get(cid)
            if not result.outcome.done and task is not None and not task.outcome.done:
                result = Result(result.outcome, f"{result.message} (deleting its task: {task.message})")
            if result.outcome.done:
                stayed.discard(cid)
            record(Kind.CONTAINER, cid, result)

    # Snapshots go leaves first. A parent whose child failed this pass would only fail
    # too (and cut the batch short), so it waits for the next pass.
    failed: set[str] = set()
    blocked: dict[str, tuple[str, Outcome]] = {}
    parent_of = plan.snapshot_parents

    def remove_levels(levels: Sequence[Sequence[str]]) -> None:
        for level in levels:
            if should_stop():
                return
            keys = []
            for key in level:
                reasons[(Kind.SNAPSHOT, key)] = plan.snapshot_reasons.get(key, "")
                if key in blocked:
                    child, outcome = blocked[key]
                    # A child re-created under us is a live build's: its parent is not stuck, it changed.
                    why = (
                        f"its child {child} changed since planned"
                        if outcome is Outcome.CHANGED
                        else f"waiting for its child {child}"
                    )
                    record(Kind.SNAPSHOT, key, Result(outcome, why))
                    failed.add(key)
                    block_parent(key, outcome)
                else:
                    keys.append(key)
            for n, part in enumerate(_batches(keys, batch if guard is not None else None)):
                if n and should_stop():
                    return
                remove_batch(part)

    def remove_batch(keys: list[str]) -> None:
        started = time.monotonic()
        held = guard.check(plan, keys) if guard is not None else {}
        confirmed = [k for k in keys if k not in held]
        results = {**held, **(containerd.remove_snapshots(confirmed) if confirmed else {})}
        if guard is not None and confirmed:
            out.recheck_windows.append(time.monotonic() - started)
        for key in keys:
            result = results[key]
            record(Kind.SNAPSHOT, key, result)
            if not result.outcome.done:
                failed.add(key)
                block_parent(key, Outcome.CHANGED if result.outcome is Outcome.CHANGED else Outcome.NOT_TRIED)

    def block_parent(key: str, outcome: Outcome) -> None:
        parent = parent_of.get(key)
        if parent is not None:
            blocked[parent] = (key, outcome)

    def wait_for_stayed_containers(levels: Sequence[Sequence[str]]) -> list[list[str]]:
        """A container that is still there still holds what it runs on (on Windows its compute
        system keeps the layer folders open): that, and its ancestors, wait for a later pass."""
        unknown = [c for c in plan.runs_on_unknown if c in stayed]
        held: dict[str, str] = {}
        for container in sorted(stayed):
            for key in _with_ancestors(plan.pinned_by.get(container, ()), parent_of):
                held.setdefault(key, container)
        out_levels = []
        for level in levels:
            keep = []
            for key in level:
                cid = unknown[0] if unknown else held.get(key)
                if cid is None:
                    keep.append(key)
                    continue
                why = "it runs on a folder no build names, so it could be this one's" if unknown else "it uses this"
                reasons[(Kind.SNAPSHOT, key)] = plan.snapshot_reasons.get(key, "")
                record(Kind.SNAPSHOT, key, Result(Outcome.NOT_TRIED, f"waiting for container {cid} to go: {why}"))
                failed.add(key)
            out_levels.append(keep)
        return out_levels

    # 1 and 2. Leftover containers, and meanwhile every orphan level no container uses:
    #    the containers pin only what they run on (and its ancestors), which waits.
    if plan.containers and plan.containers_first:
        remove_containers()
        remove_levels(wait_for_stayed_containers(plan.snapshot_levels))
    elif plan.containers:
        pinned = _with_ancestors(plan.pinned, parent_of)
        with ThreadPoolExecutor(max_workers=1) as pool:
            containers_done = pool.submit(remove_containers)
            remove_levels([[k for k in level if k not in pinned] for level in plan.snapshot_levels])
            containers_done.result()
        remove_levels(wait_for_stayed_containers([[k for k in level if k in pinned] for level in plan.snapshot_levels]))
    else:
        remove_levels(plan.snapshot_levels)
    if should_stop():
        return out

    # 3. result-tmp/ entries, once the snapshots they name are gone.
    for t in plan.tmp_entries:
        if should_stop():
            return out
        reasons[(Kind.RESULT_TMP, t.id)] = t.reason
        waiting = [k for k in t.after if k in failed]
        if waiting:
            record(Kind.RESULT_TMP, t.id, Result(Outcome.NOT_TRIED, f"waiting for snapshot {', '.join(waiting)}"))
            continue
        record(Kind.RESULT_TMP, t.id, _one(store.remove_tmp_entry, t.id))

    # 4. cache-tmp/ leftovers (boot only; the planner decides).
    for leftover in plan.cache_tmp:
        if should_stop():
            return out
        reasons[(Kind.CACHE_TMP, leftover.name)] = leftover.reason
        record(Kind.CACHE_TMP, leftover.name, _one(store.remove_cache_tmp, leftover.name))
    return out


def _one(remove: Callable[[str], Result], name: str) -> Result:
    """One entry's removal: whatever goes wrong in it (a tree too deep to walk, a name the
    filesystem refuses) fails that entry, which is reported stuck with why, not the pass."""
    try:
        return remove(name)
    except Exception as e:
        return Result(Outcome.FAILED, f"unexpected error: {type(e).__name__}: {e}")


def _batches(keys: list[str], size: int | None) -> list[list[str]]:
    if not keys:
        return []
    if size is None:
        return [keys]
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def _with_ancestors(keys: Sequence[str], parent_of: Mapping[str, str | None]) -> set[str]:
    """The keys and every planned ancestor of theirs."""
    out: set[str] = set()
    for key in keys:
        k: str | None = key
        while k is not None and k not in out:
            out.add(k)
            k = parent_of.get(k)
    return out
