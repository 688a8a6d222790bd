"""Removal against the floor: reconcile --once, per-object ctr calls, and the exact-keys floor.

    make bench            (or: .venv/bin/python bench/removal_bench.py --orphans 2000 --containers 50)

On a private containerd (snapshotter native) it builds a world of N orphan snapshots
in chains of depth up to five hanging off kept results, a few orphan bases with
children, and M leaked containers (tasks running), then removes it three ways,
rebuilding the same world before each:

  (a) `reconcile --once`, observation and planning included;
  (b) per object: one ctr process per task, container and snapshot, leaves first,
      as OBuilder's own code removes them;
  (c) the floor: the keys known in advance, one `tasks delete` and one `containers rm`
      call, then one `snapshots rm` call per depth level.

It prints the three times, a/c and b/a, and the ctr processes each used; with
--parallel it also times (a) at other degrees of parallelism, and with --repeat R
it runs R rounds, each in a different order, and prints medians (one run's ratio
moves by 10-20% with where containerd's GC falls). For each method it also shows
how long containerd's GC spent deleting layer folders inside the run, which no
client can hurry (see FolderWatch). Targets at N=2000: a/c <= 0.8 and b/a >= 5.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.containerd import SNAPSHOTTER, PrivateContainerd  # noqa: E402
from tests.support.world import World  # noqa: E402

NS = "bench"


@dataclass
class Leaks:
    levels: list[list[str]] = field(default_factory=list)  # orphan keys by height, leaves first
    containers: list[str] = field(default_factory=list)


def build(world: World, orphans: int, containers: int, kept: list[str], seed: int = 11) -> Leaks:
    """The same world every time for the same seed: chains of 1..5 on kept results, some orphan bases."""
    rng = random.Random(seed)
    chains: list[tuple[str, list[str]]] = []
    made = 0
    n = 0
    while made < orphans:
        n += 1
        depth = min(rng.randint(1, 5), orphans - made)
        if n % 40 == 0 and depth >= 2:  # an orphan base with children
            chains.append(
                (world.image_layer, [f"obuilder-base-lost{n}"] + [f"obuilder-c{n}-{i}" for i in range(depth - 1)])
            )
        else:
            chains.append((rng.choice(kept), [f"obuilder-c{n}-{i}" for i in range(depth)]))
        made += depth

    def make_chain(chain: tuple[str, list[str]]) -> None:
        parent, keys = chain
        for key in keys:
            world.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", "--", key, parent)
            world.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "commit", "--", key + "-committed", key)
            parent = key + "-committed"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(make_chain, chains))
    height: dict[str, int] = {}
    for _, keys in chains:
        for h, key in enumerate(reversed(keys)):
            height[key + "-committed"] = h
    levels = [sorted(k for k, h in height.items() if h == level) for level in range(max(height.values()) + 1)]
    rootfs = world.source_of(kept[1].removeprefix("obuilder-").removesuffix("-committed"))  # a finished step
    ids = [f"obuilder-run-{i}" for i in range(containers)]

    def leak(cid: str) -> None:
        argv = world.cd.run_argv(NS, ["--rootfs", rootfs, cid, "/bin/sleep", "3600"])
        argv[argv.index("--rm")] = "-d"  # detached: the client is gone, the container and task stay
        subprocess.run(argv, check=True, capture_output=True)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(leak, ids))
    return Leaks(levels, ids)


def ctr_counter(world: World) -> tuple[Callable[..., None], list[int]]:
    count = [0]

    def ctr(*args: str) -> None:
        count[0] += 1
        world.cd.ctr(*args, namespace=NS, check=False)

    return ctr, count


def per_object(world: World, leaks: Leaks) -> int:
    ctr, count = ctr_counter(world)
    for cid in leaks.containers:
        ctr("tasks", "delete", "--force", "--", cid)
        ctr("containers", "rm", "--", cid)
    for level in leaks.levels:
        for key in level:
            ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "--", key)
    return count[0]


def floor(world: World, leaks: Leaks) -> int:
    ctr, count = ctr_counter(world)
    ctr("tasks", "delete", "--force", "--", *leaks.containers)
    ctr("containers", "rm", "--", *leaks.containers)
    for level in leaks.levels:
        ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "--", *level)
    return count[0]


def reconcile(world: World, parallel: int | None) -> tuple[int, dict[str, object]]:
    """``reconcile --once``; ``parallel`` None keeps the policy's default degree."""
    limits = "" if parallel is None else f"  limits: {{parallelism: {parallel}}}\n"
    policy = world.root.parent / f"policy-{parallel}.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: bench}\n"
        f"spec:\n  containerd: {{namespace: {NS}, snapshotter: {SNAPSHOTTER}}}\n{limits}"
    )
    argv = [sys.executable, "-m", "controller", "--once", "--force", "--json", "--policy", str(policy),
            "--store", str(world.root), "--address", world.cd.address]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"reconcile exited {proc.returncode}: {proc.stderr[-2000:]}")
    summary: dict[str, object] = json.loads(proc.stdout)["summary"]
    return int(summary["ctr_calls"]), summary  # type: ignore[call-overload]


def owned_left(world: World, kept: list[str]) -> int:
    keys = [k for k in world.cd.snapshot_keys(NS) if k.startswith("obuilder-") and k not in kept]
    return len(keys) + len(world.cd.container_ids(NS))


class FolderWatch:
    """Counts the native snapshotter's layer folders while a method runs.

    ``snapshots rm`` only drops containerd's metadata; the folder goes when containerd's
    GC next runs, and while the GC deletes folders it holds the snapshotter's lock, so
    every removal waits. The time spent deleting folders inside a method's run is work
    no client can hurry, and the folders left when it ends are work it hands to the GC.
    """

    def __init__(self, folder: Path, every: float = 0.02) -> None:
        self.folder, self.every = folder, every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), len(os.listdir(self.folder))))
            time.sleep(self.every)

    def __enter__(self) -> FolderWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def deleting(self, until: float) -> float:
        """Seconds before ``until`` in which the folder count fell."""
        busy = 0.0
        for (t0, n0), (t1, n1) in zip(self.samples, self.samples[1:], strict=False):
            if t1 <= until and n1 < n0:
                busy += t1 - t0
        return busy

    def left(self, until: float, start: int) -> int:
        """Folders of removed snapshots still on disk at ``until``."""
        at_end = [n for t, n in self.samples if t <= until]
        return (at_end[-1] if at_end else start) - (self.samples[-1][1] if self.samples else start)


@dataclass
class Run:
    seconds: float
    calls: int
    deleting: float
    left: int


def median_run(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.seconds for r in runs),
        int(statistics.median(r.calls for r in runs)),
        statistics.median(r.deleting for r in runs),
        int(statistics.median(r.left for r in runs)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orphans", type=int, default=2000)
    parser.add_argument("--containers", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=1, help="rounds, in rotating order; medians are printed")
    parser.add_argument("--parallel", type=int, nargs="*", default=[], help="also time (a) at these degrees")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="obr-bench-"))
    cd = PrivateContainerd(work / "cd")
    try:
        cd.start()
        world = World(cd, NS, work / "store")
        base = world.base("bench/base:1")
        kept = [base + "-committed"]
        parent = base
        for i in range(10):
            parent = world.step(f"k{i}", base if i % 3 == 0 else parent)
            kept.append(parent + "-committed")
        folders = cd.base / "root" / f"io.containerd.snapshotter.v1.{SNAPSHOTTER}" / "snapshots"

        runs: dict[str, list[Run]] = {}

        def run(name: str, how: Callable[[Leaks], int]) -> None:
            leaks = build(world, args.orphans, args.containers, kept)
            time.sleep(2)  # let containerd's GC settle after the build, as on a worker at boot
            start = len(os.listdir(folders))
            with FolderWatch(folders) as watch:
                t0 = time.perf_counter()
                calls = how(leaks)
                t1 = time.perf_counter()
                left = owned_left(world, kept)
                time.sleep(3)  # the GC finishes the folders the run left to it
            if left:
                raise RuntimeError(f"{name} left {left} owned objects behind")
            runs.setdefault(name, []).append(Run(t1 - t0, calls, watch.deleting(t1), watch.left(t1, start)))

        def with_reconcile(parallel: int | None) -> Callable[[Leaks], int]:
            return lambda leaks: reconcile(world, parallel)[0]

        methods: list[tuple[str, Callable[[Leaks], int]]] = [
            ("c", lambda leaks: floor(world, leaks)),
            ("a", with_reconcile(None)),
            ("b", lambda leaks: per_object(world, leaks)),
        ]
        for r in range(args.repeat):
            # A different method goes first each round: containerd's database grows over a run.
            for name, how in methods[r % 3 :] + methods[: r % 3]:
                run(name, how)
            for p in args.parallel:
                run(f"a (parallelism {p})", with_reconcile(p))

        result = {name: median_run(rs) for name, rs in runs.items()}
        a, b, c = result["a"], result["b"], result["c"]
        rounds = f", median of {args.repeat} rounds" if args.repeat > 1 else ""
        print(f"world: {args.orphans} orphan snapshots in chains of depth 1-5, {args.containers} leaked containers "
              f"(tasks running), {len(kept)} kept snapshots; snapshotter {SNAPSHOTTER}{rounds}")  # fmt: skip
        print(f"{'method':<30}{'seconds':>9}{'ctr calls':>11}{'GC deleting s':>15}{'folders left':>14}")
        labels = {"a": "(a) reconcile --once", "b": "(b) per object", "c": "(c) floor, exact keys"}
        for name in ("a", "b", "c", *(n for n in result if n.startswith("a ("))):
            r = result[name]
            print(f"{labels.get(name, '    ' + name):<30}{r.seconds:>9.2f}{r.calls:>11}{r.deleting:>15.2f}{r.left:>14}")
        print(f"a/c = {a.seconds / c.seconds:.2f} (target <= 0.8)   b/a = {b.seconds / a.seconds:.1f} (target >= 5)")
        print(
            "GC deleting s: time within the run in which containerd's GC was deleting layer folders, holding\n"
            "the snapshotter's lock (removals wait); folders left: what the run handed to the GC when it ended."
        )
        return 0 if a.seconds / c.seconds <= 0.8 and b.seconds / a.seconds >= 5 else 1
    finally:
        cd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
