"""DESIGN.md's keep rules and safety invariants, one test a rule, none needing containerd.

Each test names the rule it defends; ``tools/mutate.py`` breaks each rule on purpose and
expects the test named in its mutant to fail. What they assert is what a user sees: what a
pass removes or leaves, what it reports, what ``--explain`` says keeps a snapshot.

In daemon mode nothing is old enough to go until this process has watched it (see
``controller/core/ages.py``), so a fresh daemon plan keeps every snapshot; there the rule
that keeps a snapshot shows in which rule ``--explain`` names, and in the ``result-tmp/``
entries and containers the plan removes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.adapters.ctr import Ctr, CtrSettings
from controller.adapters.store_cleanup import TRASH_DIR, StoreCleaner
from controller.core.executor import PassResult, execute
from controller.core.identity import RemovalGuard
from controller.core.planner import plan
from controller.model.outcome import Outcome
from controller.model.plan import Kind, Mode, Plan, PlanOptions, Rule, TmpRemoval
from controller.model.records import (
    Container,
    ContainerdState,
    LayerInfo,
    Observation,
    Snapshot,
    StoreEntry,
    StoreState,
    Task,
    TaskStatus,
)
from tests.support.fake import FakeContainerd, FakeStore
from tests.support.fake_ctr import PIPE, WORLD_ENV, load, new_world, save
from tests.support.world import create_store

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
LONG_AGO = NOW - timedelta(days=2)
WINDOWS_SNAPSHOTS = "C:\\ProgramData\\containerd\\root\\io.containerd.snapshotter.v1.windows\\snapshots\\"
FAKE_CTR = Path(__file__).parent / "support" / "bin" / "ctr.exe"


# -- worlds ------------------------------------------------------------------------------


def snap(key: str, parent: str | None = None, kind: str = "Committed") -> Snapshot:
    return Snapshot(key=key, parent=parent, kind=kind)


def entry(
    area: str,
    build: str,
    *,
    key: str | None = None,
    source: str | None = None,
    error: str | None = None,
    rootfs: bool = False,
) -> StoreEntry:
    """``result/ID`` or ``result-tmp/ID`` as the store observer reads it (a layerinfo, or one that does not parse)."""
    info = None
    if error is None:
        info = LayerInfo(
            snapshot_key=key or f"obuilder-{build}", source=source or f"/snapshots/{build}/fs", parent_layer_paths=()
        )
    return StoreEntry(
        id=build,
        area="result" if area == "result" else "result-tmp",
        layerinfo=info,
        layerinfo_error=error,
        has_rootfs=rootfs,
        changed_at=NOW - timedelta(minutes=1),
    )


def world(
    snapshots: list[Snapshot],
    *,
    results: tuple[StoreEntry, ...] = (),
    tmp: tuple[StoreEntry, ...] = (),
    cache_tmp: tuple[str, ...] = (),
    containers: tuple[Container, ...] = (),
    tasks: tuple[Task, ...] = (),
) -> Observation:
    return Observation(
        store=StoreState(root="/store", results=results, tmp=tmp, cache_tmp=cache_tmp),
        containerd=ContainerdState(snapshots=tuple(snapshots), containers=containers, tasks=tasks),
    )


def plan_of(observation: Observation, mode: Mode, **options: object) -> Plan:
    return plan(observation, PlanOptions.model_validate(options), NOW, mode)


def removed(p: Plan) -> set[str]:
    """Every snapshot the plan removes, now or in a later pass."""
    return set(p.snapshots) | set(p.deferred)


def kept_by(p: Plan, key: str) -> Rule | None:
    """The rule ``--explain KEY`` names as keeping it (None: nothing keeps it)."""
    found = [d for d in p.decision_for(key) if d.kind == Kind.SNAPSHOT and d.keep]
    return found[0].rule if found else None


def explained(p: Plan, key: str) -> str:
    return " ".join(d.reason for d in p.decision_for(key))


# -- the planner's keep rules ----------------------------------------------------------------


def test_rule_1_a_finished_result_keeps_its_committed_snapshot_and_its_chain() -> None:
    """Keep rule 1 (result/ID keeps KEY-committed) and rule 5 (every ancestor of a kept snapshot is kept)."""
    obs = world(
        [
            snap("sha256:layer"),
            snap("obuilder-a-committed", "sha256:layer"),
            snap("obuilder-b-committed", "obuilder-a-committed"),
            snap("obuilder-c-committed", "obuilder-b-committed"),
            snap("obuilder-leak-committed", "obuilder-a-committed"),
        ],
        results=(entry("result", "c"),),
    )
    p = plan_of(obs, Mode.BOOT)
    assert removed(p) == {"obuilder-leak-committed"}
    assert kept_by(p, "obuilder-c-committed") is Rule.RESULT
    assert "result/c" in explained(p, "obuilder-c-committed")
    # The whole chain below the result stays, each explained by it (--explain).
    for ancestor in ("obuilder-b-committed", "obuilder-a-committed"):
        assert kept_by(p, ancestor) is Rule.ANCESTOR, ancestor
        assert "obuilder-c-committed" in explained(p, ancestor)


def test_rule_2_a_live_build_keeps_its_active_and_committed_snapshot_and_its_entry() -> None:
    """Keep rule 2 (daemon): a live result-tmp/ID keeps KEY and KEY-committed, and its entry is not
    treated as an interrupted build (that is boot's reading only)."""
    obs = world(
        [
            snap("obuilder-p-committed"),
            snap("obuilder-t", "obuilder-p-committed", "Active"),
            snap("obuilder-t-committed", "obuilder-p-committed"),
        ],
        tmp=(entry("result-tmp", "t"),),
    )
    daemon = plan_of(obs, Mode.DAEMON)
    assert removed(daemon) == set() and daemon.tmp_entries == ()
    assert kept_by(daemon, "obuilder-t") is Rule.LIVE_BUILD
    assert kept_by(daemon, "obuilder-t-committed") is Rule.LIVE_BUILD
    (tmp,) = daemon.decision_for("t")
    assert tmp.keep and tmp.rule is Rule.LIVE_BUILD
    # At boot the same entry is an interrupted build: it goes after its snapshots.
    boot = plan_of(obs, Mode.BOOT)
    assert [t.id for t in boot.tmp_entries] == ["t"]
    assert removed(boot) == {"obuilder-t", "obuilder-t-committed", "obuilder-p-committed"}


def test_rule_3_protection_by_key_glob_and_by_base_image_reference() -> None:
    """Keep rule 3: the policy protects keys by glob, and a base image by its reference, which maps
    to obuilder-base-SHA256(reference) and its -committed."""
    ref = "ocaml/opam:windows-server-msvc-ltsc2022-ocaml-5.2"
    base = "obuilder-base-" + hashlib.sha256(ref.encode()).hexdigest()
    obs = world(
        [
            snap("sha256:layer"),
            snap(base, "sha256:layer", "Active"),
            snap(base + "-committed", "sha256:layer"),
            snap("obuilder-keep-1", None, "Active"),
            snap("obuilder-keep-2-committed"),
            snap("obuilder-x-committed"),
        ]
    )
    p = plan_of(obs, Mode.BOOT, protect_keys=("obuilder-keep-*",), protect_images=(ref,))
    assert removed(p) == {"obuilder-x-committed"}
    for key in (base, base + "-committed", "obuilder-keep-1", "obuilder-keep-2-committed"):
        assert kept_by(p, key) is Rule.PROTECTED, key
    assert not p.warnings, "both rules match: nothing to report"


def test_rule_4_a_kept_container_keeps_its_snapshot_key() -> None:
    """Keep rule 4: a kept container (daemon, its task running) keeps the snapshot named by its SnapshotKey."""
    obs = world(
        [snap("obuilder-s-committed"), snap("obuilder-run-1", "obuilder-s-committed", "Active")],
        containers=(Container(id="obuilder-run-1", snapshot_key="obuilder-run-1", created_at=LONG_AGO),),
        tasks=(Task(id="obuilder-run-1", status=TaskStatus.RUNNING),),
    )
    p = plan_of(obs, Mode.DAEMON)
    assert removed(p) == set() and p.containers == ()
    assert kept_by(p, "obuilder-run-1") is Rule.CONTAINER
    assert "container obuilder-run-1" in explained(p, "obuilder-run-1")
    assert kept_by(p, "obuilder-s-committed") is Rule.ANCESTOR


def test_rule_4_a_container_on_a_builds_folder_by_root_path_keeps_that_build() -> None:
    """Keep rule 4 (Linux): a kept container whose root path is the folder a build's layerinfo names
    (another spelling of it) keeps that build's KEY and KEY-committed."""
    obs = world(
        [
            snap("obuilder-p-committed"),
            snap("obuilder-t", "obuilder-p-committed", "Active"),
            snap("obuilder-t-committed", "obuilder-p-committed"),
        ],
        tmp=(entry("result-tmp", "t", source="/var/lib/containerd/snapshots/7/fs"),),
        containers=(Container(id="obuilder-run-2", root_path="/var/lib/containerd/snapshots/7/fs/", created_at=NOW),),
        tasks=(Task(id="obuilder-run-2", status=TaskStatus.RUNNING),),
    )
    p = plan_of(obs, Mode.DAEMON)
    assert removed(p) == set() and p.tmp_entries == () and p.containers == ()
    for key in ("obuilder-t", "obuilder-t-committed"):
        assert kept_by(p, key) is Rule.CONTAINER, key
        assert "obuilder-run-2" in explained(p, key) and "result-tmp/t" in explained(p, key)


def test_rule_4_a_windows_container_keeps_the_build_of_its_last_layer_folder() -> None:
    """Keep rule 4 (Windows): layerFolders lists the parents first and the step's own folder last; the
    last one, spelled any way Windows accepts, names the build the container runs on."""
    ref_folder, own_folder = WINDOWS_SNAPSHOTS + "3", WINDOWS_SNAPSHOTS + "9"
    obs = world(
        [
            snap("obuilder-base-b-committed"),
            snap("obuilder-t", "obuilder-base-b-committed", "Active"),
        ],
        results=(entry("result", "b", key="obuilder-base-b", source=ref_folder, rootfs=True),),
        tmp=(entry("result-tmp", "t", source=own_folder.lower().replace("\\", "/")),),
        containers=(Container(id="obuilder-run-3", layer_folders=(ref_folder, own_folder), created_at=NOW),),
        tasks=(Task(id="obuilder-run-3", status=TaskStatus.RUNNING),),
    )
    p = plan_of(obs, Mode.DAEMON)
    assert removed(p) == set()
    assert kept_by(p, "obuilder-t") is Rule.CONTAINER
    assert "obuilder-run-3" in explained(p, "obuilder-t")
    # Its parent layer's build is kept for what it is, a result, not as the container's own folder.
    assert kept_by(p, "obuilder-base-b-committed") is Rule.RESULT


def test_a_snapshot_we_do_not_own_keeps_its_owned_parent() -> None:
    """An owned snapshot under a snapshot we do not own is kept: it cannot go without touching that child."""
    obs = world(
        [
            snap("obuilder-q-committed"),
            snap("buildkit-child", "obuilder-q-committed", "Active"),
            snap("obuilder-o-committed"),
        ]
    )
    p = plan_of(obs, Mode.BOOT)
    assert removed(p) == {"obuilder-o-committed"}
    assert kept_by(p, "obuilder-q-committed") is Rule.FOREIGN_CHILD
    assert "buildkit-child" in explained(p, "obuilder-q-committed")


def test_an_unreadable_layerinfo_keeps_the_keys_obuilder_could_have_used() -> None:
    """A result/ whose layerinfo does not parse keeps every key OBuilder could have used for it
    (obuilder-ID, obuilder-base-ID for a base, each with -committed), at boot too; only an
    interrupted result-tmp/ entry goes at boot, by the keys OBuilder derives from its id."""
    broken = "layerinfo:1:14: unexpected end of input"
    obs = world(
        [
            snap("obuilder-r"),
            snap("obuilder-r-committed"),
            snap("obuilder-base-b"),
            snap("obuilder-base-b-committed"),
            snap("obuilder-u", None, "Active"),
        ],
        results=(entry("result", "r", error=broken), entry("result", "b", error=broken, rootfs=True)),
        tmp=(entry("result-tmp", "u", error=broken),),
    )
    p = plan_of(obs, Mode.BOOT)
    assert removed(p) == {"obuilder-u"} and [t.id for t in p.tmp_entries] == ["u"]
    for key in ("obuilder-r", "obuilder-r-committed", "obuilder-base-b", "obuilder-base-b-committed"):
        assert kept_by(p, key) is Rule.UNREADABLE, key
    assert any("unreadable layerinfo" in w for w in p.warnings)


def test_daemon_a_container_whose_task_runs_is_never_disturbed() -> None:
    """Daemon: a live build is never disturbed. A container whose task is live stays, however old,
    when the policy sets no maxTaskAge."""
    obs = world(
        [],
        containers=(
            Container(id="obuilder-run-1", created_at=LONG_AGO),
            Container(id="obuilder-run-2", created_at=LONG_AGO),
        ),
        tasks=(
            Task(id="obuilder-run-1", status=TaskStatus.RUNNING),
            Task(id="obuilder-run-2", status=TaskStatus.PAUSED),
        ),
    )
    p = plan_of(obs, Mode.DAEMON)
    assert p.containers == ()
    assert {d.name: d.rule for d in p.kept(Kind.CONTAINER)} == {
        "obuilder-run-1": Rule.RUNNING,
        "obuilder-run-2": Rule.RUNNING,
    }


def test_cache_tmp_is_purged_at_boot_only() -> None:
    """cache-tmp/ holds only leftovers when the worker is down (boot); beside a running worker it is its own."""
    obs = world([], cache_tmp=("0-c-opam-archives", "1-c-cygwin"))
    assert plan_of(obs, Mode.DAEMON).cache_tmp == ()
    assert [c.name for c in plan_of(obs, Mode.BOOT).cache_tmp] == ["0-c-opam-archives", "1-c-cygwin"]


def test_ownership_what_lacks_our_prefixes_is_never_touched() -> None:
    """Owned objects are snapshots whose key starts with obuilder- and containers whose id starts with
    obuilder-run-: nothing else is ever removed, whatever the records hold."""
    obs = world(
        [snap("sha256:layer"), snap("buildkit-leak"), snap("obuilder_tmp"), snap("obuilder-o-committed")],
        containers=(Container(id="obuilder-runner-1"), Container(id="obuilder-run-3")),
    )
    p = plan_of(obs, Mode.BOOT)
    assert removed(p) == {"obuilder-o-committed"}
    assert [c.id for c in p.containers] == ["obuilder-run-3"]


# -- the last look before removal (daemon) ----------------------------------------------


def doomed(*keys: str, stale_tmp: tuple[str, ...] = ()) -> Plan:
    """A daemon plan removing ``keys`` (independent orphans, containerd's Created read long ago)
    and the stale ``result-tmp/`` entries ``stale_tmp``."""
    return Plan(
        mode=Mode.DAEMON,
        snapshot_levels=(tuple(sorted(keys)),),
        snapshot_reasons=dict.fromkeys(keys, "orphan: nothing keeps it"),
        snapshot_parents=dict.fromkeys(keys),
        snapshot_created=dict.fromkeys(keys, LONG_AGO),
        tmp_entries=tuple(TmpRemoval(id=i, after=(), reason="stale") for i in stale_tmp),
    )


def containerd_with(*keys: str) -> FakeContainerd:
    return FakeContainerd(parents=dict.fromkeys(keys), created=dict.fromkeys(keys, LONG_AGO))


def run_with_last_look(p: Plan, fake: FakeContainerd, store: FakeStore) -> tuple[PassResult, dict[str, Outcome]]:
    result = execute(p, fake, store, guard=RemovalGuard(fake, store.has_entry), batch=16)
    return result, {r.name: r.outcome for r in result.results if r.kind == Kind.SNAPSHOT}


def test_last_look_a_key_recreated_since_planned_is_not_removed() -> None:
    """The last look: a key deleted and re-created since planned (build ids repeat: another Created)
    is another snapshot, a live build's; it stays, and that is no failure."""
    fake = containerd_with("obuilder-x", "obuilder-y")
    store = FakeStore(StoreState(root="/s"))
    p = doomed("obuilder-x", "obuilder-y")
    fake.recreate("obuilder-x", None, NOW)  # OBuilder retries build x: snapshot rm, snapshot prepare
    result, outcome = run_with_last_look(p, fake, store)
    assert outcome == {"obuilder-x": Outcome.CHANGED, "obuilder-y": Outcome.REMOVED}
    assert set(fake.parents) == {"obuilder-x"}
    assert not result.failures()


def test_last_look_a_result_that_appeared_since_planned_keeps_its_keys() -> None:
    """The last look: result/ID appearing since planned (the build finished) keeps its keys,
    KEY-committed included; the rest of the batch goes."""
    fake = containerd_with("obuilder-y-committed", "obuilder-z")
    store = FakeStore(StoreState(root="/s"))
    p = doomed("obuilder-y-committed", "obuilder-z")
    store.state = store.state.model_copy(update={"results": (entry("result", "y"),)})
    result, outcome = run_with_last_look(p, fake, store)
    assert outcome == {"obuilder-y-committed": Outcome.CHANGED, "obuilder-z": Outcome.REMOVED}
    assert set(fake.parents) == {"obuilder-y-committed"}
    assert not result.failures()


def test_last_look_a_result_tmp_that_appeared_since_planned_keeps_its_keys() -> None:
    """The last look: result-tmp/ID appearing since planned (a build of that id started) keeps its
    keys; a stale entry the same plan removes does not hold its own keys back."""
    fake = containerd_with("obuilder-t-committed", "obuilder-s")
    store = FakeStore(StoreState(root="/s", tmp=(entry("result-tmp", "s"),)))
    p = doomed("obuilder-t-committed", "obuilder-s", stale_tmp=("s",))
    store.state = store.state.model_copy(update={"tmp": (*store.state.tmp, entry("result-tmp", "t"))})
    result, outcome = run_with_last_look(p, fake, store)
    assert outcome == {"obuilder-t-committed": Outcome.CHANGED, "obuilder-s": Outcome.REMOVED}
    assert set(fake.parents) == {"obuilder-t-committed"}
    assert store.has_entry("result-tmp", "t") and not store.has_entry("result-tmp", "s")
    assert not result.failures()


def test_last_look_a_key_gone_before_its_removal_is_done_not_stuck() -> None:
    """The last look: a key that went before its removal (OBuilder's prune took it) is done,
    "not found", never reported stuck."""
    fake = containerd_with("obuilder-x", "obuilder-y")
    store = FakeStore(StoreState(root="/s"))
    p = doomed("obuilder-x", "obuilder-y")
    del fake.parents["obuilder-x"]
    result, outcome = run_with_last_look(p, fake, store)
    assert outcome == {"obuilder-x": Outcome.NOT_FOUND, "obuilder-y": Outcome.REMOVED}
    assert not result.failures()


# -- removing store entries ------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return create_store(tmp_path / "store")


def trash_of(root: Path) -> list[str]:
    folder = root.joinpath(*TRASH_DIR)
    return sorted(os.listdir(folder)) if folder.exists() else []


def precious(folder: Path) -> Path:
    """A folder outside the store whose content must survive."""
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "data").write_text("keep me")
    return folder / "sub" / "data"


@pytest.fixture
def unmount_after(tmp_path: Path) -> Iterator[None]:
    """Whatever a test mounted under tmp_path (wherever the folder went since) is unmounted after it."""
    yield
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        target = line.split(" ")[1].replace("\\040", " ")
        if target.startswith(str(tmp_path)):
            subprocess.run(["umount", "-l", target], check=False)


def test_an_entry_with_a_mount_inside_is_left_whole(store: Path, tmp_path: Path, unmount_after: None) -> None:
    """The store cleaner never enters a file system mounted inside an entry (it shows what lies
    elsewhere): the entry is left whole where it is, and the failure says to unmount it."""
    data = precious(tmp_path / "outside")
    entry_dir = store / "result-tmp" / "mounted"
    (entry_dir / "inner").mkdir(parents=True)
    (entry_dir / "log").write_text("building...")
    bound = subprocess.run(["mount", "--bind", str(data.parent.parent), str(entry_dir / "inner")], check=False)
    if bound.returncode != 0:
        assert not os.environ.get("CI"), "CI runs as root: a bind mount must work there"
        pytest.skip("cannot bind-mount here (not root?)")
    result = StoreCleaner(store).remove_tmp_entry("mounted")
    assert result.outcome is Outcome.FAILED and "mounted" in result.message
    assert (entry_dir / "log").read_text() == "building..."
    assert (entry_dir / "inner" / "sub" / "data").read_text() == "keep me"
    assert trash_of(store) == []


@pytest.mark.parametrize("area", ["result-tmp", "cache-tmp"])
def test_an_area_that_is_a_link_out_of_the_store_is_never_followed(store: Path, tmp_path: Path, area: str) -> None:
    """An area (result-tmp/, cache-tmp/) that is itself a link out of the store is never followed:
    an entry reached through it is not removed."""
    elsewhere = tmp_path / "elsewhere"
    data = precious(elsewhere / "x")
    (store / area).rmdir()
    os.symlink(elsewhere, store / area)
    cleaner = StoreCleaner(store)
    result = cleaner.remove_tmp_entry("x") if area == "result-tmp" else cleaner.remove_cache_tmp("x")
    assert result.outcome is Outcome.FAILED and "outside the store" in result.message
    assert data.read_text() == "keep me"
    assert trash_of(store) == []


def test_a_cache_tmp_entry_is_removed_and_nothing_else(store: Path) -> None:
    """Removing cache-tmp/NAME removes that entry of cache-tmp/ and nothing else (not result-tmp/NAME)."""
    for area in ("cache-tmp", "result-tmp"):
        (store / area / "3-opam").mkdir()
        (store / area / "3-opam" / "f").write_text(area)
    assert StoreCleaner(store).remove_cache_tmp("3-opam").outcome is Outcome.REMOVED
    assert not os.path.lexists(store / "cache-tmp" / "3-opam")
    assert (store / "result-tmp" / "3-opam" / "f").read_text() == "result-tmp"


@pytest.mark.parametrize("name", ["../result", "..", "a/../../result", "", "."])
def test_a_name_that_is_not_a_plain_entry_name_removes_nothing(store: Path, name: str) -> None:
    """A name read from disk is data: one that is not a plain entry name (a separator, `..`) is
    refused, and nothing of the store is moved or removed."""
    (store / "result" / "r").mkdir()
    (store / "result" / "r" / "layerinfo").write_text("((snapshot_key obuilder-r))")
    before = sorted(str(p.relative_to(store)) for p in store.rglob("*"))
    result = StoreCleaner(store).remove_tmp_entry(name)
    assert result.outcome is Outcome.FAILED and "not a plain entry name" in result.message
    assert sorted(str(p.relative_to(store)) for p in store.rglob("*")) == before


@pytest.mark.parametrize("area", ["result-tmp", "cache-tmp"])
def test_an_entry_that_is_a_link_is_removed_as_a_link(store: Path, tmp_path: Path, area: str) -> None:
    """An entry that is itself a link (a symlink; a junction on Windows) is removed as a link:
    what it points to, outside the store, is never entered."""
    data = precious(tmp_path / "outside")
    os.symlink(tmp_path / "outside", store / area / "evil-link")
    cleaner = StoreCleaner(store)
    result = cleaner.remove_tmp_entry("evil-link") if area == "result-tmp" else cleaner.remove_cache_tmp("evil-link")
    assert result.outcome is Outcome.REMOVED, result.message
    assert not os.path.lexists(store / area / "evil-link")
    assert data.read_text() == "keep me"


# -- ctr: what it removed, and names passed as data --------------------------------------


@pytest.fixture
def fake_ctr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Ctr, Path]]:
    """The product's Ctr on the fake ctr.exe (containerd 2.x's texts, urfave/cli's flag parsing)."""
    path = tmp_path / "world.json"
    save(path, new_world(epoch=NOW))
    monkeypatch.setenv(WORLD_ENV, str(path))
    yield Ctr(CtrSettings(ctr=str(FAKE_CTR), address=PIPE, namespace="default", snapshotter="windows")), path


def change(path: Path, **fields: object) -> None:
    world_ = load(path)
    world_.update(fields)
    save(path, world_)


def test_a_container_removal_that_fails_without_naming_ids_counts_none_removed(fake_ctr: tuple[Ctr, Path]) -> None:
    """`containers rm` and `tasks delete` log one line per id that failed; a failure with no such
    line (containerd not answering) says nothing of any id: none is counted removed."""
    ctr, path = fake_ctr
    ids = ["obuilder-run-1", "obuilder-run-2"]
    change(
        path,
        containers={i: {"folder": n} for n, i in enumerate(ids)},
        tasks={i: {"status": "STOPPED"} for i in ids},
        down=True,
    )
    for results in (ctr.delete_tasks(ids), ctr.remove_containers(ids)):
        assert set(results) == set(ids)
        assert not [i for i, r in results.items() if r.outcome.done], results
        assert all("failed to dial" in r.message for r in results.values())
    assert sorted(load(path)["containers"]) == ids


def test_a_snapshot_removal_that_fails_without_naming_a_key_counts_none_removed(fake_ctr: tuple[Ctr, Path]) -> None:
    """`snapshots rm` stops at the key that failed and names it; a failure naming no key says
    nothing of any key: none is counted removed."""
    ctr, path = fake_ctr
    keys = ["obuilder-a", "obuilder-b"]
    change(path, snapshots={k: {"folder": n} for n, k in enumerate(keys)}, down=True)
    results = ctr.remove_snapshots(keys)
    assert set(results) == set(keys)
    assert not [k for k, r in results.items() if r.outcome.done], results
    assert sorted(load(path)["snapshots"]) == keys


def test_a_key_with_blanks_is_removed_whole_and_never_split(fake_ctr: tuple[Ctr, Path]) -> None:
    """A snapshot key may hold blanks: it is listed whole and removed whole, and the snapshot whose
    key is its first word is never touched."""
    ctr, path = fake_ctr
    change(path, snapshots={"obuilder-a b": {"folder": 1}, "obuilder-a": {"folder": 2}})
    assert {s.key for s in ctr.snapshots()} == {"obuilder-a b", "obuilder-a"}
    results = ctr.remove_snapshots(["obuilder-a b"])
    assert {k: r.outcome for k, r in results.items()} == {"obuilder-a b": Outcome.REMOVED}
    assert sorted(load(path)["snapshots"]) == ["obuilder-a"]


def test_names_are_never_read_as_options(fake_ctr: tuple[Ctr, Path]) -> None:
    """A name read from disk or containerd is passed after `--`: a key or id that starts with `-`
    is asked about and removed as the object it names, never read as a flag."""
    ctr, path = fake_ctr
    created = "2026-11-27T09:30:00.123456Z"
    change(
        path,
        snapshots={"-looks-like-a-flag": {"folder": 1, "created": created}},
        containers={"-x": {"folder": 2}},
        tasks={"-x": {"status": "STOPPED"}},
    )
    assert ctr.snapshot_created(["-looks-like-a-flag"]) == {"-looks-like-a-flag": datetime.fromisoformat(created)}
    assert ctr.remove_snapshots(["-looks-like-a-flag"])["-looks-like-a-flag"].outcome is Outcome.REMOVED
    assert ctr.delete_tasks(["-x"])["-x"].outcome is Outcome.REMOVED
    assert ctr.remove_containers(["-x"])["-x"].outcome is Outcome.REMOVED
    state = load(path)
    assert (state["snapshots"], state["containers"], state["tasks"]) == ({}, {}, {})
    assert not state["unsupported"]
