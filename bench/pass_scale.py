"""What one daemon pass derives from the whole observation, at worker scale, stage by stage.

    .venv/bin/python bench/pass_scale.py [--results 50000] [--drift half] [--passes 5] [--profile 25]

A synthetic store of N finished builds (their snapshots in containerd, but for ``--drift``:
``half`` of them missing, or ``all``) and a daemon that has watched everything for an hour,
passed to ``one_pass`` through in-memory ports (no ctr, no disk): what remains is what the
pass itself computes from the observation: the daemon's memory (``remember``), planning
(``plan_with_ages``), the report (drift, backlog, clock), and the reporters (status file,
metrics, log line). Prints the mean seconds of each stage over ``--passes`` passes, with
the same over a world a tenth the size as the baseline in the same process, then the
functions that take the time (cProfile of one pass, by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.adapters import logs, metrics, status
from controller.adapters.ctr import SnapshotListing, read_snapshots
from controller.core import observe, passes, reporting
from controller.core.passes import PassOptions, one_pass
from controller.core.ports import Reporters
from controller.model.plan import Mode, PlanOptions
from controller.model.records import (
    ContainerdState,
    DbRow,
    History,
    LayerInfo,
    Snapshot,
    StoreEntry,
    StoreState,
    Task,
)
from tests.support.fake import FakeClock, FakeContainerd, FakeStore, fake_ports, watched

NOW = datetime(2026, 11, 29, tzinfo=UTC)
SHARE = {"none": 1.0, "half": 0.5, "all": 0.0}  # of the results whose snapshot containerd has


class ListedContainerd(FakeContainerd):
    """The in-memory containerd, its snapshots read as the real adapter reads them: a
    ``ctr snapshots ls`` table through ``read_snapshots``, reusing the last listing's records.
    The table is rendered again only when the snapshots changed (ctr would print a new string
    each time; comparing 9 MB of it to the last costs the real adapter ~7 ms more)."""

    _listing: SnapshotListing | None = None
    _rendered: tuple[dict[str, str | None], str] | None = None

    def observe(self) -> ContainerdState:
        if self._rendered is None or self._rendered[0] != self.parents:
            width = max(map(len, self.parents), default=3) + 2
            rows = "".join(f"{k:<{width}}{p or '':<{width}}Committed\n" for k, p in self.parents.items())
            self._rendered = (dict(self.parents), f"{'KEY':<{width}}{'PARENT':<{width}}KIND\n{rows}")
        self._listing = read_snapshots(self._rendered[1], self._listing)
        return ContainerdState(
            snapshots=self._listing.snapshots,
            containers=tuple(self.containers.values()),
            tasks=tuple(Task(id=i, status=s) for i, s in self.tasks.items()),
        )


def world(results: int, drift: str) -> tuple[FakeContainerd, StoreState]:
    """Results on a few hundred bases, each with its committed snapshot unless drift removed it."""
    have = int(results * SHARE[drift])
    bases = [f"sha256:{i:064x}" for i in range(200)]
    snaps = [Snapshot(key=k, created=NOW - timedelta(days=30)) for k in bases]
    entries, rows = [], []
    for n in range(results):
        build = f"{n:064x}"
        key = f"obuilder-{build}"
        info = LayerInfo(snapshot_key=key, source=f"C:\\ctd\\snapshots\\{n}", parent_layer_paths=())
        entries.append(StoreEntry(id=build, area="result", layerinfo=info, layerinfo_path=f"C:\\s\\result\\{build}"))
        rows.append(DbRow(id=build, rc=0, used="2026-11-28 00:00:00"))
        if n < have:
            snaps.append(Snapshot(key=key + "-committed", parent=bases[n % 200], created=NOW - timedelta(days=1)))
    fake = ListedContainerd(
        parents={s.key: s.parent for s in snaps},
        created={s.key: s.created for s in snaps if s.created is not None},
    )
    return fake, StoreState(root="C:\\obuilder", results=tuple(entries), db_rows=tuple(rows))


class Stages:
    """Wall seconds of each stage of a pass, by wrapping what ``one_pass`` calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label].append(time.perf_counter() - t0)

        self._undo.append((owner, name, original))
        setattr(owner, name, timed)

    def undo(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


STAGES = [
    (ListedContainerd, "observe", "containerd's observe (ctr's table read as the adapter reads it)"),
    (observe, "remember", "remember (the daemon's memory of every object)"),
    (passes, "plan_with_ages", "plan_with_ages (planning, with the drift report)"),
    (passes, "execute", "execute (nothing to remove here)"),
    (passes, "pass_report", "pass_report (the pass report)"),
    (reporting, "backlogs", "backlogs"),
    (reporting, "clock_report", "clock_report"),
    (status.StatusFile, "pass_finished", "status file (StatusFile.pass_finished)"),
    (metrics.Metrics, "pass_finished", "metrics (Metrics.pass_finished)"),
    (logs.LogReporter, "pass_finished", "log line (LogReporter.pass_finished)"),
]


def run(results: int, drift: str, count: int, folder: Path, profile: int = 0) -> tuple[float, dict[str, float]]:
    fake, state = world(results, drift)
    clock = FakeClock(NOW)
    reporters = Reporters(status.StatusFile(folder / "status.json"), metrics.Metrics(), logs.LogReporter())
    ports = fake_ports(fake, FakeStore(state), clock, reporters)
    options = PassOptions(plan=PlanOptions(), mode=Mode.DAEMON)
    history: History = watched(fake, 3600)
    history = one_pass(ports, options, history, 1).history or history  # warm: every object watched
    stages = Stages()
    for owner, name, label in STAGES:
        stages.wrap(owner, name, label)
    totals = []
    try:
        for number in range(2, count + 2):
            clock.advance(2)
            t0 = time.perf_counter()
            history = one_pass(ports, options, history, number).history or history
            totals.append(time.perf_counter() - t0)
    finally:
        stages.undo()
    if profile:
        clock.advance(2)
        profiler = cProfile.Profile()
        profiler.enable()
        one_pass(ports, options, history, count + 2)
        profiler.disable()
        print(f"  cProfile of one pass at {results} results (drift {drift}), by own time:")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(profile)
    return statistics.fmean(totals), {k: statistics.fmean(v) for k, v in stages.seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=int, default=50_000)
    parser.add_argument("--drift", default="none,half", help="comma-separated: none, half, all")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, help="print the N functions with the most own time")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="obr-pass-"))
    quiet: Callable[..., None] = lambda *a, **k: None  # noqa: E731 - the log line's text is not measured here
    logs.log.info = quiet  # type: ignore[method-assign]
    try:
        for drift in args.drift.split(","):
            base, _ = run(args.results // 10, drift, args.passes, folder)
            total, stages = run(args.results, drift, args.passes, folder, args.profile)
            print(
                f"one daemon pass over {args.results} results (drift {drift}), means of {args.passes}: "
                f"{total:.3f} s; a tenth of the world {base:.3f} s (x{total / base:.1f} for 10x)"
            )
            for label, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
                print(f"  {seconds:8.3f} s  {seconds / total * 100:5.1f}%  {label}")
            print(f"  {total - sum(stages.values()):8.3f} s  the rest (one_pass's own: copies of the report)")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
