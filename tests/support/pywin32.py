"""Fake pywin32 modules (``win32service``, ``win32serviceutil``, ``servicemanager``, ``pywintypes``),
for the Windows adapters on Linux: the service host (``controller.adapters.winservice``) and the
service-state query (``controller.adapters.winservices_query``).

They follow the documented contract, not our code's reading of it:

- Microsoft's "QueryServiceStatusEx function (winsvc.h)": the service handle must have the
  SERVICE_QUERY_STATUS access right (else ERROR_ACCESS_DENIED); the process id is valid while the
  service runs, may be stale while it is start- or stop-pending, and is never valid when stopped.
  Its "OpenServiceW function (winsvc.h)": no privilege is needed but SC_MANAGER_CONNECT on the
  manager's handle; it fails with ERROR_SERVICE_DOES_NOT_EXIST (1060) for a name no service has,
  ERROR_INVALID_NAME for one with a slash or backslash, ERROR_ACCESS_DENIED when the handle has no
  access to the service; names compare case-insensitively.
- Microsoft's "SERVICE_STATUS_PROCESS structure (winsvc.h)": nine DWORDs, dwServiceType,
  dwCurrentState (SERVICE_STOPPED 1 ... SERVICE_PAUSED 7), dwControlsAccepted, dwWin32ExitCode,
  dwServiceSpecificExitCode, dwCheckPoint, dwWaitHint, dwProcessId, dwServiceFlags.
- pywin32's win32service module (win32/src/win32service.i, ``MyQueryServiceStatusEx``, exported as
  ``QueryServiceStatusEx``): it parses its arguments with ``"O:QueryServiceStatusEx"``, so it takes
  the service handle alone (it passes SC_STATUS_PROCESS_INFO, the only level, itself; a second
  argument is a TypeError), and returns the structure as a dict keyed ServiceType, CurrentState,
  ControlsAccepted, Win32ExitCode, ServiceSpecificExitCode, CheckPoint, WaitHint, ProcessId,
  ServiceFlags. A failed call, there and in OpenSCManager and OpenService (``PyWin_SetAPIError``),
  raises ``pywintypes.error(winerror, funcname, strerror)``, whose three values are also its
  ``winerror``, ``funcname`` and ``strerror`` attributes. ``CloseServiceHandle`` closes a handle;
  a closed handle is invalid (ERROR_INVALID_HANDLE).
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import types
from collections.abc import Collection, Mapping

import pytest

SERVICE_STOPPED, SERVICE_START_PENDING, SERVICE_STOP_PENDING, SERVICE_RUNNING = 1, 2, 3, 4
SERVICE_CONTINUE_PENDING, SERVICE_PAUSE_PENDING, SERVICE_PAUSED = 5, 6, 7
SERVICE_ACCEPT_STOP, SERVICE_ACCEPT_PAUSE_CONTINUE, SERVICE_ACCEPT_SHUTDOWN = 1, 2, 4
SERVICE_WIN32_OWN_PROCESS = 0x10
SC_MANAGER_CONNECT, SC_MANAGER_ENUMERATE_SERVICE = 0x1, 0x4
SERVICE_QUERY_CONFIG, SERVICE_QUERY_STATUS = 0x1, 0x4
SC_STATUS_PROCESS_INFO = 0

ERROR_ACCESS_DENIED = 5
ERROR_INVALID_HANDLE = 6
ERROR_INVALID_NAME = 123
ERROR_SERVICE_DOES_NOT_EXIST = 1060
ERROR_FAILED_SERVICE_CONTROLLER_CONNECT = 1063
#: What FormatMessage says for each (pywin32 puts it in strerror).
MESSAGES = {
    ERROR_ACCESS_DENIED: "Access is denied.",
    ERROR_INVALID_HANDLE: "The handle is invalid.",
    ERROR_INVALID_NAME: "The filename, directory name, or volume label syntax is incorrect.",
    ERROR_SERVICE_DOES_NOT_EXIST: "The specified service does not exist as an installed service.",
    ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: "The service process could not connect to the service controller.",
}


class error(Exception):
    """``pywintypes.error``: raised as ``error(winerror, funcname, strerror)``."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        winerror, funcname, strerror = (*args, None, None, None)[:3]
        self.winerror = winerror
        self.funcname = funcname
        self.strerror = strerror


def api_error(code: int, funcname: str) -> error:
    return error(code, funcname, MESSAGES.get(code, f"error {code}"))


class ScHandle:
    """A PySC_HANDLE: a service manager or service handle and the access it was opened with."""

    def __init__(self, number: int, access: int, service: str | None) -> None:
        self.number, self.access, self.service = number, access, service
        self.closed = False


class FakeServiceManager:
    """The service control manager's database, as win32service shows it.

    ``services``: each service's state (SERVICE_STOPPED ... SERVICE_PAUSED, or another number to
    see what an unknown one does). ``deny``: the calls that fail with ERROR_ACCESS_DENIED (an
    account that may not connect, or may not query that service)."""

    def __init__(self, services: Mapping[str, int] | None = None, *, deny: Collection[str] = ()) -> None:
        self.services = dict(services or {})
        self.deny = set(deny)
        self.opened: list[ScHandle] = []
        self.calls: list[str] = []
        self._numbers = itertools.count(0x1000, 8)

    @property
    def open_handles(self) -> list[ScHandle]:
        return [h for h in self.opened if not h.closed]

    def _open(self, access: int, service: str | None) -> ScHandle:
        handle = ScHandle(next(self._numbers), access, service)
        self.opened.append(handle)
        return handle

    def _valid(self, handle: object, funcname: str) -> ScHandle:
        if not isinstance(handle, ScHandle) or handle.closed:
            raise api_error(ERROR_INVALID_HANDLE, funcname)
        return handle

    # -- win32service's functions ------------------------------------------------------------

    def OpenSCManager(self, machineName: str | None, dbName: str | None, desiredAccess: int) -> ScHandle:
        self.calls.append("OpenSCManager")
        if "OpenSCManager" in self.deny:
            raise api_error(ERROR_ACCESS_DENIED, "OpenSCManager")
        return self._open(desiredAccess, None)

    def OpenService(self, scHandle: object, name: str, desiredAccess: int) -> ScHandle:
        self.calls.append("OpenService")
        manager = self._valid(scHandle, "OpenService")
        if manager.service is not None or not manager.access & SC_MANAGER_CONNECT:
            raise api_error(ERROR_ACCESS_DENIED, "OpenService")
        if "/" in name or "\\" in name:
            raise api_error(ERROR_INVALID_NAME, "OpenService")
        # Service names are case-insensitive.
        known = {n.lower(): n for n in self.services}
        if name.lower() not in known:
            raise api_error(ERROR_SERVICE_DOES_NOT_EXIST, "OpenService")
        if "OpenService" in self.deny:
            raise api_error(ERROR_ACCESS_DENIED, "OpenService")
        return self._open(desiredAccess, known[name.lower()])

    def QueryServiceStatusEx(self, *args: object) -> dict[str, int]:
        self.calls.append("QueryServiceStatusEx")
        if len(args) != 1:
            raise TypeError(f"QueryServiceStatusEx() takes exactly one argument ({len(args)} given)")
        handle = self._valid(args[0], "QueryServiceStatusEx")
        if handle.service is None or not handle.access & SERVICE_QUERY_STATUS:
            raise api_error(ERROR_ACCESS_DENIED, "QueryServiceStatusEx")
        state = self.services[handle.service]
        running = state not in (SERVICE_STOPPED, SERVICE_START_PENDING)
        pending = state in {SERVICE_START_PENDING, SERVICE_STOP_PENDING, SERVICE_CONTINUE_PENDING,
                            SERVICE_PAUSE_PENDING}  # fmt: skip
        return {
            "ServiceType": SERVICE_WIN32_OWN_PROCESS,
            "CurrentState": state,
            "ControlsAccepted": SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN if running else 0,
            "Win32ExitCode": 0,
            "ServiceSpecificExitCode": 0,
            "CheckPoint": 1 if pending else 0,
            "WaitHint": 30_000 if pending else 0,
            # Never valid when stopped; start-pending may not have a process yet.
            "ProcessId": 0 if state in (SERVICE_STOPPED, SERVICE_START_PENDING) else 4242,
            "ServiceFlags": 0,
        }

    def CloseServiceHandle(self, scHandle: object) -> None:
        self.calls.append("CloseServiceHandle")
        self._valid(scHandle, "CloseServiceHandle").closed = True


def _constants(module: types.ModuleType) -> None:
    for name, value in globals().items():
        if name.startswith(("SERVICE_", "SC_")) and isinstance(value, int):
            setattr(module, name, value)


def install_service_manager(monkeypatch: pytest.MonkeyPatch, manager: FakeServiceManager) -> None:
    """``win32service`` and ``pywintypes`` as the service-state query imports them."""
    win32service = types.ModuleType("win32service")
    _constants(win32service)
    for name in ("OpenSCManager", "OpenService", "QueryServiceStatusEx", "CloseServiceHandle"):
        setattr(win32service, name, getattr(manager, name))
    win32service.error = error  # type: ignore[attr-defined]  # pywin32 exports it there too
    pywintypes = types.ModuleType("pywintypes")
    pywintypes.error = error  # type: ignore[attr-defined]
    for module in (win32service, pywintypes):
        monkeypatch.setitem(sys.modules, module.__name__, module)


class FakeWin32:
    """Just enough of pywin32 for controller.adapters.winservice's service host, recording what it is
    told: the statuses it sets, the Event Log messages it writes."""

    SERVICE_STOPPED, SERVICE_START_PENDING, SERVICE_STOP_PENDING, SERVICE_RUNNING = 1, 2, 3, 4
    SERVICE_ACCEPT_STOP, SERVICE_ACCEPT_SHUTDOWN = 1, 4
    SERVICE_WIN32_OWN_PROCESS = 0x10

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, not_a_service: bool = False) -> None:
        self.statuses: list[tuple[int, ...]] = []
        self.events: list[tuple[str, str]] = []
        self.prepared: type | None = None
        fake = self

        class ServiceFramework:
            def __init__(self, args: list[str]) -> None:
                self.ssh = ("handle", args[0])

        win32service = types.ModuleType("win32service")
        _constants(win32service)
        win32service.SetServiceStatus = lambda handle, status: fake.statuses.append(status)  # type: ignore[attr-defined]
        win32serviceutil = types.ModuleType("win32serviceutil")
        win32serviceutil.ServiceFramework = ServiceFramework  # type: ignore[attr-defined]
        pywintypes = types.ModuleType("pywintypes")
        pywintypes.error = error  # type: ignore[attr-defined]
        servicemanager = types.ModuleType("servicemanager")
        servicemanager.Initialize = lambda name, messages: None  # type: ignore[attr-defined]
        servicemanager.LogErrorMsg = lambda m: fake.events.append(("error", m))  # type: ignore[attr-defined]
        servicemanager.LogInfoMsg = lambda m: fake.events.append(("info", m))  # type: ignore[attr-defined]

        def prepare(cls: type) -> None:
            fake.prepared = cls

        def dispatch() -> None:
            # What the service control manager does: make the service, run it, stop it once running.
            if not_a_service:
                raise api_error(ERROR_FAILED_SERVICE_CONTROLLER_CONNECT, "StartServiceCtrlDispatcher")
            assert fake.prepared is not None
            svc = fake.prepared(["obuilder-reconcile"])
            runner = threading.Thread(target=svc.SvcRun)
            runner.start()
            deadline = time.monotonic() + 10
            while runner.is_alive() and time.monotonic() < deadline:
                svc.SvcInterrogate()
                if fake.statuses[-1][1] == SERVICE_RUNNING:
                    svc.SvcStop()
                time.sleep(0.02)
            runner.join(10)

        servicemanager.PrepareToHostSingle = prepare  # type: ignore[attr-defined]
        servicemanager.StartServiceCtrlDispatcher = dispatch  # type: ignore[attr-defined]
        for module in (win32service, win32serviceutil, pywintypes, servicemanager):
            monkeypatch.setitem(sys.modules, module.__name__, module)
