"""Daemon mode, wired: the core's loop with real adapters, a watcher, signals and a heartbeat.

The loop itself (``controller.core.loop``) decides when a pass runs. This module
gives it its ports (ctr, the store on disk, the wall clock), asks it for a pass
within a few hundred milliseconds of an entry appearing or going under ``result/``
or ``result-tmp/``, reloads the policy on SIGHUP or when its file changes (a bad
policy, or one that moves the store, is refused and the old one kept), and stops on
SIGTERM or SIGINT after the action under way. Under the service (``controller.service``)
the stop comes from the service's stop flag instead, set from another thread: the
service manager's stop and a console's Ctrl-C or Ctrl-Break alike.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import anyio
from watchfiles import awatch

from controller.adapters import platform
from controller.config.settings import Settings
from controller.core.loop import Loop
from controller.core.ports import Ports, Reporter
from controller.model.errors import ReconcileError
from controller.model.plan import Mode

log = logging.getLogger("reconcile")

#: /healthz fails when the event loop has not ticked for this long (seconds).
HEARTBEAT_LIMIT = 10.0
#: How often the daemon looks at an external stop flag (seconds).
STOP_POLL = 0.5


class Daemon:
    """Runs the loop until told to stop. ``load`` re-reads the settings (policy reload)."""

    def __init__(
        self,
        load: Callable[[], Settings],
        reporter: Reporter | None = None,
        *,
        wire: Callable[[Settings, Reporter], Ports] = Settings.ports,
        stop: threading.Event | None = None,
    ) -> None:
        self.load = load
        #: Set from outside (the service): stop after the action under way. None: signals stop us.
        self.external_stop = stop
        self.reporter = reporter or Reporter()
        self.wire = wire
        self.settings = load()
        self.loop = Loop(
            wire(self.settings, self.reporter),
            self.settings.pass_options(Mode.DAEMON),
            self.settings.interval,
            cpu_share=self.settings.spec.limits.pass_cpu_share,
        )
        #: For /healthz: the event loop ticks this every second while it is alive.
        self.heartbeat = time.monotonic()
        self._stop: anyio.Event | None = None

    def trigger(self, why: str) -> None:
        self.loop.trigger(why)

    def request_stop(self) -> None:
        self.loop.request_stop()
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> int:
        self._stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals if self.external_stop is None else self._watch_stop)
            tg.start_soon(self._watch)
            tg.start_soon(self._beat)
            await self.loop.run()
            tg.cancel_scope.cancel()
        log.info("stopped after %d passes", self.loop.passes)
        return 0

    async def _beat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await anyio.sleep(1)

    def healthy(self) -> tuple[bool, str]:
        """Liveness: the event loop itself is turning, not just the HTTP thread."""
        age = time.monotonic() - self.heartbeat
        if age > HEARTBEAT_LIMIT:
            return False, f"the loop has not ticked for {age:.0f} s"
        return True, f"alive: {self.loop.passes} passes"

    def ready(self) -> tuple[bool, str]:
        return self.loop.ready()

    async def _signals(self) -> None:
        async for what in platform.signals():
            if what == "reload":
                self._reload("SIGHUP")
            else:
                log.info("stop requested; finishing the action under way")
                self.request_stop()
                return

    async def _watch_stop(self) -> None:
        # A threading.Event set by another thread cannot wake the event loop by itself; half a
        # second is well inside a stop's budget (the action under way takes longer).
        assert self.external_stop is not None
        while not self.external_stop.is_set():
            await anyio.sleep(STOP_POLL)
        self.request_stop()

    def _reload(self, why: str) -> None:
        try:
            settings = self.load()
        except ReconcileError as e:
            log.error("policy reload (%s) failed, keeping the previous policy: %s", why, e)
            return
        if settings.store.absolute() != self.settings.store.absolute():
            # The lock we hold is the old store's; another instance may own the new one.
            log.error(
                "policy reload (%s) refused, keeping the previous policy: it moves the store from %s to %s; "
                "restart the daemon to change stores",
                why,
                self.settings.store,
                settings.store,
            )
            return
        self.settings = settings
        self.loop.reconfigure(
            self.wire(settings, self.reporter),
            settings.pass_options(Mode.DAEMON),
            settings.interval,
            cpu_share=settings.spec.limits.pass_cpu_share,
        )
        log.info("policy reloaded (%s)", why)
        self.trigger(f"policy reloaded ({why})")

    async def _watch(self) -> None:
        """One watcher for the store's top folders and the policy file's folder.

        Top level only: entries appearing and going is what changes a plan, and a
        recursive watch of result/ would cost a watch per folder of every layer.
        """
        store = [p for p in (self.settings.store / "result", self.settings.store / "result-tmp") if p.is_dir()]
        policy = self.settings.policy_path.resolve() if self.settings.policy_path else None
        folders = [*store, *([policy.parent] if policy else [])]
        if not folders:
            return
        store_prefixes = tuple(str(p) + os.sep for p in store)
        assert self._stop is not None
        async for changes in awatch(*folders, recursive=False, debounce=1000, step=100, stop_event=self._stop):
            paths = {changed for _, changed in changes}
            if policy is not None and str(policy) in paths:
                self._reload("policy file changed")
            in_store = sum(1 for p in paths if p.startswith(store_prefixes))
            if in_store:
                self.trigger(f"{in_store} changes in the store")
