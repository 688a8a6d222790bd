"""Daemon: CPU while idle, delay from a change to a pass, and CPU beside a busy worker on a big store.

    make bench-daemon            (or: .venv/bin/python bench/daemon_bench.py --idle 30 --changes 20 --busy 60)
    .venv/bin/python bench/daemon_bench.py --busy-only --busy 60 --interval 5s --big 50000 --drift half,none

Beside a busy worker (a build starting or ending every 2 s) on a store of
``--big`` finished builds (5,000 by default), the daemon's CPU share is measured over
``--busy`` seconds and printed against the same on an empty store, run in this same
process just before (target: under 5% of one core; the store's size must not show).
``--drift`` says whose snapshots containerd has (``all`` missing, today's default; ``half``;
``none``): the snapshots are made with ctr, ``--ctr-jobs`` at a time (50,000 take minutes).
Each row gives the daemon's own CPU, and with the ctr processes it ran (listing 50,000
snapshots is ctr's work, not the daemon's, but the worker's machine pays it).

Runs on a private containerd with a store of finished builds. Idle CPU is the
daemon's user+system time over a quiet window, as a share of one core (target
under 1%). The delay is measured from creating ``result-tmp/ID`` to the start of the
pass it triggers (the end of the pass in the log minus its duration; target under
2 s), and printed as a ratio to a bare watchfiles watcher on the same folder in
this same process: the floor any file-triggered loop could reach.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.containerd import PrivateContainerd  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from tests.support.world import World, layerinfo_text  # noqa: E402

# The pass line, up to its duration (a backlog or re-check window may follow it).
_PASS = re.compile(r"^(\S+ \S+) INFO pass (\d+) \((.*?)\): .* ctr calls, ([\d.]+) s", re.M)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pass_starts(log: str) -> list[tuple[int, float, str]]:
    out = []
    for stamp, number, why, seconds in _PASS.findall(log):
        end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append((int(number), end - float(seconds), why))
    return out


def watchfiles_floor(folder: Path, changes: int) -> list[float]:
    """Delay of a bare watchfiles watcher, with the daemon's own settings."""
    from watchfiles import watch

    delays: list[float] = []
    stop = threading.Event()
    seen = threading.Event()

    def watcher() -> None:
        for _ in watch(folder, recursive=False, debounce=1000, step=100, stop_event=stop):
            seen.set()

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    time.sleep(0.5)
    for i in range(changes):
        seen.clear()
        t0 = time.time()
        (folder / f"floor-{i}").mkdir()
        seen.wait(10)
        delays.append(time.time() - t0)
        time.sleep(0.3)
    stop.set()
    thread.join(5)
    return delays


def process_cpu(pid: int) -> tuple[float, float]:
    """The process's own user+system seconds, and those of the children it has waited for (ctr)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


#: What share of a big store's results have their snapshot in containerd.
DRIFTS = {"all": 0.0, "half": 0.5, "none": 1.0}


class BusyStore:
    """One store of ``results`` finished builds and one containerd namespace, for every drift
    asked: snapshots are added as the drift goes down (``none`` after ``half``), never removed."""

    def __init__(self, cd: PrivateContainerd, work: Path, results: int, jobs: int) -> None:
        from bench.store_scale import make_store

        self.cd, self.work, self.results, self.jobs = cd, work, results, jobs
        self.ns = f"busy{results}"
        self.world = World(cd, self.ns, work / "store")
        t0 = time.monotonic()
        # Sources in the snapshotter's folder, as a worker's are: the disk look finds the folder
        # from them (a source it cannot place makes it ask containerd for every active snapshot).
        make_store(self.world.root, results, f"{cd.base / 'root'}/io.containerd.snapshotter.v1.native/snapshots")
        self.made = time.monotonic() - t0
        self.with_snapshot = 0

    def snapshots_for(self, share: float) -> float:
        """Gives the first ``share`` of the results their committed snapshot (as an active one of
        that key: the planner and the drift report look at keys); the seconds it took."""
        want = int(self.results * share)
        t0 = time.monotonic()

        def one(n: int) -> None:
            # No parent: the native snapshotter copies a parent's files into each new snapshot,
            # and 50,000 copies of even a small image layer fill a disk.
            key = f"obuilder-{n:064x}-committed"
            self.cd.ctr("snapshots", "--snapshotter", "native", "prepare", "--", key, namespace=self.ns)

        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(one, range(self.with_snapshot, want)))
        self.with_snapshot = max(self.with_snapshot, want)
        return time.monotonic() - t0


def busy_cpu(
    cd: PrivateContainerd,
    work: Path,
    results: int,
    seconds: float,
    *,
    interval: str = "5m",
    store: BusyStore | None = None,
    tag: str = "",
) -> tuple[float, float, int]:
    """The daemon's CPU share beside a worker whose builds start or end every 2 s: its own, with
    the ctr processes it ran, and how many passes ran meanwhile."""
    if store is None:
        store = BusyStore(cd, work, results, 1)
    world, ns = store.world, store.ns
    policy = work / f"policy{tag}.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: busy}\n"
        f"spec:\n  containerd: {{namespace: {ns}, snapshotter: native}}\n"
        f"  timing: {{gracePeriod: 10m, staleAfter: 6h, interval: {interval}}}\n  metrics: {{enabled: false}}\n"
    )
    log = work / f"daemon{tag}.log"
    daemon = DaemonProcess(cd, world.root, policy, log)
    try:
        daemon.wait_for(r"INFO pass 1 ", timeout=600)
        (own0, kids0), t0, wall0 = process_cpu(daemon.proc.pid), time.monotonic(), time.time()
        n = 0
        while time.monotonic() - t0 < seconds:
            name = f"busy{tag}{n // 2}"
            tmp = world.root / "result-tmp" / name
            if n % 2 == 0:  # a build starts
                tmp.mkdir()
                (tmp / "layerinfo").write_text(layerinfo_text(f"obuilder-{name}", f"/s/{n}", []))
            else:  # and ends
                tmp.rename(world.root / "result" / name)
            n += 1
            time.sleep(2)
        own1, kids1 = process_cpu(daemon.proc.pid)
        took = time.monotonic() - t0
        passes = sum(1 for _, start, _ in pass_starts(daemon.text()) if start >= wall0)
        return (own1 - own0) / took, (own1 - own0 + kids1 - kids0) / took, passes
    finally:
        daemon.stop()


def busy_rows(args: argparse.Namespace, cd: PrivateContainerd, work: Path) -> bool:
    """Beside a busy worker: an empty store (the baseline), then the big store at each drift."""
    empty, empty_all, empty_passes = busy_cpu(cd, work / "busy-empty", 0, args.busy, interval=args.interval)
    print(
        f"beside a busy worker (a build starting or ending every 2 s), interval {args.interval}, {args.busy:g} s each; "
        f"empty store {empty * 100:.2f}% of one core ({empty_all * 100:.2f}% with its ctr processes; "
        f"{empty_passes} passes; baseline)"
    )
    drifts = sorted(args.drift.split(","), key=lambda d: DRIFTS[d])
    big = BusyStore(cd, work / "busy-big", args.big, args.ctr_jobs)
    print(f"  a store of {args.big} results made in {big.made:.0f} s")
    ok = True
    for drift in drifts:
        made = big.snapshots_for(DRIFTS[drift])
        share, share_all, passes = busy_cpu(
            cd, big.work, args.big, args.busy, interval=args.interval, store=big, tag=drift
        )
        missing = args.big - big.with_snapshot
        target = 0.03 if args.big <= 5000 else 0.05
        print(
            f"  {args.big} results, {missing} of their snapshots missing (drift {drift}; {big.with_snapshot} "
            f"snapshots, made in {made:.0f} s): {share * 100:.2f}% of one core "
            f"(x{share / empty if empty else float('inf'):.2f}), {share_all * 100:.2f}% with its ctr processes, "
            f"{passes} passes; target < {target * 100:g}%"
        )
        ok = ok and share < target
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=30, help="seconds of quiet to measure CPU over")
    parser.add_argument("--changes", type=int, default=20, help="result-tmp/ changes to time")
    parser.add_argument("--results", type=int, default=50, help="finished builds in the store")
    parser.add_argument("--busy", type=float, default=60, help="seconds beside a busy worker (0: skip)")
    parser.add_argument("--big", type=int, default=5000, help="finished builds in the busy worker's store")
    parser.add_argument("--interval", default="5m", help="the busy daemon's resync interval (policy timing.interval)")
    parser.add_argument(
        "--drift",
        default="all",
        help="busy store: whose snapshots containerd has, comma-separated: all (every one missing, the default), "
        "half (half missing), none (every result has its snapshot); each beside the same empty baseline",
    )
    parser.add_argument("--ctr-jobs", type=int, default=4, help="parallel ctr calls making the busy store's snapshots")
    parser.add_argument("--busy-only", action="store_true", help="only the busy-worker rows (no idle, no delay)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the daemons' logs) and say where")
    args = parser.parse_args()
    if any(d not in DRIFTS for d in args.drift.split(",")):
        parser.error(f"--drift: one or more of {', '.join(DRIFTS)}")

    work = Path(tempfile.mkdtemp(prefix="obr-bench-"))
    cd = PrivateContainerd(work / "cd")
    daemon: DaemonProcess | None = None
    try:
        cd.start()
        if args.busy_only:
            return 0 if busy_rows(args, cd, work) else 1
        world = World(cd, "bench", work / "store")
        base = parent = world.base("bench/base:1")
        for i in range(args.results):  # chains of five finished steps on the base
            parent = world.step(f"r{i}", base if i % 5 == 0 else parent)
        policy = work / "policy.yaml"
        policy.write_text(
            "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: bench}\n"
            "spec:\n  containerd: {namespace: bench, snapshotter: native}\n"
            "  timing: {gracePeriod: 10m, staleAfter: 6h, interval: 5m}\n"
        )
        daemon = DaemonProcess(cd, world.root, policy, work / "daemon.log")
        daemon.wait_for(r"INFO pass 1 ", timeout=60)
        time.sleep(2)

        before = cpu_seconds(daemon.proc.pid)
        time.sleep(args.idle)
        idle_share = (cpu_seconds(daemon.proc.pid) - before) / args.idle

        delays = []
        for i in range(args.changes):
            known = len(pass_starts(daemon.text()))
            t0 = time.time()
            (world.root / "result-tmp" / f"lat-{i}").mkdir()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                starts = pass_starts(daemon.text())
                if len(starts) > known:
                    delays.append(starts[known][1] - t0)
                    break
                time.sleep(0.02)
            time.sleep(0.5)
        floor_dir = work / "floor"
        floor_dir.mkdir()
        floor = watchfiles_floor(floor_dir, args.changes)

        med, worst, floor_med = statistics.median(delays), max(delays), statistics.median(floor)
        print(f"daemon idle CPU over {args.idle:g} s: {idle_share * 100:.3f}% of one core (target < 1%)")
        print(
            f"change under result-tmp/ -> pass start, {len(delays)} changes: median {med * 1000:.0f} ms, "
            f"max {worst * 1000:.0f} ms (target < 2000 ms)"
        )
        print(
            f"bare watchfiles watcher, same settings, same process: median {floor_med * 1000:.0f} ms; "
            f"daemon/floor = {med / floor_med:.2f}"
        )
        ok = idle_share < 0.01 and worst < 2.0
        if args.busy > 0:
            daemon.stop()
            daemon = None
            ok = busy_rows(args, cd, work) and ok
        return 0 if ok else 1
    finally:
        if daemon is not None:
            daemon.stop()
        cd.stop()
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
