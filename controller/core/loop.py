"""The daemon's loop: decides when a pass runs. It alone owns time.

It runs a pass at start-up and whenever something asks for one (``trigger``: the
store changed, the policy was reloaded), at the resync interval, and when the last
pass asked to come back (a grace period or ``staleAfter`` running out, or at once
while passes still remove things). Passes never overlap: triggers that arrive during
a pass coalesce into one more pass. A pass that fails is reported and retried with
capped, jittered exponential backoff; the loop goes on. ``request_stop`` lets the
action under way finish, then the loop returns.

Passes are paced by what they cost (:class:`CpuBudget`, ``cpu_share``): passes spend CPU
seconds from a bucket that refills at ``cpu_share`` of a core, so on a big store beside a busy
worker the daemon's share of a core stays bounded whatever the store's size, while on a small one
a pass still follows each change at once. A pass after one that removed something is not held
back (its work follows what changed); the first pass, which reads a cold cache, spends nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta

import anyio

from controller.core.options import PassOptions
from controller.core.passes import one_pass
from controller.core.ports import Ports
from controller.core.reporting import error_report
from controller.model.errors import CtrError, ReconcileError
from controller.model.outcome import PassReport
from controller.model.plan import Mode
from controller.model.records import History

#: Backoff after a failed pass: 1 s doubling to 2 minutes, each delay jittered down by up to half.
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 120.0

#: The share of one core passes may use on average (spec.limits.passCpuShare).
CPU_SHARE = 0.02
#: CPU seconds passes may spend at once before the budget holds them back.
BURST = 0.5
#: The longest a pass is held back by the budget (seconds): one costly full read must not leave
#: the loop deaf for long.
PACE_CAP = 120.0

RunSync = Callable[[Callable[[], PassReport]], Awaitable[PassReport]]

log = logging.getLogger("reconcile")


class CpuBudget:
    """A token bucket of CPU seconds: client-go's BucketRateLimiter (a burst, refilled at a steady
    rate), counted in seconds of CPU that passes took rather than in requests. ``share`` None: no
    budget."""

    def __init__(self, share: float | None, burst: float = BURST) -> None:
        self.share, self.burst = share, burst
        self.tokens = burst
        self._at: float | None = None

    def spend(self, cpu: float, now: float) -> None:
        self._refill(now)
        if self.share:
            self.tokens = max(self.tokens - max(cpu, 0.0), -self.share * PACE_CAP)

    def wait(self, now: float) -> float:
        """Seconds until a pass may start (0: now); never more than :data:`PACE_CAP`, whatever the
        debt (a reload may lower the share under a debt run up at the old one)."""
        self._refill(now)
        return min(max(0.0, -self.tokens / self.share), PACE_CAP) if self.share else 0.0

    def _refill(self, now: float) -> None:
        if self._at is not None and self.share:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.share)
        self._at = now


def process_cpu() -> float:
    """CPU seconds of this process, all its threads (``time.process_time``). Not its ctr
    processes': Windows cannot count a process's children (``os.times`` reads zero for them
    there), and a budget that meant one thing on Linux and another on the worker's own OS would
    be tuned on the wrong one. What ctr costs is measured beside it (bench/daemon_bench.py)."""
    return time.process_time()


def backoff(failures: int, rng: random.Random) -> float:
    delay: float = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** max(failures - 1, 0))
    return delay * (0.5 + rng.random() / 2)


async def in_a_thread(fn: Callable[[], PassReport]) -> PassReport:
    """A pass blocks on ctr and the disk: off the event loop, which keeps serving signals and HTTP."""
    return await anyio.to_thread.run_sync(fn)


class Loop:
    def __init__(
        self,
        ports: Ports,
        options: PassOptions,
        interval: timedelta,
        *,
        run_sync: RunSync = in_a_thread,
        rng: random.Random | None = None,
        cpu_share: float | None = CPU_SHARE,
        cpu: Callable[[], float] = process_cpu,
    ) -> None:
        self.ports = ports
        self.interval = interval
        self.budget, self.cpu = CpuBudget(cpu_share), cpu
        #: Whether the next pass waits for the budget (not after one that removed something), and
        #: how long it would wait after the last pass: readiness allows for it.
        self._held = True
        self.spacing = 0.0
        self.run_sync = run_sync
        self.rng = rng or random.Random()
        #: Read by the executor between actions (from its thread), so the action under way finishes.
        self.stopping = threading.Event()
        self.options = replace(options, mode=Mode.DAEMON, should_stop=self.stopping.is_set)
        self.history = History()
        self.passes = 0
        self.last: PassReport | None = None
        #: When the last pass ended, on the monotonic clock (readiness must not fail on a clock step).
        self._last_at = 0.0
        #: Made when the loop runs (an event needs a running event loop).
        self._wake: anyio.Event | None = None
        #: Why the next pass runs, when something asked for it.
        self._why: str | None = "start-up"

    def reconfigure(
        self, ports: Ports, options: PassOptions, interval: timedelta, *, cpu_share: float | None = CPU_SHARE
    ) -> None:
        """A reloaded policy: the next pass uses it."""
        self.ports = ports
        self.options = replace(options, mode=Mode.DAEMON, should_stop=self.stopping.is_set)
        self.interval = interval
        self.budget.share = cpu_share
        if cpu_share:
            self.budget.tokens = max(self.budget.tokens, -cpu_share * PACE_CAP)

    def trigger(self, why: str) -> None:
        if self._why is None:  # the first reason since the last pass is the one told
            self._why = why
        if self._wake is not None:
            self._wake.set()

    def request_stop(self) -> None:
        self.stopping.set()
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        failures = 0
        next_in = self.interval.total_seconds()
        self._wake = anyio.Event()
        if self._why is not None:
            self._wake.set()
        while not self.stopping.is_set():
            with anyio.move_on_after(next_in):
                await self._wake.wait()
            if self.stopping.is_set() or not await self._paced():
                return
            why, self._why = self._why or "resync interval or requeue", None
            self._wake = anyio.Event()  # triggers from now on ask for one more pass
            self.passes += 1
            started, cpu = self.ports.clock.now(), self.cpu()
            try:
                report = await self.run_sync(functools.partial(self._pass, why))
            except Exception as e:
                failures += 1
                next_in = backoff(failures, self.rng)
                self._failed(started, e, why, next_in)
                continue
            failures = 0
            self.history = report.history or self.history
            self.last, self._last_at = report, self.ports.clock.monotonic()
            self._pace(report, self.cpu() - cpu)
            next_in = self._next_in(report)

    def _pass(self, why: str) -> PassReport:
        return one_pass(self.ports, self.options, self.history, self.passes, why=why)

    def _pace(self, report: PassReport, cpu: float) -> None:
        now = self.ports.clock.monotonic()
        if self.passes > 1:
            self.budget.spend(cpu, now)
        self._held = not report.progress
        spacing, interval = self.budget.wait(now), self.interval.total_seconds()
        if (spacing > interval) != (self.spacing > interval):
            if spacing > interval:
                log.info(
                    "passes held back %.0fs, beyond the %gs interval: a pass took %.2fs of CPU and the budget is "
                    "%g of a core (spec.limits.passCpuShare)",
                    spacing, interval, cpu, self.budget.share,
                )
            else:
                log.info("passes back within the %gs interval (a pass took %.2fs of CPU)", interval, cpu)
        self.spacing = spacing

    async def _paced(self) -> bool:
        """Waits until the CPU budget allows the next pass; triggers meanwhile join it. False: stop."""
        while self._held and (left := self.budget.wait(self.ports.clock.monotonic())) > 0:
            with anyio.move_on_after(left):
                await self._wake_or_stop()
            if self.stopping.is_set():
                return False
        return not self.stopping.is_set()

    async def _wake_or_stop(self) -> None:
        while True:
            assert self._wake is not None
            await self._wake.wait()
            if self.stopping.is_set():
                return
            self._wake = anyio.Event()  # a trigger while held: it rides on the pass to come

    def _next_in(self, report: PassReport) -> float:
        interval = self.interval.total_seconds()
        if report.requeue_after is None:
            return interval
        # A little after the moment, so the grace period has surely run out by then.
        return min(interval, report.requeue_after + (0.05 if report.requeue_after else 0.0))

    def _failed(self, started: datetime, error: Exception, why: str, retry_in: float) -> None:
        known = isinstance(error, ReconcileError)
        report = error_report(
            self.passes,
            Mode.DAEMON,
            started,
            self.ports.clock.now(),
            str(error) if known else f"{type(error).__name__}: {error}",
            containerd_up=not isinstance(error, CtrError),
            prior=self.last,
            trigger=why,
            retry_in=round(retry_in, 3),
            # A bug or an OS error nobody foresaw: where it happened is worth the lines.
            traceback=None if known else "".join(traceback.format_exception(error)),
        )
        self.last, self._last_at = report, self.ports.clock.monotonic()
        # A full disk must not stop the loop; the next pass reports again.
        with contextlib.suppress(OSError):
            self.ports.reporter.pass_finished(report)

    def ready(self) -> tuple[bool, str]:
        """Readiness: the last pass succeeded, within two resync intervals."""
        last = self.last
        if last is None:
            return False, "no pass has finished yet"
        if last.outcome != "success":
            return False, f"the last pass failed: {last.error}"
        age = self.ports.clock.monotonic() - self._last_at
        limit = 2 * max(self.interval.total_seconds(), self.spacing)
        if age > limit:
            return False, f"the last successful pass ended {age:.0f} s ago (limit {limit:.0f} s)"
        return True, f"ready: last pass {age:.0f} s ago"
