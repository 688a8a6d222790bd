"""The executor: order of removals, leaves first, what waits for what, and stopping between actions."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from controller.core.executor import execute
from controller.core.planner import plan
from controller.model.outcome import Outcome, Result
from controller.model.plan import Mode, PlanOptions
from controller.model.records import Container, Observation, StoreEntry, StoreState, TaskStatus
from tests.support.fake import FakeContainerd, FakeStore

NOW = datetime(2026, 11, 29, tzinfo=UTC)


@dataclass
class StopsDuring(FakeContainerd):
    """Sets the stop flag while the removal of a named object (a container's task, a container,
    a snapshot) is under way."""

    at: str = ""
    stop: threading.Event = field(default_factory=threading.Event)

    def _under_way(self, names: Sequence[str]) -> None:
        if self.at in names:
            self.stop.set()

    def delete_tasks(self, ids: Sequence[str]) -> dict[str, Result]:
        self._under_way([f"task of {i}" for i in ids])
        return super().delete_tasks(ids)

    def remove_containers(self, ids: Sequence[str]) -> dict[str, Result]:
        self._under_way(ids)
        return super().remove_containers(ids)

    def remove_snapshots(self, keys: Sequence[str]) -> dict[str, Result]:
        self._under_way(keys)
        return super().remove_snapshots(keys)


@dataclass
class StoreStopsDuring(FakeStore):
    """Sets the stop flag while the removal of a named result-tmp/ entry or cache-tmp/ leftover is under way."""

    at: str = ""
    stop: threading.Event = field(default_factory=threading.Event)

    def remove_tmp_entry(self, entry_id: str) -> Result:
        if entry_id == self.at:
            self.stop.set()
        return super().remove_tmp_entry(entry_id)

    def remove_cache_tmp(self, name: str) -> Result:
        if name == self.at:
            self.stop.set()
        return super().remove_cache_tmp(name)


#: A container that uses the leaf of a chain (so the whole chain waits for it), two result-tmp/
#: entries and two cache-tmp/ leftovers: the order in which one pass removes them.
ORDER = ["obuilder-run-1", "obuilder-c", "obuilder-b", "obuilder-a", "t1", "t2", "c1", "c2"]


@pytest.mark.parametrize("at", ["task of obuilder-run-1", *ORDER])
def test_stopping_finishes_the_action_under_way_not_the_pass(at: str) -> None:
    stop = threading.Event()
    fake = StopsDuring(
        parents={"obuilder-a": None, "obuilder-b": "obuilder-a", "obuilder-c": "obuilder-b"},
        containers={"obuilder-run-1": Container(id="obuilder-run-1", snapshot_key="obuilder-c")},
        tasks={"obuilder-run-1": TaskStatus.RUNNING},
        at=at,
        stop=stop,
    )
    tmp = tuple(StoreEntry(id=i, area="result-tmp") for i in ("t1", "t2"))
    store = StoreStopsDuring(StoreState(root="/s", tmp=tmp, cache_tmp=("c1", "c2")), at=at, stop=stop)
    p = plan(Observation(store=store.observe(), containerd=fake.observe()), PlanOptions(), NOW, Mode.BOOT)
    assert [*(c.id for c in p.containers), *p.snapshots] == ORDER[:4]
    assert [t.id for t in p.tmp_entries] == ["t1", "t2"] and [c.name for c in p.cache_tmp] == ["c1", "c2"]

    result = execute(p, fake, store, should_stop=stop.is_set)

    assert stop.is_set()
    done = ORDER[: ORDER.index(at) + 1] if at in ORDER else []
    # The action under way finished, and was reported; nothing after it was done, or reported.
    assert [(r.name, r.outcome) for r in result.results] == [(name, Outcome.REMOVED) for name in done]
    left = {*fake.containers, *fake.parents, *(e.id for e in store.state.tmp), *store.state.cache_tmp}
    assert left == set(ORDER) - set(done)
    assert "obuilder-run-1" not in fake.tasks, "its task went first, whatever came after"


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
