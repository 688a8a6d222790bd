"""Daemon mode beside a live (simulated) OBuilder worker, on the real containerd."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.config.settings import Overrides, resolve
from controller.daemon import Daemon
from tests.support.clock import ClockShift
from tests.support.containerd import PrivateContainerd
from tests.support.daemon import DaemonProcess
from tests.support.obuilder_worker import BASES, LeakMonitor, ObuilderWorker, sha256_hex
from tests.support.world import World, create_store

GRACE, INTERVAL, PASS_BUDGET, STALE = 3.0, 5.0, 5.0, 10.0
#: The clock-step soak: forward an hour (past the grace period and staleAfter), then back to an hour
#: behind the true time.
STEP_FORWARD, STEP_BACK = 3600.0, 3600.0
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
    soak(world, containerd, namespace, tmp_path, daemon_factory, measure, "soak")


@pytest.mark.containerd
def test_a_wall_clock_that_steps_forward_then_back_mid_run_disturbs_no_live_build(
    world: World,
    containerd: PrivateContainerd,
    namespace: str,
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
    measure: Callable[[str], None],
) -> None:
    """The soak again, with the daemon's wall clock alone stepped forward past staleAfter and the
    grace period, then back below the true time (a Windows VM resumed, then synced): containerd's
    Created and the files' mtimes stay true. No live build may lose a snapshot or its result-tmp/
    entry, and every leak must still go within its bound."""
    try:
        clock = ClockShift(tmp_path)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot build the clock shim: {e}")
    steps = ((SOAK_SECONDS * 0.25, STEP_FORWARD), (SOAK_SECONDS * 0.6, -STEP_BACK))

    def step_the_clock(stop: threading.Event) -> None:
        started = time.monotonic()
        for at, shift in steps:
            if stop.wait(max(0.0, at - (time.monotonic() - started))):
                return
            clock.set(shift)

    log = soak(
        world, containerd, namespace, tmp_path, daemon_factory, measure, "clock-step soak", env=clock.env,
        during=step_the_clock,
    )  # fmt: skip
    assert re.search(rf"wall clock stepped forward by {STEP_FORWARD:.0f}\.\d s", log), log[-4000:]
    assert re.search(rf"wall clock stepped back by {STEP_FORWARD + STEP_BACK:.0f}\.\d s", log), log[-4000:]


def soak(
    world: World,
    containerd: PrivateContainerd,
    namespace: str,
    tmp_path: Path,
    daemon_factory: list[DaemonProcess],
    measure: Callable[[str], None],
    label: str,
    *,
    env: dict[str, str] | None = None,
    during: Callable[[threading.Event], None] | None = None,
) -> str:
    """Run the faithful worker beside the daemon for SOAK_SECONDS, with ``during`` in a thread of its
    own; assert no worker failure and every leak reclaimed in bound. Returns the daemon's log."""
    worker = ObuilderWorker(world)
    daemon = DaemonProcess(
        containerd, world.root, policy(tmp_path / "p.yaml", namespace, stale=STALE), tmp_path / "daemon.log", env=env
    )
    daemon_factory.append(daemon)
    daemon.wait_for(r"pass 1 ")
    monitor = LeakMonitor(worker)
    monitor.start()
    stop = threading.Event()
    side = threading.Thread(target=during, args=(stop,), daemon=True) if during else None
    if side:
        side.start()
    started = time.monotonic()
    try:
        stats = worker.soak(SOAK_SECONDS)
    finally:
        stop.set()
        if side:
            side.join()
    # A leak is first watched by the pass after it is made, and goes once watched for the grace
    # period; a stale entry's snapshot becomes a candidate only once the entry is stale.
    bound, stale_bound = GRACE + INTERVAL + PASS_BUDGET, STALE + GRACE + INTERVAL + PASS_BUDGET
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
        f"{label} on containerd {containerd.version}: {time.monotonic() - started:.0f} s, {stats.line()}; "
        f"{len(stats.failures)} worker operations failed; "
        f"{len(times)} reclaimed (by the daemon, or by the worker re-using the id), "
        f"time to reclaim median {times[len(times) // 2] if times else 0:.1f} s, "
        f"max {times[-1] if times else 0:.1f} s (bound {bound:g} s); {passes} daemon passes, {changed} planned "
        f"removals dropped as changed, re-check window max {max(windows, default=0):.0f} ms "
        f"over {len(windows)} passes that removed snapshots"
    )
    assert stats.failures == [], f"the worker failed: something it needed was removed under it\n{log[-6000:]}"
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
    return log


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


def test_a_reload_that_moves_the_store_is_refused_and_the_old_policy_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = resolve(Overrides(store=str(create_store(tmp_path / "a"))), None, {})
    moved = resolve(Overrides(store=str(create_store(tmp_path / "b"))), None, {})
    loads = iter([first, moved])
    daemon = Daemon(load=lambda: next(loads))

    with caplog.at_level("ERROR", logger="reconcile"):
        daemon._reload("SIGHUP")
    assert daemon.settings is first
    assert "refused" in caplog.text and "moves the store" in caplog.text and str(tmp_path / "b") in caplog.text
