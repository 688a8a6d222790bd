"""The daemon's loop against an in-memory world, on a virtual clock: no sleeps, no containerd.

trio's MockClock jumps to the next deadline as soon as every task waits, so a grace
period of ten minutes passes in microseconds, and each assertion reads the virtual
time at which the loop acted.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from trio.testing import MockClock

from controller.core.loop import PACE_CAP, Loop, backoff
from controller.core.passes import PassOptions
from controller.core.ports import Ports, Reporter
from controller.model.errors import CtrError
from controller.model.outcome import PassReport
from controller.model.plan import Mode, PlanOptions
from controller.model.records import ContainerdState, StoreState
from tests.support.fake import FakeContainerd, FakeStore, watched

BASE = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
GRACE = timedelta(minutes=10)


class VirtualClock:
    """The wall clock of a world whose time is the event loop's (virtual under MockClock)."""

    def now(self) -> datetime:
        return BASE + timedelta(seconds=anyio.current_time())

    def monotonic(self) -> float:
        return anyio.current_time()


class Recorder(Reporter):
    def __init__(self) -> None:
        self.reports: list[tuple[float, PassReport]] = []

    def pass_finished(self, report: PassReport) -> None:
        self.reports.append((anyio.current_time(), report))


async def inline(fn: Callable[[], PassReport]) -> PassReport:
    return fn()


def run_virtual(main: Callable[[], Awaitable[None]]) -> None:
    anyio.run(main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)})


class PassCost:
    """A process clock on which every pass costs ``seconds`` of CPU (the loop reads it before and after)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.reads = seconds, 0

    def __call__(self) -> float:
        self.reads += 1
        return (self.reads // 2) * self.seconds


def loop_on(
    fake: FakeContainerd,
    *,
    interval: timedelta = timedelta(hours=1),
    limit: int | None = None,
    cpu: PassCost | None = None,
    share: float = 0.03,
) -> tuple[Loop, Recorder]:
    recorder = Recorder()
    ports = Ports(containerd=fake, store=FakeStore(StoreState(root="/s")), reporter=recorder, clock=VirtualClock())
    options = PassOptions(PlanOptions(grace_period=GRACE, max_deletions_per_pass=limit), Mode.DAEMON)
    # Passes that cost no CPU unless a test says: the process's own clock would make pacing random here.
    cost = cpu or PassCost(0.0)
    return Loop(ports, options, interval, run_sync=inline, rng=random.Random(3), cpu_share=share, cpu=cost), recorder


async def until(loop: Loop, done: Callable[[], bool], *, within: float = 100_000) -> None:
    """Run the loop until ``done`` holds (virtual seconds), then stop it."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop.run)
        with anyio.fail_after(within):
            while not done():
                await anyio.sleep(0.5)  # virtual: polling costs no real time
        loop.request_stop()


def test_an_orphan_goes_as_soon_as_its_grace_period_ends_not_an_interval_later() -> None:
    fake = FakeContainerd(parents={"obuilder-young": None}, created={"obuilder-young": BASE})
    loop, seen = loop_on(fake)

    async def main() -> None:
        await until(loop, lambda: "obuilder-young" not in fake.parents)

    run_virtual(main)
    (t0, first), (t1, second) = seen.reports[:2]
    assert (t0, first.progress, first.backlog) == (0, 0, 1)
    assert first.requeue_after == GRACE.total_seconds()
    assert second.progress == 1
    assert GRACE.total_seconds() <= t1 < GRACE.total_seconds() + 1, "the loop came back when the grace ran out"


def test_passes_follow_each_other_at_once_while_they_remove_and_then_wait_an_interval() -> None:
    chain = {f"obuilder-{i}": (f"obuilder-{i - 1}" if i else None) for i in range(6)}
    old = BASE - timedelta(days=1)
    fake = FakeContainerd(parents=dict(chain), created=dict.fromkeys(chain, old))
    loop, seen = loop_on(fake, interval=timedelta(minutes=5), limit=2)
    loop.history = watched(fake, 86_400)  # a daemon that has watched them for a day

    async def main() -> None:
        await until(loop, lambda: len(seen.reports) >= 5)

    run_virtual(main)
    times = [t for t, _ in seen.reports]
    removed = [r.progress for _, r in seen.reports]
    assert removed[:4] == [2, 2, 2, 0]
    assert times[:4] == [0, 0, 0, 0], "level-triggered: it looks again at once while it removes"
    assert times[4] == pytest.approx(300), "then the resync interval"
    assert fake.parents == {}


def test_triggers_during_a_pass_coalesce_into_one_more_and_passes_never_overlap() -> None:
    holder: list[Loop] = []
    running: list[bool] = []

    class Busy(FakeContainerd):
        def observe(self) -> ContainerdState:
            assert not running, "two passes overlapped"
            running.append(True)
            try:
                if holder[0].passes == 1:
                    for n in range(20):  # a burst of store changes lands inside the first pass
                        holder[0].trigger(f"burst {n}")
                return super().observe()
            finally:
                running.pop()

    fake = Busy()
    loop, seen = loop_on(fake)
    holder.append(loop)

    async def main() -> None:
        await until(loop, lambda: bool(seen.reports) and anyio.current_time() > 10)

    run_virtual(main)
    assert [r.trigger for _, r in seen.reports] == ["start-up", "burst 0"]
    assert [t for t, _ in seen.reports] == [0, 0]


def test_a_failing_pass_is_reported_backs_off_and_the_loop_recovers() -> None:
    failures = [CtrError(["ctr"], 1, "ctr: failed to dial: connection refused"), FileNotFoundError(2, "gone", "/s/x")]

    class Flaky(FakeContainerd):
        def observe(self) -> ContainerdState:
            if failures:
                raise failures.pop(0)
            return super().observe()

    fake = Flaky(parents={"obuilder-old": None}, created={"obuilder-old": BASE - timedelta(days=1)})
    loop, seen = loop_on(fake)
    loop.history = watched(fake, 86_400)

    async def main() -> None:
        await until(loop, lambda: "obuilder-old" not in fake.parents)

    run_virtual(main)
    (t0, a), (t1, b), (t2, c) = seen.reports[:3]
    assert (a.outcome, b.outcome, c.outcome) == ("error", "error", "success")
    assert "connection refused" in (a.error or "") and not a.containerd_up
    assert "FileNotFoundError" in (b.error or "") and b.traceback and b.containerd_up
    rng = random.Random(3)
    assert (t1 - t0, t2 - t1) == pytest.approx((backoff(1, rng), backoff(2, rng)))
    assert c.progress == 1


def test_backoff_doubles_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff(n, rng) for n in range(1, 12)]
    for n, d in zip(range(1, 12), delays, strict=True):
        assert 0.5 * min(120, 2 ** (n - 1)) <= d <= min(120, 2 ** (n - 1))


def test_stop_ends_the_loop_before_the_next_pass() -> None:
    fake = FakeContainerd(parents={"obuilder-young": None}, created={"obuilder-young": BASE})
    loop, seen = loop_on(fake)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            await anyio.sleep(60)
            loop.request_stop()

    run_virtual(main)
    assert len(seen.reports) == 1 and "obuilder-young" in fake.parents


def test_readiness_follows_the_last_pass() -> None:
    down: list[bool] = []

    class GoesDown(FakeContainerd):
        def observe(self) -> ContainerdState:
            if down:
                raise CtrError(["ctr"], 1, "ctr: failed to dial: connection refused")
            return super().observe()

    fake = GoesDown()
    loop, _ = loop_on(fake, interval=timedelta(minutes=1))
    assert loop.ready() == (False, "no pass has finished yet")
    answers: list[tuple[bool, str]] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            await anyio.sleep(1)
            answers.append(loop.ready())
            down.append(True)
            await anyio.sleep(90)  # the next resync fails
            answers.append(loop.ready())
            loop.request_stop()

    run_virtual(main)
    assert answers[0][0] is True
    assert answers[1] == (False, "the last pass failed: ctr: exit 1: ctr: failed to dial: connection refused")


async def a_change_every_second(loop: Loop, changes: int, *, ready: bool = False) -> None:
    """The loop beside a store that changes every second; stopped half a second after the last."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(loop.run)
        for n in range(changes):
            await anyio.sleep(1)
            loop.trigger(f"change {n}")
        await anyio.sleep(0.5)
        assert loop.ready()[0] or not ready, "readiness allows for the spacing"
        loop.request_stop()


def test_passes_a_busy_store_asks_for_are_spaced_by_what_they_cost_and_no_change_is_lost() -> None:
    """A change every second, passes that cost 0.6 s of CPU, a budget of 3% of a core: past the
    burst, a pass every 20 s, each carrying the changes that came while it was held back."""
    fake = FakeContainerd()
    loop, seen = loop_on(fake, interval=timedelta(seconds=5), cpu=PassCost(0.6), share=0.03)

    run_virtual(functools.partial(a_change_every_second, loop, 100, ready=True))
    times = [t for t, _ in seen.reports]
    # The first pass (a cold cache) spends nothing; the second at the first change takes the 0.5 s
    # burst and 0.1 s more, which 3% of a core gives back in 3.3 s; from then on one every 20 s.
    held = 1.0 + 0.1 / 0.03
    assert times == pytest.approx([0.0, 1.0, *(held + 20.0 * n for n in range(len(times) - 2))])
    assert len(times) == 7
    assert [r.trigger for _, r in seen.reports][1:4] == ["change 0", "change 1", "change 4"]


def test_a_pass_that_removed_something_is_followed_at_once_whatever_it_cost() -> None:
    chain = {f"obuilder-{i}": (f"obuilder-{i - 1}" if i else None) for i in range(4)}
    fake = FakeContainerd(parents=dict(chain), created=dict.fromkeys(chain, BASE - timedelta(days=1)))
    loop, seen = loop_on(fake, interval=timedelta(seconds=5), limit=2, cpu=PassCost(3.0), share=0.03)
    loop.history = watched(fake, 86_400)

    async def main() -> None:
        await until(loop, lambda: len(seen.reports) >= 4)

    run_virtual(main)
    assert [r.progress for _, r in seen.reports[:3]] == [2, 2, 0]
    # The second and third passes spent 6 s against a 0.5 s burst: the fourth waits, as long as the cap.
    assert [t for t, _ in seen.reports[:4]] == pytest.approx([0, 0, 0, PACE_CAP])


def test_one_costly_pass_holds_the_next_back_no_longer_than_the_cap() -> None:
    loop, seen = loop_on(FakeContainerd(), interval=timedelta(seconds=5), cpu=PassCost(60.0), share=0.03)

    async def main() -> None:
        await until(loop, lambda: len(seen.reports) >= 4)

    run_virtual(main)
    assert [t for t, _ in seen.reports[:4]] == pytest.approx([0, 5, 5 + PACE_CAP, 5 + 2 * PACE_CAP])


def test_a_stop_while_a_pass_is_held_back_ends_the_loop_at_once() -> None:
    loop, seen = loop_on(FakeContainerd(), interval=timedelta(seconds=5), cpu=PassCost(30.0), share=0.03)
    stopped_at: list[float] = []

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            await anyio.sleep(10)
            loop.trigger("change")
            await anyio.sleep(10)
            loop.request_stop()
        stopped_at.append(anyio.current_time())

    run_virtual(main)
    assert [t for t, _ in seen.reports] == [0, 5], "the second pass (at the interval) costs 30 s: the third waits"
    assert stopped_at == pytest.approx([20.0])


def test_cheap_passes_on_a_small_store_follow_every_change_at_once() -> None:
    loop, seen = loop_on(FakeContainerd(), interval=timedelta(seconds=5), cpu=PassCost(0.02), share=0.03)

    run_virtual(functools.partial(a_change_every_second, loop, 120))
    assert [t for t, _ in seen.reports] == pytest.approx([float(n) for n in range(121)]), "none held back"


def test_a_reload_that_lowers_the_share_under_a_debt_holds_passes_no_longer_than_the_cap() -> None:
    loop, seen = loop_on(FakeContainerd(), interval=timedelta(seconds=5), cpu=PassCost(200.0), share=1.0)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            await anyio.sleep(6)  # two passes: the second ran up a debt of 120 s at a share of 1
            loop.reconfigure(loop.ports, loop.options, timedelta(seconds=5), cpu_share=0.03)
            loop.trigger("policy reloaded")
            await anyio.sleep(PACE_CAP + 10)
            loop.request_stop()

    run_virtual(main)
    times = [t for t, _ in seen.reports]
    assert times[:3] == pytest.approx([0, 5, 5 + PACE_CAP]), "not the 4,000 s the debt is worth at 3%"
