"""One pass, the same in both modes: observe, plan, act, report. And ``--once``: passes until done.

Level-triggered: every pass looks at both sides from scratch, so an action that
failed or an object that appeared meanwhile is simply seen again. ``one_pass``
returns one :class:`PassReport` and gives it to every reporter; the daemon's loop
calls it when something asks for a pass, ``run_once`` repeats it until a pass plans
nothing (converged), removes nothing (another would only fail the same way), or the
pass limit is reached.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TypeVar

from controller.core import ages
from controller.core.executor import PassResult, execute
from controller.core.identity import RECHECK_BATCH, RemovalGuard, plan_with_ages
from controller.core.ports import ContainerdPort, Ports
from controller.model.errors import CtrError, CtrTimeoutError
from controller.model.outcome import (
    BACKLOG_KINDS,
    ActionResult,
    Backlog,
    ClockReport,
    Outcome,
    PassReport,
    Result,
    RunReport,
    Stuck,
)
from controller.model.plan import Kind, Mode, Plan, PlanOptions, Rule
from controller.model.records import LIVE_TASKS, ContainerdState, History, Observation, StoreState

_DRIFT_OF_ACTION = {
    Kind.SNAPSHOT: "orphan_snapshots",
    Kind.CONTAINER: "leftover_containers",
    Kind.RESULT_TMP: "stale_result_tmp",
}


@dataclass(frozen=True)
class PassOptions:
    plan: PlanOptions
    mode: Mode
    #: Measure the disk orphans hold (one more containerd call that walks them).
    measure_bytes: bool = False
    #: Plan only: observe and plan, change nothing.
    dry_run: bool = False
    #: Daemon: snapshots checked and removed together (see controller.core.identity).
    recheck_batch: int = RECHECK_BATCH
    #: Asked before each action: a stop finishes the action under way, not the pass.
    should_stop: Callable[[], bool] = field(default=lambda: False, compare=False)
    #: Daemon: how often a pass looks at the snapshotter's folder (None: never in a pass;
    #: ``--once`` looks once, after its collection).
    disk_every: timedelta | None = None


#: After removals, the collector deletes their folders within a second or so; until then a
#: folder of a removed snapshot would look like one containerd does not know.
DISK_SETTLE = timedelta(seconds=60)


def _disk_due(ports: Ports, options: PassOptions, history: History, monotonic: float) -> bool:
    if ports.disk is None or options.disk_every is None:
        return False
    looked, removed = history.disk_looked_at, history.snapshots_removed_at
    return (looked is None or monotonic - looked >= options.disk_every.total_seconds()) and (
        removed is None or monotonic - removed >= DISK_SETTLE.total_seconds()
    )


def remember(history: History, containerd: ContainerdState, store: StoreState, clock: ages.ClockRead) -> History:
    """The daemon's memory, brought up to date with one observation: how long this process has
    watched each object in its present state (see controller.core.ages). What went is forgotten;
    an object under a new stamp (ids and keys repeat) is watched from zero. A snapshot's Created
    is read later in the pass, where it decides something (``plan_with_ages`` restamps)."""
    live = {t.id for t in containerd.tasks if t.status in LIVE_TASKS}
    idle_now = {c.id: ages.container_stamp(c) for c in containerd.containers if c.id not in live}
    live_now = {c.id: ages.container_stamp(c) for c in containerd.containers if c.id in live}
    snapshots_now: dict[str, str | None] = {
        s.key: None if s.created is None else ages.stamp_of(s.created) for s in containerd.snapshots
    }
    elapsed = clock.elapsed
    return history.model_copy(
        update={
            "clock": clock.clock,
            "snapshots": ages.carry(history.snapshots, snapshots_now, elapsed),
            "idle_containers": ages.carry(history.idle_containers, idle_now, elapsed),
            "live_containers": ages.carry(history.live_containers, live_now, elapsed),
            "tmp_entries": ages.carry(history.tmp_entries, {e.id: ages.entry_stamp(e) for e in store.tmp}, elapsed),
        }
    )


def one_pass(
    ports: Ports, options: PassOptions, history: History, number: int, *, why: str | None = None
) -> PassReport:
    """Observe both sides, plan, act (unless a dry run), and report. Errors propagate."""
    started = ports.clock.now()
    calls = ports.containerd.calls
    mode = options.mode
    # containerd before the store: a build that starts after the listing is not in it, and one
    # that starts before it (prepare, then result-tmp/) is in both or young; what changes after
    # is caught by the re-check before each removal (daemon).
    containerd = ports.containerd.observe()
    unjudged = dict(containerd.uninspectable)
    store = ports.store.observe()
    now, monotonic = ports.clock.now(), ports.clock.monotonic()
    clock = ages.watch_clock(history.clock, now, monotonic)
    history = remember(history, containerd, store, clock)
    disk = None
    disk_calls = ports.disk.calls if ports.disk is not None else 0
    if ports.disk is not None and _disk_due(ports, options, history, monotonic):
        disk = ports.disk.observe_states(containerd, store)
        history = history.model_copy(update={"disk_looked_at": monotonic})
    observation = Observation(store=store, containerd=containerd, history=history)
    dating = _Dating(ports.containerd)
    plan, observation = plan_with_ages(observation, options.plan, now, mode, dating)
    history = observation.history
    unjudged.update(dating.undated)
    orphans = [*plan.snapshots, *plan.deferred]
    sizes = (ports.containerd.usage(orphans) if orphans else {}) if options.measure_bytes else None
    result = PassResult()
    if not options.dry_run:
        ports.reporter.pass_started(number, plan)
        guard = None
        if mode is Mode.DAEMON:
            guard = _KeyByKeyGuard(ports.containerd, ports.store.has_entry, prefix=options.plan.snapshot_prefix)
        result = execute(
            plan,
            ports.containerd,
            ports.store,
            ports.reporter,
            options.should_stop,
            guard=guard,
            batch=options.recheck_batch,
        )
    ended = ports.clock.now()
    report = _report(plan, result, observation, number, options, ended, (ended - started).total_seconds(), sizes)
    if report.removed.get(Kind.SNAPSHOT.value):
        history = history.model_copy(update={"snapshots_removed_at": ports.clock.monotonic()})
    kept = tuple(
        Stuck(kind=Kind.CONTAINER, name=name, reason=f"could not be inspected, so kept with what it may use: {why}")
        if name not in dating.undated
        else Stuck(
            kind=Kind.SNAPSHOT, name=name, reason=f"containerd could not date it, so kept with its ancestors: {why}"
        )
        for name, why in sorted(unjudged.items())
    )
    report = report.model_copy(
        update={
            "ctr_calls": ports.containerd.calls - calls + (ports.disk.calls - disk_calls if ports.disk else 0),
            "history": history,
            "observation": observation,
            "disk": disk,
            "reclaimed_bytes": (
                ports.disk.reclaimed(report.reclaimed_bytes, disk) if ports.disk else report.reclaimed_bytes
            ),
            "trigger": why,
            "unjudged": kept,
            "stuck": report.stuck + kept,
            "drift": {**report.drift, "stuck": report.drift.get("stuck", 0) + len(kept)},
            "backlogs": backlogs(plan, now, report.stuck + kept),
            "clock": clock_report(plan, clock),
        }
    )
    if not options.dry_run:
        ports.reporter.pass_finished(report)
    return report


def run_once(
    ports: Ports,
    options: PassOptions,
    *,
    max_passes: int = 10,
    before_pass: Callable[[], None] | None = None,
) -> RunReport:
    """Passes until converged (or, with ``dry_run``, one look). ``before_pass`` is called before
    each pass that may act; whatever it raises ends the run."""
    started = ports.clock.now()
    calls = ports.containerd.calls + (ports.disk.calls if ports.disk else 0)
    history = History()
    reports: list[PassReport] = []
    # Removed snapshots leave their layer folders to containerd's next garbage collection. At
    # boot nothing else runs, so one is started as soon as a pass has removed any, beside the
    # next look, and the run ends once it has finished: the worker starts with its disk back.
    collector = ThreadPoolExecutor(max_workers=1)
    collections: list[Future[Result]] = []

    def look(number: int, dry_run: bool) -> PassReport:
        nonlocal history
        pass_options = options if options.dry_run == dry_run else replace(options, dry_run=dry_run)
        if number == 1 and options.measure_bytes:
            # The disk before any removal: what the run leaves in rm-* is told from what was there.
            pass_options = replace(pass_options, disk_every=timedelta(0))
        if not dry_run and before_pass is not None:
            before_pass()
        report = one_pass(ports, pass_options, history, number)
        history = report.history or history
        reports.append(report)
        if report.removed.get(Kind.SNAPSHOT.value):
            collections.append(collector.submit(_collect_garbage, ports.containerd))
        return report

    limit_hit = False
    with collector:
        if options.dry_run:
            look(1, True)
        else:
            for number in range(1, max_passes + 1):
                report = look(number, False)
                if report.planned_total == 0:
                    break
                if report.progress == 0:
                    # Nothing moved (what it planned failed, or was gone already): one more look,
                    # without acting, says whether anything is left.
                    look(number + 1, True)
                    break
            else:
                # Every pass made progress: one more look, without acting, says where it stands.
                limit_hit = look(max_passes + 1, True).planned_total > 0
        collected = [job.result() for job in collections]
    failed_gc = [r.message for r in collected if not r.outcome.done]
    last = reports[-1]
    disk, left = None, None
    if ports.disk is not None and last.observation is not None:
        disk = ports.disk.observe_states(last.observation.containerd, last.observation.store)
        before = reports[0].disk
        if before is not None and before.error is None and disk.error is None:
            left = max(0, disk.removed_bytes - before.removed_bytes)
    converged = last.planned_total == 0
    stuck: list[Stuck] = []
    if not converged and not options.dry_run:
        stuck = _stuck(reports, limit_hit, max_passes)
    assert last.plan is not None
    stuck += [
        Stuck(kind=d.kind, name=d.name, reason=d.reason) for d in last.plan.decisions if d.rule is Rule.UNREADABLE
    ]
    stuck += [s for s in last.unjudged if s not in stuck]
    return RunReport(
        passes=tuple(reports),
        converged=converged,
        stuck=tuple(stuck),
        seconds=round((ports.clock.now() - started).total_seconds(), 3),
        ctr_calls=ports.containerd.calls + (ports.disk.calls if ports.disk else 0) - calls,
        garbage_collection=None if not collected else (failed_gc[-1] if failed_gc else "done"),
        disk=disk,
        left_on_disk=left,
    )


def _collect_garbage(containerd: ContainerdPort) -> Result:
    """A collection that fails or times out is reported; what was removed stays removed."""
    try:
        return containerd.collect_garbage()
    except CtrError as e:
        return Result(Outcome.FAILED, str(e))


_V = TypeVar("_V")


def _key_by_key(
    keys: Sequence[str], ask: Callable[[Sequence[str]], dict[str, _V]], failed: Callable[[str, CtrError], None]
) -> dict[str, _V]:
    """Ask about all keys at once; when ctr fails, ask key by key, so a key containerd cannot
    answer for fails that key alone (``failed``), not the pass. A timeout is not one key's
    failure but containerd's: it still fails the pass (asking key by key would wait once a key)."""
    try:
        return ask(keys)
    except CtrTimeoutError:
        raise
    except CtrError:
        pass
    out: dict[str, _V] = {}
    for key in keys:
        try:
            out.update(ask([key]))
        except CtrTimeoutError:
            raise
        except CtrError as e:
            failed(key, e)
    return out


class _Dating:
    """The ages a plan asks for, where one snapshot containerd cannot date (``snapshots info`` fails
    for it alone) stays undated, so kept with its ancestors (the planner keeps what it could not
    date), and is reported."""

    def __init__(self, source: ContainerdPort) -> None:
        self.source = source
        self.undated: dict[str, str] = {}

    def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
        def undated(key: str, error: CtrError) -> None:
            self.undated[key] = str(error)

        return _key_by_key(keys, self.source.snapshot_created, undated)


class _KeyByKeyGuard(RemovalGuard):
    """The last look before a batch's removal, where a key containerd cannot date at that moment
    fails that key (not removed, reported with why), not the pass."""

    def check(self, plan: Plan, keys: Sequence[str]) -> dict[str, Result]:
        failures: dict[str, Result] = {}

        def failed(key: str, error: CtrError) -> None:
            failures[key] = Result(Outcome.FAILED, f"could not look at it again right before its removal: {error}")

        check = super().check
        return {**_key_by_key(keys, lambda part: check(plan, part), failed), **failures}


def backlogs(plan: Plan, now: datetime, stuck: Sequence[Stuck]) -> dict[str, Backlog]:
    """Per kind: planned, waiting (gracePeriod, staleAfter) and when the first is eligible, deferred
    (maxDeletionsPerPass), stuck. Only the daemon waits: at boot nothing is kept for now."""
    stuck_by = Counter(s.kind for s in stuck)
    planned = _planned(plan)
    out = {}
    for kind in BACKLOG_KINDS:
        waiting = plan.waiting_until.get(kind, ())
        times = [t for t in waiting if t is not None]
        out[kind.value] = Backlog(
            planned=planned[kind.value],
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
    )


def _report(
    plan: Plan,
    result: PassResult,
    observation: Observation,
    number: int,
    options: PassOptions,
    now: datetime,
    seconds: float,
    sizes: dict[str, int] | None,
) -> PassReport:
    results = result.results
    counts = PassReport.counts(results)
    drift = plan.drift_counts()
    for r in results:
        kind = _DRIFT_OF_ACTION.get(r.kind)
        if kind is not None and r.outcome.done:
            drift[kind] -= 1
    failures = result.failures()
    drift["stuck"] = len(failures)
    done = {r.name for r in results if r.kind is Kind.SNAPSHOT and r.outcome.done}
    orphans = {*plan.snapshots, *plan.deferred}
    kept = plan.snapshot_keeps
    young = sum(1 for rule, _ in kept.values() if rule is Rule.GRACE)
    if sum(counts["removed"].values()) or plan.deferred:
        requeue: float | None = 0.0  # level-triggered: look again at once until nothing moves
    else:
        requeue = plan.requeue_after.total_seconds() if plan.requeue_after is not None else None
    return PassReport(
        number=number,
        mode=plan.mode,
        time=now,
        seconds=round(seconds, 3),
        dry_run=options.dry_run,
        planned=_planned(plan),
        removed=counts["removed"],
        already_gone=counts["already_gone"],
        failed=counts["failed"],
        changed=sum(1 for r in results if r.outcome is Outcome.CHANGED),
        stuck=tuple(_diagnose(r, observation, done, plan.mode) for r in failures),
        drift=drift,
        backlog=len(plan.deferred) + young,
        waiting={"grace": young, "deferred": len(plan.deferred)},
        store_drift=plan.drift,
        owned={
            "snapshot": len(kept) + len(orphans),
            "container": len(plan.kept(Kind.CONTAINER)) + len(plan.containers),
        },
        kept_snapshots=len(kept),
        warnings=plan.warnings,
        requeue_after=requeue,
        recheck_window=round(max(result.recheck_windows), 4) if result.recheck_windows else None,
        orphan_bytes=None if sizes is None else sum(v for k, v in sizes.items() if k in orphans and k not in done),
        reclaimed_bytes=None if sizes is None else sum(v for k, v in sizes.items() if k in done),
        plan=plan,
    )


def _planned(plan: Plan) -> dict[str, int]:
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


def _stuck(reports: list[PassReport], limit_hit: bool, max_passes: int) -> list[Stuck]:
    """What the run leaves, and why: the last acting pass's failures, or the pass limit."""
    acting = [r for r in reports if not r.dry_run]
    failed = {(s.kind, s.name): s for s in acting[-1].stuck} if acting else {}
    last = reports[-1]
    if not limit_hit or last.plan is None:
        return list(failed.values())
    p = last.plan
    names = [(Kind.CONTAINER, c.id) for c in p.containers] + [(Kind.SNAPSHOT, k) for k in p.snapshots]
    names += [(Kind.RESULT_TMP, t.id) for t in p.tmp_entries] + [(Kind.CACHE_TMP, c.name) for c in p.cache_tmp]
    return [failed.get(n) or Stuck(kind=n[0], name=n[1], reason=f"pass limit ({max_passes}) reached") for n in names]
