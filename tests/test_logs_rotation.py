"""The log file's rotation, and the logs and the ctr children of a process without a console.

Windows' rule for a file another process holds open without FILE_SHARE_DELETE (PowerShell's
``Get-Content -Wait``, a log shipper) is played on Linux through the os seam, as in
tests/test_files.py: a rename, replace or delete of it fails with a sharing violation
(winerror 32). The rotation under test is the real one.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.adapters import platform
from controller.adapters.logs import (
    LOG_FILE_BACKUPS,
    LOG_FILE_MAX_BYTES,
    CopyTruncateFileHandler,
    ProgressReporter,
    configure_logging,
)
from controller.model.plan import Mode, Plan


def _sharing_violation(path: str) -> PermissionError:
    e = PermissionError(
        errno.EACCES, "The process cannot access the file because it is being used by another process", path
    )
    setattr(e, "winerror", 32)  # noqa: B010 - the attribute exists only on Windows' OSError
    return e


class HeldFiles:
    """os.rename, os.replace, os.unlink and os.remove refuse, as on NTFS, to rename or delete a
    held file (as source or as the file replaced)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held: set[str] = set()
        self.refused: list[str] = []
        self.deleted: list[str] = []
        self._real = {name: getattr(os, name) for name in ("rename", "replace", "unlink")}
        monkeypatch.setattr(os, "rename", self.rename)
        monkeypatch.setattr(os, "replace", self.replace)
        monkeypatch.setattr(os, "unlink", self.unlink)
        monkeypatch.setattr(os, "remove", self.unlink)

    def hold(self, path: Path | str) -> None:
        self.held.add(os.fspath(path))

    def _check(self, *paths: Any) -> None:
        for p in paths:
            shown = os.fsdecode(p)
            if shown in self.held:
                self.refused.append(shown)
                raise _sharing_violation(shown)

    def rename(self, src: Any, dst: Any, **kw: Any) -> None:
        self._check(src, dst)
        self._real["rename"](src, dst, **kw)

    def replace(self, src: Any, dst: Any, **kw: Any) -> None:
        self._check(src, dst)
        if os.path.lexists(os.fsdecode(dst)):
            self.deleted.append(os.fsdecode(dst))
        self._real["replace"](src, dst, **kw)

    def unlink(self, path: Any, **kw: Any) -> None:
        self._check(path)
        self.deleted.append(os.fsdecode(path))
        self._real["unlink"](path, **kw)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("test-rotation")
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


def _handler(log: logging.Logger, path: Path, *, max_bytes: int, backups: int) -> CopyTruncateFileHandler:
    handler = CopyTruncateFileHandler(path, max_bytes=max_bytes, backup_count=backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    return handler


def _lines(path: Path, backups: int) -> list[str]:
    """Every line the live file and its backups hold, oldest first."""
    files = [Path(f"{path}.{n}") for n in range(backups, 0, -1)] + [path]
    return [line for f in files if f.exists() for line in f.read_text(encoding="utf-8").splitlines()]


def _backups(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_the_same_limits_as_before() -> None:
    assert (LOG_FILE_MAX_BYTES, LOG_FILE_BACKUPS) == (10 * 1024 * 1024, 5)


def test_rotates_at_the_limit_and_keeps_backup_count(tmp_path: Path, logger: logging.Logger) -> None:
    path = tmp_path / "reconcile.log"
    _handler(logger, path, max_bytes=1000, backups=3)
    sizes = []
    for i in range(400):
        logger.info("record %04d %s", i, "x" * 20)  # 32 bytes a line
        sizes.append(path.stat().st_size)
    assert max(sizes) <= 1000
    assert _backups(path) == ["reconcile.log.1", "reconcile.log.2", "reconcile.log.3"]
    for n in (1, 2, 3):
        assert 900 <= Path(f"{path}.{n}").stat().st_size <= 1000
    lines = _lines(path, 3)
    # The newest lines, in order, none twice, no gap: only the oldest went.
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], 400))
    assert numbers[0] > 0


def test_a_reader_holding_the_live_file_loses_no_record(
    tmp_path: Path, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "reconcile.log"
    ntfs = HeldFiles(monkeypatch)
    ntfs.hold(path)  # Get-Content -Wait: no rename, no delete of the live file
    handler = _handler(logger, path, max_bytes=1000, backups=5)
    errors: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", errors.append)
    written = 150  # about 4.8 files' worth: fits the live file and its 5 backups
    for i in range(written):
        logger.info("record %04d %s", i, "x" * 20)
        assert len(_backups(path)) <= 5
    assert [int(line.split()[1]) for line in _lines(path, 5)] == list(range(written))
    assert _backups(path) == [f"reconcile.log.{n}" for n in (1, 2, 3, 4)]
    assert path.stat().st_size <= 1000
    assert errors == []
    assert ntfs.refused == []  # the live file was never renamed nor deleted
    # Every delete was of an old backup replaced by its successor, never of the live file.
    assert str(path) not in ntfs.deleted


def test_a_held_backup_stops_rotation_but_loses_nothing_and_deletes_nothing(
    tmp_path: Path, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "reconcile.log"
    ntfs = HeldFiles(monkeypatch)
    ntfs.hold(path)
    handler = _handler(logger, path, max_bytes=1000, backups=3)
    errors: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", errors.append)
    written = 0

    def write(n: int) -> None:
        nonlocal written
        for _ in range(n):
            logger.info("record %04d %s", written, "x" * 20)
            written += 1

    write(100)  # three rotations: .1, .2 and .3 all there
    assert _backups(path) == ["reconcile.log.1", "reconcile.log.2", "reconcile.log.3"]
    before = {n: Path(f"{path}.{n}").read_bytes() for n in (1, 2, 3)}
    ntfs.hold(f"{path}.2")  # a shipper reads the second backup: it cannot be moved
    deleted = len(ntfs.deleted)
    write(200)
    # No rotation could happen: the backups are as they were (none dropped for nothing), the
    # live file grew past the limit instead, and every record since is in it.
    assert {n: Path(f"{path}.{n}").read_bytes() for n in (1, 2, 3)} == before
    assert _backups(path) == ["reconcile.log.1", "reconcile.log.2", "reconcile.log.3"]
    assert ntfs.deleted[deleted:] == [f"{path}.rotating"] * len(ntfs.deleted[deleted:])
    live = [int(line.split()[1]) for line in path.read_text(encoding="utf-8").splitlines()]
    assert live[-200:] == list(range(100, 300))
    assert len(errors) == 1  # said once, not at every record
    # Tried again only once the file grew by a tenth of the limit (100 bytes: every 4th record),
    # not at every record: each try copies the file.
    tries = ntfs.refused.count(f"{path}.2")
    assert 200 // 5 <= tries <= 200 // 4
    # Released: the next rotation goes through, and no record is lost.
    ntfs.held.discard(f"{path}.2")
    write(40)
    assert path.stat().st_size <= 1000
    numbers = [int(line.split()[1]) for line in _lines(path, 3)]
    assert numbers == list(range(numbers[0], written))
    assert len(_backups(path)) == 3


def test_a_rotation_that_fails_to_copy_still_writes_the_record(
    tmp_path: Path, logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "reconcile.log"
    handler = _handler(logger, path, max_bytes=200, backups=2)
    errors: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", errors.append)

    def no_copy() -> None:
        raise _sharing_violation(str(path))

    monkeypatch.setattr(handler, "rotate", no_copy)
    for i in range(30):
        logger.info("record %04d %s", i, "x" * 20)
    assert [int(line.split()[1]) for line in path.read_text(encoding="utf-8").splitlines()] == list(range(30))
    assert len(errors) == 1
    assert _backups(path) == []


# -- without a stderr (pythonw, detached)


def test_configure_logging_without_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(sys, "stderr", None)
    for fmt in ("text", "json"):
        configure_logging(fmt)
        assert len(root.handlers) == 1
        assert not isinstance(root.handlers[0], logging.StreamHandler)
        assert root.handlers[0].formatter is not None  # a log file's handler takes it from here
        logging.getLogger("reconcile").warning("nowhere to go, and no error")


def test_progress_reporter_without_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", None)
    reporter = ProgressReporter()
    reporter.pass_started(1, Plan(mode=Mode.BOOT))
    assert reporter.bar is None
    reporter.close()


# -- ctr children of a process without a console


class FakeKernel32:
    def __init__(self, window: int) -> None:
        self.window = window
        self.asked = 0

    def GetConsoleWindow(self) -> int:
        self.asked += 1
        return self.window


class FakeWindll:
    def __init__(self, kernel32: FakeKernel32) -> None:
        self.kernel32 = kernel32


@pytest.mark.parametrize(("window", "flags"), [(0, 0x08000200), (0x1234, 0x00000200)])
def test_ctr_children_of_a_service_get_no_console(monkeypatch: pytest.MonkeyPatch, window: int, flags: int) -> None:
    import ctypes

    kernel32 = FakeKernel32(window)
    monkeypatch.setattr(ctypes, "windll", FakeWindll(kernel32), raising=False)
    monkeypatch.setattr(platform, "_no_console", None)
    monkeypatch.setattr(platform, "IS_WINDOWS", True)
    assert platform.child_process_options() == {"creationflags": flags}
    assert platform.child_process_options() == {"creationflags": flags}
    assert kernel32.asked == 1  # asked once


def test_posix_children_keep_their_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "_no_console", None)
    monkeypatch.setattr(platform, "IS_WINDOWS", False)
    assert platform.child_process_options() == {"process_group": 0}
