"""The status file a boot script or a human reads: the last :class:`PassReport` as JSON.

The file is replaced atomically (write a sibling, flush to disk, rename over), so a
reader, or a crash at any instant, sees the old content or the new, never a torn file.
On Windows the rename fails while a reader holds the file without FILE_SHARE_DELETE, so
it is retried briefly, and our own reader opens it sharing delete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from controller.adapters import platform
from controller.core.ports import Reporter
from controller.model.outcome import PassReport

__all__ = ["StatusFile", "read_status", "write_status"]


def write_status(path: Path, status: PassReport, *, ops: platform.FileOps | None = None) -> None:
    """Replace ``path`` atomically with the status as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed mid-write leaves its temporary sibling; one run per store holds
    # the lock, so any such sibling is stale.
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)
    data = json.dumps(status.model_dump(mode="json"), indent=2).encode() + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        platform.replace_held(tmp, str(path), ops=ops)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(path: Path) -> PassReport:
    with platform.open_shared(path) as f:
        return PassReport.model_validate_json(f.read())


class StatusFile(Reporter):
    """Writes the status file after every pass."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pass_finished(self, report: PassReport) -> None:
        write_status(self.path, report)
