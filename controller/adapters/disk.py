"""Disk truth: the snapshotter's own folder, against what containerd's metadata knows.

``ctr snapshots rm`` removes containerd's metadata; the layer folder goes later, in
containerd's garbage collection, which renames it ``rm-<id>`` and only logs a failed
delete (a file still in use on Windows; containerd 1.6 then stops collecting, 2.x skips
it and never sweeps ``rm-*``). So metadata says "removed" while the disk stays full.

This observer finds the snapshotter's ``snapshots`` folder from the layer paths
containerd and the store report (``<root>/io.containerd.snapshotter.v1.<name>/snapshots/<id>``,
on Windows ``...\\io.containerd.snapshotter.v1.windows\\snapshots\\<id>``), lists it, and
reports the folders no snapshot of containerd's owns, with their bytes. It reads only.

Which id a committed snapshot has is not something ctr prints; so an id-named folder is
called unknown only when certain: when the folders outnumber the snapshots containerd
lists (all namespaces) by exactly the number of id folders no reported path names.
Otherwise the surplus is counted, not named.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from controller.adapters import platform
from controller.adapters.ctr import Ctr
from controller.model.disk import DiskDrift, UnknownFolder, UnknownReason
from controller.model.records import ContainerdState, Snapshot, StoreState

log = logging.getLogger("reconcile")

__all__ = [
    "BOOT_SIZE_BUDGET",
    "BudgetSpent",
    "DiskObserver",
    "ReclaimLedger",
    "layer_ids",
    "reported_layer_paths",
    "tree_bytes",
]

#: Seconds the boot pass (``--once``, which the worker waits for) gives to sizing unknown
#: folders: a Windows layer holds some 100,000 files, each one a stat.
BOOT_SIZE_BUDGET = 5.0
#: Entries walked between two reads of the clock when sizing has a deadline.
_CLOCK_EVERY = 256

_SEP = r"[\\/]+"
#: ``snapshots mounts`` calls a look spends finding the snapshotter's folder when no layer path
#: names it. Any active snapshot's mount names the folder, so when the first few name none, the
#: rest will not either; asking each of 25,000 active snapshots once took a pass minutes.
FOLDER_PROBES = 3
#: ``snapshots mounts`` calls a look spends naming which id folders are containerd's, when the
#: folders outnumber the snapshots. A worker's running builds are a few; past this many, the
#: surplus is counted rather than named, not paid for with one ctr process per active snapshot.
CLAIM_PROBES = 32

#: One namespace's Ctr and the snapshots it listed.
_Listed = tuple[Ctr, tuple[Snapshot, ...]]


def _layer_pattern(snapshotter: str) -> re.Pattern[str]:
    return re.compile(
        rf"(?P<folder>.*?{_SEP}io\.containerd\.snapshotter\.v1\.{re.escape(snapshotter)}{_SEP}snapshots)"
        rf"{_SEP}(?P<id>[^\\/]+)"
    )


def layer_ids(paths: Iterable[str], snapshotter: str) -> tuple[str | None, set[str]]:
    """The snapshotter's ``snapshots`` folder and the folder names that the paths name.

    Paths are as containerd reports them (a layerinfo's ``source``, a container's layer
    folders, a mount's source): the folder is taken from the first that has one."""
    pattern = _layer_pattern(snapshotter)
    folder: str | None = None
    ids: set[str] = set()
    for path in paths:
        m = pattern.match(path)
        if m is None:
            continue
        folder = folder or m.group("folder")
        ids.add(m.group("id"))
    return folder, ids


def reported_layer_paths(containerd: ContainerdState, store: StoreState) -> list[str]:
    """Every layer path the last observation holds: containers' specs, the store's layerinfo."""
    paths: list[str] = []
    for c in containerd.containers:
        paths.extend(p for p in (c.root_path, *c.layer_folders) if p)
    for entry in (*store.results, *store.tmp):
        if entry.layerinfo is not None:
            paths.extend(p for p in (entry.layerinfo.source, *entry.layerinfo.parent_layer_paths) if p)
    return paths


def mount_paths(text: str) -> Iterator[str]:
    """Layer paths in ``ctr snapshots mounts`` output (``mount -t TYPE SOURCE TARGET -o OPTIONS``),
    the source and, on Windows, each of ``parentLayerPaths=[...]``."""
    for line in text.splitlines():
        words = line.split(" ")
        if len(words) >= 4 and words[:2] == ["mount", "-t"]:
            yield words[3]
        at = line.find("parentLayerPaths=")
        if at >= 0:
            try:
                parents, _ = json.JSONDecoder().raw_decode(line, at + len("parentLayerPaths="))
            except ValueError:
                continue
            if isinstance(parents, list):
                yield from (p for p in parents if isinstance(p, str))


class BudgetSpent(Exception):
    """The time given to sizing ran out in the middle of a walk."""


def tree_bytes(path: str, *, deadline: float | None = None, clock: Callable[[], float] = time.monotonic) -> int:
    """Bytes of the regular files under ``path``; links are not followed, a hard-linked file
    counts once, and files or folders that go (or cannot be read) during the walk are skipped.

    With a ``deadline`` (on ``clock``), :class:`BudgetSpent` is raised once it has passed."""
    top = platform.long_path(path)
    try:
        st = os.lstat(top)
    except OSError:
        return 0
    if platform.is_link(st):
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [top]
    walked = 0
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for item in it:
                walked += 1
                if deadline is not None and walked % _CLOCK_EVERY == 0 and clock() >= deadline:
                    raise BudgetSpent(path)
                try:
                    est = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(est.st_mode) and not platform.is_link(est):
                    stack.append(item.path)
                elif stat.S_ISREG(est.st_mode):
                    if est.st_nlink == 0:
                        # Windows' listing has no link count or file id; its layers hard-link
                        # much of WinSxS, so ask the file itself.
                        try:
                            est = os.lstat(item.path)
                        except OSError:
                            continue
                    if est.st_nlink > 1 and est.st_ino:
                        if (est.st_dev, est.st_ino) in seen:
                            continue
                        seen.add((est.st_dev, est.st_ino))
                    total += est.st_size
    return total


def _reason(name: str) -> UnknownReason | None:
    if name.isdecimal():
        return None
    if name.startswith("rm-"):
        return "removed"
    if name.startswith("new-"):
        return "unfinished"
    return "not-a-snapshot"


class DiskObserver:
    """Looks at the snapshotter's folder through the ``Ctr`` it is given (its snapshotter;
    every namespace, as they share the snapshotter's folder)."""

    def __init__(
        self,
        ctr: Ctr,
        *,
        for_namespace: Callable[[str], Ctr] | None = None,
        remeasure: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
        size_budget: float | None = None,
    ) -> None:
        self.ctr = ctr
        #: Seconds before an unknown folder's bytes are walked again though its stamp is the same.
        self.remeasure = remeasure
        self.clock = clock
        #: Seconds (on ``clock``) a look may spend sizing unknown folders; None: no limit. Every
        #: unknown folder is listed and counted whatever the budget; those it leaves unsized are
        #: reported with 0 bytes and named in :attr:`unsized`, with :attr:`note` saying why.
        self.size_budget = size_budget
        #: Of the last look: the unknown folders it did not size, and why (None: all sized).
        self.unsized: tuple[str, ...] = ()
        self.note: str | None = None
        #: Paths a look left unsized; later looks leave them so, so that the bytes two looks
        #: report compare (growth of ``rm-*`` bytes is read as removals' leftovers).
        self._unsized_paths: set[str] = set()
        self._sizes: dict[str, tuple[tuple[int, int, int], float, int]] = {}
        #: A Ctr for another namespace (its own, so its calls are counted here, not in the pass's).
        self.for_namespace = for_namespace or (lambda name: Ctr(replace(ctr.settings, namespace=name)))
        #: The namespaces' Ctrs of the last look, kept so that each one's snapshot listing reuses
        #: the records of its last (50,000 snapshots are 50,000 records to build otherwise).
        self._ctrs: dict[str, Ctr] = {}
        #: The snapshotter's folder as last listed: a look whose layer paths do not name it
        #: lists it again rather than asking containerd's mounts where it is.
        self._folder: str | None = None
        self.calls = 0
        self.ledger = ReclaimLedger()

    def observe(self, layer_paths: Iterable[str] = ()) -> DiskDrift:
        """Folders the snapshotter holds that containerd does not know, with their bytes.

        Costs ``ctr namespaces ls`` and one ``snapshots ls`` per namespace, a listing of the
        folder, and a walk of the unknown folders only; ``snapshots mounts`` of a few active
        snapshots when no path names the folder and none was found before, and of every active
        snapshot only when the folders outnumber the snapshots."""
        snapshotter = self.ctr.settings.snapshotter
        paths = list(layer_paths)
        named, claimed = layer_ids(paths, snapshotter)
        folder = named or self._folder
        names: list[str] | str = "not listed"
        if folder is not None:
            # The folder before the snapshots: a snapshot prepared in between is in neither
            # count, never a folder without its snapshot.
            names = self._listing(folder)
        listed = [(c, c.snapshots()) for c in self._namespaces()]
        self.calls += len(listed)
        snapshots = sum(len(s) for _, s in listed)
        if folder is None or (named is None and isinstance(names, str)):
            # No path says where this snapshotter keeps its layers, and the folder found before
            # (if any) is not there now: ask the active snapshots.
            self._folder = None
            paths.extend(self._folder_paths(listed))
            folder, claimed = layer_ids(paths, snapshotter)
            if folder is None:
                return DiskDrift(snapshots=snapshots)
            names = self._listing(folder)
        if isinstance(names, str):
            return DiskDrift(folder=folder, snapshots=snapshots, error=f"{folder}: cannot list: {names}")
        self._folder = folder
        ids = [n for n in names if n.isdecimal()]
        unknown = [(n, r) for n in sorted(names) if (r := _reason(n)) is not None]
        surplus = len(ids) - snapshots
        unattributed = 0
        if surplus > 0:
            candidates = self._unclaimed(ids, claimed, surplus, paths, listed)
            if len(candidates) == surplus:
                unknown.extend((n, "unclaimed") for n in candidates)
            else:
                unattributed = surplus
        found = self._sized(folder, unknown)
        current = {os.path.join(folder, n) for n, _ in unknown}
        self._sizes = {path: known for path, known in self._sizes.items() if path in current}
        self._unsized_paths &= current
        return DiskDrift(
            folder=folder,
            snapshots=snapshots,
            snapshot_folders=len(ids),
            unknown=found,
            unknown_bytes=sum(f.size_bytes or 0 for f in found),
            removed_bytes=sum(f.size_bytes or 0 for f in found if f.reason == "removed"),
            unattributed=unattributed,
            unsized=len(self.unsized),
            note=self.note,
        )

    def _unclaimed(
        self, ids: list[str], claimed: set[str], surplus: int, paths: list[str], listed: list[_Listed]
    ) -> list[str]:
        """The id folders no layer path names, the mounts of up to :data:`CLAIM_PROBES` active
        snapshots asked when the paths at hand leave more of them than the surplus (only then
        can they name fewer)."""
        candidates = sorted(set(ids) - claimed, key=int)
        if len(candidates) > surplus:
            paths.extend(
                p for ctr, key in itertools.islice(_active(listed), CLAIM_PROBES) for p in self._mounts(ctr, key)
            )
            claimed = layer_ids(paths, self.ctr.settings.snapshotter)[1]
            candidates = sorted(set(ids) - claimed, key=int)
        return candidates

    def observe_states(self, containerd: ContainerdState, store: StoreState) -> DiskDrift:
        """:meth:`observe` with the layer paths a pass's observation holds."""
        before = self.calls
        drift = self.observe(reported_layer_paths(containerd, store))
        return drift.model_copy(update={"calls": self.calls - before})

    def reclaimed(self, removed_bytes: int | None, drift: DiskDrift | None) -> int | None:
        """What a pass reclaimed on disk, from what containerd measured of the snapshots it
        removed (None when it measured nothing) and this pass's look at the disk."""
        return None if removed_bytes is None else self.ledger.account(removed_bytes, drift)

    def _sized(self, folder: str, unknown: list[tuple[str, UnknownReason]]) -> tuple[UnknownFolder, ...]:
        """The unknown folders with their bytes, sized while the budget lasts (those already
        measured first: they cost a stat each); the rest with 0 bytes, named in ``unsized``."""
        budget = self.size_budget
        deadline = None if budget is None else self.clock() + budget
        order = sorted(unknown, key=lambda nr: os.path.join(folder, nr[0]) not in self._sizes)
        sizes: dict[str, int] = {}
        unsized: list[str] = []
        for name, _ in order:
            size = self._size(folder, name, deadline)
            if size is None:
                unsized.append(name)
                self._unsized_paths.add(os.path.join(folder, name))
            else:
                sizes[name] = size
        left = set(unsized)
        self.unsized = tuple(n for n, _ in unknown if n in left)
        self.note = None
        if self.unsized:
            self.note = f"not sized: boot budget of {budget:g} s spent; the daemon sizes them"
            log.info(
                "%d of %d unknown folders in %s %s", len(self.unsized), len(unknown), folder, self.note,
                extra={"unsized": len(self.unsized)},
            )  # fmt: skip
        return tuple(UnknownFolder(name=n, reason=r, size_bytes=sizes.get(n)) for n, r in unknown)

    def _size(self, folder: str, name: str, deadline: float | None = None) -> int | None:
        """A folder's bytes, walked again only when its own stamp changed or ``remeasure`` passed:
        nothing writes into a folder containerd has dropped, and a layer can hold 100,000 files.
        None when the ``deadline`` passed before its walk ended, or an earlier budgeted look
        left it unsized (it stays unsized, so the bytes of two looks compare)."""
        path = os.path.join(folder, name)
        try:
            st = os.lstat(platform.long_path(path))
        except OSError:
            return 0
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        now = self.clock()
        known = self._sizes.get(path)
        if known is not None and known[0] == stamp and now - known[1] < self.remeasure:
            return known[2]
        if deadline is None:
            size = tree_bytes(path)
        else:
            if path in self._unsized_paths or now >= deadline:
                return None
            try:
                size = tree_bytes(path, deadline=deadline, clock=self.clock)
            except BudgetSpent:
                return None
        self._sizes[path] = (stamp, now, size)
        return size

    def _listing(self, folder: str) -> list[str] | str:
        """The folder's names, or why they could not be read."""
        try:
            return os.listdir(platform.long_path(folder))
        except OSError as e:
            return e.strerror or str(e)

    def _namespaces(self) -> list[Ctr]:
        self.calls += 1
        out = self.ctr.output(["namespaces", "ls", "--quiet"])
        names = [n.strip() for n in out.splitlines() if n.strip()]
        # Only the namespaces listed now are kept, so a namespace gone takes its Ctr with it.
        self._ctrs = {n: self._ctrs[n] if n in self._ctrs else self.for_namespace(n) for n in names}
        return [self._ctrs[n] for n in names]

    def _folder_paths(self, listed: list[_Listed]) -> list[str]:
        """Layer paths from the mounts of at most :data:`FOLDER_PROBES` active snapshots, up to
        the first that names the snapshotter's folder: one is enough."""
        pattern = _layer_pattern(self.ctr.settings.snapshotter)
        paths: list[str] = []
        for ctr, key in itertools.islice(_active(listed), FOLDER_PROBES):
            mounted = self._mounts(ctr, key)
            paths.extend(mounted)
            if any(pattern.match(p) for p in mounted):
                break
        return paths

    def _mounts(self, ctr: Ctr, key: str) -> list[str]:
        self.calls += 1
        proc = ctr.run(["snapshots", "--snapshotter", ctr.settings.snapshotter, "mounts", "--", "target", key])
        # One removed since it was listed has no mounts: it names nothing.
        return list(mount_paths(proc.stdout)) if proc.returncode == 0 else []


def _active(listed: list[_Listed]) -> Iterator[tuple[Ctr, str]]:
    for ctr, snaps in listed:
        for s in snaps:
            if s.kind.lower() == "active":
                yield ctr, s.key


class ReclaimLedger:
    """Bytes reclaimed on disk, not in metadata, across passes.

    containerd measures a snapshot's bytes before we remove it (``snapshots usage``); those
    bytes left the disk unless its folder stayed behind. Growth of the ``rm-*`` folders'
    bytes since the last look is such a leftover: it is taken off what removals report,
    now or (when a pass removed less than that) from the passes after. The garbage
    collector runs after the removals, so a leftover shows up one pass late."""

    def __init__(self) -> None:
        self._last_unknown: int | None = None
        self._owed = 0

    def account(self, removed_bytes: int, drift: DiskDrift | None) -> int:
        """Bytes to count as reclaimed for this pass."""
        if drift is not None and drift.folder is not None and drift.error is None:
            if self._last_unknown is not None:
                self._owed += max(0, drift.removed_bytes - self._last_unknown)
            self._last_unknown = drift.removed_bytes
        reclaimed = max(0, removed_bytes - self._owed)
        self._owed = max(0, self._owed - removed_bytes)
        return reclaimed
