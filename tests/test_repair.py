"""The opt-in repairs (``--once --repair CLASS``, ``spec.repair.classes``): OBuilder's semantics, the DB's
backup, one transaction, and the refusals.

The DB is written with OBuilder's own statements (``tests.test_check.dao_add``, from lib/dao.ml).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from controller.adapters.db_repair import apply_repairs, backup_path
from controller.adapters.store import FsStore
from controller.cli import build_parser, invocation
from controller.cli import main as cli_main
from controller.commands import repair_at_boot, resolve_settings
from controller.config.settings import Settings
from controller.core.check import check, plan_repairs
from controller.core.passes import run_once
from controller.model.check import FindingClass, RepairClass
from controller.model.errors import ExitCode, StoreReadError, StoreSanityError
from controller.model.plan import Mode, PlanOptions
from tests.support.fake import FakeContainerd
from tests.support.processes import Listed, fake_process_listing
from tests.test_check import NOW, db_of, drifted_store, look, rows_of, store_ports, use_fakes


def settings_for(root: Path, *flags: str) -> Settings:
    return resolve_settings(invocation(build_parser().parse_args(["--store", str(root), *flags])), {})


def test_every_repair_then_a_pass_leaves_a_clean_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = drifted_store(tmp_path)
    fake_process_listing(monkeypatch, [])
    settings = settings_for(tmp_path)
    ports = store_ports(fake, tmp_path)
    before = rows_of(db_of(tmp_path))
    done = repair_at_boot(settings, ports, tuple(RepairClass))
    assert done.remove_results == ("D", "P", "W")
    # OBuilder's Db_store.delete: dependents (D) first, then P; each Dao.delete lowered its parent's rc.
    # R went as Dao.delete does; then the recount: A has no child left.
    assert rows_of(db_of(tmp_path)) == [("A", 0, None)]
    assert sorted(p.name for p in (tmp_path / "result").iterdir()) == ["A"]
    # What the repairs made orphans (D's and W's snapshots) goes with the ordinary boot pass.
    assert look(tmp_path, fake) == {
        (FindingClass.ORPHAN_SNAPSHOT, "obuilder-D-committed"),
        (FindingClass.ORPHAN_SNAPSHOT, "obuilder-W-committed"),
        (FindingClass.ORPHAN_SNAPSHOT, "obuilder-X"),
        (FindingClass.LEFTOVER_CONTAINER, "obuilder-run-1"),
        (FindingClass.STALE_RESULT_TMP, "result-tmp/T"),
        (FindingClass.CACHE_TMP_LEFTOVER, "cache-tmp/c1"),
    }
    run = run_once(ports, settings.pass_options(Mode.BOOT), max_passes=5)
    assert run.exit_code == ExitCode.OK
    assert look(tmp_path, fake) == set()
    assert set(fake.parents) == {"obuilder-A-committed"}
    # The backup holds the DB as it was.
    (backup,) = (tmp_path / "state" / "obuilder-reconcile").glob("db-backup-*.sqlite")
    assert rows_of(backup) == before


def test_each_class_alone_does_only_its_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_process_listing(monkeypatch, [])
    fake = drifted_store(tmp_path)
    settings = settings_for(tmp_path)
    ports = store_ports(fake, tmp_path)
    repair_at_boot(settings, ports, (RepairClass.ROW_WITHOUT_RESULT,))
    assert rows_of(db_of(tmp_path)) == [("A", 2, None), ("D", 0, "P"), ("P", 1, "A")]
    repair_at_boot(settings, ports, (RepairClass.RC,))
    assert rows_of(db_of(tmp_path)) == [("A", 1, None), ("D", 0, "P"), ("P", 1, "A")]
    repair_at_boot(settings, ports, (RepairClass.RESULT_WITHOUT_ROW,))
    assert not (tmp_path / "result" / "W").exists()
    repair_at_boot(settings, ports, (RepairClass.POISONED_RESULT,))
    assert rows_of(db_of(tmp_path)) == [("A", 0, None)]
    classes = {cls for cls, _ in look(tmp_path, fake)}
    assert classes == {"orphan-snapshot", "leftover-container", "stale-result-tmp", "cache-tmp-leftover"}


def test_the_backup_restores_the_db(tmp_path: Path) -> None:
    drifted_store(tmp_path)
    before = rows_of(db_of(tmp_path))
    p = plan_repairs(FsStore(tmp_path).observe(), set(), (RepairClass.ROW_WITHOUT_RESULT, RepairClass.RC))
    backup = apply_repairs(tmp_path, p, now=NOW)
    assert backup == backup_path(tmp_path, NOW) and backup.exists()
    assert rows_of(db_of(tmp_path)) != before
    # Restoring: the backup copied back over the DB, as an operator would (sqlite3's backup again).
    src, dst = sqlite3.connect(backup), sqlite3.connect(db_of(tmp_path))
    src.backup(dst)
    src.close()
    dst.close()
    assert rows_of(db_of(tmp_path)) == before


def test_a_failure_rolls_the_whole_transaction_back(tmp_path: Path) -> None:
    drifted_store(tmp_path)
    before = rows_of(db_of(tmp_path))
    conn = sqlite3.connect(db_of(tmp_path))
    # A trigger that fails the second deletion: the first must not stay done.
    conn.execute("CREATE TRIGGER no_r BEFORE DELETE ON builds WHEN old.id = 'R' BEGIN SELECT RAISE(ABORT, 'no'); END")
    conn.commit()
    conn.close()
    p = plan_repairs(FsStore(tmp_path).observe(), set(), (RepairClass.POISONED_RESULT, RepairClass.ROW_WITHOUT_RESULT))
    p = p.model_copy(update={"remove_results": ()})
    with pytest.raises(StoreReadError, match="rolled back"):
        apply_repairs(tmp_path, p, now=NOW)
    assert rows_of(db_of(tmp_path)) == before


def test_a_link_in_result_is_removed_as_a_link(tmp_path: Path, outside_path: Path) -> None:
    drifted_store(tmp_path)
    outside = outside_path
    (outside / "precious").write_text("keep")
    (tmp_path / "result" / "L").symlink_to(outside, target_is_directory=True)
    p = plan_repairs(FsStore(tmp_path).observe(), set(), (RepairClass.RESULT_WITHOUT_ROW,))
    assert "L" in p.remove_results
    apply_repairs(tmp_path, p, now=NOW)
    assert not (tmp_path / "result" / "L").exists() and (outside / "precious").read_text() == "keep"


def test_repair_is_refused_while_the_worker_may_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = drifted_store(tmp_path)
    use_fakes(monkeypatch, fake, worker=True)
    before = rows_of(db_of(tmp_path))
    store = str(tmp_path)
    assert cli_main(["--once", "--store", store, "--repair", "rc"]) == ExitCode.WORKER_RUNNING
    # --force skips the worker check, so it cannot go with a repair.
    fake_process_listing(monkeypatch, [])
    assert cli_main(["--once", "--force", "--store", store, "--repair", "rc"]) == ExitCode.WORKER_RUNNING
    assert cli_main(["--store", store, "--repair", "rc"]) == ExitCode.USAGE  # never in the daemon
    assert cli_main(["--once", "--store", store, "--repair", "nope"]) == ExitCode.USAGE
    assert rows_of(db_of(tmp_path)) == before
    assert not list((tmp_path / "state" / "obuilder-reconcile").glob("db-backup-*"))


def test_repair_at_boot_asks_the_worker_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = drifted_store(tmp_path)
    fake_process_listing(monkeypatch, [Listed(4242, "obuilder")])
    before = rows_of(db_of(tmp_path))
    with pytest.raises(Exception, match="worker"):
        repair_at_boot(settings_for(tmp_path), store_ports(fake, tmp_path), (RepairClass.RC,))
    assert rows_of(db_of(tmp_path)) == before


def test_once_repair_end_to_end_then_check_is_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = drifted_store(tmp_path)
    use_fakes(monkeypatch, fake)
    store = str(tmp_path)
    assert cli_main(["check", "--store", store]) == 1
    assert (
        cli_main(
            [
                "--once",
                "--store",
                store,
                "--repair",
                "poisoned-result,row-without-result",
                "--repair",
                "rc,result-without-row",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli_main(["check", "--store", store]) == 0
    assert "clean" in capsys.readouterr().out
    assert rows_of(db_of(tmp_path)) == [("A", 0, None)]


def test_the_policy_asks_for_repairs_and_dry_run_changes_nothing(
    tmp_path: Path, outside_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = drifted_store(tmp_path)
    use_fakes(monkeypatch, fake)
    policy = outside_path / "policy.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: t}\n"
        f"spec:\n  store: {{root: {tmp_path}}}\n  repair: {{classes: [rc]}}\n"
    )
    before = rows_of(db_of(tmp_path))
    assert cli_main(["--once", "--dry-run", "--policy", str(policy)]) == ExitCode.DRIFT  # drift: nothing changed
    assert rows_of(db_of(tmp_path)) == before
    assert cli_main(["--once", "--policy", str(policy)]) == 0
    assert ("A", 2, None) in rows_of(db_of(tmp_path))  # recounted: P and R name it
    # --repair replaces the policy's: an empty one repairs nothing.
    conn = sqlite3.connect(db_of(tmp_path))
    conn.execute("UPDATE builds SET rc = 7 WHERE id = 'A'")
    conn.commit()
    conn.close()
    assert cli_main(["--once", "--policy", str(policy), "--repair", ""]) == 0
    assert ("A", 7, None) in rows_of(db_of(tmp_path))
    assert any(
        f.cls == "rc-mismatch"
        for f in check(FsStore(tmp_path).observe(), fake.observe(), PlanOptions(), NOW, Mode.BOOT)
    )


def test_poisoned_result_refuses_when_containerd_has_none_of_the_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrong namespace or snapshotter shows no snapshot at all: every result would look poisoned."""
    drifted_store(tmp_path)
    fake_process_listing(monkeypatch, [])
    before = rows_of(db_of(tmp_path))
    with pytest.raises(StoreSanityError, match="none of the 4 results"):
        repair_at_boot(settings_for(tmp_path), store_ports(FakeContainerd(), tmp_path), (RepairClass.POISONED_RESULT,))
    assert rows_of(db_of(tmp_path)) == before and (tmp_path / "result" / "A").exists()
