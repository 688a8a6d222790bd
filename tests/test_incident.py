"""The incident of DESIGN.md, reproduced on a real containerd and repaired by ``reconcile --once``."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.cli import reconcile_on
from tests.support.containerd import SNAPSHOTTER, PrivateContainerd
from tests.support.world import World

OTHER_NS = "someone-else"


@dataclass
class Incident:
    world: World
    kept: set[str] = field(default_factory=set)
    orphans: set[str] = field(default_factory=set)
    leaked_containers: set[str] = field(default_factory=set)
    interrupted: set[str] = field(default_factory=set)
    foreign_snapshots: set[str] = field(default_factory=set)
    foreign_containers: set[str] = field(default_factory=set)


def wedge(world: World, cd: PrivateContainerd, *, orphan_chains: int = 42, depth: int = 5) -> Incident:
    """A worker after a week of cancellations: everything the issue asks for, and what must survive."""
    inc = Incident(world)
    # What the store still needs: a base image and a few finished steps on it.
    base = world.base("mcr.microsoft.com/windows/servercore:ltsc2022")
    a = world.step("a", base)
    b = world.step("b", a)
    inc.kept |= {base + "-committed", a + "-committed", b + "-committed"}

    # The leak: chains of committed snapshots whose rows and directories were pruned.
    for i in range(orphan_chains):
        inc.orphans |= set(world.orphan_chain([base, a, b][i % 3], f"leak{i}", depth))

    # An orphan base image (its result went) with children under it.
    lost_base = world.base("mcr.microsoft.com/windows/nanoserver:ltsc2022")
    lost_id = lost_base.removeprefix("obuilder-base-")
    world.buggy_prune(lost_id)
    inc.orphans.add(lost_base + "-committed")
    inc.orphans |= set(world.orphan_chain(lost_base, "onlost", 3))

    # Interrupted builds: active snapshots in result-tmp/, some pinned by leaked containers.
    for n, task in enumerate(("running", "stopped", "absent")):
        build = f"cut{n}"
        inc.orphans.add(world.step(build, b, finish=False))
        inc.interrupted.add(build)
        world.leak_container(f"obuilder-run-{100 + n}", rootfs=world.source_of(build), task=task)
        inc.leaked_containers.add(f"obuilder-run-{100 + n}")
    inc.orphans.add(world.step("cut-quiet", a, finish=False))
    inc.interrupted.add("cut-quiet")
    # A base image being pulled when the worker died: rootfs/ but no layerinfo yet.
    pulling = hashlib.sha256(b"mcr.microsoft.com/windows/servercore:ltsc2019").hexdigest()
    (world.root / "result-tmp" / pulling / "rootfs").mkdir(parents=True)
    inc.interrupted.add(pulling)
    # A container started from an image: containerd made it a snapshot named after it.
    world.leak_container("obuilder-run-200", task="running")
    inc.leaked_containers.add("obuilder-run-200")
    inc.orphans.add("obuilder-run-200")
    # A directory whose name looks like a ctr flag.
    (world.root / "result-tmp" / "--address=x").mkdir()
    inc.interrupted.add("--address=x")
    (world.root / "cache-tmp" / "0-opam-archives").mkdir()

    # Not ours: a foreign snapshot and container, and another namespace's look-alikes.
    world.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", "--", "buildkit-scratch", world.image_layer)
    inc.foreign_snapshots.add("buildkit-scratch")
    world.leak_container("buildkit-worker-1", task="running")
    inc.foreign_containers.add("buildkit-worker-1")
    other = World(cd, OTHER_NS, world.root.parent / "other-store")
    other.orphan_chain(other.base("other/base:1"), "o", 2)
    other.leak_container("obuilder-run-999", task="stopped")
    return inc


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
    planned = {s["key"] for level in dry.json["plan"]["snapshot_levels"] for s in level}
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
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    base = world.base("base/image:1")
    for i in range(40):
        world.orphan_chain(base, f"x{i}", 5)  # 200 orphans, 5 levels deep
    run = reconcile_on(containerd, namespace, world.root, "--once", "--json")
    assert run.code == 0, run.stderr
    summary = run.json["summary"]
    assert summary["removed"]["snapshot"] == 200
    # Observe twice (snapshots, containers, tasks) and one rm per level.
    assert summary["ctr_calls"] <= 3 + 5 + 3, summary
