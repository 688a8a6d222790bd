"""The incident of DESIGN.md as a world: what a worker looks like after a week of cancellations."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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
    # ...and a sibling orphan base without children.
    other_base = world.base("mcr.microsoft.com/windows/servercore:1809")
    world.buggy_prune(other_base.removeprefix("obuilder-base-"))
    inc.orphans.add(other_base + "-committed")

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
