"""What is on the snapshotter's disk that containerd's metadata does not account for.

Purely data. ``ctr snapshots rm`` drops containerd's metadata; the layer folder goes
later, in containerd's garbage collection, and a folder the snapshotter failed to
delete stays (renamed ``rm-<id>``) with only a log line to say so. These records are
the disk's side of the story, so "removed" can be told from "reclaimed".
"""

from __future__ import annotations

from typing import Literal, get_args

from controller.model.records import Record

#: Why a folder is not one of containerd's snapshots.
#: ``removed``: ``rm-<id>``, renamed by the snapshotter to delete it, and not deleted;
#: ``unfinished``: ``new-*``, a snapshot being created when containerd stopped;
#: ``not-a-snapshot``: a name the snapshotter never gives (someone else put it there);
#: ``unclaimed``: an id no snapshot containerd lists has (told only when certain).
UnknownReason = Literal["removed", "unfinished", "not-a-snapshot", "unclaimed"]
#: Every reason, in that order: a metric's labels exist at 0 from the start.
UNKNOWN_REASONS: tuple[UnknownReason, ...] = get_args(UnknownReason)


class UnknownFolder(Record):
    """One folder in the snapshotter's ``snapshots`` folder that no snapshot owns."""

    name: str
    reason: UnknownReason
    #: Bytes of the files under it (links not followed, hard links counted once); None: not
    #: sized (the boot pass's sizing budget ran out: the daemon sizes it).
    size_bytes: int | None


class DiskDrift(Record):
    """The snapshotter's folder against containerd's snapshots, in one look."""

    #: The snapshotter's ``snapshots`` folder; None when no layer path containerd or the
    #: store reported named it (nothing else was looked at then).
    folder: str | None = None
    #: Set when the folder could not be listed (nothing else is known then).
    error: str | None = None
    #: Snapshots containerd lists in this snapshotter, all namespaces together.
    snapshots: int = 0
    #: Folders named by a snapshot id (a number) on disk.
    snapshot_folders: int = 0
    unknown: tuple[UnknownFolder, ...] = ()
    #: Bytes held by ``unknown``.
    unknown_bytes: int = 0
    #: Of those, bytes in ``rm-*`` folders: what removals left on disk.
    removed_bytes: int = 0
    #: Id-named folders beyond the snapshots containerd lists that could not be told
    #: apart from its own (no layer path names every snapshot's folder): counted, not named.
    unattributed: int = 0
    #: ctr processes this look started (one listing per namespace: they share the folder).
    calls: int = 0
    #: Unknown folders left unsized (their bytes are not in the totals), and why.
    unsized: int = 0
    note: str | None = None

    def by_reason(self) -> dict[str, tuple[int, int]]:
        """Folders and bytes per reason, every reason present (0, 0 when none)."""
        out: dict[str, tuple[int, int]] = {reason: (0, 0) for reason in UNKNOWN_REASONS}
        for f in self.unknown:
            folders, size = out[f.reason]
            out[f.reason] = (folders + 1, size + (f.size_bytes or 0))
        return out
