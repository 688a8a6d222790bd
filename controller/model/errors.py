"""Every exception the controller raises on purpose, in one flat module.

ctr and OS failures are wrapped in these with ``raise ... from`` so callers can
tell a condition the user can act on from a programming error.
"""

from __future__ import annotations


class ReconcileError(Exception):
    """Base class of the controller's own errors."""


class UsageError(ReconcileError):
    """Raised when the command line or settings are inconsistent (exit 2)."""


class WorkerRunningError(UsageError):
    """Raised when ``--once`` finds a worker process running (exit 2): boot semantics would be wrong."""


class PolicyError(ReconcileError):
    """Raised when a policy file does not parse or validate; the message names file, line, column and field."""


class StoreSanityError(ReconcileError):
    """Raised when the store root does not look like an OBuilder store (exit 2).

    An unmounted or mistyped root would make every snapshot look orphaned, so
    the controller refuses to act rather than guess.
    """


class StoreReadError(ReconcileError):
    """Raised when the store cannot be read (DB locked past the busy timeout, I/O error)."""


class LayerinfoError(ReconcileError):
    """Raised when a layerinfo file does not parse; carries its path, line and column."""

    def __init__(self, path: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{path}:{line}:{column}: {message}")
        self.path = path
        self.line = line
        self.column = column
        self.message = message


class LockedError(ReconcileError):
    """Raised when another reconcile already holds the store's lock."""


class CtrError(ReconcileError):
    """Raised when a ctr call fails in a way no action can classify."""

    def __init__(self, args: list[str], returncode: int | None, stderr: str) -> None:
        shown = " ".join(args)
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "(no message)"
        super().__init__(f"{shown}: exit {returncode}: {detail}")
        self.argv = args
        self.returncode = returncode
        self.stderr = stderr


class CtrTimeoutError(CtrError):
    """Raised when a ctr call runs past its timeout; the process is killed."""


class CtrNotFoundError(ReconcileError):
    """Raised when the ctr executable itself cannot be started."""


class UnsafePathError(ReconcileError):
    """Raised when removing a path would leave the store (symlink, junction, `..`)."""
