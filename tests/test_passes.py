"""One pass, the same in both modes: what it reports, to whom, and what ``--once`` makes of several."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from controller.core.ages import entry_stamp, stamp_of, watch_clock
from controller.core.ages import watched as watched_for
from controller.core.loop import Loop
from controller.core.observe import remember
from controller.core.passes import PassOptions, one_pass, run_once
from controller.core.ports import Reporter
from controller.model.errors import CtrError
from controller.model.outcome import Backlog, Outcome, PassReport, Result
from controller.model.plan import Kind, Mode, Plan, PlanOptions
from controller.model.records import (
    ClockWatch,
    Container,
    ContainerdState,
    History,
    Observation,
    StoreEntry,
    StoreState,
    Task,
    TaskStatus,
    Watch,
)
from tests.support.fake import FakeClock, FakeContainerd, FakeStore, fake_ports, watched

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=3)
CASES = sorted((Path(__file__).parent / "cases").glob("*.json"))


class Events(Reporter):
    """Every hook call, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []
        self.reports: list[PassReport] = []

    def pass_started(self, number: int, plan: Plan) -> None:
        self.seen.append(("started", str(plan.action_count)))

    def removed(self, kind: Kind, name: str, reason: str, outcome: Outcome) -> None:
        self.seen.append(("removed", kind.value, name, outcome.value))

    def failed(self, kind: Kind, name: str, result: Result) -> None:
        self.seen.append(("failed", kind.value, name, result.outcome.value))

    def pass_finished(self, report: PassReport) -> None:
        self.seen.append(("finished", report.outcome))
        self.reports.append(report)


def orphan_world() -> FakeContainerd:
    """Old orphans only: boot and daemon agree on every verdict."""
    parents: dict[str, str | None] = {"obuilder-a-committed": None, "obuilder-b": "obuilder-a-committed"}
    parents |= {f"obuilder-o{i}": None for i in range(3)}
    return FakeContainerd(parents=parents, created=dict.fromkeys(parents, OLD))


#: What differs between the modes by nature: which mode, what asked for the pass, how many ctr
#: calls (the daemon asks the ages of what it removes), the re-check window (daemon only).
_MODAL = {"mode", "trigger", "ctr_calls", "recheck_window", "time", "seconds"}


def test_both_modes_produce_the_same_report_and_the_same_events_for_the_same_world() -> None:
    boot_world, boot_events = orphan_world(), Events()
    store = FakeStore(FakeStore.empty())
    boot = run_once(fake_ports(boot_world, store, FakeClock(NOW), boot_events), PassOptions(PlanOptions(), Mode.BOOT))

    daemon_world, daemon_events = orphan_world(), Events()
    ports = fake_ports(daemon_world, FakeStore(FakeStore.empty()), FakeClock(NOW), daemon_events)

    async def inline(fn: Any) -> PassReport:
        return fn()  # type: ignore[no-any-return]

    loop = Loop(ports, PassOptions(PlanOptions(), Mode.DAEMON), timedelta(hours=1), run_sync=inline)
    loop.history = watched(daemon_world, 86_400)  # a daemon that has watched the orphans for a day

    async def one_daemon_pass() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            while loop.last is None:
                await anyio.sleep(0.01)
            loop.request_stop()

    anyio.run(one_daemon_pass)
    assert boot.first.model_dump(exclude=_MODAL) == daemon_events.reports[0].model_dump(exclude=_MODAL)
    assert boot_events.seen == daemon_events.seen, "every reporter hears the same, in the same order"
    assert boot.first.removed == {"container": 0, "snapshot": 5, "result-tmp": 0, "cache-tmp": 0}
    assert boot_world.parents == daemon_world.parents == {}


def test_history_watches_containers_by_identity_and_state_and_forgets_what_went() -> None:
    made = NOW - timedelta(hours=1)
    empty = StoreState(root="/s")
    run1, run2 = Container(id="run-1", created_at=made), Container(id="run-2", created_at=made)
    state = ContainerdState(
        containers=(run1, run2),
        tasks=(Task(id="run-1", status=TaskStatus.RUNNING), Task(id="run-2", status=TaskStatus.STOPPED)),
    )
    h = remember(History(), state, empty, watch_clock(None, NOW, 0.0))
    assert h.live_containers == {"run-1": Watch(stamp=stamp_of(made), since=0.0)}
    assert h.idle_containers == {"run-2": Watch(stamp=stamp_of(made), since=0.0)}
    later = NOW + timedelta(minutes=1)
    # run-1's task stopped; run-2 was removed and a new container took its id (obuilder-run-N ids repeat).
    run2_again = Container(id="run-2", created_at=later)
    state2 = ContainerdState(containers=(run1, run2_again), tasks=(Task(id="run-1", status=TaskStatus.STOPPED),))
    h2 = remember(h, state2, empty, watch_clock(h.clock, later, 60.0))
    assert h2.idle_containers == {
        "run-1": Watch(stamp=stamp_of(made), since=60.0),
        "run-2": Watch(stamp=stamp_of(later), since=60.0),
    }
    assert h2.live_containers == {}, "a container whose task stopped is no longer watched running"
    h3 = remember(h2, state2, empty, watch_clock(h2.clock, later + timedelta(minutes=5), 360.0))
    assert {k: watched_for(w, w.stamp, 360.0).total_seconds() for k, w in h3.idle_containers.items()} == {
        "run-1": 300,
        "run-2": 300,
    }, "idle since the first look, not the last"


def test_a_dry_run_changes_nothing_and_tells_no_reporter_it_acted() -> None:
    world, events = orphan_world(), Events()
    run = run_once(
        fake_ports(world, FakeStore(FakeStore.empty()), FakeClock(NOW), events),
        PassOptions(PlanOptions(), Mode.BOOT, dry_run=True),
    )
    assert (run.exit_code, run.acted, len(run.passes)) == (3, 0, 1)
    assert run.first.planned["snapshot"] == 5 and len(world.parents) == 5
    assert events.seen == []


def test_the_status_of_a_run_adds_its_passes_up() -> None:
    chain = {f"obuilder-{i}": (f"obuilder-{i - 1}" if i else None) for i in range(5)}
    world = FakeContainerd(parents=dict(chain), sizes=dict.fromkeys(chain, 100))
    run = run_once(
        fake_ports(world, FakeStore(FakeStore.empty()), FakeClock(NOW)),
        PassOptions(PlanOptions(max_deletions_per_pass=2), Mode.BOOT, measure_bytes=True),
    )
    status = run.as_status()
    assert (run.acted, len(run.passes)) == (3, 4), "three passes acted, a fourth saw nothing left"
    assert status.removed["snapshot"] == 5 and status.number == 3
    assert (run.orphan_bytes_at_start, status.orphan_bytes, status.reclaimed_bytes) == (500, 0, 500)
    assert status.outcome == "success" and status.drift["orphan_snapshots"] == 0


def test_a_snapshot_removed_under_us_counts_as_gone_and_the_run_converges() -> None:
    class Vanishing(FakeContainerd):
        def remove_snapshots(self, keys: Any) -> dict[str, Result]:
            for k in keys:  # containerd's own GC got there first
                self.parents.pop(k, None)
            return {k: Result(Outcome.NOT_FOUND, "not found") for k in keys}

    world = Vanishing(parents={"obuilder-x": None})
    run = run_once(
        fake_ports(world, FakeStore(FakeStore.empty()), FakeClock(NOW)), PassOptions(PlanOptions(), Mode.BOOT)
    )
    assert run.converged and run.exit_code == 0
    assert run.total("already_gone")["snapshot"] == 1 and run.total("removed")["snapshot"] == 0


def load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text())
    return case


@pytest.mark.parametrize("path", [p for p in CASES if "pass" in load(p)], ids=lambda p: p.stem)
def test_pass_case(path: Path) -> None:
    """A world as data, run through one pass against containerd's rules: what the pass reports."""
    case = load(path)
    obs = Observation.model_validate(case["observation"])
    world = FakeContainerd.from_state(obs.containerd)
    store = FakeStore(obs.store)
    options = PassOptions(PlanOptions.model_validate(case["options"]), Mode(case["mode"]))
    report = one_pass(fake_ports(world, store, FakeClock(datetime.fromisoformat(case["now"]))), options, obs.history, 1)
    expect = case["pass"]
    got = report.model_dump(mode="json", include=set(expect) - {"left"})
    assert got == {k: v for k, v in expect.items() if k != "left"}
    assert sorted(world.parents) == expect["left"]


class UninspectableContainerd(FakeContainerd):
    """containerd where ``containers info`` fails for some owned ids, as CtrContainerd reports them:
    listed with the containers we never touch, and why in ``uninspectable``."""

    def __init__(self, broken: dict[str, TaskStatus], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.uninspectable = {cid: f"ctr containers info -- {cid}: exit 1: unexpected EOF" for cid in broken}
        self.tasks.update({cid: status for cid, status in broken.items() if status is not TaskStatus.ABSENT})

    def observe(self) -> ContainerdState:
        state = super().observe()
        return state.model_copy(
            update={"foreign_containers": tuple(self.uninspectable), "uninspectable": dict(self.uninspectable)}
        )


@pytest.mark.parametrize("mode", [Mode.BOOT, Mode.DAEMON])
def test_a_container_ctr_cannot_describe_keeps_what_it_may_use_and_everything_else_goes(mode: Mode) -> None:
    fake = UninspectableContainerd({"obuilder-run-9": TaskStatus.STOPPED}, **vars(orphan_world()))
    # ctr run names a container's snapshot after it: that one, and its ancestors, may be in use.
    fake.recreate("obuilder-under", None, OLD)
    fake.recreate("obuilder-run-9", "obuilder-under", OLD)
    store = FakeStore(FakeStore.empty())
    options = PassOptions(plan=PlanOptions(grace_period=timedelta(0)), mode=mode)
    if mode is Mode.BOOT:
        run = run_once(fake_ports(fake, store), options)
        report, stuck, code = run.last, run.stuck, run.exit_code
    else:
        report = one_pass(fake_ports(fake, store), options, watched(fake, 86_400), 1)
        stuck, code = report.stuck, None
    assert set(fake.parents) == {"obuilder-under", "obuilder-run-9"}, "the independent orphans did not all go"
    assert [(s.kind, s.name) for s in stuck] == [(Kind.CONTAINER, "obuilder-run-9")]
    assert "could not be inspected" in stuck[0].reason and "unexpected EOF" in stuck[0].reason
    assert report.drift["stuck"] == 1 and report.unjudged == tuple(stuck)
    if code is not None:
        assert code == 1


def test_while_a_container_ctr_cannot_describe_runs_no_layer_goes() -> None:
    fake = UninspectableContainerd({"obuilder-run-9": TaskStatus.RUNNING}, **vars(orphan_world()))
    before = set(fake.parents)
    store = FakeStore(FakeStore.empty())
    daemon = PassOptions(plan=PlanOptions(), mode=Mode.DAEMON)
    report = one_pass(fake_ports(fake, store), daemon, watched(fake, 86_400), 1)
    assert set(fake.parents) == before
    assert report.planned_total == 0 and [s.name for s in report.stuck] == ["obuilder-run-9"]
    assert report.plan is not None
    assert "its task is live" in report.plan.snapshot_keeps["obuilder-o1"][1]


def test_a_snapshot_containerd_cannot_date_is_kept_with_its_ancestors_and_everything_else_goes() -> None:
    class Undatable(FakeContainerd):
        def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
            if "obuilder-b" in keys:
                raise CtrError(["ctr", "snapshots", "info", "--", "obuilder-b"], 1, "ctr: proto: bad wire type")
            return super().snapshot_created(keys)

    fake = Undatable(**vars(orphan_world()))
    store = FakeStore(FakeStore.empty())
    daemon = PassOptions(plan=PlanOptions(), mode=Mode.DAEMON)
    report = one_pass(fake_ports(fake, store), daemon, watched(fake, 86_400), 1)
    assert set(fake.parents) == {"obuilder-a-committed", "obuilder-b"}
    assert [(s.kind, s.name) for s in report.stuck] == [(Kind.SNAPSHOT, "obuilder-b")]
    assert "could not date it" in report.stuck[0].reason and "bad wire type" in report.stuck[0].reason


def test_the_backlog_of_each_kind_says_what_waits_until_when_what_is_held_back_and_what_is_stuck() -> None:
    young = {f"obuilder-y{i}": NOW - timedelta(seconds=10 * (i + 1)) for i in range(3)}
    old = dict.fromkeys([f"obuilder-o{i}" for i in range(4)], OLD)
    fake = FakeContainerd(parents=dict.fromkeys([*young, *old]), created={**young, **old})
    fake.containers["obuilder-run-1"] = Container(id="obuilder-run-1", created_at=OLD)
    fake.tasks["obuilder-run-1"] = TaskStatus.STOPPED
    fake.phantom_children.add("obuilder-o0")  # containerd refuses it for good: stuck
    fresh = StoreEntry(id="fresh", area="result-tmp", changed_at=NOW - timedelta(seconds=30))
    store = FakeStore(StoreState(root="/s", tmp=(fresh,)))
    options = PlanOptions(
        grace_period=timedelta(seconds=60), stale_after=timedelta(seconds=600), max_deletions_per_pass=2
    )
    # The daemon has watched each snapshot since it was made (the old ones for a day), the
    # container since it went idle (just now), the entry since it last changed.
    clock = FakeClock(NOW)
    at = clock.monotonic()  # the last pass's reading: this pass reads the same (no time passed)
    idle = History(
        clock=ClockWatch(monotonic=at, offset=NOW.timestamp() - at),
        snapshots={
            **{k: Watch(stamp=stamp_of(c), since=at - (NOW - c).total_seconds()) for k, c in young.items()},
            **{k: Watch(stamp=stamp_of(OLD), since=at - 86_400) for k in old},
        },
        idle_containers={"obuilder-run-1": Watch(stamp=stamp_of(OLD), since=at)},
        tmp_entries={"fresh": Watch(stamp=entry_stamp(fresh), since=at - 30)},
    )
    events = Events()
    ports = fake_ports(fake, store, clock, reporter=events)
    report = one_pass(ports, PassOptions(plan=options, mode=Mode.DAEMON), idle, 1)
    b = report.backlogs
    # The oldest young one (30 s old) is eligible in 30 s; the container 60 s after it went idle.
    assert b["snapshot"] == Backlog(
        planned=2, waiting=3, next_eligible=NOW + timedelta(seconds=30), deferred=2, stuck=1
    )
    assert b["container"] == Backlog(waiting=1, next_eligible=NOW + timedelta(seconds=60))
    assert b["result-tmp"] == Backlog(waiting=1, next_eligible=NOW + timedelta(seconds=570))
    assert json.loads(report.model_dump_json())["backlogs"]["snapshot"]["deferred"] == 2


def test_at_boot_nothing_waits() -> None:
    fake = orphan_world()
    report = run_once(fake_ports(fake, FakeStore(FakeStore.empty())), PassOptions(plan=PlanOptions(), mode=Mode.BOOT))
    assert report.first.backlogs["snapshot"] == Backlog(planned=5)
    assert report.last.backlogs["snapshot"] == Backlog()


def test_a_snapshot_containerd_cannot_date_right_before_its_removal_stays_and_the_batch_goes() -> None:
    class FailsOnSecondLook(FakeContainerd):
        asked = 0

        def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
            if "obuilder-o1" in keys:
                self.asked += 1
                if self.asked > 1:  # the plan dated it; the last look before removal cannot
                    raise CtrError(["ctr", "snapshots", "info", "--", "obuilder-o1"], 1, "ctr: unexpected EOF")
            return super().snapshot_created(keys)

    fake = FailsOnSecondLook(**vars(orphan_world()))
    store = FakeStore(FakeStore.empty())
    daemon = PassOptions(plan=PlanOptions(), mode=Mode.DAEMON)
    report = one_pass(fake_ports(fake, store), daemon, watched(fake, 86_400), 1)
    assert set(fake.parents) == {"obuilder-o1"}
    assert [s.name for s in report.stuck] == ["obuilder-o1"]
    assert "could not look at it again right before its removal" in report.stuck[0].reason
