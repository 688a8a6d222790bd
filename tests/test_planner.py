"""The planner on worlds written as data: ``tests/cases/*.json`` (observation, options, expected plan)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.core.planner import base_image_key, path_identity, plan
from controller.model.plan import Kind, Mode, PlanOptions
from controller.model.records import Observation

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
