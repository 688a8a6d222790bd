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
--parallel it also times (a) at other degrees of parallelism. Targets at N=2000:
a/c <= 0.8 and b/a >= 5.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orphans", type=int, default=2000)
    parser.add_argument("--containers", type=int, default=50)
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

        results: dict[str, tuple[float, int]] = {}
        extra: dict[str, object] = {}

        def run(name: str, how: Callable[[Leaks], int]) -> None:
            leaks = build(world, args.orphans, args.containers, kept)
            t0 = time.perf_counter()
            calls = how(leaks)
            seconds = time.perf_counter() - t0
            left = owned_left(world, kept)
            if left:
                raise RuntimeError(f"{name} left {left} owned objects behind")
            results[name] = (seconds, calls)

        def with_reconcile(parallel: int | None) -> Callable[[Leaks], int]:
            def how(leaks: Leaks) -> int:
                calls, summary = reconcile(world, parallel)
                extra[f"a{parallel}"] = summary
                return calls

            return how

        run("c", lambda leaks: floor(world, leaks))
        run("a", with_reconcile(None))
        run("b", lambda leaks: per_object(world, leaks))
        for p in args.parallel:
            run(f"a (parallelism {p})", with_reconcile(p))

        a, b, c = results["a"], results["b"], results["c"]
        print(f"world: {args.orphans} orphan snapshots in chains of depth 1-5, {args.containers} leaked containers "
              f"(tasks running), {len(kept)} kept snapshots; snapshotter {SNAPSHOTTER}")  # fmt: skip
        print(f"{'method':<34}{'seconds':>9}{'ctr calls':>11}")
        for name, label in (("a", "(a) reconcile --once"), ("b", "(b) per object"), ("c", "(c) floor, exact keys")):
            print(f"{label:<34}{results[name][0]:>9.2f}{results[name][1]:>11}")
        for name, (seconds, calls) in results.items():
            if name.startswith("a ("):
                print(f"{'    ' + name:<34}{seconds:>9.2f}{calls:>11}")
        print(f"a/c = {a[0] / c[0]:.2f} (target <= 0.8)   b/a = {b[0] / a[0]:.1f} (target >= 5)")
        return 0 if a[0] / c[0] <= 0.8 and b[0] / a[0] >= 5 else 1
    finally:
        cd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
