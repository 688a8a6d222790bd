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
from controller.model.errors import CtrError
from controller.model.outcome import Result
from controller.model.records import Container, ContainerdState


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
            details = list(pool.map(self._inspect, owned))
            snapshots, tasks = snapshots_job.result(), tasks_job.result()
        # One container ctr cannot describe fails that container, not the look: we cannot
        # judge it, so it is listed as one we never touch, and the pass keeps what it may use.
        uninspectable = {i: d for i, d in zip(owned, details, strict=True) if isinstance(d, str)}
        return ContainerdState(
            snapshots=snapshots,
            containers=tuple(d for d in details if isinstance(d, Container)),
            foreign_containers=tuple(i for i in ids if not i.startswith(self.container_prefix) or i in uninspectable),
            tasks=tasks,
            uninspectable=uninspectable,
        )

    def _inspect(self, container_id: str) -> Container | str | None:
        """The container, None when it went since it was listed, or why ctr could not say."""
        try:
            return self.ctr.container(container_id)
        except CtrError as e:
            return str(e)

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

    def collect_garbage(self) -> Result:
        return self.ctr.collect_garbage()
