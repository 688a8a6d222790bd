"""A snapshot's name is not its identity: ages from containerd, and a last look before removal.

OBuilder's build ids are content hashes, so its snapshot keys repeat: a cancelled
build is retried under the same id at once, a pruned result is rebuilt under it,
ocluster's health check builds and deletes one step every ten minutes. Each time,
OBuilder runs ``snapshot rm KEY`` then ``snapshot prepare KEY ...``: the key is the
same, the snapshot is new. So in daemon mode:

* a snapshot's age is containerd's own ``Created`` (read only for the snapshots a
  plan would otherwise remove, then the plan is made again with them), never the
  moment we first saw its name;
* right before each batch of removals, each key is asked again: a different
  ``Created`` (re-created), or a ``result/ID`` or ``result-tmp/ID`` that appeared
  for its build, drops it from the batch; the next pass judges it afresh.

The window between that last look and the removal cannot be closed (containerd has
no conditional delete); batches are kept small so it stays short, and it is measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol, TypeVar

from controller.core.ages import reading, restamp, stamp_of
from controller.core.planner import plan as make_plan
from controller.model.errors import CtrError, CtrTimeoutError
from controller.model.outcome import Outcome, Result
from controller.model.plan import Mode, Plan, PlanOptions
from controller.model.records import Observation

#: Daemon: snapshot keys checked and removed together. Small, so the time between a
#: key's last check and its removal stays a few ctr calls long.
RECHECK_BATCH = 16


class AgeSource(Protocol):
    def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
        """containerd's Created of each key; None for a key that is gone."""
        ...


def build_id_of(key: str, prefix: str = "obuilder-") -> str | None:
    """The build id OBuilder derives a key from: ``obuilder-[base-]ID[-committed]``."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :].removesuffix("-committed")
    return rest.removeprefix("base-") or None


def plan_with_ages(
    observation: Observation, options: PlanOptions, now: datetime, mode: Mode, ages: AgeSource
) -> tuple[Plan, Observation]:
    """Plan; in daemon mode, read the Created of what only its unknown age keeps, and plan again.

    Returns the plan and the observation it was made on: with the Created read, and the watch of
    each snapshot whose Created differs from the one it was watched under started again (the
    key was re-created: another snapshot)."""
    first = make_plan(observation, options, now, mode)
    if not first.unaged:
        return first, observation
    created = ages.snapshot_created(first.unaged)
    snapshots = tuple(
        s.model_copy(update={"created": created[s.key]}) if created.get(s.key) is not None else s
        for s in observation.containerd.snapshots
    )
    history = observation.history
    stamps = {key: stamp_of(when) for key, when in created.items() if when is not None}
    aged = observation.model_copy(
        update={
            "containerd": observation.containerd.model_copy(update={"snapshots": snapshots}),
            "history": history.model_copy(
                update={"snapshots": restamp(history.snapshots, stamps, reading(history.clock))}
            ),
        }
    )
    return make_plan(aged, options, now, mode), aged


class RemovalGuard:
    """Daemon: confirms, right before removal, that a batch of keys still means what was planned."""

    def __init__(
        self,
        ages: AgeSource,
        store_has: Callable[[str, str], bool],
        *,
        prefix: str = "obuilder-",
    ) -> None:
        self.ages = ages
        self.store_has = store_has
        self.prefix = prefix

    def check(self, plan: Plan, keys: Sequence[str]) -> dict[str, Result]:
        """What must not be removed now, with why; keys not in the answer are confirmed."""
        stale_tmp = {t.id for t in plan.tmp_entries}
        out: dict[str, Result] = {}
        for key, created in self.ages.snapshot_created(keys).items():
            planned = plan.snapshot_created.get(key)
            if created is None:
                out[key] = Result(Outcome.NOT_FOUND, "gone before its removal")
            elif planned is None or created != planned:
                was = planned.isoformat() if planned else "not read"
                out[key] = Result(
                    Outcome.CHANGED, f"re-created since planned (Created {created.isoformat()}, was {was})"
                )
        for key in keys:
            build = build_id_of(key, self.prefix)
            if key in out or build is None:
                continue
            if self.store_has("result", build):
                out[key] = Result(Outcome.CHANGED, f"result/{build} appeared since planned")
            elif build not in stale_tmp and self.store_has("result-tmp", build):
                out[key] = Result(Outcome.CHANGED, f"result-tmp/{build} appeared since planned")
        return out


_V = TypeVar("_V")


def key_by_key(
    keys: Sequence[str], ask: Callable[[Sequence[str]], dict[str, _V]], failed: Callable[[str, CtrError], None]
) -> dict[str, _V]:
    """Ask about all keys at once; when ctr fails, ask key by key, so a key containerd cannot
    answer for fails that key alone (``failed``), not the pass. A timeout is not one key's
    failure but containerd's: it still fails the pass (asking key by key would wait once a key)."""
    try:
        return ask(keys)
    except CtrTimeoutError:
        raise
    except CtrError:
        pass
    out: dict[str, _V] = {}
    for key in keys:
        try:
            out.update(ask([key]))
        except CtrTimeoutError:
            raise
        except CtrError as e:
            failed(key, e)
    return out


class Dating:
    """The ages a plan asks for, where one snapshot containerd cannot date (``snapshots info`` fails
    for it alone) stays undated, so kept with its ancestors (the planner keeps what it could not
    date), and is reported."""

    def __init__(self, source: AgeSource) -> None:
        self.source = source
        self.undated: dict[str, str] = {}

    def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
        def undated(key: str, error: CtrError) -> None:
            self.undated[key] = str(error)

        return key_by_key(keys, self.source.snapshot_created, undated)


class KeyByKeyGuard(RemovalGuard):
    """The last look before a batch's removal, where a key containerd cannot date at that moment
    fails that key (not removed, reported with why), not the pass."""

    def check(self, plan: Plan, keys: Sequence[str]) -> dict[str, Result]:
        failures: dict[str, Result] = {}

        def failed(key: str, error: CtrError) -> None:
            failures[key] = Result(Outcome.FAILED, f"could not look at it again right before its removal: {error}")

        check = super().check
        return {**key_by_key(keys, lambda part: check(plan, part), failed), **failures}
