"""The store observer: reads an OBuilder HCS store into a :class:`StoreState`.

Reads only. The DB is opened read-only with a busy timeout because the worker
writes it; entries that are symlinks or junctions are recorded, never followed.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import operator
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from controller.adapters import platform
from controller.adapters.sexp import MAX_BYTES, Node, SexpSyntaxError, parse_one, position
from controller.adapters.store_cleanup import StoreCleaner
from controller.model.errors import LayerinfoError, StoreReadError, StoreSanityError
from controller.model.outcome import Result, TrashLeft
from controller.model.records import DbRow, LayerInfo, StoreEntry, StoreState

DB_PATH = ("state", "db", "db.sqlite")
_FIELDS = ("snapshot_key", "source", "parent_layer_paths")
log = logging.getLogger("reconcile")
_T = TypeVar("_T")
_name = operator.itemgetter(0)

#: A stamp this close to the moment it was read (ns) may share its tick with a change that
#: follows: what was read under it is verified again, never trusted (git's "racily clean").
#: A kernel stamps files from a coarse clock (a tick: 1-16 ms on Linux and Windows).
RACY_NS = 100_000_000
#: The same for a stamp in whole seconds: a file system that keeps seconds (ext4 with small
#: inodes) or two (FAT).
COARSE_RACY_NS = 2_000_000_000
#: Default time between true full reads of the store (the cache dropped): six hours.
FULL_EVERY = 6 * 3600.0
#: Default number of cached entries a verification stats (two lstats each: ~5 us here), in
#: name order from where the last one stopped. At 50,000 entries a resync then costs ~0.12 s
#: (~0.2 s when result/ changed and is listed again), within the 0.3 s target with room for a
#: busy machine; FsStore spreads the 3 slices over one resync interval.
VERIFY_BATCH = 20_000


def read_layerinfo(path: str | os.PathLike[str]) -> LayerInfo:
    """Parse one layerinfo file (Sexplib's ``to_string_hum`` of OBuilder's record).

    Raises :class:`LayerinfoError` with the file, line and column when it does not parse.
    """
    shown = os.fspath(path)
    try:
        with platform.open_shared(path) as f:  # FILE_SHARE_DELETE on Windows: OBuilder may rename it meanwhile
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise LayerinfoError(shown, 1, 1, f"cannot read: {e.strerror or e}") from e
    if len(data) > MAX_BYTES:
        raise LayerinfoError(shown, 1, 1, f"larger than {MAX_BYTES // 1024} KiB; a layerinfo is a few hundred bytes")
    try:
        node = parse_one(data)
    except SexpSyntaxError as e:
        raise LayerinfoError(shown, e.line, e.column, e.message) from e
    return _decode_layerinfo(node, data, shown)


def _decode_layerinfo(node: Node, data: bytes, shown: str) -> LayerInfo:
    def fail(at: Node, message: str) -> LayerinfoError:
        line, column = position(data, at.offset)
        return LayerinfoError(shown, line, column, message)

    if node.items is None:
        raise fail(node, "expected a record ((snapshot_key ...) (source ...) (parent_layer_paths (...)))")
    found: dict[str, Node] = {}
    for item in node.items:
        if item.items is None or len(item.items) != 2 or item.items[0].atom is None:
            raise fail(item, "expected a field (NAME VALUE)")
        name = item.items[0].atom
        if name in found:
            raise fail(item, f"duplicate field {name}")
        found[name] = item.items[1]
    for name in _FIELDS:
        if name not in found:
            raise fail(node, f"missing field {name}")
    for name in ("snapshot_key", "source"):
        if found[name].atom is None:
            raise fail(found[name], f"field {name}: expected an atom, found a list")
    paths = found["parent_layer_paths"]
    if paths.items is None:
        raise fail(paths, "field parent_layer_paths: expected a list, found an atom")
    parents: list[str] = []
    for p in paths.items:
        if p.atom is None:
            raise fail(p, "field parent_layer_paths: expected atoms, found a list")
        parents.append(p.atom)
    key = found["snapshot_key"].atom
    source = found["source"].atom
    assert key is not None and source is not None
    if not key:
        raise fail(found["snapshot_key"], "field snapshot_key is empty")
    return LayerInfo(snapshot_key=key, source=source, parent_layer_paths=tuple(parents))


def layerinfo_candidates(entry: Path) -> tuple[Path, Path]:
    """Where OBuilder looks, in order: bases use ``rootfs/layerinfo``, steps ``layerinfo``."""
    return entry / "rootfs" / "layerinfo", entry / "layerinfo"


def check_store(root: Path, *, read_the_db: bool = False) -> None:
    """Refuse a root that does not look like an OBuilder store.

    An unmounted volume or a mistyped path would make everything look orphaned. With
    ``read_the_db`` (once, before anything is written: the lock, the status file), the DB
    must also be OBuilder's: SQLite with a ``builds`` table.
    """
    problems = []
    if not (root / "result").is_dir():
        problems.append(f"{root / 'result'} is not a directory")
    if not root.joinpath(*DB_PATH).is_file():
        problems.append(f"{root.joinpath(*DB_PATH)} is not a file")
    if problems:
        raise StoreSanityError(f"{root} does not look like an OBuilder store ({'; '.join(problems)}); refusing to act")
    if read_the_db:
        read_db(root.joinpath(*DB_PATH))


#: What a verification stats in an entry: its ``layerinfo``, its ``rootfs/layerinfo``, both
#: (a ``rootfs/`` folder without a layerinfo: one may appear in it, which leaves the entry's
#: own stamps as they were), or nothing it can trust (``rootfs`` is a link: read again).
_TOP, _ROOTFS, _BOTH, _UNVERIFIABLE = 0, 1, 2, 3
_FileStamp = tuple[int, int, int, int, int] | None
#: (folder stamp, what a verification stats, their stamps, racy, entry, listed identity)
_Known = tuple[tuple[int, int, int, int], int, tuple[_FileStamp, ...], bool, StoreEntry, platform.Identity]


class ReadCache:
    """What a full read parsed, kept for the next: an informer's cache for the store.

    A ``result/ID`` is written once (renamed from ``result-tmp/``) and never changed in
    place, so its parsed layerinfo is reused for as long as it looks the same. The DB is
    read again only when its file or its ``-wal`` changed; ``result-tmp/`` entries (few,
    and changing) are always read.

    A look that finds ``result/``'s own stamps unchanged lists nothing: an entry that comes,
    goes or is renamed over changes them. Otherwise ``result/`` is listed, names only, each
    with the identity its listing gives for free (:func:`platform.listed_identities`: the
    inode on POSIX, the stamps on Windows): a new name or a changed identity is lstat-ed and
    read, a known name with its known identity is kept without a call. So an entry that
    comes, goes or is renamed over is seen at the next look, whatever it is.

    A look that *verifies* (the owner's resync) also lstats a slice of the cached entries
    (listing ``result/`` only if its stamps changed): at most ``verify_batch``, continuing in
    name order from where the last verification stopped, plus every entry whose stamps were
    racy. For each it compares the folder's inode, mode, mtime and ctime (``rootfs/`` coming
    or going changes its ctime, which no one can set back) and the layerinfo file's own
    inode, mode, size, mtime and ctime (rewritten in place, it leaves the folder as it was; a
    layerinfo appearing in ``rootfs/`` is stat-ed for). An entry whose stamps changed is read
    again. The cost of a slice: what changes *in place* (``rootfs/`` appearing, a layerinfo
    rewritten, an entry deleted and rebuilt under its name that got its freed inode number
    back, which Linux does) is seen when its slice comes round, within ceil(entries /
    verify_batch) verifications (which FsStore spreads over one resync interval), not at the
    next; OBuilder does none of these to a finished result, and a snapshot it would leave
    unclaimed meanwhile is still kept by its grace period and by the last look at
    ``result/ID`` before any removal (controller.core.identity). A store of at most
    ``verify_batch`` entries is verified whole at every verification. Stamps read within
    :data:`RACY_NS` of their change are never trusted: what
    was read under them is read again at the next verification, whatever its slice (the
    listing: at the next look).
    """

    def __init__(self) -> None:
        #: name -> what it was read under, and the entry (see _Known)
        self.results: dict[str, _Known] = {}
        #: result/'s own stamp, the entries read under it and its listing (None when racy): a
        #: look that finds it unchanged lists nothing, a name that comes or goes changes the
        #: folder's mtime (at 50,000 entries the listing is 13 MB; listing again costs 0.06 s)
        self.listing: tuple[tuple[int, ...], tuple[StoreEntry, ...], list[tuple[str, platform.Identity]]] | None = None
        self.db: tuple[tuple[int, ...], tuple[DbRow, ...]] | None = None
        #: whether the DB's stamps were read within RACY_NS of their change
        self.db_racy = False
        #: the last rows, by their raw values: a re-read DB builds only the rows that changed
        self.db_rows: dict[tuple[object, ...], DbRow] = {}
        #: the last state returned: returned again, the same object, when nothing in it changed
        self.state: StoreState | None = None
        #: the last name a verification's slice covered: the next one starts after it
        self.verified_to = ""
        self.hits = 0
        self.reads = 0
        #: entries a verification stat-ed (their folder and their layerinfo stamps compared)
        self.verified = 0
        #: verifications made, and how many entries the last one stat-ed
        self.verifications = 0
        self.last_verified = 0


class VerifyError(StoreReadError):
    """A verification could not stat what it had to (EIO, a permission, a loop): its owner
    falls back to a full read."""


def observe_store(
    root: Path,
    *,
    busy_timeout: float = 5.0,
    cache: ReadCache | None = None,
    verify: bool = False,
    verify_batch: int = VERIFY_BATCH,
) -> StoreState:
    """Read result/, result-tmp/, cache-tmp/ and the DB. Checks sanity first.

    With ``verify`` (and a ``cache``), the next ``verify_batch`` cached entries (and every
    racy one) get their folder, layerinfo and ``rootfs/`` stat-ed, and the DB's stamps are
    compared even when they were racy; raises :class:`VerifyError` when a stat fails other
    than by the file being absent."""
    if verify_batch < 1:
        raise ValueError(f"verify_batch must be at least 1, not {verify_batch}")
    check_store(root)
    # result-tmp/ before result/: a build that ends mid-scan moves its folder from the
    # first to the second, so it is seen in one of them or both, never in neither.
    tmp = tuple(_read_entries(root / "result-tmp", "result-tmp"))
    if cache is None:
        results = tuple(_read_entries(root / "result", "result"))
    else:
        results = tuple(_read_cached(root / "result", "result", cache, verify_batch if verify else 0))
    cache_tmp = tuple(sorted(_names(root / "cache-tmp")))
    db_rows = _read_db_cached(root.joinpath(*DB_PATH), busy_timeout, cache, verify=verify)
    if cache is not None and (last := cache.state) is not None:
        # Nothing changed: the very same state (and its tuples), so that what the pass derives
        # from it can be kept by identity; building it again costs a check of 50,000 records.
        results = _same(last.results, results)
        db_rows = _same(last.db_rows, db_rows)
        if results is last.results and db_rows is last.db_rows and (tmp, cache_tmp) == (last.tmp, last.cache_tmp):
            return last
    state = StoreState(root=str(root), results=results, tmp=tmp, cache_tmp=cache_tmp, db_rows=db_rows)
    if cache is not None:
        cache.state = state
    return state


def _same(last: tuple[_T, ...], now: tuple[_T, ...]) -> tuple[_T, ...]:
    """``last`` when ``now`` holds the very same objects (the cache's), else ``now``."""
    if last is now or (len(last) == len(now) and all(a is b for a, b in zip(last, now, strict=True))):
        return last
    return now


def _read_db_cached(
    path: Path, busy_timeout: float, cache: ReadCache | None, *, verify: bool = False
) -> tuple[DbRow, ...]:
    if cache is None:
        return read_db(path, busy_timeout=busy_timeout)
    now = time.time_ns()
    key = tuple(_stamp(path.with_name(path.name + suffix)) for suffix in ("", "-wal"))
    flat = tuple(n for part in key for n in part)
    if cache.db is not None and cache.db[0] == flat and not (verify and cache.db_racy):
        return cache.db[1]
    rows = read_db(path, busy_timeout=busy_timeout, known=cache.db_rows)
    cache.db = (flat, rows)
    cache.db_racy = any(part[0] != -1 and (_racy(part[2], now) or _racy(part[3], now)) for part in key)
    cache.db_rows = {(r.id, r.rc, r.used, r.parent): r for r in rows}
    return rows


def _stamp(path: Path) -> tuple[int, ...]:
    """Inode, size, mtime and ctime: SQLite rewrites a ``-wal`` in place after a checkpoint, at
    the same size; a write in the same mtime tick as the last read still has a new ctime,
    unless it came within the same tick (see :data:`RACY_NS`)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def entry_exists(root: Path, area: str, entry_id: str) -> bool:
    """Whether ``root/area/entry_id`` exists (as anything, a link included)."""
    return os.path.lexists(root / area / entry_id)


def read_db(
    path: Path, *, busy_timeout: float = 5.0, known: dict[tuple[object, ...], DbRow] | None = None
) -> tuple[DbRow, ...]:
    """All rows of ``builds``, read through a read-only connection.

    OBuilder keeps the DB in WAL mode. While the worker has it open, its ``-wal``
    and ``-shm`` files exist and a ``mode=ro`` reader shares them. When they do
    not exist (no worker, or it closed cleanly), every row is in the main file and
    a plain reader would create them: ``immutable=1`` reads without creating
    anything. A worker starting mid-read can at worst skew the drift report, as
    rows never decide what is kept.
    """
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    shared = wal.exists() and shm.exists()
    uri = path.absolute().as_uri() + ("?mode=ro" if shared else "?mode=ro&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout)
    except sqlite3.Error as e:
        raise StoreReadError(f"{path}: cannot open read-only: {e}") from e
    # Text that is not UTF-8 in one row must not fail the read of every row.
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    try:
        rows = conn.execute("SELECT id, rc, used, parent FROM builds").fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e) or "no such column" in str(e):
            raise StoreSanityError(f"{path} is not OBuilder's DB ({e}); refusing to act") from e
        raise StoreReadError(f"{path}: cannot read table builds: {e}") from e
    except sqlite3.DatabaseError as e:
        raise StoreSanityError(f"{path} is not OBuilder's DB ({e}); refusing to act") from e
    finally:
        conn.close()
    # SQLite keeps whatever type a row was given: a row that is not what OBuilder writes is read as
    # far as it makes sense (rows decide only the drift report), never a failure of the whole read.
    known = known or {}
    out = []
    for raw in rows:
        if raw[0] is None:
            continue
        i, rc, used, parent = raw
        # Reused only when the values are the row's own (True == 1: a bool rc is not an int rc).
        row = known.get(raw) if rc is None or type(rc) is int else None
        if row is None:
            row = DbRow(
                id=_text(i), rc=rc if type(rc) is int else None, used=_text_or_none(used), parent=_text_or_none(parent)
            )
        out.append(row)
    return tuple(out)


def _text_or_none(value: object) -> str | None:
    return None if value is None else _text(value)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StoreReadError(f"{folder}: {e.strerror or e}") from e


def _read_entries(folder: Path, area: str) -> Sequence[StoreEntry]:
    out = []
    for name, st in _listing(folder, required=area == "result"):
        entry = _read_or_unreadable(folder, name, area, st)
        if entry is not None:
            out.append(entry)
    return out


def _read_or_unreadable(folder: Path, name: str, area: str, st: os.stat_result) -> StoreEntry | None:
    try:
        return _read_entry(folder / name, area, st)
    except OSError as e:
        # One entry that cannot be read (EIO, ELOOP, a permission) fails that entry, not the
        # pass: it is an unreadable entry, kept with every key it could name, and reported.
        return StoreEntry(id=name, area=area, layerinfo_error=f"{folder / name}: cannot read: {e.strerror or e}")


def _read_cached(folder: Path, area: str, cache: ReadCache, batch: int) -> Sequence[StoreEntry]:
    """The entries of ``folder`` through the cache; ``batch`` > 0: a verification of that many."""
    now = time.time_ns()
    # Stamped before it is listed: a change while it is listed is a new stamp next time.
    try:
        fst = os.stat(folder)
        here: tuple[int, ...] | None = (fst.st_ino, fst.st_mtime_ns, fst.st_ctime_ns)
    except OSError:
        here = None
    if here is not None and cache.listing is not None and cache.listing[0] == here:
        if not batch:
            cache.hits += len(cache.listing[1])
            return cache.listing[1]
        listing = cache.listing[2]  # a verification of what is listed as it was: no listing
    else:
        listing = _identities(folder)
    if batch:
        lo, hi, wrap, verified_to = _slice(listing, cache.verified_to, batch)
        out, verified = _walk(folder, area, cache, listing, (lo, hi, wrap), now)
        cache.verified_to = verified_to  # only once done: a slice that failed is not skipped
        cache.verified += verified
        cache.verifications += 1
        cache.last_verified = verified
    else:
        out, _ = _walk(folder, area, cache, listing, None, now)
    racy_listing = here is None or _racy(here[1], now) or _racy(here[2], now)
    listed = tuple(out)
    cache.listing = None if racy_listing or here is None else (here, listed, listing)
    return listed


def _walk(
    folder: Path,
    area: str,
    cache: ReadCache,
    listing: list[tuple[str, platform.Identity]],
    span: tuple[int, int, int] | None,
    now: int,
) -> tuple[list[StoreEntry], int]:
    """The listed entries, each kept or read again, and how many were verified: those whose
    position is in ``span`` (``lo <= i < hi or i < wrap``; None: not a verification) or whose
    stamps were racy. The cache's entries are updated in place, not rebuilt: at 50,000 entries
    a new dict per look shows."""
    check = span is not None
    lo, hi, wrap = span or (0, 0, 0)
    out: list[StoreEntry] = []
    append = out.append
    known_results = cache.results
    get = known_results.get
    prefix = os.path.join(folder, "")
    layerinfo = os.sep + "layerinfo"
    lstat = os.lstat
    fresh = verified = forgotten = 0
    # At 50,000 entries every step of this loop shows: the common case (a known entry, listed
    # as it was, outside the slice) costs a lookup and a compare, no call.
    for i, (name, ident) in enumerate(listing):
        known = get(name)
        if known is not None and known[5] == ident:
            if not (check and (lo <= i < hi or i < wrap or known[3])):
                append(known[4])
                continue
            verified += 1
            st = _entry_stat(prefix + name, VerifyError)
            if st is not None and _still_same(prefix + name, st, known, lstat, layerinfo):
                append(known[4])
                continue
        else:
            st = _entry_stat(prefix + name, StoreReadError)
        if st is None:
            known_results.pop(name, None)  # gone since it was listed: the store no longer has it
            continue
        entry, again = _read_one(folder, name, area, st, ident, now)
        cache.reads += 1
        if again is not None:
            known_results[name] = again
        else:
            known_results.pop(name, None)  # gone while read, or unreadable: read at the next listing
        if entry is not None:
            append(entry)
            fresh += 1
            forgotten += again is None
    cache.hits += len(out) - fresh
    if len(known_results) != len(out) - forgotten:
        # Some entries went (a prune): forgotten. Only then is every known name looked at.
        listed_names = {name for name, _ in listing}
        for name in [n for n in known_results if n not in listed_names]:
            del known_results[name]
    return out, verified


def _slice(listing: list[tuple[str, platform.Identity]], after: str, batch: int) -> tuple[int, int, int, str]:
    """The positions a verification of ``batch`` entries stats, ``lo <= i < hi`` or ``i < wrap``:
    the ``batch`` names that follow ``after`` (the last one verified), round to the first name
    after the last; and the last name it covers. Every position when the listing is no longer
    than that. Names that came since are in the listing too: each entry is verified at least
    once every ceil(n / batch) verifications."""
    n = len(listing)
    if n <= batch:
        return 0, n, 0, after
    lo = bisect.bisect_right(listing, after, key=_name)
    return lo, min(n, lo + batch), max(0, lo + batch - n), listing[(lo + batch - 1) % n][0]


def _entry_stat(path: str, error: type[StoreReadError]) -> os.stat_result | None:
    """The entry folder's lstat; None when it is gone (pruned since it was listed)."""
    try:
        return os.lstat(path)
    except _GONE:
        return None
    except OSError as e:
        raise error(f"{path}: cannot stat: {e.strerror or e}") from e


def _read_one(
    folder: Path, name: str, area: str, st: os.stat_result, ident: platform.Identity, now: int
) -> tuple[StoreEntry | None, _Known | None]:
    """The entry read (None: it went meanwhile) and, when it can be trusted next time, what to
    remember it by (its stamps from ``st`` and before the read, and its listed identity)."""
    path = os.path.join(folder, name)
    # Stamped before it is read: a change while it is read is a new stamp next time.
    code, stamps = _probe_for_read(path)
    racy = _racy(st.st_mtime_ns, now) or _racy(st.st_ctime_ns, now)
    racy = racy or any(s is not None and (_racy(s[3], now) or _racy(s[4], now)) for s in stamps)
    entry = _read_or_unreadable(folder, name, area, st)
    if entry is None or entry.layerinfo_error is not None:
        return entry, None  # an unreadable entry is read again at the next listing
    return entry, ((st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns), code, stamps, racy, entry, ident)


def _still_same(
    path: str, st: os.stat_result, known: _Known, lstat: Callable[[str], os.stat_result], layerinfo: str
) -> bool:
    """Whether an entry listed as it was still has the stamps it was read with: its folder's
    (``st``) and those of what its layerinfo may be."""
    if known[3] or (st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns) != known[0]:
        return False
    code = known[1]
    if code == _TOP:
        try:
            fs = lstat(path + layerinfo)
            return (fs.st_ino, fs.st_mode, fs.st_size, fs.st_mtime_ns, fs.st_ctime_ns) == known[2][0]
        except _GONE:
            return known[2][0] is None
        except OSError as e:
            raise VerifyError(f"{path}: cannot verify: {e.strerror or e}") from e
    return code != _UNVERIFIABLE and _probe(path, code, strict=True) == known[2]


def _racy(ns: int, now: int) -> bool:
    return ns >= now - (COARSE_RACY_NS if ns % 1_000_000_000 == 0 else RACY_NS)


_GONE = (FileNotFoundError, NotADirectoryError)


def _file_stamp(path: str) -> _FileStamp:
    try:
        st = os.lstat(path)
    except _GONE:
        return None
    return (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _probe(path: str, code: int, *, strict: bool) -> tuple[_FileStamp, ...]:
    """The stamps of what a verification of the entry at ``path`` compares (see ``_TOP``...).
    An error other than absence raises :class:`VerifyError` (``strict``) or :class:`OSError`."""
    try:
        if code == _TOP:
            return (_file_stamp(path + os.sep + "layerinfo"),)
        if code == _ROOTFS:
            return (_file_stamp(path + os.sep + "rootfs" + os.sep + "layerinfo"),)
        return (_file_stamp(path + os.sep + "rootfs" + os.sep + "layerinfo"), _file_stamp(path + os.sep + "layerinfo"))
    except OSError as e:
        if strict:
            raise VerifyError(f"{path}: cannot verify: {e.strerror or e}") from e
        raise


def _probe_for_read(path: str) -> tuple[int, tuple[_FileStamp, ...]]:
    """What a verification of this entry will stat, and the stamps now (before it is read)."""
    try:
        try:
            mode = os.lstat(path + os.sep + "rootfs").st_mode
        except _GONE:
            return _TOP, _probe(path, _TOP, strict=False)
        if stat.S_ISLNK(mode):
            return _UNVERIFIABLE, ()
        if not stat.S_ISDIR(mode):
            return _TOP, _probe(path, _TOP, strict=False)
        stamps = _probe(path, _BOTH, strict=False)
        return (_ROOTFS, stamps[:1]) if stamps[0] is not None else (_BOTH, stamps)
    except OSError:
        return _UNVERIFIABLE, ()


def _identities(folder: Path) -> list[tuple[str, platform.Identity]]:
    """Each entry's name and the identity its listing gives at no cost (no call per entry:
    :func:`platform.listed_identities`), sorted by name."""
    try:
        with os.scandir(folder) as it:
            out = platform.listed_identities(it)
    except FileNotFoundError as e:
        # result/ was there when the store was checked: gone now, every result would look
        # pruned and every snapshot they keep an orphan (an unmount mid-pass). Fail the pass.
        raise StoreReadError(f"{folder} went away while it was read; nothing is judged on it") from e
    except OSError as e:
        raise StoreReadError(f"{folder}: {e.strerror or e}") from e
    # By the name alone: sorting the pairs compares each name twice (== first), 3x slower here.
    out.sort(key=_name)
    return out


def _listing(folder: Path, *, required: bool = False) -> list[tuple[str, os.stat_result]]:
    """Each entry's name and lstat, sorted; one that goes between the listing and its lstat is
    left out (the store no longer has it). Plain strings, not Path objects: at thousands of
    entries a pass spends its time building paths otherwise. A ``required`` folder that is
    gone fails the read (see :func:`_identities`); another reads as empty."""
    out = []
    try:
        with os.scandir(folder) as it:
            for item in it:
                try:
                    out.append((item.name, item.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
    except FileNotFoundError as e:
        if required:
            raise StoreReadError(f"{folder} went away while it was read; nothing is judged on it") from e
        return []
    except OSError as e:
        raise StoreReadError(f"{folder}: {e.strerror or e}") from e
    out.sort(key=lambda pair: pair[0])
    return out


def _read_entry(path: Path, area: str, st: os.stat_result) -> StoreEntry | None:
    """The entry, or None when it went while we read it (the worker pruned a result, or a
    build ended or was cancelled): the store no longer has it."""
    link = platform.is_link(st)
    fields: dict[str, object] = {"id": path.name, "area": area, "is_link": link}
    if link or not stat.S_ISDIR(st.st_mode):
        # Never read through a link: it could point anywhere.
        return StoreEntry.model_validate(fields)
    fields["has_rootfs"] = (path / "rootfs").is_dir()
    for candidate in layerinfo_candidates(path):
        try:
            mode = os.lstat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISREG(mode):
            # A folder, a link (it could lead to a fifo that blocks the read forever, or out of the
            # store), a device: OBuilder writes a plain file, so this is not one; never followed.
            what = "a link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            fields["layerinfo_error"] = f"{candidate}:1:1: {what}, not a layerinfo file; not followed"
            fields["layerinfo_path"] = str(candidate)
            break
        try:
            fields["layerinfo"] = read_layerinfo(candidate)
        except LayerinfoError as e:
            # Gone while we read it is not a bad file: read what is there now.
            if not os.path.lexists(path):
                return None
            if not os.path.lexists(candidate):
                continue
            fields["layerinfo_error"] = str(e)
        fields["layerinfo_path"] = str(candidate)
        break
    if area == "result-tmp":
        fields["changed_at"], fields["stamps"] = _newest_change(path, st)
    return StoreEntry.model_validate(fields)


def _newest_change(path: Path, st: os.stat_result) -> tuple[datetime, str]:
    """The newest mtime near the top of an entry, and a digest of every stamp it was read from.

    A build writes its log and layers here: the newest mtime near the top tells whether
    anything still happens, without walking a whole rootfs. The digest changes with any
    stamp (ctime too, which no one can set back), so a write whose mtime a stepped clock
    made older than the newest one still counts as a change."""
    newest = st.st_mtime
    digest = hashlib.blake2b(digest_size=12)
    digest.update(_stamp_bytes("", st))
    for folder in (path, path / "rootfs"):
        try:
            with os.scandir(folder) as it:
                children = sorted((child.path, child.stat(follow_symlinks=False)) for child in it)
        except OSError:
            continue
        for name, cst in children:
            newest = max(newest, cst.st_mtime)
            digest.update(_stamp_bytes(name, cst))
    return datetime.fromtimestamp(newest, tz=UTC), digest.hexdigest()


def _stamp_bytes(name: str, st: os.stat_result) -> bytes:
    return f"{name}\0{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n".encode(errors="surrogateescape")


class FsStore:
    """The store on disk: the core's :class:`~controller.core.ports.StorePort`.

    It keeps a :class:`ReadCache` between looks (``resync`` None: no cache, every look
    reads everything). A look verifies the cache in slices: the next ``verify_batch``
    entries in name order (and every racy one) have their folder, layerinfo and
    ``rootfs/`` stat-ed, and only what changed is parsed again; so what one look costs is
    bounded whatever the store's size. The slices are spread over the ``resync`` interval
    (one every ``resync / ceil(entries / verify_batch)`` seconds), so every entry is still
    verified once a resync interval, as when a verification was whole: a look that comes
    later than its slice was due verifies what is due since the last (an idle daemon, which
    looks once an interval, verifies them all). How often passes run is the loop's to pace. The
    cache is dropped for a true full read every ``full_every`` seconds, and after an error
    while verifying; each is logged.
    """

    def __init__(
        self,
        root: Path,
        *,
        busy_timeout: float = 5.0,
        resync: float | None = None,
        full_every: float = FULL_EVERY,
        verify_batch: int = VERIFY_BATCH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if verify_batch < 1:
            raise ValueError(f"verify_batch must be at least 1, not {verify_batch}")
        self.root = root
        self.busy_timeout = busy_timeout
        self.cleaner = StoreCleaner(root)
        self.resync = resync
        self.full_every = full_every
        self.verify_batch = verify_batch
        self.clock = clock
        self.cache: ReadCache | None = None
        self._full_at = 0.0
        self._verified_at = 0.0

    def observe(self) -> StoreState:
        if self.resync is None:
            return observe_store(self.root, busy_timeout=self.busy_timeout)
        now = self.clock()
        if self.cache is None:
            return self._full(now, None)
        if now - self._full_at >= self.full_every:
            return self._full(now, f"every {self.full_every:g}s")
        entries, elapsed = len(self.cache.results), now - self._verified_at
        verify = elapsed >= self.resync / max(-(-entries // self.verify_batch), 1)
        # What is due: every entry once a resync interval. Looks that come often verify a slice
        # each; one that comes an interval after the last verifies them all.
        # Rounded first: a look exactly a slice's time later is due a slice, not a slice and one.
        due = math.ceil(round(entries * elapsed / self.resync, 6)) if self.resync > 0 else entries
        batch = max(self.verify_batch, min(entries, due))
        try:
            state = observe_store(
                self.root,
                busy_timeout=self.busy_timeout,
                cache=self.cache,
                verify=verify,
                verify_batch=batch,
            )
        except VerifyError as e:
            return self._full(now, f"after an error while verifying: {e}")
        if verify:
            self._verified_at = now
        return state

    def _full(self, now: float, why: str | None) -> StoreState:
        if why is not None:
            log.info("store: full read of %s (cache dropped) %s", self.root, why)
        self.cache = ReadCache()
        try:
            state = observe_store(self.root, busy_timeout=self.busy_timeout, cache=self.cache)
        except BaseException:
            self.cache = None  # half-filled: the next look reads everything again
            raise
        self._full_at = self._verified_at = now
        return state

    def has_entry(self, area: str, entry_id: str) -> bool:
        return entry_exists(self.root, area, entry_id)

    def remove_tmp_entry(self, entry_id: str) -> Result:
        return self.cleaner.remove_tmp_entry(entry_id)

    def remove_cache_tmp(self, name: str) -> Result:
        return self.cleaner.remove_cache_tmp(name)

    def empty_trash(self) -> tuple[TrashLeft, ...]:
        return self.cleaner.leftovers()
