"""The one seam between the controller and the operating system it runs on.

Everything that differs between Windows (the real target: named pipes, ``ctr.exe``,
the ``windows`` snapshotter, junctions, ``msvcrt`` locks) and POSIX (where the tests
run) lives here, so the rest of the package never asks which one it is on.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from typing import IO, Literal

IS_WINDOWS = sys.platform == "win32"

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


def unlink_link(path: str) -> None:
    """Remove a link itself, never what it points to."""
    if IS_WINDOWS and os.path.isdir(path):
        os.rmdir(path)  # a directory junction or symlink: rmdir removes the link only
    else:
        os.unlink(path)


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


def running_executables() -> set[str]:
    """Names of the executables of running processes, lower-case, without ``.exe``.

    Executable names only, never command lines: containerd shims carry
    ``obuilder-run-N`` in their arguments and must not look like a worker.
    """
    names: set[str] = set()
    if IS_WINDOWS:
        import csv
        import io
        import subprocess

        out = subprocess.run(
            ["tasklist", "/FO", "CSV", "/NH"], capture_output=True, text=True, check=False, timeout=30
        ).stdout
        for row in csv.reader(io.StringIO(out)):
            if row:
                names.add(_exe_name(row[0]))
        return names
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return names
    for pid in pids:
        try:
            names.add(_exe_name(os.path.basename(os.readlink(f"/proc/{pid}/exe"))))
        except OSError:
            # Kernel threads and other users' processes hide their exe; comm
            # is the executable's name (cut to 15 characters by the kernel).
            try:
                with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                    names.add(_exe_name(f.read().strip()))
            except OSError:
                continue
    return names


def _exe_name(name: str) -> str:
    name = name.strip().lower()
    if name.endswith(" (deleted)"):
        name = name[: -len(" (deleted)")]
    return name[:-4] if name.endswith(".exe") else name


def find_running(wanted: tuple[str, ...]) -> list[str]:
    """Which of the wanted executable names have a running process."""
    running = running_executables()
    found = []
    for name in wanted:
        w = _exe_name(name)
        # /proc/PID/comm keeps only 15 characters of a longer name.
        if w in running or (len(w) > 15 and w[:15] in running):
            found.append(name)
    return found


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
