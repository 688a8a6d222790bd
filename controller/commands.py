"""What ``reconcile`` does once its flags are parsed: wire the adapters into the core and run.

``--once`` runs passes to convergence (``controller.core.passes.run_once``), the daemon
runs the loop (``controller.daemon``), ``--explain`` takes one look and says why.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from controller.adapters import platform
from controller.adapters.ctr import Ctr
from controller.adapters.lock import StoreLock
from controller.adapters.logs import LogReporter, ProgressReporter, configure_logging
from controller.adapters.status import StatusFile, write_status
from controller.adapters.store import check_store
from controller.config.settings import Overrides, Settings, resolve
from controller.core.passes import PassOptions, one_pass, run_once
from controller.core.ports import Ports, Reporter, Reporters
from controller.model.errors import UsageError, WorkerRunningError
from controller.model.plan import Mode, Plan, PlanOptions
from controller.model.policy import parse_duration
from controller.model.records import History
from controller.report import render_explain, render_plan, render_summary, to_json

EXIT_OK, EXIT_NOT_CONVERGED = 0, 1


def resolve_settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
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


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = resolve_settings(args, env)
    check_store(settings.store, read_the_db=True)
    mode = Mode.BOOT if args.once else Mode.DAEMON
    options = settings.plan_options(mode)

    def no_worker_running() -> None:
        # Asked before every pass, not only the first: a worker that starts meanwhile makes
        # boot semantics wrong (its containers and result-tmp/ entries are live).
        running = platform.find_running(settings.worker_names)
        if running:
            raise WorkerRunningError(
                f"a worker appears to be running ({', '.join(running)}): --once assumes every "
                "obuilder-run-* container and result-tmp/ entry is dead; stop the worker or pass --force"
            )

    wait = settings.wait_for_containerd.total_seconds()
    if wait > 0:
        configure_logging(args.log_format)
        logging.getLogger("reconcile").info("waiting up to %gs for containerd at %s", wait, settings.ctr.address)
        Ctr(settings.ctr).wait_until_up(wait)
    if args.explain:
        return explain(args.explain, settings.ports(Reporter()), options, mode)
    if not args.once:
        return run_daemon(args, env, settings)
    if not args.force:
        no_worker_running()

    def go() -> int:
        configure_logging(args.log_format)
        printer = PlanPrinter(verbose=args.verbose, enabled=not (args.json or args.dry_run))
        progress = ProgressReporter() if sys.stderr.isatty() and args.log_format == "text" else None
        reporters: list[Reporter] = [printer, progress or LogReporter()]
        if not args.dry_run:
            reporters.insert(0, StatusFile(settings.status_path))
        run = run_once(
            settings.ports(Reporters(*reporters)),
            settings.pass_options(mode, dry_run=args.dry_run),
            max_passes=settings.max_passes,
            before_pass=None if args.force else no_worker_running,
        )
        if progress is not None:
            progress.close()
        first = run.first.plan
        assert first is not None
        if args.json:
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

    if args.dry_run:
        return go()
    with StoreLock(settings.store):
        return go()


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


def run_daemon(args: argparse.Namespace, env: Mapping[str, str], settings: Settings) -> int:
    """Beside a live worker, until SIGTERM/SIGINT. Never boot semantics, so no worker check."""
    if args.dry_run or args.json:
        raise UsageError("--dry-run and --json go with --once (or --explain); the daemon logs each pass")
    import anyio

    from controller.adapters.metrics import Endpoints, Metrics
    from controller.daemon import Daemon

    configure_logging(args.log_format)
    metrics = Metrics()
    reporters = daemon_reporters(settings.status_path, metrics)
    with StoreLock(settings.store):
        daemon = Daemon(load=lambda: resolve_settings(args, env), reporter=reporters)
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
            "(daemon semantics; pass --once for what a boot run would do. A snapshot's age is containerd's "
            "Created; a stopped container's grace period runs from when the daemon first saw it stopped, which "
            "this one-off look cannot know, so it counts from now)"
        )
    )
    print(render_explain(name, decisions, present=present, mode_note=note))
    return EXIT_OK if decisions or present else EXIT_NOT_CONVERGED
