"""Talking to containerd through ``ctr``: run it, parse what it prints, classify errors.

Facts from ctr's source (1.6 to 2.x) this module relies on:

* tables are aligned by Go's tabwriter, so a row is cut at the header's column
  positions (an empty PARENT is only padding, and snapshot keys may hold spaces);
* flags go before positional arguments (ctr 2.x no longer reorders them), and a
  ``--`` ends the flags, so a name read from disk is never read as an option;
* ``snapshots rm k1 k2 ...`` stops at the first failure ("failed to remove %q: ...")
  while ``containers rm`` and ``tasks delete --force`` log each failure and go on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from controller.adapters import platform
from controller.model.errors import CtrError, CtrNotFoundError, CtrTimeoutError
from controller.model.outcome import Outcome, Result
from controller.model.policy import ReconcilePolicySpec
from controller.model.records import Container, Snapshot, Task, TaskStatus

V = TypeVar("V")
_DEFAULTS = ReconcilePolicySpec()

#: ``ctr --version``'s first line, 1.6 to 2.x: "ctr github.com/containerd/containerd/v2 2.1.1".
_CTR_VERSION = re.compile(r"^ctr(?:\.exe)?\s+\S+.*\d")
#: What ``--version`` said, by executable (path, mtime, size): (is ctr, its first line or why not).
_IDENTITIES: dict[tuple[str, int, int], tuple[bool, str]] = {}
_IDENTITY_LOCK = threading.Lock()


@dataclass(frozen=True)
class CtrSettings:
    ctr: str = platform.DEFAULT_CTR
    address: str = platform.DEFAULT_ADDRESS
    namespace: str = platform.DEFAULT_NAMESPACE
    snapshotter: str = platform.DEFAULT_SNAPSHOTTER
    timeout: float = _DEFAULTS.containerd.call_timeout.total_seconds()
    #: ctr processes at once for one batch of removals (independent keys: one level).
    parallelism: int = _DEFAULTS.limits.parallelism


@dataclass
class Ctr:
    """Runs ``ctr`` with the connection flags, a timeout, and a count of processes started."""

    settings: CtrSettings
    calls: int = 0
    _argv0: list[str] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    #: The last snapshot listing read, whose records the next one reuses row by row.
    _snapshot_listing: SnapshotListing | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = self.settings
        self._argv0 = [s.ctr, "--address", s.address, "--namespace", s.namespace]

    def run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.check_identity()
        argv = [*self._argv0, *args]
        with self._lock:
            self.calls += 1
        return self._spawn(argv)

    def check_identity(self) -> str:
        """``ctr --version``, asked once per executable (and again only if the file changes): a
        ``--ctr`` that runs but is not ctr (``/bin/true`` answers every call with nothing, so every
        store would look clean) is a :class:`CtrNotFoundError` naming what it printed.

        Not counted in :attr:`calls`, which counts what a pass costs: this is once a run."""
        exe = shutil.which(self.settings.ctr) or self.settings.ctr
        try:
            st = os.stat(exe)
            key = (exe, st.st_mtime_ns, st.st_size)
        except OSError:
            key = (exe, 0, 0)  # running it says why
        with _IDENTITY_LOCK:
            known = _IDENTITIES.get(key)
            if known is None:
                proc = self._spawn([self.settings.ctr, "--version"])
                first = (proc.stdout.strip().splitlines() or [""])[0]
                if proc.returncode == 0 and _CTR_VERSION.match(first):
                    known = (True, first)
                else:
                    shown = (first or proc.stderr.strip())[:120]
                    known = (
                        False,
                        f"{self.settings.ctr!r} is not ctr: `--version` exited {proc.returncode} and printed "
                        f"{shown!r}, where ctr prints 'ctr github.com/containerd/containerd VERSION'",
                    )
                _IDENTITIES[key] = known
        is_ctr, said = known
        if not is_ctr:
            raise CtrNotFoundError(said)
        return said

    def _spawn(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="surrogateescape",
                stdin=subprocess.DEVNULL,
                timeout=self.settings.timeout,
                check=False,
                **platform.child_process_options(),
            )
        except OSError as e:
            # Missing, not executable, a folder, or not a program at all (ENOEXEC): no pass can work.
            raise CtrNotFoundError(f"cannot run {self.settings.ctr!r}: {e.strerror or e}") from e
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            raise CtrTimeoutError(argv, None, f"timed out after {self.settings.timeout:g}s {stderr}") from e

    def output(self, args: Sequence[str]) -> str:
        """Run and return stdout; any non-zero exit is a :class:`CtrError`."""
        proc = self.run(args)
        if proc.returncode != 0:
            raise CtrError([self.settings.ctr, *args], proc.returncode, proc.stderr)
        return proc.stdout

    def wait_until_up(
        self,
        timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> int:
        """Ask ``ctr version`` until containerd answers or ``timeout`` seconds pass.

        Returns how many times it asked; a containerd still not answering is a :class:`CtrError`
        with its last message."""
        deadline = clock() + timeout
        asked = 0
        while True:
            # ctr's own dial otherwise waits 10 s for a socket or pipe that is not there yet.
            dial = max(1, min(5, round(deadline - clock())))
            proc = self.run(["--connect-timeout", f"{dial}s", "version"])
            asked += 1
            if proc.returncode == 0:
                return asked
            if clock() >= deadline:
                stderr = f"{proc.stderr.strip()} (containerd did not answer within {timeout:g}s)"
                raise CtrError([self.settings.ctr, "version"], proc.returncode, stderr)
            sleep(min(1.0, max(0.0, deadline - clock())))

    # -- observing -----------------------------------------------------------------

    def snapshots(self) -> tuple[Snapshot, ...]:
        """The snapshotter's snapshots; a row printed as last time is last time's record.

        At 50,000 snapshots, validating a pydantic record per row at every pass costs more than
        the rest of the parse. Threads may list at once: each reads the published listing once
        and publishes a new one, never changing one it has published, so a thread sees a whole
        listing; when two race, either one kept is a right cache for the next."""
        text = self.output(["snapshots", "--snapshotter", self.settings.snapshotter, "ls"])
        listing = read_snapshots(text, self._snapshot_listing)
        self._snapshot_listing = listing
        return listing.snapshots

    def container_ids(self) -> tuple[str, ...]:
        out = self.output(["containers", "ls", "--quiet"])
        return tuple(line.strip() for line in out.splitlines() if line.strip())

    def container(self, container_id: str) -> Container | None:
        """One container's details, or None when it vanished since it was listed."""
        proc = self.run(["containers", "info", "--", container_id])
        if proc.returncode != 0:
            if classify(proc.stderr, container_id).outcome is Outcome.NOT_FOUND:
                return None
            raise CtrError([self.settings.ctr, "containers", "info", container_id], proc.returncode, proc.stderr)
        return parse_container_info(proc.stdout)

    def tasks(self) -> tuple[Task, ...]:
        return tuple(
            Task(id=r["TASK"], pid=_int_or_none(r.get("PID", "")), status=_status(r.get("STATUS", "")))
            for r in parse_table(self.output(["tasks", "ls"]))
        )

    def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
        """containerd's Created of each key (``snapshots info``, one key a call, a few at
        once); None for a key that is gone. Any other failure is a :class:`CtrError`."""

        def one(part: list[str]) -> dict[str, datetime | None]:
            out: dict[str, datetime | None] = {}
            for key in part:
                args = ["snapshots", "--snapshotter", self.settings.snapshotter, "info", "--", key]
                proc = self.run(args)
                if proc.returncode == 0:
                    out[key] = parse_snapshot_created(proc.stdout, key)
                elif classify(proc.stderr, key).outcome is Outcome.NOT_FOUND:
                    out[key] = None
                else:
                    raise CtrError([self.settings.ctr, *args], proc.returncode, proc.stderr)
            return out

        return _fan_out(_split(list(keys), self.settings.parallelism), one)

    def usage(self, keys: Sequence[str]) -> dict[str, int]:
        """Bytes each snapshot holds (``snapshots usage -b``); keys it cannot measure are left out.

        The snapshotter walks each layer to answer, so this costs as much as ``du``.
        """
        sizes: dict[str, int] = {}
        for chunk in chunk_args(keys):
            proc = self.run(["snapshots", "--snapshotter", self.settings.snapshotter, "usage", "-b", "--", *chunk])
            for row in parse_table(proc.stdout):
                size = _int_or_none(row.get("SIZE", ""))
                if size is not None:
                    sizes[row["KEY"]] = size
        return sizes

    # -- removing ------------------------------------------------------------------

    def remove_snapshots(self, keys: Sequence[str]) -> dict[str, Result]:
        """Remove snapshots of one level (none is another's parent), many per call.

        The keys are split over ``parallelism`` ctr processes at once: containerd
        removes independent snapshots concurrently, so the level takes less time.
        """
        return _fan_out(_split(list(keys), self.settings.parallelism), self._remove_in_order)

    def _remove_in_order(self, keys: list[str]) -> dict[str, Result]:
        """One ctr call after another; a call stops at its first failure, so go on after it."""
        results: dict[str, Result] = {}
        for chunk in chunk_args(keys):
            pending = list(chunk)
            while pending:
                proc = self.run(["snapshots", "--snapshotter", self.settings.snapshotter, "rm", "--", *pending])
                if proc.returncode == 0:
                    results.update((k, Result(Outcome.REMOVED)) for k in pending)
                    break
                failed_at = _failed_snapshot_index(proc.stderr, pending)
                if failed_at is None:
                    # We cannot tell which key failed: report them all as untried;
                    # the next observation says which are gone.
                    message = _last_error(proc.stderr)
                    results.update((k, Result(Outcome.NOT_TRIED, message)) for k in pending)
                    break
                results.update((k, Result(Outcome.REMOVED)) for k in pending[:failed_at])
                results[pending[failed_at]] = classify(proc.stderr, pending[failed_at])
                pending = pending[failed_at + 1 :]
        return results

    def collect_garbage(self) -> Result:
        """Run containerd's garbage collection now and wait for it to finish.

        ctr has no GC command, but deleting a lease with ``--sync`` makes containerd collect
        at once and answer only when the collection (layer folders included) is done. The
        lease is ours and empty; should its removal fail, it expires by itself in a minute.
        """
        lease = f"obuilder-reconcile-gc-{os.getpid()}-{time.monotonic_ns()}"
        made = self.run(["leases", "create", "--id", lease, "--expires", "1m"])
        if made.returncode != 0:
            return Result(Outcome.FAILED, f"leases create: {_last_error(made.stderr)}")
        done = self.run(["leases", "rm", "--sync", "--", lease])
        if done.returncode != 0:
            return Result(Outcome.FAILED, f"leases rm --sync: {_last_error(done.stderr)}")
        return Result(Outcome.REMOVED)

    def delete_tasks(self, ids: Sequence[str]) -> dict[str, Result]:
        """``tasks delete --force``: kills a running task, then deletes it."""
        return self._remove_each(["tasks", "delete", "--force"], ids, _TASK_FAILURE)

    def remove_containers(self, ids: Sequence[str]) -> dict[str, Result]:
        """``containers rm --keep-snapshot``: the snapshot is judged on its own."""
        return self._remove_each(["containers", "rm", "--keep-snapshot"], ids, _CONTAINER_FAILURE)

    def _remove_each(self, command: list[str], ids: Sequence[str], pattern: re.Pattern[str]) -> dict[str, Result]:
        """One command over many ids, split over ``parallelism`` processes: ctr works
        through its ids one by one, and killing a task waits for it to exit."""
        parts = [c for part in _split(list(ids), self.settings.parallelism) for c in chunk_args(part)]

        def one(chunk: list[str]) -> dict[str, Result]:
            proc = self.run([*command, "--", *chunk])
            failures = _logged_failures(proc.stderr, pattern)
            if proc.returncode != 0 and not failures:
                message = _last_error(proc.stderr)
                return {i: Result(Outcome.NOT_TRIED, message) for i in chunk}
            return {i: failures.get(i, Result(Outcome.REMOVED)) for i in chunk}

        return _fan_out(parts, one)


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of a tabwriter table as dicts keyed by the header's column names.

    Cells are cut at the header's column starts, not split on blanks: a key may
    hold spaces and an empty cell is only padding.
    """
    lines = _lines(text)
    if not lines:
        return []
    columns = _columns(lines[0])
    return [_cells(line, columns) for line in lines[1:]]


def _lines(text: str) -> list[str]:
    # isspace() is strip()'s notion of blank without building a stripped copy of each line.
    return [line for line in text.splitlines() if line and not line.isspace()]


def _columns(header: str) -> list[tuple[str, int, int | None]]:
    """Each column's name and the slice of a row that is its cell."""
    starts = [(m.group(), m.start()) for m in re.finditer(r"\S+", header)]
    return [(name, start, starts[i + 1][1] if i + 1 < len(starts) else None) for i, (name, start) in enumerate(starts)]


def _cells(line: str, columns: list[tuple[str, int, int | None]]) -> dict[str, str]:
    # tabwriter pads with at least one blank, so the last char of a cell's
    # slot is padding; strip only trailing blanks, keep inner spaces.
    return {name: line[start:end].rstrip(" ") for name, start, end in columns}


#: The kinds ``ctr snapshots ls`` prints (containerd's snapshots.Kind).
SNAPSHOT_KINDS = frozenset({"View", "Active", "Committed", "Unknown"})


@dataclass(frozen=True)
class SnapshotListing:
    """One ``ctr snapshots ls`` as printed and as read. The text, not a dict of its rows, is what
    is kept: one string, and a listing printed as last time is known by one comparison."""

    text: str
    snapshots: tuple[Snapshot, ...]

    def by_row(self, header: str) -> dict[str, Snapshot]:
        """Each record by its row as printed, if printed under ``header``: the header's column
        positions decide how a row is cut, so under another header a row may be other cells."""
        lines = _lines(self.text)
        if not lines or lines[0] != header:
            return {}
        return dict(zip(lines[1:], self.snapshots, strict=True))


def parse_snapshots(text: str) -> tuple[Snapshot, ...]:
    """``ctr snapshots ls`` as records. A row that does not fit the table (no KIND ctr prints: a key
    holding a newline splits its row in two) is a :class:`CtrError` naming it: the listing cannot be
    trusted, and a misread one would hide a child from its parent."""
    return read_snapshots(text).snapshots


def read_snapshots(text: str, known: SnapshotListing | None = None) -> SnapshotListing:
    """:func:`parse_snapshots`, reusing what ``known`` (the last listing) read: its very listing
    when ctr printed the same, else its record of each row printed as it was then. Only the
    rows of the listing read are kept, so this does not grow."""
    if known is not None and text == known.text:
        return known
    lines = _lines(text)
    if len(lines) < 2:
        return SnapshotListing(text=text, snapshots=())
    header = lines[0]
    columns = _columns(header)
    if not {"KEY", "PARENT", "KIND"} <= {name for name, _, _ in columns}:
        raise CtrError(["ctr", "snapshots", "ls"], 0, f"unexpected header: {text.splitlines()[0][:200]!r}")
    last = known.by_row(header) if known is not None else {}
    out = []
    for n, line in enumerate(lines[1:], start=2):
        snapshot = last.get(line)
        out.append(_snapshot_row(_cells(line, columns), n) if snapshot is None else snapshot)
    return SnapshotListing(text=text, snapshots=tuple(out))


def _snapshot_row(r: dict[str, str], n: int) -> Snapshot:
    if r["KIND"] not in SNAPSHOT_KINDS or not r["KEY"]:
        raise CtrError(
            ["ctr", "snapshots", "ls"],
            0,
            f"line {n} does not fit the table (a key holding a newline or a tab?), so the listing "
            f"cannot be trusted: {r!r:.200}",
        )
    return Snapshot(key=r["KEY"], parent=r["PARENT"] or None, kind=r["KIND"])


def _aware(text: object) -> datetime:
    """An RFC 3339 time as ctr prints it; one without a zone is not what ctr prints."""
    if not isinstance(text, str):
        raise TypeError(f"expected a time, found {type(text).__name__}")
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"time {text!r} has no zone")
    return when


def parse_snapshot_created(text: str, key: str) -> datetime:
    """The ``Created`` of ``ctr snapshots info`` JSON (RFC 3339, nanoseconds cut to micro)."""
    try:
        data = json.loads(text)
        return _aware(data["Created"])
    except (ValueError, KeyError, TypeError) as e:
        raise CtrError(["ctr", "snapshots", "info", key], 0, f"unexpected output ({e}): {text[:200]!r}") from e


def parse_container_info(text: str) -> Container:
    """``ctr containers info`` JSON (containerd 1.6 to 2.x, Linux or Windows) as a record.

    Anything else (not JSON, not the shape ctr prints) is a :class:`CtrError` naming what
    it got: that observation fails, clearly, and nothing is guessed."""
    try:
        data: dict[str, Any] = json.loads(text)
        spec = data.get("Spec") or {}
        root = spec.get("root") or {}
        windows = spec.get("windows") or {}
        created = data.get("CreatedAt")
        return Container(
            id=data["ID"],
            image=data.get("Image") or "",
            snapshot_key=data.get("SnapshotKey") or "",
            snapshotter=data.get("Snapshotter") or "",
            root_path=root.get("path") or "",
            layer_folders=tuple(windows.get("layerFolders") or ()),
            created_at=_aware(created) if created else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # pydantic's ValidationError is a ValueError.
        raise CtrError(["ctr", "containers", "info"], 0, f"unexpected output ({e}): {text[:200]!r}") from e


def classify(stderr: str, name: str | None = None) -> Result:
    """Sort a ctr error into done, retry-after-children, or stuck, by containerd's error class.

    containerd ends each error with its class (``: not found``, ``: failed precondition``...).
    "Already gone" needs that class *and*, when ``name`` is given, one of ctr's own phrasings
    about that very object: a missing parent, or an HCS message that says "does not exist"
    while the container lives on, is a failure, never a removal."""
    message = _last_error(stderr)
    if message.endswith("cannot remove snapshot with child: failed precondition"):
        return Result(Outcome.HAS_CHILD, message)
    if message.endswith(": not found") and (name is None or _about(message, name)):
        return Result(Outcome.NOT_FOUND, message)
    if name is not None and message.endswith(f"no running task found: task {name} not found"):
        # containerd 2.x prints this one without its class (1.6 and 1.7: "...: not found").
        return Result(Outcome.NOT_FOUND, message)
    return Result(Outcome.FAILED, message)


def _about(message: str, name: str) -> bool:
    """Whether a not-found error is about ``name`` itself, in the forms ctr 1.6 to 2.x print."""
    quoted = go_quote(name)
    forms = (
        f"snapshot {name} does not exist: not found",  # snapshots rm, snapshots info
        f"container {quoted} in namespace ",  # containers rm/info, tasks delete of a missing container
        f"task {name} not found",  # tasks delete of a container without a task
        f"no running task found: task {name} not found",
    )
    return any(form in message for form in forms)


def _fan_out(parts: list[list[str]], remove: Callable[[list[str]], dict[str, V]]) -> dict[str, V]:
    """Run ``remove`` on each part, one ctr process a part, all at once; merge what they say."""
    results: dict[str, V] = {}
    if len(parts) <= 1:
        for part in parts:
            results.update(remove(part))
        return results
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        for done in pool.map(remove, parts):
            results.update(done)
    return results


def _split(items: list[str], parts: int) -> list[list[str]]:
    """``items`` in up to ``parts`` runs of near-equal length (none empty)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return [p for p in out if p]


def chunk_args(names: Iterable[str], budget: int = platform.MAX_COMMAND_CHARS) -> Iterator[list[str]]:
    """Split names into runs whose command line stays under the platform's limit."""
    chunk: list[str] = []
    size = 0
    for name in names:
        cost = len(name) + 3  # a separating blank and possible quotes
        if chunk and size + cost > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(name)
        size += cost
    if chunk:
        yield chunk


def go_quote(s: str) -> str:
    """Go's ``%q`` of a string, as ctr prints names in its messages."""
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


_TASK_FAILURE = re.compile(r"^(?:failed to load task from|unable to delete) (?P<id>\S+)")
_CONTAINER_FAILURE = re.compile(r'^failed to delete container "(?P<id>[^"]+)"')
_LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def _logged_failures(stderr: str, pattern: re.Pattern[str]) -> dict[str, Result]:
    failures = {}
    for line in stderr.splitlines():
        fields = {k: _unquote(v) for k, v in _LOGFMT_FIELD.findall(line)}
        if fields.get("level") != "error" or "msg" not in fields:
            continue
        m = pattern.match(fields["msg"])
        if m:
            failures[m.group("id")] = classify(fields.get("error", fields["msg"]), m.group("id"))
    return failures


def _failed_snapshot_index(stderr: str, keys: Sequence[str]) -> int | None:
    message = _last_error(stderr)
    for i, key in enumerate(keys):
        if message.startswith(f"failed to remove {go_quote(key)}:"):
            return i
    return None


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ctr: "):
            return line[len("ctr: ") :]
    return lines[-1] if lines else ""


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
            return decoded if isinstance(decoded, str) else value[1:-1]
        except json.JSONDecodeError:
            return value[1:-1]
    return value


def _int_or_none(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _status(text: str) -> TaskStatus:
    try:
        return TaskStatus(text.strip().upper())
    except ValueError:
        return TaskStatus.UNKNOWN
