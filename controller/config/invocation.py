"""What the command line asked for, typed and frozen: ``controller.cli`` makes it from the flags,
and nothing past it sees argparse.

A NamedTuple, not a dataclass: it is built on every run, and dataclasses costs a start-up
15 ms of imports (inspect)."""

from __future__ import annotations

from typing import NamedTuple


class Invocation(NamedTuple):
    #: --once: boot semantics (the worker is not running), passes to convergence, then exit.
    once: bool = False
    dry_run: bool = False
    json: bool = False
    #: Boot semantics although a worker appears to be running.
    force: bool = False
    explain: str | None = None
    verbose: bool = False
    policy: str | None = None
    # Overrides of the policy's settings (None: the policy's, else the defaults).
    store: str | None = None
    address: str | None = None
    namespace: str | None = None
    snapshotter: str | None = None
    ctr: str | None = None
    wait_for_containerd: str | None = None
    max_passes: int | None = None
    metrics_address: str | None = None
    status_file: str | None = None
    log_format: str = "text"
    log_file: str | None = None
    #: --once --dry-run --plan-out FILE: write the plan for ``reconcile apply``.
    plan_out: str | None = None
    #: reconcile apply FILE.
    plan_file: str | None = None
    #: --repair CLASS[,CLASS] as given (None: not given, the policy's spec.repair.classes apply).
    repair: tuple[str, ...] | None = None
    # reconcile service
    console: bool = False
    service_name: str = "obuilder-reconcile"
    #: Where the service remembers, past a restart, that it kept the worker down (None: the platform's).
    state_dir: str | None = None
