"""A plan an operator can review and then apply exactly: ``--once --dry-run --plan-out FILE``
writes one, ``reconcile apply FILE`` performs only the actions whose object still has the
identity it was planned on.

Names repeat (build ids are content hashes; ``obuilder-run-N`` ids come back), so each
action carries the identity it was planned on: a snapshot's Created, a container's creation
time, a ``result-tmp/`` entry's stamps."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from controller.model.records import Record


class PlannedSnapshot(Record):
    key: str
    #: containerd's Created when planned (None: containerd could not date it).
    created: datetime | None


class PlannedContainer(Record):
    id: str
    created_at: datetime | None


class PlannedEntry(Record):
    """A ``result-tmp/`` entry: its stamps (inode, size, mtime, ctime of it and its top files)."""

    id: str
    stamps: str | None


class PlanFile(Record):
    format: Literal["obuilder-reconcile/plan"] = "obuilder-reconcile/plan"
    version: Literal[1] = 1
    tool_version: str
    made_at: datetime
    #: The store it was planned on (absolute), and a digest of the policy it was planned with.
    store: str
    policy_sha256: str
    containers: tuple[PlannedContainer, ...] = ()
    #: Leaves first.
    snapshots: tuple[PlannedSnapshot, ...] = ()
    tmp_entries: tuple[PlannedEntry, ...] = ()
    cache_tmp: tuple[str, ...] = ()


class Skipped(Record):
    """A planned action ``reconcile apply`` left alone, and why."""

    kind: str
    name: str
    reason: str
