"""A Windows service control manager in miniature, following Microsoft's documented contract.

What our service's life is tested against, so each rule here is the documentation's, not our
reading of what our code needs:

* SetServiceStatus (winsvc.h): "Do not register to accept controls while the status is
  SERVICE_START_PENDING or the service can crash"; dwCheckPoint "the service increments
  periodically to report its progress during a lengthy start, stop, pause, or continue
  operation"; dwWaitHint "if the amount of time specified by dwWaitHint passes, and
  dwCheckPoint has not been incremented or dwCurrentState has not changed, the service control
  manager or service control program can assume that an error has occurred".
  https://learn.microsoft.com/windows/win32/api/winsvc/nf-winsvc-setservicestatus
* ControlService (winsvc.h): ERROR_SERVICE_CANNOT_ACCEPT_CTRL (1061) "the requested control code
  cannot be sent to the service because the state of the service is SERVICE_STOPPED,
  SERVICE_START_PENDING, or SERVICE_STOP_PENDING"; ERROR_INVALID_SERVICE_CONTROL (1052) for a
  control the service does not accept; ERROR_SERVICE_NOT_ACTIVE (1062) for a stopped service.
  https://learn.microsoft.com/windows/win32/api/winsvc/nf-winsvc-controlservice
* StartService (winsvc.h) and "Service Startup": the manager starts a service's dependencies
  first and starts the service only once they run; when one fails to start, StartService fails
  with ERROR_SERVICE_DEPENDENCY_FAIL (1068) and the dependent is not started. A running
  service: ERROR_SERVICE_ALREADY_RUNNING (1056).
  https://learn.microsoft.com/windows/win32/api/winsvc/nf-winsvc-startservicew,
  https://learn.microsoft.com/windows/win32/services/service-startup
* SERVICE_FAILURE_ACTIONS_FLAG: with fFailureActionsOnNonCrashFailures set, the failure
  actions run "if it enters the SERVICE_STOPPED state but the dwWin32ExitCode member of the
  SERVICE_STATUS structure is not ERROR_SUCCESS"; a restart action restarts that service only
  (its dependents are not restarted: nobody starts a dependent whose start failed).
  https://learn.microsoft.com/windows/win32/api/winsvc/ns-winsvc-service_failure_actions_flag

Only what our service touches is here: own-process services, start, stop, dependencies,
checkpoints and wait hints, restart-on-failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.model.errors import ExitCode
from controller.service import State, Status

ERROR_SERVICE_ALREADY_RUNNING = 1056
ERROR_INVALID_SERVICE_CONTROL = 1052
ERROR_SERVICE_CANNOT_ACCEPT_CTRL = 1061
ERROR_SERVICE_NOT_ACTIVE = 1062
ERROR_SERVICE_DEPENDENCY_FAIL = 1068
ERROR_SERVICE_SPECIFIC_ERROR = 1066


@dataclass
class Service:
    name: str
    #: The service's main, given its handle; None: a plain service that runs until stopped.
    main: Callable[[Handle], None] | None
    depends_on: tuple[str, ...] = ()
    #: Restart actions left (restart-on-failure, non-crash failures included).
    restarts: int = 0
    restart_delay: float = 0.05
    status: Status = field(default_factory=lambda: Status(State.STOPPED))
    #: The last StartService's error for it (0: started).
    start_error: int = 0
    starts: int = 0
    thread: threading.Thread | None = None
    stop_flag: threading.Event = field(default_factory=threading.Event)
    #: Set while the service runs, to its stop request (what SvcStop calls).
    on_stop: Callable[[], None] | None = None


class Handle:
    """What a service holds: its status reports (SetServiceStatus) and the manager's API."""

    def __init__(self, scm: FakeScm, service: Service) -> None:
        self.scm, self.service = scm, service

    def report(self, status: Status) -> None:
        self.scm._report(self.service, status)

    def start_service(self, name: str) -> None:
        error = self.scm.start(name)
        if error:
            raise OSError(f"StartService({name}) failed: {error}")


class FakeScm:
    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        #: Contract breaches and what the manager would log: (service, what).
        self.events: list[tuple[str, str]] = []
        self._progress: dict[str, float] = {}

    def install(
        self,
        name: str,
        main: Callable[[Handle], None] | None = None,
        *,
        depends_on: tuple[str, ...] = (),
        restarts: int = 0,
    ) -> Service:
        service = Service(name, main, depends_on, restarts)
        self.services[name] = service
        return service

    def state(self, name: str) -> State:
        return self.services[name].status.state

    # -- StartService ----------------------------------------------------------------------

    def start(self, name: str, *, timeout: float = 60) -> int:
        """StartService: dependencies first; the service only once every one runs."""
        service = self.services[name]
        with self.lock:
            if service.status.state is not State.STOPPED:
                return ERROR_SERVICE_ALREADY_RUNNING
        for dep in service.depends_on:
            if self.state(dep) is State.STOPPED:
                self.start(dep, timeout=timeout)
            if not self._wait_settled(dep, timeout) or self.state(dep) is not State.RUNNING:
                with self.lock:
                    service.start_error = ERROR_SERVICE_DEPENDENCY_FAIL
                    self.events.append((name, f"start failed: {ERROR_SERVICE_DEPENDENCY_FAIL} ({dep} did not start)"))
                return ERROR_SERVICE_DEPENDENCY_FAIL
        with self.lock:
            service.start_error = 0
            service.starts += 1
            service.stop_flag = threading.Event()
            service.status = Status(State.START_PENDING, checkpoint=0, wait_hint=30.0)
            self._progress[name] = time.monotonic()
            self.changed.notify_all()
        service.thread = threading.Thread(target=self._run, args=(service,), name=f"service {name}", daemon=True)
        service.thread.start()
        return 0

    def _run(self, service: Service) -> None:
        if service.main is None:
            self._report(service, Status(State.RUNNING))
            service.on_stop = service.stop_flag.set
            service.stop_flag.wait()
            self._report(service, Status(State.STOPPED))
            return
        try:
            service.main(Handle(self, service))
        finally:
            with self.lock:
                if service.status.state is not State.STOPPED:
                    # The process ended without reporting stopped: a crash, for the failure actions.
                    self.events.append((service.name, "process ended without reporting stopped"))
                    self._stopped(service, Status(State.STOPPED, exit_code=ExitCode.NOT_CONVERGED))

    # -- SetServiceStatus ------------------------------------------------------------------

    def _report(self, service: Service, status: Status) -> None:
        with self.lock:
            before = service.status
            pending = (State.START_PENDING, State.STOP_PENDING)
            if status.state in pending and status.accepts_stop:
                self.events.append((service.name, "accepts stop while pending (contract: it can crash)"))
            same = status.state is before.state and status.state in pending
            if same and status.checkpoint <= before.checkpoint:
                self.events.append((service.name, "pending without a new checkpoint"))
            self._check_hang(service)
            self._progress[service.name] = time.monotonic()
            if status.state is State.STOPPED:
                self._stopped(service, status)
            else:
                service.status = status
            self.changed.notify_all()

    def _check_hang(self, service: Service) -> None:
        status = service.status
        if status.state in (State.START_PENDING, State.STOP_PENDING) and status.wait_hint:
            waited = time.monotonic() - self._progress.get(service.name, time.monotonic())
            if waited > status.wait_hint:
                self.events.append((service.name, f"no progress for {waited:.1f} s past its wait hint"))

    def _stopped(self, service: Service, status: Status) -> None:
        service.status = status
        self.changed.notify_all()
        if status.exit_code != 0 and service.restarts > 0:
            service.restarts -= 1
            threading.Timer(service.restart_delay, self.start, args=(service.name,)).start()

    # -- ControlService ----------------------------------------------------------------------

    def stop(self, name: str) -> int:
        """ControlService(SERVICE_CONTROL_STOP)."""
        service = self.services[name]
        with self.lock:
            status = service.status
            if status.state is State.STOPPED:
                return ERROR_SERVICE_NOT_ACTIVE
            if status.state in (State.START_PENDING, State.STOP_PENDING):
                return ERROR_SERVICE_CANNOT_ACCEPT_CTRL
            if not status.accepts_stop or service.on_stop is None:
                return ERROR_INVALID_SERVICE_CONTROL
            on_stop = service.on_stop
        on_stop()
        return 0

    # -- waiting, as sc.exe and the tests do ---------------------------------------------------

    def _wait_settled(self, name: str, timeout: float) -> bool:
        """Until the service runs or has stopped, watching its checkpoints as the manager does."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.state(name) in (State.START_PENDING, State.STOP_PENDING):
                self._check_hang(self.services[name])
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.1))
        return True

    def wait_for(self, name: str, states: tuple[State, ...], timeout: float = 30) -> State:
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.state(name) not in states:
                left = deadline - time.monotonic()
                assert left > 0, f"{name} is {self.state(name)}, not {states}: {self.events}"
                self.changed.wait(min(left, 0.1))
            return self.state(name)

    def quiet(self, seconds: float = 0.3) -> None:
        """Until nothing has changed for ``seconds`` (restarts scheduled, dependents started)."""
        with self.changed:
            while self.changed.wait(seconds):
                pass
