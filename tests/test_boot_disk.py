"""The boot pass's look at the disk, bounded: sizing ``rm-*`` folders has a time budget.

A Windows layer holds some 100,000 files, each one a stat to size; the boot pass (``--once``),
which the worker waits for, must not spend minutes on it. The observer lists and counts every
unknown folder, sizes them while the budget lasts, and says which it left and why. Time here
is a fake clock that moves one second at each read: how far a walk goes is counted, never
timed.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import controller.adapters.disk as disk
from controller.adapters.ctr import Ctr, CtrSettings
from controller.adapters.disk import DiskObserver

#: Each test lays out 60,000 files.
pytestmark = pytest.mark.slow

FILES = 20_000
FOLDERS = ("rm-a", "rm-b", "rm-c")


class StubCtr(Ctr):
    """One namespace, one snapshot (folder ``1``)."""

    def __init__(self, namespace: str = "default") -> None:
        super().__init__(CtrSettings(ctr="ctr.exe", namespace=namespace, snapshotter="windows"))

    def run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls += 1
        answers = {
            ("namespaces", "ls", "--quiet"): "default\n",
            ("snapshots", "--snapshotter", "windows", "ls"): "KEY        PARENT KIND\nsha256:abc        Committed\n",
        }
        out = answers.get(tuple(args))
        if out is None:
            return subprocess.CompletedProcess(list(args), 1, "", f"ctr: unexpected {list(args)}\n")
        return subprocess.CompletedProcess(list(args), 0, out, "")


def _layer(path: Path, files: int) -> None:
    """A folder of ``files`` one-byte files, made quickly."""
    path.mkdir(parents=True)
    for i in range(files):
        fd = os.open(path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"x")
        os.close(fd)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("boot-disk") / "root" / "io.containerd.snapshotter.v1.windows" / "snapshots"
    (folder / "1").mkdir(parents=True)
    for name in FOLDERS:
        _layer(folder / name, FILES)
    return folder


class Ticking:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def walked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Entries the size walks listed (each one a stat), counted through ``os.scandir``."""
    count = [0]
    real = os.scandir

    class Counted:
        def __init__(self, path: Any) -> None:
            self.it = real(path)

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: object) -> None:
            self.it.close()

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            for entry in self.it:
                count[0] += 1
                yield entry

    monkeypatch.setattr(os, "scandir", Counted)
    yield count


def _observer(budget: float | None) -> DiskObserver:
    return DiskObserver(StubCtr(), for_namespace=StubCtr, clock=Ticking(), size_budget=budget)


def test_a_spent_budget_lists_every_folder_sizes_some_and_says_why_not_the_rest(
    snapshots: Path, walked: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    # 100 reads of the clock: rm-a's walk (20,000 entries, a read each 256) fits, rm-b's does not.
    observer = _observer(100.0)
    with caplog.at_level(logging.INFO, logger="reconcile"):
        drift = observer.observe([f"{snapshots}/1"])
    assert [(f.name, f.reason) for f in drift.unknown] == [(n, "removed") for n in FOLDERS]
    assert [f.size_bytes for f in drift.unknown] == [FILES, None, None]
    assert (drift.unsized, drift.note) == (2, observer.note)
    assert (drift.unknown_bytes, drift.removed_bytes) == (FILES, FILES)
    assert observer.unsized == ("rm-b", "rm-c")
    assert observer.note == "not sized: boot budget of 100 s spent; the daemon sizes them"
    assert "2 of 3 unknown folders" in caplog.text and observer.note in caplog.text
    # Prompt: rm-a walked, rm-b only until the budget ran out, rm-c not at all.
    assert FILES < walked[0] < FILES + 100 * 256
    assert observer.clock() < 100 + 10  # the clock was read about as often as the budget allows


def test_a_later_budgeted_look_compares_with_the_first(snapshots: Path, walked: list[int]) -> None:
    """What a look left unsized stays so in the run's later looks (their rm-* bytes are
    compared: growth is what the run's removals left), and a new folder is sized."""
    observer = _observer(100.0)
    first = observer.observe([f"{snapshots}/1"])
    before = walked[0]
    _layer(snapshots / "rm-d", 10)
    try:
        second = observer.observe([f"{snapshots}/1"])
    finally:
        for name in os.listdir(snapshots / "rm-d"):
            os.unlink(snapshots / "rm-d" / name)
        os.rmdir(snapshots / "rm-d")
    assert walked[0] - before == 10  # rm-a from its last measure; rm-b, rm-c left; rm-d walked
    assert [f.name for f in second.unknown] == [*FOLDERS, "rm-d"]
    assert second.removed_bytes - first.removed_bytes == 10
    assert observer.unsized == ("rm-b", "rm-c")


def test_a_budget_that_suffices_sizes_everything(snapshots: Path) -> None:
    observer = _observer(10_000.0)
    drift = observer.observe([f"{snapshots}/1"])
    assert [f.size_bytes for f in drift.unknown] == [FILES] * 3
    assert (observer.unsized, observer.note) == ((), None)


def test_no_budget_sizes_everything(snapshots: Path, walked: list[int]) -> None:
    observer = _observer(None)
    drift = observer.observe([f"{snapshots}/1"])
    assert drift.removed_bytes == 3 * FILES
    assert walked[0] == 3 * FILES
    assert (observer.unsized, observer.note) == ((), None)


def test_a_walk_cut_by_the_deadline_raises(snapshots: Path) -> None:
    clock = Ticking()
    with pytest.raises(disk.BudgetSpent):
        disk.tree_bytes(str(snapshots / "rm-a"), deadline=10.0, clock=clock)
    assert clock.now == 10.0  # a read each 256 entries, up to the deadline
    assert disk.tree_bytes(str(snapshots / "rm-a"), deadline=1000.0, clock=Ticking()) == FILES
