"""Reporters: hooks the core calls, so it never logs, draws or measures by itself.

The base does nothing; logs, the progress bar, metrics and the status file each
subclass it, and :class:`Reporters` fans one call out to several.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from controller.model.plan import ObjectKind, Plan

if TYPE_CHECKING:
    from controller.adapters.ctr import Outcome, Result
    from controller.adapters.status import PassStatus

log = logging.getLogger("reconcile")


class Reporter:
    """Hooks with do-nothing bodies."""

    def pass_started(self, number: int, plan: Plan) -> None:
        """A pass has planned and is about to act."""

    def removed(self, kind: ObjectKind, name: str, reason: str, outcome: Outcome) -> None:
        """One object is gone (``outcome`` is REMOVED or NOT_FOUND)."""

    def failed(self, kind: ObjectKind, name: str, result: Result) -> None:
        """One removal did not happen; the next pass will look again."""

    def pass_finished(self, status: PassStatus) -> None:
        """A pass is over, successful or not; ``status`` says how it went."""


class Reporters(Reporter):
    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def pass_started(self, number: int, plan: Plan) -> None:
        for r in self.reporters:
            r.pass_started(number, plan)

    def removed(self, kind: ObjectKind, name: str, reason: str, outcome: Outcome) -> None:
        for r in self.reporters:
            r.removed(kind, name, reason, outcome)

    def failed(self, kind: ObjectKind, name: str, result: Result) -> None:
        for r in self.reporters:
            r.failed(kind, name, result)

    def pass_finished(self, status: PassStatus) -> None:
        for r in self.reporters:
            r.pass_finished(status)


class LogReporter(Reporter):
    """Every removal and failure as a log line, with its kind, name and reason as fields."""

    def removed(self, kind: ObjectKind, name: str, reason: str, outcome: Outcome) -> None:
        gone = "" if outcome.value == "removed" else " (already gone)"
        log.info(
            "removed %s %s%s: %s", kind, name, gone, reason, extra={"kind": kind, "object": name, "reason": reason}
        )

    def failed(self, kind: ObjectKind, name: str, result: Result) -> None:
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


class ProgressReporter(Reporter):
    """A progress bar on a terminal (tqdm), for ``--once`` removing many objects."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar: Any = None

    def pass_started(self, number: int, plan: Plan) -> None:
        self.close()
        self.bar = self._tqdm(total=plan.action_count, desc=f"pass {number}", unit="obj", file=sys.stderr)

    def removed(self, kind: ObjectKind, name: str, reason: str, outcome: Outcome) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def failed(self, kind: ObjectKind, name: str, result: Result) -> None:
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
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every change at INFO
