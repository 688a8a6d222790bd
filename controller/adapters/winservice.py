"""The Windows service control manager's side of ``controller.service``, through pywin32.

Thin on purpose: the life of the service (start-pending with checkpoints, the boot pass,
running, stop-pending, stopped with a reason) is ``controller.service``, tested on Linux.
This module only turns its reports into ``SetServiceStatus`` calls and the manager's stop
and shutdown controls into its stop flag. Imported only on Windows, by ``reconcile service``.

Why pywin32's service framework rather than a wrapper (NSSM, WinSW): a wrapper reports
running as soon as it has started the program, so the manager would start the worker,
which depends on us, before the boot repair; and it stops the program with a console
event or by killing it. Here we report start-pending until the boot pass is over, and
report a failure with our own exit code (the worker then does not start) when the boot
pass must keep it down.

pywin32's ``ServiceFramework.SvcRun`` reports running before any work: replaced, so the
manager sees start-pending until the boot pass is over. No control is accepted while
start- or stop-pending (SetServiceStatus's documentation: "do not register to accept
controls while the status is SERVICE_START_PENDING"; ControlService then answers 1061,
ERROR_SERVICE_CANNOT_ACCEPT_CTRL); stop and shutdown are accepted once running. And pywin32's host reports
"stopped, exit 0" itself once ``SvcRun`` returns (``service_main`` in PythonService.cpp),
which would overwrite a failure we reported: after a failure the process ends at once, with
our code, so the failure (and the recovery actions it triggers) stands.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from controller.model.errors import UsageError
from controller.service import ReconcileService, ServiceManager, State, Status

#: Windows' ERROR_SERVICE_SPECIFIC_ERROR: "the service has returned a service-specific error
#: code", which ``sc query`` then shows beside ours (SERVICE_EXIT_CODE).
ERROR_SERVICE_SPECIFIC_ERROR = 1066
#: ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: the process was not started by the service manager.
ERROR_FAILED_SERVICE_CONTROLLER_CONNECT = 1063


def service_status(status: Status, win32service: Any) -> tuple[int, int, int, int, int, int, int]:
    """A SERVICE_STATUS tuple for ``SetServiceStatus``."""
    state = {
        State.START_PENDING: win32service.SERVICE_START_PENDING,
        State.RUNNING: win32service.SERVICE_RUNNING,
        State.STOP_PENDING: win32service.SERVICE_STOP_PENDING,
        State.STOPPED: win32service.SERVICE_STOPPED,
    }[status.state]
    accepted = 0
    if status.accepts_stop:
        accepted = win32service.SERVICE_ACCEPT_STOP | win32service.SERVICE_ACCEPT_SHUTDOWN
    failed = status.state is State.STOPPED and status.exit_code != 0
    return (
        win32service.SERVICE_WIN32_OWN_PROCESS,
        state,
        accepted,
        ERROR_SERVICE_SPECIFIC_ERROR if failed else 0,
        int(status.exit_code) if failed else 0,
        status.checkpoint,
        int(status.wait_hint * 1000),
    )


def end_process(code: int) -> None:
    logging.shutdown()  # the log file has the reason before the process goes
    os._exit(code)


class _Scm:
    """Our reports as SetServiceStatus calls, and the Event Log lines an admin reads first."""

    def __init__(self, name: str, handle: Any, win32service: Any, servicemanager: Any, win32serviceutil: Any) -> None:
        self.name, self.handle = name, handle
        self.win32service, self.servicemanager, self.win32serviceutil = win32service, servicemanager, win32serviceutil

    def report(self, status: Status) -> None:
        self.win32service.SetServiceStatus(self.handle, service_status(status, self.win32service))
        failed = status.state is State.STOPPED and status.exit_code != 0
        if failed or (status.state is State.RUNNING and status.degraded):
            # The Event Log is where an admin looks first for why a service stopped, or why
            # the worker runs without reconciliation.
            self.servicemanager.LogErrorMsg(f"{self.name}: {status.reason}")
        elif status.state is State.RUNNING:
            self.servicemanager.LogInfoMsg(f"{self.name}: {status.reason}")

    def start_service(self, service: str) -> None:
        self.win32serviceutil.StartService(service)


def host(
    name: str,
    make: Callable[[ServiceManager], ReconcileService],
    *,
    exit_process: Callable[[int], object] | None = None,
) -> int:
    """Run as the service ``name`` under the service control manager; returns its exit code
    (after a failure the process ends in ``exit_process`` instead: see the module's note)."""
    end = exit_process or end_process
    import pywintypes  # type: ignore[import-untyped,import-not-found,unused-ignore]
    import servicemanager  # type: ignore[import-untyped,import-not-found,unused-ignore]
    import win32service  # type: ignore[import-untyped,import-not-found,unused-ignore]
    import win32serviceutil  # type: ignore[import-untyped,import-not-found,unused-ignore]

    exit_code: list[int] = [0]

    class Service(win32serviceutil.ServiceFramework):  # type: ignore[misc,unused-ignore]
        _svc_name_ = name
        _svc_display_name_ = "obuilder-reconcile"
        _svc_description_ = "Repairs the OBuilder store before the worker starts, then keeps it in agreement"

        def __init__(self, args: Any) -> None:
            super().__init__(args)
            self.service = make(_Scm(name, self.ssh, win32service, servicemanager, win32serviceutil))

        def SvcStop(self) -> None:
            self.service.request_stop("service stop")

        def SvcShutdown(self) -> None:
            self.service.request_stop("system shutdown")

        def SvcInterrogate(self) -> None:
            # The framework's answers "running" whatever the state: tell the truth instead.
            self.service.manager.report(self.service.status)

        def SvcRun(self) -> None:
            exit_code[0] = int(self.service.run())
            if exit_code[0] != 0:
                end(exit_code[0])

    servicemanager.Initialize(name, None)
    servicemanager.PrepareToHostSingle(Service)
    try:
        servicemanager.StartServiceCtrlDispatcher()
    except pywintypes.error as e:
        if e.winerror == ERROR_FAILED_SERVICE_CONTROLLER_CONNECT:
            raise UsageError(
                "reconcile service was not started by the service manager: run it with --console to try it here, "
                "and register python.exe itself (not reconcile.exe or a venv's python.exe, launchers that start a "
                "second process the service manager cannot talk to): see examples/windows"
            ) from e
        raise
    return exit_code[0]
