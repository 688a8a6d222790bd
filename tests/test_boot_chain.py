"""The Windows boot chain end to end, against a service manager that keeps Microsoft's contract
(tests/support/scm.py): whatever our boot ends in, the worker, which depends on us, ends
running, unless starting it would do a harm the README names (a store that is not ready,
another repair holding the lock) and that harm persists."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controller.model.errors import (
    EXIT_RULES,
    RULE_FOR,
    ContainerdUnreachableError,
    CtrError,
    ExitCode,
    LockedError,
    ReconcileError,
    StoreSanityError,
    exit_code_for,
)
from controller.service import ReconcileService, State
from tests.support.scm import ERROR_SERVICE_CANNOT_ACCEPT_CTRL, ERROR_SERVICE_DEPENDENCY_FAIL, FakeScm, Handle

WORKER, US = "ocluster-worker", "obuilder-reconcile"
#: What one try of the boot pass does: return an exit code, or raise.
Outcome = ExitCode | Exception


@dataclass
class Machine:
    """What survives a restart of our service: the memory that it kept the worker down."""

    kept_down: dict[str, str] = field(default_factory=dict)


class ScriptedSteps:
    """The service's steps, each try of the boot pass taking the next outcome of ``script``
    (the last one repeats): what the store, the lock and containerd say at each try."""

    def __init__(self, machine: Machine, script: list[Outcome], *, containerd_late: int = 0) -> None:
        self.machine, self.script, self.containerd_late = machine, script, containerd_late
        self.tries = 0

    def wait_for_containerd(self, stop: threading.Event) -> None:
        if self.containerd_late > 0:
            self.containerd_late -= 1
            raise ContainerdUnreachableError("containerd did not answer within 2m")

    def boot_pass(self, stop: threading.Event) -> ExitCode:
        outcome = self.script[min(self.tries, len(self.script) - 1)]
        self.tries += 1
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def daemon(self, stop: threading.Event) -> ExitCode:
        stop.wait()
        return ExitCode.OK

    def close(self) -> None:
        pass

    def keep_worker_down(self, why: str) -> None:
        self.machine.kept_down[WORKER] = why

    def worker_kept_down(self) -> str | None:
        return WORKER if self.machine.kept_down.pop(WORKER, None) is not None else None


def boot(make_steps: Callable[[], ScriptedSteps], *, restarts: int = 3) -> FakeScm:
    """The machine boots: the manager starts the worker (automatic start), which depends on us."""
    scm = FakeScm()

    def main(handle: Handle) -> None:
        service = ReconcileService(handle, make_steps(), checkpoint_every=0.02, retry_for=0.3, retry_every=0.02)
        handle.service.on_stop = lambda: service.request_stop("service stop")
        service.run()

    scm.install(US, main, restarts=restarts)
    scm.install(WORKER, depends_on=(US,))
    scm.start(WORKER)
    scm.quiet()
    return scm


def error_of(rule_code: ExitCode) -> ReconcileError:
    cls = RULE_FOR[rule_code].errors[0]
    if issubclass(cls, CtrError):
        return cls(["ctr", "snapshots", "ls"], 1, "what went wrong")
    return cls("what went wrong")


#: Every way a boot pass can end: each exit code a run gives, each error class, and a bug.
OUTCOMES: list[tuple[str, Outcome]] = [
    *[(f"exit {int(r.code)}", r.code) for r in EXIT_RULES if not r.errors],
    *[(f"{r.code.name} ({r.errors[0].__name__})", error_of(r.code)) for r in EXIT_RULES if r.errors],
    ("a bug (RuntimeError)", RuntimeError("a bug of ours")),
]


@pytest.mark.parametrize(("what", "outcome"), OUTCOMES, ids=[w for w, _ in OUTCOMES])
def test_after_any_boot_the_worker_runs_unless_a_named_harm_persists(what: str, outcome: Outcome) -> None:
    machine = Machine()
    scm = boot(lambda: ScriptedSteps(machine, [outcome]), restarts=2)
    code: ExitCode | None = outcome if isinstance(outcome, ExitCode) else None
    if isinstance(outcome, ReconcileError):
        code = exit_code_for(outcome)
    harm = code is not None and not RULE_FOR[code].start_worker
    assert scm.events == [] if not harm else all("start failed" in e for _, e in scm.events), scm.events
    if harm:
        # Kept down, and our service stopped as failed with our code (restarts spent, each one
        # failing the same way); the worker's start failed as the manager fails a dependent.
        assert scm.state(WORKER) is State.STOPPED and scm.services[WORKER].start_error == ERROR_SERVICE_DEPENDENCY_FAIL
        assert scm.state(US) is State.STOPPED and scm.services[US].status.exit_code == code
        assert "the worker stays down" in scm.services[US].status.reason
        assert machine.kept_down, "a later start could not know to start the worker"
    else:
        assert scm.state(WORKER) is State.RUNNING, f"{what}: the worker did not start"
        assert scm.state(US) is State.RUNNING and scm.services[US].starts == 1
        status = scm.services[US].status
        if code is not None and RULE_FOR[code].degraded:
            assert status.degraded and "what went wrong" in status.reason, "said as an error"
        elif isinstance(outcome, RuntimeError):
            assert status.degraded and "a bug of ours" in status.reason
        else:
            assert not status.degraded


@pytest.mark.parametrize("harm", [StoreSanityError("the store's volume is not mounted"), LockedError("held")])
def test_a_harm_that_clears_while_start_pending_lets_the_worker_start_from_the_same_start(harm: Exception) -> None:
    machine = Machine()
    scm = boot(lambda: ScriptedSteps(machine, [harm, harm, ExitCode.OK]))
    assert scm.state(WORKER) is State.RUNNING and scm.state(US) is State.RUNNING
    assert scm.services[US].starts == 1, "retried while start-pending, not by a restart"
    assert scm.events == []


def test_containerd_late_is_waited_for_while_start_pending() -> None:
    machine = Machine()
    scm = boot(lambda: ScriptedSteps(machine, [ExitCode.OK], containerd_late=2))
    assert scm.state(WORKER) is State.RUNNING and not scm.services[US].status.degraded


def test_after_a_recovery_restart_reaches_running_our_service_starts_the_worker_it_kept_down() -> None:
    machine = Machine()
    runs: Iterator[list[Outcome]] = iter(
        [
            [StoreSanityError("the store's volume is not mounted")],  # the first start: the harm persists
            [ExitCode.OK],  # the recovery restart: the volume is there now
        ]
    )
    scm = boot(lambda: ScriptedSteps(machine, next(runs)), restarts=1)
    assert scm.services[US].starts == 2
    assert scm.state(US) is State.RUNNING
    assert scm.state(WORKER) is State.RUNNING, "nobody started the worker the first start kept down"
    assert machine.kept_down == {}


def test_a_stop_is_refused_while_start_pending_and_honoured_once_running() -> None:
    machine = Machine()
    release = threading.Event()

    class Slow(ScriptedSteps):
        def boot_pass(self, stop: threading.Event) -> ExitCode:
            release.wait(10)
            return ExitCode.OK

    scm = FakeScm()

    def main(handle: Handle) -> None:
        service = ReconcileService(handle, Slow(machine, [ExitCode.OK]), checkpoint_every=0.02)
        handle.service.on_stop = lambda: service.request_stop("service stop")
        service.run()

    scm.install(US, main)
    assert scm.start(US) == 0
    scm.wait_for(US, (State.START_PENDING,))
    assert scm.stop(US) == ERROR_SERVICE_CANNOT_ACCEPT_CTRL, "the contract: no control while start-pending"
    release.set()
    scm.wait_for(US, (State.RUNNING,))
    assert scm.stop(US) == 0
    assert scm.wait_for(US, (State.STOPPED,)) is State.STOPPED
    assert scm.services[US].status.exit_code == ExitCode.OK
    assert scm.events == [], "the checkpoints kept the manager informed"


def test_the_linux_boot_unit_lets_the_worker_start_exactly_when_the_table_says() -> None:
    """The systemd unit is the same contract: every failing code that starts the worker is a success
    for the unit (RequiredBy= keeps the worker down otherwise)."""
    unit = (Path(__file__).parent.parent / "examples" / "systemd" / "obuilder-reconcile-boot.service").read_text()
    (line,) = [line for line in unit.splitlines() if line.startswith("SuccessExitStatus=")]
    success = {int(code) for code in line.split("=", 1)[1].split()}
    # 0 is success to systemd anyway; 3 is --dry-run's, which the unit never passes.
    starts = {int(r.code) for r in EXIT_RULES if r.start_worker} - {0, 3}
    assert success == starts
