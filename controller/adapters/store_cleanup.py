"""Removing directories inside the store without ever leaving it.

A link (symlink, or junction on Windows) is removed as a link, never followed;
a path that resolves outside the store root is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from controller.adapters import platform
from controller.model.errors import UnsafePathError
from controller.model.outcome import Outcome, Result


class StoreCleaner:
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()

    def remove_tmp_entry(self, entry_id: str) -> Result:
        return self._remove("result-tmp", entry_id)

    def remove_cache_tmp(self, name: str) -> Result:
        return self._remove("cache-tmp", name)

    def _remove(self, area: str, name: str) -> Result:
        try:
            path = self._inside(area, name)
            try:
                st = path.lstat()
            except FileNotFoundError:
                return Result(Outcome.NOT_FOUND)
            if platform.is_link(st):
                platform.unlink_link(str(path))
            elif path.is_dir():
                # rmtree removes links inside the tree as links; it never follows them.
                shutil.rmtree(path)
            else:
                path.unlink()
        except (OSError, UnsafePathError) as e:
            return Result(Outcome.FAILED, str(e))
        return Result(Outcome.REMOVED)

    def _inside(self, area: str, name: str) -> Path:
        if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
            raise UnsafePathError(f"{area}/{name!r} is not a plain entry name")
        folder = self.root / area
        # The area itself must be a real folder inside the root, or the entry
        # could be reached through a link to anywhere.
        if folder.resolve() != self.root.resolve() / area:
            raise UnsafePathError(f"{folder} leads outside the store {self.root}")
        return folder / name
