"""Daemon mode: a level-triggered loop beside a live worker.

The loop owns time. It runs a pass at start-up and then whenever something asks
for one: the resync interval, a change under ``result/`` or ``result-tmp/``, the
moment a grace period or ``staleAfter`` runs out, SIGHUP or a change of the
policy file (both reload it). Passes never overlap: triggers that arrive during a
pass coalesce into one more pass. A failing pass (containerd down, ctr timing out,
the DB locked) is retried with capped, jittered exponential backoff, and the loop
goes on. SIGTERM or SIGINT lets the action under way finish, then exits 0.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
from watchfiles import awatch

from controller.adapters import platform
from controller.adapters.containerd import CtrContainerd
from controller.adapters.ctr import Ctr
from controller.adapters.logs import Reporter
from controller.adapters.status import PassStatus, pass_status
from controller.adapters.store import entry_exists, observe_store
from controller.adapters.store_cleanup import StoreCleaner
from controller.config.settings import Settings
from controller.core.executor import execute
from controller.core.identity import RECHECK_BATCH, RemovalGuard, plan_with_ages
from controller.model.errors import CtrError, ReconcileError
from controller.model.plan import Mode, Plan
from controller.model.records import ContainerdState, History, Observation, TaskStatus, container_identity

log = logging.getLogger("reconcile")

_LIVE = frozenset({TaskStatus.RUNNING, TaskStatus.PAUSED, TaskStatus.PAUSING, TaskStatus.CREATED})
#: /healthz fails when the event loop has not ticked for this long (seconds).
HEARTBEAT_LIMIT = 10.0
#: Backoff after a failed pass: 1 s doubling to 2 minutes, each delay jittered down by up to half.
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 120.0


def remember(history: History, containerd: ContainerdState, now: datetime) -> History:
    """The daemon's memory, brought up to date with one observation.

    Since when each container (by id and creation time: ids repeat) has had no live
    task; containers that are gone are forgotten. Snapshots need no memory: their age
    is containerd's Created.
    """
    live = {t.id for t in containerd.tasks if t.status in _LIVE}
    idle = {}
    for c in containerd.containers:
        if c.id not in live:
            identity = container_identity(c)
            idle[identity] = history.containers_idle_since.get(identity, now)
    return History(containers_idle_since=idle)


def backoff(failures: int, rng: random.Random) -> float:
    delay: float = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** max(failures - 1, 0))
    return delay * (0.5 + rng.random() / 2)


@dataclass
class Daemon:
    """Runs passes until told to stop. ``load`` re-reads the settings (policy reload)."""

    load: Callable[[], Settings]
    reporter: Reporter = field(default_factory=Reporter)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    settings: Settings = field(init=False)
    history: History = field(default_factory=History)
    passes: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    _wake: anyio.Event = field(init=False)
    _stop: anyio.Event = field(init=False)
    _rng: random.Random = field(default_factory=random.Random)
    _why: str = "start-up"
    _current: str = "start-up"
    #: For /healthz: the event loop ticks this every second while it is alive.
    heartbeat: float = field(default_factory=time.monotonic)
    last_status: PassStatus | None = None

    def __post_init__(self) -> None:
        self.settings = self.load()

    def trigger(self, why: str) -> None:
        if not self._wake.is_set():
            self._why = why
        self._wake.set()

    async def run(self) -> int:
        self._wake = anyio.Event()
        self._stop = anyio.Event()
        self.trigger("start-up")
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals)
            tg.start_soon(self._watch)
            tg.start_soon(self._beat)
            await self._loop()
            tg.cancel_scope.cancel()
        log.info("stopped after %d passes", self.passes)
        return 0

    def request_stop(self) -> None:
        # Read by the executor thread between actions, so the action under way finishes.
        self.stopping.set()
        self._stop.set()
        self._wake.set()

    async def _loop(self) -> None:
        failures = 0
        next_in = self.settings.interval.total_seconds()
        while not self.stopping.is_set():
            with anyio.move_on_after(next_in) as timer:
                await self._wake.wait()
            if self.stopping.is_set():
                return
            self._current = "resync interval or requeue" if timer.cancelled_caught else self._why
            self._wake = anyio.Event()  # triggers from now on ask for one more pass
            started = self.clock()
            try:
                plan, status = await anyio.to_thread.run_sync(self.run_pass)
            except Exception as e:
                failures += 1
                next_in = backoff(failures, self._rng)
                self._finished(self._failed_status(started, e))
                if isinstance(e, ReconcileError):
                    log.warning("pass failed (%s); retrying in %.1f s", e, next_in)
                else:
                    # A bug or an OS error nobody foresaw: the traceback says where, and
                    # the loop outlives it, as a controller must; the next pass looks afresh.
                    log.error("pass failed unexpectedly; retrying in %.1f s", next_in, exc_info=e)
                continue
            failures = 0
            next_in = self._next_in(plan, status)

    async def _beat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await anyio.sleep(1)

    def healthy(self) -> tuple[bool, str]:
        """Liveness: the event loop itself is turning, not just the HTTP thread."""
        age = time.monotonic() - self.heartbeat
        if age > HEARTBEAT_LIMIT:
            return False, f"the loop has not ticked for {age:.0f} s"
        return True, f"alive: {self.passes} passes"

    def ready(self) -> tuple[bool, str]:
        """Readiness: the last pass succeeded, within two resync intervals."""
        status = self.last_status
        if status is None:
            return False, "no pass has finished yet"
        if status.outcome != "success":
            return False, f"the last pass failed: {status.error}"
        age = (self.clock() - status.time).total_seconds()
        limit = 2 * self.settings.interval.total_seconds()
        if age > limit:
            return False, f"the last successful pass ended {age:.0f} s ago (limit {limit:.0f} s)"
        return True, f"ready: last pass {age:.0f} s ago"

    def _finished(self, status: PassStatus) -> None:
        self.last_status = status
        try:
            self.reporter.pass_finished(status)
        except OSError as e:  # a full disk must not stop the loop
            log.error("could not report the pass: %s", e)

    def _failed_status(self, started: datetime, error: Exception) -> PassStatus:
        prior = self.last_status
        return PassStatus(
            time=self.clock(),
            mode=Mode.DAEMON,
            pass_number=self.passes,
            outcome="error",
            seconds=(self.clock() - started).total_seconds(),
            error=str(error) if isinstance(error, ReconcileError) else f"{type(error).__name__}: {error}",
            containerd_up=not isinstance(error, CtrError),
            drift=prior.drift if prior else {},
            stuck=prior.stuck if prior else (),
            owned=prior.owned if prior else {},
        )

    def _next_in(self, plan: Plan, status: PassStatus) -> float:
        interval = self.settings.interval.total_seconds()
        if sum(status.removed.values()) or plan.deferred:
            return 0.0  # level-triggered: look again at once until nothing moves
        if plan.requeue_after is not None:
            return min(interval, plan.requeue_after.total_seconds() + 0.05)
        return interval

    def run_pass(self) -> tuple[Plan, PassStatus]:
        """One pass: observe both sides, remember, plan, act. Runs in a worker thread."""
        t0 = self.clock()
        settings = self.settings
        ctr = Ctr(settings.ctr)
        options = settings.plan_options(Mode.DAEMON)
        containerd = CtrContainerd(ctr, container_prefix=options.container_prefix)
        # containerd before the store: a build that starts after the listing is not in
        # it, and one that starts before it (prepare, then result-tmp/) is in both or
        # young; the re-check before each removal covers what changes after.
        cd_state = containerd.observe()
        store_state = observe_store(settings.store)
        now = self.clock()
        self.history = remember(self.history, cd_state, now)
        observation = Observation(store=store_state, containerd=cd_state, history=self.history)
        plan = plan_with_ages(observation, options, now, Mode.DAEMON, containerd)
        self.passes += 1
        self.reporter.pass_started(self.passes, plan)
        sizes = containerd.usage([*plan.snapshots, *plan.deferred]) if settings.measure_bytes else None
        root = settings.store
        guard = RemovalGuard(containerd, lambda area, i: entry_exists(root, area, i), prefix=options.snapshot_prefix)
        result = execute(
            plan,
            containerd,
            StoreCleaner(settings.store),
            self.reporter,
            self.stopping.is_set,
            guard=guard,
            batch=RECHECK_BATCH,
        )
        seconds = (self.clock() - t0).total_seconds()
        status = pass_status(plan, result, self.passes, self.clock(), seconds, sizes)
        # Reported first, logged last: once the log says a pass ended, status.json and /metrics say so too.
        self._finished(status)
        window = f", re-check window max {status.recheck_window * 1000:.0f} ms" if status.recheck_window else ""
        log.info(
            "pass %d (%s): %d removed, %d failed, %d changed since planned, %d deferred, "
            "%d owned snapshots kept, %d ctr calls, %.2f s%s",
            self.passes,
            self._current,
            sum(status.removed.values()),
            sum(status.failed.values()),
            status.changed,
            len(plan.deferred),
            len(plan.kept("snapshot")),
            ctr.calls,
            seconds,
            window,
        )
        return plan, status

    async def _signals(self) -> None:
        async for what in platform.signals():
            if what == "reload":
                self._reload("SIGHUP")
            else:
                log.info("stop requested; finishing the action under way")
                self.request_stop()
                return

    def _reload(self, why: str) -> None:
        try:
            settings = self.load()
        except ReconcileError as e:
            log.error("policy reload (%s) failed, keeping the previous policy: %s", why, e)
            return
        if settings.store.absolute() != self.settings.store.absolute():
            # The lock we hold is the old store's; another instance may own the new one.
            log.error(
                "policy reload (%s) refused, keeping the previous policy: it moves the store from %s to %s; "
                "restart the daemon to change stores",
                why,
                self.settings.store,
                settings.store,
            )
            return
        self.settings = settings
        log.info("policy reloaded (%s)", why)
        self.trigger(f"policy reloaded ({why})")

    async def _watch(self) -> None:
        """One watcher for the store's top folders and the policy file's folder.

        Top level only: entries appearing and going is what changes a plan, and a
        recursive watch of result/ would cost a watch per folder of every layer.
        """
        store = [p for p in (self.settings.store / "result", self.settings.store / "result-tmp") if p.is_dir()]
        policy = self.settings.policy_path.resolve() if self.settings.policy_path else None
        folders = [*store, *([policy.parent] if policy else [])]
        if not folders:
            return
        store_prefixes = tuple(str(p) + os.sep for p in store)
        async for changes in awatch(*folders, recursive=False, debounce=1000, step=100, stop_event=self._stop):
            paths = {changed for _, changed in changes}
            if policy is not None and str(policy) in paths:
                self._reload("policy file changed")
            in_store = sum(1 for p in paths if p.startswith(store_prefixes))
            if in_store:
                self.trigger(f"{in_store} changes in the store")
