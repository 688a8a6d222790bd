"""The reconcile service's life, in plain Python: what a service manager sees of it.

    start-pending  waiting for containerd, then the boot pass (``--once`` semantics: the
                   worker's service depends on ours, so the worker is not running yet); a
                   checkpoint every few seconds tells the manager we are alive
    running        the daemon beside the worker, until a stop is requested
    stop-pending   the action under way finishes (one ctr call or one directory)
    stopped        with exit code 0, or with the code and reason of a failure

The service manager starts the worker only once this service reports running, so the
worker never starts before the repair. After any boot the worker ends running unless
starting it would do harm (``ExitRule.start_worker`` false: a store that is not ready,
another repair holding the lock; see ``controller.model.errors.EXIT_RULES``). Those are
tried again while start-pending (a volume mounted late, a repair that ends), as is
containerd answering late; a harm that persists stops the service as failed, with the
reason, before it ever reports running, and the worker, which depends on it, does not
start. Every other outcome of ours, a bug included, goes on to running, so the worker
starts; what keeps reconciliation from running is said as an error. When a later start
(a recovery restart) reaches running after a run that kept the worker down, the service
starts the worker itself: the manager does not start a dependent again on its own.

While start-pending or stop-pending the service accepts no control (Microsoft's contract
for SetServiceStatus: a stop asked then is refused by the manager with 1061); a console's
Ctrl-C or Ctrl-Break still stops it after the action under way.

The steps (what waiting, the boot pass and the daemon do) and the manager come from
outside: ``controller.commands`` wires the real ones, ``controller.adapters.winservice``
is the Windows service control manager, and the tests record the reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from controller.model.errors import RULE_FOR, ExitCode, ReconcileError, exit_code_for

log = logging.getLogger("reconcile")


class State(Enum):
    START_PENDING = "start-pending"
    RUNNING = "running"
    STOP_PENDING = "stop-pending"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Status:
    """One report to the service manager."""

    state: State
    #: Counts up while pending, so the manager sees progress; 0 otherwise.
    checkpoint: int = 0
    #: Seconds the manager should wait for the next report before it gives up on us.
    wait_hint: float = 0.0
    #: Stopped: ours (see ``controller.model.errors.EXIT_RULES``); 0 is a clean stop.
    exit_code: ExitCode = ExitCode.OK
    #: What we are doing, or why we stopped.
    reason: str = ""
    #: Running, but reconciliation cannot run as configured (or the boot pass failed): the
    #: manager's side says it as an error, where an admin looks (the Event Log).
    degraded: bool = False

    @property
    def accepts_stop(self) -> bool:
        """Controls are accepted only while running: never while start- or stop-pending."""
        return self.state is State.RUNNING


class ServiceManager(Protocol):
    def report(self, status: Status) -> None: ...

    def start_service(self, name: str) -> None:
        """Start another service (the worker, which an earlier run kept down)."""
        ...


class StopRequested(Exception):
    """Raised by a step that was waiting (for containerd, for the store) when a stop arrived."""


class Steps(Protocol):
    """What the service does in each phase. Each may raise a ``ReconcileError`` (its exit
    code says what a boot chain does) or ``StopRequested``."""

    def wait_for_containerd(self, stop: threading.Event) -> None: ...

    def boot_pass(self, stop: threading.Event) -> ExitCode:
        """``--once`` to convergence; the action under way finishes when ``stop`` is set."""
        ...

    def daemon(self, stop: threading.Event) -> ExitCode:
        """The daemon, until ``stop`` is set; then the action under way finishes."""
        ...

    def close(self) -> None:
        """Release what the steps hold (the store's lock), whatever happened."""
        ...

    def keep_worker_down(self, why: str) -> None:
        """Remember, past this process, that this run keeps the worker down, and why."""
        ...

    def worker_kept_down(self) -> str | None:
        """The worker's service name if an earlier run kept it down (the memory is then cleared)."""
        ...


class _KeepDown(Exception):
    def __init__(self, code: ExitCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class ReconcileService:
    def __init__(
        self,
        manager: ServiceManager,
        steps: Steps,
        *,
        checkpoint_every: float = 5.0,
        wait_hint: float = 30.0,
        retry_for: float = 600.0,
        retry_every: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.steps = steps
        self.checkpoint_every = checkpoint_every
        self.wait_hint = wait_hint
        #: How long a boot pass whose cause may go away is tried again while start-pending.
        self.retry_for, self.retry_every = retry_for, retry_every
        self.clock = clock
        #: The one stop flag: the service manager's stop and a console's Ctrl-C/Ctrl-Break both set it.
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._status = Status(State.STOPPED)
        self._ended = threading.Event()

    @property
    def state(self) -> State:
        return self._status.state

    @property
    def status(self) -> Status:
        """The last status reported (a manager's interrogation gets it again)."""
        return self._status

    def request_stop(self, why: str = "stop requested") -> None:
        """Set the stop flag and return at once: a service manager's control handler must not
        block, and a console's signal handler runs in the thread that may hold the lock."""
        if self.stop.is_set():
            return
        self.stop.set()
        threading.Thread(target=self._stop_pending, args=(why,), name="service stop", daemon=True).start()

    def _stop_pending(self, why: str) -> None:
        log.info("%s; finishing the action under way", why)
        with self._lock:
            if self._status.state in (State.START_PENDING, State.RUNNING):
                self._enter(State.STOP_PENDING, "finishing the action under way")

    def run(self) -> ExitCode:
        """From start-pending to stopped; returns the exit code the service stopped with."""
        self._ended.clear()
        with self._lock:
            self._enter(State.START_PENDING, "waiting for containerd")
        beater = threading.Thread(target=self._beat, name="service checkpoints", daemon=True)
        beater.start()
        code = ExitCode.NOT_CONVERGED
        reason = "stopped unexpectedly"
        try:
            code, reason = self._phases()
        except Exception as e:
            # A bug: stop as failed, so the manager's recovery actions restart us.
            log.exception("service failed")
            reason = f"failed: {type(e).__name__}: {e}"
        finally:
            try:
                self.steps.close()
            finally:
                self._ended.set()
                beater.join()
                if code == ExitCode.OK:
                    log.info("service stopped: %s", reason)
                else:
                    log.error("service failed (exit %d): %s", code, reason)
                with self._lock:
                    if self.stop.is_set() and self._status.state in (State.START_PENDING, State.RUNNING):
                        # The stop's own thread has not said it yet: stop-pending always comes first.
                        self._enter(State.STOP_PENDING, "finishing the action under way")
                    self._status = Status(State.STOPPED, exit_code=code, reason=reason)
                    self.manager.report(self._status)
        return code

    def _phases(self) -> tuple[ExitCode, str]:
        try:
            boot, trouble = self._boot()
        except StopRequested:
            return ExitCode.OK, "stopped before the boot pass ended"
        except _KeepDown as e:
            self.steps.keep_worker_down(e.reason)
            return e.code, e.reason
        if self.stop.is_set():
            return ExitCode.OK, "stopped during the boot pass, after the action under way"
        if trouble is not None:
            reason = f"{trouble}; the worker starts, running as the daemon"
        else:
            reason = f"boot pass exit {int(boot)}; running as the daemon"
            if boot != ExitCode.OK:
                log.warning("boot pass ended with exit %d (%s); the worker starts", boot, RULE_FOR[boot].meaning)
        if not self._move(State.RUNNING, reason, degraded=trouble is not None):
            return ExitCode.OK, "stopped after the boot pass"
        self._start_a_worker_kept_down()
        try:
            code = self.steps.daemon(self.stop)
        except StopRequested:
            code = ExitCode.OK
        except ReconcileError as e:
            code = exit_code_for(e)
            return code, f"daemon: {e} (exit {int(code)})"
        return code, "stopped" if code == ExitCode.OK else f"daemon ended with exit {int(code)}"

    def _boot(self) -> tuple[ExitCode, str | None]:
        """Wait for containerd and run the boot pass, again while start-pending as long as what fails
        it may go away. Returns its exit code and, when the worker must start although the repair
        could not run as configured, why (said as an error). Raises ``_KeepDown`` for a harm that
        persists, ``StopRequested`` for a stop."""
        deadline = self.clock() + self.retry_for
        while True:
            try:
                self.steps.wait_for_containerd(self.stop)
                self._move(State.START_PENDING, "boot pass")
                return self.steps.boot_pass(self.stop), None
            except StopRequested:
                raise
            except ReconcileError as e:
                code = exit_code_for(e)
                rule = RULE_FOR[code]
                what = f"boot pass: {e} (exit {int(code)}: {rule.why})"
                if rule.retried and self.clock() < deadline:
                    log.warning("%s; trying again in %g s", what, self.retry_every)
                    self._move(State.START_PENDING, f"{what}; trying again")
                    if self.stop.wait(self.retry_every):
                        raise StopRequested from e
                    continue
                if not rule.start_worker:
                    raise _KeepDown(code, f"{what}; the worker stays down") from e
                if rule.degraded:
                    log.error("%s; the worker starts without the boot repair", what)
                    return code, what
                log.warning("%s; the worker starts", what)
                return code, None
            except Exception as e:
                # A bug of ours must not cost the worker: it starts, and the daemon tries again.
                log.exception("boot pass failed unexpectedly; the worker starts without the boot repair")
                return ExitCode.NOT_CONVERGED, f"boot pass failed unexpectedly: {type(e).__name__}: {e}"

    def _start_a_worker_kept_down(self) -> None:
        """The manager starts a dependent only when it starts it: a worker an earlier run kept down
        stays down after our recovery restart unless we start it."""
        try:
            name = self.steps.worker_kept_down()
            if name:
                self.manager.start_service(name)
                log.info("started the worker's service %s, which an earlier start of ours kept down", name)
        except Exception as e:
            log.error("could not start the worker's service, which an earlier start of ours kept down: %s", e)

    def _move(self, state: State, reason: str, *, degraded: bool = False) -> bool:
        """Enter ``state`` unless a stop came first (then stop-pending stays)."""
        with self._lock:
            if self.stop.is_set():
                return False
            self._enter(state, reason, degraded=degraded)
            return True

    def _enter(self, state: State, reason: str, *, degraded: bool = False) -> None:
        # Called with the lock held, so reports never cross.
        pending = state in (State.START_PENDING, State.STOP_PENDING)
        self._status = Status(
            state,
            checkpoint=self._status.checkpoint + 1 if pending else 0,
            wait_hint=self.wait_hint if pending else 0.0,
            reason=reason,
            degraded=degraded,
        )
        self.manager.report(self._status)

    def _beat(self) -> None:
        """While pending, a checkpoint every ``checkpoint_every`` seconds: the boot pass and the
        last action can take minutes, and a manager that sees no progress gives up on us."""
        while not self._ended.wait(self.checkpoint_every):
            with self._lock:
                if self._status.state in (State.START_PENDING, State.STOP_PENDING) and not self._ended.is_set():
                    self._enter(self._status.state, self._status.reason)
