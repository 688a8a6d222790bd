"""Removal against the floor: reconcile --once and the exact-keys floor, on two clocks.

    make bench            (or: .venv/bin/python bench/removal_bench.py --orphans 800 2000 --repeat 3)

On a private containerd (snapshotter native) it builds a world of N orphan snapshots
in chains of depth up to five hanging off kept results, a few orphan bases with
children, and M leaked containers (tasks running), then removes it each way,
rebuilding the same world before each:

  (a) `reconcile --once`, process start, observation, planning and its confirming look included;
  (c) the floor: the keys known in advance, one `tasks delete` and one `containers rm`
      call, then one `snapshots rm` call per depth level;
  (b) with --per-object: one ctr process per task, container and snapshot, leaves first,
      as OBuilder's own code removes them.

Two clocks: when the command returns, and when the disk is back (the last removed
snapshot's layer folder gone: containerd's GC deletes folders after `snapshots rm`
returns). Medians over --repeat rounds, each started by a different method (one
run's ratio moves by 10-20% with where containerd's GC falls). Target: a/c <= 1.0 on
both clocks at 800 and at 2,000 orphans.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
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

from tests.support.cli import installed_env  # noqa: E402
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


#: Where (a)'s time goes, per run: process start and exit, the first pass (observe, plan,
#: remove), and the rest of the run (the confirming look and containerd's collection).
PHASES: dict[int, list[tuple[float, float, float]]] = {}
_PASS_SECONDS = re.compile(r" INFO pass 1 \(boot\): .* ctr calls, ([\d.]+) s", re.M)


def reconcile(world: World, parallel: int | None, orphans: int = 0) -> tuple[int, dict[str, object]]:
    """``reconcile --once``; ``parallel`` None keeps the policy's default degree."""
    limits = "" if parallel is None else f"  limits: {{parallelism: {parallel}}}\n"
    policy = world.root.parent / f"policy-{parallel}.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: bench}\n"
        f"spec:\n  containerd: {{namespace: {NS}, snapshotter: {SNAPSHOTTER}}}\n{limits}"
    )
    argv = [sys.executable, "-m", "controller", "--once", "--force", "--json", "--policy", str(policy),
            "--store", str(world.root), "--address", world.cd.address]  # fmt: skip
    env = installed_env(world.root.parent / "pycache")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"reconcile exited {proc.returncode}: {proc.stderr[-2000:]}")
    summary: dict[str, object] = json.loads(proc.stdout)["summary"]
    run_s = float(summary["seconds"])  # type: ignore[arg-type]
    first = _PASS_SECONDS.search(proc.stderr)
    pass1 = float(first.group(1)) if first else run_s
    if parallel is None:
        PHASES.setdefault(orphans, []).append((wall - run_s, pass1, run_s - pass1))
    return int(summary["ctr_calls"]), summary  # type: ignore[call-overload]


def owned_left(world: World, kept: list[str]) -> int:
    keys = [k for k in world.cd.snapshot_keys(NS) if k.startswith("obuilder-") and k not in kept]
    return len(keys) + len(world.cd.container_ids(NS))


class FolderWatch:
    """Samples the native snapshotter's layer folders while a method runs and after it.

    ``snapshots rm`` only drops containerd's metadata; the folder goes when containerd's
    GC next runs (while it deletes folders it holds the snapshotter's lock, so removals
    wait). The disk is back when the count first reaches what the kept snapshots need.
    """

    def __init__(self, folder: Path, every: float = 0.01) -> None:
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

    def wait_for(self, count: int, timeout: float = 120) -> None:
        deadline = time.perf_counter() + timeout
        while not (self.samples and self.samples[-1][1] <= count):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"layer folders still {self.samples[-1][1]} after {timeout} s, expected {count}")
            time.sleep(self.every)

    def reached(self, count: int) -> float:
        """When the folder count first fell to ``count``."""
        return next(t for t, n in self.samples if n <= count)


@dataclass
class Run:
    returned: float  # seconds until the command returned
    disk: float  # seconds until the last removed layer folder was gone
    calls: int


def median_run(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.returned for r in runs),
        statistics.median(r.disk for r in runs),
        int(statistics.median(r.calls for r in runs)),
    )


LABELS = {"a": "(a) reconcile --once", "b": "(b) per object", "c": "(c) floor, exact keys"}


def bench_size(world: World, kept: list[str], folders: Path, orphans: int, containers: int, args: argparse.Namespace,
               ) -> dict[str, Run]:  # fmt: skip
    runs: dict[str, list[Run]] = {}

    def run(name: str, how: Callable[[Leaks], int]) -> None:
        leaks = build(world, orphans, containers, kept)
        time.sleep(2)  # let containerd's GC settle after the build, as on a worker at boot
        start = len(os.listdir(folders))
        removed = sum(len(level) for level in leaks.levels)
        with FolderWatch(folders) as watch:
            t0 = time.perf_counter()
            calls = how(leaks)
            t1 = time.perf_counter()
            watch.wait_for(start - removed)
        left = owned_left(world, kept)
        if left:
            raise RuntimeError(f"{name} left {left} owned objects behind")
        runs.setdefault(name, []).append(Run(t1 - t0, max(t1, watch.reached(start - removed)) - t0, calls))

    def with_reconcile(parallel: int | None) -> Callable[[Leaks], int]:
        return lambda leaks: reconcile(world, parallel, orphans)[0]

    methods: list[tuple[str, Callable[[Leaks], int]]] = [
        ("c", lambda leaks: floor(world, leaks)),
        ("a", with_reconcile(None)),
    ]
    if args.per_object:
        methods.append(("b", lambda leaks: per_object(world, leaks)))
    for r in range(args.repeat):
        # A different method goes first each round: containerd's database grows over a run.
        for name, how in methods[r % len(methods) :] + methods[: r % len(methods)]:
            run(name, how)
        for p in args.parallel:
            run(f"a (parallelism {p})", with_reconcile(p))
    return {name: median_run(rs) for name, rs in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orphans", type=int, nargs="+", default=[800, 2000])
    parser.add_argument("--containers", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3, help="rounds, in rotating order; medians are printed")
    parser.add_argument("--per-object", action="store_true", help="also time (b), one ctr process per object")
    parser.add_argument("--parallel", type=int, nargs="*", default=[], help="also time (a) at these degrees")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="obr-bench-"))
    cd = PrivateContainerd(work / "cd")
    met = True
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
        # Bytecode written once, as an installed package has it.
        subprocess.run([sys.executable, "-c", "import controller.commands"], check=True, cwd=REPO,
                       env=installed_env(world.root.parent / "pycache"))  # fmt: skip
        print(f"removal: snapshotter {SNAPSHOTTER}, {args.containers} leaked containers (tasks running), "
              f"{len(kept)} kept snapshots, medians of {args.repeat} rounds rotating the first method")  # fmt: skip
        print(f"{'orphans':>8}  {'method':<26}{'returned s':>11}{'disk back s':>12}{'ctr calls':>10}")
        for orphans in args.orphans:
            result = bench_size(world, kept, folders, orphans, args.containers, args)
            for name in ("c", "a", "b", *(n for n in result if n.startswith("a ("))):
                if name in result:
                    r = result[name]
                    label = LABELS.get(name, "    " + name)
                    print(f"{orphans:>8}  {label:<26}{r.returned:>11.2f}{r.disk:>12.2f}{r.calls:>10}")
            a, c = result["a"], result["c"]
            start, first, rest = (statistics.median(p[i] for p in PHASES[orphans]) for i in range(3))
            print(f"{orphans:>8}  (a) spent {start:.2f} s starting and ending the process, {first:.2f} s in its pass "
                  f"(observe, plan, remove), {rest:.2f} s in the confirming look and the collection")  # fmt: skip
            ratios = (a.returned / c.returned, a.disk / c.disk)
            print(f"{orphans:>8}  a/c returned {ratios[0]:.2f}, disk back {ratios[1]:.2f} (target <= 1.0 on both)"
                  + (f"; b/a {result['b'].returned / a.returned:.1f}" if "b" in result else ""))  # fmt: skip
            met = met and max(ratios) <= 1.0
        print(
            "returned: until the command exits; disk back: until containerd's GC has deleted the last removed\n"
            "snapshot's layer folder (snapshots rm drops the metadata; the folder goes in a later GC)."
        )
        return 0 if met else 1
    finally:
        cd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
