"""Is the worker running? Yes, no, or cannot tell; and "cannot tell" is treated as yes.

The platform seam's answer, from psutil's process listing (faked as psutil documents it, or the
real one with a process named as the worker) and from Windows' service manager (fake pywin32
modules that follow the documented contract), on both systems; then what a user notices of it:
``reconcile --once`` exits 9 with the reason and touches nothing, and the service runs as the
daemon instead of applying boot semantics.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from controller.adapters import platform
from controller.adapters.platform import WorkerAnswer
from controller.cli import build_service_parser, invocation
from controller.cli import main as cli_main
from controller.commands import ServiceSteps
from controller.model.errors import ExitCode
from controller.service import ReconcileService, State, Status
from tests.support import pywin32
from tests.support.cli import reconcile_on
from tests.support.containerd import SNAPSHOTTER, PrivateContainerd
from tests.support.processes import Listed, fake_process_listing
from tests.support.pywin32 import FakeServiceManager, install_service_manager
from tests.support.world import World, create_store

WORKER = ("ocluster-worker", "obuilder")


@pytest.fixture(params=["linux", "windows"])
def system(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The same question on both systems (without a service name, both ask the process listing)."""
    monkeypatch.setattr(platform, "IS_WINDOWS", request.param == "windows")
    return str(request.param)


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "IS_WINDOWS", True)


def failing_listing(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """psutil's own process_iter, over a process table that cannot be read (Linux: /proc)."""

    def pids() -> list[int]:
        raise error

    monkeypatch.setattr(psutil, "pids", pids)


# -- the process listing: cannot tell --------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/proc"),
        OSError(5, "Input/output error"),
        psutil.AccessDenied(),
        psutil.Error("the process table could not be read"),
    ],
    ids=["PermissionError", "OSError", "psutil.AccessDenied", "psutil.Error"],
)
def test_a_listing_that_raises_is_cannot_tell(system: str, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    failing_listing(monkeypatch, error)
    sighting = platform.find_worker(WORKER)
    assert sighting.answer is WorkerAnswer.CANNOT_TELL and sighting.may_be_running
    assert sighting.detail.startswith(f"listing processes failed: {type(error).__name__}"), sighting.detail


def test_a_listing_that_breaks_off_midway_is_cannot_tell(system: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # An error psutil does not turn into a per-process one ends the iteration itself.
    fake_process_listing(monkeypatch, [Listed(10, "svchost"), Listed(11, OSError(22, "Invalid argument"))])
    sighting = platform.find_worker(WORKER)
    assert sighting.answer is WorkerAnswer.CANNOT_TELL and "Invalid argument" in sighting.detail


def test_a_listing_that_names_no_process_is_cannot_tell(system: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "pids", list)  # psutil's own process_iter over an empty table
    sighting = platform.find_worker(WORKER)
    assert sighting.answer is WorkerAnswer.CANNOT_TELL
    assert "named no process at all" in sighting.detail


def test_a_listing_without_this_very_process_is_cannot_tell(system: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_process_listing(monkeypatch, [Listed(10, "svchost"), Listed(11, "containerd")], ourselves=False)
    sighting = platform.find_worker(WORKER)
    assert sighting.answer is WorkerAnswer.CANNOT_TELL
    assert f"does not show this process (pid {os.getpid()})" in sighting.detail


def test_a_listing_that_hangs_is_cannot_tell_once_its_time_is_up(system: str, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def pids() -> list[int]:
        release.wait(30)
        return [os.getpid()]

    monkeypatch.setattr(psutil, "pids", pids)
    began = time.monotonic()
    try:
        sighting = platform.find_worker(WORKER, timeout=0.3)
    finally:
        release.set()
    assert time.monotonic() - began < 5
    assert sighting.answer is WorkerAnswer.CANNOT_TELL and "took longer than 0.3s" in sighting.detail


# -- the process listing: one process it may not read is no failure --------------------------


def test_processes_it_may_not_read_or_that_end_are_skipped_not_a_failure(
    system: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    others = [
        Listed(100, psutil.AccessDenied(100), psutil.AccessDenied(100)),  # nothing readable: skipped
        Listed(101, psutil.NoSuchProcess(101), None),  # ended meanwhile
        Listed(102, psutil.ZombieProcess(102), psutil.ZombieProcess(102)),
        Listed(103, "svchost", psutil.AccessDenied(103)),
    ]
    fake_process_listing(monkeypatch, others)
    assert platform.find_worker(WORKER).answer is WorkerAnswer.NOT_RUNNING
    # The worker's exe denied (another user's process): its name still shows it.
    fake_process_listing(monkeypatch, [*others, Listed(4242, "ocluster-worker", psutil.AccessDenied(4242))])
    sighting = platform.find_worker(WORKER)
    assert sighting.answer is WorkerAnswer.RUNNING and "ocluster-worker (pid 4242)" in sighting.detail


def test_the_real_listing_falls_back_to_the_name_when_the_exe_is_denied(
    monkeypatch: pytest.MonkeyPatch, named_worker: subprocess.Popen[bytes]
) -> None:
    real_exe = psutil.Process.exe

    def exe(self: psutil.Process) -> str:
        if self.pid != os.getpid():
            raise psutil.AccessDenied(self.pid)
        return real_exe(self)

    monkeypatch.setattr(psutil.Process, "exe", exe)
    sighting = platform.find_worker(WORKER)
    assert sighting.answer is WorkerAnswer.RUNNING, sighting
    assert f"ocluster-worker (pid {named_worker.pid})" in sighting.detail


def test_the_real_listing_sees_a_worker_by_its_executable_not_by_its_arguments(
    named_worker: subprocess.Popen[bytes],
) -> None:
    found = platform.find_worker(WORKER)
    assert found.answer is WorkerAnswer.RUNNING and f"(pid {named_worker.pid})" in found.detail
    named_worker.kill()
    named_worker.wait()
    # A shim's arguments name obuilder-run-N; these name the worker itself: still not a worker.
    decoy = subprocess.Popen(["/bin/busybox", "sleep", "600", "obuilder", "ocluster-worker"])
    try:
        gone = platform.find_worker(WORKER)
    finally:
        decoy.kill()
        decoy.wait()
    assert gone.answer is WorkerAnswer.NOT_RUNNING, gone


@pytest.mark.parametrize(
    ("name", "exe"),
    [
        ("OCluster-Worker.EXE", "C:\\Program Files\\ocluster\\OCluster-Worker.EXE"),
        ("ocluster-worker", "/usr/local/bin/ocluster-worker (deleted)"),  # replaced on disk while running
        ("ocluster-worker", psutil.AccessDenied(4242)),
    ],
)
def test_names_are_compared_as_executables_are_named(
    system: str, monkeypatch: pytest.MonkeyPatch, name: str, exe: str | Exception
) -> None:
    if system == "linux" and isinstance(exe, str) and "\\" in exe:
        exe = exe.replace("C:\\Program Files\\ocluster\\", "/mnt/c/")
    fake_process_listing(monkeypatch, [Listed(4242, name, exe)])
    assert platform.find_worker(WORKER).answer is WorkerAnswer.RUNNING


def test_a_long_name_matches_the_15_characters_linux_keeps_of_it(system: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # /proc/PID/comm: the first 15 characters, all a listing shows when the exe is denied.
    fake_process_listing(monkeypatch, [Listed(4242, "ocluster-worker", psutil.AccessDenied(4242))])
    assert platform.find_worker(("ocluster-worker-windows",)).answer is WorkerAnswer.RUNNING
    assert platform.find_worker(("ocluster-work",)).answer is WorkerAnswer.NOT_RUNNING


# -- Windows: the service manager answers for spec.worker.serviceName --------------------------


@pytest.mark.parametrize(
    ("state", "answer"),
    [
        (pywin32.SERVICE_STOPPED, WorkerAnswer.NOT_RUNNING),
        (pywin32.SERVICE_START_PENDING, WorkerAnswer.RUNNING),
        (pywin32.SERVICE_STOP_PENDING, WorkerAnswer.RUNNING),  # a stopping worker may still run builds
        (pywin32.SERVICE_RUNNING, WorkerAnswer.RUNNING),
        (pywin32.SERVICE_CONTINUE_PENDING, WorkerAnswer.RUNNING),
        (pywin32.SERVICE_PAUSE_PENDING, WorkerAnswer.RUNNING),
        (pywin32.SERVICE_PAUSED, WorkerAnswer.RUNNING),
    ],
    ids=["stopped", "start-pending", "stop-pending", "running", "continue-pending", "pause-pending", "paused"],
)
def test_the_service_manager_answers_for_the_worker_service(
    windows: None, monkeypatch: pytest.MonkeyPatch, state: int, answer: WorkerAnswer
) -> None:
    scm = FakeServiceManager({"ocluster-worker-1": state, "containerd": pywin32.SERVICE_RUNNING})
    install_service_manager(monkeypatch, scm)
    fake_process_listing(monkeypatch, [Listed(10, "svchost"), Listed(11, "containerd")])
    sighting = platform.find_worker(WORKER, "OCluster-Worker-1")  # service names are case-insensitive
    assert sighting.answer is answer, sighting
    assert "OCluster-Worker-1" in sighting.detail
    assert scm.open_handles == [], "a service manager handle was left open"


def test_a_worker_process_counts_even_when_its_service_says_stopped(
    windows: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Started by hand from a console, beside its stopped service: it still runs builds.
    install_service_manager(monkeypatch, FakeServiceManager({"ocluster-worker-1": pywin32.SERVICE_STOPPED}))
    fake_process_listing(monkeypatch, [Listed(4242, "ocluster-worker.exe", "C:\\ocluster\\ocluster-worker.exe")])
    sighting = platform.find_worker(WORKER, "ocluster-worker-1")
    assert sighting.answer is WorkerAnswer.RUNNING and "ocluster-worker (pid 4242)" in sighting.detail


def test_a_stopped_service_is_trusted_when_the_second_opinion_cannot_tell(
    windows: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_service_manager(monkeypatch, FakeServiceManager({"ocluster-worker-1": pywin32.SERVICE_STOPPED}))
    failing_listing(monkeypatch, OSError(5, "Access is denied"))
    sighting = platform.find_worker(WORKER, "ocluster-worker-1")
    assert sighting.answer is WorkerAnswer.NOT_RUNNING
    assert "is stopped" in sighting.detail and "could not add to it" in sighting.detail


def test_a_service_that_does_not_exist_is_cannot_tell(windows: None, monkeypatch: pytest.MonkeyPatch) -> None:
    scm = FakeServiceManager({"ocluster-worker-1": pywin32.SERVICE_STOPPED})
    install_service_manager(monkeypatch, scm)
    fake_process_listing(monkeypatch, [])
    sighting = platform.find_worker(WORKER, "ocluster-wroker-1")
    assert sighting.answer is WorkerAnswer.CANNOT_TELL and sighting.may_be_running
    assert "no service named 'ocluster-wroker-1'" in sighting.detail
    assert "ERROR_SERVICE_DOES_NOT_EXIST" in sighting.detail and "spec.worker.serviceName" in sighting.detail
    assert scm.open_handles == []


@pytest.mark.parametrize("refused", ["OpenSCManager", "OpenService"])
def test_access_denied_by_the_service_manager_is_cannot_tell(
    windows: None, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    scm = FakeServiceManager({"ocluster-worker-1": pywin32.SERVICE_STOPPED}, deny={refused})
    install_service_manager(monkeypatch, scm)
    fake_process_listing(monkeypatch, [])
    sighting = platform.find_worker(WORKER, "ocluster-worker-1")
    assert sighting.answer is WorkerAnswer.CANNOT_TELL
    assert f"{refused} was refused (ERROR_ACCESS_DENIED)" in sighting.detail
    assert scm.open_handles == []


def test_a_service_manager_that_does_not_answer_in_time_is_cannot_tell(
    windows: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    class Hung(FakeServiceManager):
        def OpenSCManager(self, machineName: str | None, dbName: str | None, desiredAccess: int) -> pywin32.ScHandle:
            release.wait(30)
            return super().OpenSCManager(machineName, dbName, desiredAccess)

    install_service_manager(monkeypatch, Hung({"ocluster-worker-1": pywin32.SERVICE_STOPPED}))
    try:
        sighting = platform.find_worker(WORKER, "ocluster-worker-1", timeout=0.3)
    finally:
        release.set()
    assert sighting.answer is WorkerAnswer.CANNOT_TELL and "took longer than 0.3s" in sighting.detail


def test_a_state_the_service_manager_never_documented_is_cannot_tell(
    windows: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_service_manager(monkeypatch, FakeServiceManager({"ocluster-worker-1": 8}))
    fake_process_listing(monkeypatch, [])
    sighting = platform.find_worker(WORKER, "ocluster-worker-1")
    assert sighting.answer is WorkerAnswer.CANNOT_TELL and "unknown state (8)" in sighting.detail


def test_without_pywin32_a_named_service_is_cannot_tell(windows: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "win32service", None)  # import win32service raises ImportError
    fake_process_listing(monkeypatch, [])
    sighting = platform.find_worker(WORKER, "ocluster-worker-1")
    assert sighting.answer is WorkerAnswer.CANNOT_TELL and "pywin32 is not installed" in sighting.detail


def test_elsewhere_than_windows_the_service_name_is_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    scm = FakeServiceManager({"ocluster-worker-1": pywin32.SERVICE_RUNNING})
    install_service_manager(monkeypatch, scm)
    fake_process_listing(monkeypatch, [Listed(10, "containerd")])
    assert platform.find_worker(WORKER, "ocluster-worker-1").answer is WorkerAnswer.NOT_RUNNING
    assert scm.calls == []


# -- what a user sees: reconcile --once ------------------------------------------------------


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_once_exits_9_with_the_reason_and_touches_nothing_when_it_cannot_tell(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = create_store(tmp_path / "store")
    (root / "result-tmp" / "build-under-way").mkdir()
    (root / "result-tmp" / "build-under-way" / "log").write_text("building...\n")
    before = _tree(root)
    failing_listing(monkeypatch, PermissionError(13, "Permission denied", "/proc"))
    code = cli_main(["--once", "--store", str(root), "--address", str(tmp_path / "none.sock")])
    err = capsys.readouterr().err
    assert code == ExitCode.WORKER_RUNNING
    assert "cannot tell whether the worker runs: listing processes failed: PermissionError" in err, err
    assert "pass --force if you know it is stopped" in err
    assert _tree(root) == before, "a run that could not tell touched the store"


def test_once_exits_9_naming_the_worker_it_sees(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = create_store(tmp_path / "store")
    fake_process_listing(monkeypatch, [Listed(4242, "ocluster-worker", "/usr/local/bin/ocluster-worker")])
    assert cli_main(["--once", "--store", str(root), "--address", str(tmp_path / "none.sock")]) == 9
    assert "a worker appears to be running (process ocluster-worker (pid 4242))" in capsys.readouterr().err


def test_once_on_windows_exits_9_when_the_policy_names_a_service_that_is_not_there(
    windows: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = create_store(tmp_path / "store")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: t}\n"
        "spec:\n  worker: {serviceName: ocluster-worker-1}\n"
    )
    install_service_manager(monkeypatch, FakeServiceManager({"containerd": pywin32.SERVICE_RUNNING}))
    fake_process_listing(monkeypatch, [])
    before = _tree(root)
    argv = ["--once", "--policy", str(policy), "--store", str(root), "--address", str(tmp_path / "none.sock")]
    assert cli_main(argv) == 9
    err = capsys.readouterr().err
    assert "cannot tell whether the worker runs" in err and "no service named 'ocluster-worker-1'" in err, err
    assert _tree(root) == before


SITECUSTOMIZE = '''\
"""Makes this interpreter's process table unreadable, as a /proc mounted without access would."""
import psutil


def _unreadable():
    raise PermissionError(13, "Permission denied", "/proc")


psutil.pids = _unreadable
'''


@pytest.fixture
def unreadable_process_table(tmp_path: Path) -> dict[str, str]:
    """The environment of a ``reconcile`` whose process listing fails (a sitecustomize on its path)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.containerd
def test_the_real_command_keeps_every_container_and_build_when_it_cannot_tell(
    world: World, containerd: PrivateContainerd, namespace: str, unreadable_process_table: dict[str, str]
) -> None:
    base = world.base("b:1")
    world.step("under-way", base, finish=False)  # a build the worker may be running now
    world.leak_container("obuilder-run-1", task="running")
    snapshots, containers = containerd.snapshot_keys(namespace), containerd.container_ids(namespace)
    run = reconcile_on(containerd, namespace, world.root, "--once", env=unreadable_process_table)
    assert run.code == 9, run.stderr
    assert "cannot tell whether the worker runs: listing processes failed: PermissionError" in run.stderr
    assert containerd.container_ids(namespace) == containers == ["obuilder-run-1"]
    assert containerd.snapshot_keys(namespace) == snapshots
    assert (world.root / "result-tmp" / "under-way").is_dir()
    # --force keeps its meaning: no question asked, boot semantics.
    forced = reconcile_on(containerd, namespace, world.root, "--once", "--force", env=unreadable_process_table)
    assert forced.code == 0, forced.stderr
    assert containerd.container_ids(namespace) == []
    assert not (world.root / "result-tmp" / "under-way").exists()


# -- what a user sees: the service ------------------------------------------------------------


@pytest.mark.containerd
def test_the_service_runs_as_the_daemon_without_a_boot_pass_when_it_cannot_tell(
    world: World,
    containerd: PrivateContainerd,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = world.base("b:1")
    world.step("under-way", base, finish=False)
    world.leak_container("obuilder-run-1", task="running")
    failing_listing(monkeypatch, PermissionError(13, "Permission denied", "/proc"))
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: t}\n"
        "spec:\n  timing: {interval: 2s}\n  metrics: {enabled: false}\n"
    )
    status = tmp_path / "status.json"
    args = invocation(build_service_parser().parse_args(
        ["--policy", str(policy), "--store", str(world.root), "--address", containerd.address,
         "--namespace", namespace, "--snapshotter", SNAPSHOTTER, "--status-file", str(status)]
    ))  # fmt: skip
    states: list[State] = []
    running = threading.Event()

    class Manager:
        def report(self, status: Status) -> None:
            states.append(status.state)
            if status.state is State.RUNNING:
                running.set()

        def start_service(self, name: str) -> None:
            raise AssertionError(f"nothing kept the worker down, yet {name} was started")

    service = ReconcileService(Manager(), ServiceSteps(args, {}), checkpoint_every=0.5)
    code: list[ExitCode] = []
    t = threading.Thread(target=lambda: code.append(service.run()))
    t.start()
    try:
        assert running.wait(120), states
        # Boot semantics would have removed both before running was reported.
        assert containerd.container_ids(namespace) == ["obuilder-run-1"]
        assert (world.root / "result-tmp" / "under-way").is_dir()
        deadline = time.monotonic() + 60
        while not status.exists():  # the daemon's first pass
            assert time.monotonic() < deadline, "the daemon never passed"
            time.sleep(0.1)
    finally:
        service.request_stop()
        t.join(120)
    assert code == [ExitCode.OK]
    assert containerd.container_ids(namespace) == ["obuilder-run-1"], "the daemon touched a running task"
    assert (world.root / "result-tmp" / "under-way").is_dir()
    said = [r.getMessage() for r in caplog.records if r.name == "reconcile"]
    assert any(
        "boot pass: cannot tell whether the worker runs: listing processes failed" in m and "exit 9" in m for m in said
    ), said
