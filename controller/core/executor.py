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
    look = _LastLook(guard, batch)
    return _Execution(plan, containerd, store, reporter or Reporter(), should_stop, look).run()


class _Stopped(Exception):
    """A stop was asked for: the run ends before its next action."""


@dataclass(frozen=True)
class _LastLook:
    """Daemon: the guard's look at a batch of snapshots right before their removal, at most
    ``size`` keys a batch, so that the window in which a key re-created under us would still
    be removed stays short. Boot: no guard, no look, and a level goes in one ctr call."""

    guard: Guard | None
    size: int | None

    def batches(self, keys: list[str]) -> list[list[str]]:
        if not keys:
            return []
        if self.guard is None or self.size is None:
            return [keys]
        return [keys[i : i + self.size] for i in range(0, len(keys), self.size)]

    def remove(
        self, plan: Plan, keys: list[str], remove: Callable[[list[str]], dict[str, Result]]
    ) -> tuple[dict[str, Result], float | None]:
        """Each key's result (held by the guard, or its removal's), and the batch's recheck
        window (None when nothing was both looked at and removed)."""
        started = time.monotonic()
        held = self.guard.check(plan, keys) if self.guard is not None else {}
        confirmed = [k for k in keys if k not in held]
        results = {**held, **(remove(confirmed) if confirmed else {})}
        window = time.monotonic() - started if self.guard is not None and confirmed else None
        return results, window


class _Execution:
    """The state of one run of a plan, one method per phase; :meth:`run` gives their order."""

    def __init__(
        self,
        plan: Plan,
        containerd: ContainerdPort,
        store: StorePort,
        reporter: Reporter,
        should_stop: Callable[[], bool],
        look: _LastLook,
    ) -> None:
        self.plan = plan
        self.containerd = containerd
        self.store = store
        self.reporter = reporter
        self.should_stop = should_stop
        self.look = look
        self.out = PassResult()
        self.stopping = False
        self.reasons: dict[tuple[Kind, str], str] = {}
        #: Leftover containers still there after their removal was tried (or not tried).
        self.stayed: set[str] = {c.id for c in plan.containers}
        #: Snapshots that did not go this pass, and the parents that wait for such a child
        #: (with which child, and why) and so are not tried: they would only fail too.
        self.failed: set[str] = set()
        self.blocked: dict[str, tuple[str, Outcome]] = {}
        pinned = self._pinned()
        self.free_levels = [[k for k in level if k not in pinned] for level in plan.snapshot_levels]
        self.pinned_levels = [[k for k in level if k in pinned] for level in plan.snapshot_levels]

    def run(self) -> PassResult:
        try:
            self._remove_containers_meanwhile(self.free_levels)  # 1. and the orphans no container uses
            self._remove_levels(self._wait_for_stayed_containers(self.pinned_levels))  # 2. the rest
            self._remove_tmp_entries()  # 3. once the snapshots they name are gone
            self._remove_cache_tmp()  # 4.
        except _Stopped:
            pass
        return self.out

    def _check_stop(self) -> None:
        """Asked before each action (one ctr call, one directory): a stop finishes the action
        under way, not the pass; nothing after it is done. Once asked to stop, it stays stopped."""
        self.stopping = self.stopping or self.should_stop()
        if self.stopping:
            raise _Stopped

    def _record(self, kind: Kind, name: str, result: Result) -> None:
        self.out.results.append(ActionResult(kind, name, result.outcome, result.message))
        if result.outcome.done:
            self.reporter.removed(kind, name, self.reasons.get((kind, name), ""), result.outcome)
        else:
            self.reporter.failed(kind, name, result)

    def _pinned(self) -> set[str]:
        """The orphans that wait for the leftover containers: what they run on and its ancestors,
        or every orphan when one runs on a folder no build names."""
        if not self.plan.containers:
            return set()
        if self.plan.containers_first:
            return set(self.plan.snapshots)
        return _with_ancestors(self.plan.pinned, self.plan.snapshot_parents)

    # 1. Leftover containers.

    def _remove_containers_meanwhile(self, levels: Sequence[Sequence[str]]) -> None:
        """The leftover containers go on a thread of their own (a task takes a while to die)
        while ``levels``, which no container uses, go on this one."""
        if not self.plan.containers:
            self._remove_levels(levels)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            containers_done = pool.submit(self._remove_containers)
            self._remove_levels(levels)
            containers_done.result()

    def _remove_containers(self) -> None:
        """Kill and delete their tasks, then the containers."""
        for c in self.plan.containers:
            self.reasons[(Kind.CONTAINER, c.id)] = c.reason
        with_task = [c.id for c in self.plan.containers if c.task is not TaskStatus.ABSENT]
        task_results: dict[str, Result] = {}
        if with_task:
            self._check_stop()
            task_results = self.containerd.delete_tasks(with_task)
        self._check_stop()
        for cid, result in self.containerd.remove_containers([c.id for c in self.plan.containers]).items():
            task = task_results.get(cid)
            if not result.outcome.done and task is not None and not task.outcome.done:
                result = Result(result.outcome, f"{result.message} (deleting its task: {task.message})")
            if result.outcome.done:
                self.stayed.discard(cid)
            self._record(Kind.CONTAINER, cid, result)

    # 2. Orphan snapshots, leaves first. A parent whose child failed this pass would only fail
    #    too (and cut the batch short), so it waits for the next pass.

    def _wait_for_stayed_containers(self, levels: Sequence[Sequence[str]]) -> list[list[str]]:
        """A container that is still there still holds what it runs on (on Windows its compute
        system keeps the layer folders open): that, and its ancestors, wait for a later pass."""
        unknown = [c for c in self.plan.runs_on_unknown if c in self.stayed]
        held: dict[str, str] = {}
        for container in sorted(self.stayed):
            for key in _with_ancestors(self.plan.pinned_by.get(container, ()), self.plan.snapshot_parents):
                held.setdefault(key, container)
        why = "it runs on a folder no build names, so it could be this one's" if unknown else "it uses this"
        out_levels = []
        for level in levels:
            keep = []
            for key in level:
                cid = unknown[0] if unknown else held.get(key)
                if cid is None:
                    keep.append(key)
                    continue
                self.reasons[(Kind.SNAPSHOT, key)] = self.plan.snapshot_reasons.get(key, "")
                self._record(Kind.SNAPSHOT, key, Result(Outcome.NOT_TRIED, f"waiting for container {cid} to go: {why}"))
                self.failed.add(key)
            out_levels.append(keep)
        return out_levels

    def _remove_levels(self, levels: Sequence[Sequence[str]]) -> None:
        for level in levels:
            for part in self.look.batches(self._unblocked(level)):
                self._check_stop()
                self._remove_batch(part)

    def _unblocked(self, level: Sequence[str]) -> list[str]:
        """The level's keys to try; those waiting for a child that did not go are recorded so."""
        keys = []
        for key in level:
            self.reasons[(Kind.SNAPSHOT, key)] = self.plan.snapshot_reasons.get(key, "")
            if key not in self.blocked:
                keys.append(key)
                continue
            child, outcome = self.blocked[key]
            # A child re-created under us is a live build's: its parent is not stuck, it changed.
            why = (
                f"its child {child} changed since planned"
                if outcome is Outcome.CHANGED
                else f"waiting for its child {child}"
            )
            self._record(Kind.SNAPSHOT, key, Result(outcome, why))
            self._block_parent(key, outcome)
        return keys

    def _remove_batch(self, keys: list[str]) -> None:
        results, window = self.look.remove(self.plan, keys, self.containerd.remove_snapshots)
        if window is not None:
            self.out.recheck_windows.append(window)
        for key in keys:
            result = results[key]
            self._record(Kind.SNAPSHOT, key, result)
            if not result.outcome.done:
                self._block_parent(key, Outcome.CHANGED if result.outcome is Outcome.CHANGED else Outcome.NOT_TRIED)

    def _block_parent(self, key: str, outcome: Outcome) -> None:
        """``key`` did not go: so it fails, and its parent waits for it."""
        self.failed.add(key)
        parent = self.plan.snapshot_parents.get(key)
        if parent is not None:
            self.blocked[parent] = (key, outcome)

    # 3. result-tmp/ entries, once the snapshots they name are gone.

    def _remove_tmp_entries(self) -> None:
        for t in self.plan.tmp_entries:
            self.reasons[(Kind.RESULT_TMP, t.id)] = t.reason
            waiting = [k for k in t.after if k in self.failed]
            if waiting:
                result = Result(Outcome.NOT_TRIED, f"waiting for snapshot {', '.join(waiting)}")
                self._record(Kind.RESULT_TMP, t.id, result)
                continue
            self._check_stop()
            self._record(Kind.RESULT_TMP, t.id, _one(self.store.remove_tmp_entry, t.id))

    # 4. cache-tmp/ leftovers (boot only; the planner decides).

    def _remove_cache_tmp(self) -> None:
        for leftover in self.plan.cache_tmp:
            self.reasons[(Kind.CACHE_TMP, leftover.name)] = leftover.reason
            self._check_stop()
            self._record(Kind.CACHE_TMP, leftover.name, _one(self.store.remove_cache_tmp, leftover.name))


def _one(remove: Callable[[str], Result], name: str) -> Result:
    """One entry's removal: whatever goes wrong in it (a tree too deep to walk, a name the
    filesystem refuses) fails that entry, which is reported stuck with why, not the pass."""
    try:
        return remove(name)
    except Exception as e:
        return Result(Outcome.FAILED, f"unexpected error: {type(e).__name__}: {e}")


def _with_ancestors(keys: Sequence[str], parent_of: Mapping[str, str | None]) -> set[str]:
    """The keys and every planned ancestor of theirs."""
    out: set[str] = set()
    for key in keys:
        k: str | None = key
        while k is not None and k not in out:
            out.add(k)
            k = parent_of.get(k)
    return out
