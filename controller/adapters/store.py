"""The store observer: reads an OBuilder HCS store into a :class:`StoreState`.

Reads only. The DB is opened read-only with a busy timeout because the worker
writes it; entries that are symlinks or junctions are recorded, never followed.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from controller.adapters import platform
from controller.adapters.sexp import MAX_BYTES, Node, SexpSyntaxError, parse_one, position
from controller.adapters.store_cleanup import StoreCleaner
from controller.model.errors import LayerinfoError, StoreReadError, StoreSanityError
from controller.model.outcome import Result
from controller.model.records import DbRow, LayerInfo, StoreEntry, StoreState

DB_PATH = ("state", "db", "db.sqlite")
_FIELDS = ("snapshot_key", "source", "parent_layer_paths")


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


class ReadCache:
    """What a full read parsed, kept for the next: an informer's cache for the store.

    A ``result/ID`` is written once (renamed from ``result-tmp/``) and never changed in
    place: an entry whose directory has the same inode, mtime and ctime as last time is
    the same entry, and its parsed layerinfo is reused; one removed and re-created
    (rebuilt under the same id) has a new ctime and is read again. The DB is read again
    only when its file or its ``-wal`` changed. Every listing is still whole, so an
    entry that appears or goes is always seen; ``result-tmp/`` entries (few, and
    changing) are always read. The owner drops the cache at each resync for a full read.
    """

    def __init__(self) -> None:
        self.results: dict[str, tuple[tuple[int, ...], StoreEntry]] = {}
        self.db: tuple[tuple[int, ...], tuple[DbRow, ...]] | None = None
        self.hits = 0
        self.reads = 0


def observe_store(root: Path, *, busy_timeout: float = 5.0, cache: ReadCache | None = None) -> StoreState:
    """Read result/, result-tmp/, cache-tmp/ and the DB. Checks sanity first."""
    check_store(root)
    # result-tmp/ before result/: a build that ends mid-scan moves its folder from the
    # first to the second, so it is seen in one of them or both, never in neither.
    tmp = tuple(_read_entries(root / "result-tmp", "result-tmp"))
    results = tuple(_read_entries(root / "result", "result", cache))
    return StoreState(
        root=str(root),
        results=results,
        tmp=tmp,
        cache_tmp=tuple(sorted(_names(root / "cache-tmp"))),
        db_rows=_read_db_cached(root.joinpath(*DB_PATH), busy_timeout, cache),
    )


def _read_db_cached(path: Path, busy_timeout: float, cache: ReadCache | None) -> tuple[DbRow, ...]:
    if cache is None:
        return read_db(path, busy_timeout=busy_timeout)
    key = tuple(_stamp(path.with_name(path.name + suffix)) for suffix in ("", "-wal"))
    flat = tuple(n for part in key for n in part)
    if cache.db is not None and cache.db[0] == flat:
        return cache.db[1]
    rows = read_db(path, busy_timeout=busy_timeout)
    cache.db = (flat, rows)
    return rows


def _stamp(path: Path) -> tuple[int, ...]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1, -1)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def entry_exists(root: Path, area: str, entry_id: str) -> bool:
    """Whether ``root/area/entry_id`` exists (as anything, a link included)."""
    return os.path.lexists(root / area / entry_id)


def read_db(path: Path, *, busy_timeout: float = 5.0) -> tuple[DbRow, ...]:
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
    return tuple(
        DbRow(id=_text(i), rc=rc if type(rc) is int else None, used=_text_or_none(used), parent=_text_or_none(parent))
        for i, rc, used, parent in rows
        if i is not None
    )


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


def _read_entries(folder: Path, area: str, cache: ReadCache | None = None) -> list[StoreEntry]:
    out = []
    seen: dict[str, tuple[tuple[int, ...], StoreEntry]] = {}
    for name, st in _listing(folder):
        key = (st.st_ino, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)
        entry: StoreEntry | None
        if cache is not None and (known := cache.results.get(name)) is not None and known[0] == key:
            entry = known[1]
            cache.hits += 1
        else:
            try:
                entry = _read_entry(folder / name, area, st)
            except OSError as e:
                # One entry that cannot be read (EIO, ELOOP, a permission) fails that entry, not the
                # pass: it is an unreadable entry, kept with every key it could name, and reported.
                entry = StoreEntry(
                    id=name, area=area, layerinfo_error=f"{folder / name}: cannot read: {e.strerror or e}"
                )
            if cache is not None:
                cache.reads += 1
        if entry is None:
            continue
        if cache is not None and entry.layerinfo_error is None:
            seen[name] = (key, entry)
        out.append(entry)
    if cache is not None:
        cache.results = seen  # entries that went are forgotten
    return out


def _listing(folder: Path) -> list[tuple[str, os.stat_result]]:
    """Each entry's name and lstat, sorted; one that goes between the listing and its lstat is
    left out (the store no longer has it). Plain strings, not Path objects: at thousands of
    entries a pass spends its time building paths otherwise."""
    out = []
    try:
        with os.scandir(folder) as it:
            for item in it:
                try:
                    out.append((item.name, item.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
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

    It keeps a :class:`ReadCache` between looks, dropped every ``resync`` seconds for a
    full read (None: no cache, every look reads everything).
    """

    def __init__(
        self,
        root: Path,
        *,
        busy_timeout: float = 5.0,
        resync: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.busy_timeout = busy_timeout
        self.cleaner = StoreCleaner(root)
        self.resync = resync
        self.clock = clock
        self.cache: ReadCache | None = None
        self._full_at = 0.0

    def observe(self) -> StoreState:
        if self.resync is not None and (self.cache is None or self.clock() - self._full_at >= self.resync):
            self.cache, self._full_at = ReadCache(), self.clock()
        return observe_store(self.root, busy_timeout=self.busy_timeout, cache=self.cache)

    def has_entry(self, area: str, entry_id: str) -> bool:
        return entry_exists(self.root, area, entry_id)

    def remove_tmp_entry(self, entry_id: str) -> Result:
        return self.cleaner.remove_tmp_entry(entry_id)

    def remove_cache_tmp(self, name: str) -> Result:
        return self.cleaner.remove_cache_tmp(name)
