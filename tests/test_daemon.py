"""Daemon mode beside a live (simulated) OBuilder worker, on the real containerd."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from controller.adapters.ctr import Result
from controller.adapters.status import PassStatus
from controller.config.settings import Overrides, resolve
from controller.core.executor import execute
from controller.core.planner import plan
from controller.daemon import Daemon, backoff, remember
from controller.model.errors import CtrError
from controller.model.plan import Mode, Plan, PlanOptions
from controller.model.records import (
    Container,
    ContainerdState,
    History,
    Observation,
    StoreState,
    Task,
    TaskStatus,
    container_identity,
)
from tests.support.containerd import PrivateContainerd
from tests.support.daemon import DaemonProcess
from tests.support.fake import FakeContainerd, FakeStore
from tests.support.obuilder_worker import BASES, LeakMonitor, ObuilderWorker, sha256_hex
from tests.support.world import World, create_store

GRACE, INTERVAL, PASS_BUDGET, STALE = 3.0, 5.0, 5.0, 10.0
RETRIES = int(os.environ.get("RETRY_STORM", "8"))
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
NOW = datetime(2026, 11, 29, tzinfo=UTC)


def policy(path: Path, namespace: str, *, grace: float = GRACE, interval: float = INTERVAL, stale: float = 30) -> Path:
    path.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: soak}\nspec:\n"
        f"  containerd: {{namespace: {namespace}, snapshotter: native}}\n"
        f"  timing: {{gracePeriod: {grace:g}s, staleAfter: {stale:g}s, interval: {interval:g}s}}\n"
    )
    return path


@pytest.fixture
def daemon_factory(containerd: PrivateContainerd, tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.stop()


def test_history_remembers_idle_containers_by_identity_and_forgets_what_went() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    made = t0 - timedelta(hours=1)
    run1, run2 = Container(id="run-1", created_at=made), Container(id="run-2", created_at=made)
    state = ContainerdState(
        containers=(run1, run2),
        tasks=(Task(id="run-1", status=TaskStatus.RUNNING), Task(id="run-2", status=TaskStatus.STOPPED)),
    )
    h = remember(History(), state, t0)
    later = t0 + timedelta(minutes=1)
    # run-2 was removed and a new container took its id (obuilder-run-N ids repeat).
    run2_again = Container(id="run-2", created_at=later)
    state2 = ContainerdState(containers=(run1, run2_again), tasks=(Task(id="run-1", status=TaskStatus.STOPPED),))
    h2 = remember(h, state2, later)
    assert h2.containers_idle_since == {container_identity(run1): later, container_identity(run2_again): later}
    assert remember(h2, state2, later + timedelta(minutes=5)) == h2, "idle since the first look, not the last"


def test_backoff_doubles_is_capped_and_jittered() -> None:
    import random

    rng = random.Random(1)
    delays = [backoff(n, rng) for n in range(1, 12)]
    assert all(
        0.5 * min(120, 2 ** (n - 1)) <= d <= min(120, 2 ** (n - 1)) for n, d in zip(range(1, 12), delays, strict=True)
    )
    assert max(delays) <= 120


@pytest.mark.containerd
def test_daemon_never_disturbs_a_live_build_and_reclaims_every_leak(
    world: World,
    containerd: PrivateContainerd,
    namespace: str,
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
    measure: Callable[[str], None],
) -> None:
    """The soak: a worker that behaves like OBuilder's (ids repeat, retries, rebuilds, a
    health check, prunes, failed fetches, crashes and OBuilder's own recovery) beside the daemon."""
    worker = ObuilderWorker(world)
    daemon = DaemonProcess(
        containerd, world.root, policy(tmp_path / "p.yaml", namespace, stale=STALE), tmp_path / "daemon.log"
    )
    daemon_factory.append(daemon)
    daemon.wait_for(r"pass 1 ")
    monitor = LeakMonitor(worker)
    monitor.start()
    started = time.monotonic()
    stats = worker.soak(SOAK_SECONDS)
    bound, stale_bound = GRACE + INTERVAL + PASS_BUDGET, STALE + INTERVAL + PASS_BUDGET
    deadline = time.monotonic() + max(bound, stale_bound if any(k.stale for k in stats.leaks) else 0)
    while monitor.pending() and time.monotonic() < deadline:
        time.sleep(0.2)
    monitor.done.set()
    monitor.join()
    code = daemon.stop()
    times = sorted(leak.reclaimed - leak.made for leak in stats.leaks if leak.reclaimed is not None and not leak.stale)
    log = daemon.text()
    passes = len(re.findall(r"pass \d+ ", log))
    windows = [float(w) for w in re.findall(r"re-check window max (\d+) ms", log)]
    changed = sum(int(n) for n in re.findall(r"(\d+) changed since planned", log))
    measure(
        f"soak on containerd {containerd.version}: {time.monotonic() - started:.0f} s, {stats.line()}; "
        f"{len(times)} reclaimed (by the daemon, or by the worker re-using the id), "
        f"time to reclaim median {times[len(times) // 2] if times else 0:.1f} s, "
        f"max {times[-1] if times else 0:.1f} s (bound {bound:g} s); {passes} daemon passes, {changed} planned "
        f"removals dropped as changed, re-check window max {max(windows, default=0):.0f} ms "
        f"over {len(windows)} passes that removed snapshots"
    )
    assert stats.failures == [], "the worker failed: something it needed was removed under it"
    assert stats.cancellations and stats.successes and stats.pruned and stats.crashes and stats.retries
    pending = [(leak.what, leak.snapshots) for leak in monitor.pending()]
    assert not pending, f"leaks not reclaimed: {pending}\n{log[-6000:]}"
    assert not times or times[-1] <= bound
    assert code == 0, log[-2000:]
    # What the store still needs is all there, and nothing else owned is left.
    needed = set(worker.committed_keys_needed().values())
    parents = containerd.snapshot_parents(namespace)
    assert needed <= set(parents)
    keep = set(needed)
    for key in needed:
        parent = parents.get(key)
        while parent is not None:
            keep.add(parent)
            parent = parents.get(parent)
    left = {k for k in parents if k.startswith("obuilder-")} - keep
    assert not left, f"orphans left after the soak: {sorted(left)}"


@pytest.mark.containerd
def test_a_retry_storm_on_one_id_never_loses_the_fresh_snapshot(
    world: World,
    containerd: PrivateContainerd,
    namespace: str,
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
    measure: Callable[[str], None],
) -> None:
    """The race of reused ids: one build cancelled and retried under the same id again and
    again, its key never gone for more than a moment, its error-path removal failing (the
    key leaks), and a slow step between ``prepare`` and the layerinfo write. A daemon that
    dates a snapshot by its name thinks the key old and removes the retry's fresh snapshot."""
    worker = ObuilderWorker(world, fail_rm=1.0, prepare_to_layerinfo=1.2, run_seconds=(0.3, 0.4))
    daemon = DaemonProcess(
        containerd, world.root, policy(tmp_path / "p.yaml", namespace, grace=2.5, interval=1), tmp_path / "d.log"
    )
    daemon_factory.append(daemon)
    worker.start()
    daemon.wait_for(r"pass 1 ")
    base = sha256_hex(BASES[0])
    for _ in range(RETRIES):
        try:
            worker.build(base, "flaky", cancel=True)
        except Exception as e:  # every failure is a finding
            worker.stats.failures.append(f"{type(e).__name__}: {e}")
    try:
        done = worker.build(base, "flaky")
    except Exception as e:
        worker.stats.failures.append(f"{type(e).__name__}: {e}")
        done = None
    code = daemon.stop()
    measure(
        f"retry storm on containerd {containerd.version}: {RETRIES} cancelled tries and a last one of one id, "
        f"slow prepare-to-layerinfo 1.2 s, grace 2.5 s: {len(worker.stats.failures)} worker failures"
    )
    assert worker.stats.failures == [], daemon.text()[-4000:]
    assert done is not None and "obuilder-" + done + "-committed" in containerd.snapshot_keys(namespace)
    assert code == 0


@pytest.mark.containerd
def test_daemon_rides_out_containerd_going_away_and_recovers(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    # A daemon of its own, so stopping it does not disturb the session's.
    own = PrivateContainerd().start()
    try:
        w = World(own, "rec", tmp_path / "store2")
        base = w.base("b:1")
        daemon = DaemonProcess(own, w.root, policy(tmp_path / "p.yaml", "rec", grace=1, interval=2), tmp_path / "d.log")
        daemon_factory.append(daemon)
        daemon.wait_for(r"pass 1 ")
        own._stop_daemon()
        daemon.wait_for(r"pass failed .*retrying in", timeout=40)
        own.start()
        leaked = w.orphan_chain(base, "after", 2)
        deadline = time.monotonic() + 60
        while set(leaked) & set(own.snapshot_keys("rec")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not set(leaked) & set(own.snapshot_keys("rec")), daemon.text()[-3000:]
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
    finally:
        own.stop()


@pytest.mark.containerd
def test_sighup_reloads_the_policy_and_a_bad_policy_keeps_the_old_one(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path, daemon_factory: list[DaemonProcess]
) -> None:
    base = world.base("b:1")
    orphan = world.orphan_chain(base, "o", 1)
    path = tmp_path / "p.yaml"
    policy(path, namespace, grace=3600, interval=3600)  # an hour's grace: nothing goes yet
    daemon = DaemonProcess(containerd, world.root, path, tmp_path / "d.log")
    daemon_factory.append(daemon)
    daemon.wait_for(r"pass 1 ")
    path.write_text(path.read_text().replace("gracePeriod: 3600s", "gracePeriods: 1s"))
    daemon.wait_for(r"policy reload \(policy file changed\) failed, keeping the previous policy: .*gracePeriods")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(r"policy reload \(SIGHUP\) failed, keeping the previous policy: .*gracePeriods: unknown field")
    assert orphan[0] in containerd.snapshot_keys(namespace)
    policy(path, namespace, grace=0, interval=3600)
    daemon.wait_for(r"policy reloaded \(policy file changed\)")
    deadline = time.monotonic() + 20
    while orphan[0] in containerd.snapshot_keys(namespace) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert orphan[0] not in containerd.snapshot_keys(namespace)
    assert daemon.stop() == 0


def _daemon_with(pass_fn: Callable[[], tuple[Plan, PassStatus]], tmp_path: Path) -> Daemon:
    root = create_store(tmp_path / "store")
    settings = resolve(Overrides(store=str(root)), None, {})
    d = Daemon(load=lambda: settings)
    d.run_pass = pass_fn  # type: ignore[method-assign]
    return d


def test_triggers_during_a_pass_coalesce_into_one_more_and_passes_never_overlap(tmp_path: Path) -> None:
    running = threading.Lock()
    calls: list[float] = []
    empty = (
        Plan(mode=Mode.DAEMON),
        PassStatus(time=NOW, mode=Mode.DAEMON, pass_number=1, outcome="success", seconds=0),
    )

    def slow_pass() -> tuple[Plan, PassStatus]:
        assert running.acquire(blocking=False), "two passes overlapped"
        try:
            calls.append(time.monotonic())
            time.sleep(0.8)  # long enough for the whole burst to land inside the first pass
        finally:
            running.release()
        return empty

    daemon = _daemon_with(slow_pass, tmp_path)

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            await anyio.sleep(0.1)  # the start-up pass is under way
            for _ in range(20):
                daemon.trigger("burst")
                await anyio.sleep(0.005)
            await anyio.sleep(2.5)
            daemon.request_stop()

    anyio.run(scenario)
    assert len(calls) == 2, "start-up pass, then one pass for the whole burst"


@pytest.mark.parametrize(
    "error",
    [
        CtrError(["ctr"], 1, "ctr: failed to dial: connection refused"),
        # Not one of ours: a bug, or an OS error nobody foresaw. The daemon must outlive it too.
        FileNotFoundError(2, "No such file or directory", "/store/result/x"),
    ],
)
def test_a_failing_pass_backs_off_and_the_loop_goes_on(tmp_path: Path, error: Exception) -> None:
    outcomes: list[str] = []
    empty = (
        Plan(mode=Mode.DAEMON),
        PassStatus(time=NOW, mode=Mode.DAEMON, pass_number=1, outcome="success", seconds=0),
    )
    errors: list[str | None] = []

    def flaky() -> tuple[Plan, PassStatus]:
        if len(outcomes) < 2:
            outcomes.append("fail")
            errors.append(daemon.last_status.error if daemon.last_status else None)
            raise error
        outcomes.append("ok")
        errors.append(daemon.last_status.error if daemon.last_status else None)
        return empty

    daemon = _daemon_with(flaky, tmp_path)

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(10):
                while "ok" not in outcomes:
                    await anyio.sleep(0.05)
            daemon.request_stop()

    anyio.run(scenario)
    assert outcomes == ["fail", "fail", "ok"]
    # Each failed pass is reported, naming what went wrong.
    assert errors[0] is None and errors[2] is not None
    assert ("No such file" if isinstance(error, OSError) else "connection refused") in errors[2]


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


def test_a_reload_that_moves_the_store_is_refused_and_the_old_policy_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = resolve(Overrides(store=str(create_store(tmp_path / "a"))), None, {})
    moved = resolve(Overrides(store=str(create_store(tmp_path / "b"))), None, {})
    loads = iter([first, moved])
    daemon = Daemon(load=lambda: next(loads))

    async def reload() -> None:
        daemon._wake = anyio.Event()
        daemon._reload("SIGHUP")

    with caplog.at_level("ERROR", logger="reconcile"):
        anyio.run(reload)
    assert daemon.settings is first
    assert "refused" in caplog.text and "moves the store" in caplog.text and str(tmp_path / "b") in caplog.text
