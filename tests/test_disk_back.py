"""``--once`` ends with the disk back: the layer folders of what it removed are gone when it returns.

``ctr snapshots rm`` drops containerd's record; the folder goes in containerd's next
garbage collection. At boot the worker starts right after us, so the run asks for a
collection as soon as a pass has removed snapshots and waits for it before it ends.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from controller.core.passes import PassOptions, run_once
from controller.model.disk import DiskDrift
from controller.model.outcome import Outcome, Result
from controller.model.plan import Mode, PlanOptions
from controller.model.records import ContainerdState, Snapshot
from tests.support.cli import reconcile_on
from tests.support.containerd import SNAPSHOTTER, PrivateContainerd
from tests.support.fake import FakeContainerd, FakeStore, fake_ports
from tests.support.world import World


def orphan_world() -> FakeContainerd:
    return FakeContainerd.from_state(
        ContainerdState(
            snapshots=(
                Snapshot(key="sha256:base"),
                Snapshot(key="obuilder-a-committed", parent="sha256:base"),
                Snapshot(key="obuilder-b-committed", parent="obuilder-a-committed"),
            )
        )
    )


def test_a_run_that_removed_snapshots_waits_for_containerds_collection() -> None:
    cd = orphan_world()
    run = run_once(fake_ports(cd, FakeStore(FakeStore.empty())), PassOptions(PlanOptions(), Mode.BOOT))
    assert run.converged
    assert cd.collections == 1
    assert cd.uncollected == set()  # their folders are gone when the run returns
    assert run.garbage_collection == "done"


def test_a_dry_run_or_a_run_with_nothing_to_remove_does_not_collect() -> None:
    cd = orphan_world()
    run_once(fake_ports(cd, FakeStore(FakeStore.empty())), PassOptions(PlanOptions(), Mode.BOOT, dry_run=True))
    assert cd.collections == 0
    run_once(fake_ports(cd, FakeStore(FakeStore.empty())), PassOptions(PlanOptions(), Mode.BOOT))
    cd.collections = 0
    again = run_once(fake_ports(cd, FakeStore(FakeStore.empty())), PassOptions(PlanOptions(), Mode.BOOT))
    assert again.converged and cd.collections == 0 and again.garbage_collection is None


class FailingCollection(FakeContainerd):
    def collect_garbage(self) -> Result:
        return Result(Outcome.FAILED, "leases rm --sync: context deadline exceeded")


def test_a_collection_that_fails_is_reported_and_the_removals_stand() -> None:
    cd = FailingCollection.from_state(orphan_world().observe())
    assert isinstance(cd, FailingCollection)
    run = run_once(fake_ports(cd, FakeStore(FakeStore.empty())), PassOptions(PlanOptions(), Mode.BOOT))
    assert run.converged and run.exit_code == 0
    assert run.garbage_collection == "leases rm --sync: context deadline exceeded"
    assert set(cd.parents) == {"sha256:base"}


def _layer_folders(cd: PrivateContainerd) -> int:
    return len(os.listdir(cd.base / "root" / f"io.containerd.snapshotter.v1.{SNAPSHOTTER}" / "snapshots"))


def _settled(cd: PrivateContainerd, quiet: float = 1.0, timeout: float = 30) -> int:
    """The folder count once containerd's collector has left it alone for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    count, since = _layer_folders(cd), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = _layer_folders(cd)
        if now != count:
            count, since = now, time.monotonic()
    return count


def test_once_returns_with_the_removed_snapshots_layer_folders_gone(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    base = world.base("b:1") + "-committed"
    before = _settled(containerd)

    def chain(n: int) -> None:
        parent = base
        for depth in range(4):
            key = f"obuilder-gone{n}-{depth}"
            world.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", "--", key, parent)
            parent = world.commit(key)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(chain, range(40)))
    assert _settled(containerd) == before + 160

    run = reconcile_on(containerd, namespace, world.root, "--once", "--json")
    left = _layer_folders(containerd) - before
    assert run.code == 0, run.stderr
    assert run.json["summary"]["removed"]["snapshot"] == 160
    assert left <= 0, f"{left} layer folders of removed snapshots were still on disk when --once returned"
    assert run.json["summary"]["garbage_collection"] == "done"


class FakeDisk:
    """The snapshotter's folder: counts its looks."""

    def __init__(self) -> None:
        self.calls = 0
        self.looks = 0

    def observe_states(self, containerd: object, store: object) -> DiskDrift:
        self.looks += 1
        self.calls += 2
        return DiskDrift(folder="/snapshots")

    def reclaimed(self, removed_bytes: int | None, drift: DiskDrift | None) -> int | None:
        return removed_bytes


def test_the_daemon_looks_at_the_disk_once_an_interval_and_never_right_after_removing() -> None:
    from datetime import timedelta

    from controller.core.passes import one_pass
    from controller.model.records import History
    from tests.support.fake import FakeClock

    clock = FakeClock(datetime(2026, 11, 29, tzinfo=UTC))
    cd, disk = orphan_world(), FakeDisk()
    ports = fake_ports(cd, FakeStore(FakeStore.empty()), clock)
    ports = dataclasses.replace(ports, disk=disk)
    options = PassOptions(PlanOptions(grace_period=timedelta(0)), Mode.DAEMON, disk_every=timedelta(minutes=5))
    first = one_pass(ports, options, History(), 1)
    assert disk.looks == 1 and first.disk is not None  # before it removed anything
    assert first.removed.get("snapshot")
    clock.advance(360)
    history = first.history
    assert history is not None
    cd.recreate("obuilder-c-committed", "sha256:base", clock.now() - timedelta(hours=1))
    second = one_pass(ports, options, history, 2)
    assert disk.looks == 2 and second.removed.get("snapshot")  # the interval passed
    clock.advance(30)
    assert second.history is not None
    # Interval passed (ten seconds), but the collection of what the last pass removed may
    # still be deleting folders: they would look like folders containerd does not know.
    often = dataclasses.replace(options, disk_every=timedelta(seconds=10))
    third = one_pass(ports, often, second.history, 3)
    assert disk.looks == 2 and third.disk is None
    clock.advance(31)
    assert third.history is not None
    fourth = one_pass(ports, often, third.history, 4)
    assert disk.looks == 3 and fourth.disk is not None
