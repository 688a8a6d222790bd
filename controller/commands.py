"""What ``reconcile`` does once its flags are parsed: wire the adapters into the core and run.

``--once`` runs passes to convergence (``controller.core.passes.run_once``), the daemon
runs the loop (``controller.daemon``), ``--explain`` takes one look and says why, and
``reconcile service`` runs both under the service state machine (``controller.service``).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from controller import applying
from controller.adapters import platform, sandbox_leaks
from controller.adapters.ctr import Ctr
from controller.adapters.db_repair import apply_repairs
from controller.adapters.lock import StoreLock
from controller.adapters.logs import CopyTruncateFileHandler, LogReporter, ProgressReporter, configure_logging
from controller.adapters.status import StatusFile, write_status
from controller.adapters.store import DB_PATH, check_store
from controller.config.invocation import Invocation
from controller.config.settings import Overrides, Settings, resolve
from controller.core.check import check as classify
from controller.core.check import describe, implausible_poisoning, parse_repair_classes, plan_repairs
from controller.core.passes import PassOptions, one_pass, run_once
from controller.core.ports import Ports, Reporter, Reporters
from controller.model.check import CheckReport, RepairClass, RepairPlan, Severity
from controller.model.errors import (
    ContainerdUnreachableError,
    CtrError,
    ExitCode,
    StoreNotCreatedError,
    StoreSanityError,
    UsageError,
    WorkerRunningError,
)
from controller.model.plan import Mode, Plan, PlanOptions
from controller.model.policy import parse_duration
from controller.model.records import History
from controller.report import render_explain, render_plan, render_summary, to_json
from controller.service import ReconcileService, ServiceManager, State, Status, StopRequested


def resolve_settings(args: Invocation, env: Mapping[str, str]) -> Settings:
    wait = None
    if args.wait_for_containerd is not None:
        try:
            wait = parse_duration(args.wait_for_containerd)
        except ValueError as e:
            raise UsageError(f"--wait-for-containerd: {e}") from e
    overrides = Overrides(
        wait_for_containerd=wait,
        store=args.store,
        address=args.address,
        namespace=args.namespace,
        snapshotter=args.snapshotter,
        ctr=args.ctr,
        max_passes=args.max_passes,
        metrics_address=args.metrics_address,
        status_file=args.status_file,
    )
    return resolve(overrides, args.policy, env)


_installed: tuple[tuple[str, str | None], logging.Handler] | None = None


def start_logging(args: Invocation) -> None:
    """Log as the flags say. Asked again with the same flags while our handler is in place, it
    changes nothing: a second handler on the log file would hold it open twice, which on Windows
    stops its rotation."""
    global _installed
    wanted = (args.log_format, args.log_file)
    root = logging.getLogger()
    if _installed is not None:
        if _installed[0] == wanted and _installed[1] in root.handlers:
            return
        _installed[1].close()
    configure_logging(args.log_format)
    if wanted[1]:
        # UTF-8 whatever the console's code page; rotated so a daemon that runs for months
        # does not fill the disk it is there to keep free, never by renaming the live file
        # (on Windows any reader holding it would make every rotation fail).
        path = Path(wanted[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = CopyTruncateFileHandler(path)
        handler.setFormatter(root.handlers[0].formatter)
        root.handlers[:] = [handler]
    _installed = (wanted, root.handlers[0])


def check_store_ready(root: Path) -> None:
    """Refuse to act on a store that is not there, saying whether it is new or not ready.

    New (:class:`StoreNotCreatedError`): the root is missing while its parent exists, or it holds
    neither the DB nor any result, so OBuilder has built nothing there yet and creates the store at
    its first start. Not ready (:class:`StoreSanityError`): the root's own parent is missing (a
    volume not mounted), or the store is half there, or its DB is not OBuilder's.
    """
    if not root.exists():
        if root.parent.is_dir():
            raise StoreNotCreatedError(
                f"{root} does not exist yet: OBuilder creates its store there at its first start; nothing to repair"
            )
        raise StoreSanityError(f"{root} does not exist, nor does {root.parent}: is its volume mounted? Refusing to act")
    result = root / "result"
    if root.is_dir() and not root.joinpath(*DB_PATH).exists() and not (result.is_dir() and any(result.iterdir())):
        raise StoreNotCreatedError(
            f"{root} holds no OBuilder DB and no result yet: OBuilder creates its store at its first start; "
            "nothing to repair"
        )
    check_store(root, read_the_db=True)


def wait_for_containerd(settings: Settings, seconds: float, *, sleep: Callable[[float], None] = time.sleep) -> None:
    logging.getLogger("reconcile").info("waiting up to %gs for containerd at %s", seconds, settings.ctr.address)
    try:
        Ctr(settings.ctr).wait_until_up(seconds, sleep=sleep)
    except CtrError as e:
        raise ContainerdUnreachableError(f"containerd at {settings.ctr.address}: {e}") from e


def no_worker_running(settings: Settings) -> None:
    """Refuse boot semantics unless the worker is clearly not running: "cannot tell" (a process
    listing that failed or came back empty, a service manager that did not answer) is a yes.

    Asked before every pass, not only the first: a worker that starts meanwhile makes boot
    semantics wrong (its containers and result-tmp/ entries are live)."""
    sighting = platform.find_worker(settings.worker_names, settings.worker_service)
    if sighting.answer is platform.WorkerAnswer.RUNNING:
        raise WorkerRunningError(
            f"a worker appears to be running ({sighting.detail}): --once assumes every "
            "obuilder-run-* container and result-tmp/ entry is dead; stop the worker or pass --force"
        )
    if sighting.answer is platform.WorkerAnswer.CANNOT_TELL:
        raise WorkerRunningError(
            f"cannot tell whether the worker runs: {sighting.detail}; --once assumes every obuilder-run-* "
            "container and result-tmp/ entry is dead, so it touches nothing while the worker may be running; "
            "pass --force if you know it is stopped"
        )


def run(args: Invocation, env: Mapping[str, str]) -> int:
    """``reconcile [flags]``."""
    if args.plan_out and not (args.once and args.dry_run):
        raise UsageError("--plan-out goes with --once --dry-run: it writes the plan a dry run shows")
    repair = args.repair
    settings = resolve_settings(args, env)
    check_store_ready(settings.store)
    mode = Mode.BOOT if args.once else Mode.DAEMON
    options = settings.plan_options(mode)
    classes = repair_classes(settings, repair)

    wait = settings.wait_for_containerd.total_seconds()
    if wait > 0:
        start_logging(args)
        wait_for_containerd(settings, wait)
    if args.explain:
        return explain(args.explain, settings.ports(Reporter()), options, mode)
    if not args.once:
        if repair:
            raise UsageError("--repair goes with --once: repairs are made at boot only, never beside a live worker")
        return run_daemon(args, env, settings)
    if classes and args.force:
        raise WorkerRunningError(
            f"--repair {','.join(classes)} changes OBuilder's DB and result/: it runs only when the worker check "
            "passes, never with --force; stop the worker and run again without --force"
        )
    if not args.force:
        no_worker_running(settings)
    if args.dry_run:
        if classes:
            start_logging(args)
            repair_at_boot(settings, settings.ports(Reporter(), boot=True), classes, dry_run=True)
        return boot(args, settings)
    with StoreLock(settings.store):
        if classes:
            start_logging(args)
            repair_at_boot(settings, settings.ports(Reporter(), boot=True), classes)
        return boot(args, settings)


def repair_classes(settings: Settings, given: Sequence[str] | None) -> tuple[RepairClass, ...]:
    """The repairs asked for: ``--repair`` when given (it replaces the policy's), else ``spec.repair.classes``."""
    if given is None:
        return tuple(settings.spec.repair.classes)
    try:
        return parse_repair_classes(given)
    except ValueError as e:
        raise UsageError(f"--repair: {e}") from e


def repair_at_boot(
    settings: Settings, ports: Ports, classes: Sequence[RepairClass], *, dry_run: bool = False
) -> RepairPlan:
    """The opt-in repairs, before the boot passes. The caller holds the store's lock and has seen the
    worker down; it is asked again here, right before anything changes (a worker that started
    meanwhile holds the DB). ``dry_run``: say what would be done, change nothing."""
    log = logging.getLogger("reconcile")
    if not dry_run:
        no_worker_running(settings)
    store = ports.store.observe()
    present = {s.key for s in ports.containerd.observe().snapshots} if RepairClass.POISONED_RESULT in classes else set()
    if RepairClass.POISONED_RESULT in classes and (why := implausible_poisoning(store, present)):
        raise StoreSanityError(f"--repair poisoned-result: {why}")
    repair = plan_repairs(store, present, classes)
    verb = "would" if dry_run else "will"
    log.info("repair (%s): %s %s", ", ".join(classes), verb, describe(repair))
    if dry_run or repair.empty:
        return repair
    backup = apply_repairs(settings.store, repair)
    if backup is not None:
        log.info("repair done; the DB as it was is in %s", backup)
    return repair


#: ``reconcile check``'s exit codes.
CHECK_CLEAN, CHECK_FINDINGS = 0, 1


def check_mode(settings: Settings) -> tuple[Mode, str]:
    """Boot semantics when the worker is surely down, daemon semantics otherwise."""
    sighting = platform.find_worker(settings.worker_names, settings.worker_service)
    if sighting.answer is platform.WorkerAnswer.NOT_RUNNING:
        return Mode.BOOT, f"the worker is not running ({sighting.detail}): what it left behind is leftover"
    return Mode.DAEMON, (
        f"the worker may be running ({sighting.answer.value}: {sighting.detail}): only what is surely dead is "
        "reported as leftover; containers, result-tmp/ and cache-tmp/ may be a live build's"
    )


def take_check(ports: Ports, options: PlanOptions, mode: Mode, note: str = "") -> CheckReport:
    """One read-only look at the store and containerd, classified."""
    containerd = ports.containerd.observe()
    store = ports.store.observe()
    return CheckReport(mode=mode, note=note, findings=classify(store, containerd, options, ports.clock.now(), mode))


def run_apply(args: Invocation, env: Mapping[str, str]) -> int:
    """``reconcile apply FILE``: a reviewed plan, performed exactly (controller.applying)."""
    assert args.plan_file is not None
    settings = resolve_settings(args, env)
    check_store_ready(settings.store)
    planned = applying.read_plan(Path(args.plan_file), settings)
    start_logging(args)
    if not args.force:
        no_worker_running(settings)
    with StoreLock(settings.store):
        done, failed, skipped = applying.apply_plan(planned, settings.ports(LogReporter(), boot=True), settings)
    print(applying.summary_json(done, failed, skipped) if args.json else applying.summary(done, failed, skipped))
    return int(ExitCode.OK if not failed and not skipped else ExitCode.NOT_CONVERGED)


def run_check(args: Invocation, env: Mapping[str, str]) -> int:
    """``reconcile check``: read-only, worker up or down; 0 clean, 1 findings."""
    settings = resolve_settings(args, env)
    check_store_ready(settings.store)
    wait = settings.wait_for_containerd.total_seconds()
    if wait > 0:
        wait_for_containerd(settings, wait)
    mode, note = check_mode(settings)
    report = take_check(settings.ports(Reporter()), settings.plan_options(mode), mode, note)
    print(render_check_json(report) if args.json else render_check(report))
    return CHECK_CLEAN if report.clean else CHECK_FINDINGS


def render_check_json(report: CheckReport) -> str:
    body = {
        "mode": report.mode.value,
        "note": report.note,
        "clean": report.clean,
        "counts": dict(Counter(f.cls.value for f in report.findings)),
        "findings": [f.model_dump(mode="json", by_alias=True) for f in report.findings],
    }
    return json.dumps(body, indent=2)


def render_check(report: CheckReport) -> str:
    lines = [f"check ({report.mode.value} semantics: {report.note})" if report.note else "check"]
    if report.clean:
        return "\n".join([*lines, "clean: the store, its DB and containerd agree"])
    for f in report.findings:
        lines += [
            f"{f.severity.value.upper():7} {f.cls.value}: {f.object}",
            f"        evidence: {f.evidence}",
            f"        OBuilder: {f.obuilder}",
            f"        repair:   {f.repair}" + (f" ({f.repair_action})" if f.repair_action else ""),
        ]
    counts = Counter(f.severity.value for f in report.findings)
    lines.append(
        f"{len(report.findings)} finding(s): "
        + ", ".join(f"{counts[s.value]} {s.value}" for s in Severity if counts[s.value])
    )
    return "\n".join(lines)


def boot(
    args: Invocation, settings: Settings, *, console: bool = True, should_stop: Callable[[], bool] | None = None
) -> int:
    """``--once``: passes to convergence with boot semantics. ``console``: print the plan and summary."""
    start_logging(args)
    mode = Mode.BOOT
    printer = PlanPrinter(verbose=args.verbose, enabled=console and not (args.json or args.dry_run))
    tty = sys.stderr is not None and sys.stderr.isatty()  # None under pythonw or detached
    progress = ProgressReporter() if console and tty and args.log_format == "text" else None
    reporters: list[Reporter] = [printer, progress or LogReporter()]
    if not args.dry_run:
        reporters.insert(0, StatusFile(settings.status_path))
    options = settings.pass_options(mode, dry_run=args.dry_run)
    if should_stop is not None:
        options = replace(options, should_stop=should_stop)
    ports = settings.ports(Reporters(*reporters), boot=True)
    run = run_once(
        ports,
        options,
        max_passes=settings.max_passes,
        before_pass=None if args.force else lambda: no_worker_running(settings),
    )
    if args.plan_out and run.first.plan is not None and run.first.observation is not None:
        applying.write_plan(Path(args.plan_out), run.first.plan, run.first.observation, ports, settings)
    if progress is not None:
        progress.close()
    clean_leaked_sandboxes(settings, dry_run=args.dry_run)
    first = run.first.plan
    assert first is not None
    if not console:
        logging.getLogger("reconcile").info("boot pass: %s", render_summary(run).replace("\n", "; "))
    elif args.json:
        print(to_json(first, run))
    else:
        if not printer.printed:
            print(render_plan(first, verbose=args.verbose))
        print(render_summary(run))
        if run.orphan_bytes_at_start is not None:
            status = run.as_status()
            print(f"Orphans held {run.orphan_bytes_at_start:,} bytes; {status.reclaimed_bytes or 0:,} reclaimed.")
    if not args.dry_run:
        # The whole run, over the last pass's report: what a boot script reads.
        write_status(settings.status_path, run.as_status())
    return run.exit_code


def clean_leaked_sandboxes(settings: Settings, *, dry_run: bool) -> None:
    """Boot only (the worker is down): the HCS sandbox folders a crash left in the worker's temp folder,
    secrets first, and the HCN namespaces they name. Each is a log line; a failure is a warning."""
    worker = settings.spec.worker
    if worker.temp_dir is None:
        return
    log = logging.getLogger("reconcile")
    try:
        leaks = sandbox_leaks.find(Path(worker.temp_dir))
    except OSError as e:
        log.warning("cannot look for leaked sandboxes in %s: %s", worker.temp_dir, e)
        return
    if dry_run:
        for leak in leaks:
            log.info("would remove leaked sandbox %s (namespace %s)", leak.path, leak.namespace or "none")
        return
    for result in sandbox_leaks.remove(leaks, hcn_tool=worker.hcn_namespace_tool):
        if result.ok:
            log.info("removed leaked sandbox %s", result.path, extra={"object": result.path})
        else:
            log.warning("leaked sandbox %s: %s", result.path, "; ".join(result.errors), extra={"object": result.path})


class PlanPrinter(Reporter):
    """Prints the first plan before anything is removed, so a human reads what is about to happen."""

    def __init__(self, *, verbose: bool, enabled: bool) -> None:
        self.verbose = verbose
        self.enabled = enabled
        self.printed = False

    def pass_started(self, number: int, plan: Plan) -> None:
        if self.enabled and not self.printed:
            print(render_plan(plan, verbose=self.verbose), flush=True)
            self.printed = True


def daemon_reporters(status_path: Path, metrics: Reporter) -> Reporters:
    # The status file, then the metrics, then the log line: whoever sees a gauge move (an alert,
    # a test) or a "pass N" line then finds the status file already saying the same.
    return Reporters(StatusFile(status_path), metrics, LogReporter())


def run_daemon(args: Invocation, env: Mapping[str, str], settings: Settings) -> int:
    """Beside a live worker, until SIGTERM/SIGINT. Never boot semantics, so no worker check."""
    if args.dry_run or args.json:
        raise UsageError("--dry-run and --json go with --once (or --explain); the daemon logs each pass")
    start_logging(args)
    with StoreLock(settings.store):
        return serve(args, env, settings)


def serve(args: Invocation, env: Mapping[str, str], settings: Settings, *, stop: threading.Event | None = None) -> int:
    """The daemon with its endpoints, the store's lock already held. ``stop``: the service's stop
    flag (signals are then the service's business, not the daemon's)."""
    import anyio

    from controller.adapters.metrics import Endpoints, Metrics
    from controller.daemon import Daemon

    metrics = Metrics()
    reporters = daemon_reporters(settings.status_path, metrics)
    daemon = Daemon(load=lambda: resolve_settings(args, env), reporter=reporters, stop=stop)
    endpoints = None
    if settings.metrics_address:
        endpoints = Endpoints(settings.metrics_address, metrics, daemon.healthy, daemon.ready).start()
        host = settings.metrics_address.rpartition(":")[0]
        logging.getLogger("reconcile").info("serving /metrics, /healthz, /readyz on %s:%d", host, endpoints.port)
    try:
        return anyio.run(daemon.run)
    finally:
        if endpoints is not None:
            endpoints.stop()


#: How long the service waits for containerd when the policy does not say: the service manager
#: starts containerd's service first, but its pipe may answer a little later.
SERVICE_CONTAINERD_WAIT = 120.0
#: How often the service looks for a store OBuilder has not created yet.
STORE_POLL = 10.0


class ServiceSteps:
    """The real steps of ``controller.service.ReconcileService``: ctr, the store, the daemon.

    The store's lock is taken for the boot pass and held through the daemon, so no other
    reconcile slips in between."""

    def __init__(self, args: Invocation, env: Mapping[str, str]) -> None:
        self.args = args
        self.env = env
        self.settings: Settings | None = None
        self.lock: StoreLock | None = None

    def _stop_sleep(self, stop: threading.Event) -> Callable[[float], None]:
        def sleep(seconds: float) -> None:
            if stop.wait(seconds):
                raise StopRequested

        return sleep

    def wait_for_containerd(self, stop: threading.Event) -> None:
        self.settings = settings = resolve_settings(self.args, self.env)
        wait = settings.wait_for_containerd.total_seconds() or SERVICE_CONTAINERD_WAIT
        wait_for_containerd(settings, wait, sleep=self._stop_sleep(stop))

    def boot_pass(self, stop: threading.Event) -> ExitCode:
        settings = self.settings or resolve_settings(self.args, self.env)
        check_store_ready(settings.store)
        no_worker_running(settings)
        self.lock = StoreLock(settings.store).__enter__()
        if settings.spec.repair.classes:
            repair_at_boot(settings, settings.ports(Reporter(), boot=True), settings.spec.repair.classes)
        args = self.args._replace(once=True, dry_run=False, json=False, force=False)
        return ExitCode(boot(args, settings, console=False, should_stop=stop.is_set))

    def daemon(self, stop: threading.Event) -> ExitCode:
        settings = self.settings or resolve_settings(self.args, self.env)
        sleep = self._stop_sleep(stop)
        said = False
        while True:
            try:
                check_store_ready(settings.store)
                break
            except StoreNotCreatedError as e:
                # OBuilder creates it when the worker first starts: nothing to look after until then.
                if not said:
                    logging.getLogger("reconcile").info("%s; looking again every %gs", e, STORE_POLL)
                    said = True
                sleep(STORE_POLL)
        if self.lock is None:
            self.lock = StoreLock(settings.store).__enter__()
        return ExitCode(serve(self.args, self.env, settings, stop=stop))

    def close(self) -> None:
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None

    @property
    def _kept_down(self) -> Path:
        return Path(self.args.state_dir or platform.machine_state_dir()) / "worker-kept-down.json"

    def keep_worker_down(self, why: str) -> None:
        settings = self.settings
        name = settings.spec.worker.service_name if settings is not None else None
        if not name:
            logging.getLogger("reconcile").warning(
                "the worker stays down; spec.worker.serviceName is not set, so a later start of ours cannot start it"
            )
            return
        self._kept_down.parent.mkdir(parents=True, exist_ok=True)
        self._kept_down.write_text(json.dumps({"service": name, "why": why}), encoding="utf-8")

    def worker_kept_down(self) -> str | None:
        try:
            said = json.loads(self._kept_down.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logging.getLogger("reconcile").error("%s: unreadable (%s); removed", self._kept_down, e)
            said = {}
        self._kept_down.unlink(missing_ok=True)
        name = said.get("service") if isinstance(said, dict) else None
        return name if isinstance(name, str) and name else None


def run_service(args: Invocation, env: Mapping[str, str]) -> int:
    """``reconcile service``: under the Windows service manager, or in this console."""
    for flag in ("once", "dry_run", "json", "explain", "force"):
        if getattr(args, flag):
            raise UsageError(
                f"reconcile service runs its own boot pass and daemon: --{flag.replace('_', '-')} does not go with it"
            )
    start_logging(args)

    def make(manager: ServiceManager) -> ReconcileService:
        return ReconcileService(manager, ServiceSteps(args, env))

    if platform.has_service_manager() and not args.console:
        from controller.adapters import winservice

        return winservice.host(args.service_name, make)
    service = make(ConsoleManager())
    platform.on_console_stop(lambda: service.request_stop("console stop (Ctrl-C, Ctrl-Break or SIGTERM)"))
    return int(service.run())


class ConsoleManager:
    """A service manager that only logs: ``reconcile service --console``, and any OS but Windows."""

    def report(self, status: Status) -> None:
        logging.getLogger("reconcile").info("service %s", status_line(status))

    def start_service(self, name: str) -> None:
        # No service manager here (a systemd unit's RequiredBy= starts the worker on its own).
        log = logging.getLogger("reconcile")
        log.warning("service %s was kept down earlier: start it (no service manager here)", name)


def status_line(status: Status) -> str:
    details = []
    if status.state in (State.START_PENDING, State.STOP_PENDING):
        details.append(f"checkpoint {status.checkpoint}, wait hint {status.wait_hint:g}s")
    if status.state is State.STOPPED:
        details.append(f"exit {int(status.exit_code)}")
    return f"{status.state.value} ({'; '.join([*details, status.reason])})"


def explain(name: str, ports: Ports, options: PlanOptions, mode: Mode) -> int:
    # The same look a pass takes (containerd first, ages where they decide), changing nothing.
    report = one_pass(ports, PassOptions(plan=options, mode=mode, dry_run=True), History(), 0)
    plan, observed = report.plan, ports.containerd.observe()
    assert plan is not None
    decisions = plan.decision_for(name)
    present = any(s.key == name for s in observed.snapshots) or name in observed.foreign_containers
    note = (
        "(boot semantics: --once assumes the worker is not running)"
        if mode is Mode.BOOT
        else (
            "(daemon semantics; pass --once for what a boot run would do. An age that decides a removal is never "
            "more than the daemon has itself watched the object in that state (a snapshot: its key and "
            "containerd's Created), whatever the clocks say; this one-off look has watched nothing, so what only "
            "an age would remove counts from now)"
        )
    )
    print(render_explain(name, decisions, present=present, mode_note=note))
    return ExitCode.OK if decisions or present else ExitCode.NOT_CONVERGED
