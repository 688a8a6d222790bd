"""The planner on worlds written as data: ``tests/cases/*.json`` (observation, options, expected plan)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.core.planner import Claim, base_image_key, path_identity, plan, result_claims
from controller.core.store_index import index_results
from controller.model.plan import Kind, Mode, PlanOptions
from controller.model.records import (
    Container,
    ContainerdState,
    DbRow,
    LayerInfo,
    Observation,
    Snapshot,
    StoreEntry,
    StoreState,
    Task,
    TaskStatus,
)

CASES = sorted((Path(__file__).parent / "cases").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text())
    return case


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case(path: Path) -> None:
    case = load(path)
    expect = case["expect"]
    p = plan(
        Observation.model_validate(case["observation"]),
        PlanOptions.model_validate(case["options"]),
        datetime.fromisoformat(case["now"]),
        Mode(case["mode"]),
    )
    assert [c.id for c in p.containers] == expect["containers"]
    assert [list(level) for level in p.snapshot_levels] == expect["snapshot_levels"]
    assert [t.id for t in p.tmp_entries] == expect["tmp_entries"]
    assert [c.name for c in p.cache_tmp] == expect["cache_tmp"]
    assert list(p.deferred) == expect.get("deferred", [])
    kept = {d.name: d.rule for d in p.kept(Kind.SNAPSHOT)}
    assert kept == expect["kept"]
    if "kept_containers" in expect:
        assert {d.name: d.rule for d in p.decisions if d.kind == "container" and d.keep} == expect["kept_containers"]
    if "drift" in expect:
        assert p.drift.model_dump(mode="json") == expect["drift"]
    assert list(p.pinned) == expect.get("pinned", [])
    assert p.containers_first is expect.get("containers_first", False)
    if "requeue_after" in expect:
        assert p.requeue_after == timedelta(seconds=expect["requeue_after"])
    for words in expect.get("warnings_contain", []):
        assert any(words in w for w in p.warnings), (words, p.warnings)
    # Every action says why, in words.
    assert all(len(p.snapshot_reasons[k]) > 20 for k in p.snapshots)


def test_cases_cover_both_modes_and_windows_shapes() -> None:
    cases = [load(p) for p in CASES]
    assert {c["mode"] for c in cases} == {"boot", "daemon"}
    assert any("layer_folders" in json.dumps(c) for c in cases)


def test_base_image_key_is_the_sha256_of_the_reference() -> None:
    assert base_image_key("mcr.microsoft.com/windows/servercore:ltsc2022") == (
        "obuilder-base-bc3bc8408e84c12c2b5f24aa91b444894b55e26069b66e8034890634b08aef1d"
    )


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("C:\\ProgramData\\Snap\\12", "c:/programdata/snap/12", True),
        ("C:\\ProgramData\\Snap\\12\\", "C:\\ProgramData\\Snap\\12", True),
        ("C:\\ProgramData\\Snap\\12", "C:\\ProgramData\\Snap\\121", False),
        ("/var/lib/x/7/fs", "/var/lib/x/7/fs/", True),
        ("/var/lib/X/7/fs", "/var/lib/x/7/fs", False),
    ],
)
def test_folder_paths_compare_by_their_platform_shape(a: str, b: str, same: bool) -> None:
    assert (path_identity(a) == path_identity(b)) is same


def test_explain_says_why_an_orphan_goes_and_what_keeps_the_rest() -> None:
    case = load(Path(__file__).parent / "cases" / "boot-unreadable-layerinfo-and-drift.json")
    p = plan(
        Observation.model_validate(case["observation"]), PlanOptions(), datetime.fromisoformat(case["now"]), Mode.BOOT
    )
    (zz,) = p.decision_for("obuilder-zz-committed")
    assert not zz.keep and "no result/ entry names it" in zz.reason
    (t2,) = p.decision_for("obuilder-t2")
    assert "interrupted build result-tmp/t2" in t2.reason
    (r1,) = p.decision_for("obuilder-r1-committed")
    assert r1.keep and r1.reason == "result/r1 exists (its snapshot is obuilder-r1)"
    assert {d.kind for d in p.decision_for("t1")} == {"result-tmp"}


# -- what the planner keeps of the store between plans (controller/core/store_index.py) ----------

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def big_store(results: int) -> Observation:
    """Results on chains of committed steps (some steps' results are gone), a few unreadable, a DB
    that disagrees with result/, a live build, a container on a result's folder and a foreign
    child: every rule has something to claim beside the results."""
    snapshots = [Snapshot(key="sha256:base"), Snapshot(key="obuilder-base-b-committed", parent="sha256:base")]
    entries: list[StoreEntry] = []
    for n in range(results):
        parent = "obuilder-base-b-committed" if n % 7 == 0 else f"obuilder-{n - 1:05d}-committed"
        snapshots.append(Snapshot(key=f"obuilder-{n:05d}-committed", parent=parent, created=NOW - timedelta(days=1)))
        if n % 5 == 3:
            continue  # a pruned result: its snapshot is an orphan unless something above keeps it
        info = LayerInfo(snapshot_key=f"obuilder-{n:05d}", source=f"C:\\snap\\{n}", parent_layer_paths=())
        error = "x:1:1: unexpected end of input" if n % 97 == 5 else None
        entries.append(StoreEntry(id=f"{n:05d}", area="result", layerinfo=info, layerinfo_error=error))
    # Two results naming one snapshot: the first one's claim explains it.
    entries.append(entries[10].model_copy(update={"id": "again"}))
    snapshots.append(Snapshot(key="foreign-child", parent="obuilder-00012-committed"))
    live = StoreEntry(
        id="live",
        area="result-tmp",
        layerinfo=LayerInfo(snapshot_key="obuilder-live", source="/snap/live", parent_layer_paths=()),
        changed_at=NOW,
        stamps="s",
    )
    snapshots.append(Snapshot(key="obuilder-live", parent="obuilder-00001-committed", created=NOW))
    container = Container(id="obuilder-run-1", root_path="c:/snap/20", created_at=NOW - timedelta(minutes=1))
    rows = (*(DbRow(id=e.id) for e in entries[::2]), DbRow(id="ghost"))
    return Observation(
        store=StoreState(root="/store", results=tuple(entries), tmp=(live,), db_rows=rows),
        containerd=ContainerdState(
            snapshots=tuple(snapshots),
            containers=(container,),
            tasks=(Task(id=container.id, status=TaskStatus.RUNNING),),
        ),
    )


def fresh(observation: Observation) -> Observation:
    """The same world in new records: nothing the planner kept from an earlier plan is found for it."""
    return Observation.model_validate(observation.model_dump())


@pytest.mark.parametrize("mode", list(Mode))
def test_a_plan_on_the_same_store_objects_equals_one_made_from_fresh_records(mode: Mode) -> None:
    """The planner keeps what it derives from the store between plans, by the records' identity:
    plans made one after another on the same store objects, containerd changing under them, equal
    plans made from fresh copies of the records, where nothing kept is found."""
    obs = big_store(3000)
    options = PlanOptions(protect_keys=("obuilder-0000*",), max_deletions_per_pass=500 if mode is Mode.DAEMON else None)
    snapshots, results = obs.containerd.snapshots, list(obs.store.results)

    def with_snapshots(kept: tuple[Snapshot, ...]) -> Observation:
        return obs.model_copy(update={"containerd": obs.containerd.model_copy(update={"snapshots": kept})})

    results[40] = results[40].model_copy(update={"id": "rebuilt"})  # one entry replaced, the others the same
    rebuilt = obs.model_copy(update={"store": obs.store.model_copy(update={"results": tuple(results)})})
    sequence = [
        obs,
        with_snapshots(tuple(s for n, s in enumerate(snapshots) if n % 3)),  # a third gone
        with_snapshots(tuple(s for n, s in enumerate(snapshots) if n % 3 != 1)),  # another third
        with_snapshots((*snapshots, Snapshot(key="obuilder-new-committed", parent="obuilder-00004-committed"))),
        obs.model_copy(update={"store": obs.store.model_copy(update={"db_rows": obs.store.db_rows[1:]})}),
        obs,
        rebuilt,
        rebuilt.model_copy(update={"containerd": with_snapshots(snapshots[::2]).containerd}),
        obs,
    ]
    assert all(o.store.results[0] is obs.store.results[0] for o in sequence)
    again = [plan(o, options, NOW, mode) for o in sequence]  # each finds what the one before kept
    scratch = [plan(fresh(o), options, NOW, mode) for o in sequence]
    for n, (kept, made) in enumerate(zip(again, scratch, strict=True)):
        assert kept == made, n
        assert list(kept.snapshot_keeps.items()) == list(made.snapshot_keeps.items()), n
    # A change is planned as such: nothing kept hides it.
    assert again[1].drift != again[0].drift != again[4].drift
    assert "rebuilt" in again[6].drift.results_without_row
    assert again[0] == again[5] == again[8]
    # Two results name one snapshot: the first one's claim explains it, as merge() keeps among equals.
    twin = obs.store.results[-1]
    assert twin.id == "again" and twin.layerinfo is not None
    first = next(e for e in obs.store.results if e.layerinfo == twin.layerinfo)
    assert again[0].snapshot_keeps[twin.layerinfo.snapshot_key + "-committed"][1].startswith(f"result/{first.id} ")


def test_the_store_index_is_kept_for_the_same_results_and_rederives_only_new_entries() -> None:
    results = big_store(200).store.results
    index = index_results(results, result_claims)
    assert index_results(results, result_claims) is index
    replaced = (*results[:-1], results[-1].model_copy(update={"id": "rebuilt"}))
    derived: list[str] = []

    def counted(e: StoreEntry) -> tuple[Claim, ...]:
        derived.append(e.id)
        return result_claims(e)

    index_results(results, counted)  # another rule: every entry derived again
    assert len(derived) == len(results)
    derived.clear()
    again = index_results(replaced, counted)
    assert derived == ["rebuilt"]
    assert again.claims == index_results(fresh_entries(replaced), result_claims).claims


def fresh_entries(results: tuple[StoreEntry, ...]) -> tuple[StoreEntry, ...]:
    return tuple(StoreEntry.model_validate(e.model_dump()) for e in results)


def test_an_ancestor_is_explained_by_the_first_of_equally_ranked_roots_whatever_else_claims_them() -> None:
    """Two kept containers' snapshots share a parent: the first container's explains it, though the
    second's is also a result's (the results' claims are merged apart from the other rules')."""
    result = StoreEntry(
        id="b", area="result", layerinfo=LayerInfo(snapshot_key="obuilder-b", source="/snap/b", parent_layer_paths=())
    )
    obs = Observation(
        store=StoreState(root="/store", results=(result,)),
        containerd=ContainerdState(
            snapshots=(
                Snapshot(key="obuilder-p-committed"),
                Snapshot(key="obuilder-b-committed", parent="obuilder-p-committed"),
                Snapshot(key="obuilder-a-committed", parent="obuilder-p-committed"),
            ),
            containers=(
                Container(id="obuilder-run-1", snapshot_key="obuilder-a-committed", created_at=NOW),
                Container(id="obuilder-run-2", snapshot_key="obuilder-b-committed", created_at=NOW),
            ),
            tasks=(
                Task(id="obuilder-run-1", status=TaskStatus.RUNNING),
                Task(id="obuilder-run-2", status=TaskStatus.RUNNING),
            ),
        ),
    )
    p = plan(obs, PlanOptions(), NOW, Mode.DAEMON)
    assert p.snapshot_keeps["obuilder-b-committed"][0] == "container"
    assert p.snapshot_keeps["obuilder-p-committed"][1] == "ancestor of obuilder-a-committed (kept: container)"
