"""Fixtures: one private containerd per session, a fresh namespace and store per test.

With CI set, a machine that cannot run containerd fails the integration tests
instead of skipping them: a green run must mean they ran.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.containerd import ContainerdUnavailable, PrivateContainerd
from tests.support.world import World

_namespaces = itertools.count(1)
_measurements: list[str] = []
_faults: list[str] = []


@pytest.fixture
def measure() -> Callable[[str], None]:
    """Record a line of numbers a test measured; they are printed at the end of the run."""
    return _measurements.append


@pytest.fixture
def fault() -> Callable[[str, str], None]:
    """Record what held under one fault class (``fault("ctr hangs", "exit 1 in 2.1 s; ...")``): the
    fault suite's lines are printed at the end of the run, one per class."""
    return lambda name, held: _faults.append(f"{name}: {held}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _measurements:
        terminalreporter.section("measurements")
        for line in _measurements:
            terminalreporter.write_line(line)
    if _faults:
        terminalreporter.section("faults")
        for line in _faults:
            terminalreporter.write_line(line)


def _temp_folder(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A temp folder removed after the test, pass or fail (pytest's own keeps the last few)."""
    yield from _temp_folder("obr-test-")


@pytest.fixture
def outside_path() -> Iterator[Path]:
    """A second temp folder, apart from ``tmp_path`` (a store root, say): removed after the test too."""
    yield from _temp_folder("obr-test-outside-")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test on the real daemon carries the mark, so `pytest -m containerd` runs
    # exactly those on another containerd line (make test-lines).
    for item in items:
        if "containerd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.containerd)


@pytest.fixture(scope="session")
def containerd() -> Iterator[PrivateContainerd]:
    daemon = PrivateContainerd()
    try:
        daemon.start()
    except ContainerdUnavailable as e:
        daemon.stop()
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so a real containerd is required: {e}")
        pytest.skip(f"no real containerd here ({e}); CI would fail instead of skipping")
    # make test-lines puts another line's binaries first on PATH and says which: a
    # PATH that does not reach them must not pass for a run on that line.
    wanted = os.environ.get("OBR_CONTAINERD_BIN")
    found = shutil.which("containerd") or ""
    if wanted and (
        Path(found).parent.resolve() != Path(wanted).resolve() or shutil.which("ctr") != str(Path(found).parent / "ctr")
    ):
        daemon.stop()
        pytest.fail(f"OBR_CONTAINERD_BIN={wanted}, but containerd and ctr on PATH are {found}, {shutil.which('ctr')}")
    _measurements.append(f"containerd {daemon.version} ({found})")
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def own_containerd() -> Iterator[PrivateContainerd]:
    """A containerd of the test's own, so stopping or killing it leaves the session's alone."""
    cd = PrivateContainerd().start()
    try:
        yield cd
    finally:
        cd.stop()


@pytest.fixture
def namespace(containerd: PrivateContainerd) -> str:
    return f"t{next(_namespaces)}"


@pytest.fixture
def world(containerd: PrivateContainerd, namespace: str, tmp_path: Path) -> Iterator[World]:
    w = World(containerd, namespace, tmp_path / "store")
    try:
        yield w
    finally:
        # Tasks left by a failing test must not outlive it.
        tasks = containerd.ctr("tasks", "ls", "--quiet", namespace=namespace, check=False).stdout.split()
        if tasks:
            containerd.ctr("tasks", "delete", "--force", "--", *tasks, namespace=namespace, check=False)


@pytest.fixture
def named_worker(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real process whose executable is named ocluster-worker: busybox picks its applet from
    argv[0], so it is named as the worker and acts as sleep."""
    exe = tmp_path / "ocluster-worker"
    shutil.copy("/bin/busybox", exe)
    proc = subprocess.Popen(["sleep", "600"], executable=str(exe))
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
