"""Every exception the controller raises on purpose, in one flat module.

ctr and OS failures are wrapped in these with ``raise ... from`` so callers can
tell a condition the user can act on from a programming error. Each maps to one exit
code (``EXIT_RULES``, the contract a boot chain acts on); ``exit_code_for`` reads it.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class ReconcileError(Exception):
    """Base class of the controller's own errors."""


class UsageError(ReconcileError):
    """Raised when the command line or settings are inconsistent (exit 2)."""


class WorkerRunningError(UsageError):
    """Raised when ``--once`` finds a worker running, or cannot tell whether one runs (exit 9): boot
    semantics would be wrong."""


class PolicyError(ReconcileError):
    """Raised when a policy file does not parse or validate; the message names file, line, column and field."""


class StoreSanityError(ReconcileError):
    """Raised when the store root does not look like an OBuilder store (exit 2).

    An unmounted or mistyped root would make every snapshot look orphaned, so
    the controller refuses to act rather than guess.
    """


class StoreNotCreatedError(StoreSanityError):
    """Raised when the store does not exist yet: the root is missing (its parent exists) or holds
    no DB and no result, so OBuilder has built nothing there. OBuilder creates it at its first
    start; there is nothing to repair and nothing to judge against, so nothing is touched."""


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


class ContainerdUnreachableError(ReconcileError):
    """Raised when containerd did not answer within the wait (``--wait-for-containerd``)."""


class UnsafePathError(ReconcileError):
    """Raised when removing a path would leave the store (symlink, junction, `..`)."""


class ExitCode(IntEnum):
    """What ``reconcile`` exits with. A boot chain acts on these, so they never change meaning."""

    OK = 0
    NOT_CONVERGED = 1
    USAGE = 2
    DRIFT = 3
    STORE_NOT_CREATED = 4
    STORE_NOT_READY = 5
    LOCKED = 6
    CONTAINERD_UNREACHABLE = 7
    CTR_MISSING = 8
    WORKER_RUNNING = 9


class ExitRule(NamedTuple):
    # A NamedTuple, not a dataclass: `reconcile --help` builds its epilog from these, and
    # dataclasses costs `--version` and `--help` 15 ms of imports (inspect).
    code: ExitCode
    #: What it means, as the help and the README say it.
    meaning: str
    #: Whether a boot chain (the Windows service, the systemd boot unit) lets the worker start.
    start_worker: bool
    #: Why it starts or stays down: what a Windows admin reads beside the code.
    why: str
    #: The errors that exit with it (most specific first), none for codes a run's result gives.
    errors: tuple[type[ReconcileError], ...] = ()
    #: Its cause may go away by itself (a volume mounted late, another repair ending, containerd
    #: answering late): the service tries the boot pass again while start-pending first.
    retried: bool = False
    #: The worker starts but reconciliation cannot run as configured: said as an error (the Event
    #: Log, the status file), not a warning.
    degraded: bool = False


#: The one table: code, meaning, what a boot chain does, and the errors behind it.
#:
#: Derived from one rule: after any boot the worker ends running, unless starting it would do
#: harm that the README names. Our own failures (a policy we cannot read, a ctr we cannot run,
#: a bug, containerd late) cost reconciliation, never the worker: the worker starts and we say
#: loudly why reconciliation is not running. Only two outcomes name a harm: a store that is
#: not ready (a worker started on an unmounted or half-there store builds on the wrong disk)
#: and another repair holding the lock (it assumes the worker is down and would remove a live
#: build's snapshots under it). Both may clear by themselves, so the service tries again while
#: start-pending; if they persist the service stops as failed and the worker stays down; once a
#: later start (a recovery restart) reaches running, the service starts the worker itself.
EXIT_RULES: tuple[ExitRule, ...] = (
    ExitRule(ExitCode.OK, "converged (with --dry-run: nothing to do)", True, "the store is repaired"),
    ExitRule(
        ExitCode.NOT_CONVERGED,
        "did not converge: stuck objects and their reasons are printed (also: a ctr call or a store read "
        "failed during a pass)",
        True,
        "what was repaired stays repaired; the daemon keeps trying beside the worker",
        (CtrError, StoreReadError),
    ),
    ExitRule(
        ExitCode.USAGE,
        "usage or policy error (nothing was touched)",
        True,
        "our configuration is broken, which must not cost the worker: it runs without reconciliation, said as an "
        "error; fix the policy (reconcile check-policy FILE) or the flags",
        (UsageError, PolicyError),
        degraded=True,
    ),
    ExitRule(ExitCode.DRIFT, "--dry-run found drift", True, "a dry run changes nothing"),
    ExitRule(
        ExitCode.STORE_NOT_CREATED,
        "the store does not exist yet (root missing, or no DB and no result): nothing was touched",
        True,
        "OBuilder creates the store at its first start; there is nothing to repair",
        (StoreNotCreatedError,),
    ),
    ExitRule(
        ExitCode.STORE_NOT_READY,
        "the store is not ready: its volume is missing, or it lacks result/ or the DB, or the DB is not "
        "OBuilder's (nothing was touched)",
        False,
        "an unmounted or half-there store: a worker started on it could build on the wrong disk (tried again "
        "while start-pending, in case its volume is mounted late)",
        (StoreSanityError,),
        retried=True,
    ),
    ExitRule(
        ExitCode.LOCKED,
        "another reconcile holds the store's lock",
        False,
        "another repair is under way (a --once with the worker down): a worker started now would run beside it "
        "(tried again while start-pending, until that repair ends)",
        (LockedError,),
        retried=True,
    ),
    ExitRule(
        ExitCode.CONTAINERD_UNREACHABLE,
        "containerd did not answer within --wait-for-containerd",
        True,
        "tried again while start-pending; then the worker starts all the same (it needs containerd too, and "
        "nothing is lost) and the daemon waits for containerd beside it",
        (ContainerdUnreachableError,),
        retried=True,
        degraded=True,
    ),
    ExitRule(
        ExitCode.CTR_MISSING,
        "ctr is missing, not executable or not a program",
        True,
        "our configuration is broken, which must not cost the worker: it runs without reconciliation, said as an "
        "error; spec.containerd.ctr or --ctr names no program",
        (CtrNotFoundError,),
        degraded=True,
    ),
    ExitRule(
        ExitCode.WORKER_RUNNING,
        "--once found a worker running, or could not tell whether one runs (pass --force, or stop it)",
        True,
        "the worker is running already, or may be: the service skips the boot pass and runs as the daemon, "
        "which never assumes the worker is down",
        (WorkerRunningError,),
    ),
)

RULE_FOR: dict[ExitCode, ExitRule] = {r.code: r for r in EXIT_RULES}


def exit_code_for(error: ReconcileError) -> ExitCode:
    """The exit code of an error: the rule naming its most specific class."""
    for cls in type(error).__mro__:
        for rule in EXIT_RULES:
            if cls in rule.errors:
                return rule.code
    return ExitCode.NOT_CONVERGED
