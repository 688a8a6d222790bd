"""One run's settings: command-line flags over the policy file over the defaults.

The environment (``CONTAINERD_ADDRESS``, ``CONTAINERD_NAMESPACE``,
``CONTAINERD_SNAPSHOTTER``) is part of the defaults, as it is for ctr itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from controller.adapters import platform
from controller.adapters.containerd import CtrContainerd
from controller.adapters.ctr import Ctr, CtrSettings
from controller.adapters.disk import BOOT_SIZE_BUDGET, DiskObserver
from controller.adapters.lock import STATE_DIR
from controller.adapters.store import FsStore
from controller.config.policy import load_policy
from controller.core.options import PassOptions
from controller.core.ports import Ports, Reporter, WallClock
from controller.model.errors import UsageError
from controller.model.plan import Mode, PlanOptions
from controller.model.policy import API_VERSION, KIND, Metadata, ReconcilePolicy, ReconcilePolicySpec


@dataclass(frozen=True)
class Overrides:
    """What the command line says; None means "not given"."""

    store: str | None = None
    address: str | None = None
    namespace: str | None = None
    snapshotter: str | None = None
    ctr: str | None = None
    max_passes: int | None = None
    metrics_address: str | None = None
    status_file: str | None = None
    wait_for_containerd: timedelta | None = None


@dataclass(frozen=True)
class Settings:
    store: Path
    ctr: CtrSettings
    #: The policy's spec: the planner's options derive from it (plan_options).
    spec: ReconcilePolicySpec = field(repr=False)
    max_passes: int
    interval: timedelta
    worker_names: tuple[str, ...]
    policy_path: Path | None = None
    #: The worker's Windows service, asked before the process listing (spec.worker.serviceName).
    worker_service: str | None = None
    #: None: no HTTP endpoints.
    metrics_address: str | None = None
    measure_bytes: bool = False
    #: How long to wait for containerd before the first pass (zero: not at all).
    wait_for_containerd: timedelta = timedelta(0)
    #: Set by resolve(): the policy's, the flag's, or the store's own default.
    status_path: Path = field(default=Path(), kw_only=True)

    def plan_options(self, mode: Mode) -> PlanOptions:
        return PlanOptions.from_spec(self.spec, mode)

    def pass_options(self, mode: Mode, *, dry_run: bool = False) -> PassOptions:
        return PassOptions(
            plan=self.plan_options(mode),
            mode=mode,
            measure_bytes=self.measure_bytes,
            dry_run=dry_run,
            # The daemon looks at the snapshotter's folder once a resync interval (--once: at its end).
            disk_every=self.interval if mode is Mode.DAEMON else None,
        )

    def ports(self, reporter: Reporter, *, boot: bool = False) -> Ports:
        """The real world for a pass: ctr against containerd, the store on disk, the wall clock.
        ``boot``: the worker waits for this run, so the disk look sizes folders only within a budget."""
        prefix = self.spec.ownership.container_prefix
        # The store is read as an informer would: parsed entries cached between passes, verified
        # by their stamps every resync interval, and read whole now and then.
        store = FsStore(
            self.store,
            resync=self.interval.total_seconds(),
            full_every=self.spec.timing.full_read_every.total_seconds(),
        )
        return Ports(
            containerd=CtrContainerd(Ctr(self.ctr), container_prefix=prefix),
            store=store,
            reporter=reporter,
            clock=WallClock(),
            # Its own Ctr: its calls are counted apart.
            disk=DiskObserver(Ctr(self.ctr), size_budget=BOOT_SIZE_BUDGET if boot else None),
        )


def default_policy() -> ReconcilePolicy:
    return ReconcilePolicy(api_version=API_VERSION, kind=KIND, metadata=Metadata(name="defaults"))


def resolve(overrides: Overrides, policy_path: str | None, env: Mapping[str, str]) -> Settings:
    policy = load_policy(Path(policy_path)) if policy_path else default_policy()
    spec = policy.spec
    store = overrides.store or spec.store.root
    if not store:
        raise UsageError("no store root: pass --store ROOT or set spec.store.root in the policy")
    if overrides.max_passes is not None and overrides.max_passes < 1:
        raise UsageError("--max-passes must be at least 1")
    c = spec.containerd
    ctr = CtrSettings(
        parallelism=spec.limits.parallelism,
        ctr=overrides.ctr or c.ctr or platform.DEFAULT_CTR,
        address=overrides.address or c.address or env.get("CONTAINERD_ADDRESS") or platform.DEFAULT_ADDRESS,
        namespace=overrides.namespace or c.namespace or env.get("CONTAINERD_NAMESPACE") or platform.DEFAULT_NAMESPACE,
        snapshotter=(
            overrides.snapshotter or c.snapshotter or env.get("CONTAINERD_SNAPSHOTTER") or platform.DEFAULT_SNAPSHOTTER
        ),
        timeout=c.call_timeout.total_seconds(),
    )
    metrics = overrides.metrics_address or (spec.metrics.address if spec.metrics.enabled else None)
    return Settings(
        store=Path(store),
        ctr=ctr,
        spec=spec,
        max_passes=overrides.max_passes or spec.limits.max_passes,
        interval=spec.timing.interval,
        worker_names=spec.worker.process_names,
        worker_service=spec.worker.service_name,
        policy_path=Path(policy_path) if policy_path else None,
        metrics_address=None if metrics == "off" else metrics,
        measure_bytes=spec.metrics.measure_bytes,
        wait_for_containerd=(
            overrides.wait_for_containerd if overrides.wait_for_containerd is not None else c.wait_for
        ),
        status_path=Path(overrides.status_file or spec.status.path or Path(store).joinpath(*STATE_DIR, "status.json")),
    )
