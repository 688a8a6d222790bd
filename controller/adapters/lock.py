"""One reconcile per store: an exclusive lock on a file under the store's ``state/``."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import IO

from controller.adapters import platform
from controller.model.errors import LockedError

#: Our own folder under the store's ``state/``: OBuilder never looks inside it.
STATE_DIR = ("state", "obuilder-reconcile")


def lock_path(root: Path) -> Path:
    return root.joinpath(*STATE_DIR, "lock")


class StoreLock:
    """Held for the life of a run; released by the OS even if the process is killed."""

    def __init__(self, root: Path) -> None:
        self.path = lock_path(root)
        self._handle: IO[bytes] | None = None

    def __enter__(self) -> StoreLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+b")
        if not platform.try_lock(handle):
            handle.close()
            raise LockedError(f"another reconcile holds {self.path}; refusing to run two on one store")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._handle = handle
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
