"""ReconcilePolicy: the policy a worker pool keeps, modelled like a Kubernetes resource.

The pydantic model is the single source of truth: it validates the file, holds every
default (the planner's and ctr's options derive theirs from it), and generates the CRD
(``crds/reconcilepolicy.yaml``) and the README's field reference. Reading the YAML,
with errors that name file, line and column, is ``controller.config.policy``'s job.
"""

from __future__ import annotations

import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

API_VERSION = "reconcile.obuilder.io/v1alpha1"
KIND = "ReconcilePolicy"

#: One pattern for the loader and the CRD's schema, so the two can never disagree.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
_DURATION = re.compile(DURATION_PATTERN)
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """``30s``, ``10m``, ``6h``, ``1h30m``, ``2d``, ``500ms``; a timedelta passes through."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str) and _DURATION.match(value.strip()):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value.strip()))
        return timedelta(seconds=seconds)
    raise ValueError(f"invalid duration {value!r} (use a number and a unit: 500ms, 30s, 10m, 6h, 2d; or 1h30m)")


def format_duration(value: timedelta) -> str:
    total = value.total_seconds()
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if total >= size and total % size == 0:
            return f"{int(total // size)}{unit}"
    return f"{round(total * 1000)}ms"


def check_glob(value: str) -> str:
    """fnmatch takes any string, but an unclosed ``[`` is always a typo: refuse it."""
    if not value:
        raise ValueError("invalid glob '': empty")
    i = value.find("[")
    while i >= 0:
        j = i + 1
        j += value[j : j + 1] == "!"
        j += value[j : j + 1] == "]"
        close = value.find("]", j)
        if close < 0:
            raise ValueError(f"invalid glob {value!r}: the '[' at position {i + 1} is never closed")
        i = value.find("[", close + 1)
    return value


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN}),
]
Glob = Annotated[str, AfterValidator(check_glob)]


class RepairClass(StrEnum):
    """The opt-in repairs (``--repair CLASS[,CLASS]``, ``spec.repair.classes``), made at boot only; what each
    does: ``controller.core.check.plan_repairs`` and docs/operating.md."""

    POISONED_RESULT = "poisoned-result"
    ROW_WITHOUT_RESULT = "row-without-result"
    RC = "rc"
    RESULT_WITHOUT_ROW = "result-without-row"


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=True,
        # Not use_attribute_docstrings: it parses this file's source at every import, a tenth of a
        # run's start-up; controller.config.crd reads the docstrings when it generates the reference.
    )


class StoreSpec(_Model):
    root: str | None = None
    """OBuilder store root, as in `--store=hcs:ROOT` (for example `C:\\obuilder`). `--store` overrides it."""


class ContainerdSpec(_Model):
    address: str | None = None
    """containerd address. Default: `$CONTAINERD_ADDRESS`, else containerd's platform default."""
    namespace: str | None = None
    """containerd namespace. Default: `$CONTAINERD_NAMESPACE`, else `default`."""
    snapshotter: str | None = None
    """Snapshotter. Default: `$CONTAINERD_SNAPSHOTTER`, else `windows` on Windows, `overlayfs` elsewhere."""
    ctr: str | None = None
    """The ctr executable. Default: `ctr.exe` on Windows, `ctr` elsewhere."""
    call_timeout: Duration = timedelta(seconds=60)
    """Longest one ctr call may take before it is killed and the pass fails."""
    wait_for: Duration = timedelta(0)
    """How long to wait for containerd to answer before the first pass, for a boot step that may start
    before containerd does. `0s`: do not wait. `--wait-for-containerd` overrides."""


class OwnershipSpec(_Model):
    snapshot_prefix: str = Field(default="obuilder-", min_length=1)
    """Snapshots whose key starts with this are ours; nothing else is ever removed."""
    container_prefix: str = Field(default="obuilder-run-", min_length=1)
    """Containers whose id starts with this are ours; nothing else is ever removed."""


class ProtectSpec(_Model):
    base_images: tuple[str, ...] = ()
    """Image references whose base snapshot (`obuilder-base-` + SHA256 of the reference, and its
    `-committed`) is never removed, with its ancestors."""
    snapshot_keys: tuple[Glob, ...] = ()
    """Globs (`*`, `?`, `[...]`, case-sensitive) over snapshot keys never removed, with their ancestors."""


class TimingSpec(_Model):
    grace_period: Duration = timedelta(minutes=10)
    """Daemon: a snapshot containerd created less than this ago (its `Created`, not its name: keys are
    re-created), or a container whose task stopped less than this ago, is left alone."""
    stale_after: Duration = timedelta(hours=6)
    """Daemon: a `result-tmp/` entry that nothing uses and that has not changed for this long is stale."""
    interval: Duration = timedelta(minutes=5)
    """Daemon: time between resync passes."""
    full_read_every: Duration = Field(default=timedelta(hours=6), gt=timedelta(0))
    """Daemon: how often the store is read whole, its cache dropped (each resync verifies the cached
    entries' stamps and re-reads only what changed; a verification that fails reads whole at once)."""
    max_task_age: Duration | None = None
    """Daemon: a running task older than this is killed. Unset: running tasks are never touched."""


class LimitsSpec(_Model):
    max_passes: int = Field(default=10, ge=1)
    """`--once` gives up (exit 1) after this many passes that each made progress."""
    max_deletions_per_pass: int = Field(default=500, ge=1)
    """Daemon: at most this many snapshot removals per pass (leaves first); the rest waits."""
    parallelism: int = Field(default=4, ge=1, le=64)
    """ctr processes at once: for one level of snapshot removals, and for reading containers."""
    pass_cpu_share: float = Field(default=0.02, gt=0, le=1)
    """Daemon: the share of one core passes may use on average (the daemon's own CPU, not its ctr
    processes', which Windows cannot count for it). Passes spend CPU seconds from a bucket of 0.5 s
    refilled at this share: once it is spent, a pass a change or the interval asks for waits until
    it refills (at most 2 minutes); a pass after one that removed something does not wait. On a big
    store beside a busy worker this spaces passes beyond `interval`."""


class WorkerSpec(_Model):
    process_names: tuple[str, ...] = ("ocluster-worker", "obuilder")
    """Executable names that mean a worker is running (`--once` then refuses unless `--force`). A process
    listing that fails or comes back empty means "cannot tell", which `--once` treats as running."""
    service_name: str | None = Field(default=None, min_length=1)
    """Windows: the worker's service (ocluster's `--name`, as `sc.exe query NAME` knows it). The service
    manager's answer then decides: stopped is not running (unless a `processNames` process runs), any other
    state is running, and a query that fails (no such service, access denied) is "cannot tell", which `--once`
    treats as running. Unset, or elsewhere than Windows: the process listing alone decides."""
    temp_dir: str | None = Field(default=None, min_length=1)
    """The worker account's temp folder (its `%TEMP%`; for a service, often `C:\\Windows\\Temp`), where
    OBuilder's HCS sandbox writes each run's `config.json` and the job's secrets (`obuilder-hcs-*`). Set,
    the boot pass deletes the folders a crash left there, secrets first. Unset: not looked at (ours is
    not the worker's)."""
    hcn_namespace_tool: str | None = Field(default=None, min_length=1)
    """The worker's `--hcs-hcn-namespace-path` tool: the boot pass deletes the HCN namespace a leaked
    sandbox's `config.json` names with `TOOL delete NS`. Unset: namespaces are only reported."""


class MetricsSpec(_Model):
    enabled: bool = True
    """Daemon: serve Prometheus `/metrics`, `/healthz` and `/readyz` over HTTP."""
    address: str = "127.0.0.1:9847"
    """HOST:PORT to serve them on; loopback unless you mean to expose them.
    `--metrics-address` overrides (`off` disables)."""
    measure_bytes: bool = False
    """Measure the disk orphan snapshots hold (`ctr snapshots usage`): one more ctr call per
    pass that walks every orphan layer, as slow as `du` over them."""


class StatusSpec(_Model):
    path: str | None = None
    """Status JSON rewritten atomically after each pass. Default: `STORE/state/obuilder-reconcile/status.json`."""


class RepairSpec(_Model):
    classes: tuple[RepairClass, ...] = ()
    """Repairs `--once` (and the service's boot pass) makes before its passes, only when the worker check
    passes and the store lock is held, after a backup of the DB into `STORE/state/obuilder-reconcile/`:
    `poisoned-result`, `row-without-result`, `rc`, `result-without-row` (`reconcile check` lists what each
    would do). `--repair` replaces them. The daemon never repairs."""


class ReconcilePolicySpec(_Model):
    store: StoreSpec = StoreSpec()
    """Where the OBuilder store is."""
    containerd: ContainerdSpec = ContainerdSpec()
    """How to reach containerd."""
    ownership: OwnershipSpec = OwnershipSpec()
    """What the controller may remove."""
    protect: ProtectSpec = ProtectSpec()
    """What it must keep even when orphaned."""
    timing: TimingSpec = TimingSpec()
    """Grace, staleness and cadence."""
    limits: LimitsSpec = LimitsSpec()
    """Bounds on one run."""
    worker: WorkerSpec = WorkerSpec()
    """How a running worker is recognised."""
    metrics: MetricsSpec = MetricsSpec()
    """Prometheus metrics and health endpoints."""
    status: StatusSpec = StatusSpec()
    """The status file."""
    repair: RepairSpec = RepairSpec()
    """Opt-in repairs of OBuilder's DB and `result/`, made at boot only."""


class Metadata(_Model):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    """Name of the policy, usually the worker pool."""


class ReconcilePolicy(_Model):
    api_version: Literal["reconcile.obuilder.io/v1alpha1"]
    kind: Literal["ReconcilePolicy"]
    metadata: Metadata
    spec: ReconcilePolicySpec = ReconcilePolicySpec()
