"""A simulated OBuilder worker that behaves like the real one, call for call.

It follows ``ocurrent/obuilder`` at its head (the incident's fix merged):
``lib/hcs_store.ml``, ``lib/hcs_sandbox.ml``, ``lib/hcs_fetch.ml``, ``lib/db_store.ml``,
``lib/dao.ml``, ``lib/build.ml``. On Linux ``ctr run --rootfs SOURCE`` stands in for
Windows' ``ctr run --config`` (whose spec lists the layer folders); everything else is
the same sequence of ctr calls, file operations and DB statements:

* **ids repeat**: a step's id is a hash of (parent id, step), from a small set of
  steps, so builds are cache hits, rebuilds of pruned results, or retries of
  cancelled builds under the same id;
* **a step**: cache hit if ``result/ID`` exists (``UPDATE used``); else ``snapshot rm
  KEY`` (ignored), ``snapshot prepare --mounts KEY PARENT-committed`` (fatal), then
  ``result-tmp/ID`` and its layerinfo, the log, ``ctr run --rm``; the sandbox's
  ``task delete --force`` and ``container rm`` on every exit path; on success
  ``snapshot rm KEY-committed`` (ignored), ``commit`` (fatal), rename, ``INSERT OR
  REPLACE`` and the parent's ``rc + 1``; on error or cancellation ``snapshot rm KEY``
  (logged) and the directory;
* **a base fetch**: ``result-tmp/ID/rootfs/``, the pull, the old base's direct
  ``-committed`` children removed, the old key and ``-committed``, ``prepare`` from the
  image's chain id, ``rootfs/layerinfo``; a failure leaves the active snapshot;
* **prune**: LRU ``rc = 0`` rows: ``snapshot rm KEY``, ``snapshot rm KEY-committed``
  (ignored: it fails when the snapshot has children), ``result/ID`` removed, row
  deleted, parent's ``rc - 1``; then ``complete_deletes`` removes orphaned bases;
* **the health check**: one step on a base, built and deleted, same id every time;
* **a crash** (the worker SIGKILLed mid-build), then OBuilder's start-up recovery:
  every ``obuilder-run-*`` container, each ``result-tmp/ID`` (its layerinfo's key and
  ``-committed``, or only the directory without one), ``cache-tmp/``.

What leaks with the fix, and so what the reconciler must reclaim: ``snapshot rm`` on
an error path that fails (on Windows, a layer still held; injected here with a
probability, as Linux never holds one), a ``-committed`` whose removal failed because
it had children, a crash's snapshot without layerinfo, a failed base fetch's active
snapshot. Each leak is recorded with containerd's ``Created`` of every snapshot in
it: a key that is re-created (ids repeat) is a new snapshot, not the leak.

Every fatal operation must succeed: a failure means something was removed under the
worker. After each operation the worker also checks that every ``result/`` entry
still has its committed snapshot.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.support.containerd import SNAPSHOTTER
from tests.support.world import World, layerinfo_text, mounts_of

STEPS = ("s0", "s1", "s2", "s3")
BASES = ("mcr.microsoft.com/windows/servercore:ltsc2022", "mcr.microsoft.com/windows/nanoserver:ltsc2022")
#: A base whose fetch fails half the time after its snapshot was prepared.
FLAKY_BASE = "mcr.microsoft.com/windows/flaky:ltsc2022"
HEALTH_BASE = BASES[1]
_KEY_IN_LAYERINFO = re.compile(r"\(snapshot_key ([^\s()]+)\)")


class WorkerError(RuntimeError):
    """Raised when an operation OBuilder treats as fatal fails."""


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def step_id(parent: str, step: str) -> str:
    """A step's id: a hash of its parent and the step, as ``build.ml`` derives it."""
    return sha256_hex(f"{parent}\0{step}")


@dataclass
class Leak:
    """Objects the worker left behind, by identity: (key, containerd's Created)."""

    what: str
    snapshots: tuple[tuple[str, str], ...]
    made: float
    #: Its result-tmp/ entry stays too: the daemon may take it only once it is stale (staleAfter).
    stale: bool = False
    reclaimed: float | None = None


@dataclass
class Stats:
    builds: int = 0
    cache_hits: int = 0
    successes: int = 0
    cancellations: int = 0
    retries: int = 0
    rebuilds: int = 0
    prunes: int = 0
    pruned: int = 0
    health_checks: int = 0
    base_fetches: int = 0
    failed_fetches: int = 0
    crashes: int = 0
    injected_rm_failures: int = 0
    blocked_commits: int = 0
    failures: list[str] = field(default_factory=list)
    leaks: list[Leak] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.builds} builds ({self.successes} succeeded, {self.cache_hits} cache hits, "
            f"{self.cancellations} cancelled, {self.retries} retried under the same id, {self.rebuilds} rebuilt after "
            f"a prune), {self.health_checks} health checks, {self.prunes} prunes ({self.pruned} results), "
            f"{self.base_fetches} base fetches ({self.failed_fetches} failed), {self.crashes} crashes, "
            f"{self.injected_rm_failures} failed error-path removals, "
            f"{self.blocked_commits} commits blocked by a leak, "
            f"{len(self.leaks)} leaks"
        )


class Dao:
    """``lib/dao.ml``: the builds table, as the worker writes it."""

    def __init__(self, root: Path) -> None:
        self.path = root / "state" / "db" / "db.sqlite"

    def _run(self, *statements: tuple[str, tuple[object, ...]]) -> list[tuple[object, ...]]:
        db = sqlite3.connect(self.path, timeout=10)
        try:
            rows: list[tuple[object, ...]] = []
            with db:
                for sql, args in statements:
                    rows = db.execute(sql, args).fetchall()
            return rows
        finally:
            db.close()

    @staticmethod
    def _now() -> str:
        return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    def add(self, build: str, parent: str | None) -> None:
        now = self._now()
        statements: list[tuple[str, tuple[object, ...]]] = [
            (
                "INSERT OR REPLACE INTO builds (id, created, used, rc, parent) VALUES (?, ?, ?, 0, ?)",
                (build, now, now, parent),
            )
        ]
        if parent is not None:
            statements.append(("UPDATE builds SET rc = rc + ? WHERE id = ?", (1, parent)))
        self._run(*statements)

    def set_used(self, build: str) -> None:
        self._run(("UPDATE builds SET used = ? WHERE id = ?", (self._now(), build)))

    def lru(self, limit: int, exclude: Sequence[str]) -> list[str]:
        rows = self._run(("SELECT id FROM builds WHERE rc = 0 ORDER BY used ASC LIMIT ?", (limit + len(exclude),)))
        return [str(r[0]) for r in rows if r[0] not in exclude][:limit]

    def delete(self, build: str) -> None:
        rows = self._run(("SELECT parent FROM builds WHERE id = ?", (build,)))
        parent = rows[0][0] if rows else None
        statements: list[tuple[str, tuple[object, ...]]] = [("DELETE FROM builds WHERE id = ?", (build,))]
        if parent is not None:
            statements.append(("UPDATE builds SET rc = rc - 1 WHERE id = ?", (parent,)))
        self._run(*statements)

    def children(self, build: str) -> list[str]:
        return [str(r[0]) for r in self._run(("SELECT id FROM builds WHERE parent = ?", (build,)))]

    def ids(self) -> set[str]:
        return {str(r[0]) for r in self._run(("SELECT id FROM builds", ()))}


class ObuilderWorker:
    def __init__(
        self,
        world: World,
        *,
        seed: int = 7,
        fail_rm: float = 0.3,
        prepare_to_layerinfo: float = 0.0,
        run_seconds: tuple[float, float] = (0.2, 0.6),
        max_depth: int = 3,
        health_every: float = 4.0,
    ) -> None:
        self.world = world
        self.root = world.root
        self.rng = random.Random(seed)
        self.dao = Dao(world.root)
        self.stats = Stats()
        #: Probability that an error path's ``snapshot rm KEY`` fails (Windows: the layer is held).
        self.fail_rm = fail_rm
        #: Seconds between ``snapshot prepare`` and the layerinfo write (a slow disk, antivirus).
        self.prepare_to_layerinfo = prepare_to_layerinfo
        self.run_seconds = run_seconds
        self.max_depth = max_depth
        self.health_every = health_every
        self.lock = threading.Lock()
        self.depth: dict[str, int] = {}
        self.cancelled: set[str] = set()
        self.pruned: set[str] = set()
        self._next_run = self._seed_run_id()

    # -- ctr ---------------------------------------------------------------------

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.world.cd.ctr(*args, namespace=self.world.ns, check=False)

    def snapshot(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, *args)

    def fatal(self, what: str, proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode != 0:
            raise WorkerError(f"{what}: {proc.stderr.strip()}")

    def created(self, key: str) -> str | None:
        proc = self.snapshot("info", "--", key)
        return str(json.loads(proc.stdout)["Created"]) if proc.returncode == 0 else None

    def leak(self, what: str, *keys: str, stale: bool = False) -> None:
        found = tuple((k, c) for k in keys if (c := self.created(k)) is not None)
        if found:
            self.stats.leaks.append(Leak(what, found, time.monotonic(), stale=stale))

    @staticmethod
    def _seed_run_id() -> int:
        # hcs_sandbox.ml: seeded once per process from the clock in centiseconds, mod 1e6.
        return int(time.time() * 100) % 1_000_000

    # -- the store -------------------------------------------------------------------

    def key_of(self, entry: Path, default: str) -> str:
        """``rootfs/layerinfo``, else ``layerinfo``, else the key derived from the id."""
        for candidate in (entry / "rootfs" / "layerinfo", entry / "layerinfo"):
            try:
                m = _KEY_IN_LAYERINFO.search(candidate.read_text())
            except FileNotFoundError:
                continue
            if m is None:
                raise WorkerError(f"{candidate}: unreadable layerinfo")
            return m.group(1)
        return default

    def committed_keys_needed(self) -> dict[str, str]:
        """result/ID -> the committed snapshot it needs."""
        out = {}
        for entry in sorted((self.root / "result").iterdir()):
            out[entry.name] = self.key_of(entry, "obuilder-" + entry.name) + "-committed"
        return out

    def check_results(self) -> None:
        """No result/ entry may lose its snapshot (asked between operations, so never mid-prune)."""
        present = set(self.world.cd.snapshot_keys(self.world.ns))
        for build, key in self.committed_keys_needed().items():
            if key not in present:
                self.stats.failures.append(f"result/{build} lost its snapshot {key}")

    # -- a step (Db_store.build -> Hcs_store.build) --------------------------------------

    def build(self, parent: str, step: str, *, cancel: bool = False, crash: str | None = None) -> str | None:
        """Build one step; returns its id once it is in result/, else None."""
        build = step_id(parent, step)
        result, tmp = self.root / "result" / build, self.root / "result-tmp" / build
        self.stats.builds += 1
        if result.exists():
            self.stats.cache_hits += 1
            self.dao.set_used(build)
            return build
        if build in self.cancelled:
            self.stats.retries += 1
        elif build in self.pruned:
            self.stats.rebuilds += 1
        key = "obuilder-" + build
        parent_key = self.key_of(self.root / "result" / parent, "obuilder-" + parent) + "-committed"
        self.snapshot("rm", "--", key)  # ignored
        proc = self.snapshot("prepare", "--mounts", "--", key, parent_key)
        self.fatal(f"prepare {key} from {parent_key}", proc)
        if crash == "after-prepare":
            self.leak("crash before result-tmp/", key)
            return None
        time.sleep(self.prepare_to_layerinfo)
        source, parents = mounts_of(proc.stdout)
        tmp.mkdir()
        if crash == "before-layerinfo":
            self.leak("crash before the layerinfo", key)
            return None
        (tmp / "layerinfo").write_text(layerinfo_text(key, source, parents))
        (tmp / "log").write_text("")
        outcome = self.run(source, cancel=cancel, crash=crash == "running")
        if outcome == "crashed":
            return None
        if outcome == "ok":
            snap = self.key_of(tmp, key)
            self.snapshot("rm", "--", snap + "-committed")  # ignored
            committed = self.snapshot("commit", "--", snap + "-committed", snap)
            if "already exists" in committed.stderr:
                # A pruned result's -committed leaked (it had children) and is not reclaimed yet:
                # OBuilder's commit fails and leaves the active snapshot and result-tmp/ (no error
                # path runs). A leak's cost, not a removal under the worker.
                self.stats.blocked_commits += 1
                self.leak("commit blocked by a leaked -committed", snap, stale=True)
                return None
            self.fatal(f"commit {snap}", committed)
            if result.exists():
                shutil.rmtree(result)
            tmp.rename(result)
            self.dao.add(build, parent)
            with self.lock:
                self.depth[build] = self.depth.get(parent, 0) + 1
                self.cancelled.discard(build)
                self.pruned.discard(build)
            self.stats.successes += 1
            return build
        # Error or cancellation: the store removes the active snapshot (logged on failure) and the entry.
        self.stats.cancellations += 1
        self.cancelled.add(build)
        if self.rng.random() < self.fail_rm:
            self.stats.injected_rm_failures += 1
            self.leak("error path's snapshot rm failed", key)
        else:
            self.snapshot("rm", "--", key)
        shutil.rmtree(tmp)
        return None

    def run(self, source: str, *, cancel: bool, crash: bool) -> str:
        """``hcs_sandbox.ml``: ``ctr run --rm``, SIGKILL on cancel, task and container removed on every path."""
        container = f"obuilder-run-{self._next_run}"
        self._next_run += 1
        seconds = self.rng.uniform(*self.run_seconds)
        argv = self.world.cd.run_argv(self.world.ns, ["--rootfs", source, container, "/bin/sleep", f"{seconds:.2f}"])
        client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if (crash or cancel) and not self._wait_running(container, client):
                # It never ran: the build failed before any cancellation could reach it.
                _, raw = client.communicate(timeout=60)
                err = raw.decode(errors="replace").strip()
                raise WorkerError(f"ctr run {container} exited {client.returncode} before it ran: {err[-300:]}")
            if crash or cancel:
                time.sleep(self.rng.uniform(0, seconds / 2))
            if crash:
                # The worker dies, and its ctr client with it: the container and its task stay.
                client.send_signal(signal.SIGKILL)
                client.communicate()
                return "crashed"
            if cancel:
                self.ctr("tasks", "kill", "--signal", "SIGKILL", "--", container)  # ignored
            code = client.wait(timeout=120)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        assert client.stderr is not None
        err = client.stderr.read().decode(errors="replace")
        client.stderr.close()
        self.ctr("tasks", "delete", "--force", "--", container)  # ignored
        self.ctr("containers", "rm", "--", container)  # ignored
        if cancel:
            return "cancelled"
        if code != 0:
            raise WorkerError(f"ctr run {container} exited {code}: {err.strip()[-300:]}")
        return "ok"

    def _wait_running(self, container: str, client: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.world.cd.task_status(self.world.ns).get(container) == "RUNNING":
                return True
            if client.poll() is not None:
                return client.returncode == 0
            time.sleep(0.02)
        return False

    # -- a base (build.ml, hcs_fetch.ml) ---------------------------------------------------

    def fetch_base(self, ref: str, *, fail: bool = False) -> str | None:
        build = sha256_hex(ref)
        key = "obuilder-base-" + build
        result, tmp = self.root / "result" / build, self.root / "result-tmp" / build
        if result.exists():
            self.dao.set_used(build)
            return build
        self.stats.base_fetches += 1
        tmp.mkdir()
        (tmp / "log").write_text("")
        (tmp / "rootfs").mkdir()
        time.sleep(0.1)  # the pull: nothing is written in the store meanwhile
        chain = self.world.image_layer
        listing = self.world.cd.snapshot_parents(self.world.ns)
        for child, parent in listing.items():
            if parent == key + "-committed":
                self.snapshot("rm", "--", child)  # ignored
        self.snapshot("rm", "--", key)  # ignored
        self.snapshot("rm", "--", key + "-committed")  # ignored
        proc = self.snapshot("prepare", "--mounts", "--", key, chain)
        self.fatal(f"prepare {key}", proc)
        if fail:
            # The fetch fails after its snapshot was prepared: no base, so only the directory goes.
            self.stats.failed_fetches += 1
            self.leak("failed base fetch", key)
            shutil.rmtree(tmp)
            return None
        source, parents = mounts_of(proc.stdout)
        (tmp / "rootfs" / "layerinfo").write_text(layerinfo_text(key, source, parents))
        (tmp / "env").write_text("()")
        self.snapshot("rm", "--", key + "-committed")  # ignored
        self.fatal(f"commit {key}", self.snapshot("commit", "--", key + "-committed", key))
        tmp.rename(result)
        self.dao.add(build, None)
        with self.lock:
            # Nothing is built on the flaky base: a re-fetch under a leaked chain would fail in
            # OBuilder itself (its -committed cannot go), which is not what this worker tests.
            self.depth[build] = self.max_depth if ref == FLAKY_BASE else 0
            self.pruned.discard(build)
        return build

    # -- delete, prune (db_store.ml, hcs_store.ml) --------------------------------------------

    def delete(self, build: str) -> None:
        """``Db_store.delete``: children first; ``Raw.delete`` then the row."""
        for child in self.dao.children(build):
            self.delete(child)
        result = self.root / "result" / build
        if result.exists():
            key = self.key_of(result, "obuilder-" + build)
            self.snapshot("rm", "--", key)  # logged: normally gone, committed long ago
            self.snapshot("rm", "--", key + "-committed")  # ignored: fails when it has children
            self.leak("prune's snapshot rm failed (the snapshot has children)", key + "-committed")
            shutil.rmtree(result)
        self.dao.delete(build)
        with self.lock:
            self.depth.pop(build, None)
            self.pruned.add(build)

    def prune(self, limit: int) -> None:
        """LRU ``rc = 0`` rows, bases of builds in progress excluded (none: one build at a time)."""
        self.stats.prunes += 1
        for build in self.dao.lru(limit, exclude=[sha256_hex(b) for b in BASES]):
            self.delete(build)
            self.stats.pruned += 1
        self.complete_deletes()

    def complete_deletes(self) -> None:
        for key in self.world.cd.snapshot_keys(self.world.ns):
            if key.startswith("obuilder-base-"):
                build = key[len("obuilder-base-") :].split("-committed")[0]
                if not (self.root / "result" / build).exists():
                    self.snapshot("rm", "--", key)  # ignored

    # -- crash and start-up (hcs_store.ml create) ---------------------------------------------

    def crash(self) -> None:
        phase = self.rng.choice(["after-prepare", "before-layerinfo", "running"])
        self.stats.crashes += 1
        parent, step = self.pick()
        self.build(parent, step, crash=phase)
        time.sleep(self.rng.uniform(0.2, 1.5))  # the service manager restarts the worker
        self._next_run = self._seed_run_id()
        self.recover()

    def recover(self) -> None:
        """OBuilder's start-up: leftover containers, interrupted builds, cache-tmp/."""
        listed = self.ctr("containers", "ls", "--quiet")
        if listed.returncode == 0:
            for cid in listed.stdout.split():
                if cid.startswith("obuilder-run-"):
                    self.ctr("tasks", "delete", "--force", "--", cid)  # ignored
                    self.ctr("containers", "rm", "--", cid)  # ignored
        for entry in sorted((self.root / "result-tmp").iterdir()):
            key = self.key_of(entry, "")
            if key:
                self.snapshot("rm", "--", key)  # ignored
                self.snapshot("rm", "--", key + "-committed")  # ignored
            shutil.rmtree(entry)
        for leftover in (self.root / "cache-tmp").iterdir():
            shutil.rmtree(leftover)

    # -- the work -------------------------------------------------------------------------

    def pick(self) -> tuple[str, str]:
        with self.lock:
            parents = [b for b, d in self.depth.items() if d < self.max_depth]
        return self.rng.choice(sorted(parents)), self.rng.choice(STEPS)

    def health_check(self) -> None:
        self.stats.health_checks += 1
        base = self.fetch_base(HEALTH_BASE)
        if base is None:
            return
        done = self.build(base, "healthcheck")
        if done is not None:
            self.delete(done)

    def start(self) -> None:
        self.recover()
        for ref in BASES:
            self.fetch_base(ref)

    def soak(self, seconds: float) -> Stats:
        self.start()
        deadline = time.monotonic() + seconds
        next_health = time.monotonic()
        while time.monotonic() < deadline:
            try:
                if time.monotonic() >= next_health:
                    next_health = time.monotonic() + self.health_every
                    self.health_check()
                else:
                    self.one_operation()
                self.check_results()
            except Exception as e:  # every failure is a finding, recorded with what failed
                self.stats.failures.append(f"{type(e).__name__}: {e}")
        return self.stats

    def one_operation(self) -> None:
        roll = self.rng.random()
        if roll < 0.04:
            self.crash()
        elif roll < 0.12:
            self.prune(self.rng.randint(1, 3))
        elif roll < 0.16:
            self.fetch_base(FLAKY_BASE, fail=self.rng.random() < 0.5)
        else:
            parent, step = self.pick()
            cancel = self.rng.random() < 0.25
            self.build(parent, step, cancel=cancel)
            if cancel and self.rng.random() < 0.7:
                self.build(parent, step)  # ocluster retries a cancelled job: same id at once


class LeakMonitor(threading.Thread):
    """Stamps each leak with the moment every snapshot in it was gone or re-created (a new Created)."""

    def __init__(self, worker: ObuilderWorker, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.period = period
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            looked = time.monotonic()
            for leak in list(self.worker.stats.leaks):
                if (
                    leak.reclaimed is None
                    and leak.made < looked
                    and all(self.worker.created(key) != created for key, created in leak.snapshots)
                ):
                    leak.reclaimed = time.monotonic()
            time.sleep(self.period)

    def pending(self) -> list[Leak]:
        return [leak for leak in self.worker.stats.leaks if leak.reclaimed is None]
