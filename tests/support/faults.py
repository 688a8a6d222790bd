"""What every fault case asserts, in one place: nothing kept was lost, and the fault is survivable.

:class:`Holdings` is taken before a fault: every snapshot and container in the test's
namespace, and a checksum of every file (and link target) under the folders outside the
store that a fault could reach. After the run, :meth:`Holdings.lost` says what went that
was not an orphan the case meant to see reclaimed; an empty answer is what a case asserts.

The wrappers stand in for ``ctr`` where a fault must come from ctr itself: a script that
hangs on one subcommand, fails ``containers info`` for one id, or fails ``snapshots rm`` of
one key the way ctr does (the keys before it removed, the call stopped there).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.cli import Run, reconcile, reconcile_on
from tests.support.containerd import PrivateContainerd


def checksums(root: Path) -> dict[str, str]:
    """Every file's SHA256 and every link's target under ``root``, by relative path; links not followed."""
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
    return out


@dataclass
class Holdings:
    """containerd's objects and the outside files, as they were before a fault."""

    cd: PrivateContainerd
    namespace: str
    outside: tuple[Path, ...] = ()
    snapshots: set[str] = field(default_factory=set)
    containers: set[str] = field(default_factory=set)
    files: dict[Path, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def take(cls, cd: PrivateContainerd, namespace: str, outside: Iterable[Path] = ()) -> Holdings:
        h = cls(cd, namespace, tuple(outside))
        h.snapshots = set(cd.snapshot_keys(namespace))
        h.containers = set(cd.container_ids(namespace))
        h.files = {p: checksums(p) for p in h.outside}
        assert all(h.files.values()), "an outside folder to guard is empty: the case guards nothing"
        return h

    def lost(self, reclaimable: Iterable[str] = ()) -> list[str]:
        """What is gone or changed that was not among ``reclaimable`` (snapshot keys, container ids)."""
        may_go = set(reclaimable)
        gone = sorted((self.snapshots - may_go) - set(self.cd.snapshot_keys(self.namespace)))
        gone += sorted((self.containers - may_go) - set(self.cd.container_ids(self.namespace)))
        for folder, before in self.files.items():
            now = checksums(folder) if folder.exists() else {}
            gone += [f"{folder}/{rel}" for rel, digest in before.items() if now.get(rel) != digest]
        return gone

    def held(self, reclaimable: Iterable[str] = ()) -> str:
        """Assert nothing kept was lost; say what held, for the fault line."""
        lost = self.lost(reclaimable)
        assert not lost, f"lost: {lost}"
        n_files = sum(len(f) for f in self.files.values())
        kept = len(self.snapshots - set(reclaimable))
        containers = len(self.containers - set(reclaimable))
        outside = f", {n_files} outside paths unchanged" if self.files else ""
        return f"{kept} kept snapshots and {containers} kept containers intact{outside}"


def converges(cd: PrivateContainerd, namespace: str, root: Path, *args: str, gone: Iterable[str] = ()) -> Run:
    """Once the fault is gone: a run exits 0 and what should go has gone."""
    run = reconcile_on(cd, namespace, root, "--once", *args)
    assert run.code == 0, run.stdout + run.stderr
    left = set(gone) & set(cd.snapshot_keys(namespace))
    assert not left, f"still there after the fault was gone: {sorted(left)}"
    return run


@functools.cache
def _help() -> str:
    return reconcile("--help").stdout


def documented(*phrases: str) -> int:
    """The exit code ``reconcile --help`` documents for the first of ``phrases`` it mentions: the
    contract a boot chain acts on, read where a user reads it."""
    codes = re.findall(r"^  (\d)  (.+(?:\n     .+)*)", _help(), re.M)
    for phrase in phrases:
        for code, meaning in codes:
            if phrase in " ".join(meaning.split()):
                return int(code)
    raise AssertionError(f"reconcile --help documents no exit code for {phrases}")


def no_traceback(run: Run) -> None:
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-3000:]


#: A ctr that is ctr, except where a switch file says otherwise (read by each call, so a case can
#: arm and disarm a fault while a daemon runs): hang on a subcommand, fail ``containers info`` of
#: one id or ``snapshots info`` of one key, fail ``snapshots rm`` of one key as ctr does, or kill
#: containerd before one call.
_WRAPPER = """\
#!{python}
import os, subprocess, sys, time
from pathlib import Path
real, control = {real!r}, Path({control!r})
args = sys.argv[1:]
words = [a for a in args if not a.startswith("-")]
def armed(name):
    p = control / name
    return p.read_text() if p.exists() else None
def asks(command):
    # The command's words in order among ctr's (flag values may fall between them).
    rest = iter(words)
    return all(w in rest for w in command.split())
hang = armed("hang")
if hang is not None and asks(hang):
    os.execv("/bin/sleep", ["sleep", "3600"])
broken = armed("info-fails")
if broken is not None and asks("containers info") and args[-1] == broken:
    sys.stderr.write('ctr: failed to decode container spec: unexpected EOF\\n')
    sys.exit(1)
undatable = armed("snapshot-info-fails")
if undatable is not None and asks("snapshots info") and args[-1] == undatable:
    sys.stderr.write("ctr: proto: cannot parse invalid wire-format data\\n")
    sys.exit(1)
kill = armed("kill-before")
if kill is not None and asks(kill):
    (control / "kill-before").unlink()
    os.kill(int(armed("containerd-pid")), 9)
    time.sleep(0.5)
stuck = armed("rm-fails")
if stuck is not None and "rm" in words and "snapshots" in words and stuck in args:
    at = args.index(stuck)
    head = args[: args.index("--") + 1]
    before = args[args.index("--") + 1 : at]
    if before:
        done = subprocess.run([real, *head, *before])
        if done.returncode:
            sys.exit(done.returncode)
    sys.stderr.write('ctr: failed to remove "%s": input/output error\\n' % stuck)
    sys.exit(1)
os.execv(real, [real, *args])
"""


@dataclass
class FaultyCtr:
    """A ``ctr`` wrapper and the folder of switches that arm its faults."""

    path: Path
    control: Path

    @classmethod
    def make(cls, folder: Path) -> FaultyCtr:
        real = shutil.which("ctr")
        assert real is not None
        folder.mkdir(parents=True, exist_ok=True)
        control = folder / "control"
        control.mkdir(exist_ok=True)
        path = folder / "ctr"
        path.write_text(_WRAPPER.format(python=sys.executable, real=real, control=str(control)))
        path.chmod(0o755)
        return cls(path, control)

    def arm(self, fault: str, value: str) -> None:
        (self.control / fault).write_text(value)

    def disarm(self, fault: str) -> None:
        (self.control / fault).unlink(missing_ok=True)


def immutable_supported(folder: Path) -> bool:
    """Whether ``chattr +i`` works on the filesystem ``folder`` is on (ext4, xfs, btrfs: yes;
    tmpfs, overlayfs: no)."""
    if shutil.which("chattr") is None or os.geteuid() != 0:
        return False
    probe = folder / ".probe-immutable"
    probe.write_text("x")
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, check=False).returncode == 0
        if ok:
            flags = subprocess.run(["lsattr", str(probe)], capture_output=True, text=True, check=False).stdout
            ok = "i" in flags.split()[0] if flags else False
        return ok
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True, check=False)
        probe.unlink()
