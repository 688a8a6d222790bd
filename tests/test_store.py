"""The store observer: layerinfo as Sexplib writes it, the store layout, the DB read-only."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.adapters import platform
from controller.adapters import store as store_module
from controller.adapters.store import FsStore, ReadCache, check_store, observe_store, read_db, read_layerinfo
from controller.model.errors import LayerinfoError, StoreReadError, StoreSanityError
from controller.model.records import StoreState
from tests.support.world import create_store, layerinfo_text

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WIN = "C:\\ProgramData\\containerd\\root\\io.containerd.snapshotter.v1.windows\\snapshots\\"


def fixture(name: str) -> Path:
    path = FIXTURES / "layerinfo" / name
    assert path.exists(), f"fixture {path} is missing from tests/fixtures/"
    return path


def test_windows_step_layerinfo_from_sexplib() -> None:
    li = read_layerinfo(fixture("step.layerinfo"))
    assert li.snapshot_key == "obuilder-2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
    assert li.source == WIN + "4711"
    assert li.parent_layer_paths == tuple(WIN + str(n) for n in range(4710, 4696, -1))


def test_base_noparents_emptysource_and_linux_fixtures() -> None:
    base = read_layerinfo(fixture("base.layerinfo"))
    assert base.snapshot_key.startswith("obuilder-base-9f86d0")
    assert base.parent_layer_paths == (WIN + "3", WIN + "2", WIN + "1")
    assert read_layerinfo(fixture("noparents.layerinfo")).parent_layer_paths == ()
    empty = read_layerinfo(fixture("emptysource.layerinfo"))
    assert (empty.snapshot_key, empty.source, empty.parent_layer_paths) == ("obuilder-def", "", ())
    linux = read_layerinfo(fixture("linux.layerinfo"))
    assert linux.source == "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/7/fs"


@pytest.mark.parametrize(
    ("quoted", "value"),
    [
        (r'"a\\b"', "a\\b"),
        (r'"say \"hi\""', 'say "hi"'),
        (r'"tab\there"', "tab\there"),
        (r'"nl\nx"', "nl\nx"),
        (r'"bs\bx"', "bs\bx"),
        (r'"cr\rx"', "cr\rx"),
        (r'"\065\066"', "AB"),
        (r'"\x41\x6a"', "Aj"),
        (r'"it\'s"', "it's"),
        (r'"a\ b"', "a b"),
        (r'"keep\q"', "keep\\q"),
        ('"C:\\\\obuilder\\\\very\\\n      long"', "C:\\obuilder\\verylong"),
        ('"crlf\\\r\n\t  joined"', "crlfjoined"),
        (r'"caf\195\169"', "café"),
        ('"(parens) and ;semi"', "(parens) and ;semi"),
    ],
)
def test_every_ocaml_escape_in_quoted_atoms(tmp_path: Path, quoted: str, value: str) -> None:
    path = tmp_path / "layerinfo"
    path.write_bytes(f"((snapshot_key k) (source {quoted}) (parent_layer_paths ()))".encode())
    assert read_layerinfo(path).source == value


def test_comments_and_field_order_do_not_matter(tmp_path: Path) -> None:
    path = tmp_path / "layerinfo"
    path.write_text(
        "; written by hand\n#| a block #| nested |# comment |#\n"
        "((parent_layer_paths (a #;ignored b)) (source s) (snapshot_key obuilder-x))\n"
    )
    li = read_layerinfo(path)
    assert (li.snapshot_key, li.source, li.parent_layer_paths) == ("obuilder-x", "s", ("a", "b"))


def test_round_trip_of_what_the_test_world_writes(tmp_path: Path) -> None:
    path = tmp_path / "layerinfo"
    odd = 'C:\\dir with "quotes"\\and\nnewline'
    path.write_text(layerinfo_text("obuilder-k", odd, ["/plain", "with space"]))
    li = read_layerinfo(path)
    assert (li.source, li.parent_layer_paths) == (odd, ("/plain", "with space"))


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ('((snapshot_key k) (source "open\n', 1, 27, "unterminated quoted atom"),
        ("((snapshot_key k)\n (source s)\n (parent_layer_paths ())", 1, 1, "unclosed '('"),
        ("((snapshot_key k) (source s))", 1, 1, "missing field parent_layer_paths"),
        ("((snapshot_key k) (source s) (parent_layer_paths x))", 1, 50, "expected a list"),
        ("((snapshot_key k) (source s) (parent_layer_paths ()))\n)", 2, 1, "unexpected text after"),
        ('((snapshot_key k) (source "\\999") (parent_layer_paths ()))', 1, 28, "over 255"),
        ('((snapshot_key k) (source "\\xZZ") (parent_layer_paths ()))', 1, 28, "hex"),
        ("((snapshot_key k) (snapshot_key j) (source s) (parent_layer_paths ()))", 1, 19, "duplicate"),
        ("", 1, 1, "unexpected end of input"),
    ],
)
def test_unparsable_layerinfo_names_file_line_and_column(
    tmp_path: Path, text: str, line: int, column: int, words: str
) -> None:
    path = tmp_path / "layerinfo"
    path.write_text(text)
    with pytest.raises(LayerinfoError) as err:
        read_layerinfo(path)
    assert (err.value.path, err.value.line, err.value.column) == (str(path), line, column)
    assert words in err.value.message
    assert str(err.value).startswith(f"{path}:{line}:{column}: ")


def test_store_layout_is_read_with_rootfs_layerinfo_first(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    base = root / "result" / "b1" / "rootfs"
    base.mkdir(parents=True)
    (base / "layerinfo").write_text(layerinfo_text("obuilder-base-b1", "/x/1", []))
    (root / "result" / "b1" / "layerinfo").write_text(layerinfo_text("wrong", "/x/2", []))
    (root / "result" / "s1").mkdir()
    (root / "result-tmp" / "pulling" / "rootfs").mkdir(parents=True)
    (root / "result-tmp" / "broken").mkdir()
    (root / "result-tmp" / "broken" / "layerinfo").write_text("((snapshot_key")
    (root / "cache-tmp" / "3-opam").mkdir()
    state = observe_store(root)
    results = {e.id: e for e in state.results}
    assert results["b1"].snapshot_keys == ("obuilder-base-b1",)
    assert results["s1"].layerinfo is None and results["s1"].snapshot_keys == ("obuilder-s1",)
    tmp = {e.id: e for e in state.tmp}
    assert tmp["pulling"].has_rootfs and "obuilder-base-pulling" in tmp["pulling"].snapshot_keys
    assert tmp["broken"].layerinfo_error is not None and "broken/layerinfo:1:" in tmp["broken"].layerinfo_error
    assert tmp["broken"].changed_at is not None
    assert state.cache_tmp == ("3-opam",)


def test_symlinked_entry_is_recorded_not_followed(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "layerinfo").write_text(layerinfo_text("obuilder-victim", "/v", []))
    os.symlink(outside, root / "result-tmp" / "link")
    (entry,) = observe_store(root).tmp
    assert entry.is_link and entry.layerinfo is None


@pytest.mark.parametrize("cached", [False, True], ids=["full reads", "cached reads"])
def test_a_store_changing_under_the_scan_is_read_whole(tmp_path: Path, cached: bool) -> None:
    # A live worker ends builds (result-tmp/ID renamed to result/ID), cancels them and prunes
    # results while we read. No scan may fail, and none may miss a build that existed all along:
    # a missed one would make its snapshot look orphaned.
    root = create_store(tmp_path / "store")
    for i in range(40):
        (root / "result" / f"kept{i}").mkdir()
        (root / "result" / f"kept{i}" / "layerinfo").write_text(layerinfo_text(f"obuilder-kept{i}", "/k", []))
    created, gone = [0], [0]  # builds made so far; builds removed so far (in order)
    stop = threading.Event()

    def worker() -> None:
        i = 0
        while not stop.is_set():
            tmp = root / "result-tmp" / f"b{i}"
            tmp.mkdir()
            (tmp / "layerinfo").write_text(layerinfo_text(f"obuilder-b{i}", "/b", []))
            created[0] = i + 1
            if i >= 3:  # a few builds run at once; the oldest ends
                os.rename(root / "result-tmp" / f"b{i - 3}", root / "result" / f"b{i - 3}")
            if i >= 6:
                gone[0] = i - 5  # counted as gone from the moment its pruning starts
                shutil.rmtree(root / "result" / f"b{i - 6}")  # pruned, oldest first
            i += 1

    thread = threading.Thread(target=worker)
    thread.start()
    scans = 0
    store = FsStore(root, resync=3600)
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            alive_from, alive_to = gone[0], created[0]
            state = store.observe() if cached else observe_store(root)
            alive_from = gone[0]  # anything pruned during the scan may be missing
            seen = {e.id for e in (*state.results, *state.tmp)}
            missing = [f"b{i}" for i in range(alive_from, alive_to) if f"b{i}" not in seen]
            assert not missing, f"scan {scans} missed builds that existed throughout it: {missing}"
            # A result is whole when it is renamed in; one being pruned reads as whatever is left of it.
            assert [e.layerinfo_error for e in state.results if e.layerinfo_error] == []
            scans += 1
    finally:
        stop.set()
        thread.join()
    assert scans > 20 and created[0] > 100, (scans, created[0])


@pytest.mark.parametrize("missing", ["result", "state/db/db.sqlite"])
def test_a_root_that_is_not_a_store_is_refused(tmp_path: Path, missing: str) -> None:
    root = create_store(tmp_path / "store")
    target = root / missing
    if target.is_dir():
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(StoreSanityError, match="does not look like an OBuilder store"):
        check_store(root)


def test_db_is_read_without_writing_or_creating_files(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    db = root / "state" / "db" / "db.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO builds VALUES ('x', 'now', 'now', 2, NULL)")
    conn.commit()
    conn.close()
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in db.parent.iterdir()}
    rows = read_db(db)
    assert [(r.id, r.rc) for r in rows] == [("x", 2)]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in db.parent.iterdir()}
    assert after == before


def test_db_open_by_a_live_worker_is_read_through_its_wal(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    db = root / "state" / "db" / "db.sqlite"
    worker = sqlite3.connect(db)  # the worker keeps it open: -wal and -shm exist
    worker.execute("INSERT INTO builds VALUES ('live', 'now', 'now', 0, NULL)")
    worker.commit()
    try:
        assert [r.id for r in read_db(db)] == ["live"]
    finally:
        worker.close()


# -- the read cache: a pass from the cache sees what a full read would --------------------------

_IDS = ("a", "b", "c", "d", "e", "f", "g")
#: Small, so that a store of a few entries takes several verifications to cover.
_BATCH = 3
_STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "start",
                "finish",
                "cancel",
                "prune",
                "rebuild",
                "renamed over",
                "rewritten",
                "rootfs",
                "row",
                "unrow",
                "cycle",
            ]
        ),
        st.sampled_from(_IDS),
        st.booleans(),  # whether the look after it is a resync (it verifies a slice)
    ),
    max_size=25,
)


def _result(root: Path, build: str, key: str) -> None:
    """OBuilder's way: result-tmp/ID with its layerinfo, renamed to result/ID."""
    tmp = root / "result-tmp" / build
    tmp.mkdir(exist_ok=True)
    (tmp / "layerinfo").write_text(layerinfo_text(key, f"/snap/{key}", []))
    os.rename(tmp, root / "result" / build)


def _after_a_tick(root: Path) -> None:
    """Wait until the file clock has passed now, so that what is changed next gets stamps later
    than any read so far: what a test with RACY_NS at 0 needs (a kernel stamps files from a
    coarse clock; on one with fine-grained stamps this returns at once)."""
    t = time.time_ns()
    probe = root / "tick"
    probe.touch()
    while probe.stat().st_mtime_ns <= t:
        time.sleep(0.001)
        probe.touch()
    probe.unlink()


def _change(root: Path, op: str, build: str, generation: dict[str, int]) -> bool:
    """One thing a worker (or someone) does to the store; True when ``result/build`` is then a
    folder that did not exist before (a new inode): a look must see it at once."""
    result, tmp = root / "result" / build, root / "result-tmp" / build
    generation[build] += 1
    key = f"obuilder-{build}-v{generation[build]}"
    if op == "start" and not tmp.exists():
        tmp.mkdir()
        (tmp / "layerinfo").write_text(layerinfo_text(key, f"/snap/{build}", []))
    elif op == "finish" and tmp.exists() and not result.exists():
        os.rename(tmp, result)
        return True
    elif op == "cancel" and tmp.exists():
        shutil.rmtree(tmp)
    elif op == "prune" and result.exists():
        shutil.rmtree(result)
    elif op == "rebuild" and result.exists():
        # Pruned and rebuilt under the same id, its snapshot under another key this time: Linux
        # gives the new folder the freed inode number back, often. Seen within a cycle.
        shutil.rmtree(result)
        _result(root, build, key)
    elif op == "renamed over" and result.exists() and not tmp.exists():
        _folder_renamed_over(result)  # made beside the old one: a new inode
        return True
    elif op == "rewritten" and result.exists():
        (result / "layerinfo").write_text(layerinfo_text(key, "/snap/rewritten", []))  # in place
    elif op == "rootfs" and result.exists() and not (result / "rootfs").exists():
        (result / "rootfs").mkdir()
        (result / "rootfs" / "layerinfo").write_text(layerinfo_text(key, "/snap/base", []))
    elif op in ("row", "unrow"):
        db = sqlite3.connect(root / "state" / "db" / "db.sqlite")
        with db:
            if op == "row":
                db.execute("INSERT OR REPLACE INTO builds VALUES (?, '', '', 0, NULL)", (build,))
            else:
                db.execute("DELETE FROM builds WHERE id = ?", (build,))
        db.close()
    return False


def _a_slice_later(store: FsStore) -> float:
    """How long after a verification the next slice is due: looks this far apart verify a slice
    each (one later verifies what is due since, up to every entry)."""
    assert store.cache is not None and store.resync
    return store.resync / max(1, math.ceil(len(store.cache.results) / store.verify_batch))


def _cycle(store: FsStore, now: list[float]) -> StoreState:
    """A whole verification cycle: ceil(entries / verify_batch) resyncs, every entry stat-ed."""
    assert store.cache is not None and store.cache.state is not None
    for _ in range(max(1, math.ceil(len(store.cache.state.results) / store.verify_batch))):
        now[0] += store.resync or 0
        state = store.observe()
    return state


@settings(max_examples=40, deadline=None)
@given(steps=_STEPS, settled=st.booleans())
def test_a_cached_look_sees_what_a_full_read_sees_on_a_store_that_changes(
    steps: list[tuple[str, str, bool]], settled: bool
) -> None:
    """Entries that come, go or are renamed over are seen at the very next look, verifying or
    not; what changes in place, once a whole verification cycle has gone round. ``settled``:
    no stamp is racy (each change comes a tick of the file clock after the last read), so only
    the slices verify; else what was read within RACY_NS of its stamps is verified every time."""
    root = create_store(Path(tempfile.mkdtemp(prefix="obr-cache-")))
    try:
        with pytest.MonkeyPatch.context() as patch:
            if settled:
                patch.setattr(store_module, "RACY_NS", 0)
            for build in _IDS[:4]:
                _result(root, build, f"obuilder-{build}")
            now = [0.0]
            store = FsStore(root, resync=5, verify_batch=_BATCH, clock=lambda: now[0])
            store.observe()
            cache = store.cache
            assert cache is not None
            generation = dict.fromkeys(_IDS, 0)
            for op, build, verifying in steps:
                if settled:
                    _after_a_tick(root)
                if op == "cycle":
                    assert _cycle(store, now) == observe_store(root)
                    continue
                new_folder = _change(root, op, build, generation)
                now[0] += _a_slice_later(store) if verifying else 0
                seen, full = store.observe(), observe_store(root)
                assert [e.id for e in seen.results] == [e.id for e in full.results], (op, build)
                assert (seen.tmp, seen.cache_tmp, seen.db_rows) == (full.tmp, full.cache_tmp, full.db_rows)
                if new_folder:
                    assert {e.id: e for e in seen.results}[build] == {e.id: e for e in full.results}[build]
                if settled and verifying:
                    assert cache.last_verified <= _BATCH, "a slice, nothing racy"
            if settled:
                _after_a_tick(root)
            assert _cycle(store, now) == observe_store(root)
            assert store.cache is cache, "never a full read"
            if settled:
                assert cache.reads <= 4 + len(steps), "each change read once"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_cached_look_reads_only_what_changed(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    for n in range(50):
        _result(root, f"r{n}", f"obuilder-r{n}")
    store = FsStore(root, resync=3600)
    first = store.observe()
    assert store.cache is not None and (store.cache.reads, store.cache.hits) == (50, 0)
    _result(root, "new", "obuilder-new")
    second = store.observe()
    assert (store.cache.reads, store.cache.hits) == (51, 50)
    assert {e.id for e in second.results} - {e.id for e in first.results} == {"new"}


def _settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """No stamp counts as racy: what these tests write is older than any tick that follows."""
    monkeypatch.setattr(store_module, "RACY_NS", 0)


def test_a_resync_verifies_the_cache_and_reads_only_what_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _settled(monkeypatch)
    root = create_store(tmp_path / "store")
    for n in range(20):
        _result(root, f"r{n}", f"obuilder-r{n}")
    now = [0.0]
    store = FsStore(root, resync=300, full_every=3000, clock=lambda: now[0])
    store.observe()
    cache = store.cache
    assert cache is not None and (cache.reads, cache.hits) == (20, 0)
    now[0] = 301
    with caplog.at_level(logging.INFO, logger="reconcile"):
        store.observe()
    assert store.cache is cache and (cache.reads, cache.hits, cache.verified) == (20, 20, 20), "verified, not read"
    assert not caplog.records, "a verification is not a full read"
    time.sleep(0.02)  # a later tick of the file clock
    li = root / "result" / "r3" / "layerinfo"
    li.write_text(li.read_text().replace("obuilder-r3", "obuilder-x3"))  # in place: the folder keeps its stamps
    now[0] = 601
    state = store.observe()
    assert state.results[[e.id for e in state.results].index("r3")].snapshot_keys == ("obuilder-x3",)
    assert (cache.reads, cache.hits) == (21, 39)


def test_a_true_full_read_every_full_every_and_after_an_error_while_verifying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _settled(monkeypatch)
    root = create_store(tmp_path / "store")
    _result(root, "r", "obuilder-r")
    now = [0.0]
    store = FsStore(root, resync=300, full_every=3000, clock=lambda: now[0])
    store.observe()
    first = store.cache
    now[0] = 2999
    store.observe()
    assert store.cache is first
    now[0] = 3000
    with caplog.at_level(logging.INFO, logger="reconcile"):
        store.observe()
    assert store.cache is not first and store.cache is not None
    assert (store.cache.reads, store.cache.hits) == (1, 0), "a full read"
    assert "full read" in caplog.text and "every 3000s" in caplog.text
    caplog.clear()

    real_lstat = os.lstat
    failed: list[object] = []

    def failing_lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if not failed and str(path).endswith("layerinfo"):
            failed.append(path)
            raise OSError(5, "Input/output error", str(path))
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    second = store.cache
    monkeypatch.setattr(os, "lstat", failing_lstat)
    now[0] = 3400  # a resync: verifies, an EIO
    with caplog.at_level(logging.INFO, logger="reconcile"):
        state = store.observe()
    assert failed and store.cache is not second and (store.cache.reads, store.cache.hits) == (1, 0)
    assert "after an error while verifying" in caplog.text and "Input/output error" in caplog.text
    assert state == observe_store(root)


def _same_size_same_mtime(entry: Path) -> None:
    li = entry / "layerinfo"
    before = li.stat()
    text = li.read_text()
    li.write_text(text.replace("obuilder-", "obuildeR-"))  # same length, in place: same inode
    os.utime(li, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = li.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def _renamed_over(entry: Path) -> None:
    folder = entry.stat()
    (entry / "layerinfo.new").write_text(layerinfo_text(f"obuilder-new-{entry.name}", "/snap/new", []))
    os.replace(entry / "layerinfo.new", entry / "layerinfo")
    os.utime(entry, ns=(folder.st_atime_ns, folder.st_mtime_ns))


def _folder_renamed_over(entry: Path) -> None:
    folder = entry.stat()
    new = entry.parent.parent / "result-tmp" / (entry.name + ".new")
    new.mkdir()
    (new / "layerinfo").write_text(layerinfo_text(f"obuilder-{entry.name}-rebuilt", "/snap/rebuilt", []))
    os.utime(new, ns=(folder.st_atime_ns, folder.st_mtime_ns))
    os.rename(entry, entry.parent.parent / "gone")  # (rename onto a folder needs it empty)
    os.rename(new, entry)
    shutil.rmtree(entry.parent.parent / "gone")


def _rootfs_appears(entry: Path) -> None:
    folder = entry.stat()
    (entry / "rootfs").mkdir()
    (entry / "rootfs" / "layerinfo").write_text(layerinfo_text(f"obuilder-base-{entry.name}", "/snap/base", []))
    os.utime(entry, ns=(folder.st_atime_ns, folder.st_mtime_ns))


def _rootfs_goes(entry: Path) -> None:
    folder = entry.stat()
    shutil.rmtree(entry / "rootfs")
    os.utime(entry, ns=(folder.st_atime_ns, folder.st_mtime_ns))


@pytest.mark.parametrize("racy", [False, True], ids=["a later tick", "within the same tick"])
@pytest.mark.parametrize(
    "change",
    [_same_size_same_mtime, _renamed_over, _folder_renamed_over, _rootfs_appears],
    ids=["same size and mtime", "layerinfo renamed over", "folder renamed over", "rootfs appears"],
)
def test_a_change_under_any_stamp_is_seen_within_a_verification_cycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[Path], None], racy: bool
) -> None:
    """A layerinfo can change without its folder's stamps changing: a verification stats it,
    when the entry's slice comes round (the folder renamed over: a new inode, at once).
    Within the same tick of the file clock, the stamps can all be equal: what was read within
    RACY_NS of its stamps is verified at every verification and read again, never trusted."""
    if not racy:
        _settled(monkeypatch)
    root = create_store(tmp_path / "store")
    for n in range(5):
        _result(root, f"r{n}", f"obuilder-r{n}")
    entry = root / "result" / "r2"
    now = [0.0]
    store = FsStore(root, resync=5, verify_batch=2, clock=lambda: now[0])
    store.observe()
    cache = store.cache
    assert cache is not None
    if not racy:
        time.sleep(0.02)  # a later tick of the file clock: the stamps alone must tell
    before = observe_store(root)
    change(entry)
    looks = []
    for _ in range(3):  # ceil(5 / 2): slices r0 r1, r2 r3, r4 r0
        now[0] += _a_slice_later(store)
        looks.append(store.observe())
    assert store.cache is cache, "verifications, not a full read"
    assert looks[-1] == observe_store(root) != before
    if change is _folder_renamed_over or racy:
        assert looks[0] == looks[-1], "a new inode, or racy stamps: seen at the next look"
    else:
        assert looks[0] == before, "in place: seen when its slice comes round, not before"
        assert looks[1] == looks[-1]
        assert cache.reads == 6, "only the changed entry is read again"
    now[0] += 5
    assert store.observe() == observe_store(root)
    assert store.cache is cache


def test_rootfs_that_goes_is_seen_by_the_next_verifying_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _settled(monkeypatch)
    root = create_store(tmp_path / "store")
    _result(root, "r", "obuilder-r")
    (root / "result" / "r" / "rootfs").mkdir()
    now = [0.0]
    store = FsStore(root, resync=5, clock=lambda: now[0])
    assert store.observe().results[0].has_rootfs
    time.sleep(0.02)
    _rootfs_goes(root / "result" / "r")
    now[0] = 5
    assert not store.observe().results[0].has_rootfs
    assert store.cache is not None and store.cache.reads == 2


def test_a_reread_db_reuses_unchanged_rows_and_equals_a_full_read(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    db = sqlite3.connect(root / "state" / "db" / "db.sqlite")
    with db:
        for n in range(10):
            db.execute("INSERT INTO builds VALUES (?, '', '', 0, NULL)", (f"b{n}",))
        db.execute("INSERT INTO builds VALUES ('weird', '', '', 1, NULL)")
    store = FsStore(root, resync=3600)
    first = store.observe().db_rows
    with db:
        db.execute("INSERT INTO builds VALUES ('b10', '', '', 0, 'b1')")
        db.execute("UPDATE builds SET rc = 'one' WHERE id = 'weird'")  # not what OBuilder writes
    db.close()
    second = store.observe().db_rows
    assert second == observe_store(root).db_rows
    assert second[0] is first[0], "an unchanged row is reused"
    assert next(r for r in second if r.id == "weird").rc is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"(" * 5000, "1:65: lists nested deeper than 64"),
        (b"#; " * 20000 + b"x", "datum comment"),
        (b"((snapshot_key " + b"k" * 70_000 + b"))", "1:16: atom longer than 65536 bytes"),
        (b'((source "' + b"s" * 70_000 + b'"))', "1:10: atom longer than 65536 bytes"),
        (b" " * (1024 * 1024 + 1), "1:1: larger than 1024 KiB"),
    ],
    ids=["deep", "datum comments", "long atom", "long quoted atom", "huge"],
)
def test_a_hostile_layerinfo_is_unreadable_with_its_place_never_a_crash(
    tmp_path: Path, text: bytes, message: str
) -> None:
    path = tmp_path / "layerinfo"
    path.write_bytes(text)
    with pytest.raises(LayerinfoError) as caught:
        read_layerinfo(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_datum_comments_still_drop_the_datum_after_them(tmp_path: Path) -> None:
    path = tmp_path / "layerinfo"
    path.write_bytes(
        b"#; (junk) ((snapshot_key k) #; (skipped x) (source s) #; #; a b (parent_layer_paths (p #; q))) #; tail"
    )
    li = read_layerinfo(path)
    assert (li.snapshot_key, li.source, li.parent_layer_paths) == ("k", "s", ("p",))


def test_one_entry_that_cannot_be_read_fails_that_entry_not_the_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = create_store(tmp_path / "store")
    for build in ("a", "broken", "c"):
        _result(root, build, f"obuilder-{build}")
    from controller.adapters import store as store_module

    real = store_module._read_entry

    def flaky(path: Path, area: str, st: os.stat_result) -> object:
        if path.name == "broken":
            raise OSError(5, "Input/output error")
        return real(path, area, st)

    monkeypatch.setattr(store_module, "_read_entry", flaky)
    state = observe_store(root)
    by_id = {e.id: e for e in state.results}
    assert by_id["a"].layerinfo is not None and by_id["c"].layerinfo is not None
    assert by_id["broken"].layerinfo_error == f"{root / 'result' / 'broken'}: cannot read: Input/output error"


def test_a_50_mb_layerinfo_costs_a_read_of_one_mebibyte_not_fifty(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    (root / "result" / "big").mkdir()
    (root / "result" / "big" / "layerinfo").write_bytes(b"(" + b"a" * (50 * 1024 * 1024) + b")")

    def read_bytes() -> int:
        # What this process read through read(2), as Linux counts it.
        line = next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:"))
        return int(line.split()[1])

    before = read_bytes()
    state = observe_store(root, cache=ReadCache())
    read = read_bytes() - before
    assert state.results[0].layerinfo_error is not None and "larger than 1024 KiB" in state.results[0].layerinfo_error
    assert read < 2 * 1024 * 1024, f"read {read:,} bytes for one oversized layerinfo"


def test_an_unchanged_store_is_the_very_same_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a pass derives from the state can be kept by identity: nothing changed, same object."""
    _settled(monkeypatch)
    root = create_store(tmp_path / "store")
    for n in range(5):
        _result(root, f"r{n}", f"obuilder-r{n}")
    now = [0.0]
    store = FsStore(root, resync=5, clock=lambda: now[0])
    first = store.observe()
    assert store.observe() is first
    now[0] = 5  # a verification that finds nothing changed
    assert store.observe() is first
    time.sleep(0.02)
    _result(root, "z-new", "obuilder-z-new")
    second = store.observe()
    assert second is not first and second == observe_store(root)
    assert all(a is b for a, b in zip(first.results, second.results[:5], strict=True)), "unchanged entries are kept"


class _CountedEntry:
    """An ``os.DirEntry`` whose ``stat()`` is recorded (the real one cannot be patched)."""

    def __init__(self, entry: os.DirEntry[str], stat_ed: list[str]) -> None:
        self._entry, self._stat_ed = entry, stat_ed
        self.name, self.path = entry.name, entry.path

    def inode(self) -> int:
        return self._entry.inode()

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        self._stat_ed.append(self.path)
        return self._entry.stat(follow_symlinks=follow_symlinks)


class _CountedListing:
    def __init__(self, listing: Iterator[os.DirEntry[str]], stat_ed: list[str]) -> None:
        self._it, self._stat_ed = listing, stat_ed

    def __enter__(self) -> Iterator[_CountedEntry]:
        return (_CountedEntry(e, self._stat_ed) for e in self._it)

    def __exit__(self, *exc: object) -> None:
        pass


@dataclass
class _Calls:
    """What this process stats (os.stat, os.lstat, a listing's stat()) and lists (os.scandir)."""

    stat_ed: list[str] = field(default_factory=list)
    listed: list[str] = field(default_factory=list)

    def clear(self) -> None:
        self.stat_ed.clear()
        self.listed.clear()


def _record_calls(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    calls = _Calls()
    real_stat, real_lstat, real_scandir = os.stat, os.lstat, os.scandir

    def recorded(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def call(path: str | os.PathLike[str], *args: object, **kwargs: object) -> os.stat_result:
            calls.stat_ed.append(os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    def listing(path: str | os.PathLike[str] = ".") -> _CountedListing:
        calls.listed.append(os.fspath(path))
        with real_scandir(path) as it:
            return _CountedListing(iter(list(it)), calls.stat_ed)

    monkeypatch.setattr(os, "stat", recorded(real_stat))
    monkeypatch.setattr(os, "lstat", recorded(real_lstat))
    monkeypatch.setattr(os, "scandir", listing)
    return calls


def _entries_stat_ed(calls: _Calls, root: Path) -> set[str]:
    """The result/ entries whose folder, or anything in it, was stat-ed."""
    result = str(root / "result") + os.sep
    return {p[len(result) :].split(os.sep)[0] for p in calls.stat_ed if p.startswith(result)}


def test_a_look_after_result_changed_stats_only_what_is_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build ending changes result/: the look lists names and their identities (no call per
    entry), and stats only the new one; not 30 (or 50,000) folders."""
    root = create_store(tmp_path / "store")
    for n in range(30):
        _result(root, f"r{n}", f"obuilder-r{n}")
    store = FsStore(root, resync=3600)
    store.observe()
    _result(root, "z-new", "obuilder-z-new")
    calls = _record_calls(monkeypatch)
    state = store.observe()
    assert _entries_stat_ed(calls, root) == {"z-new"}
    assert str(root / "result") in calls.listed
    assert "z-new" in [e.id for e in state.results]
    assert state == observe_store(root)
    assert store.cache is not None and store.cache.verified == 0


def test_a_result_pruned_then_made_again_under_its_name_is_read_again(tmp_path: Path) -> None:
    """A pruned entry is forgotten at the look that no longer lists it: when its name comes back,
    in a folder that may have the old one's inode number (Linux reuses it at once), it is new."""
    root = create_store(tmp_path / "store")
    for name in ("a", "r", "z"):
        _result(root, name, f"obuilder-{name}")
    store = FsStore(root, resync=3600)
    store.observe()
    shutil.rmtree(root / "result" / "r")
    assert [e.id for e in store.observe().results] == ["a", "z"]
    _result(root, "r", "obuilder-r-again")
    assert store.observe() == observe_store(root)


def test_a_verification_stats_one_slice_and_a_cycle_covers_every_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settled(monkeypatch)
    root = create_store(tmp_path / "store")
    names = [f"r{n}" for n in range(10)]
    for name in names:
        _result(root, name, f"obuilder-{name}")
    now = [0.0]
    store = FsStore(root, resync=5, verify_batch=3, clock=lambda: now[0])
    store.observe()
    cache = store.cache
    assert cache is not None
    calls = _record_calls(monkeypatch)
    slices = []
    for _ in range(4):  # ceil(10 / 3)
        calls.clear()
        now[0] += _a_slice_later(store)
        store.observe()
        slices.append(sorted(_entries_stat_ed(calls, root)))
        assert cache.last_verified == 3
        assert str(root / "result") not in calls.listed, "result/ unchanged: its last listing stands"
    # In name order, each slice where the last one stopped, round to the first name.
    assert slices == [names[0:3], names[3:6], names[6:9], sorted([names[9], *names[0:2]])]
    assert set().union(*slices) == set(names)
    # An entry read within RACY_NS of its stamps is verified at every verification, slice or not.
    monkeypatch.setattr(store_module, "RACY_NS", 60 * 10**9)
    _result(root, "z-new", "obuilder-z-new")
    store.observe()  # not a resync: the listing reads the new entry, racy
    calls.clear()
    now[0] += _a_slice_later(store)
    store.observe()
    assert sorted(_entries_stat_ed(calls, root)) == [*names[2:5], "z-new"]
    assert cache.last_verified == 4 and store.cache is cache


def test_the_slices_are_spread_over_the_resync_interval_so_a_whole_cycle_fits_in_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big store's entries are each verified once a resync interval, as when a verification
    was whole: with 9 entries in slices of 3 and a 30 s interval, a slice is due every 10 s."""
    _settled(monkeypatch)
    root = create_store(tmp_path / "store")
    names = [f"r{n}" for n in range(9)]
    for name in names:
        _result(root, name, f"obuilder-{name}")
    now = [0.0]
    store = FsStore(root, resync=30, verify_batch=3, clock=lambda: now[0])
    store.observe()
    calls = _record_calls(monkeypatch)
    seen: list[list[str]] = []
    for _ in range(6):  # a look every 5 s for one interval
        calls.clear()
        now[0] += 5
        store.observe()
        seen.append(sorted(_entries_stat_ed(calls, root)))
    assert seen == [[], names[0:3], [], names[3:6], [], names[6:9]]
    # A daemon that looks only once an interval (nothing asks for a pass) verifies all that is due.
    now[0] += 30
    calls.clear()
    store.observe()
    assert sorted(_entries_stat_ed(calls, root)) == names


def test_result_going_away_while_it_is_read_fails_the_look_rather_than_look_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unmount between the store's check and its listing: every result would look pruned."""
    root = create_store(tmp_path / "store")
    _result(root, "r0", "obuilder-r0")
    real_scandir = os.scandir

    def gone(path: Any) -> Any:
        if str(path).endswith("result"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_scandir(path)

    store = FsStore(root, resync=5, clock=lambda: 0.0)
    monkeypatch.setattr(os, "scandir", gone)
    with pytest.raises(StoreReadError, match="went away"):
        observe_store(root)
    with pytest.raises(StoreReadError, match="went away"):
        store.observe()


def test_a_store_no_bigger_than_a_slice_is_verified_whole_at_every_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settled(monkeypatch)
    root = create_store(tmp_path / "store")
    for n in range(3):
        _result(root, f"r{n}", f"obuilder-r{n}")
    now = [0.0]
    store = FsStore(root, resync=5, verify_batch=3, clock=lambda: now[0])
    store.observe()
    calls = _record_calls(monkeypatch)
    for _ in range(2):
        calls.clear()
        now[0] += 5
        store.observe()
        assert _entries_stat_ed(calls, root) == {"r0", "r1", "r2"}
    with pytest.raises(ValueError, match="verify_batch"):
        FsStore(root, resync=5, verify_batch=0)


@dataclass(frozen=True)
class _FindData:
    """What FindNextFile gives for an entry, as ``os.DirEntry.stat()`` returns it on Windows."""

    st_mtime_ns: int
    st_ctime_ns: int  # the creation time, on Windows
    st_file_attributes: int
    st_ino: int = 0  # "always set to zero" in a listing's stat on Windows
    #: Python 3.12+: the creation time (st_ctime_ns is deprecated as such, and read 0 from a
    #: listing on 3.12.0-3.12.2, CPython gh-117267); None here stands for 3.11, which has none.
    st_birthtime_ns: int | None = None


class _WindowsEntry:
    """An ``os.DirEntry`` as Windows gives it: ``stat(follow_symlinks=False)`` is the listing's
    own data; ``inode()`` and following a reparse point each cost a system call."""

    def __init__(self, name: str, data: _FindData) -> None:
        self.name, self._data = name, data

    def inode(self) -> int:
        raise AssertionError("inode() is a system call on Windows")

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return bool(self._data.st_file_attributes & 0x10)

    def stat(self, *, follow_symlinks: bool = True) -> _FindData:
        if follow_symlinks:
            raise AssertionError("following a reparse point is a system call")
        return self._data


def test_the_windows_identity_is_the_listings_own_data_and_tells_a_rebuilt_folder() -> None:
    folder = _FindData(st_mtime_ns=1_000, st_ctime_ns=500, st_file_attributes=0x10)
    assert platform.windows_identities([_WindowsEntry("a", folder)]) == [("a", (1_000, 500, 0x10))]
    changed = [
        replace(folder, st_ctime_ns=2_000),  # deleted and made again: a new creation time
        replace(folder, st_mtime_ns=2_000),  # something written in it
        replace(folder, st_file_attributes=0x10 | 0x400),  # now a junction
    ]
    identities = {platform.windows_identities([_WindowsEntry("a", d)])[0][1] for d in [folder, *changed]}
    assert len(identities) == 4
    # On 3.12.0-3.12.2 a listing's st_ctime_ns reads 0: the creation time comes from st_birthtime_ns.
    on_312 = replace(folder, st_ctime_ns=0, st_birthtime_ns=500)
    rebuilt = replace(on_312, st_birthtime_ns=2_000)
    assert [platform.windows_identities([_WindowsEntry("a", d)])[0][1] for d in (on_312, rebuilt)] == [
        (1_000, 500, 0x10),
        (1_000, 2_000, 0x10),
    ]


def test_the_posix_identity_is_the_inode_and_kind_the_listing_gives(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    os.symlink(tmp_path / "folder", tmp_path / "link")
    with os.scandir(tmp_path) as it:
        listed = dict(platform.posix_identities(it))
    for name, ident in listed.items():
        st = os.lstat(tmp_path / name)
        assert ident == (st.st_ino, name == "folder"), name
    expected = platform.windows_identities if platform.IS_WINDOWS else platform.posix_identities
    assert platform.listed_identities is expected
