"""Planner at scale: a synthetic store and containerd state planned in memory.

    .venv/bin/python bench/planner_scale.py [--snapshots 100000] [--results 10000]
    .venv/bin/python bench/planner_scale.py --snapshots 500000 --results 50000 --target-seconds 3 --target-mb 1500

Prints the time to plan and the process's peak RSS (targets: at most 0.5 s, 150 MB at the
default size; ``--target-seconds``, ``--target-mb`` for another), with the same plan over a
world a tenth the size as the baseline in the same process. The first plan of the big world
derives what the planner keeps of the store (controller/core/store_index.py) from scratch;
later rounds find it kept, as a daemon's passes over an unchanged store do. Both must meet
the target.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.core.planner import plan
from controller.model.plan import Mode, PlanOptions
from controller.model.records import (
    ContainerdState,
    DbRow,
    LayerInfo,
    Observation,
    Snapshot,
    StoreEntry,
    StoreState,
)

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def world(snapshots: int, results: int, seed: int = 1) -> Observation:
    """Chains of up to five steps on a few hundred bases; every tenth result's chain is orphaned."""
    rng = random.Random(seed)
    snaps: list[Snapshot] = [Snapshot(key=f"sha256:{i:064x}") for i in range(50)]
    entries: list[StoreEntry] = []
    rows: list[DbRow] = []
    committed: list[str] = []
    n = 0
    while len(snaps) < snapshots:
        n += 1
        parent = rng.choice(snaps[:50]).key if n % 50 == 1 or not committed else rng.choice(committed[-200:])
        key = f"obuilder-{n:08x}"
        snaps.append(Snapshot(key=key + "-committed", parent=parent))
        committed.append(key + "-committed")
        if len(entries) < results and n % 10:
            info = LayerInfo(snapshot_key=key, source=f"C:\\ctd\\snapshots\\{n}", parent_layer_paths=())
            entries.append(StoreEntry(id=f"{n:08x}", area="result", layerinfo=info))
            rows.append(DbRow(id=f"{n:08x}", rc=0))
    store = StoreState(root="C:\\obuilder", results=tuple(entries), db_rows=tuple(rows))
    return Observation(store=store, containerd=ContainerdState(snapshots=tuple(snaps)))


def timed(obs: Observation) -> tuple[float, int]:
    t0 = time.perf_counter()
    p = plan(obs, PlanOptions(), NOW, Mode.BOOT)
    return time.perf_counter() - t0, len(p.snapshots)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=int, default=100_000)
    parser.add_argument("--results", type=int, default=10_000)
    parser.add_argument("--target-seconds", type=float, default=0.5)
    parser.add_argument("--target-mb", type=float, default=150)
    parser.add_argument("--rounds", type=int, default=1, help="plans of the big world; the median is printed")
    args = parser.parse_args()
    small = world(args.snapshots // 10, args.results // 10)
    base_s, _ = timed(small)
    del small  # the baseline's world is not the big one's memory
    t0 = time.perf_counter()
    big = world(args.snapshots, args.results)
    built = time.perf_counter() - t0
    runs = [timed(big) for _ in range(max(1, args.rounds))]
    first = runs[0][0]
    seconds, orphans = sorted(runs)[len(runs) // 2]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"planner: {len(big.containerd.snapshots)} snapshots, {len(big.store.results)} results, "
        f"{orphans} orphans planned in {seconds:.3f} s, median of {len(runs)} (target <= {args.target_seconds:g} s); "
        f"world built in {built:.1f} s"
    )
    print(f"first plan, the store's index derived from scratch: {first:.3f} s")
    print(f"peak RSS of the whole process: {rss_mb:.0f} MB (target <= {args.target_mb:g} MB)")
    print(f"baseline, a tenth of the world: {base_s:.3f} s; ratio {seconds / base_s:.1f} for 10x the objects")
    return 0 if max(seconds, first) <= args.target_seconds and rss_mb <= args.target_mb else 1


if __name__ == "__main__":
    sys.exit(main())
