"""The reconcile service: its state machine against a fake service manager, against the real
daemon (boot pass, then the daemon, then a stop mid-pass), the Windows adapter against fake
pywin32 modules, and a console stop that reaches us but not the ctr call under way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.cli import build_service_parser, invocation
from controller.commands import ServiceSteps
from controller.model.errors import (
    EXIT_RULES,
    ContainerdUnreachableError,
    CtrError,
    ExitCode,
    LockedError,
    ReconcileError,
    StoreSanityError,
    UsageError,
)
from controller.service import ReconcileService, State, Status, StopRequested
from tests.support.containerd import SNAPSHOTTER, PrivateContainerd
from tests.support.pywin32 import FakeWin32
from tests.support.world import World

# -- a fake service manager and fake steps -------------------------------------------------


class Recorder:
    """A service manager that records every status report."""

    def __init__(self) -> None:
        self.reports: list[Status] = []
        self.started: list[str] = []
        self.changed = threading.Condition()

    def report(self, status: Status) -> None:
        with self.changed:
            self.reports.append(status)
            self.changed.notify_all()

    def start_service(self, name: str) -> None:
        self.started.append(name)

    def states(self) -> list[State]:
        """The states in order, repeats (checkpoints) folded."""
        out: list[State] = []
        for r in self.reports:
            if not out or out[-1] is not r.state:
                out.append(r.state)
        return out

    def wait_for(self, state: State, timeout: float = 30) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: any(r.state is state for r in self.reports), timeout), self.reports


class FakeSteps:
    def __init__(
        self,
        *,
        wait: ReconcileError | None = None,
        boot: ExitCode | ReconcileError = ExitCode.OK,
        actions: int = 0,
        action_seconds: float = 0.0,
        daemon: ExitCode | ReconcileError = ExitCode.OK,
    ) -> None:
        self.wait, self.boot, self.daemon_result = wait, boot, daemon
        self.actions, self.action_seconds = actions, action_seconds
        self.done = 0
        self.calls: list[str] = []
        self.boot_started = threading.Event()

    def wait_for_containerd(self, stop: threading.Event) -> None:
        self.calls.append("wait")
        if self.wait is not None:
            raise self.wait

    def boot_pass(self, stop: threading.Event) -> ExitCode:
        self.calls.append("boot")
        self.boot_started.set()
        for _ in range(self.actions):
            if stop.is_set():  # as the executor does: asked before each action
                break
            time.sleep(self.action_seconds)
            self.done += 1
        if isinstance(self.boot, ReconcileError):
            raise self.boot
        return self.boot

    def daemon(self, stop: threading.Event) -> ExitCode:
        self.calls.append("daemon")
        if isinstance(self.daemon_result, ReconcileError):
            raise self.daemon_result
        stop.wait()
        return self.daemon_result

    def close(self) -> None:
        self.calls.append("close")

    def keep_worker_down(self, why: str) -> None:
        self.calls.append("keep the worker down")

    def worker_kept_down(self) -> str | None:
        return None


def started(service: ReconcileService) -> tuple[threading.Thread, list[ExitCode]]:
    out: list[ExitCode] = []
    t = threading.Thread(target=lambda: out.append(service.run()))
    t.start()
    return t, out


def test_boot_pass_while_start_pending_then_running_then_a_stop_ends_it_cleanly() -> None:
    manager, steps = Recorder(), FakeSteps(actions=10, action_seconds=0.03)
    service = ReconcileService(manager, steps, checkpoint_every=0.02, wait_hint=30)
    t, code = started(service)
    manager.wait_for(State.RUNNING)
    assert steps.done == 10, "running was reported before the boot pass ended"
    service.request_stop()
    t.join(10)
    assert code == [ExitCode.OK]
    assert manager.states() == [State.START_PENDING, State.RUNNING, State.STOP_PENDING, State.STOPPED]
    assert steps.calls == ["wait", "boot", "daemon", "close"]
    pending = [r for r in manager.reports if r.state is State.START_PENDING]
    # The boot pass took ~0.3 s: checkpoints kept coming, each one more, each with a wait hint.
    assert len(pending) >= 5
    assert [r.checkpoint for r in pending] == list(range(1, len(pending) + 1))
    assert all(r.wait_hint == 30 for r in pending)
    assert pending[0].reason == "waiting for containerd" and pending[-1].reason == "boot pass"
    assert manager.reports[-1] == Status(State.STOPPED, exit_code=ExitCode.OK, reason="stopped")


def _first_error(rule_errors: tuple[type[ReconcileError], ...]) -> ReconcileError:
    cls = rule_errors[0]
    if issubclass(cls, CtrError):
        return cls(["ctr", "snapshots", "ls"], 1, "what went wrong")
    return cls("what went wrong")


@pytest.mark.parametrize("rule", [r for r in EXIT_RULES if r.errors], ids=lambda r: r.code.name)
def test_a_boot_pass_error_keeps_the_worker_down_exactly_when_the_contract_says(rule: object) -> None:
    from controller.model.errors import ExitRule

    assert isinstance(rule, ExitRule)
    manager, steps = Recorder(), FakeSteps(boot=_first_error(rule.errors))
    service = ReconcileService(manager, steps, checkpoint_every=0.05, retry_for=0.2, retry_every=0.02)
    t, code = started(service)
    tries = steps.calls.count  # read after the run
    if rule.start_worker:
        manager.wait_for(State.RUNNING)
        service.request_stop()
        t.join(10)
        assert code == [ExitCode.OK] and "daemon" in steps.calls
        running = next(r for r in manager.reports if r.state is State.RUNNING)
        assert running.degraded == rule.degraded, "what keeps reconciliation from running is said as an error"
    else:
        t.join(10)
        assert code == [rule.code]
        assert State.RUNNING not in manager.states(), "the worker, which depends on us, would have started"
        last = manager.reports[-1]
        assert last.state is State.STOPPED and last.exit_code == rule.code
        assert "what went wrong" in last.reason and rule.why in last.reason and "the worker stays down" in last.reason
        assert steps.calls[-2:] == ["keep the worker down", "close"]
    assert (tries("boot") > 1) == rule.retried, "tried again while start-pending exactly when its cause may go away"


def test_a_boot_pass_that_did_not_converge_goes_on_running() -> None:
    manager, steps = Recorder(), FakeSteps(boot=ExitCode.NOT_CONVERGED)
    service = ReconcileService(manager, steps, checkpoint_every=0.05)
    t, _ = started(service)
    manager.wait_for(State.RUNNING)
    assert "boot pass exit 1" in manager.reports[-1].reason
    service.request_stop()
    t.join(10)


def test_containerd_not_answering_is_waited_for_then_the_worker_starts_and_we_say_why() -> None:
    manager, steps = Recorder(), FakeSteps(wait=ContainerdUnreachableError("containerd did not answer within 2m"))
    service = ReconcileService(manager, steps, checkpoint_every=0.05, retry_for=0.2, retry_every=0.02)
    t, code = started(service)
    manager.wait_for(State.RUNNING)
    service.request_stop()
    t.join(10)
    assert code == [ExitCode.OK]
    assert steps.calls.count("wait") > 1 and "boot" not in steps.calls and "daemon" in steps.calls
    running = next(r for r in manager.reports if r.state is State.RUNNING)
    assert running.degraded and "did not answer within 2m" in running.reason and "the worker starts" in running.reason


def test_a_stop_during_the_boot_pass_finishes_the_action_under_way_and_never_reports_running() -> None:
    manager, steps = Recorder(), FakeSteps(actions=50, action_seconds=0.05)
    service = ReconcileService(manager, steps, checkpoint_every=0.02)
    t, code = started(service)
    steps.boot_started.wait(5)
    time.sleep(0.12)
    service.request_stop()
    t.join(10)
    assert code == [ExitCode.OK]
    assert 1 <= steps.done < 50
    assert manager.states() == [State.START_PENDING, State.STOP_PENDING, State.STOPPED]
    assert "daemon" not in steps.calls
    stop_pending = [r for r in manager.reports if r.state is State.STOP_PENDING]
    assert stop_pending[0].reason == "finishing the action under way"


def test_a_stop_while_waiting_for_containerd_stops_cleanly() -> None:
    manager = Recorder()

    class Waiting(FakeSteps):
        def wait_for_containerd(self, stop: threading.Event) -> None:
            if stop.wait(10):
                raise StopRequested

    service = ReconcileService(manager, Waiting(), checkpoint_every=0.05)
    t, code = started(service)
    manager.wait_for(State.START_PENDING)
    service.request_stop()
    t.join(10)
    assert code == [ExitCode.OK] and manager.states()[-1] is State.STOPPED


def test_a_stop_asked_while_a_report_is_under_way_neither_blocks_nor_reorders_the_reports() -> None:
    # A console's Ctrl-C runs its handler in the thread that may be reporting (holding the lock):
    # the stop must only set the flag there, and stop-pending still comes before stopped.
    class StopsWhenRunning(Recorder):
        service: ReconcileService

        def report(self, status: Status) -> None:
            super().report(status)
            if status.state is State.RUNNING:
                self.service.request_stop("Ctrl-C")

    manager = StopsWhenRunning()
    manager.service = service = ReconcileService(manager, FakeSteps(), checkpoint_every=0.05)
    t, code = started(service)
    t.join(10)
    assert not t.is_alive(), "the stop deadlocked the service"
    assert code == [ExitCode.OK]
    assert manager.states() == [State.START_PENDING, State.RUNNING, State.STOP_PENDING, State.STOPPED]


def test_a_daemon_that_fails_stops_the_service_as_failed_so_recovery_restarts_it() -> None:
    manager, steps = Recorder(), FakeSteps(daemon=LockedError("another reconcile holds the lock"))
    code = ReconcileService(manager, steps, checkpoint_every=0.05).run()
    assert code == ExitCode.LOCKED
    assert manager.states() == [State.START_PENDING, State.RUNNING, State.STOPPED]
    assert manager.reports[-1].exit_code == ExitCode.LOCKED

    class Buggy(FakeSteps):
        def daemon(self, stop: threading.Event) -> ExitCode:
            raise KeyError("bug")

    manager = Recorder()
    assert ReconcileService(manager, Buggy(), checkpoint_every=0.05).run() == ExitCode.NOT_CONVERGED
    assert manager.reports[-1].state is State.STOPPED and "KeyError" in manager.reports[-1].reason


# -- the real steps against the real containerd -------------------------------------------


SLOW_CTR = """#!/bin/sh
# ctr, with every snapshot removal taking {seconds}s and logged before and after.
case " $* " in
  *" snapshots "*" rm "*)
    echo "start $$" >> {log}
    sleep {seconds}
    out=$({ctr} "$@" 2>&1)
    rc=$?
    [ -n "$out" ] && printf '%s\n' "$out" >&2 && printf 'said %s\n' "$out" >> {log}
    echo "end $$ $rc" >> {log}
    exit $rc;;
esac
exec {ctr} "$@"
"""


@pytest.fixture
def slow_ctr(tmp_path: Path, containerd: PrivateContainerd) -> Iterator[tuple[Path, Path]]:
    real = shutil.which("ctr")
    assert real is not None
    log = tmp_path / "ctr.log"
    log.touch()
    script = tmp_path / "slow-ctr"
    script.write_text(SLOW_CTR.format(seconds=1.5, log=log, ctr=real))
    script.chmod(0o755)
    yield script, log


def calls(log: Path) -> tuple[list[str], list[str]]:
    lines = log.read_text().splitlines()
    return [x for x in lines if x.startswith("start")], [x for x in lines if x.startswith("end")]


def wait_until(cond: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def service_argv(world: World, containerd: PrivateContainerd, namespace: str, ctr: Path, tmp_path: Path) -> list[str]:
    policy = tmp_path / "policy.yaml"
    # The grace period outlasts building a test's chain: a daemon pass mid-build would find its
    # root a leaf (ctr then refuses it: "has child"), and the test wants one removal per level.
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: t}\nspec:\n"
        "  timing: {gracePeriod: 3s, interval: 2s}\n  limits: {parallelism: 1}\n  metrics: {enabled: false}\n"
    )
    return [
        "--policy", str(policy), "--store", str(world.root), "--address", containerd.address,
        "--namespace", namespace, "--snapshotter", SNAPSHOTTER, "--ctr", str(ctr),
        "--status-file", str(tmp_path / "status.json"),
    ]  # fmt: skip


@pytest.mark.containerd
def test_the_real_service_repairs_at_boot_then_runs_as_the_daemon_and_a_stop_finishes_the_action_under_way(
    world: World,
    containerd: PrivateContainerd,
    namespace: str,
    tmp_path: Path,
    slow_ctr: tuple[Path, Path],
    measure: Callable[[str], None],
) -> None:
    ctr, log = slow_ctr
    base = world.base("b:1")
    leaked = world.orphan_chain(base, "boot", 1)
    world.leak_container("obuilder-run-1", task="running")  # boot semantics: dead, whatever its task says
    args = invocation(build_service_parser().parse_args(service_argv(world, containerd, namespace, ctr, tmp_path)))
    manager = Recorder()
    service = ReconcileService(manager, ServiceSteps(args, {}), checkpoint_every=0.5)
    began = time.monotonic()
    t, code = started(service)
    try:
        manager.wait_for(State.RUNNING, timeout=120)
        pending_for = time.monotonic() - began
        # The boot pass ran before running was reported: the leak is gone, the container too.
        assert not set(leaked) & set(containerd.snapshot_keys(namespace))
        assert containerd.container_ids(namespace) == []
        booted = len(calls(log)[0])
        assert booted >= 1 and len(calls(log)[1]) == booted
        # Now, beside the "worker", a new leak: three levels, one slow removal each.
        chain = world.orphan_chain(base, "d", 3)
        wait_until(lambda: len(calls(log)[0]) > booted, what="the daemon's first removal")
        asked = time.monotonic()
        service.request_stop()
        t.join(120)
        stop_took = time.monotonic() - asked
    finally:
        service.request_stop()
        t.join(120)
    assert code == [ExitCode.OK]
    starts, ends = calls(log)
    assert len(starts) == booted + 1, "a removal started after the stop"
    assert len(ends) == len(starts) and ends[-1].endswith(" 0"), log.read_text()
    left = set(containerd.snapshot_keys(namespace))
    assert chain[-1] not in left, "the leaf's removal under way was not finished"
    assert {chain[0], chain[1]} <= left, "the stop did not stop the pass"
    states = manager.states()
    assert states == [State.START_PENDING, State.RUNNING, State.STOP_PENDING, State.STOPPED], states
    assert manager.reports[-1].exit_code == ExitCode.OK
    assert any(r.reason == "boot pass" for r in manager.reports)
    checkpoints = max(r.checkpoint for r in manager.reports if r.state is State.START_PENDING)
    measure(
        f"service on the real containerd: start-pending {pending_for:.1f} s ({checkpoints} checkpoints, boot pass "
        f"with {booted} slow removals), stop to stopped {stop_took:.1f} s (a 1.5 s removal under way finished)"
    )


@pytest.mark.containerd
@pytest.mark.parametrize("command", [["service"], []], ids=["service", "daemon"])
def test_a_console_ctrl_c_stops_us_but_not_the_ctr_call_under_way(
    world: World,
    containerd: PrivateContainerd,
    namespace: str,
    tmp_path: Path,
    slow_ctr: tuple[Path, Path],
    command: list[str],
) -> None:
    ctr, log = slow_ctr
    base = world.base("b:1")
    chain = world.orphan_chain(base, "c", 3)
    argv = [sys.executable, "-m", "controller", *command, *service_argv(world, containerd, namespace, ctr, tmp_path)]
    log_file = tmp_path / "logs" / "reconcile.jsonl"
    if command:
        argv += ["--log-format", "json", "--log-file", str(log_file)]
    # Its own session: a terminal's foreground job, which a Ctrl-C signals as a whole group.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: len(calls(log)[0]) >= 1 or proc.poll() is not None, what="a removal")
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the console does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    starts, ends = calls(log)
    assert len(starts) == 1 and len(ends) == 1 and ends[0].endswith(" 0"), (starts, ends, err.decode()[-2000:])
    left = set(containerd.snapshot_keys(namespace))
    assert chain[-1] not in left and {chain[0], chain[1]} <= left
    if command:
        # The service logs to its file, UTF-8 JSON lines, one a line: its states and the removal.
        records = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
        said = [r["message"] for r in records]
        assert any(m.startswith("service start-pending") for m in said), said
        assert any(m.startswith("service stopped") for m in said), said
        assert b"service" not in err, "the service logged to stderr as well as its file"


# -- the Windows adapter, against fake pywin32 modules -----------------------------------


def test_the_windows_adapter_reports_start_pending_until_the_boot_pass_ends_then_stops_on_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from controller.adapters import winservice

    fake = FakeWin32(monkeypatch)
    steps = FakeSteps(actions=5, action_seconds=0.05)
    exits: list[int] = []
    code = winservice.host(
        "obuilder-reconcile", lambda m: ReconcileService(m, steps, checkpoint_every=0.02), exit_process=exits.append
    )
    assert code == 0 and exits == [], "a clean stop ends the process the usual way"
    states = [s[1] for s in fake.statuses]
    first_running = states.index(FakeWin32.SERVICE_RUNNING)
    # Interrogated throughout, it never said running before the boot pass was over.
    assert set(states[:first_running]) == {FakeWin32.SERVICE_START_PENDING} and steps.done == 5
    start = fake.statuses[0]
    # SetServiceStatus's contract: no control accepted while start-pending; stop and shutdown once running.
    assert start[2] == 0, "accepts controls while start-pending"
    assert fake.statuses[first_running][2] == FakeWin32.SERVICE_ACCEPT_STOP | FakeWin32.SERVICE_ACCEPT_SHUTDOWN
    assert start[5] >= 1 and start[6] == 30_000
    assert fake.statuses[-1] == (0x10, FakeWin32.SERVICE_STOPPED, 0, 0, 0, 0, 0)
    assert FakeWin32.SERVICE_STOP_PENDING in states


def test_the_windows_adapter_fails_the_start_with_our_code_and_says_why_in_the_event_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from controller.adapters import winservice

    fake = FakeWin32(monkeypatch)
    steps = FakeSteps(boot=StoreSanityError("D:\\obuilder does not exist, nor does D:\\"))
    exits: list[tuple[int, int]] = []
    winservice.host(
        "obuilder-reconcile",
        lambda m: ReconcileService(m, steps, checkpoint_every=0.02, retry_for=0.1, retry_every=0.02),
        exit_process=lambda code: exits.append((code, len(fake.statuses))),
    )
    # pywin32's host would report "stopped, exit 0" after SvcRun: the process ends first, with our
    # code, right after our own report.
    assert exits == [(ExitCode.STORE_NOT_READY, len(fake.statuses))]
    assert FakeWin32.SERVICE_RUNNING not in [s[1] for s in fake.statuses]
    # ERROR_SERVICE_SPECIFIC_ERROR and our own code: `sc query` shows both.
    assert fake.statuses[-1] == (0x10, FakeWin32.SERVICE_STOPPED, 0, 1066, 5, 0, 0)
    ((_, message),) = [e for e in fake.events if e[0] == "error"]
    assert "D:\\obuilder does not exist" in message and "the worker stays down" in message


def test_the_windows_adapter_outside_the_service_manager_says_how_to_register_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from controller.adapters import winservice

    FakeWin32(monkeypatch, not_a_service=True)
    with pytest.raises(UsageError, match=r"not started by the service manager.*python\.exe itself"):
        winservice.host("obuilder-reconcile", lambda m: ReconcileService(m, FakeSteps()))


def test_ctr_children_get_their_own_process_group_on_both_systems(monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.adapters import platform

    assert platform.child_process_options() == {"process_group": 0}
    monkeypatch.setattr(platform, "IS_WINDOWS", True)
    assert platform.child_process_options() == {"creationflags": 0x200}  # CREATE_NEW_PROCESS_GROUP
