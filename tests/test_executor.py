"""The executor: order of removals, leaves first, what waits for what, and stopping between actions."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from controller.core.executor import execute
from controller.core.planner import plan
from controller.model.outcome import Outcome, Result
from controller.model.plan import Mode, PlanOptions
from controller.model.records import Container, Observation, StoreEntry, StoreState, TaskStatus
from tests.support.fake import FakeContainerd, FakeStore

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def test_stopping_finishes_the_action_under_way_not_the_pass() -> None:
    fake = FakeContainerd(parents={"obuilder-a": None, "obuilder-b": "obuilder-a", "obuilder-c": "obuilder-b"})
    store = FakeStore(StoreState(root="/s"))
    p = plan(Observation(store=store.observe(), containerd=fake.observe()), PlanOptions(), NOW, Mode.BOOT)
    asked: list[int] = []

    def stop_after_first_action() -> bool:
        asked.append(1)
        return len(asked) > 1  # the first level runs; stop before the second

    result = execute(p, fake, store, should_stop=stop_after_first_action)
    assert [r.name for r in result.results] == ["obuilder-c"]
    assert set(fake.parents) == {"obuilder-a", "obuilder-b"}


def test_orphans_no_container_uses_go_while_containers_are_removed_and_the_rest_after() -> None:
    order: list[str] = []

    class Recording(FakeContainerd):
        def remove_containers(self, ids: Sequence[str]) -> dict[str, Result]:
            time.sleep(0.2)  # a task takes a moment to die
            order.append("containers")
            return super().remove_containers(ids)

        def remove_snapshots(self, keys: Sequence[str]) -> dict[str, Result]:
            order.extend(keys)
            return super().remove_snapshots(keys)

    fake = Recording(
        parents={"obuilder-free": None, "obuilder-used-committed": None, "obuilder-used": "obuilder-used-committed"},
        containers={"obuilder-run-1": Container(id="obuilder-run-1", snapshot_key="obuilder-used")},
        tasks={"obuilder-run-1": TaskStatus.STOPPED},
    )
    store = FakeStore(StoreState(root="/s"))
    p = plan(Observation(store=store.observe(), containerd=fake.observe()), PlanOptions(), NOW, Mode.BOOT)
    assert p.pinned == ("obuilder-used",)
    result = execute(p, fake, store)
    assert not result.failures()
    assert order.index("obuilder-free") < order.index("containers") < order.index("obuilder-used")
    assert order.index("obuilder-used") < order.index("obuilder-used-committed")
    assert fake.parents == {}


def test_a_failed_child_keeps_its_parent_for_the_next_pass() -> None:
    fake = FakeContainerd(parents={"obuilder-p": None, "obuilder-c": "obuilder-p"})

    class Refuses(FakeContainerd):
        def remove_snapshots(self, keys: Sequence[str]) -> dict[str, Result]:
            if "obuilder-c" in keys:
                return {k: Result(Outcome.FAILED, "the layer is in use") for k in keys}
            return super().remove_snapshots(keys)

    fake = Refuses(parents=fake.parents)
    store = FakeStore(StoreState(root="/s"))
    p = plan(Observation(store=store.observe(), containerd=fake.observe()), PlanOptions(), NOW, Mode.BOOT)
    result = execute(p, fake, store)
    outcome = {r.name: (r.outcome, r.message) for r in result.results}
    assert outcome["obuilder-c"] == (Outcome.FAILED, "the layer is in use")
    assert outcome["obuilder-p"] == (Outcome.NOT_TRIED, "waiting for its child obuilder-c")
    assert set(fake.parents) == {"obuilder-p", "obuilder-c"}


def test_an_entry_whose_removal_raises_fails_that_entry_and_the_others_still_go() -> None:
    class DeepTree(FakeStore):
        def remove_tmp_entry(self, entry_id: str) -> Result:
            if entry_id == "deep":
                raise RecursionError("maximum recursion depth exceeded")
            return super().remove_tmp_entry(entry_id)

    entries = tuple(StoreEntry(id=i, area="result-tmp") for i in ("a", "deep", "z"))
    store = DeepTree(StoreState(root="/s", tmp=entries, cache_tmp=("c",)))
    fake = FakeContainerd()
    p = plan(Observation(store=store.observe(), containerd=fake.observe()), PlanOptions(), NOW, Mode.BOOT)
    result = execute(p, fake, store)
    outcomes = {r.name: (r.outcome, r.message) for r in result.results}
    assert outcomes["deep"] == (Outcome.FAILED, "unexpected error: RecursionError: maximum recursion depth exceeded")
    assert store.removed == ["result-tmp/a", "result-tmp/z", "cache-tmp/c"]


class ContainerStays(FakeContainerd):
    """A container whose compute system is gone (HCS): containerd cannot remove it."""

    def remove_containers(self, ids: Sequence[str]) -> dict[str, Result]:
        out = super().remove_containers([i for i in ids if i != "obuilder-run-1"])
        return {**out, "obuilder-run-1": Result(Outcome.FAILED, "hcsshim::System::Terminate: does not exist")}


def test_what_a_container_that_stays_uses_waits_with_it_and_the_rest_goes() -> None:
    fake = ContainerStays(
        parents={"obuilder-free": None, "obuilder-used-committed": None, "obuilder-used": "obuilder-used-committed"},
        containers={
            "obuilder-run-1": Container(id="obuilder-run-1", snapshot_key="obuilder-used"),
            "obuilder-run-2": Container(id="obuilder-run-2"),
        },
        tasks={"obuilder-run-1": TaskStatus.STOPPED},
    )
    store = FakeStore(StoreState(root="/s"))
    p = plan(Observation(store=store.observe(), containerd=fake.observe()), PlanOptions(), NOW, Mode.BOOT)
    result = execute(p, fake, store)
    outcome = {r.name: (r.outcome, r.message) for r in result.results}
    # Removing the layer under a live compute system would leave its folder to a collection
    # that cannot delete it: the layer and its parent wait for the container.
    assert set(fake.parents) == {"obuilder-used", "obuilder-used-committed"}
    assert outcome["obuilder-used"][0] is Outcome.NOT_TRIED
    assert "waiting for container obuilder-run-1" in outcome["obuilder-used"][1]
    assert "waiting for container obuilder-run-1" in outcome["obuilder-used-committed"][1]
    assert outcome["obuilder-free"][0] is Outcome.REMOVED
    assert set(fake.containers) == {"obuilder-run-1"}


def test_a_container_on_a_folder_no_build_names_holds_every_snapshot_while_it_stays() -> None:
    fake = ContainerStays(
        parents={"obuilder-a": None, "obuilder-b": None},
        containers={"obuilder-run-1": Container(id="obuilder-run-1", layer_folders=("C:\\somewhere\\unknown",))},
    )
    store = FakeStore(StoreState(root="/s"))
    p = plan(Observation(store=store.observe(), containerd=fake.observe()), PlanOptions(), NOW, Mode.BOOT)
    assert p.containers_first
    result = execute(p, fake, store)
    assert set(fake.parents) == {"obuilder-a", "obuilder-b"}
    assert all(r.outcome is Outcome.NOT_TRIED for r in result.results if r.kind == "snapshot")
