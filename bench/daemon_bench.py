"""Daemon: CPU while idle, delay from a change to a pass, and CPU beside a busy worker on a big store.

    make bench-daemon            (or: .venv/bin/python bench/daemon_bench.py --idle 30 --changes 20 --busy 60)

Beside a busy worker (a build starting or ending every 2 s) on a store of
``--big`` finished builds (5,000 by default), the daemon's CPU share is measured over
``--busy`` seconds and printed against the same on an empty store, run in this same
process just before (target: under 5% of one core; the store's size must not show).

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


def busy_cpu(cd: PrivateContainerd, work: Path, results: int, seconds: float) -> float:
    """The daemon's CPU share beside a worker whose builds start or end every 2 s."""
    from bench.store_scale import make_store

    ns = f"busy{results}"
    world = World(cd, ns, work / "store")
    make_store(world.root, results)
    policy = work / "policy.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: busy}\n"
        f"spec:\n  containerd: {{namespace: {ns}, snapshotter: native}}\n"
        "  timing: {gracePeriod: 10m, staleAfter: 6h, interval: 5m}\n  metrics: {enabled: false}\n"
    )
    daemon = DaemonProcess(cd, world.root, policy, work / "daemon.log")
    try:
        daemon.wait_for(r"INFO pass 1 ", timeout=120)
        before, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
        n = 0
        while time.monotonic() - t0 < seconds:
            tmp = world.root / "result-tmp" / f"busy{n // 2}"
            if n % 2 == 0:  # a build starts
                tmp.mkdir()
                (tmp / "layerinfo").write_text(layerinfo_text(f"obuilder-busy{n // 2}", f"/s/{n}", []))
            else:  # and ends
                tmp.rename(world.root / "result" / f"busy{n // 2}")
            n += 1
            time.sleep(2)
        return (cpu_seconds(daemon.proc.pid) - before) / (time.monotonic() - t0)
    finally:
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=float, default=30, help="seconds of quiet to measure CPU over")
    parser.add_argument("--changes", type=int, default=20, help="result-tmp/ changes to time")
    parser.add_argument("--results", type=int, default=50, help="finished builds in the store")
    parser.add_argument("--busy", type=float, default=60, help="seconds beside a busy worker (0: skip)")
    parser.add_argument("--big", type=int, default=5000, help="finished builds in the busy worker's store")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="obr-bench-"))
    cd = PrivateContainerd(work / "cd")
    daemon: DaemonProcess | None = None
    try:
        cd.start()
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
            empty = busy_cpu(cd, work / "busy-empty", 0, args.busy)
            big = busy_cpu(cd, work / "busy-big", args.big, args.busy)
            print(
                f"beside a busy worker (a build starting or ending every 2 s), {args.busy:g} s: "
                f"empty store {empty * 100:.2f}% of one core (baseline), {args.big} results {big * 100:.2f}% "
                f"(x{big / empty if empty else float('inf'):.2f}; target < 5%)"
            )
            ok = ok and big < 0.05
        return 0 if ok else 1
    finally:
        if daemon is not None:
            daemon.stop()
        cd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
