"""The result of a pass as a record, and the status file a boot script or a human reads.

The file is replaced atomically (write a sibling, flush to disk, rename over), so a
reader, or a crash at any instant, sees the old content or the new, never a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field

from controller.adapters.ctr import Outcome
from controller.adapters.logs import Reporter
from controller.core.executor import PassResult
from controller.model.plan import DRIFT_KINDS, Mode, Plan
from controller.model.records import Record
from controller.reconciler import Stuck

_DRIFT_OF_ACTION = {
    "snapshot": "orphan_snapshots",
    "container": "leftover_containers",
    "result-tmp": "stale_result_tmp",
}


__all__ = ["DRIFT_KINDS", "PassStatus", "StatusFile", "drift_after", "pass_status", "read_status", "write_status"]


class PassStatus(Record):
    time: datetime
    mode: Mode
    pass_number: int
    outcome: Literal["success", "error"]
    seconds: float
    error: str | None = None
    containerd_up: bool = True
    removed: dict[str, int] = Field(default_factory=dict)
    failed: dict[str, int] = Field(default_factory=dict)
    #: Drift left after the pass, by kind (see DRIFT_KINDS).
    drift: dict[str, int] = Field(default_factory=dict)
    stuck: tuple[Stuck, ...] = ()
    owned: dict[str, int] = Field(default_factory=dict)
    orphan_bytes: int | None = None
    reclaimed_bytes: int | None = None
    #: Daemon: planned removals left alone because the object changed since it was planned.
    changed: int = 0
    #: Daemon: the longest time from a batch's last check to the end of its removal (seconds).
    recheck_window: float | None = None


def drift_after(plan: Plan, result: PassResult) -> dict[str, int]:
    """What the pass leaves: planned drift less what it removed, plus what got stuck."""
    drift = plan.drift_counts()
    for r in result.results:
        kind = _DRIFT_OF_ACTION.get(r.kind)
        if kind is not None and r.outcome.done:
            drift[kind] -= 1
    drift["stuck"] = len(result.failures())
    return drift


def pass_status(
    plan: Plan,
    result: PassResult,
    number: int,
    now: datetime,
    seconds: float,
    sizes: dict[str, int] | None = None,
) -> PassStatus:
    """What one successful pass did and left, as the metrics and the status file want it."""
    removed: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for r in result.results:
        if r.outcome is Outcome.REMOVED:
            removed[r.kind] += 1
        elif not r.outcome.done and r.outcome is not Outcome.CHANGED:
            failed[r.kind] += 1
    done = {r.name for r in result.results if r.kind == "snapshot" and r.outcome.done}
    orphans = {*plan.snapshots, *plan.deferred}
    return PassStatus(
        time=now,
        mode=plan.mode,
        pass_number=number,
        outcome="success",
        seconds=round(seconds, 3),
        removed=dict(removed),
        failed=dict(failed),
        drift=drift_after(plan, result),
        stuck=tuple(Stuck(kind=r.kind, name=r.name, reason=r.message or r.outcome.value) for r in result.failures()),
        owned={
            "snapshot": sum(1 for d in plan.decisions if d.kind == "snapshot") + len(orphans),
            "container": sum(1 for d in plan.decisions if d.kind == "container"),
        },
        orphan_bytes=None if sizes is None else sum(v for k, v in sizes.items() if k in orphans and k not in done),
        reclaimed_bytes=None if sizes is None else sum(v for k, v in sizes.items() if k in done),
        changed=sum(1 for r in result.results if r.outcome is Outcome.CHANGED),
        recheck_window=round(max(result.recheck_windows), 4) if result.recheck_windows else None,
    )


def write_status(path: Path, status: PassStatus) -> None:
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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(path: Path) -> PassStatus:
    return PassStatus.model_validate_json(path.read_bytes())


class StatusFile(Reporter):
    """Writes the status file after every pass."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pass_finished(self, status: PassStatus) -> None:
        write_status(self.path, status)
