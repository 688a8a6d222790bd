"""Files on NTFS: removal through our trash, held files, read-only attributes, long paths,
shared reads, and the status file's replace, with Windows' file rules played on Linux.

The tests run as root on Linux, where neither a read-only file nor another process's open
handle stops a delete. :class:`NtfsRules` makes the os calls under a test's folder answer
as NTFS does (the read-only attribute refuses DeleteFile and RemoveDirectory; a file held
open refuses delete with a sharing violation; a folder with a file open inside that was
not opened with FILE_SHARE_DELETE cannot be renamed), so the same calls the product makes
on Windows fail here the same way: the code under test is the real one.
"""

from __future__ import annotations

import errno
import json
import ntpath
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from controller.adapters import platform
from controller.adapters.status import read_status, write_status
from controller.adapters.store_cleanup import TRASH_DIR, StoreCleaner
from controller.model.outcome import Outcome, PassReport
from controller.model.plan import Mode, StoreDrift
from tests.support.world import create_store


def _winerror(code: int, message: str, path: str) -> PermissionError:
    e = PermissionError(errno.EACCES, message, path)
    setattr(e, "winerror", code)  # noqa: B010 - the attribute exists only on Windows' OSError
    return e


class NtfsRules:
    """os.unlink, os.rmdir, os.rename and os.replace under ``under`` answer as on NTFS."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, under: Path) -> None:
        self.under = str(under) + os.sep
        #: path -> how many more times a delete or replace of it meets a sharing violation (-1: until released)
        self.held: dict[str, int] = {}
        self.refused: list[str] = []
        self._real = {name: getattr(os, name) for name in ("unlink", "rmdir", "rename", "replace")}
        monkeypatch.setattr(os, "unlink", self.unlink)
        monkeypatch.setattr(os, "remove", self.unlink)
        monkeypatch.setattr(os, "rmdir", self.rmdir)
        monkeypatch.setattr(os, "rename", self.rename)
        monkeypatch.setattr(os, "replace", self.replace)

    def hold(self, path: Path, times: int = -1) -> None:
        self.held[str(path)] = times

    def release(self, path: Path) -> None:
        self.held.pop(str(path), None)

    def _abs(self, path: Any, dir_fd: int | None) -> str:
        shown = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(shown):
            shown = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), shown)
        return shown

    def _sharing(self, path: str) -> None:
        left = self.held.get(path)
        if left is None or left == 0:
            return
        if left > 0:
            self.held[path] = left - 1
        self.refused.append(path)
        raise _winerror(32, "The process cannot access the file because it is being used by another process", path)

    def _read_only(self, path: str, dir_fd: int | None) -> None:
        st = os.lstat(path)
        if not stat.S_ISLNK(st.st_mode) and not st.st_mode & stat.S_IWUSR:
            self.refused.append(path)
            raise _winerror(5, "Access is denied", path)

    def unlink(self, path: Any, *, dir_fd: int | None = None) -> None:
        full = self._abs(path, dir_fd)
        if full.startswith(self.under):
            self._sharing(full)
            self._read_only(full, dir_fd)
        self._real["unlink"](path, dir_fd=dir_fd)

    def rmdir(self, path: Any, *, dir_fd: int | None = None) -> None:
        full = self._abs(path, dir_fd)
        if full.startswith(self.under):
            self._read_only(full, dir_fd)
        self._real["rmdir"](path, dir_fd=dir_fd)

    def rename(self, src: Any, dst: Any, **kw: Any) -> None:
        full = self._abs(src, kw.get("src_dir_fd"))
        inside = [p for p, n in self.held.items() if n != 0 and p.startswith(full + os.sep)]
        if full.startswith(self.under) and inside:
            self.refused.append(full)
            raise _winerror(5, "Access is denied", full)
        self._real["rename"](src, dst, **kw)

    def replace(self, src: Any, dst: Any, **kw: Any) -> None:
        full = self._abs(dst, kw.get("dst_dir_fd"))
        if full.startswith(self.under):
            self._sharing(full)
        self._real["replace"](src, dst, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return create_store(tmp_path / "store")


@pytest.fixture
def ntfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[NtfsRules]:
    rules = NtfsRules(monkeypatch, tmp_path)
    yield rules
    monkeypatch.undo()
    # Leave nothing the tmp_path clean-up cannot remove.
    for folder, dirs, files in os.walk(tmp_path):
        for name in dirs + files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), 0o700)


def robocopied_cache(entry: Path) -> list[Path]:
    """A build's folder as a robocopied cache leaves it: read-only files, a read-only folder."""
    (entry / "rootfs" / "Files" / "opam").mkdir(parents=True)
    files = [entry / "log", entry / "rootfs" / "Files" / "opam" / "config", entry / "rootfs" / "Files" / "a.dll"]
    for f in files:
        f.write_bytes(b"x" * 100)
        f.chmod(0o444)
    (entry / "rootfs" / "Files" / "opam").chmod(0o555)
    return files


def trash_of(store: Path) -> list[str]:
    folder = store.joinpath(*TRASH_DIR)
    return sorted(os.listdir(folder)) if folder.exists() else []


# -- removal --------------------------------------------------------------------------


def test_read_only_files_and_folders_are_removed(store: Path, ntfs: NtfsRules) -> None:
    entry = store / "result-tmp" / "abc"
    robocopied_cache(entry)
    result = StoreCleaner(store).remove_tmp_entry("abc")
    assert result.outcome is Outcome.REMOVED, result.message
    assert not os.path.lexists(entry)
    assert trash_of(store) == []
    assert ntfs.refused, "the NTFS rules refused nothing: the test would prove nothing"


def test_a_file_held_briefly_is_retried_with_a_bounded_backoff(store: Path, ntfs: NtfsRules) -> None:
    entry = store / "cache-tmp" / "3-opam"
    (entry / "sub").mkdir(parents=True)
    (entry / "sub" / "scanned.exe").write_bytes(b"MZ")
    slept: list[float] = []
    # A scanner opened the file (sharing delete) as it appeared in the trash, for two tries.
    ntfs.hold(store.joinpath(*TRASH_DIR) / "cache-tmp-3-opam-1" / "sub" / "scanned.exe", 2)
    result = StoreCleaner(store, sleep=slept.append).remove_cache_tmp("3-opam")
    assert (result.outcome, result.message) == (Outcome.REMOVED, "")
    assert not os.path.lexists(entry)
    assert trash_of(store) == []
    assert slept == list(platform.SHARING_BACKOFF[:2])


def test_a_file_held_for_long_never_leaves_a_half_deleted_entry(store: Path, ntfs: NtfsRules) -> None:
    entry = store / "result-tmp" / "held"
    entry.mkdir()
    for name in ("a", "b", "c"):
        (entry / name).write_text(name)
    now = [0.0]
    cleaner = StoreCleaner(store, sleep=lambda s: None, clock=lambda: now[0], trash_retry=60.0)
    # A scanner opens "b" as it lands in the trash (sharing delete, so the rename went
    # through) and keeps it for minutes.
    moved = store.joinpath(*TRASH_DIR) / "result-tmp-held-1"
    ntfs.hold(moved / "b")
    result = cleaner.remove_tmp_entry("held")
    # OBuilder sees the entry gone at once and whole; the bytes wait in our trash.
    assert result.outcome is Outcome.REMOVED
    assert "not deleted yet" in result.message
    assert not os.path.lexists(entry)
    assert trash_of(store) == ["result-tmp-held-1"]
    assert os.listdir(moved) == ["b"]
    # A later pass (past trash_retry) empties the trash first, once the scanner let go.
    ntfs.release(moved / "b")
    (store / "result-tmp" / "next").mkdir()
    now[0] = 61.0
    assert cleaner.remove_tmp_entry("next").outcome is Outcome.REMOVED
    assert trash_of(store) == []


def test_a_folder_with_a_file_open_without_share_delete_stays_whole_for_the_next_pass(
    store: Path, ntfs: NtfsRules
) -> None:
    entry = store / "result-tmp" / "busy"
    entry.mkdir()
    names = [f"f{i}" for i in range(10)]
    for name in names:
        (entry / name).write_text(name)
    ntfs.hold(entry / "f5")  # open without FILE_SHARE_DELETE: the folder cannot be renamed either
    slept: list[float] = []
    result = StoreCleaner(store, sleep=slept.append).remove_tmp_entry("busy")
    # Never half-deleted in place: OBuilder (or the next pass) finds it as it was.
    assert sorted(os.listdir(entry)) == names
    assert result.outcome is Outcome.FAILED
    assert "left whole for the next pass" in result.message
    assert slept == list(platform.SHARING_BACKOFF), "retried briefly, then gave up"
    ntfs.release(entry / "f5")
    assert StoreCleaner(store).remove_tmp_entry("busy").outcome is Outcome.REMOVED
    assert not os.path.lexists(entry)


def test_a_trash_folder_that_is_a_link_out_of_the_store_is_never_emptied(store: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep me")
    trash = store.joinpath(*TRASH_DIR)
    trash.parent.mkdir(parents=True)
    os.symlink(precious, trash)
    entry = store / "result-tmp" / "x"
    entry.mkdir()
    (entry / "f").write_text("f")
    cleaner = StoreCleaner(store)
    assert cleaner.remove_tmp_entry("x").outcome is Outcome.REMOVED
    assert cleaner.empty_trash() == {}
    assert (precious / "data").read_text() == "keep me"
    assert os.listdir(precious) == ["data"]
    assert not os.path.lexists(entry)


def test_links_inside_an_entry_are_removed_as_links(store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "deep" / "f").write_text("keep")
    entry = store / "cache-tmp" / "c"
    (entry / "sub").mkdir(parents=True)
    os.symlink(outside, entry / "sub" / "to-outside")
    os.symlink(outside / "deep" / "f", entry / "file-link")
    assert StoreCleaner(store).remove_cache_tmp("c").outcome is Outcome.REMOVED
    assert (outside / "deep" / "f").read_text() == "keep"
    assert trash_of(store) == []


def test_an_entry_that_is_gone_is_not_found_and_names_are_checked(store: Path) -> None:
    cleaner = StoreCleaner(store)
    assert cleaner.remove_tmp_entry("never").outcome is Outcome.NOT_FOUND
    assert cleaner.remove_tmp_entry("../state").outcome is Outcome.FAILED
    assert os.path.isdir(store / "state")


def test_a_deep_tree_is_removed_without_recursion(store: Path) -> None:
    entry = store / "result-tmp" / "deep"
    folder = str(entry)
    os.mkdir(folder)
    for _ in range(1200):  # deeper than Python's recursion limit would allow one frame each
        folder += "/d"
        os.mkdir(folder)
    Path(folder, "f").write_text("f")
    assert StoreCleaner(store).remove_tmp_entry("deep").outcome is Outcome.REMOVED
    assert not os.path.lexists(entry)


def test_a_store_whose_state_folder_is_on_another_volume_deletes_in_place(store: Path) -> None:
    entry = store / "cache-tmp" / "c"
    (entry / "sub").mkdir(parents=True)
    (entry / "sub" / "f").write_text("f")

    class OtherVolume(platform.FileOps):
        def rename(self, src: str, dst: str) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link", src)

    assert StoreCleaner(store, ops=OtherVolume()).remove_cache_tmp("c").outcome is Outcome.REMOVED
    assert not os.path.lexists(entry)
    assert trash_of(store) == []


def test_only_a_held_file_is_retried(tmp_path: Path) -> None:
    tries: list[str] = []

    def refuse() -> None:
        tries.append("x")
        raise _winerror(5, "Access is denied", "f")

    slept: list[float] = []
    with pytest.raises(PermissionError):
        platform.retry_while_held(refuse, sleep=slept.append)
    assert (tries, slept) == (["x"], [])
    with pytest.raises(PermissionError):
        platform.retry_while_held(refuse, codes=frozenset({5}), sleep=slept.append)
    assert len(tries) == 1 + len(platform.SHARING_BACKOFF) + 1
    assert sum(slept) < 2, "bounded: a held file costs at most about 1.5 s"


# -- paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "extended"),
    [
        ("C:\\obuilder\\result-tmp\\abc", "\\\\?\\C:\\obuilder\\result-tmp\\abc"),
        ("C:/obuilder/result-tmp/abc", "\\\\?\\C:\\obuilder\\result-tmp\\abc"),
        ("C:\\obuilder\\result\\..\\result-tmp\\.\\abc", "\\\\?\\C:\\obuilder\\result-tmp\\abc"),
        ("\\\\server\\share\\obuilder\\x", "\\\\?\\UNC\\server\\share\\obuilder\\x"),
        ("\\\\?\\C:\\already", "\\\\?\\C:\\already"),
        ("\\\\?\\UNC\\server\\share", "\\\\?\\UNC\\server\\share"),
        ("\\\\.\\pipe\\containerd-containerd", "\\\\.\\pipe\\containerd-containerd"),
    ],
)
def test_extended_length_paths(path: str, extended: str) -> None:
    assert platform.extended_path(path) == extended


@pytest.mark.parametrize("path", ["relative\\x", "\\no-drive\\x"])
def test_an_extended_path_needs_a_drive_or_server(path: str) -> None:
    with pytest.raises(ValueError, match="not an absolute path"):
        platform.extended_path(path)


def test_on_windows_every_removal_call_gets_the_extended_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """remove_tree on a Windows-shaped tree deeper than MAX_PATH: every call carries \\\\?\\."""
    monkeypatch.setattr(platform, "IS_WINDOWS", True)
    monkeypatch.setattr(os.path, "join", ntpath.join)
    monkeypatch.setattr(os.path, "dirname", ntpath.dirname)
    top = "C:\\obuilder\\state\\obuilder-reconcile\\trash\\result-tmp-x-1"
    deep = top + "".join(f"\\{'d' * 40}{i}" for i in range(8))  # over 260 characters
    tree = {top: "dir", deep: "dir", deep + "\\f.txt": "file"}
    for i in range(1, 8):
        tree[top + "".join(f"\\{'d' * 40}{j}" for j in range(i))] = "dir"
    seen: list[str] = []

    class Fake(platform.FileOps):
        def lstat(self, path: str) -> os.stat_result:
            seen.append(path)
            kind = tree.get(path.removeprefix("\\\\?\\"))
            if kind is None:
                raise FileNotFoundError(path)
            mode = stat.S_IFDIR | 0o755 if kind == "dir" else stat.S_IFREG | 0o644
            return os.stat_result((mode, 0, 0, 1, 0, 0, 0, 0, 0, 0))

        def entries(self, path: str) -> list[tuple[str, platform.EntryKind]]:
            seen.append(path)
            inner = path.removeprefix("\\\\?\\")
            return [
                (p[len(inner) + 1 :], "dir" if kind == "dir" else "file")
                for p, kind in tree.items()
                if ntpath.dirname(p) == inner
            ]

        def unlink(self, path: str) -> None:
            seen.append(path)
            del tree[path.removeprefix("\\\\?\\")]

        def rmdir(self, path: str) -> None:
            seen.append(path)
            del tree[path.removeprefix("\\\\?\\")]

    assert len(deep) > 260
    platform.remove_tree(top, ops=Fake())
    assert tree == {}
    assert seen and all(p.startswith("\\\\?\\C:\\obuilder\\") for p in seen)


# -- shared reads ---------------------------------------------------------------------


def test_open_shared_reads_on_posix(tmp_path: Path) -> None:
    (tmp_path / "layerinfo").write_bytes(b"((snapshot_key k))")
    with platform.open_shared(tmp_path / "layerinfo") as f:
        assert f.read() == b"((snapshot_key k))"
    with pytest.raises(FileNotFoundError):
        platform.open_shared(tmp_path / "missing")


def test_open_shared_on_windows_lets_others_delete_and_rename(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = tmp_path / "layerinfo"
    real.write_bytes(b"data")
    calls: list[tuple[Any, ...]] = []

    class Kernel32:
        def CreateFileW(self, *args: Any) -> int:
            calls.append(args)
            return 4242 if args[0] == "\\\\?\\C:\\obuilder\\result\\x\\layerinfo" else platform._INVALID_HANDLE

        def CloseHandle(self, handle: int) -> None:
            calls.append(("close", handle))

    def no_such_file() -> OSError:
        e = FileNotFoundError(errno.ENOENT, "The system cannot find the file specified")
        setattr(e, "winerror", 2)  # noqa: B010
        return e

    monkeypatch.setattr(platform, "IS_WINDOWS", True)
    monkeypatch.setattr(platform, "_kernel32", Kernel32)
    monkeypatch.setattr(platform, "_win_error", no_such_file)
    monkeypatch.setattr(platform, "_open_osfhandle", lambda handle: os.open(real, os.O_RDONLY))
    with platform.open_shared("C:\\obuilder\\result\\x\\layerinfo") as f:
        assert f.read() == b"data"
    access, share, creation = calls[0][1], calls[0][2], calls[0][4]
    assert access == platform.GENERIC_READ and creation == platform.OPEN_EXISTING
    assert share == platform.FILE_SHARE_READ | platform.FILE_SHARE_WRITE | platform.FILE_SHARE_DELETE
    with pytest.raises(FileNotFoundError) as caught:
        platform.open_shared("C:\\obuilder\\result\\gone\\layerinfo")
    assert caught.value.filename == "C:\\obuilder\\result\\gone\\layerinfo"


# -- the status file ------------------------------------------------------------------


def _report() -> PassReport:
    return PassReport(number=1, mode=Mode.DAEMON, time=datetime.now(UTC), seconds=0.5, removed={"snapshot": 3})


def test_the_status_file_replace_is_retried_while_a_reader_holds_it(tmp_path: Path, ntfs: NtfsRules) -> None:
    path = tmp_path / "state" / "status.json"
    report = _report()
    write_status(path, report)
    ntfs.hold(path, 2)  # a boot script reads it with a plain open() twice in a row
    write_status(path, report)
    assert read_status(path) == report
    assert ntfs.refused == [str(path), str(path)]
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]


def test_the_status_file_gives_up_after_the_backoff_and_leaves_no_sibling(tmp_path: Path, ntfs: NtfsRules) -> None:
    path = tmp_path / "state" / "status.json"
    report = _report()
    write_status(path, report)
    ntfs.hold(path)
    with pytest.raises(PermissionError):
        write_status(path, report)
    assert len(ntfs.refused) == len(platform.SHARING_BACKOFF) + 1
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]


def test_a_status_file_names_a_hundred_missing_results_and_counts_them_all(tmp_path: Path) -> None:
    # 50,000 results whose snapshots are gone made a 3.7 MB file, encoded after every pass.
    missing = tuple(f"{i:064x}" for i in range(50_000))
    drift = {"results_missing_snapshot": 50_000, "db_rows_without_result": 1, "results_without_row": 0}
    report = _report().model_copy(
        update={"drift": drift, "store_drift": StoreDrift(results_missing_snapshot=missing, rows_without_result=("7",))}
    )
    path = tmp_path / "state" / "status.json"
    write_status(path, report)
    assert path.stat().st_size < 20_000
    written = json.loads(path.read_text())["store_drift"]
    assert written["results_missing_snapshot"] == list(missing[:100])
    assert written["results_missing_snapshot_total"] == 50_000
    assert (written["rows_without_result"], written["rows_without_result_total"]) == (["7"], 1)
    assert (written["results_without_row"], written["results_without_row_total"]) == ([], 0)
    back = read_status(path)
    assert back.drift == drift
    assert back.store_drift == StoreDrift(results_missing_snapshot=missing[:100], rows_without_result=("7",))
    assert back.model_copy(update={"store_drift": report.store_drift}) == report


def test_a_status_file_written_before_the_cap_still_reads(tmp_path: Path) -> None:
    report = _report().model_copy(update={"store_drift": StoreDrift(results_missing_snapshot=("a", "b"))})
    path = tmp_path / "status.json"
    path.write_text(report.model_dump_json(indent=2))
    assert read_status(path) == report


def test_the_store_reads_layerinfo_files_shared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A plain open() on Windows would make OBuilder's rename of result-tmp/ID to result/ID fail
    # while we read: every layerinfo read goes through the seam's shared open.
    from controller.adapters.store import read_layerinfo
    from tests.support.world import layerinfo_text

    path = tmp_path / "layerinfo"
    path.write_text(layerinfo_text("obuilder-x", "C:\\s\\1", []))
    opened: list[str] = []
    real = platform.open_shared

    def recording(p: str | os.PathLike[str]) -> Any:
        opened.append(os.fspath(p))
        return real(p)

    monkeypatch.setattr(platform, "open_shared", recording)
    assert read_layerinfo(path).snapshot_key == "obuilder-x"
    assert opened == [str(path)]


def test_remove_tree_never_enters_a_mounted_folder(tmp_path: Path) -> None:
    # A bind mount of the same file system has the same device: only the kernel's table
    # (octal-escaped, hence the blank in the name) says it shows a folder from elsewhere.
    import subprocess

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    entry = tmp_path / "trash" / "entry"
    inner = entry / "a mount"
    inner.mkdir(parents=True)
    (entry / "plain").write_text("goes")
    subprocess.run(["mount", "--bind", str(outside), str(inner)], check=True)
    try:
        assert platform.mounts_inside(str(entry)) == [str(inner)]
        with pytest.raises(OSError) as raised:
            platform.remove_tree(str(entry))
        assert raised.value.errno == errno.EBUSY and "not crossed" in str(raised.value)
        assert (outside / "precious").read_text() == "keep me"
        assert not (entry / "plain").exists()
    finally:
        subprocess.run(["umount", str(inner)], check=False)
