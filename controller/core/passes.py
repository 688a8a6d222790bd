"""One pass, the same in both modes: look, plan, act, report. And ``--once``: passes until done.

Level-triggered: every pass looks at both sides from scratch, so an action that
failed or an object that appeared meanwhile is simply seen again. ``one_pass``
returns one :class:`PassReport` and gives it to every reporter; the daemon's loop
calls it when something asks for a pass, ``run_once`` repeats it until a pass plans
nothing (converged), removes nothing (another would only fail the same way), or the
pass limit is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

from controller.core.executor import PassResult, execute
from controller.core.identity import Dating, KeyByKeyGuard, plan_with_ages
from controller.core.observe import look
from controller.core.options import PassOptions
from controller.core.ports import ContainerdPort, Ports
from controller.core.reporting import PassFacts, measured_reclaim, pass_report, run_stuck
from controller.model.disk import DiskDrift
from controller.model.errors import CtrError
from controller.model.outcome import Outcome, PassReport, Result, RunReport, Stuck
from controller.model.plan import Kind, Mode, Plan, Rule
from controller.model.records import History

__all__ = ("PassOptions", "one_pass", "run_once")


def one_pass(
    ports: Ports, options: PassOptions, history: History, number: int, *, why: str | None = None
) -> PassReport:
    """Look at both sides, plan, act (unless a dry run), and report. Errors propagate."""
    started, calls = ports.clock.now(), ports.containerd.calls
    seen = look(ports, options, history)
    dating = Dating(ports.containerd)
    plan, observation = plan_with_ages(seen.observation, options.plan, seen.now, options.mode, dating)
    orphans = [*plan.snapshots, *plan.deferred]
    sizes = (ports.containerd.usage(orphans) if orphans else {}) if options.measure_bytes else None
    result = PassResult() if options.dry_run else _act(ports, options, plan, number)
    ended = ports.clock.now()
    history = observation.history
    if any(r.kind is Kind.SNAPSHOT and r.outcome is Outcome.REMOVED for r in result.results):
        history = history.model_copy(update={"snapshots_removed_at": ports.clock.monotonic()})
    reclaimed = measured_reclaim(sizes, result)
    report = pass_report(
        PassFacts(
            number=number,
            dry_run=options.dry_run,
            plan=plan,
            result=result,
            observation=observation,
            history=history,
            now=seen.now,
            ended=ended,
            seconds=(ended - started).total_seconds(),
            clock=seen.clock,
            disk=seen.disk,
            uninspectable=seen.observation.containerd.uninspectable,
            undated=dating.undated,
            ctr_calls=ports.containerd.calls - calls + seen.disk_calls,
            sizes=sizes,
            reclaimed_bytes=ports.disk.reclaimed(reclaimed, seen.disk) if ports.disk else reclaimed,
            trigger=why,
        )
    )
    if not options.dry_run:
        ports.reporter.pass_finished(report)
    return report


def _act(ports: Ports, options: PassOptions, plan: Plan, number: int) -> PassResult:
    ports.reporter.pass_started(number, plan)
    guard = None
    if options.mode is Mode.DAEMON:
        guard = KeyByKeyGuard(ports.containerd, ports.store.has_entry, prefix=options.plan.snapshot_prefix)
    return execute(
        plan,
        ports.containerd,
        ports.store,
        ports.reporter,
        options.should_stop,
        guard=guard,
        batch=options.recheck_batch,
    )


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
    run = _OnceRun(ports, options, before_pass)
    limit_hit = False
    with run.collector:
        if options.dry_run:
            run.look(1, True)
        else:
            for number in range(1, max_passes + 1):
                report = run.look(number, False)
                if report.planned_total == 0:
                    break
                if report.progress == 0:
                    # Nothing moved (what it planned failed, or was gone already): one more look,
                    # without acting, says whether anything is left.
                    run.look(number + 1, True)
                    break
            else:
                # Every pass made progress: one more look, without acting, says where it stands.
                limit_hit = run.look(max_passes + 1, True).planned_total > 0
        collected = [job.result() for job in run.collections]
    # Removed is not reclaimed: what the removals left in our trash stays on disk, and is stuck.
    trash = () if options.dry_run else ports.store.empty_trash()
    failed_gc = [r.message for r in collected if not r.outcome.done]
    disk, left = run.disk_at_end()
    return RunReport(
        passes=tuple(run.reports),
        converged=run.reports[-1].planned_total == 0,
        stuck=(*run.stuck(limit_hit, max_passes), *(t.stuck for t in trash)),
        trash=trash,
        seconds=round((ports.clock.now() - started).total_seconds(), 3),
        ctr_calls=ports.containerd.calls + (ports.disk.calls if ports.disk else 0) - calls,
        garbage_collection=None if not collected else (failed_gc[-1] if failed_gc else "done"),
        disk=disk,
        left_on_disk=left,
    )


class _OnceRun:
    """The passes of one ``--once``, and the garbage collections their removals start.

    Removed snapshots leave their layer folders to containerd's next garbage collection. At
    boot nothing else runs, so one is started as soon as a pass has removed any, beside the
    next look, and the run ends once it has finished: the worker starts with its disk back."""

    def __init__(self, ports: Ports, options: PassOptions, before_pass: Callable[[], None] | None) -> None:
        self.ports, self.options, self.before_pass = ports, options, before_pass
        self.history = History()
        self.reports: list[PassReport] = []
        self.collector = ThreadPoolExecutor(max_workers=1)
        self.collections: list[Future[Result]] = []

    def look(self, number: int, dry_run: bool) -> PassReport:
        options = self.options if self.options.dry_run == dry_run else replace(self.options, dry_run=dry_run)
        if number == 1 and options.measure_bytes:
            # The disk before any removal: what the run leaves in rm-* is told from what was there.
            options = replace(options, disk_every=timedelta(0))
        if not dry_run and self.before_pass is not None:
            self.before_pass()
        report = one_pass(self.ports, options, self.history, number)
        self.history = report.history or self.history
        self.reports.append(report)
        if report.removed.get(Kind.SNAPSHOT.value):
            self.collections.append(self.collector.submit(_collect_garbage, self.ports.containerd))
        return report

    def disk_at_end(self) -> tuple[DiskDrift | None, int | None]:
        """The snapshotter's folder once the run ended, and the bytes its removals left in rm-*."""
        last = self.reports[-1]
        if self.ports.disk is None or last.observation is None:
            return None, None
        disk = self.ports.disk.observe_states(last.observation.containerd, last.observation.store)
        before = self.reports[0].disk
        if before is not None and before.error is None and disk.error is None:
            return disk, max(0, disk.removed_bytes - before.removed_bytes)
        return disk, None

    def stuck(self, limit_hit: bool, max_passes: int) -> list[Stuck]:
        last = self.reports[-1]
        stuck: list[Stuck] = []
        if last.planned_total != 0 and not self.options.dry_run:
            stuck = run_stuck(self.reports, limit_hit, max_passes)
        assert last.plan is not None
        stuck += [
            Stuck(kind=d.kind, name=d.name, reason=d.reason) for d in last.plan.decisions if d.rule is Rule.UNREADABLE
        ]
        return stuck + [s for s in last.unjudged if s not in stuck]


def _collect_garbage(containerd: ContainerdPort) -> Result:
    """A collection that fails or times out is reported; what was removed stays removed."""
    try:
        return containerd.collect_garbage()
    except CtrError as e:
        return Result(Outcome.FAILED, str(e))
