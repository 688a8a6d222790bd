"""A snapshot's name is not its identity: ages from containerd's Created, and the re-check before removal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from controller.core.executor import execute
from controller.core.identity import RemovalGuard, build_id_of, plan_with_ages
from controller.model.outcome import Outcome
from controller.model.plan import Kind, Mode, PlanOptions
from controller.model.records import Observation, StoreState
from tests.support.fake import FakeContainerd, FakeStore, watched

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
LONG_AGO = NOW - timedelta(days=2)
OPTIONS = PlanOptions(grace_period=timedelta(minutes=10))


def world() -> tuple[FakeContainerd, FakeStore]:
    fake = FakeContainerd(
        parents={"obuilder-p-committed": None, "obuilder-x": "obuilder-p-committed", "obuilder-y": None},
        created={"obuilder-p-committed": LONG_AGO, "obuilder-x": LONG_AGO, "obuilder-y": LONG_AGO},
    )
    return fake, FakeStore(StoreState(root="/s"))


def test_build_ids_are_derived_as_obuilder_names_its_keys() -> None:
    assert build_id_of("obuilder-abc") == "abc"
    assert build_id_of("obuilder-abc-committed") == "abc"
    assert build_id_of("obuilder-base-9f86-committed") == "9f86"
    assert build_id_of("sha256:0123") is None


def test_a_key_recreated_a_minute_ago_gets_a_fresh_grace_period_whatever_its_name() -> None:
    fake, store = world()
    # The daemon has watched every key for a day under the Created it had then.
    history = watched(fake, 86_400)
    fake.recreate("obuilder-x", "obuilder-p-committed", NOW - timedelta(minutes=1))
    obs = Observation(store=store.observe(), containerd=fake.observe(), history=history)
    p, seen = plan_with_ages(obs, OPTIONS, NOW, Mode.DAEMON, fake)
    assert p.snapshots == ("obuilder-y",)
    kept = {d.name: d.reason for d in p.kept(Kind.SNAPSHOT)}
    # Another snapshot under the same key: the day watched was the old one's, so its watch starts
    # now, and its grace period with it (its Created says a minute, but only watched time counts).
    assert kept["obuilder-x"].startswith("watched 0 s by this process (created 60 s ago")
    assert seen.history.snapshots["obuilder-x"].since == 0, "watched from this pass (no pass before it)"
    assert p.requeue_after == OPTIONS.grace_period
    # Only what the plan would otherwise remove is asked its age (one ctr call a key).
    assert fake.calls == 3


def test_a_key_recreated_between_plan_and_removal_is_left_alone() -> None:
    fake, store = world()
    obs = Observation(store=store.observe(), containerd=fake.observe(), history=watched(fake, 86_400))
    p, _ = plan_with_ages(obs, OPTIONS, NOW, Mode.DAEMON, fake)
    assert set(p.snapshots) == {"obuilder-x", "obuilder-y", "obuilder-p-committed"}
    # OBuilder retries the build of obuilder-x under the same id: `snapshot rm`, `snapshot prepare`.
    fake.recreate("obuilder-x", "obuilder-p-committed", NOW)
    guard = RemovalGuard(fake, lambda area, build: False)
    result = execute(p, fake, store, guard=guard, batch=16)
    outcome = {r.name: r.outcome for r in result.results}
    assert outcome["obuilder-x"] is Outcome.CHANGED
    assert outcome["obuilder-y"] is Outcome.REMOVED
    # Its parent stays too: the new snapshot is its child.
    assert outcome["obuilder-p-committed"] is Outcome.CHANGED
    assert set(fake.parents) == {"obuilder-x", "obuilder-p-committed"}
    assert not result.failures(), "a key that changed under us is not a failure"
    assert len(result.recheck_windows) == 1


def test_a_result_that_appears_for_the_build_keeps_its_snapshot() -> None:
    fake, store = world()
    obs = Observation(store=store.observe(), containerd=fake.observe(), history=watched(fake, 86_400))
    p, _ = plan_with_ages(obs, OPTIONS, NOW, Mode.DAEMON, fake)
    appeared = {("result", "y")}
    guard = RemovalGuard(fake, lambda area, build: (area, build) in appeared)
    result = execute(p, fake, store, guard=guard, batch=16)
    changed = {r.name: r.message for r in result.results if r.outcome is Outcome.CHANGED}
    assert changed == {"obuilder-y": "result/y appeared since planned"}
    assert "obuilder-y" in fake.parents and "obuilder-x" not in fake.parents


def test_daemon_batches_are_small_so_the_window_stays_short() -> None:
    keys = {f"obuilder-k{i}": None for i in range(40)}
    fake = FakeContainerd(parents=dict(keys), created=dict.fromkeys(keys, LONG_AGO))
    store = FakeStore(StoreState(root="/s"))
    obs = Observation(store=store.observe(), containerd=fake.observe(), history=watched(fake, 86_400))
    p, _ = plan_with_ages(obs, OPTIONS, NOW, Mode.DAEMON, fake)
    result = execute(p, fake, store, guard=RemovalGuard(fake, lambda a, b: False), batch=16)
    assert len(result.recheck_windows) == 3 and fake.parents == {}
