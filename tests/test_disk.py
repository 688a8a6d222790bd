"""Disk truth: folders in the snapshotter's folder that containerd's metadata does not know.

On the real daemon, a layer folder containerd's garbage collector could not delete (a file
in it made immutable, as a file in use is on Windows) stays as ``rm-<id>`` while ``ctr``
says the snapshot is gone: the observer reports it with its bytes. The Windows-shaped
cases (``parentLayerPaths``, the ``windows`` snapshotter's folder) run against a ctr stub.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from controller.adapters.ctr import Ctr, CtrSettings
from controller.adapters.disk import (
    CLAIM_PROBES,
    FOLDER_PROBES,
    DiskObserver,
    ReclaimLedger,
    layer_ids,
    mount_paths,
    tree_bytes,
)
from controller.adapters.store import observe_store
from controller.model.disk import DiskDrift, UnknownFolder
from controller.model.records import ContainerdState
from tests.support.cli import reconcile_on
from tests.support.containerd import SNAPSHOTTER, PrivateContainerd
from tests.support.world import World

WIN = "C:\\ProgramData\\containerd\\root\\io.containerd.snapshotter.v1.windows\\snapshots\\"


# -- reading paths --------------------------------------------------------------------


def test_the_folder_and_ids_come_from_the_layer_paths_containerd_reports() -> None:
    paths = [WIN + "4711", WIN + "12", "C:\\elsewhere\\x", WIN.replace("windows", "native") + "9"]
    assert layer_ids(paths, "windows") == (WIN.rstrip("\\"), {"4711", "12"})
    linux = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/7/fs"
    assert layer_ids([linux], "overlayfs") == (
        "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots",
        {"7"},
    )
    assert layer_ids([linux], "native") == (None, set())


def test_mount_paths_reads_the_source_and_windows_parent_layers() -> None:
    native = "mount -t bind /r/io.containerd.snapshotter.v1.native/snapshots/2 /t -o rbind,rw\n"
    assert list(mount_paths(native)) == ["/r/io.containerd.snapshotter.v1.native/snapshots/2"]
    as_json = [(WIN + n).replace("\\", "\\\\") for n in ("8", "7")]
    windows = f'mount -t windows-layer {WIN}9 target -o rw,parentLayerPaths=["{as_json[0]}","{as_json[1]}"]\n'
    assert list(mount_paths(windows)) == [WIN + "9", WIN + "8", WIN + "7"]


def test_tree_bytes_follows_no_link_and_counts_a_hard_link_once(tmp_path: Path) -> None:
    layer = tmp_path / "rm-3"
    (layer / "Files" / "deep").mkdir(parents=True)
    (layer / "Files" / "a").write_bytes(b"a" * 1000)
    (layer / "Files" / "deep" / "b").write_bytes(b"b" * 234)
    os.link(layer / "Files" / "a", layer / "Files" / "a-again")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"x" * 50_000)
    os.symlink(outside, layer / "Files" / "to-outside")
    os.symlink(outside / "big", layer / "big-link")
    assert tree_bytes(str(layer)) == 1234
    assert tree_bytes(str(tmp_path / "gone")) == 0


def test_tree_bytes_tolerates_files_vanishing_mid_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = tmp_path / "rm-4"
    for sub in ("a", "b", "c"):
        (layer / sub).mkdir(parents=True)
        (layer / sub / "f").write_bytes(b"f" * 100)
    real_scandir = os.scandir

    def scandir_that_loses_b(path: str) -> object:
        # The garbage collector deletes "b" between our listing of rm-4 and our walk into it.
        if os.path.basename(path) == "b":
            for name in os.listdir(path):
                os.unlink(os.path.join(path, name))
            os.rmdir(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_that_loses_b)
    assert tree_bytes(str(layer)) == 200


# -- the observer against a ctr stub (Windows-shaped) ----------------------------------


class StubCtr(Ctr):
    """Answers the calls the disk observer makes from a table of (argv tail) -> stdout."""

    def __init__(self, namespace: str, answers: dict[tuple[str, ...], str]) -> None:
        super().__init__(CtrSettings(ctr="ctr.exe", namespace=namespace, snapshotter="windows"))
        self.answers = answers

    def run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls += 1
        out = self.answers.get(tuple(args))
        if out is None:
            return subprocess.CompletedProcess(list(args), 1, "", f"ctr: unexpected {list(args)}: not found\n")
        return subprocess.CompletedProcess(list(args), 0, out, "")


def windows_world(tmp_path: Path, folders: dict[str, int]) -> tuple[str, DiskObserver]:
    """A windows snapshotter's folder on this disk, and a ctr that lists three snapshots:
    an image layer (1), a committed step (2) and an active one on it (3)."""
    snaps = tmp_path / "root" / "io.containerd.snapshotter.v1.windows" / "snapshots"
    for name, size in folders.items():
        (snaps / name / "Files").mkdir(parents=True)
        (snaps / name / "Files" / "data").write_bytes(b"x" * size)
    folder = str(snaps)
    parents = ",".join(f'"{folder}/{n}"' for n in ("2", "1"))
    rows = [
        ("KEY", "PARENT", "KIND"),
        ("obuilder-3", "obuilder-2-committed", "Active"),
        ("obuilder-2-committed", "sha256:abc", "Committed"),
        ("sha256:abc", "", "Committed"),
    ]
    table = "".join(f"{k:<24}{p:<24}{kind}\n" for k, p, kind in rows)  # as Go's tabwriter aligns them
    answers = {
        ("namespaces", "ls", "--quiet"): "default\n",
        ("snapshots", "--snapshotter", "windows", "ls"): table,
        ("snapshots", "--snapshotter", "windows", "mounts", "--", "target", "obuilder-3"): (
            f"mount -t windows-layer {folder}/3 target -o rw,parentLayerPaths=[{parents}]\n"
        ),
    }
    ctr = StubCtr("default", answers)
    return folder, DiskObserver(ctr, for_namespace=lambda name: StubCtr(name, answers))


def test_windows_rm_and_unclaimed_folders_are_named_with_their_bytes(tmp_path: Path) -> None:
    folder, observer = windows_world(tmp_path, {"1": 10, "2": 20, "3": 30, "4": 4000, "rm-5": 500, "new-77": 7})
    drift = observer.observe()  # no layer path from the store: the active snapshot's mounts name the folder
    assert drift.folder == folder
    assert (drift.snapshots, drift.snapshot_folders) == (3, 4)
    assert drift.unknown == (
        UnknownFolder(name="new-77", reason="unfinished", size_bytes=7),
        UnknownFolder(name="rm-5", reason="removed", size_bytes=500),
        UnknownFolder(name="4", reason="unclaimed", size_bytes=4000),
    )
    assert (drift.unknown_bytes, drift.removed_bytes, drift.unattributed) == (4507, 500, 0)
    assert drift.by_reason() == {
        "removed": (1, 500),
        "unfinished": (1, 7),
        "not-a-snapshot": (0, 0),
        "unclaimed": (1, 4000),
    }
    assert observer.calls == 3  # namespaces, one listing, one mounts


def busy_world(tmp_path: Path, active: int, *, elsewhere: bool = False) -> tuple[Path, DiskObserver, list[str]]:
    """A windows snapshotter's folder holding one folder per snapshot: an image layer (1) and
    ``active`` builds running on it, whose mounts name the folder (or, ``elsewhere``, another
    snapshotter's: a store whose layer paths do not match). Returns the names ctr was made."""
    snaps = tmp_path / "root" / "io.containerd.snapshotter.v1.windows" / "snapshots"
    for n in range(1, active + 2):
        (snaps / str(n)).mkdir(parents=True)
    named = str(snaps).replace(".windows", ".other") if elsewhere else str(snaps)
    rows = [("KEY", "PARENT", "KIND"), ("sha256:abc", "", "Committed")]
    rows += [(f"obuilder-{n}", "sha256:abc", "Active") for n in range(2, active + 2)]
    answers = {
        ("namespaces", "ls", "--quiet"): "default\n",
        ("snapshots", "--snapshotter", "windows", "ls"): "".join(f"{k:<24}{p:<24}{kind}\n" for k, p, kind in rows),
    }
    for n in range(2, active + 2):
        answers[("snapshots", "--snapshotter", "windows", "mounts", "--", "target", f"obuilder-{n}")] = (
            f'mount -t windows-layer {named}/{n} target -o rw,parentLayerPaths=["{named}/1"]\n'
        )
    made: list[str] = []

    def for_namespace(name: str) -> Ctr:
        made.append(name)
        return StubCtr(name, answers)

    return snaps, DiskObserver(StubCtr("default", answers), for_namespace=for_namespace), made


def test_one_mount_finds_the_folder_and_the_next_looks_ask_none(tmp_path: Path) -> None:
    # No layer path names the folder (the store's layerinfo sources did not match): one
    # `snapshots mounts` per active snapshot was 25,000 ctr calls a look in a bench.
    folder, observer, made = busy_world(tmp_path, 50)
    drift = observer.observe()
    assert drift.folder == str(folder) and drift.error is None
    assert (drift.snapshots, drift.snapshot_folders, drift.unknown) == (51, 51, ())
    assert observer.calls == 3  # namespaces, one listing, one mounts
    assert observer.observe().folder == str(folder)
    assert observer.calls == 3 + 2, "the folder found is remembered: no mounts asked"
    assert made == ["default"], "the namespace's Ctr is kept, so its listing reuses its records"


def test_mounts_that_never_name_the_folder_cost_a_few_calls_not_one_per_active_snapshot(tmp_path: Path) -> None:
    _, observer, _ = busy_world(tmp_path, 50, elsewhere=True)
    for look in (1, 2):
        drift = observer.observe()
        assert drift.folder is None and drift.snapshots == 51
        assert observer.calls == look * (2 + FOLDER_PROBES)


def test_a_surplus_beside_many_active_snapshots_is_counted_for_a_bounded_number_of_calls(tmp_path: Path) -> None:
    # A folder beyond the snapshots, and 50 active snapshots whose folders no layer path names:
    # naming the extra one would take a `snapshots mounts` of each (one ctr process apiece).
    folder, observer, _ = busy_world(tmp_path, 50)
    (folder / "52").mkdir()
    drift = observer.observe()
    assert (drift.snapshots, drift.snapshot_folders, drift.unattributed, drift.unknown) == (51, 52, 1, ())
    assert observer.calls == 2 + 1 + CLAIM_PROBES


def test_a_remembered_folder_that_went_is_found_again(tmp_path: Path) -> None:
    folder, observer, _ = busy_world(tmp_path, 3)
    assert observer.observe().folder == str(folder)
    moved = tmp_path / "moved"
    folder.parent.parent.rename(moved)  # containerd's root moved
    answers = observer.ctr.answers  # type: ignore[attr-defined]
    for argv, said in answers.items():
        answers[argv] = said.replace(str(folder.parent.parent), str(moved))
    drift = observer.observe()
    assert drift.folder == str(moved / "io.containerd.snapshotter.v1.windows" / "snapshots")
    assert drift.error is None and drift.snapshot_folders == 4


def test_an_unknown_folder_is_walked_again_only_when_it_changed_or_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import controller.adapters.disk as disk

    folder, observer = windows_world(tmp_path, {"1": 1, "2": 2, "3": 3, "rm-5": 500})
    now = [0.0]
    observer.clock, observer.remeasure = (lambda: now[0]), 600.0
    walked: list[str] = []
    real = disk.tree_bytes

    def counted(path: str) -> int:
        walked.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(disk, "tree_bytes", counted)
    assert observer.observe().removed_bytes == 500
    assert observer.observe().removed_bytes == 500
    assert walked == ["rm-5"], "a folder nothing writes to is not walked every pass"
    os.unlink(Path(folder) / "rm-5" / "Files" / "data")
    os.rmdir(Path(folder) / "rm-5" / "Files")  # rm-5's own stamp changes
    assert observer.observe().removed_bytes == 0
    now[0] = 601.0
    assert observer.observe().removed_bytes == 0
    assert walked == ["rm-5", "rm-5", "rm-5"]


def test_tree_bytes_asks_the_file_when_the_listing_has_no_link_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows' folder listing gives no link count or file id: a hard-linked file must still count once."""
    layer = tmp_path / "rm-9"
    (layer / "Windows" / "WinSxS").mkdir(parents=True)
    (layer / "Windows" / "System32").mkdir(parents=True)
    (layer / "Windows" / "WinSxS" / "kernel32.dll").write_bytes(b"k" * 700)
    os.link(layer / "Windows" / "WinSxS" / "kernel32.dll", layer / "Windows" / "System32" / "kernel32.dll")
    real_scandir = os.scandir

    class AsOnWindows:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.entry, self.path, self.name = entry, entry.path, entry.name

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            st = self.entry.stat(follow_symlinks=follow_symlinks)
            return os.stat_result((st.st_mode, 0, 0, 0, 0, 0, st.st_size, 0, 0, 0))

    class Listing:
        def __init__(self, path: str) -> None:
            self.it = real_scandir(path)

        def __enter__(self) -> Listing:
            return self

        def __iter__(self) -> Iterator[AsOnWindows]:
            return (AsOnWindows(e) for e in self.it)

        def __exit__(self, *exc: object) -> None:
            self.it.close()

    monkeypatch.setattr(os, "scandir", Listing)
    assert tree_bytes(str(layer)) == 700


def test_a_surplus_that_cannot_be_told_apart_is_counted_not_named(tmp_path: Path) -> None:
    # Folders 4 and 5 for one snapshot too many: which one is containerd's is not knowable.
    folder, observer = windows_world(tmp_path, {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5})
    layer_paths = [f"{folder}/3"]
    answers = observer.ctr.answers  # type: ignore[attr-defined]
    answers[("snapshots", "--snapshotter", "windows", "ls")] += (
        f"{'obuilder-9-committed':<24}{'sha256:abc':<24}Committed\n"
    )
    drift = observer.observe(layer_paths)
    assert drift.unknown == ()
    assert (drift.snapshots, drift.snapshot_folders, drift.unattributed) == (4, 5, 1)


def test_a_folder_that_cannot_be_found_says_so(tmp_path: Path) -> None:
    _, observer = windows_world(tmp_path, {"1": 1})
    drift = observer.observe([WIN + "3"])  # a Windows path: no such folder on this machine
    assert drift.folder == WIN.rstrip("\\")
    assert drift.error is not None and "cannot list" in drift.error
    assert drift.unknown == ()


def test_reclaimed_bytes_are_what_left_the_disk() -> None:
    ledger = ReclaimLedger()

    def seen(rm_bytes: int) -> DiskDrift:
        return DiskDrift(folder="/f", removed_bytes=rm_bytes, unknown_bytes=rm_bytes)

    assert ledger.account(0, seen(100)) == 0  # the first look is the baseline: older leftovers are not ours
    assert ledger.account(1000, seen(100)) == 1000
    # The collector failed on 600 of those bytes: they are taken back from what follows.
    assert ledger.account(200, seen(700)) == 0
    assert ledger.account(500, seen(700)) == 100
    assert ledger.account(50, None) == 50  # no look at the disk: metadata's word
    # A human removing the rm-* folders is not reclaimed by us, and owes nothing.
    assert ledger.account(10, seen(0)) == 10


# -- the real daemon ------------------------------------------------------------------


def native_folder(containerd: PrivateContainerd) -> Path:
    return containerd.base / "root" / "io.containerd.snapshotter.v1.native" / "snapshots"


def observer_for(containerd: PrivateContainerd, namespace: str) -> DiskObserver:
    settings = CtrSettings(ctr="ctr", address=containerd.address, namespace=namespace, snapshotter=SNAPSHOTTER)
    return DiskObserver(Ctr(settings))


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files made immutable (``chattr +i``: not even root can delete them); made mutable and
    removed with their folder after the test, as an admin would once the holder let go."""
    made: list[Path] = []
    try:
        yield made
    finally:
        for path in made:
            subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
            if path.parent.name.startswith("rm-"):
                subprocess.run(["rm", "-rf", "--", str(path.parent)], check=False)


def _folders(path: Path) -> set[str]:
    return set(os.listdir(path))


@pytest.mark.containerd
def test_a_layer_folder_the_garbage_collector_could_not_delete_is_reported_with_its_bytes(
    world: World, containerd: PrivateContainerd, namespace: str, immutable: list[Path]
) -> None:
    base = world.base("b:disk")
    kept = world.step("kept", base)  # a result: its folder is containerd's and stays unreported
    source, _ = world.prepare("obuilder-leak", base + "-committed")
    stuck = Path(source) / "in-use.dll"
    stuck.write_bytes(b"x" * 123_456)
    made = subprocess.run(["chattr", "+i", str(stuck)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, f"chattr +i is needed to make a folder the GC cannot delete: {made.stderr}"
    immutable.append(Path(source).with_name("rm-" + Path(source).name) / "in-use.dll")
    immutable.append(stuck)
    snapshots = native_folder(containerd)
    before = _folders(snapshots)

    world.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "--", "obuilder-leak")
    # containerd says it is gone; its collector renames the folder and fails to delete it.
    assert "obuilder-leak" not in containerd.snapshot_keys(namespace)
    removed = "rm-" + Path(source).name
    deadline = time.monotonic() + 20
    while removed not in _folders(snapshots) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _folders(snapshots) - before == {removed}, containerd.log_tail()

    store = observe_store(world.root)
    observer = observer_for(containerd, namespace)
    drift = observer.observe_states(ContainerdState(), store)
    assert drift.folder == str(snapshots)
    assert UnknownFolder(name=removed, reason="removed", size_bytes=123_456) in drift.unknown
    known = {layer_ids([e.layerinfo.source], SNAPSHOTTER)[1].pop() for e in store.results if e.layerinfo}
    assert known and not known & {f.name for f in drift.unknown}, "a folder containerd knows was reported"
    assert drift.removed_bytes >= 123_456
    assert kept
    # Reclaimed bytes are what left the disk: a second leak, measured as a pass measures it
    # (``snapshots usage``), leaves its immutable file behind; the rest of it did go.
    assert observer.reclaimed(0, drift) == 0  # the first look is the baseline
    source2, _ = world.prepare("obuilder-leak2", base + "-committed")
    (Path(source2) / "held.dll").write_bytes(b"y" * 50_000)
    immutable.append(Path(source2).with_name("rm-" + Path(source2).name) / "held.dll")
    immutable.append(Path(source2) / "held.dll")
    assert subprocess.run(["chattr", "+i", str(Path(source2) / "held.dll")], check=False).returncode == 0
    usage = observer.ctr.usage(["obuilder-leak2"])["obuilder-leak2"]
    world.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "--", "obuilder-leak2")
    removed2 = "rm-" + Path(source2).name
    deadline = time.monotonic() + 20
    while removed2 not in _folders(snapshots) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = observer.observe_states(ContainerdState(), store)
    assert after.removed_bytes == drift.removed_bytes + 50_000
    assert usage > 50_000
    assert observer.reclaimed(usage, after) == usage - 50_000


@pytest.mark.containerd
def test_stray_folders_are_reported_and_a_surplus_id_is_counted(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    base = world.base("b:stray")
    world.step("kept", base)
    layer_paths = [e.layerinfo.source for e in observe_store(world.root).results if e.layerinfo]
    observer = observer_for(containerd, namespace)
    first = observer.observe(layer_paths)
    snapshots = native_folder(containerd)
    try:
        (snapshots / "rm-7").mkdir()
        (snapshots / "rm-7" / "layer.tar").write_bytes(b"r" * 7000)
        (snapshots / "copy of 3").mkdir()
        (snapshots / "copy of 3" / "f").write_bytes(b"c" * 300)
        (snapshots / "99999").mkdir()
        (snapshots / "99999" / "f").write_bytes(b"n" * 50)
        drift = observer.observe(layer_paths)
    finally:
        for name in ("rm-7", "copy of 3", "99999"):
            subprocess.run(["rm", "-rf", "--", str(snapshots / name)], check=True)
    assert UnknownFolder(name="rm-7", reason="removed", size_bytes=7000) in drift.unknown
    assert UnknownFolder(name="copy of 3", reason="not-a-snapshot", size_bytes=300) in drift.unknown
    assert drift.unknown_bytes == first.unknown_bytes + 7300
    # One id folder too many, among committed snapshots whose folders ctr never names.
    assert drift.snapshot_folders == first.snapshot_folders + 1
    assert drift.unattributed == first.unattributed + 1
    assert drift.snapshots == first.snapshots


@pytest.mark.containerd
def test_without_a_layer_path_from_the_store_the_active_snapshots_mounts_name_the_folder(
    world: World, containerd: PrivateContainerd, namespace: str, measure: Callable[[str], None]
) -> None:
    world.step("live", world.base("b:live"), finish=False)  # an active snapshot, as a build runs
    observer = observer_for(containerd, namespace)
    started = time.perf_counter()
    drift = observer.observe([])
    took = time.perf_counter() - started
    assert drift.folder == str(native_folder(containerd))
    assert drift.error is None and drift.snapshot_folders >= drift.snapshots > 0
    measure(
        f"disk truth: {drift.snapshots} snapshots, {drift.snapshot_folders} folders, "
        f"{observer.calls} ctr calls, {took:.2f} s"
    )


@pytest.mark.containerd
def test_once_reports_a_layer_folder_containerds_collection_could_not_delete(
    world: World, containerd: PrivateContainerd, namespace: str, immutable: list[Path]
) -> None:
    # The worker's view after a boot repair: containerd's records say the orphan went, but its
    # folder stayed (on Windows: a file a leaked compute system holds). The run says so, with bytes.
    from tests.support.cli import reconcile_on

    base = world.base("b:once-disk")
    world.step("kept", base)
    source, _ = world.prepare("obuilder-leak", base + "-committed")
    held = Path(source) / "in-use.dll"
    held.write_bytes(b"x" * 123_456)
    assert subprocess.run(["chattr", "+i", str(held)], capture_output=True, check=False).returncode == 0
    removed = "rm-" + Path(source).name
    immutable += [held, Path(source).with_name(removed) / "in-use.dll"]

    run = reconcile_on(containerd, namespace, world.root, "--once", "--json")
    assert run.code == 0, run.stderr
    summary = run.json["summary"]
    assert summary["removed"]["snapshot"] == 1 and summary["garbage_collection"] == "done"
    unknown = {f["name"]: f for f in summary["disk"]["unknown"]}
    assert unknown[removed] == {"name": removed, "reason": "removed", "size_bytes": 123_456}
    assert summary["disk"]["folder"] == str(native_folder(containerd))

    human = reconcile_on(containerd, namespace, world.root, "--once")
    assert f"{removed} (removed): 123,456 bytes" in human.stdout, human.stdout


def test_the_disk_look_becomes_gauges_by_reason() -> None:
    from datetime import UTC, datetime

    from controller.adapters.metrics import Metrics
    from controller.model.outcome import PassReport
    from controller.model.plan import Mode

    metrics = Metrics()
    text = metrics.exposition().decode()
    assert 'obuilder_reconcile_disk_unknown_bytes{reason="removed"} 0.0' in text  # there from the start
    drift = DiskDrift(
        folder="/root/snapshots",
        unknown=(
            UnknownFolder(name="rm-7", reason="removed", size_bytes=5_000),
            UnknownFolder(name="rm-9", reason="removed", size_bytes=2_000),
            UnknownFolder(name="new-1", reason="unfinished", size_bytes=10),
        ),
    )
    report = PassReport(time=datetime.now(UTC), mode=Mode.DAEMON, number=1, outcome="success", seconds=0.1)
    metrics.pass_finished(report.model_copy(update={"disk": drift}))
    text = metrics.exposition().decode()
    assert 'obuilder_reconcile_disk_unknown_bytes{reason="removed"} 7000.0' in text
    assert 'obuilder_reconcile_disk_unknown_folders{reason="removed"} 2.0' in text
    assert 'obuilder_reconcile_disk_unknown_folders{reason="unfinished"} 1.0' in text
    # A pass that did not look leaves the last look's numbers.
    metrics.pass_finished(report)
    assert 'obuilder_reconcile_disk_unknown_bytes{reason="removed"} 7000.0' in metrics.exposition().decode()


@pytest.mark.containerd
def test_an_entry_whose_files_cannot_be_deleted_leaves_once_at_exit_1_with_its_bytes_and_why(
    world: World, containerd: PrivateContainerd, namespace: str, immutable: list[Path]
) -> None:
    """Removed is not reclaimed: an interrupted build's entry goes from result-tmp/ at once (into our
    trash, so OBuilder never sees it half deleted), but a file in it that cannot be deleted keeps its
    bytes on disk; the run says so, with the bytes and the error, and is not converged."""
    entry = world.root / "result-tmp" / "interrupted"
    entry.mkdir()
    held = entry / "held.log"
    held.write_bytes(b"x" * 54_321)
    made = subprocess.run(["chattr", "+i", str(held)], capture_output=True, text=True, check=False)
    assert made.returncode == 0, f"chattr +i is needed to make a file that cannot be deleted: {made.stderr}"
    trashed = world.root / "state" / "obuilder-reconcile" / "trash" / "result-tmp-interrupted-1"
    immutable.extend([held, trashed / "held.log"])

    run = reconcile_on(containerd, namespace, world.root, "--once", "--json")
    assert run.code == 1, run.stderr
    assert not entry.exists(), "OBuilder would find the entry half deleted"
    (left,) = run.json["summary"]["trash"]
    assert (left["name"], left["size_bytes"]) == ("result-tmp-interrupted-1", 54_321)
    assert "Operation not permitted" in left["error"]
    stuck = {s["name"]: s["reason"] for s in run.json["summary"]["stuck"]}
    assert "54,321 bytes stay on disk" in stuck["result-tmp-interrupted-1"]
    text = reconcile_on(containerd, namespace, world.root, "--once")
    assert text.code == 1 and "54,321 bytes stay on disk" in text.stdout + text.stderr
