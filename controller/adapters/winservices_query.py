"""Asks Windows' service control manager what state a service is in, through pywin32.

The one question ``controller.adapters.platform`` puts to the service manager when the policy
names the worker's service (``spec.worker.serviceName``): its answer is exact, where a process
listing only infers. ``platform`` decides what the answer means; this module only asks.
pywin32 is imported when asked (Windows only; the ``windows`` extra).

pywin32's ``win32service.QueryServiceStatusEx`` takes the service's handle alone (it passes
SC_STATUS_PROCESS_INFO, the only information level, itself) and returns the
SERVICE_STATUS_PROCESS structure as a dict (``CurrentState``, ``ProcessId``, ...); every failed
call raises ``pywintypes.error(winerror, funcname, strerror)``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: SERVICE_STATUS_PROCESS.dwCurrentState (winsvc.h).
SERVICE_STOPPED = 1
SERVICE_START_PENDING = 2
SERVICE_STOP_PENDING = 3
SERVICE_RUNNING = 4
SERVICE_CONTINUE_PENDING = 5
SERVICE_PAUSE_PENDING = 6
SERVICE_PAUSED = 7
STATE_NAMES = {
    SERVICE_STOPPED: "stopped",
    SERVICE_START_PENDING: "start-pending",
    SERVICE_STOP_PENDING: "stop-pending",
    SERVICE_RUNNING: "running",
    SERVICE_CONTINUE_PENDING: "continue-pending",
    SERVICE_PAUSE_PENDING: "pause-pending",
    SERVICE_PAUSED: "paused",
}
#: Every state but stopped: the worker's process may be there and running builds (one stopping
#: finishes or cancels them first; a paused one keeps them).
MAY_RUN_STATES = frozenset(STATE_NAMES) - {SERVICE_STOPPED}

ERROR_ACCESS_DENIED = 5
ERROR_SERVICE_DOES_NOT_EXIST = 1060


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    #: SERVICE_STATUS_PROCESS.dwCurrentState.
    state: int
    #: 0 when there is none (always so when stopped; perhaps stale while pending).
    process_id: int

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"in an unknown state ({self.state})")


class ServiceQueryError(Exception):
    """The service manager did not answer: pywin32 missing, the service missing, access denied..."""

    def __init__(self, message: str, winerror: int | None = None) -> None:
        super().__init__(message)
        self.winerror = winerror


def query_service(name: str) -> ServiceStatus:
    """The state of service ``name``; raises :class:`ServiceQueryError` when the manager cannot say."""
    try:
        import pywintypes  # type: ignore[import-untyped,import-not-found,unused-ignore]
        import win32service  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError as e:
        raise ServiceQueryError(f"pywin32 is not installed ({e}): pip install 'obuilder-reconcile[windows]'") from e
    try:
        manager = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_CONNECT)
        try:
            service = win32service.OpenService(manager, name, win32service.SERVICE_QUERY_STATUS)
            try:
                info = win32service.QueryServiceStatusEx(service)
            finally:
                win32service.CloseServiceHandle(service)
        finally:
            win32service.CloseServiceHandle(manager)
    except pywintypes.error as e:
        raise ServiceQueryError(_why(name, e), getattr(e, "winerror", None)) from e
    return ServiceStatus(name, int(info["CurrentState"]), int(info["ProcessId"]))


def _why(name: str, error: object) -> str:
    code = getattr(error, "winerror", None)
    call = getattr(error, "funcname", None) or "the service manager"
    text = (getattr(error, "strerror", None) or str(error)).strip().rstrip(".")
    if code == ERROR_SERVICE_DOES_NOT_EXIST:
        return (
            f"there is no service named {name!r} ({call}: ERROR_SERVICE_DOES_NOT_EXIST): "
            "spec.worker.serviceName must be the worker's service name, as `sc.exe query NAME` knows it"
        )
    if code == ERROR_ACCESS_DENIED:
        return f"{call} was refused (ERROR_ACCESS_DENIED): this account may not query service {name!r}"
    return f"{call} failed: {text} (Windows error {code})"
