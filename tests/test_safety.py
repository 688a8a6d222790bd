"""The safety invariants of DESIGN.md, each shown against the real daemon through the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from controller.adapters.lock import StoreLock
from controller.model.errors import ExitCode
from tests.support.cli import reconcile_on
from tests.support.containerd import PrivateContainerd
from tests.support.world import World


@pytest.mark.containerd
@pytest.mark.parametrize(
    ("break_it", "code"),
    [
        ("no-result-dir", ExitCode.STORE_NOT_READY),
        ("no-db", ExitCode.STORE_NOT_READY),
        # No store at all: a fresh worker's, which OBuilder creates at its first start.
        ("mistyped-root", ExitCode.STORE_NOT_CREATED),
    ],
)
def test_a_root_that_is_not_a_store_touches_nothing(
    world: World, containerd: PrivateContainerd, namespace: str, break_it: str, code: ExitCode
) -> None:
    world.orphan_chain(world.base("b:1"), "o", 2)
    world.leak_container("obuilder-run-1", task="stopped")
    before = (containerd.snapshot_keys(namespace), containerd.container_ids(namespace))
    root = world.root
    if break_it == "no-result-dir":
        shutil.rmtree(root / "result")
    elif break_it == "no-db":
        (root / "state" / "db" / "db.sqlite").unlink()
    else:
        root = root.parent / "not-mounted"
    run = reconcile_on(containerd, namespace, root, "--once")
    assert run.code == code, run.stderr
    assert "OBuilder store" in run.stderr or "does not exist yet" in run.stderr
    assert (containerd.snapshot_keys(namespace), containerd.container_ids(namespace)) == before


@pytest.mark.containerd
def test_two_runs_on_one_store_cannot_overlap(world: World, containerd: PrivateContainerd, namespace: str) -> None:
    world.orphan_chain(world.base("b:1"), "o", 1)
    before = containerd.snapshot_keys(namespace)
    with StoreLock(world.root):
        run = reconcile_on(containerd, namespace, world.root, "--once")
    assert run.code == ExitCode.LOCKED and "another reconcile holds" in run.stderr
    assert containerd.snapshot_keys(namespace) == before
    assert reconcile_on(containerd, namespace, world.root, "--once").code == 0


@pytest.mark.containerd
def test_removing_a_store_entry_never_follows_a_link_out_of_the_store(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "data").write_text("keep me")
    os.symlink(precious, world.root / "result-tmp" / "evil-link")
    inner = world.root / "result-tmp" / "has-inner-link"
    inner.mkdir()
    os.symlink(precious / "sub", inner / "escape")
    os.symlink(precious, world.root / "cache-tmp" / "0-link")
    run = reconcile_on(containerd, namespace, world.root, "--once")
    assert run.code == 0, run.stderr
    assert (precious / "sub" / "data").read_text() == "keep me"
    assert os.listdir(world.root / "result-tmp") == []
    assert os.listdir(world.root / "cache-tmp") == []


@pytest.mark.containerd
def test_at_boot_an_interrupted_build_with_unreadable_layerinfo_goes_by_its_derived_key(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    # OBuilder's own start-up recovery raises on this file and the worker never starts;
    # at boot nothing runs, so the key is the one OBuilder derives from the id.
    base = world.base("b:1")
    key = world.step("half", base, finish=False)
    (world.root / "result-tmp" / "half" / "layerinfo").write_text('((snapshot_key obuilder-half) (source "/trunc')
    # A finished result whose layerinfo is unreadable is another matter: it stays, with a human asked to look.
    kept = world.step("rbroken", base)
    (world.root / "result" / "rbroken" / "layerinfo").write_text("((snapshot_key")
    orphans = world.orphan_chain(base, "o", 2)
    run = reconcile_on(containerd, namespace, world.root, "--once")
    assert run.code == 1, run.stdout
    assert "half/layerinfo:1:39: unterminated quoted atom" in run.stdout
    assert "rbroken/layerinfo:1:" in run.stdout
    keys = containerd.snapshot_keys(namespace)
    assert key not in keys and not set(orphans) & set(keys)
    assert not (world.root / "result-tmp" / "half").exists()
    assert kept + "-committed" in keys and (world.root / "result" / "rbroken" / "layerinfo").exists()


@pytest.mark.containerd
def test_once_refuses_while_a_worker_runs_unless_forced(
    world: World, containerd: PrivateContainerd, namespace: str, named_worker: subprocess.Popen[bytes]
) -> None:
    world.leak_container("obuilder-run-1", task="running")
    run = reconcile_on(containerd, namespace, world.root, "--once")
    assert run.code == ExitCode.WORKER_RUNNING and "ocluster-worker" in run.stderr
    assert containerd.container_ids(namespace) == ["obuilder-run-1"]
    forced = reconcile_on(containerd, namespace, world.root, "--once", "--force")
    assert forced.code == 0, forced.stderr
    assert containerd.container_ids(namespace) == []


@pytest.mark.containerd
def test_shim_command_lines_naming_obuilder_run_do_not_look_like_a_worker(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    # A running obuilder-run-N task has a containerd-shim whose arguments name it.
    world.leak_container("obuilder-run-2", task="running")
    decoy = subprocess.Popen(["/bin/busybox", "sleep", "600", "obuilder", "ocluster-worker"])
    try:
        run = reconcile_on(containerd, namespace, world.root, "--once")
    finally:
        decoy.kill()
        decoy.wait()
    assert run.code == 0, run.stderr
    assert containerd.container_ids(namespace) == []
