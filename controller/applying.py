"""A plan an operator reviews, then applies exactly: ``--once --dry-run --plan-out FILE`` writes it,
``reconcile apply FILE`` performs only what it lists whose object still is what it was.

Operators of other garbage collectors have asked for this for years (moby#30623): see what would
be removed, then remove exactly that. Apply makes the plan again with the same rules (boot
semantics: the worker must be down, the store locked) and acts only where both plans agree and
each object has the identity it was planned on; the rest is left alone and said.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from controller import __version__
from controller.config.settings import Settings
from controller.core.apply import restrict
from controller.core.executor import execute
from controller.core.identity import Dating
from controller.core.planner import plan as make_plan
from controller.core.ports import Ports
from controller.model.errors import UsageError
from controller.model.plan import Mode, Plan
from controller.model.planfile import PlanFile, PlannedContainer, PlannedEntry, PlannedSnapshot, Skipped
from controller.model.records import Observation

log = logging.getLogger("reconcile")


def policy_digest(settings: Settings) -> str:
    """What the plan was made under: the policy as resolved (flags over the file over defaults)."""
    return hashlib.sha256(settings.spec.model_dump_json().encode()).hexdigest()


def write_plan(path: Path, plan: Plan, observation: Observation, ports: Ports, settings: Settings) -> PlanFile:
    """The plan with the identity of each object it removes (the Created of each snapshot is read)."""
    keys = plan.snapshots
    # Key by key where ctr fails for one: a key containerd cannot date is planned undated.
    created = Dating(ports.containerd).snapshot_created(keys) if keys else {}
    containers = {c.id: c for c in observation.containerd.containers}
    entries = {e.id: e for e in observation.store.tmp}
    planned = PlanFile(
        tool_version=__version__,
        made_at=datetime.now(UTC),
        store=str(settings.store.absolute()),
        policy_sha256=policy_digest(settings),
        containers=tuple(PlannedContainer(id=c.id, created_at=containers[c.id].created_at) for c in plan.containers),
        snapshots=tuple(PlannedSnapshot(key=k, created=created.get(k)) for k in keys),
        tmp_entries=tuple(PlannedEntry(id=t.id, stamps=entries[t.id].stamps) for t in plan.tmp_entries),
        cache_tmp=tuple(c.name for c in plan.cache_tmp),
    )
    path.write_text(planned.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return planned


def read_plan(path: Path, settings: Settings) -> PlanFile:
    """The plan file, refused when it is not one or was made for another store or policy."""
    try:
        planned = PlanFile.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot read the plan: {e.strerror or e}") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(the document)"
        raise UsageError(f"{path}: not a plan of this tool: {where}: {first['msg']}") from e
    if Path(planned.store) != settings.store.absolute():
        raise UsageError(f"{path}: planned for the store {planned.store}, not {settings.store.absolute()}")
    if planned.policy_sha256 != policy_digest(settings):
        raise UsageError(f"{path}: planned under another policy than the one in force now: make the plan again")
    return planned


def apply_plan(planned: PlanFile, ports: Ports, settings: Settings) -> tuple[int, int, tuple[Skipped, ...]]:
    """Act on what the plan lists and still is what it was; returns (done, failed, skipped)."""
    observation = Observation(store=ports.store.observe(), containerd=ports.containerd.observe())
    now = make_plan(observation, settings.plan_options(Mode.BOOT), datetime.now(UTC), Mode.BOOT)
    keys = [s.key for s in planned.snapshots]
    created = Dating(ports.containerd).snapshot_created(keys) if keys else {}
    restricted, skipped = restrict(planned, now, observation, created)
    for s in skipped:
        log.warning("left alone %s %s: %s", s.kind, s.name, s.reason, extra={"kind": s.kind, "object": s.name})
    result = execute(restricted, ports.containerd, ports.store, ports.reporter)
    done = sum(1 for r in result.results if r.outcome.done)
    failed = sum(1 for r in result.results if r.outcome.failure)
    return done, failed, skipped


def summary(done: int, failed: int, skipped: tuple[Skipped, ...]) -> str:
    lines = [f"Applied: {done} done, {failed} failed, {len(skipped)} left alone."]
    lines += [f"  left alone {s.kind} {s.name}: {s.reason}" for s in skipped]
    return "\n".join(lines)


def summary_json(done: int, failed: int, skipped: tuple[Skipped, ...]) -> str:
    body = {"done": done, "failed": failed, "skipped": [s.model_dump(mode="json") for s in skipped]}
    return json.dumps(body, indent=2)
