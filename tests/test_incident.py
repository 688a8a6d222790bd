"""The incident of DESIGN.md, reproduced on a real containerd and repaired by ``reconcile --once``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli import reconcile_on
from tests.support.containerd import PrivateContainerd
from tests.support.incident import OTHER_NS, wedge
from tests.support.world import World


def owned(keys: list[str]) -> set[str]:
    return {k for k in keys if k.startswith("obuilder-")}


def db_files(root: Path) -> dict[str, str]:
    folder = root / "state" / "db"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.containerd
def test_once_repairs_the_wedged_worker_and_keeps_what_the_store_needs(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    inc = wedge(world, containerd)
    assert len(inc.orphans) >= 200
    other_before = (containerd.snapshot_keys(OTHER_NS), containerd.container_ids(OTHER_NS))
    db_before = db_files(world.root)

    dry = reconcile_on(containerd, namespace, world.root, "--once", "--dry-run", "--json")
    assert dry.code == 3, dry.stderr
    planned = {k for level in dry.json["plan"]["snapshot_levels"] for k in level}
    assert planned == inc.orphans
    assert {c["id"] for c in dry.json["plan"]["containers"]} == inc.leaked_containers
    assert owned(containerd.snapshot_keys(namespace)) == inc.kept | inc.orphans, "a dry run changed containerd"

    run = reconcile_on(containerd, namespace, world.root, "--once", "--json")
    assert run.code == 0, run.stdout + run.stderr
    summary = run.json["summary"]
    assert summary["converged"] is True
    # containerd's GC may take a removed container's own snapshot before we do.
    assert summary["removed"]["snapshot"] + summary["already_gone"]["snapshot"] == len(inc.orphans)
    assert summary["removed"]["container"] == len(inc.leaked_containers)

    after = containerd.snapshot_keys(namespace)
    assert owned(after) == inc.kept, "exactly what result/ needs survives"
    assert inc.foreign_snapshots <= set(after)
    assert world.image_layer in after
    assert set(containerd.container_ids(namespace)) == inc.foreign_containers
    assert containerd.task_status(namespace) == {"buildkit-worker-1": "RUNNING"}
    assert (containerd.snapshot_keys(OTHER_NS), containerd.container_ids(OTHER_NS)) == other_before
    assert sorted(os.listdir(world.root / "result-tmp")) == []
    assert os.listdir(world.root / "cache-tmp") == []
    assert sorted(os.listdir(world.root / "result")) == sorted(
        [k.removeprefix("obuilder-base-").removeprefix("obuilder-").removesuffix("-committed") for k in inc.kept]
    )
    assert db_files(world.root) == db_before, "the DB was written"

    again = reconcile_on(containerd, namespace, world.root, "--once", "--json")
    assert again.code == 0
    assert again.json["summary"]["removed"] == {"container": 0, "snapshot": 0, "result-tmp": 0, "cache-tmp": 0}
    assert again.json["summary"]["passes"] == 0


@pytest.mark.containerd
def test_removal_batches_so_ctr_calls_follow_depth_not_count(
    world: World, containerd: PrivateContainerd, namespace: str, measure: Callable[[str], None]
) -> None:
    base = world.base("base/image:1")
    for i in range(40):
        world.orphan_chain(base, f"x{i}", 5)  # 200 orphans, 5 levels deep
    run = reconcile_on(containerd, namespace, world.root, "--once", "--json")
    assert run.code == 0, run.stderr
    summary = run.json["summary"]
    assert summary["removed"]["snapshot"] == 200
    measure(f"200 orphans in 40 chains of 5: {summary['ctr_calls']} ctr calls, {summary['seconds']} s, 1 pass")
    # Observe twice (snapshots, containers, tasks), per level one rm for each of the default
    # 4 parallel ctr processes (5 levels, whatever the number of orphans), and containerd's
    # garbage collection waited for (a lease created and deleted with --sync). The look at the
    # disk after it lists each namespace (here, every earlier test's): counted apart.
    assert summary["ctr_calls"] - summary["disk"]["calls"] <= 3 + 4 * 5 + 3 + 2, summary
