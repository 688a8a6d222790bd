"""What ``reconcile check`` finds, and what the opt-in repairs would do: purely data.

``controller.core.check`` builds these from the observations; ``controller.commands``
prints them (text or JSON) and ``controller.adapters.db_repair`` carries a
:class:`RepairPlan` out.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from controller.model.plan import Mode
from controller.model.policy import RepairClass

__all__ = [
    "BY_RECONCILE",
    "NO_REPAIR",
    "CheckReport",
    "Finding",
    "FindingClass",
    "RepairClass",
    "RepairPlan",
    "RowDelete",
    "Severity",
]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Severity(StrEnum):
    #: OBuilder fails builds because of it.
    ERROR = "error"
    #: OBuilder goes on, but leaks space or never prunes something.
    WARNING = "warning"
    #: Leftovers the reconciler (or OBuilder's start-up) removes anyway.
    INFO = "info"


class FindingClass(StrEnum):
    RESULT_MISSING_SNAPSHOT = "result-missing-snapshot"
    ROW_WITHOUT_RESULT = "row-without-result"
    RESULT_WITHOUT_ROW = "result-without-row"
    RC_MISMATCH = "rc-mismatch"
    ORPHAN_SNAPSHOT = "orphan-snapshot"
    LEFTOVER_CONTAINER = "leftover-container"
    STALE_RESULT_TMP = "stale-result-tmp"
    CACHE_TMP_LEFTOVER = "cache-tmp-leftover"


#: What a finding's ``repair`` says when the ordinary ``reconcile --once`` removes it.
BY_RECONCILE = "reconcile --once"
NO_REPAIR = "none"


class Finding(_Record):
    """One inconsistency, with what OBuilder does with it and what repairs it."""

    #: ``class`` in JSON.
    cls: FindingClass = Field(serialization_alias="class")
    #: ``result/ID``, ``row ID``, a snapshot key, a container id, ``cache-tmp/NAME``.
    object: str
    evidence: str
    #: What OBuilder does with it, citing its function.
    obuilder: str
    severity: Severity
    #: A repair class name, ``reconcile --once``, or ``none``.
    repair: str
    #: What that repair would do to this object.
    repair_action: str = ""


class RowDelete(_Record):
    """One row deleted as OBuilder's ``Dao.delete`` does: the row, then its parent's rc lowered."""

    id: str
    parent: str | None = None
    why: RepairClass


class RepairPlan(_Record):
    """What the chosen repairs do, in order: directories first (dependents before what they depend
    on, as ``Db_store.delete`` does), then, in one transaction, the row deletions and the recount."""

    classes: tuple[RepairClass, ...] = ()
    #: ``result/ID`` directories to remove, in order.
    remove_results: tuple[str, ...] = ()
    rows: tuple[RowDelete, ...] = ()
    #: Recount every rc from the rows (``rc`` repair): the changes it makes, ``id -> (old, new)``.
    recount: bool = False
    rc_changes: dict[str, tuple[int | None, int]] = {}

    @property
    def empty(self) -> bool:
        return not (self.remove_results or self.rows or self.rc_changes)

    @property
    def touches_db(self) -> bool:
        return bool(self.rows or self.rc_changes)


class CheckReport(_Record):
    mode: Mode
    findings: tuple[Finding, ...] = ()
    #: Why the look was taken with these semantics (worker up or down).
    note: str = ""

    @property
    def clean(self) -> bool:
        return not self.findings
