"""containerd, over ``ctr``: the core's :class:`~controller.core.ports.ContainerdPort`.

The observer lists snapshots, containers and tasks, and asks for details only of
the containers we own. The actuator removes in batches: its cost grows with the
number of removal levels, not with the number of objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from controller.adapters.ctr import Ctr
from controller.model.outcome import Result
from controller.model.records import ContainerdState


class CtrContainerd:
    """Both roles, through one :class:`Ctr`."""

    def __init__(self, ctr: Ctr, *, container_prefix: str) -> None:
        self.ctr = ctr
        self.container_prefix = container_prefix
        #: `containers info` calls at once: the degree removals use too.
        self.parallel = max(1, ctr.settings.parallelism)

    @property
    def calls(self) -> int:
        return self.ctr.calls

    def observe(self) -> ContainerdState:
        # The three listings are independent; the containers' details follow their
        # list. One `containers info` per owned container is the only way ctr gives a
        # spec, so a few run at once: each is a process start and a round trip.
        with ThreadPoolExecutor(max_workers=self.parallel + 2) as pool:
            snapshots_job = pool.submit(self.ctr.snapshots)
            tasks_job = pool.submit(self.ctr.tasks)
            ids = self.ctr.container_ids()
            owned = [i for i in ids if i.startswith(self.container_prefix)]
            details = list(pool.map(self.ctr.container, owned))
            snapshots, tasks = snapshots_job.result(), tasks_job.result()
        return ContainerdState(
            snapshots=snapshots,
            containers=tuple(c for c in details if c is not None),
            foreign_containers=tuple(i for i in ids if not i.startswith(self.container_prefix)),
            tasks=tasks,
        )

    def delete_tasks(self, ids: Sequence[str]) -> dict[str, Result]:
        return self.ctr.delete_tasks(ids)

    def remove_containers(self, ids: Sequence[str]) -> dict[str, Result]:
        return self.ctr.remove_containers(ids)

    def remove_snapshots(self, keys: Sequence[str]) -> dict[str, Result]:
        return self.ctr.remove_snapshots(keys)

    def snapshot_created(self, keys: Sequence[str]) -> dict[str, datetime | None]:
        return self.ctr.snapshot_created(keys) if keys else {}

    def usage(self, keys: Sequence[str]) -> dict[str, int]:
        return self.ctr.usage(keys) if keys else {}
