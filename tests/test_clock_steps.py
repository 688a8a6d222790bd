"""Safe whatever the clock does: every age rule on a clock whose wall and monotonic readings diverge.

A Windows VM steps its wall clock after a resume, a live migration or a time sync at boot;
containerd's Created and the files' mtimes come from clocks of their own. These tests run
passes against the in-memory world on a ``FakeClock`` and step its wall clock alone: a young
object must stay whatever the step forward, and a leak must still go within its bound after a
step back.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.adapters.store import FsStore
from controller.core.ages import STEP_TOLERANCE, stamp_of, watch_clock
from controller.core.passes import PassOptions, one_pass
from controller.core.planner import plan
from controller.model.outcome import PassReport
from controller.model.plan import Mode, PlanOptions, Rule
from controller.model.records import (
    Container,
    ContainerdState,
    History,
    LayerInfo,
    Observation,
    Snapshot,
    StoreEntry,
    StoreState,
    TaskStatus,
    Watch,
)
from tests.support.fake import FakeClock, FakeContainerd, FakeStore, fake_ports
from tests.support.world import create_store

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
GRACE, STALE, MAX_TASK = 600.0, 6 * 3600.0, 3600.0
OPTIONS = PlanOptions(
    grace_period=timedelta(seconds=GRACE),
    stale_after=timedelta(seconds=STALE),
    max_task_age=timedelta(seconds=MAX_TASK),
)
HOUR = 3600.0


class Daemon:
    """Passes one after another, each with the memory the last one left, as the loop runs them."""

    def __init__(self, fake: FakeContainerd, store: FakeStore, clock: FakeClock) -> None:
        self.ports = fake_ports(fake, store, clock)
        self.history = History()
        self.reports: list[PassReport] = []

    def look(self) -> PassReport:
        report = one_pass(self.ports, PassOptions(OPTIONS, Mode.DAEMON), self.history, len(self.reports) + 1)
        self.history = report.history or self.history
        self.reports.append(report)
        return report


def orphan_made_now() -> tuple[FakeContainerd, FakeClock]:
    """A snapshot OBuilder prepared a moment ago whose layerinfo it has not written yet."""
    return FakeContainerd(parents={"obuilder-new": None}, created={"obuilder-new": NOW}), FakeClock(NOW)


@pytest.mark.parametrize("step", [11 * 60.0, HOUR, 7 * HOUR, 30 * 24 * HOUR])
def test_a_snapshot_younger_than_its_grace_period_stays_whatever_the_wall_clock_steps_forward(step: float) -> None:
    fake, clock = orphan_made_now()
    daemon = Daemon(fake, FakeStore(FakeStore.empty()), clock)
    daemon.look()
    clock.advance(1)
    clock.step(step)  # containerd's Created stays true; our wall clock is now `step` ahead
    daemon.look()
    assert "obuilder-new" in fake.parents, "a live build's fresh snapshot was removed after a clock step"
    clock.advance(GRACE - 2)
    daemon.look()
    assert "obuilder-new" in fake.parents
    clock.advance(2)
    daemon.look()
    assert "obuilder-new" not in fake.parents, "once watched for its grace period, the orphan goes"


def test_after_a_backward_step_a_leak_still_goes_within_its_grace_period() -> None:
    fake, clock = orphan_made_now()
    daemon = Daemon(fake, FakeStore(FakeStore.empty()), clock)
    daemon.look()
    clock.advance(1)
    clock.step(-HOUR)  # its Created is now an hour ahead of our clock
    report = daemon.look()
    assert report.clock is not None and report.clock.step == pytest.approx(-HOUR)
    clock.advance(GRACE - 1)
    report = daemon.look()
    assert "obuilder-new" not in fake.parents, "the step back held a leak past its grace period"
    assert report.clock is not None and report.clock.step is None and report.clock.stamped_ahead == 0


def test_a_stopped_container_waits_its_grace_period_on_the_monotonic_clock() -> None:
    made = NOW - timedelta(days=1)
    fake = FakeContainerd(containers={"obuilder-run-1": Container(id="obuilder-run-1", created_at=made)})
    fake.tasks["obuilder-run-1"] = TaskStatus.STOPPED
    clock = FakeClock(NOW)
    daemon = Daemon(fake, FakeStore(FakeStore.empty()), clock)
    daemon.look()
    clock.step(7 * HOUR)
    daemon.look()
    assert "obuilder-run-1" in fake.containers
    clock.advance(GRACE)
    daemon.look()
    assert "obuilder-run-1" not in fake.containers


def test_max_task_age_counts_what_was_watched_running_not_the_wall_clock() -> None:
    fake = FakeContainerd(containers={"obuilder-run-1": Container(id="obuilder-run-1", created_at=NOW)})
    fake.tasks["obuilder-run-1"] = TaskStatus.RUNNING
    clock = FakeClock(NOW)
    daemon = Daemon(fake, FakeStore(FakeStore.empty()), clock)
    daemon.look()
    clock.advance(60)
    clock.step(2 * HOUR)  # past maxTaskAge by the wall clock, a minute by any other
    report = daemon.look()
    assert fake.tasks.get("obuilder-run-1") is TaskStatus.RUNNING, "a live build was killed after a clock step"
    assert report.plan is not None and report.plan.containers == ()
    clock.advance(MAX_TASK)
    daemon.look()
    assert "obuilder-run-1" not in fake.containers, "watched running for longer than maxTaskAge"


def entry(stamps: str, changed_at: datetime) -> StoreEntry:
    info = LayerInfo(snapshot_key="obuilder-b", source="/snap/b", parent_layer_paths=())
    return StoreEntry(id="b", area="result-tmp", layerinfo=info, changed_at=changed_at, stamps=stamps)


def test_a_live_builds_result_tmp_entry_stays_whatever_the_step_and_goes_once_watched_unchanged() -> None:
    fake = FakeContainerd(parents={"obuilder-b": None}, created={"obuilder-b": NOW})
    store = FakeStore(StoreState(root="/s", tmp=(entry("s1", NOW),)))
    clock = FakeClock(NOW)
    daemon = Daemon(fake, store, clock)
    daemon.look()
    clock.step(STALE + HOUR)  # past staleAfter by the wall clock alone
    daemon.look()
    assert [e.id for e in store.state.tmp] == ["b"] and "obuilder-b" in fake.parents
    # The build writes: new stamps, though a clock set back gave the write an older mtime, so the
    # newest mtime in the entry (changed_at) did not move.
    clock.advance(STALE - 10)
    store.state = StoreState(root="/s", tmp=(entry("s2", NOW),))
    daemon.look()
    clock.advance(20)
    daemon.look()
    assert [e.id for e in store.state.tmp] == ["b"], "a changed entry's staleAfter counts from its change"
    clock.advance(STALE)
    daemon.look()
    assert store.state.tmp == (), "unchanged for staleAfter: stale"
    # Its snapshot was kept by the live build until now, so never a candidate, never watched as one:
    # it waits its own grace period from here.
    assert "obuilder-b" in fake.parents
    clock.advance(GRACE)
    daemon.look()
    assert "obuilder-b" not in fake.parents


def test_a_step_is_reported_once_with_its_size_and_a_slew_is_no_step() -> None:
    fake, clock = orphan_made_now()
    daemon = Daemon(fake, FakeStore(FakeStore.empty()), clock)
    daemon.look()
    clock.advance(300)
    clock.step(STEP_TOLERANCE / 2)  # NTP slewing the clock: not a step
    assert daemon.look().clock == daemon.reports[0].clock
    clock.step(HOUR)
    stepped = daemon.look().clock
    assert stepped is not None and stepped.step == pytest.approx(HOUR) and stepped.steps == 1
    after = daemon.look().clock
    # A slew is followed, not added up: only the step counts.
    assert after is not None and after.step is None and after.net_step == pytest.approx(HOUR)


def test_slow_drift_over_a_long_gap_is_a_slew_not_a_step() -> None:
    first = watch_clock(None, NOW, 0.0)
    # Ten hours at NTP's fastest slew (500 ppm) moves the wall clock 18 s against the monotonic one.
    later = watch_clock(first.clock, NOW + timedelta(hours=10, seconds=18), 36_000.0)
    assert later.step is None and later.elapsed == 36_000.0


def test_an_object_stamped_ahead_of_the_clock_is_kept_and_reported_until_the_clock_catches_up() -> None:
    ahead = NOW + timedelta(hours=1)  # the clock was set back an hour before the daemon started
    fake = FakeContainerd(parents={"obuilder-x": None}, created={"obuilder-x": ahead})
    clock = FakeClock(NOW)
    daemon = Daemon(fake, FakeStore(FakeStore.empty()), clock)
    report = daemon.look()
    assert report.clock is not None and report.clock.stamped_ahead == 1
    assert report.clock.most_ahead == pytest.approx(HOUR)
    clock.advance(HOUR)
    daemon.look()
    assert "obuilder-x" in fake.parents, "watched an hour, but only now made by its own clock"
    clock.advance(GRACE)
    daemon.look()
    assert "obuilder-x" not in fake.parents


def test_a_daemon_that_starts_waits_one_full_period_for_what_it_has_not_watched() -> None:
    old = NOW - timedelta(days=3)
    fake = FakeContainerd(parents={"obuilder-old": None}, created={"obuilder-old": old})
    clock = FakeClock(NOW)
    daemon = Daemon(fake, FakeStore(FakeStore.empty()), clock)
    first = daemon.look()
    assert "obuilder-old" in fake.parents and first.requeue_after == GRACE
    clock.advance(GRACE)
    daemon.look()
    assert "obuilder-old" not in fake.parents


def test_at_boot_ages_do_not_matter() -> None:
    fake, clock = orphan_made_now()
    clock.step(-HOUR)
    ports = fake_ports(fake, FakeStore(FakeStore.empty()), clock)
    report = one_pass(ports, PassOptions(OPTIONS, Mode.BOOT), History(), 1)
    assert report.progress == 1 and fake.parents == {}


def test_a_write_the_stepped_clock_dated_in_the_past_still_changes_an_entrys_stamps(tmp_path: Path) -> None:
    """staleAfter counts from the entry's last change as this process saw it: a build that writes
    after the clock was set back gives its file an older mtime than the newest one, so the newest
    mtime alone would not move; the stamps (inode, size, mtime, ctime) do."""
    root = create_store(tmp_path / "store")
    entry = root / "result-tmp" / "b"
    (entry / "rootfs").mkdir(parents=True)
    log = entry / "log"
    log.write_text("step 1\n")
    newest = time.time()
    for path in (entry, entry / "rootfs"):
        os.utime(path, (newest - 10, newest - 10))
    os.utime(log, (newest, newest))
    first = {e.id: e for e in FsStore(root).observe().tmp}["b"]
    with log.open("a") as f:
        f.write("step 2\n")
    os.utime(log, (newest - HOUR, newest - HOUR))  # written by a clock an hour behind
    second = {e.id: e for e in FsStore(root).observe().tmp}["b"]
    assert first.changed_at is not None and second.changed_at is not None
    assert second.changed_at < first.changed_at, "the newest mtime did not move forward: it cannot tell"
    assert second.stamps != first.stamps, "a change the mtime hides was not seen"
    assert {e.id: e for e in FsStore(root).observe().tmp}["b"].stamps == second.stamps, "nothing changed: same stamps"


def test_time_watched_under_another_created_counts_for_nothing() -> None:
    """A snapshot re-created under the same key is another snapshot: a day watched under the old
    Created is not its age, even where the planner meets the old watch as it is."""
    created = NOW - timedelta(hours=1)  # past the grace period by its own Created, but never watched
    snapshot = Snapshot(key="obuilder-x", created=created)
    history = History(snapshots={"obuilder-x": Watch(stamp=stamp_of(NOW - timedelta(days=2)), since=-86_400)})
    obs = Observation(store=StoreState(root="/s"), containerd=ContainerdState(snapshots=(snapshot,)), history=history)
    p = plan(obs, OPTIONS, NOW, Mode.DAEMON)
    assert p.snapshots == () and p.snapshot_keeps["obuilder-x"][0] is Rule.GRACE
