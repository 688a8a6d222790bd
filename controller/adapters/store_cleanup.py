"""Removing entries inside the store without ever leaving it, and never half-way in place.

An entry is first renamed into our own trash folder in the store
(``state/obuilder-reconcile/trash``, on the store's volume, where OBuilder never looks),
then deleted there. On Windows a file held open (antivirus, the indexer) stops a delete
half-way, and OBuilder must never find a half-deleted ``result-tmp/ID`` or ``cache-tmp``
entry: so either the rename fails and the entry stays whole for the next pass, or it
leaves at once and what cannot be deleted yet waits in the trash, which a later pass
empties first.

A link (symlink, or junction on Windows) is removed as a link, never followed; a path
that resolves outside the store root is refused.
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path

from controller.adapters import platform
from controller.adapters.disk import tree_bytes
from controller.adapters.lock import STATE_DIR
from controller.model.errors import UnsafePathError
from controller.model.outcome import Outcome, Result, TrashLeft

#: Our trash folder under the store root.
TRASH_DIR = (*STATE_DIR, "trash")


class StoreCleaner:
    """Removes ``result-tmp/`` and ``cache-tmp/`` entries through the trash.

    ``trash_retry`` is how often (seconds) a removal first tries again to empty the trash
    of what an earlier one could not delete; the first removal always does."""

    def __init__(
        self,
        root: Path,
        *,
        ops: platform.FileOps | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        trash_retry: float = 60.0,
    ) -> None:
        self.root = root.absolute()
        self.ops = ops or platform.FileOps()
        self.sleep = sleep
        self.clock = clock
        self.trash_retry = trash_retry
        self._trash_tried_at: float | None = None

    @property
    def trash(self) -> Path:
        return self.root.joinpath(*TRASH_DIR)

    def remove_tmp_entry(self, entry_id: str) -> Result:
        return self._remove("result-tmp", entry_id)

    def remove_cache_tmp(self, name: str) -> Result:
        return self._remove("cache-tmp", name)

    def empty_trash(self) -> dict[str, str]:
        """Delete what the trash holds; returns what is still there, each with its error."""
        self._trash_tried_at = self.clock()
        trash = self._safe_trash(create=False)
        if trash is None:
            return {}
        try:
            names = sorted(self.ops.listdir(platform.long_path(str(trash))))
        except FileNotFoundError:
            return {}
        left = {}
        for name in names:
            try:
                platform.remove_tree(str(trash / name), ops=self.ops, sleep=self.sleep)
            except OSError as e:
                left[name] = str(e)
        return left

    def leftovers(self) -> tuple[TrashLeft, ...]:
        """Try once more to empty the trash; what stays, with its bytes and the error."""
        left = self.empty_trash()
        paths = {name: str(self.trash / name) for name in left}
        return tuple(
            TrashLeft(name=name, path=paths[name], size_bytes=tree_bytes(paths[name]), error=error)
            for name, error in sorted(left.items())
        )

    def _remove(self, area: str, name: str) -> Result:
        try:
            path = self._inside(area, name)
            try:
                st = self.ops.lstat(platform.long_path(str(path)))
            except FileNotFoundError:
                return Result(Outcome.NOT_FOUND)
            mounted = platform.mounts_inside(str(path))
            if mounted:
                # What is mounted there lies elsewhere, perhaps outside the store: never entered.
                return Result(Outcome.FAILED, f"a file system is mounted at {mounted[0]} inside it; unmount it")
            if self._trash_tried_at is None or self.clock() - self._trash_tried_at >= self.trash_retry:
                self.empty_trash()
            trash = None if platform.is_link(st) else self._safe_trash(create=True)
            if trash is None:
                # A link goes in one step (nothing to half-delete); without a trash of our
                # own in the store, the entry is deleted where it is.
                platform.remove_tree(str(path), ops=self.ops, sleep=self.sleep)
                return Result(Outcome.REMOVED)
            return self._through_trash(path, trash, f"{area}-{name}")
        except (OSError, UnsafePathError) as e:
            return Result(Outcome.FAILED, str(e))

    def _through_trash(self, path: Path, trash: Path, label: str) -> Result:
        target = next(trash / f"{label}-{n}" for n in itertools.count(1) if not os.path.lexists(trash / f"{label}-{n}"))
        try:
            platform.rename_held(str(path), str(target), ops=self.ops, sleep=self.sleep)
        except FileNotFoundError:
            return Result(Outcome.NOT_FOUND)
        except OSError as e:
            if e.errno != errno.EXDEV:
                # Held (a file open inside without FILE_SHARE_DELETE): the entry is still
                # whole where it was, and the next pass tries again.
                return Result(Outcome.FAILED, f"cannot move {path} to the trash: {e}; left whole for the next pass")
            platform.remove_tree(str(path), ops=self.ops, sleep=self.sleep)
            return Result(Outcome.REMOVED)
        try:
            platform.remove_tree(str(target), ops=self.ops, sleep=self.sleep)
        except OSError as e:
            # Gone from the store as OBuilder sees it; its bytes wait in the trash.
            return Result(Outcome.REMOVED, f"moved to {target}, not deleted yet ({e}); a later pass retries")
        return Result(Outcome.REMOVED)

    def _safe_trash(self, *, create: bool) -> Path | None:
        """The trash folder, or None when it is not a real folder inside the store (never
        empty a folder a link leads to)."""
        trash = self.trash
        if create:
            trash.mkdir(parents=True, exist_ok=True)
        elif not os.path.lexists(trash):
            return None
        if trash.resolve() != self.root.resolve().joinpath(*TRASH_DIR):
            return None
        return trash

    def _inside(self, area: str, name: str) -> Path:
        if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
            raise UnsafePathError(f"{area}/{name!r} is not a plain entry name")
        folder = self.root / area
        # The area itself must be a real folder inside the root, or the entry
        # could be reached through a link to anywhere.
        if folder.resolve() != self.root.resolve() / area:
            raise UnsafePathError(f"{folder} leads outside the store {self.root}")
        return folder / name
