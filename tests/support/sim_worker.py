"""A simulated OBuilder worker: the ctr sequence of ``lib/hcs_store.ml`` and ``lib/hcs_sandbox.ml``.

Each build: ``ctr snapshot rm obuilder-ID`` (OBuilder's idempotency), ``ctr snapshot
prepare --mounts obuilder-ID PARENT-committed``, ``result-tmp/ID/layerinfo`` from the
mount JSON, ``ctr run --rm`` a container on the step's folder, then either

* success: ``ctr snapshot commit obuilder-ID-committed obuilder-ID``, move
  ``result-tmp/ID`` to ``result/ID``, insert the DB row; or
* cancellation: SIGKILL the ``ctr run`` client and the task. ``--rm`` never runs,
  the container stays; OBuilder's error path drops ``result-tmp/ID`` while its
  ``snapshot rm`` fails (on Windows the container still holds the layer): the leak.

Now and then it prunes a result the buggy way: the DB row and ``result/ID`` go, the
committed snapshot stays. Every operation it needs must succeed: a failure means the
reconciler removed something under a live build.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from tests.support.containerd import SNAPSHOTTER
from tests.support.world import World, layerinfo_text


@dataclass
class Leak:
    names: tuple[str, ...]
    created: float
    reclaimed: float | None = None


@dataclass
class Stats:
    builds: int = 0
    successes: int = 0
    cancellations: int = 0
    prunes: int = 0
    failures: list[str] = field(default_factory=list)
    leaks: list[Leak] = field(default_factory=list)


class SimWorker:
    def __init__(self, world: World, base_key: str, *, seed: int = 7) -> None:
        self.world = world
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.results: dict[str, str] = {"base": base_key}  # build id -> snapshot key (committed = key + -committed)
        self.parent_of: dict[str, str] = {}
        self.lock = threading.Lock()
        self._n = 0

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.world.cd.ctr(*args, namespace=self.world.ns, check=check)

    def run(self, seconds: float) -> Stats:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            roll = self.rng.random()
            try:
                if roll < 0.1 and self._prunable():
                    self.buggy_prune()
                else:
                    self.build(cancel=roll > 0.75)
            except Exception as e:  # every failure is a finding, recorded with what failed
                self.stats.failures.append(f"{type(e).__name__}: {e}")
        return self.stats

    def _prunable(self) -> list[str]:
        parents = set(self.parent_of.values())
        return [b for b in self.results if b != "base" and b not in parents]

    def build(self, *, cancel: bool) -> None:
        self._n += 1
        self.stats.builds += 1
        build_id = f"sim{self._n}"
        parent = self.rng.choice(sorted(self.results))
        key = "obuilder-" + build_id
        root = self.world.root
        self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "--", key, check=False)
        source, parents = self.world.prepare(key, self.results[parent] + "-committed")
        tmp = root / "result-tmp" / build_id
        tmp.mkdir()
        (tmp / "layerinfo").write_text(layerinfo_text(key, source, parents))
        container = f"obuilder-run-{self._n}"
        seconds = self.rng.uniform(0.2, 0.8)
        argv = self.world.cd.run_argv(self.world.ns, ["--rootfs", source, container, "/bin/sleep", f"{seconds:.2f}"])
        with open(tmp / "log", "wb") as log:
            client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            if cancel:
                self._cancel(client, container, seconds)
                shutil.rmtree(tmp)  # OBuilder's error path; its `ctr snapshot rm` fails on the pinned layer
                self.stats.cancellations += 1
                self.stats.leaks.append(Leak((container, key), time.monotonic()))
                return
            code = client.wait(timeout=60)
        if code != 0:
            raise RuntimeError(f"ctr run {container} exited {code}: {(tmp / 'log').read_text()[-300:]}")
        self.world.commit(key)
        tmp.rename(root / "result" / build_id)
        self.world.add_row(build_id, None if parent == "base" else parent)
        with self.lock:
            self.results[build_id] = key
            self.parent_of[build_id] = parent
        self.stats.successes += 1

    def _cancel(self, client: subprocess.Popen[bytes], container: str, seconds: float) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and container not in self.world.cd.task_status(self.world.ns):
            time.sleep(0.02)
        time.sleep(self.rng.uniform(0, seconds / 2))
        client.send_signal(signal.SIGKILL)
        client.wait()
        self.ctr("tasks", "kill", "--signal", "SIGKILL", "--", container, check=False)

    def buggy_prune(self) -> None:
        build_id = self.rng.choice(self._prunable())
        with self.lock:
            key = self.results.pop(build_id)
            self.parent_of.pop(build_id, None)
        self.world.buggy_prune(build_id)
        self.stats.prunes += 1
        self.stats.leaks.append(Leak((key + "-committed",), time.monotonic()))


class LeakMonitor(threading.Thread):
    """Polls containerd and stamps each leak with the moment all its objects were gone."""

    def __init__(self, worker: SimWorker, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.period = period
        self.done = threading.Event()

    def run(self) -> None:
        ns = self.worker.world.ns
        cd = self.worker.world.cd
        while not self.done.is_set():
            looked = time.monotonic()
            present = set(cd.snapshot_keys(ns)) | set(cd.container_ids(ns))
            now = time.monotonic()
            for leak in list(self.worker.stats.leaks):
                # Only leaks made before we looked: a newer one may not be in `present` yet.
                if leak.reclaimed is None and leak.created < looked and not present & set(leak.names):
                    leak.reclaimed = now
            time.sleep(self.period)

    def pending(self) -> list[Leak]:
        return [leak for leak in self.worker.stats.leaks if leak.reclaimed is None]
