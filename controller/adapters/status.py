"""The status file a boot script or a human reads: the last :class:`PassReport` as JSON.

The file is replaced atomically (write a sibling, flush to disk, rename over), so a
reader, or a crash at any instant, sees the old content or the new, never a torn file.
On Windows the rename fails while a reader holds the file without FILE_SHARE_DELETE, so
it is retried briefly, and our own reader opens it sharing delete.

The store drift's id lists are written capped at :data:`STATUS_IDS` ids each, with the full
count beside each list (``results_missing_snapshot_total``...): at 50,000 results a store
whose snapshots are gone has 50,000 such ids, and encoding them after every pass cost more
than the rest of the report. The counts are what a script or an alert reads (they are also
in ``drift``); ``--once --json`` writes the whole lists (its ``drift``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from controller.adapters import platform
from controller.core.ports import Reporter
from controller.model.outcome import PassReport

__all__ = ["STATUS_IDS", "StatusFile", "read_status", "status_json", "write_status"]

#: Ids of each store drift list the status file names; the rest are counted, not named.
STATUS_IDS = 100
_TOTAL = "_total"


def write_status(path: Path, status: PassReport, *, ops: platform.FileOps | None = None) -> None:
    """Replace ``path`` atomically with the status as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A writer killed mid-write leaves its temporary sibling; one run per store holds
    # the lock, so any such sibling is stale.
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)
    data = json.dumps(status_json(status), indent=2).encode() + b"\n"
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


def status_json(status: PassReport) -> dict[str, Any]:
    """The report as the status file holds it: the store drift's lists capped, with their counts."""
    # Dumped without the lists: converting 50,000 ids only to drop all but 100 is the cost avoided.
    data = status.model_dump(mode="json", exclude={"store_drift"})
    drift: dict[str, Any] = {}
    for name, ids in status.store_drift:
        drift[name] = list(ids[:STATUS_IDS])
        drift[name + _TOTAL] = len(ids)
    # In the report's own field order, so the file reads as it always did.
    out: dict[str, Any] = {}
    for name in PassReport.model_fields:
        if name == "store_drift":
            out[name] = drift
        elif name in data:
            out[name] = data[name]
    return out


def read_status(path: Path) -> PassReport:
    """The report a status file holds. Its store drift lists are the first :data:`STATUS_IDS` ids
    written; the counts of the whole lists are the report's ``drift``."""
    with platform.open_shared(path) as f:
        data = json.load(f)
    drift = data.get("store_drift")
    if isinstance(drift, dict):
        # The counts are the file's, not the report's (a report's lists are its counts).
        data["store_drift"] = {
            k: v for k, v in drift.items() if not (k.endswith(_TOTAL) and k[: -len(_TOTAL)] in drift)
        }
    return PassReport.model_validate(data)


class StatusFile(Reporter):
    """Writes the status file after every pass."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pass_finished(self, report: PassReport) -> None:
        write_status(self.path, report)
