"""Logs and the progress bar: reporters (``controller.core.ports.Reporter``) for people.

The core never logs or draws: it calls the reporter's hooks, and these turn them
into log lines (text or JSON) and a progress bar on a terminal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from datetime import UTC, datetime
from typing import Any

from controller.core.ports import Reporter
from controller.model.outcome import Outcome, PassReport, Result
from controller.model.plan import Kind, Plan

log = logging.getLogger("reconcile")


class LogReporter(Reporter):
    """Every removal and failure as a log line, with its kind, name and reason as fields; and,
    last of the reporters, one line a pass (so whoever reads it finds the status file and the
    metrics already saying the same)."""

    def pass_finished(self, report: PassReport) -> None:
        if report.outcome == "error":
            if report.traceback:
                log.error("pass failed unexpectedly; retrying in %.1f s\n%s", report.retry_in or 0, report.traceback)
            else:
                log.warning("pass failed (%s); retrying in %.1f s", report.error, report.retry_in or 0)
            return
        clock_lines(report)
        for s in report.unjudged:
            # Kept because it could not be judged: said every pass, as a failed removal is.
            log.warning(
                "kept %s %s: %s", s.kind, s.name, s.reason, extra={"kind": s.kind, "object": s.name, "outcome": "stuck"}
            )
        window = f", re-check window max {report.recheck_window * 1000:.0f} ms" if report.recheck_window else ""
        log.info(
            "pass %d (%s): %d removed, %d failed, %d changed since planned, %d deferred, %d waiting out their "
            "grace period, %d owned snapshots kept, %d ctr calls, %.2f s%s%s",
            report.number,
            report.trigger or report.mode.value,
            report.progress,
            sum(report.failed.values()),
            report.changed,
            len(report.plan.deferred) if report.plan else 0,
            report.backlog - (len(report.plan.deferred) if report.plan else 0),
            report.kept_snapshots,
            report.ctr_calls or 0,
            report.seconds,
            window,
            backlog_text(report),
        )

    def removed(self, kind: Kind, name: str, reason: str, outcome: Outcome) -> None:
        gone = "" if outcome.value == "removed" else " (already gone)"
        log.info(
            "removed %s %s%s: %s", kind, name, gone, reason, extra={"kind": kind, "object": name, "reason": reason}
        )

    def failed(self, kind: Kind, name: str, result: Result) -> None:
        if result.outcome.value == "changed":
            log.info(
                "left %s %s: %s",
                kind,
                name,
                result.message,
                extra={"kind": kind, "object": name, "outcome": result.outcome.value},
            )
            return
        log.warning(
            "could not remove %s %s (%s): %s",
            kind,
            name,
            result.outcome.value,
            result.message,
            extra={"kind": kind, "object": name, "outcome": result.outcome.value},
        )


def clock_lines(report: PassReport) -> None:
    """A step of the wall clock, once (the pass that saw it); stamps ahead of the clock, each pass
    they are there (like a failed removal: something a human should look at)."""
    clock = report.clock
    if clock is None:
        return
    if clock.step is not None:
        way = "forward" if clock.step > 0 else "back"
        log.warning(
            "the wall clock stepped %s by %.1f s since the last pass (%.1f s in all since start-up); ages that "
            "decide a removal count only what this process watched on its monotonic clock, so no verdict changes",
            way,
            abs(clock.step),
            clock.net_step,
            extra={"clock_step": clock.step},
        )
    if clock.stamped_ahead:
        log.warning(
            "%d objects are stamped up to %.1f s ahead of the wall clock (it was set back, or another clock runs "
            "ahead): kept until it catches up",
            clock.stamped_ahead,
            clock.most_ahead or 0.0,
        )


def backlog_text(report: PassReport) -> str:
    """The backlog of each kind that has one, for the pass line: "; backlog: snapshot 3 waiting
    (first eligible in 4 s), 1 stuck"."""
    parts = []
    for kind, b in report.backlogs.items():
        counts = [f"{b.count(state)} {state}" for state in ("waiting", "deferred", "stuck") if b.count(state)]
        if not counts:
            continue
        if b.next_eligible is not None:
            counts[0] += f" (first eligible in {max(0.0, (b.next_eligible - report.time).total_seconds()):.0f} s)"
        parts.append(f"{kind} {', '.join(counts)}")
    return f"; backlog: {'; '.join(parts)}" if parts else ""


class ProgressReporter(Reporter):
    """A progress bar on a terminal (tqdm), for ``--once`` removing many objects."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar: Any = None

    def pass_started(self, number: int, plan: Plan) -> None:
        self.close()
        if sys.stderr is None:  # pythonw, or detached: nowhere to draw
            return
        self.bar = self._tqdm(total=plan.action_count, desc=f"pass {number}", unit="obj", file=sys.stderr)

    def removed(self, kind: Kind, name: str, reason: str, outcome: Outcome) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def failed(self, kind: Kind, name: str, result: Result) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(f"could not remove {kind} {name}: {result.message}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(fmt: str) -> None:
    """Log lines to stderr, as text or JSON. Without a stderr (``pythonw``, a detached process)
    the handler put in place writes nowhere, but carries the formatter (a log file's handler
    takes it from there)."""
    handler: logging.Handler = logging.StreamHandler(sys.stderr) if sys.stderr is not None else logging.NullHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO


#: The log file (``--log-file``): rotated at this size, this many backups kept.
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5


class CopyTruncateFileHandler(logging.FileHandler):
    """A log file rotated without ever renaming it: at ``max_bytes`` its content is copied to
    ``NAME.1`` (older backups shifted to ``NAME.2`` ... ``NAME.<backup_count>``, the oldest
    dropped), then the live file is truncated in place; it stays open in append mode, so the
    next line goes at its new end.

    ``logging.handlers.RotatingFileHandler`` renames the live file instead, which on Windows
    fails while any reader holds it (``Get-Content -Wait``, a log shipper): each later record
    then retries, deletes a backup each time, and is lost. Here a rotation that fails leaves
    every file as it was (a backup is dropped only once its successor exists) and the record is
    written anyway; the failure is reported once (``handleError``, which needs no stderr), and
    tried again after the file has grown by another tenth of ``max_bytes``."""

    def __init__(
        self,
        filename: str | os.PathLike[str],
        *,
        max_bytes: int = LOG_FILE_MAX_BYTES,
        backup_count: int = LOG_FILE_BACKUPS,
        encoding: str = "utf-8",
    ) -> None:
        super().__init__(filename, mode="a", encoding=encoding)
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        #: After a failed rotation: the size the file must reach before the next try.
        self._retry_at = 0
        self._reported = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            size = self._size_with(record)
        except Exception:
            size = None
        if size is not None and size >= self.max_bytes and size >= self._retry_at and self.backup_count > 0:
            try:
                self.rotate()
            except Exception:
                self._retry_at = size + max(1, self.max_bytes // 10)
                if not self._reported:
                    self._reported = True
                    self.handleError(record)
            else:
                self._retry_at = 0
                self._reported = False
        super().emit(record)  # whatever became of the rotation

    def _size_with(self, record: logging.LogRecord) -> int | None:
        """The file's size once ``record`` is written; None when it is not a regular file."""
        if self.stream is None:
            self.stream = self._open()
        if not os.path.isfile(self.baseFilename):
            return None
        line = self.format(record) + self.terminator
        self.stream.seek(0, os.SEEK_END)
        return int(self.stream.tell()) + len(line.encode(self.encoding or "utf-8", "replace"))

    def backup(self, n: int) -> str:
        return f"{self.baseFilename}.{n}"

    def rotate(self) -> None:
        """Copy, shift, truncate; on any failure, what was done is undone and the error raised."""
        assert self.stream is not None
        self.stream.flush()
        fresh = f"{self.baseFilename}.rotating"
        with open(self.baseFilename, "rb") as src, open(fresh, "wb") as dst:
            shutil.copyfileobj(src, dst)
        done: list[tuple[str, str]] = []  # renames made, to undo on failure
        oldest = self.backup(self.backup_count)
        dropped = f"{oldest}.dropped"
        try:
            if os.path.lexists(oldest):
                if os.path.lexists(dropped):
                    os.unlink(dropped)  # a dropped backup a past rotation could not delete
                os.replace(oldest, dropped)
                done.append((oldest, dropped))
            for n in range(self.backup_count - 1, 0, -1):
                if os.path.lexists(self.backup(n)):
                    os.replace(self.backup(n), self.backup(n + 1))
                    done.append((self.backup(n), self.backup(n + 1)))
            os.replace(fresh, self.backup(1))
            done.append((fresh, self.backup(1)))
            self.stream.truncate(0)
            self.stream.seek(0, os.SEEK_END)
        except BaseException:
            for src_name, dst_name in reversed(done):
                with contextlib.suppress(OSError):
                    os.replace(dst_name, src_name)
            with contextlib.suppress(OSError):
                os.unlink(fresh)
            raise
        # Only now, its successor in place; still held open, it goes at a later rotation.
        with contextlib.suppress(OSError):
            os.unlink(dropped)
