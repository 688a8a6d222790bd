"""The one seam between the controller and the operating system it runs on.

Everything that differs between Windows (the real target: named pipes, ``ctr.exe``,
the ``windows`` snapshotter, junctions, ``msvcrt`` locks) and POSIX (where the tests
run) lives here, so the rest of the package never asks which one it is on.
"""

from __future__ import annotations

import errno
import ntpath
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import IO, Any, BinaryIO, Literal, Protocol, TypeVar

IS_WINDOWS = sys.platform == "win32"
_T = TypeVar("_T")

#: containerd's own per-platform defaults (``defaults/defaults_*.go``).
DEFAULT_ADDRESS = r"\\.\pipe\containerd-containerd" if IS_WINDOWS else "/run/containerd/containerd.sock"
DEFAULT_SNAPSHOTTER = "windows" if IS_WINDOWS else "overlayfs"
DEFAULT_CTR = "ctr.exe" if IS_WINDOWS else "ctr"
#: containerd's own default namespace.
DEFAULT_NAMESPACE = "default"

#: Longest command line we build for one ctr call. Windows' CreateProcess caps a
#: command line at 32,767 characters; Linux allows far more, but a few hundred keys
#: per call already amortise the process start.
MAX_COMMAND_CHARS = 30_000 if IS_WINDOWS else 120_000

_FILE_ATTRIBUTE_REPARSE_POINT = 0x400


def is_link(st: os.stat_result) -> bool:
    """A symlink, or on Windows any reparse point (junctions included): never followed."""
    if stat.S_ISLNK(st.st_mode):
        return True
    return bool(getattr(st, "st_file_attributes", 0) & _FILE_ATTRIBUTE_REPARSE_POINT)


class ListedStamps(Protocol):
    """The part of an ``os.stat_result`` a listing's identity is made of (Windows adds
    ``st_file_attributes``)."""

    @property
    def st_mtime_ns(self) -> int: ...

    @property
    def st_ctime_ns(self) -> int: ...


class ListedEntry(Protocol):
    """What a folder's listing gives per entry (``os.DirEntry``)."""

    @property
    def name(self) -> str: ...

    def inode(self) -> int: ...

    def is_dir(self, *, follow_symlinks: bool = True) -> bool: ...

    def stat(self, *, follow_symlinks: bool = True) -> ListedStamps: ...


#: An entry's identity as its folder's listing gives it (see :func:`listed_identities`).
Identity = tuple[int, ...]


def posix_identities(entries: Iterable[ListedEntry]) -> list[tuple[str, Identity]]:
    """Each entry's name with its inode number and whether it is a folder: what readdir
    returns (d_ino, d_type), so no call per entry. The os.DirEntry docs: ``inode()`` needs
    no system call on Unix; ``is_dir()`` none for a non-symlink "except on certain Unix
    file systems, such as network file systems, that return dirent.d_type == DT_UNKNOWN"
    (there it lstats: still right, only slower), and none for a symlink with
    ``follow_symlinks=False``."""
    return [(e.name, (e.inode(), e.is_dir(follow_symlinks=False))) for e in entries]


def windows_identities(entries: Iterable[ListedEntry]) -> list[tuple[str, Identity]]:
    """Each entry's name with its mtime, creation time (``st_ctime_ns`` on Windows) and
    attributes: what FindNextFile returns for it. The os.DirEntry docs: ``stat()`` "only requires a system call if
    follow_symlinks is True and the entry is a reparse point", but ``inode()`` needs one on
    Windows (and the listing's ``st_ino`` "is always set to zero"). A folder deleted and made
    again has a new creation time (tunnelling aside: within 15 s NTFS may give a name its
    old one back) and a new mtime once anything is written in it."""
    out: list[tuple[str, Identity]] = []
    for e in entries:
        st = e.stat(follow_symlinks=False)
        # Creation time: st_birthtime_ns from Python 3.12 (st_ctime_ns is deprecated as creation
        # time there, and read 0 from a listing on 3.12.0-3.12.2: CPython gh-117267), st_ctime_ns before.
        born = getattr(st, "st_birthtime_ns", None) or st.st_ctime_ns
        out.append((e.name, (st.st_mtime_ns, born, getattr(st, "st_file_attributes", 0))))
    return out


#: A folder's entries, each named with what tells a changed entry from the one listed last
#: time at no cost beyond the listing itself; not a full stamp (a folder rebuilt in place may
#: come back with the same identity: a verification's lstat is what catches that).
listed_identities: Callable[[Iterable[ListedEntry]], list[tuple[str, Identity]]] = (
    windows_identities if IS_WINDOWS else posix_identities
)


def try_lock(handle: IO[bytes]) -> bool:
    """Take an exclusive, non-blocking lock on an open file; False if someone holds it."""
    if IS_WINDOWS:
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,unused-ignore]
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


# -- Is the worker running? Yes, no, or cannot tell ----------------------------------------


class WorkerAnswer(Enum):
    RUNNING = "running"
    NOT_RUNNING = "not running"
    CANNOT_TELL = "cannot tell"


@dataclass(frozen=True)
class WorkerSighting:
    """The answer to "is the worker running?". Boot semantics (every ``obuilder-run-*`` task and
    ``result-tmp/`` entry is dead) are right only on a clear no: "cannot tell" counts as yes."""

    answer: WorkerAnswer
    #: Running: what was seen (``process ocluster-worker (pid 4242)``); not running: what was asked;
    #: cannot tell: why not.
    detail: str

    @property
    def may_be_running(self) -> bool:
        return self.answer is not WorkerAnswer.NOT_RUNNING


class CannotTell(Exception):
    """Raised by :func:`running_processes` when the listing cannot be trusted; the message says why."""


#: The longest a process listing or a service manager's answer may take before the answer is
#: "cannot tell" (a hung listing must not hang the boot pass, nor be read as "no worker").
LISTING_TIMEOUT = 30.0


def _within(timeout: float, what: str, action: Callable[[], _T]) -> _T:
    """``action()`` in a thread of its own (its errors raised here); :class:`CannotTell` once
    ``timeout`` seconds have passed without an answer (the thread is left to end by itself)."""
    box: list[tuple[_T] | BaseException] = []

    def run() -> None:
        try:
            box.append((action(),))
        except BaseException as e:  # handed to the caller's thread
            box.append(e)

    thread = threading.Thread(target=run, name=what, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise CannotTell(f"{what} took longer than {timeout:g}s")
    (outcome,) = box
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome[0]


def running_processes(*, timeout: float = LISTING_TIMEOUT) -> dict[str, list[int]]:
    """The executable names of running processes (lower-case, without ``.exe``), each with its pids.

    Executable names only, never command lines: containerd shims carry ``obuilder-run-N`` in
    their arguments and must not look like a worker. A process that ends, or whose name we may
    not read, while the listing runs is skipped; a listing that fails, takes longer than
    ``timeout`` or names no process at all (we ourselves run) raises :class:`CannotTell`."""
    try:
        names, pids = _within(timeout, "listing processes", _list_processes)
    except CannotTell:
        raise
    except Exception as e:
        raise CannotTell(f"listing processes failed: {type(e).__name__}: {e}") from e
    if not names:
        raise CannotTell("the process listing named no process at all, not even this one")
    if os.getpid() not in pids:
        raise CannotTell(f"the process listing does not show this process (pid {os.getpid()}): it is not all of them")
    return names


def _list_processes() -> tuple[dict[str, list[int]], set[int]]:
    import psutil

    names: dict[str, list[int]] = {}
    pids: set[int] = set()
    # psutil reads each attribute itself: one a process may not read (AccessDenied, a zombie's)
    # comes back None, and a process that ends meanwhile is left out; only a failure of the
    # listing itself raises.
    for proc in psutil.process_iter(["name", "exe"]):
        info = proc.info
        # The executable's file name where we may read it; else the process name (Linux: /proc's
        # comm, the same name cut to 15 characters, which the match allows for).
        exe, name = info.get("exe"), info.get("name")
        shown = (ntpath.basename(exe) if IS_WINDOWS else os.path.basename(exe)) if exe else name
        if not shown:
            continue
        names.setdefault(_exe_name(shown), []).append(proc.pid)
        pids.add(proc.pid)
    return names, pids


def _exe_name(name: str) -> str:
    name = name.strip().lower()
    if name.endswith(" (deleted)"):
        name = name[: -len(" (deleted)")]
    return name[:-4] if name.endswith(".exe") else name


def find_running(wanted: tuple[str, ...], *, timeout: float = LISTING_TIMEOUT) -> list[str]:
    """Which of the wanted executable names have a running process, each with its pids
    (``ocluster-worker (pid 4242)``). Raises :class:`CannotTell`."""
    running = running_processes(timeout=timeout)
    found = []
    for name in wanted:
        w = _exe_name(name)
        # /proc/PID/comm keeps only 15 characters of a longer name.
        pids = running.get(w) or (running.get(w[:15]) if len(w) > 15 else None)
        if pids:
            found.append(f"{name} (pid {', '.join(map(str, sorted(pids)))})")
    return found


def find_worker(
    process_names: tuple[str, ...], service_name: str | None = None, *, timeout: float = LISTING_TIMEOUT
) -> WorkerSighting:
    """Is the worker running? Yes (and what runs), no, or cannot tell (and why).

    On Windows, with the worker's service named (``spec.worker.serviceName``), the service
    manager answers, and it is exact: stopped is no, any other state yes (a stopping worker may
    still run builds), a query that fails "cannot tell". A worker process listed while the
    service is stopped (one started by hand) is still a yes. Without a service name, and
    elsewhere than Windows, the process listing answers."""
    if service_name and IS_WINDOWS:
        return _ask_the_service_manager(service_name, process_names, timeout)
    try:
        running = find_running(process_names, timeout=timeout)
    except CannotTell as e:
        return WorkerSighting(WorkerAnswer.CANNOT_TELL, str(e))
    if running:
        return WorkerSighting(WorkerAnswer.RUNNING, "process " + "; process ".join(running))
    return WorkerSighting(WorkerAnswer.NOT_RUNNING, f"no process named {', '.join(process_names)}")


def _ask_the_service_manager(name: str, process_names: tuple[str, ...], timeout: float) -> WorkerSighting:
    from controller.adapters import winservices_query as scm

    try:
        status = _within(timeout, "asking the service manager", lambda: scm.query_service(name))
    except (scm.ServiceQueryError, CannotTell) as e:
        return WorkerSighting(WorkerAnswer.CANNOT_TELL, f"the service manager did not answer for service {name!r}: {e}")
    except Exception as e:  # whatever it is, it is not an answer
        return WorkerSighting(
            WorkerAnswer.CANNOT_TELL,
            f"asking the service manager about service {name!r} failed: {type(e).__name__}: {e}",
        )
    said = f"service {name!r} is {status.state_name}"
    if status.state in scm.MAY_RUN_STATES:
        pid = f" (pid {status.process_id})" if status.process_id else ""
        return WorkerSighting(WorkerAnswer.RUNNING, said + pid)
    if status.state != scm.SERVICE_STOPPED:
        return WorkerSighting(WorkerAnswer.CANNOT_TELL, said)
    # Stopped: the service manager is trusted, but a worker started by hand still runs builds.
    try:
        running = find_running(process_names, timeout=timeout)
    except CannotTell as e:
        return WorkerSighting(WorkerAnswer.NOT_RUNNING, f"{said} (the process listing could not add to it: {e})")
    if running:
        return WorkerSighting(WorkerAnswer.RUNNING, f"{said}, but process {'; process '.join(running)} runs")
    return WorkerSighting(WorkerAnswer.NOT_RUNNING, f"{said}, and no process named {', '.join(process_names)} runs")


async def signals() -> AsyncIterator[Literal["reload", "stop"]]:
    """The daemon's signals: SIGHUP reloads; SIGTERM, SIGINT (and Windows' Ctrl-Break) stop."""
    if IS_WINDOWS:
        # asyncio on Windows has no add_signal_handler: take the signal in the main
        # thread and hand it to the loop thread-safely. Service managers stop a
        # console program with Ctrl-C or Ctrl-Break.
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Literal["stop"]] = asyncio.Queue()

        def handler(signum: int, frame: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, "stop")

        for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), handler)
        while True:
            yield await queue.get()
    else:
        import anyio

        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                yield "reload" if signum == signal.SIGHUP else "stop"


# -- Processes and consoles: stopping ---------------------------------------------------

#: Windows' CREATE_NEW_PROCESS_GROUP (``subprocess`` defines it only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200


#: Windows' CREATE_NO_WINDOW: a console program started without a console of its own.
CREATE_NO_WINDOW = 0x08000000

#: Whether this process has no console (a service, ``pythonw``, detached); asked once.
_no_console: bool | None = None


def _has_no_console() -> bool:
    """Windows: whether this process has no console window (``GetConsoleWindow() == 0``).
    Asked once; when it cannot be asked, the process is taken to have one (no flag added)."""
    global _no_console
    if _no_console is None:
        try:
            import ctypes

            _no_console = ctypes.windll.kernel32.GetConsoleWindow() == 0  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):
            _no_console = False
    return bool(_no_console)


def child_process_options() -> dict[str, Any]:
    """``subprocess`` options for a ctr child: its own process group, so a console's Ctrl-C or
    Ctrl-Break (a terminal's SIGINT on POSIX) reaches us, not the ctr call under way, which
    then finishes as a stop promises. Windows disables Ctrl-C in a new group; Ctrl-Break
    goes to the group it is sent to. A process without a console (a service) starts each
    child with CREATE_NO_WINDOW too: else Windows gives every ctr call a (hidden) console of
    its own, a conhost.exe each."""
    if IS_WINDOWS:
        flags = CREATE_NEW_PROCESS_GROUP | (CREATE_NO_WINDOW if _has_no_console() else 0)
        return {"creationflags": flags}
    return {"process_group": 0}


def on_console_stop(stop: Callable[[], None]) -> None:
    """Call ``stop`` on Ctrl-C, Ctrl-Break (Windows) or SIGTERM. From the main thread only
    (Python's rule for signal handlers); ``stop`` must only set a flag."""

    def handler(signum: int, frame: object) -> None:
        stop()

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)


def machine_state_dir() -> str:
    """The machine's folder for the service's own state, outside any store (which may be unmounted)."""
    if IS_WINDOWS:
        return ntpath.join(os.environ.get("PROGRAMDATA") or r"C:\ProgramData", "obuilder-reconcile")
    return "/var/lib/obuilder-reconcile"


def has_service_manager() -> bool:
    """Whether ``reconcile service`` is hosted by a service manager we speak to (Windows'
    service control manager, through pywin32); elsewhere it runs in the console."""
    return IS_WINDOWS


# -- Files on NTFS: deletion, shared reads, replacing ---------------------------------
#
# On Windows a file another process holds open fails our unlink, rename or replace
# with a sharing violation until it is closed (antivirus, the indexer, a reader of the
# status file); OBuilder's robocopied caches keep the read-only attribute, which stops
# DeleteFile; and paths past MAX_PATH (260) need the extended-length form. POSIX has
# none of these, so the same code is a plain walk there, and tests drive the Windows
# branches through a FileOps whose calls fail as Windows' would.

#: ERROR_SHARING_VIOLATION, ERROR_LOCK_VIOLATION: another process has the file open.
SHARING_VIOLATIONS = frozenset({32, 33})
#: ERROR_ACCESS_DENIED: also what renaming or replacing over an open file gives.
ACCESS_DENIED = 5
#: ERROR_DIR_NOT_EMPTY: a folder whose deleted file another process still holds (it is
#: "delete pending" until closed).
DIR_NOT_EMPTY = 145
#: How long to wait between tries while a file is held: a scanner or a reader lets go in
#: well under a second; past about 1.5 s in all, the caller gives up and retries next pass.
SHARING_BACKOFF = (0.05, 0.1, 0.2, 0.4, 0.8)

_FILE_ATTRIBUTE_DIRECTORY = 0x10


def extended_path(path: str) -> str:
    r"""The extended-length form of an absolute Windows path (``\\?\C:\...``, ``\\?\UNC\server\share\...``).

    Windows then skips its MAX_PATH limit and its path normalisation, so the path must
    already be absolute and normal; device paths (``\\.\``) are left as they are."""
    if path.startswith(("\\\\?\\", "\\\\.\\")):
        return path
    normal = ntpath.normpath(path)
    if normal.startswith("\\\\"):
        return "\\\\?\\UNC\\" + normal[2:]
    if not ntpath.isabs(normal) or not ntpath.splitdrive(normal)[0]:
        raise ValueError(f"{path!r} is not an absolute path with a drive or server")
    return "\\\\?\\" + normal


def long_path(path: str) -> str:
    """A path the OS accepts whatever its length: the extended-length form on Windows."""
    return extended_path(ntpath.abspath(path)) if IS_WINDOWS else path


def is_sharing_violation(error: OSError, codes: frozenset[int] = SHARING_VIOLATIONS) -> bool:
    """Whether an error says another process holds the file (Windows only; never on POSIX)."""
    return getattr(error, "winerror", None) in codes


def retry_while_held(
    action: Callable[[], _T],
    *,
    codes: frozenset[int] = SHARING_VIOLATIONS,
    sleep: Callable[[float], None] = time.sleep,
    backoff: tuple[float, ...] = SHARING_BACKOFF,
) -> _T:
    """Run ``action``, trying again after each backoff step while it fails because a file is held."""
    for delay in backoff:
        try:
            return action()
        except OSError as e:
            if not is_sharing_violation(e, codes):
                raise
            sleep(delay)
    return action()


class FileOps:
    """The file-system calls removal and replacing make, one method each so a test can
    make them fail as Windows' would (a held file, the read-only attribute)."""

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def entries(self, path: str) -> list[tuple[str, EntryKind]]:
        """A folder's entries and what each is, from the listing itself: Windows' listing
        carries every entry's attributes, POSIX's its type, so no call per entry."""
        out: list[tuple[str, EntryKind]] = []
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if IS_WINDOWS:
                        kind = entry_kind(entry.stat(follow_symlinks=False))
                    elif entry.is_symlink():
                        kind = "link"
                    else:
                        kind = "dir" if entry.is_dir(follow_symlinks=False) else "file"
                except FileNotFoundError:
                    continue
                out.append((entry.name, kind))
        return out

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(path, mode)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)


#: What an entry is, for removing it: a link to a folder (Windows: a junction or directory
#: symlink) is removed with rmdir, any other link with unlink; neither is followed.
EntryKind = Literal["file", "dir", "link", "dirlink"]


def entry_kind(st: os.stat_result) -> EntryKind:
    if is_link(st):
        dir_link = IS_WINDOWS and bool(getattr(st, "st_file_attributes", 0) & _FILE_ATTRIBUTE_DIRECTORY)
        return "dirlink" if dir_link else "link"
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


def _writable(ops: FileOps, path: str) -> None:
    """Clear the read-only attribute (Windows) or add the owner's write bit (POSIX)."""
    try:
        mode = ops.lstat(path).st_mode
        ops.chmod(path, stat.S_IMODE(mode) | stat.S_IWRITE | (stat.S_IXUSR if stat.S_ISDIR(mode) else 0))
    except FileNotFoundError:
        pass


def _remove_one(ops: FileOps, path: str, kind: EntryKind, top: str, sleep: Callable[[float], None]) -> None:
    """Remove one file, link or (empty) directory: retried while held, and once more after
    making it and its folder writable when refused."""
    codes = SHARING_VIOLATIONS
    action: Callable[[str], None] = ops.unlink
    if kind == "dir":
        action, codes = ops.rmdir, SHARING_VIOLATIONS | {DIR_NOT_EMPTY}
    elif kind == "dirlink":
        action = ops.rmdir
    try:
        retry_while_held(lambda: action(path), codes=codes, sleep=sleep)
    except FileNotFoundError:
        return
    except PermissionError as e:
        if is_sharing_violation(e):
            raise
        # Windows: the read-only attribute (files, and folders for rmdir); POSIX: a folder
        # without write permission. Never the permissions of anything outside the tree.
        if kind in ("file", "dir"):
            _writable(ops, path)
        parent = os.path.dirname(path)
        if path != top and parent.startswith(top):
            _writable(ops, parent)
        try:
            retry_while_held(lambda: action(path), codes=codes, sleep=sleep)
        except FileNotFoundError:
            return


def mount_points() -> frozenset[str] | None:
    """Where file systems are mounted (Linux: every bind mount too, from /proc/self/mountinfo).

    A bind mount of a folder of the same file system looks like a plain folder to stat
    (same device), so only the kernel's table tells it apart. On Windows a mounted folder
    is a reparse point, which :func:`is_link` already refuses to follow: nothing to add.
    None where the system keeps no such table (then a change of device is all we can see)."""
    if IS_WINDOWS:
        return frozenset()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # Field 5 is the mount point, with blanks, tabs, newlines and backslashes as octal escapes.
    return frozenset(_unescape_octal(line.split(" ")[4]) for line in lines if line.count(" ") >= 5)


def mounts_inside(path: str) -> list[str] | None:
    """File systems mounted at or below ``path``, shallowest first; None where unknown."""
    table = mount_points()
    if table is None:
        return None
    real = os.path.realpath(path)
    inside = real.rstrip(os.sep) + os.sep
    return sorted((m for m in table if m == real or m.startswith(inside)), key=len)


def _unescape_octal(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def remove_tree(path: str, *, ops: FileOps | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Delete a file, link or directory tree; links inside are removed as links, never followed.

    Read-only files and folders are made writable, a held file is retried briefly, paths
    may be longer than MAX_PATH. Entries that vanish meanwhile are fine. Everything that
    can go goes; then the first entry that could not raises its OSError."""
    ops = ops or FileOps()
    top = long_path(path)
    try:
        st = ops.lstat(top)
    except FileNotFoundError:
        return
    if entry_kind(st) != "dir":
        _remove_one(ops, top, entry_kind(st), top, sleep)
        return
    _TreeRemoval(path, top, ops, sleep).run()


class _TreeRemoval:
    """One tree's removal: children before their folder, iteratively (trees can be deeper than
    Python's recursion), the folders above anything that could not go kept."""

    def __init__(self, path: str, top: str, ops: FileOps, sleep: Callable[[float], None]) -> None:
        self.top, self.ops, self.sleep = top, ops, sleep
        self.first: OSError | None = None
        self.kept: set[str] = set()  # folders that keep a child that could not go
        # A mounted folder inside shows what lies elsewhere (outside the store, perhaps): it is
        # never entered, and it and the folders above it stay for a human to unmount.
        self.real_top = os.path.realpath(path)
        table = mounts_inside(path)
        self.mounted = None if table is None else set(table)

    def run(self) -> None:
        stack: list[tuple[str, bool]] = [(self.top, False)]
        while stack:
            folder, listed = stack.pop()
            if listed:
                if folder not in self.kept:
                    self.attempt(folder, "dir")
            elif self.is_mounted(folder):
                self.kept.add(folder)
                mounted = OSError(errno.EBUSY, "a file system is mounted here; not crossed: unmount it", folder)
                self.failed(folder, mounted)
            else:
                stack.append((folder, True))
                stack.extend(self.enter(folder))
        if self.first is not None:
            raise self.first

    def enter(self, folder: str) -> list[tuple[str, bool]]:
        """Remove what is not a folder in ``folder``; its folders, to enter next."""
        try:
            found = self.ops.entries(folder)
        except FileNotFoundError:
            return []
        except PermissionError:
            _writable(self.ops, folder)  # POSIX: a folder without read or search permission
            found = self.ops.entries(folder)
        folders = []
        for name, kind in found:
            child = os.path.join(folder, name)
            if kind == "dir":
                folders.append((child, False))
            else:
                self.attempt(child, kind)
        return folders

    def is_mounted(self, folder: str) -> bool:
        if self.mounted is None:
            return os.path.ismount(folder)
        inside = os.path.normpath(os.path.join(self.real_top, os.path.relpath(folder, self.top)))
        return bool(self.mounted) and inside in self.mounted

    def failed(self, target: str, error: OSError) -> None:
        """The first error is raised at the end; the folders above what failed stay."""
        self.first = self.first or error
        parent = os.path.dirname(target)
        while parent.startswith(self.top) and parent not in self.kept:
            self.kept.add(parent)
            parent = os.path.dirname(parent)

    def attempt(self, target: str, kind: EntryKind) -> None:
        try:
            _remove_one(self.ops, target, kind, self.top, self.sleep)
        except OSError as e:
            self.failed(target, e)


def rename_held(src: str, dst: str, *, ops: FileOps | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Rename within one volume, retried briefly while a file in it is held (Windows refuses to
    rename a folder with a file open inside, as access denied or a sharing violation)."""
    ops = ops or FileOps()
    codes = SHARING_VIOLATIONS | {ACCESS_DENIED}
    retry_while_held(lambda: ops.rename(long_path(src), long_path(dst)), codes=codes, sleep=sleep)


def replace_held(
    src: str, dst: str, *, ops: FileOps | None = None, sleep: Callable[[float], None] = time.sleep
) -> None:
    """``os.replace``, retried briefly while a reader holds ``dst`` (access denied or a sharing
    violation on Windows: a reader that did not open it with FILE_SHARE_DELETE)."""
    ops = ops or FileOps()
    codes = SHARING_VIOLATIONS | {ACCESS_DENIED}
    retry_while_held(lambda: ops.replace(long_path(src), long_path(dst)), codes=codes, sleep=sleep)


#: CreateFileW's arguments for a read that lets others read, write, delete and rename the
#: file meanwhile (Python's open() shares read and write only, not delete).
GENERIC_READ = 0x80000000
FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_SHARE_DELETE = 0x1, 0x2, 0x4
OPEN_EXISTING = 3
FILE_ATTRIBUTE_NORMAL = 0x80


def open_shared(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file to read it without stopping anyone renaming or deleting it meanwhile.

    OBuilder renames ``result-tmp/ID`` to ``result/ID`` and deletes entries while we read
    their layerinfo; on Windows a plain open() would make that rename fail."""
    if not IS_WINDOWS:
        return open(path, "rb")
    kernel32 = _kernel32()
    share = FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE
    shown = os.fspath(path)
    handle = kernel32.CreateFileW(
        long_path(shown), GENERIC_READ, share, None, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, None
    )
    if handle is None or handle in (0, _INVALID_HANDLE):
        error = _win_error()
        error.filename = shown
        raise error
    try:
        fd = _open_osfhandle(handle)
    except BaseException:
        kernel32.CloseHandle(handle)
        raise
    return os.fdopen(fd, "rb")


_INVALID_HANDLE = (1 << 64) - 1 if sys.maxsize > 2**32 else (1 << 32) - 1


_kernel32_loaded: Any = None


def _kernel32() -> Any:
    # Loaded once: a full store read opens thousands of layerinfo files.
    global _kernel32_loaded
    if _kernel32_loaded is not None:
        return _kernel32_loaded
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined,unused-ignore]
    kernel32.CreateFileW.argtypes = (
        ctypes.c_wchar_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
        ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
    )  # fmt: skip
    kernel32.CreateFileW.restype = ctypes.c_void_p
    kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
    _kernel32_loaded = kernel32
    return kernel32


def _win_error() -> OSError:
    import ctypes

    code = ctypes.get_last_error()  # type: ignore[attr-defined,unused-ignore]
    error: OSError = ctypes.WinError(code)  # type: ignore[attr-defined,unused-ignore]
    return error


def _open_osfhandle(handle: int) -> int:
    import msvcrt

    fd: int = msvcrt.open_osfhandle(handle, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # type: ignore[attr-defined,unused-ignore]
    return fd
