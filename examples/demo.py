"""`make demo`: the incident of DESIGN.md and its repair, on a private containerd.

It starts containerd under ./demo-run/ (git-ignored), builds a wedged OBuilder
store the way the leak happened before OBuilder's fix (the backlog a worker
carries), shows the plan (--dry-run), repairs it (--once), shows the converged
state and that a second run is a no-op. Then it runs the daemon beside a worker
that behaves like OBuilder's today (ids that repeat, retries, prunes, crashes and
OBuilder's own recovery), shows what that worker still leaks and that the daemon
reclaims it without failing one of its operations, and stops containerd, leaving
no process behind.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from controller.core.planner import base_image_key  # noqa: E402
from tests.support.containerd import ContainerdUnavailable, PrivateContainerd  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from tests.support.incident import wedge  # noqa: E402
from tests.support.obuilder_worker import LeakMonitor, ObuilderWorker  # noqa: E402
from tests.support.world import World  # noqa: E402

NS = "default"
RUN_DIR = REPO / "demo-run"
POLICY = REPO / "examples" / "local-test.yaml"
PROTECTED = "mcr.microsoft.com/windows/nanoserver:ltsc2022"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def census(cd: PrivateContainerd, root: Path) -> str:
    keys = cd.snapshot_keys(NS)
    owned = [k for k in keys if k.startswith("obuilder-")]
    containers = cd.container_ids(NS)
    tasks = cd.task_status(NS)
    db = sqlite3.connect(f"{(root / 'state/db/db.sqlite').as_uri()}?mode=ro&immutable=1", uri=True)
    rows = db.execute("SELECT count(*) FROM builds").fetchone()[0]
    db.close()
    leaked = [c for c in containers if c.startswith("obuilder-run-")]
    states = ", ".join(f"{c}: {tasks.get(c, 'no task')}" for c in leaked) or "none"
    return (
        f"   containerd: {len(owned)} obuilder-* snapshots ({len(keys) - len(owned)} others), "
        f"{len(leaked)} obuilder-run-* containers "
        f"({states})\n"
        f"   store:      {len(list((root / 'result').iterdir()))} result/ entries, {rows} DB rows, "
        f"{len(list((root / 'result-tmp').iterdir()))} result-tmp/ entries, "
        f"{len(list((root / 'cache-tmp').iterdir()))} cache-tmp/ entries"
    )


def reconcile(cd: PrivateContainerd, root: Path, *args: str) -> int:
    policy = POLICY.relative_to(REPO)
    argv = [sys.executable, "-m", "controller", "--policy", str(policy), "--store", str(root), "--address", cd.address,
            *args]  # fmt: skip
    print(f"$ reconcile --policy {policy} --store {root.relative_to(REPO)} --address ... " + " ".join(args))
    proc = subprocess.run(argv, check=False, cwd=REPO, stderr=subprocess.PIPE, text=True)
    # Without a terminal, --once logs one line per removal on stderr: show a few.
    lines = proc.stderr.splitlines()
    for line in lines[:4]:
        print(f"   [log] {line}")
    if len(lines) > 4:
        print(f"   [log] ... and {len(lines) - 4} more lines like these")
    return proc.returncode


def main() -> int:
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    started = time.perf_counter()
    cd = PrivateContainerd(RUN_DIR / "cd")
    try:
        say("Starting a private containerd under ./demo-run/ (snapshotter: native)")
        cd.start()
        root = RUN_DIR / "store"
        world = World(cd, NS, root)

        say("Building a wedged worker, the way the leak happened before OBuilder's fix")
        print(
            "   OBuilder builds steps as containerd snapshots (obuilder-ID, committed as obuilder-ID-committed)\n"
            "   and runs each step as `ctr run --rm` (container obuilder-run-N). Before its fix, as on the workers:\n"
            "   - builds were cancelled: the ctr client was SIGKILLed, --rm never ran, the container stayed\n"
            "     on its layers (some tasks still running, some stopped);\n"
            "   - OBuilder's delete then failed to remove the snapshot but dropped the DB row and result/ dir:\n"
            "     chains of obuilder-*-committed snapshots nobody knows about (an orphan base among them);\n"
            "   - the worker died mid-build: result-tmp/ entries and cache-tmp/ leftovers;\n"
            "   - and things that are not ours: a buildkit container and snapshot, another namespace."
        )
        inc = wedge(world, cd)
        print(census(cd, root))
        print(
            f"   OBuilder's LRU prune sees only its {len(inc.kept)} DB rows: it would report 'Pruned 0 items'\n"
            f"   while {len(inc.orphans)} snapshots leak.\n"
            f"   The policy ({POLICY.relative_to(REPO)}) protects the base image {PROTECTED}: an hour to pull on\n"
            f"   Windows. Its result/ entry is gone too, but it must survive; its children and the other orphan\n"
            f"   base must not."
        )
        db_hash = hashlib.sha256((root / "state/db/db.sqlite").read_bytes()).hexdigest()

        say("1. What would the reconciler do? (--dry-run changes nothing; exit 3 means drift)")
        code = reconcile(cd, root, "--once", "--dry-run")
        print(f"   exit code {code}")

        say("2. Repair, as the boot step before ocluster-worker starts (--once)")
        t0 = time.perf_counter()
        code = reconcile(cd, root, "--once")
        print(f"   exit code {code} after {time.perf_counter() - t0:.2f} s")

        say("3. The converged state")
        print(census(cd, root))
        same = hashlib.sha256((root / "state/db/db.sqlite").read_bytes()).hexdigest() == db_hash
        print(f"   the DB is byte-for-byte unchanged: {same}")
        left = sorted(k for k in cd.snapshot_keys(NS) if not k.startswith("sha256:"))
        print(f"   still in containerd: {', '.join(left)}")
        kept = base_image_key(PROTECTED) + "-committed" in left
        print(f"   the protected orphan base ({PROTECTED}) survived: {kept}")
        print(f"   containers: {', '.join(cd.container_ids(NS))} (not ours, untouched)")
        other = (len(cd.snapshot_keys("someone-else")), len(cd.container_ids("someone-else")))
        print(f"   namespace someone-else keeps its {other[0]} snapshots and {other[1]} container")

        say("4. A second run finds nothing to do")
        code2 = reconcile(cd, root, "--once")
        print(f"   exit code {code2}")

        live_ok = beside_a_live_worker(cd)
        return 0 if code == code2 == 0 and same and kept and live_ok else 1
    except ContainerdUnavailable as e:
        print(
            f"demo: {e}\n      (make demo needs root and Debian's containerd, runc and busybox-static)", file=sys.stderr
        )
        return 2
    finally:
        say("Stopping containerd")
        cd.stop()
        leftovers = [p for p in _processes() if str(RUN_DIR) in p]
        print(f"   processes left behind: {len(leftovers)}; demo took {time.perf_counter() - started:.1f} s")


def beside_a_live_worker(cd: PrivateContainerd, seconds: float = 20) -> bool:
    say(f"5. The daemon beside a worker that behaves like OBuilder's today, for {seconds:g} s")
    print(
        "   OBuilder now deletes its task and container on every exit path and removes its snapshot on error.\n"
        "   What still leaks: a removal that fails (on Windows, a layer still held), a -committed whose removal\n"
        "   failed because it had children (the prune drops the row and the directory anyway), a crash's\n"
        "   snapshot without a layerinfo, a failed base fetch's snapshot. And build ids are content hashes:\n"
        "   a cancelled build is retried under the same id, a pruned result is rebuilt under it, the health\n"
        "   check builds and deletes the same step: a snapshot's key is deleted and re-created. So the daemon\n"
        "   dates a snapshot by containerd's Created, not by its name, and asks again right before removing it."
    )
    world = World(cd, "live", RUN_DIR / "live-store")
    policy = RUN_DIR / "live-policy.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: live}\nspec:\n"
        "  containerd: {namespace: live, snapshotter: native}\n"
        "  timing: {gracePeriod: 3s, staleAfter: 10s, interval: 5s}\n  metrics: {enabled: false}\n"
    )
    print(f"$ reconcile --policy {policy.relative_to(REPO)} --store ... (grace 3 s, beside the worker)")
    daemon = DaemonProcess(cd, world.root, policy, RUN_DIR / "live-daemon.log")
    try:
        daemon.wait_for(r"pass 1 ")
        worker = ObuilderWorker(world, seed=11)
        monitor = LeakMonitor(worker)
        monitor.start()
        stats = worker.soak(seconds)
        deadline = time.monotonic() + 25
        while monitor.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        monitor.done.set()
        monitor.join()
    finally:
        daemon.stop()
    log = daemon.text()
    removed = sum(int(n) for n in re.findall(r"pass \d+ \([^)]*\): (\d+) removed", log))
    changed = sum(int(n) for n in re.findall(r"(\d+) changed since planned", log))
    times = sorted(leak.reclaimed - leak.made for leak in stats.leaks if leak.reclaimed is not None)
    passes = len(re.findall(r"pass \d+ ", log))
    print(f"   the worker: {stats.line()}")
    print(
        f"   the daemon: {passes} passes, {removed} objects removed, "
        f"{changed} planned removals dropped because the object changed since it was planned"
    )
    print(
        f"   leaks reclaimed: {len(times)} of {len(stats.leaks)}"
        + (f", in {times[len(times) // 2]:.1f} s (median), {times[-1]:.1f} s at most" if times else "")
    )
    print(f"   worker operations that failed: {len(stats.failures)}")
    for failure in stats.failures:
        print(f"     {failure}")
    return not stats.failures and not monitor.pending()


def _processes() -> list[str]:
    out = []
    for pid in (p for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            out.append((pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return out


if __name__ == "__main__":
    sys.exit(main())
