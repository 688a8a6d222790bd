"""What one pass is asked to do: the plan's options, the mode, and how it acts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from controller.core.identity import RECHECK_BATCH
from controller.model.plan import Mode, PlanOptions


@dataclass(frozen=True)
class PassOptions:
    plan: PlanOptions
    mode: Mode
    #: Measure the disk orphans hold (one more containerd call that walks them).
    measure_bytes: bool = False
    #: Plan only: observe and plan, change nothing.
    dry_run: bool = False
    #: Daemon: snapshots checked and removed together (see controller.core.identity).
    recheck_batch: int = RECHECK_BATCH
    #: Asked before each action: a stop finishes the action under way, not the pass.
    should_stop: Callable[[], bool] = field(default=lambda: False, compare=False)
    #: Daemon: how often a pass looks at the snapshotter's folder (None: never in a pass;
    #: ``--once`` looks once, after its collection).
    disk_every: timedelta | None = None
