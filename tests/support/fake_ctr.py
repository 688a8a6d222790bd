"""A fake ``ctr.exe``: containerd 2.x on a Windows HCS worker, answered from a JSON world.

``tests/support/bin/ctr.exe`` runs :func:`main`; the product runs it through ``--ctr``.
The world is the file named by ``$FAKE_CTR_WORLD`` (see :func:`new_world`); every call
reads it and writes back what it changed under an exclusive lock on ``WORLD.lock``, so
the product's parallel ctr processes see one containerd.

What is copied from containerd's and ctr's source (v2.1, ``cmd/ctr/commands/...``,
``core/metadata/snapshot.go``, ``core/metadata/containers.go``, ``client/container.go``):

* tables come from Go's tabwriter: ``snapshots ls`` and ``snapshots usage`` with
  ``(1, 8, 1, ' ', 0)`` and rows ending in a tab; ``tasks ls`` with ``(4, 8, 4, ' ', 0)``
  and rows without the last tab (so the header keeps trailing blanks);
* ``snapshots info`` and ``containers info`` are ``json.MarshalIndent(x, "", "    ")``; the
  container's ``Spec`` comes last (the outer field of ctr's anonymous struct), times are
  RFC 3339 with nanoseconds, trailing zeros cut;
* errors end with containerd's class (``: not found``, ``: failed precondition``), except
  where 2.x's errgrpc drops it (``no running task found: task X not found``);
  ``snapshots rm`` stops at its first failure (``failed to remove "K": ...``), while
  ``containers rm`` and ``tasks delete`` log each failure as a logrus text line and go on;
  whatever fails, the last stderr line is ``ctr: FIRST ERROR`` and the exit code 1;
* ``snapshots rm`` is metadata only: the folder waits in ``garbage`` for containerd's GC,
  which ``leases rm --sync`` runs (then ``collected``, or ``leftover_folders`` as ``rm-ID``
  when a running compute system holds it or a ``gc`` failure is injected); a parent with
  a child is refused whether or not the child is listed.

``test_the_fake_prints_what_the_real_ctr_prints_for_the_same_objects`` holds the fake to
this: for the same objects its tables, JSON layout and error texts are byte-identical to
the real ctr's (1.6, 1.7 and 2.1 on Linux; logrus timestamps aside).

What is Windows-shaped: the named pipe address, ``io.containerd.runhcs.v1``, layer folders
``C:\\ProgramData\\containerd\\root\\io.containerd.snapshotter.v1.windows\\snapshots\\N``
in ``Spec.windows.layerFolders`` (parents first, the container's own layer last, as
OBuilder's ``hcs_sandbox.ml`` writes them), and HCS error texts injected per object.

World knobs besides the objects: ``latency`` (seconds every call takes) and
``latency_by_command`` (``{"tasks delete": 2.0}``), ``failures`` (an error for one
command on one object, ``times`` calls or forever), ``down`` (containerd not answering).
Every call is appended to ``calls``; a command this fake does not know is an error and
lands in ``unsupported``, so a test sees the product asking for something new.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

WORLD_ENV = "FAKE_CTR_WORLD"
PIPE = r"\\.\pipe\containerd-containerd"
ROOT = r"C:\ProgramData\containerd\root"
SNAPSHOTS_DIR = ROOT + r"\io.containerd.snapshotter.v1.windows\snapshots"
RUNTIME = "io.containerd.runhcs.v1"
VERSION = "v2.1.4"
REVISION = "75cb2b7193e4e490e9fbdc236c0e811ccaba3376"
#: HCS's text for a compute system that is gone (hcsshim ``ErrComputeSystemDoesNotExist``).
HCS_GONE = "A virtual machine or container with the specified identifier does not exist."

Json = dict[str, Any]


class CtrFailure(Exception):
    """An error ctr prints as ``ctr: MESSAGE`` before exiting 1."""


class Unsupported(Exception):
    """A command line this fake does not answer."""


# -- the world file ----------------------------------------------------------------------


def new_world(
    *,
    address: str = PIPE,
    namespace: str = "default",
    snapshotter: str = "windows",
    epoch: datetime | None = None,
) -> Json:
    """An empty world. Snapshots: ``{key: {parent, kind, folder, age | created, size}}``;
    containers: ``{id: {folder, layers: [parent folders...], age | created}}`` (the
    container's own layer folder last); tasks: ``{id: {status, pid}}``."""
    return {
        "address": address,
        "namespace": namespace,
        "snapshotter": snapshotter,
        "epoch": (epoch or datetime.now(UTC)).isoformat(),
        #: containerd's version (``MAJOR.MINOR...``): the few texts that differ between 1.x and 2.x follow it.
        "version": VERSION.removeprefix("v"),
        "snapshots": {},
        "containers": {},
        "tasks": {},
        "failures": [],
        "latency": 0.0,
        "latency_by_command": {},
        "down": False,
        "leases": {},
        "garbage": [],
        "collected": [],
        "leftover_folders": [],
        "calls": [],
        "unsupported": [],
    }


def folder(n: int | str) -> str:
    """The windows snapshotter's folder of snapshot id ``n``."""
    return f"{SNAPSHOTS_DIR}\\{n}"


def load(path: Path) -> Json:
    data: Json = json.loads(path.read_text(encoding="utf-8"))
    return data


def save(path: Path, world: Json) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(world, indent=1), encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def locked(path: Path) -> Iterator[Json]:
    """The world, exclusively; what the block changes is written back."""
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            world = load(path)
            yield world
            save(path, world)
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- Go's formatting -----------------------------------------------------------------------


def tabwriter(lines: Sequence[str], minwidth: int, padding: int) -> str:
    """Go's ``text/tabwriter`` with padchar ' ' and no flags: a cell ends at a tab; each
    column is as wide as its widest cell plus padding over each run of lines that have it."""
    cells = [line.split("\t") for line in lines]
    out = [""] * len(cells)

    def write(first: int, last: int, widths: list[int]) -> None:
        for i in range(first, last):
            text = []
            for j, cell in enumerate(cells[i]):
                text.append(cell)
                if j < len(widths):
                    text.append(" " * (widths[j] - len(cell)))
            out[i] = "".join(text)

    def format_(line0: int, line1: int, widths: list[int]) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(cells[this]) - 1:
                this += 1
                continue
            write(line0, this, widths)
            line0 = this
            width = minwidth
            while this < line1 and column < len(cells[this]) - 1:
                width = max(width, len(cells[this][column]) + padding)
                this += 1
            format_(line0, this, [*widths, width])
            line0 = this
        write(line0, line1, widths)

    format_(0, len(cells), [])
    return "".join(line + "\n" for line in out)


def go_quote(s: str) -> str:
    """Go's ``%q`` for the printable strings a world holds."""
    return json.dumps(s, ensure_ascii=False).replace("\\u0000", "\\x00")


def go_time(t: datetime) -> str:
    """Go's ``time.Time`` in JSON: RFC 3339, nanoseconds with trailing zeros cut, ``Z`` for UTC."""
    t = t.astimezone(UTC)
    base = t.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{t.microsecond:06d}000".rstrip("0")
    return base + ("." + frac if frac else "") + "Z"


def logrus_error(msg: str, error: str) -> str:
    """One ``log.G(ctx).WithError(err).Errorf(msg)`` line as logrus' text formatter writes it."""

    def value(v: str) -> str:
        plain = v and all(c.isalnum() or c in "-._/@^+" for c in v)
        return v if plain else go_quote(v)

    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f'time="{stamp}" level=error msg={value(msg)} error={value(error)}\n'


def as_json(x: object) -> str:
    """``commands.PrintAsJSON``: four-space indent, and Go escapes ``<``, ``>``, ``&``."""
    text = json.dumps(x, indent=4, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") + "\n"


# -- the objects ------------------------------------------------------------------------------


def _when(world: Json, obj: Json) -> str:
    """An object's Created as Go prints it: ``created`` as given (nanoseconds kept), else
    ``age`` seconds before the world's epoch."""
    if obj.get("created"):
        return str(obj["created"])
    return go_time(datetime.fromisoformat(world["epoch"]) - timedelta(seconds=float(obj.get("age", 0))))


def _snapshot_info(world: Json, key: str) -> Json:
    snap = world["snapshots"][key]
    info: Json = {"Kind": snap.get("kind", "Committed"), "Name": key}
    if snap.get("parent"):
        info["Parent"] = snap["parent"]
    if snap.get("labels"):
        info["Labels"] = snap["labels"]
    created = _when(world, snap)
    info["Created"] = created
    info["Updated"] = created
    return info


def _layer_chain(world: Json, key: str | None) -> list[str]:
    """The folders of ``key`` and its ancestors, nearest first (what a layer's parentLayerPaths holds)."""
    out = []
    while key:
        snap = world["snapshots"].get(key)
        if snap is None:
            break
        out.append(folder(snap["folder"]))
        key = snap.get("parent")
    return out


def _container_info(world: Json, cid: str) -> Json:
    c = world["containers"][cid]
    # OBuilder's hcs_sandbox.ml: the parents' folders first, the step's own layer last.
    layer_folders = list(c.get("layers") or _layer_chain(world, c.get("parent_snapshot")))
    if c.get("folder") is not None:
        layer_folders.append(folder(c["folder"]))
    created = _when(world, c)
    spec: Json = {
        "ociVersion": "1.1.0",
        "process": {
            "user": {"username": "ContainerAdministrator"},
            "args": ["C:\\cygwin64\\bin\\bash.exe", "-lc", c.get("command", "opam install dune")],
            "env": ["PATH=C:\\cygwin64\\bin;C:\\Windows\\system32;C:\\Windows"],
            "cwd": "C:\\Users\\ContainerAdministrator",
        },
        "root": {"path": ""},
        "hostname": "builder",
        "mounts": [
            {"destination": "C:\\Users\\ContainerAdministrator\\AppData\\Local\\opam\\download-cache",
             "type": "", "source": "C:\\obuilder\\cache\\c-opam-archives", "options": ["rbind", "rw"]},
        ],
        "windows": {
            "layerFolders": layer_folders,
            "ignoreFlushesDuringBoot": True,
            "network": {"allowUnqualifiedDNSQuery": True},
        },
    }  # fmt: skip
    return {
        "ID": cid,
        "Labels": c.get("labels"),
        "Image": c.get("image", ""),
        "Runtime": {"Name": RUNTIME, "Options": None},
        "SnapshotKey": c.get("snapshot_key", ""),
        "Snapshotter": c.get("snapshotter", ""),
        "CreatedAt": created,
        "UpdatedAt": created,
        "Extensions": None,
        "SandboxID": "",
        "Spec": spec,
    }


# -- the commands -------------------------------------------------------------------------------


class Call:
    """One ctr process: what it prints and how it exits."""

    def __init__(self, world: Json, namespace: str) -> None:
        self.world = world
        self.namespace = namespace
        self.stdout: list[str] = []
        self.stderr: list[str] = []

    @property
    def mine(self) -> bool:
        """Whether the namespace asked for is the world's; any other holds nothing."""
        return self.namespace == str(self.world["namespace"])

    def injected(self, command: str, name: str) -> str | None:
        for failure in self.world["failures"]:
            if failure["command"] == command and failure["object"] == name:
                times = failure.get("times")
                if times is None:
                    return str(failure["error"])
                if times > 0:
                    failure["times"] = times - 1
                    return str(failure["error"])
        return None

    def container_missing(self, cid: str) -> str | None:
        if self.mine and cid in self.world["containers"]:
            return None
        return f"container {go_quote(cid)} in namespace {go_quote(self.namespace)}: not found"

    # -- snapshots --

    def snapshots(self) -> dict[str, Json]:
        return self.world["snapshots"] if self.mine else {}

    def snapshots_ls(self) -> None:
        rows = ["KEY\tPARENT\tKIND\t"]
        # The metadata store walks its bolt bucket: keys in byte order.
        for key in sorted(self.snapshots(), key=lambda k: k.encode()):
            if self.snapshots()[key].get("hidden"):
                continue
            info = _snapshot_info(self.world, key)
            rows.append(f"{key}\t{info.get('Parent', '')}\t{info['Kind']}\t")
        self.stdout.append(tabwriter(rows, 1, 1))

    def snapshots_info(self, key: str) -> None:
        error = self.injected("snapshots info", key)
        if error:
            raise CtrFailure(error)
        if key not in self.snapshots():
            raise CtrFailure(f"snapshot {key} does not exist: not found")
        self.stdout.append(as_json(_snapshot_info(self.world, key)))

    def snapshots_usage(self, keys: Sequence[str]) -> None:
        rows = ["KEY\tSIZE\tINODES\t"]
        for key in keys:
            error = self.injected("snapshots usage", key)
            if error:
                raise CtrFailure(error)
            snap = self.snapshots().get(key)
            if snap is None:
                # ctr returns before flushing its tabwriter: nothing at all on stdout.
                raise CtrFailure(f"snapshot {key} does not exist: not found")
            rows.append(f"{key}\t{int(snap.get('size', 0))}\t{int(snap.get('inodes', 0))}\t")
        self.stdout.append(tabwriter(rows, 1, 1))

    def snapshots_rm(self, keys: Sequence[str]) -> None:
        snaps = self.snapshots()
        for key in keys:
            error = self.injected("snapshots rm", key)
            if error is None and key not in snaps:
                error = f"snapshot {key} does not exist: not found"
            if error is None and any(s.get("parent") == key for s in snaps.values()):
                error = "cannot remove snapshot with child: failed precondition"
            if error is not None:
                raise CtrFailure(f"failed to remove {go_quote(key)}: {error}")
            removed = snaps.pop(key)
            # Metadata only: the folder waits for containerd's garbage collection.
            self.world["garbage"].append(folder(removed["folder"]))

    # -- containers and tasks --

    def containers_ls(self, quiet: bool) -> None:
        ids = sorted(self.world["containers"]) if self.mine else []
        if quiet:
            self.stdout.append("".join(f"{i}\n" for i in ids))
            return
        rows = ["CONTAINER\tIMAGE\tRUNTIME\t"]
        rows += [f"{i}\t{self.world['containers'][i].get('image') or '-'}\t{RUNTIME}\t" for i in ids]
        self.stdout.append(tabwriter(rows, 4, 4))

    def containers_info(self, cid: str) -> None:
        error = self.injected("containers info", cid) or self.container_missing(cid)
        if error:
            raise CtrFailure(error)
        self.stdout.append(as_json(_container_info(self.world, cid)))

    def tasks_ls(self) -> None:
        tasks = self.world["tasks"] if self.mine else {}
        rows = ["TASK\tPID\tSTATUS\t"]
        rows += [f"{t}\t{int(tasks[t].get('pid', 0))}\t{tasks[t].get('status', 'RUNNING')}" for t in sorted(tasks)]
        self.stdout.append(tabwriter(rows, 4, 4))

    def tasks_delete(self, ids: Sequence[str], force: bool) -> None:
        first: str | None = None
        for cid in ids:
            error = self.container_missing(cid)
            what = f"failed to load task from {cid}"
            if error is None and cid not in self.world["tasks"]:
                error = f"no running task found: task {cid} not found"
                if self.world["version"].startswith("1."):
                    # 1.x keeps the class; 2.x's errgrpc drops it from a message that did not end with it.
                    error += ": not found"
            if error is None:
                what = f"unable to delete {cid}"
                error = self.injected("tasks delete", cid)
            if error is None:
                status = self.world["tasks"][cid].get("status", "RUNNING")
                if status in ("RUNNING", "PAUSED", "PAUSING") and not force:
                    error = f"task must be stopped before deletion: {status.lower()}: failed precondition"
            if error is not None:
                first = first or error
                self.stderr.append(logrus_error(what, error))
                continue
            del self.world["tasks"][cid]
        if first is not None:
            raise CtrFailure(first)

    def containers_rm(self, ids: Sequence[str]) -> None:
        first: str | None = None
        for cid in ids:
            error = self.container_missing(cid) or self.injected("containers rm", cid)
            task = self.world["tasks"].get(cid)
            if error is None and task is not None:
                status = str(task.get("status", "RUNNING")).lower()
                if status not in ("stopped", "created"):
                    error = f"cannot delete a non stopped container: {{{status} 0 0001-01-01 00:00:00 +0000 UTC}}"
                else:
                    # ctr deletes a stopped task first: the same shim call, the same failures.
                    error = self.injected("tasks delete", cid)
            if error is not None:
                first = first or error
                self.stderr.append(logrus_error(f"failed to delete container {go_quote(cid)}", error))
                continue
            self.world["tasks"].pop(cid, None)
            del self.world["containers"][cid]
        if first is not None:
            raise CtrFailure(first)

    # -- leases and garbage collection --

    def leases_create(self, lease: str, expires: str) -> None:
        if lease in self.world["leases"]:
            raise CtrFailure(f"lease {go_quote(lease)}: already exists")
        self.world["leases"][lease] = {"expires": expires}
        self.stdout.append(f"{lease}\n")

    def leases_rm(self, leases: Sequence[str], sync: bool) -> None:
        for lease in leases:
            if self.world["leases"].pop(lease, None) is None:
                raise CtrFailure(f"lease {go_quote(lease)}: not found")
            self.stdout.append(f"{lease}\n")
        if sync:
            self.collect()

    def collect(self) -> None:
        """containerd's GC: the folders of removed snapshots leave the disk, except one that is
        held: by a compute system still running on it (HCS keeps a running container's layers
        open) or as the world says (``failures`` on command ``gc``). The windows snapshotter
        renamed it ``rm-ID`` and only logged that it could not delete it, so it stays, forever."""
        tasks = self.world["tasks"]
        live = {cid for cid, t in tasks.items() if t.get("status", "RUNNING") in ("RUNNING", "PAUSED", "PAUSING")}
        held = {
            path
            for cid in live & set(self.world["containers"])
            for path in _container_info(self.world, cid)["Spec"]["windows"]["layerFolders"]
        }
        for path in self.world["garbage"]:
            if path in held or self.injected("gc", path):
                head, _, n = path.rpartition("\\")
                self.world["leftover_folders"].append(f"{head}\\rm-{n}")
            else:
                self.world["collected"].append(path)
        self.world["garbage"] = []

    def version(self) -> None:
        self.stdout.append(
            f"Client:\n  Version:  {VERSION}\n  Revision: {REVISION}\n  Go version: go1.23.12\n\n"
            f"Server:\n  Version:  {VERSION}\n  Revision: {REVISION}\n"
            "  UUID: 5c1b7e8e-55c4-4c8e-9d1a-0f6c2b7c9a31\n"
        )


# -- the command line -------------------------------------------------------------------------

_GLOBAL_VALUE_FLAGS = {
    "-a": "address", "--address": "address", "-n": "namespace", "--namespace": "namespace",
    "--connect-timeout": "connect-timeout", "--timeout": "timeout",
}  # fmt: skip
_COMMANDS = {"snapshots": "snapshots", "snapshot": "snapshots", "containers": "containers", "container": "containers",
             "c": "containers", "tasks": "tasks", "task": "tasks", "t": "tasks", "version": "version",
             "leases": "leases", "namespaces": "namespaces", "namespace": "namespaces",
             "ns": "namespaces"}  # fmt: skip
_VERBS = {"ls": "ls", "list": "ls", "rm": "rm", "delete": "rm", "del": "rm", "remove": "rm", "info": "info",
          "create": "create",
          "usage": "usage"}  # fmt: skip


def _flags(args: list[str], known: dict[str, bool]) -> tuple[dict[str, str], list[str]]:
    """urfave/cli v2: flags (``known``: name -> takes a value) up to ``--`` or the first positional."""
    found: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return found, args[i + 1 :]
        if not arg.startswith("-") or arg == "-":
            return found, args[i:]
        name, eq, value = arg.partition("=")
        if name not in known:
            raise CtrFailure(f"flag provided but not defined: {name}")
        if known[name] and not eq:
            i += 1
            if i >= len(args):
                raise CtrFailure(f"flag needs an argument: {name}")
            value = args[i]
        found[name] = value if known[name] else "true"
        i += 1
    return found, []


def parse(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Global options (by their long name) and the rest of the command line."""
    options = {"address": PIPE, "namespace": os.environ.get("CONTAINERD_NAMESPACE", "default")}
    args = list(argv)
    while args and args[0].startswith("-"):
        name, eq, value = args[0].partition("=")
        if name in ("--version", "-v"):
            options["version"] = "true"
            args = args[1:]
            continue
        if name not in _GLOBAL_VALUE_FLAGS:
            raise CtrFailure(f"flag provided but not defined: {name}")
        if not eq:
            if len(args) < 2:
                raise CtrFailure(f"flag needs an argument: {name}")
            value = args[1]
            args = args[1:]
        options[_GLOBAL_VALUE_FLAGS[name]] = value
        args = args[1:]
    return options, args


def dispatch(call: Call, args: list[str]) -> None:
    if not args or args[0] not in _COMMANDS:
        raise Unsupported(" ".join(args))
    command, rest = _COMMANDS[args[0]], args[1:]
    if command == "version":
        call.version()
        return
    snapshotter = call.world["snapshotter"]
    if command == "snapshots":
        flags, rest = _flags(rest, {"--snapshotter": True})
        snapshotter = flags.get("--snapshotter", snapshotter)
        if snapshotter != call.world["snapshotter"]:
            raise CtrFailure(f"snapshotter not loaded: {snapshotter}: invalid argument")
    if not rest or rest[0] not in _VERBS:
        raise Unsupported(" ".join(args))
    verb, rest = _VERBS[rest[0]], rest[1:]
    match (command, verb):
        case ("snapshots", "ls"):
            call.snapshots_ls()
        case ("snapshots", "info"):
            _, names = _flags(rest, {})
            if len(names) != 1:
                raise Unsupported(" ".join(args))
            call.snapshots_info(names[0])
        case ("snapshots", "usage"):
            flags, names = _flags(rest, {"-b": False})
            if "-b" not in flags or not names:
                raise Unsupported(" ".join(args))
            call.snapshots_usage(names)
        case ("snapshots", "rm"):
            _, names = _flags(rest, {})
            call.snapshots_rm(names)
        case ("containers", "ls"):
            flags, _ = _flags(rest, {"--quiet": False, "-q": False})
            call.containers_ls(bool(flags))
        case ("containers", "info"):
            _, names = _flags(rest, {})
            call.containers_info(names[0] if names else "")
        case ("containers", "rm"):
            flags, names = _flags(rest, {"--keep-snapshot": False})
            if "--keep-snapshot" not in flags:
                # Without it ctr would also remove the container's snapshot: the product never asks that.
                raise Unsupported(" ".join(args))
            call.containers_rm(names)
        case ("tasks", "ls"):
            call.tasks_ls()
        case ("namespaces", "ls"):
            flags, _ = _flags(rest, {"--quiet": False, "-q": False})
            if not flags:
                raise Unsupported(" ".join(args))
            call.stdout.append(f"{call.world['namespace']}\n")
        case ("leases", "create"):
            flags, labels = _flags(rest, {"--id": True, "--expires": True, "-x": True})
            if labels or "--id" not in flags:
                raise Unsupported(" ".join(args))
            call.leases_create(flags["--id"], flags.get("--expires", flags.get("-x", "24h")))
        case ("leases", "rm"):
            flags, names = _flags(rest, {"--sync": False})
            call.leases_rm(names, sync="--sync" in flags)
        case ("tasks", "rm"):
            flags, names = _flags(rest, {"--force": False, "-f": False})
            call.tasks_delete(names, force=bool(flags))
        case _:
            raise Unsupported(" ".join(args))


def command_name(args: Sequence[str]) -> str:
    """``snapshots rm``, ``tasks delete``...: the command's words as the product spells them."""
    words: list[str] = []
    skip = False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = arg == "--snapshotter"
            continue
        words.append(arg)
        if len(words) == 2 or words[0] == "version":
            break
    return " ".join(words)


def main(argv: Sequence[str]) -> int:
    path = Path(os.environ[WORLD_ENV])
    try:
        options, args = parse(argv)
    except CtrFailure as e:
        sys.stderr.write(f"ctr: {e}\n")
        return 1
    if "version" in options:
        # urfave/cli's version flag, as ctr's app sets its printer: name, package, version.
        sys.stdout.write(f"ctr github.com/containerd/containerd/v2 {VERSION}\n")
        return 0
    # The call's time passes outside the lock: containerd serves parallel clients at once.
    # (The world is replaced whole, never written in place, so reading it unlocked is safe.)
    before = load(path)
    time.sleep(float(before["latency_by_command"].get(command_name(args), before["latency"])))
    with locked(path) as world:
        world["calls"].append({"argv": list(argv), "at": time.time(), "pid": os.getpid()})
        if world["down"] or options["address"] != world["address"]:
            sys.stderr.write(f"ctr: failed to dial {go_quote(options['address'])}: context deadline exceeded\n")
            return 1
        call = Call(world, options["namespace"])
        try:
            dispatch(call, args)
        except Unsupported as e:
            world["unsupported"].append(list(argv))
            sys.stderr.write(f"fake ctr.exe: not a command the fake answers: {e}\n")
            return 3
        except CtrFailure as e:
            call.stderr.append(f"ctr: {e}\n")
            sys.stdout.write("".join(call.stdout))
            sys.stderr.write("".join(call.stderr))
            return 1
    sys.stdout.write("".join(call.stdout))
    sys.stderr.write("".join(call.stderr))
    return 0
