"""``reconcile check``: every class of drift, classified from the observations, on a real store.

The store is written as OBuilder writes it: its directories, and its DB through the statements
of OBuilder's ``lib/dao.ml`` (``Dao.add``: ``INSERT OR REPLACE INTO builds ... VALUES (?, ?, ?, 0, ?)``
then ``UPDATE builds SET rc = rc + ? WHERE id = ?`` with 1 for the parent). containerd is the
in-memory fake.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.adapters.store import FsStore
from controller.cli import build_check_parser
from controller.cli import main as cli_main
from controller.config.settings import Settings
from controller.core.check import check, dependents_first, parse_repair_classes, plan_repairs
from controller.core.ports import Ports, Reporter
from controller.model.check import BY_RECONCILE, FindingClass, RepairClass, Severity
from controller.model.plan import Mode, PlanOptions
from controller.model.records import (
    Container,
    ContainerdState,
    DbRow,
    Snapshot,
    StoreEntry,
    StoreState,
    Task,
    TaskStatus,
)
from tests.support.fake import FakeClock, FakeContainerd
from tests.support.processes import Listed, fake_process_listing
from tests.support.world import create_store, layerinfo_text

NOW = datetime(2026, 11, 29, tzinfo=UTC)
STAMP = "2026-11-28 10:00:00"


# -- a store written as OBuilder writes it -----------------------------------------------------


def dao_add(db: Path, build_id: str, parent: str | None = None) -> None:
    """OBuilder's ``Dao.add`` (lib/dao.ml), statement for statement, in its transaction."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        if parent is None:
            conn.execute(
                "INSERT OR REPLACE INTO builds (id, created, used, rc, parent) VALUES (?, ?, ?, 0, ?)",
                (build_id, STAMP, STAMP, None),
            )
            return
        conn.execute("BEGIN TRANSACTION")
        conn.execute(
            "INSERT OR REPLACE INTO builds (id, created, used, rc, parent) VALUES (?, ?, ?, 0, ?)",
            (build_id, STAMP, STAMP, parent),
        )
        conn.execute("UPDATE builds SET rc = rc + ? WHERE id = ?", (1, parent))
        conn.execute("COMMIT")
    finally:
        conn.close()


def rows_of(db: Path) -> list[tuple[str, int, str | None]]:
    conn = sqlite3.connect(db)
    try:
        return sorted(conn.execute("SELECT id, rc, parent FROM builds").fetchall())
    finally:
        conn.close()


def db_of(root: Path) -> Path:
    return root / "state" / "db" / "db.sqlite"


def result(root: Path, build_id: str, *, key: str | None = None) -> None:
    """``result/ID``: with a layerinfo naming ``key`` when given, else OBuilder's derived key."""
    d = root / "result" / build_id
    d.mkdir(parents=True)
    (d / "marker").write_text(build_id)
    if key is not None:
        (d / "layerinfo").write_text(layerinfo_text(key, f"C:\\snap\\{key}", []))


def drifted_store(root: Path) -> FakeContainerd:
    """One of each class of drift; what containerd holds comes back.

    - A: a healthy base step with rows P and R as children; its rc raised once too often.
    - P: result/P whose committed snapshot is gone (poisoned); D builds on it (row and result).
    - R: a row without result/R.  W: result/W without a row.
    - obuilder-X: an orphan snapshot; obuilder-run-1: a leftover container;
      result-tmp/T: an interrupted build; cache-tmp/c1: a leftover cache.
    """
    create_store(root)
    db = db_of(root)
    result(root, "A", key="obuilder-A")
    dao_add(db, "A")
    result(root, "P")
    dao_add(db, "P", "A")
    result(root, "D")
    dao_add(db, "D", "P")
    dao_add(db, "R", "A")
    result(root, "W")
    # Some older version raised A's rc once more than its children.
    conn = sqlite3.connect(db)
    conn.execute("UPDATE builds SET rc = rc + 1 WHERE id = 'A'")
    conn.commit()
    conn.close()
    (root / "result-tmp" / "T").mkdir()
    (root / "cache-tmp" / "c1").mkdir()
    fake = FakeContainerd(
        parents={
            "obuilder-A-committed": None,
            "obuilder-D-committed": "obuilder-A-committed",
            "obuilder-W-committed": "obuilder-A-committed",
            "obuilder-X": None,
        }
    )
    fake.containers["obuilder-run-1"] = Container(id="obuilder-run-1", snapshot_key="")
    fake.tasks["obuilder-run-1"] = TaskStatus.STOPPED
    return fake


EXPECTED = {
    (FindingClass.RESULT_MISSING_SNAPSHOT, "result/P"),
    (FindingClass.ROW_WITHOUT_RESULT, "row R"),
    (FindingClass.RESULT_WITHOUT_ROW, "result/W"),
    (FindingClass.RC_MISMATCH, "row A"),
    (FindingClass.ORPHAN_SNAPSHOT, "obuilder-X"),
    (FindingClass.LEFTOVER_CONTAINER, "obuilder-run-1"),
    (FindingClass.STALE_RESULT_TMP, "result-tmp/T"),
    (FindingClass.CACHE_TMP_LEFTOVER, "cache-tmp/c1"),
}


def look(root: Path, fake: FakeContainerd, mode: Mode = Mode.BOOT) -> set[tuple[FindingClass, str]]:
    findings = check(FsStore(root).observe(), fake.observe(), PlanOptions(), NOW, mode)
    return {(f.cls, f.object) for f in findings}


# -- the classification -------------------------------------------------------------------


def test_every_class_of_drift_is_found_with_its_severity_and_repair(tmp_path: Path) -> None:
    fake = drifted_store(tmp_path)
    findings = check(FsStore(tmp_path).observe(), fake.observe(), PlanOptions(), NOW, Mode.BOOT)
    assert {(f.cls, f.object) for f in findings} == EXPECTED
    by = {f.cls: f for f in findings}
    poisoned = by[FindingClass.RESULT_MISSING_SNAPSHOT]
    assert poisoned.severity is Severity.ERROR and findings[0] == poisoned  # errors first
    assert "Db_store.get_build" in poisoned.obuilder and "obuilder-P-committed" in poisoned.evidence
    assert poisoned.repair == "poisoned-result"
    # What the repair would do: dependents first, as Db_store.delete.
    assert poisoned.repair_action.startswith("remove result/D, result/P; delete row(s) D, P; lower rc of A")
    assert by[FindingClass.ROW_WITHOUT_RESULT].repair == "row-without-result"
    assert "Dao.add" in by[FindingClass.ROW_WITHOUT_RESULT].obuilder
    assert by[FindingClass.RESULT_WITHOUT_ROW].repair == "result-without-row"
    rc = by[FindingClass.RC_MISMATCH]
    assert (rc.repair, rc.repair_action) == ("rc", "set rc from 3 to 2")
    assert "rc = 0" in rc.obuilder and "rc is 3, but 2 row(s)" in rc.evidence
    for cls in (FindingClass.ORPHAN_SNAPSHOT, FindingClass.LEFTOVER_CONTAINER, FindingClass.STALE_RESULT_TMP):
        assert by[cls].repair == BY_RECONCILE
    assert by[FindingClass.CACHE_TMP_LEFTOVER].severity is Severity.INFO


def test_a_consistent_store_is_clean(tmp_path: Path) -> None:
    create_store(tmp_path)
    result(tmp_path, "A", key="obuilder-A")
    dao_add(db_of(tmp_path), "A")
    result(tmp_path, "B")
    dao_add(db_of(tmp_path), "B", "A")
    fake = FakeContainerd(parents={"obuilder-A-committed": None, "obuilder-B-committed": "obuilder-A-committed"})
    assert look(tmp_path, fake) == set()


def test_with_the_worker_maybe_running_live_work_is_not_leftover() -> None:
    store = StoreState(
        root="/s",
        results=(StoreEntry(id="A", area="result"),),
        tmp=(StoreEntry(id="T", area="result-tmp"),),
        cache_tmp=("c1",),
        db_rows=(DbRow(id="A", rc=0),),
    )
    containerd = ContainerdState(
        snapshots=(Snapshot(key="obuilder-A-committed"), Snapshot(key="obuilder-T")),
        containers=(Container(id="obuilder-run-1"),),
        tasks=(Task(id="obuilder-run-1", status=TaskStatus.RUNNING),),
    )
    assert check(store, containerd, PlanOptions(), NOW, Mode.DAEMON) == ()
    boot = {(f.cls, f.object) for f in check(store, containerd, PlanOptions(), NOW, Mode.BOOT)}
    assert (FindingClass.STALE_RESULT_TMP, "result-tmp/T") in boot
    assert (FindingClass.LEFTOVER_CONTAINER, "obuilder-run-1") in boot


def test_an_rc_too_low_is_a_mismatch_that_lru_could_prune() -> None:
    store = StoreState(
        root="/s",
        results=(StoreEntry(id="A", area="result"), StoreEntry(id="B", area="result")),
        db_rows=(DbRow(id="A", rc=0), DbRow(id="B", rc=0, parent="A")),
    )
    containerd = ContainerdState(snapshots=(Snapshot(key="obuilder-A-committed"), Snapshot(key="obuilder-B-committed")))
    (f,) = check(store, containerd, PlanOptions(), NOW, Mode.BOOT)
    assert (f.cls, f.object, f.repair_action) == (FindingClass.RC_MISMATCH, "row A", "set rc from 0 to 1")
    assert "may take it" in f.obuilder


def test_dependents_come_first_and_every_chain_is_followed() -> None:
    children = {"P": ["D", "E"], "D": ["F"]}
    order = dependents_first("P", children)
    assert order[-1] == "P" and set(order) == {"P", "D", "E", "F"}
    assert order.index("F") < order.index("D")


def test_the_repair_plan_follows_obuilders_delete(tmp_path: Path) -> None:
    fake = drifted_store(tmp_path)
    store = FsStore(tmp_path).observe()
    present = set(fake.parents)
    p = plan_repairs(store, present, tuple(RepairClass))
    assert p.remove_results == ("D", "P", "W")
    assert [(d.id, d.parent) for d in p.rows] == [("D", "P"), ("P", "A"), ("R", "A")]
    # A: rc 3, lowered twice by the deletions (P, R), and no child left: recounted to 0.
    assert p.rc_changes == {"A": (1, 0)}
    assert plan_repairs(store, present, ()).empty


def test_repair_classes_parse_from_commas_and_repeats() -> None:
    assert parse_repair_classes(["rc,poisoned-result", "rc"]) == (RepairClass.RC, RepairClass.POISONED_RESULT)
    with pytest.raises(ValueError, match="unknown repair class 'nope'"):
        parse_repair_classes(["nope"])


# -- the command ----------------------------------------------------------------------------


def store_ports(fake: FakeContainerd, root: Path, reporter: Reporter | None = None) -> Ports:
    """The real store on disk beside the fake containerd."""
    return Ports(containerd=fake, store=FsStore(root), reporter=reporter or Reporter(), clock=FakeClock(NOW))


def use_fakes(monkeypatch: pytest.MonkeyPatch, fake: FakeContainerd, *, worker: bool = False) -> None:
    """The command's real store on disk, the fake containerd, and a process listing."""

    def ports(self: Settings, reporter: Reporter, *, boot: bool = False) -> Ports:
        return store_ports(fake, self.store, reporter)

    monkeypatch.setattr(Settings, "ports", ports)
    fake_process_listing(monkeypatch, [Listed(4242, "ocluster-worker")] if worker else [])


def test_check_command_reports_json_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_fakes(monkeypatch, drifted_store(tmp_path))
    assert cli_main(["check", "--store", str(tmp_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["mode"] == "boot" and not doc["clean"]
    assert {(f["class"], f["object"]) for f in doc["findings"]} == {(c.value, o) for c, o in EXPECTED}
    assert set(doc["findings"][0]) >= {"class", "object", "evidence", "obuilder", "severity", "repair"}


def test_check_command_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_fakes(monkeypatch, drifted_store(tmp_path), worker=True)
    assert cli_main(["check", "--store", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "daemon semantics" in out and "ERROR   result-missing-snapshot: result/P" in out
    # The worker may run: its result-tmp/ and cache-tmp/ are not called leftovers.
    assert "result-tmp/T" not in out and "cache-tmp/c1" not in out


def test_check_help_documents_exit_codes_and_classes() -> None:
    text = build_check_parser().format_help()
    assert "0  clean" in text and "1  findings" in text
    for cls in FindingClass:
        assert cls.value in text
