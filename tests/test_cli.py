"""The command a user runs: help, exit codes, --explain, --dry-run, settings precedence."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from controller.cli import build_parser, invocation
from controller.cli import main as cli_main
from controller.commands import resolve_settings
from controller.core.passes import PassOptions, run_once
from controller.model.errors import EXIT_RULES, ExitCode, WorkerRunningError
from controller.model.outcome import Outcome, Result
from controller.model.plan import Mode, PlanOptions
from controller.model.records import ContainerdState, Snapshot, StoreState
from tests.support.cli import reconcile as run_cli
from tests.support.cli import reconcile_on
from tests.support.containerd import PrivateContainerd
from tests.support.fake import FakeContainerd, FakeStore, fake_ports
from tests.support.processes import Listed, fake_process_listing
from tests.support.world import World, create_store

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def test_help_documents_every_flag_and_the_exit_codes() -> None:
    out = run_cli("--help")
    assert out.code == 0
    for flag in ("--once", "--dry-run", "--json", "--store", "--address", "--namespace", "--snapshotter",
                 "--ctr", "--force", "--explain"):  # fmt: skip
        assert flag in out.stdout
    for rule in EXIT_RULES:
        said = " ".join(out.stdout.split())  # the help wraps long lines
        verdict = "[worker starts]" if rule.start_worker else "[worker stays down]"
        assert f"{int(rule.code)} {' '.join(rule.meaning.split())} {verdict}" in said, rule.code
    assert "CONTAINERD_ADDRESS" in out.stdout


def test_flags_override_the_environment_which_overrides_defaults() -> None:
    env = {"CONTAINERD_ADDRESS": "/env.sock", "CONTAINERD_NAMESPACE": "envns", "CONTAINERD_SNAPSHOTTER": "windows"}
    s = resolve_settings(invocation(build_parser().parse_args(["--store", "/s", "--namespace", "flagns"])), env)
    assert (s.ctr.address, s.ctr.namespace, s.ctr.snapshotter) == ("/env.sock", "flagns", "windows")
    d = resolve_settings(invocation(build_parser().parse_args(["--store", "/s"])), {})
    assert (d.ctr.address, d.ctr.namespace, d.ctr.snapshotter) == (
        "/run/containerd/containerd.sock",
        "default",
        "overlayfs",
    )


def test_missing_store_is_a_usage_error() -> None:
    out = run_cli("--once")
    assert out.code == 2 and "no store root: pass --store ROOT or set spec.store.root" in out.stderr


@pytest.mark.containerd
def test_unreachable_containerd_without_a_wait_fails_the_pass_exit_1(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    root = create_store(tmp_path / "store")
    (root / "result-tmp" / "x").mkdir()
    # The real ctr, at an address where nothing listens (ctr's own dial gives up after 10 s).
    out = run_cli("--once", "--store", str(root), "--address", str(tmp_path / "none.sock"))
    assert out.code == 1 and "exit 1" in out.stderr and "none.sock" in out.stderr, out.stderr
    assert (root / "result-tmp" / "x").exists()


def test_a_parent_containerd_says_has_a_phantom_child_is_reported_stuck_not_retried_forever() -> None:
    fake = FakeContainerd(parents={"obuilder-a-committed": None, "obuilder-b": "obuilder-a-committed"})
    fake.phantom_children.add("obuilder-a-committed")
    store = FakeStore(StoreState(root="/s"))

    summary = run_once(fake_ports(fake, store), PassOptions(PlanOptions(), Mode.BOOT), max_passes=10)
    assert summary.exit_code == 1
    assert summary.acted == 2
    (stuck,) = summary.stuck
    assert stuck.name == "obuilder-a-committed" and "known containerd bug" in stuck.reason
    assert list(fake.parents) == ["obuilder-a-committed"]


def test_pass_limit_is_reported_with_what_remains() -> None:
    chain = {f"obuilder-{i}": (f"obuilder-{i - 1}" if i else None) for i in range(6)}
    fake = FakeContainerd(parents=dict(chain))
    store = FakeStore(StoreState(root="/s"))

    options = PlanOptions(max_deletions_per_pass=2)
    summary = run_once(fake_ports(fake, store), PassOptions(options, Mode.BOOT), max_passes=2)
    assert (summary.exit_code, summary.acted, summary.total("removed")["snapshot"]) == (1, 2, 4)
    assert {s.name for s in summary.stuck} == {"obuilder-0", "obuilder-1"}
    assert all("pass limit (2) reached" in s.reason for s in summary.stuck)
    assert (
        ContainerdState(snapshots=(Snapshot(key="obuilder-0"), Snapshot(key="obuilder-1", parent="obuilder-0")))
        == fake.observe()
    )


@pytest.mark.containerd
def test_explain_names_the_rule_for_kept_orphan_and_foreign_objects(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    base = world.base("b:1")
    kept = world.step("k", base)
    (orphan,) = world.orphan_chain(kept, "o", 1)
    world.buggy_prune(base.removeprefix("obuilder-base-"))  # now kept only as an ancestor

    def explain(name: str) -> str:
        out = reconcile_on(containerd, namespace, world.root, "--once", "--explain", name)
        assert out.code == 0, out.stderr
        return out.stdout

    assert "kept [rule: result]: result/k exists" in explain(kept + "-committed")
    assert "kept [rule: ancestor]: ancestor of obuilder-k-committed" in explain(base + "-committed")
    assert f"snapshot {orphan}: would be removed [rule: orphan]" in explain(orphan)
    assert "not owned" in explain(world.image_layer)
    missing = reconcile_on(containerd, namespace, world.root, "--once", "--explain", "obuilder-nope")
    assert missing.code == 1 and "no snapshot, container or store entry" in missing.stdout
    assert orphan in containerd.snapshot_keys(namespace), "--explain changed something"


@pytest.mark.containerd
def test_dry_run_exits_0_on_a_clean_store_and_3_on_drift(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    world.step("k", world.base("b:1"))
    clean = reconcile_on(containerd, namespace, world.root, "--once", "--dry-run")
    assert clean.code == 0 and "nothing to do" in clean.stdout
    world.leak_container("obuilder-run-1", task="stopped")
    drift = reconcile_on(containerd, namespace, world.root, "--once", "--dry-run")
    assert drift.code == 3 and "remove container obuilder-run-1" in drift.stdout
    assert containerd.container_ids(namespace) == ["obuilder-run-1"]


def test_a_worker_that_starts_during_once_stops_it_before_the_next_pass() -> None:
    class FlakyOnce(FakeContainerd):
        """Refuses the first removal of one key, so a second pass is needed."""

        refused = False

        def remove_snapshots(self, keys: Sequence[str]) -> dict[str, Result]:
            if "obuilder-b" in keys and not self.refused:
                self.refused = True
                rest = [k for k in keys if k != "obuilder-b"]
                return {**super().remove_snapshots(rest), "obuilder-b": Result(Outcome.FAILED, "transient")}
            return super().remove_snapshots(keys)

    fake = FlakyOnce(parents={"obuilder-a": None, "obuilder-b": None})
    store = FakeStore(StoreState(root="/s"))
    looks: list[int] = []

    def no_worker_running() -> None:
        looks.append(1)
        if len(looks) > 1:
            raise WorkerRunningError("a worker appears to be running (ocluster-worker)")

    with pytest.raises(WorkerRunningError):
        run_once(fake_ports(fake, store), PassOptions(PlanOptions(), Mode.BOOT), before_pass=no_worker_running)
    assert len(looks) == 2 and "obuilder-b" in fake.parents, "the second pass never acted"


def test_a_worker_that_appears_is_exit_9(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    fake_process_listing(monkeypatch, [Listed(4242, "ocluster-worker", psutil.AccessDenied(4242))])
    assert cli_main(["--once", "--store", str(root), "--address", str(tmp_path / "none.sock")]) == 9


@pytest.mark.containerd
def test_wait_for_containerd_lets_a_boot_step_start_before_containerd(tmp_path: Path) -> None:
    own = PrivateContainerd().start()
    try:
        w = World(own, "late", tmp_path / "store")
        leaked = w.orphan_chain(w.base("b:1"), "o", 2)
        own._stop_daemon()
        argv = ["--once", "--store", str(w.root), "--address", own.address, "--namespace", "late"]
        argv += ["--snapshotter", "native", "--wait-for-containerd", "60s"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(2.5)  # containerd comes up a moment after the boot step started
        assert proc.poll() is None, "it gave up instead of waiting"
        own.start()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert b"waiting up to 60s for containerd" in err
        assert not set(leaked) & set(own.snapshot_keys("late"))
        unreachable = run_cli(*argv[:-1], "1s", "--address", str(tmp_path / "never.sock"))
        assert unreachable.code == 7 and "did not answer within 1s" in unreachable.stderr
    finally:
        own.stop()


@pytest.mark.containerd
def test_explain_beside_a_worker_shows_containerds_created_and_counts_only_what_it_watched(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: x}\n"
        f"spec:\n  containerd: {{namespace: {namespace}, snapshotter: native}}\n  timing: {{gracePeriod: 5s}}\n"
    )
    base = world.base("b:1")
    (old,) = world.orphan_chain(base, "old", 1)
    time.sleep(5.2)
    (young,) = world.orphan_chain(base, "young", 1)

    def explain(name: str) -> str:
        out = run_cli(
            "--policy", str(policy), "--store", str(world.root), "--address", containerd.address, "--explain", name
        )
        assert out.code == 0, out.stderr
        return out.stdout

    # The young one first, while it is surely younger than the grace period on a busy machine.
    said = explain(young)
    assert "kept [rule: grace]: watched 0 s by this process (created" in said and "less than gracePeriod" in said
    assert "containerd's Created" in said
    # Old by containerd's Created, but a one-off look has watched nothing: no age decides a removal
    # before a daemon has itself watched the snapshot for its grace period.
    said_old = explain(old)
    assert "kept [rule: grace]: watched 0 s by this process (created" in said_old and "has watched nothing" in said_old
    assert {old, young} <= set(containerd.snapshot_keys(namespace)), "--explain changed something"


@pytest.mark.parametrize("what", ["not executable", "a folder", "not a program"])
def test_a_ctr_that_cannot_run_is_exit_8_with_a_message_not_a_traceback(tmp_path: Path, what: str) -> None:
    root = create_store(tmp_path / "store")
    ctr = tmp_path / "ctr"
    if what == "a folder":
        ctr.mkdir()
    else:
        ctr.write_bytes(b"#!/bin/sh\nexit 0\n" if what == "not executable" else b"\x7fELF garbage")
        ctr.chmod(0o644 if what == "not executable" else 0o755)
    run = run_cli("--once", "--store", str(root), "--ctr", str(ctr))
    assert run.code == 8, run.stderr
    assert f"cannot run '{ctr}'" in run.stderr and "Traceback" not in run.stderr


def test_a_store_whose_db_is_not_obuilders_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    (root / "state" / "db" / "db.sqlite").write_bytes(b"this is not SQLite" * 100)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    run = run_cli("--once", "--store", str(root), "--address", str(tmp_path / "none.sock"))
    assert run.code == 5 and "is not OBuilder's DB" in run.stderr, run.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before, "the refused store was written to"


# -- the exit-code contract, each code from the real command -----------------------------


def test_every_exit_code_has_one_rule_and_every_error_one_code() -> None:
    import controller.model.errors as errors

    assert [r.code for r in EXIT_RULES] == list(ExitCode)
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ReconcileError)]
    mapped = {c for r in EXIT_RULES for c in r.errors}
    # Every error a boot chain can meet is named; the rest (layerinfo, unsafe path) fail a pass: exit 1.
    for cls in classes:
        code = errors.exit_code_for(cls.__new__(cls))
        assert code in ExitCode
        if cls not in (errors.ReconcileError, errors.LayerinfoError, errors.UnsafePathError, errors.CtrTimeoutError):
            assert cls in mapped, cls
    assert errors.exit_code_for(errors.StoreNotCreatedError("x")) == ExitCode.STORE_NOT_CREATED
    assert errors.exit_code_for(errors.WorkerRunningError("x")) == ExitCode.WORKER_RUNNING


def test_readme_exit_code_table_matches_the_contract() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = {int(m[0]): m[1] for m in re.findall(r"^\| `(\d+)` \|[^|]*\|\s*(starts|stays down)[^|]*\|", readme, re.M)}
    assert rows == {int(r.code): "starts" if r.start_worker else "stays down" for r in EXIT_RULES}


def test_a_root_that_does_not_exist_yet_is_exit_4_and_nothing_is_created(tmp_path: Path) -> None:
    missing = tmp_path / "obuilder"
    run = run_cli("--once", "--store", str(missing), "--address", str(tmp_path / "none.sock"))
    assert run.code == 4 and "does not exist yet" in run.stderr, run.stderr
    assert not missing.exists()
    empty = tmp_path / "empty"
    (empty / "result").mkdir(parents=True)
    run = run_cli("--once", "--store", str(empty), "--address", str(tmp_path / "none.sock"))
    assert run.code == 4 and "no OBuilder DB and no result yet" in run.stderr, run.stderr
    assert sorted(p.name for p in empty.rglob("*")) == ["result"], "a store not created yet was written to"


@pytest.mark.parametrize("what", ["volume missing", "results without a DB", "DB without result/"])
def test_a_store_that_is_half_there_is_exit_5(tmp_path: Path, what: str) -> None:
    if what == "volume missing":
        root = tmp_path / "D" / "obuilder"
    else:
        root = create_store(tmp_path / "store")
        if what == "results without a DB":
            (root / "result" / "abc").mkdir()
            (root / "state" / "db" / "db.sqlite").unlink()
        else:
            (root / "result").rmdir()
    run = run_cli("--once", "--store", str(root), "--address", str(tmp_path / "none.sock"))
    assert run.code == 5, run.stderr
    assert ("is its volume mounted" if what == "volume missing" else "does not look like an OBuilder store") in (
        run.stderr
    )


def test_a_held_lock_is_exit_6(tmp_path: Path) -> None:
    from controller.adapters.lock import StoreLock

    root = create_store(tmp_path / "store")
    with StoreLock(root):
        run = run_cli("--once", "--store", str(root), "--address", str(tmp_path / "none.sock"))
    assert run.code == 6 and "another reconcile holds" in run.stderr, run.stderr


@pytest.mark.containerd
def test_containerd_not_answering_within_the_wait_is_exit_7(containerd: PrivateContainerd, tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    # The real ctr, asked at an address where nothing listens.
    run = run_cli(
        "--once", "--store", str(root), "--address", str(tmp_path / "none.sock"), "--wait-for-containerd", "1s"
    )
    assert run.code == 7 and "did not answer within 1s" in run.stderr, run.stderr


def test_a_ctr_that_is_not_there_is_exit_8(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    run = run_cli("--once", "--store", str(root), "--ctr", str(tmp_path / "no-ctr.exe"))
    assert run.code == 8 and "cannot run" in run.stderr and "Traceback" not in run.stderr


def test_a_worker_running_is_exit_9_from_the_real_command(tmp_path: Path) -> None:
    root = create_store(tmp_path / "store")
    exe = tmp_path / "ocluster-worker"
    shutil.copy("/bin/busybox", exe)
    # busybox picks its applet from argv[0]: a process named as the worker, acting as sleep.
    worker = subprocess.Popen(["sleep", "600"], executable=str(exe))
    try:
        run = run_cli("--once", "--store", str(root), "--address", str(tmp_path / "none.sock"))
    finally:
        worker.kill()
        worker.wait()
    assert run.code == 9 and "ocluster-worker" in run.stderr, run.stderr


def test_a_bad_policy_is_exit_2_before_the_store_is_looked_at(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY_HEAD + "spec:\n  timing: {gracePeriod: 10 minutes}\n")
    run = run_cli("--once", "--policy", str(policy), "--store", str(tmp_path / "D" / "obuilder"))
    assert run.code == 2 and f"{policy}:5:25: spec.timing.gracePeriod: invalid duration" in run.stderr


# -- check-policy ------------------------------------------------------------------------

POLICY_HEAD = "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: pool}\n"


def test_check_policy_needs_no_store_worker_or_containerd(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        POLICY_HEAD + "spec:\n  store: {root: 'D:\\obuilder'}\n  containerd: {ctr: 'C:\\nowhere\\ctr.exe'}\n"
        "  protect: {baseImages: [a, b], snapshotKeys: ['obuilder-base-*']}\n  timing: {gracePeriod: 2m}\n"
    )
    run = run_cli("check-policy", str(policy))
    assert run.code == 0, run.stderr
    assert run.stdout.count("\n") == 1
    assert run.stdout.startswith(f"{policy}: ok: ReconcilePolicy 'pool': store D:\\obuilder")
    assert "protects 2 base images and 1 key globs, gracePeriod 2m" in run.stdout


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("spec:\n  timing:\n    gracePeriods: 10m\n", ":6:5: spec.timing.gracePeriods: unknown field"),
        ("spec:\n  timing: {gracePeriod: [1}\n", ":5:"),
        ("spec: !!python/object:os.system {}\n", ":4:7: spec: YAML tag"),
    ],
)
def test_check_policy_names_file_line_and_column_and_exits_2(tmp_path: Path, text: str, said: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY_HEAD + text)
    run = run_cli("check-policy", str(policy))
    assert run.code == 2 and run.stdout == ""
    assert f"reconcile: {policy}{said}" in run.stderr, run.stderr


def test_check_policy_json_prints_the_effective_policy_an_installer_reads(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY_HEAD + "spec:\n  worker: {serviceName: ocluster-worker-1}\n  timing: {gracePeriod: 2m}\n")
    run = run_cli("check-policy", "--json", str(policy))
    assert run.code == 0, run.stderr
    effective = run.json
    assert effective["metadata"]["name"] == "pool"
    # What the file says, and every default it leaves out, spelled as in the file.
    from controller.model.policy import TimingSpec, WorkerSpec, format_duration

    worker, timing = effective["spec"]["worker"], effective["spec"]["timing"]
    defaults = WorkerSpec()
    assert worker == {
        "processNames": list(defaults.process_names),
        "serviceName": "ocluster-worker-1",
        "tempDir": defaults.temp_dir,
        "hcnNamespaceTool": defaults.hcn_namespace_tool,
    }
    assert timing["gracePeriod"] == "2m" and timing["interval"] == format_duration(TimingSpec().interval)
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY_HEAD + "spec:\n  worker: {serviceName: ''}\n")
    refused = run_cli("check-policy", "--json", str(bad))
    assert refused.code == 2 and refused.stdout == "" and "spec.worker.serviceName" in refused.stderr


def test_check_policy_of_a_missing_file_or_without_one_is_exit_2(tmp_path: Path) -> None:
    missing = run_cli("check-policy", str(tmp_path / "nope.yaml"))
    assert missing.code == 2 and "cannot read" in missing.stderr
    assert run_cli("check-policy").code == 2


def test_check_policy_imports_the_policy_loader_and_nothing_of_a_run(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY_HEAD)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "controller", "check-policy", str(policy)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    imported = set(re.findall(r"\|\s*(controller[\w.]*)\s*$", proc.stderr, re.M))
    assert "controller.config.policy" in imported
    assert not imported & {"controller.config.settings", "controller.commands", "controller.adapters.ctr",
                           "controller.core.passes", "controller.adapters.store"}, imported  # fmt: skip


def test_service_refuses_the_flags_of_a_one_off_run_and_keeps_the_flag_style_cli(tmp_path: Path) -> None:
    for flag in ("--once", "--dry-run", "--json", "--force"):
        run = run_cli("service", flag, "--store", str(tmp_path))
        assert run.code == 2 and f"{flag} does not go with it" in run.stderr, run.stderr
    # The words are subcommands only as the first argument: a store named like one is still a store.
    run = run_cli("--once", "--store", str(tmp_path / "check-policy"), "--address", str(tmp_path / "none.sock"))
    assert run.code == 4 and "check-policy does not exist yet" in run.stderr, run.stderr
