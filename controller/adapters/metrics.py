"""Prometheus metrics, and the daemon's HTTP endpoints: /metrics, /healthz, /readyz.

Every labelled series exists at 0 from the start, so a dashboard or an alert sees
"nothing yet" rather than "no data". The server binds 127.0.0.1 by default.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.core.ports import Reporter
from controller.model.disk import UNKNOWN_REASONS
from controller.model.errors import UsageError
from controller.model.outcome import ACTION_KINDS, BACKLOG_KINDS, BACKLOG_STATES, Backlog, Outcome, PassReport, Result
from controller.model.plan import DRIFT_KINDS, Kind

ACTION_OUTCOMES = ("removed", "not_found", "failed")
WAITING_REASONS = ("grace", "deferred")

#: name -> (type, help): the README's metrics reference is checked against this.
METRICS = {
    "obuilder_reconcile_drift_objects": ("gauge", "Objects out of agreement after the last pass, by kind."),
    "obuilder_reconcile_actions_total": ("counter", "Removals attempted, by kind of object and outcome."),
    "obuilder_reconcile_pass_duration_seconds": ("histogram", "Time one pass took: observe, plan, act."),
    "obuilder_reconcile_passes_total": ("counter", "Passes, by outcome (success, error)."),
    "obuilder_reconcile_last_success_timestamp_seconds": ("gauge", "Unix time the last successful pass ended."),
    "obuilder_reconcile_containerd_up": ("gauge", "1 if the last pass reached containerd, else 0."),
    "obuilder_reconcile_owned_objects": ("gauge", "Owned snapshots and containers seen by the last pass."),
    "obuilder_reconcile_waiting_snapshots": (
        "gauge",
        "Orphan snapshots the last pass left waiting, by why: grace (gracePeriod) or deferred (maxDeletionsPerPass).",
    ),
    "obuilder_reconcile_backlog_objects": (
        "gauge",
        "The last pass's backlog by kind (container, snapshot, result-tmp) and state: planned, waiting "
        "(gracePeriod, staleAfter), deferred (maxDeletionsPerPass), stuck.",
    ),
    "obuilder_reconcile_backlog_next_eligible_seconds": (
        "gauge",
        "Seconds from the end of the last pass until the first waiting object of a kind may go (0: none waits).",
    ),
    "obuilder_reconcile_orphan_bytes": ("gauge", "Disk held by orphan snapshots (when measureBytes is on)."),
    "obuilder_reconcile_reclaimed_bytes_total": (
        "counter",
        "Disk freed by removed snapshots (measureBytes): containerd's measure less what its collector left in rm-*.",
    ),
    "obuilder_reconcile_disk_unknown_folders": (
        "gauge",
        "Folders in the snapshotter's folder that no snapshot owns, by reason (removed: rm-*, unfinished: new-*, "
        "not-a-snapshot, unclaimed), at the last look (once a resync interval).",
    ),
    "obuilder_reconcile_disk_unknown_bytes": ("gauge", "Bytes those folders hold, by reason."),
    "obuilder_reconcile_clock_steps_total": (
        "counter",
        "Steps of the wall clock seen between two passes, by direction (forward, backward). Ages that decide a "
        "removal are bounded by what the daemon watched on its monotonic clock, so a step changes no verdict.",
    ),
    "obuilder_reconcile_clock_step_seconds": (
        "gauge",
        "Every step of the wall clock seen since the daemon started, added up (seconds, forward positive).",
    ),
    "obuilder_reconcile_stamped_ahead_objects": (
        "gauge",
        "Objects whose stamp (containerd's Created, an mtime) lies ahead of the wall clock at the last pass: "
        "kept until the clock catches up.",
    ),
}


#: Each labelled metric's labels, and every value each label takes (all series exist at 0 from the start).
_LABELS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "obuilder_reconcile_drift_objects": (("kind", DRIFT_KINDS),),
    "obuilder_reconcile_actions_total": (("kind", tuple(k.value for k in ACTION_KINDS)), ("outcome", ACTION_OUTCOMES)),
    "obuilder_reconcile_passes_total": (("outcome", ("success", "error")),),
    "obuilder_reconcile_owned_objects": (("kind", ("snapshot", "container")),),
    "obuilder_reconcile_waiting_snapshots": (("reason", WAITING_REASONS),),
    "obuilder_reconcile_backlog_objects": (("kind", tuple(k.value for k in BACKLOG_KINDS)), ("state", BACKLOG_STATES)),
    "obuilder_reconcile_backlog_next_eligible_seconds": (("kind", tuple(k.value for k in BACKLOG_KINDS)),),
    "obuilder_reconcile_disk_unknown_folders": (("reason", UNKNOWN_REASONS),),
    "obuilder_reconcile_disk_unknown_bytes": (("reason", UNKNOWN_REASONS),),
    "obuilder_reconcile_clock_steps_total": (("direction", ("forward", "backward")),),
}
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics(Reporter):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.drift = self._gauge("obuilder_reconcile_drift_objects")
        self.actions = self._counter("obuilder_reconcile_actions_total")
        self.duration = self._histogram("obuilder_reconcile_pass_duration_seconds")
        self.passes = self._counter("obuilder_reconcile_passes_total")
        self.last_success = self._gauge("obuilder_reconcile_last_success_timestamp_seconds")
        self.containerd_up = self._gauge("obuilder_reconcile_containerd_up")
        self.owned = self._gauge("obuilder_reconcile_owned_objects")
        self.waiting = self._gauge("obuilder_reconcile_waiting_snapshots")
        self.backlog = self._gauge("obuilder_reconcile_backlog_objects")
        self.next_eligible = self._gauge("obuilder_reconcile_backlog_next_eligible_seconds")
        self.orphan_bytes = self._gauge("obuilder_reconcile_orphan_bytes")
        self.reclaimed_bytes = self._counter("obuilder_reconcile_reclaimed_bytes_total")
        self.disk_folders = self._gauge("obuilder_reconcile_disk_unknown_folders")
        self.disk_bytes = self._gauge("obuilder_reconcile_disk_unknown_bytes")
        self.clock_steps = self._counter("obuilder_reconcile_clock_steps_total")
        self.clock_step = self._gauge("obuilder_reconcile_clock_step_seconds")
        self.stamped_ahead = self._gauge("obuilder_reconcile_stamped_ahead_objects")

    def _labelled(self, name: str, metric: Gauge | Counter) -> None:
        labels = _LABELS.get(name, ())
        for values in itertools.product(*(values for _, values in labels)):
            if values:
                metric.labels(*values)

    def _gauge(self, name: str) -> Gauge:
        labels = [label for label, _ in _LABELS.get(name, ())]
        gauge = Gauge(name, METRICS[name][1], labels, registry=self.registry)
        self._labelled(name, gauge)
        return gauge

    def _counter(self, name: str) -> Counter:
        # prometheus_client adds the _total suffix itself.
        labels = [label for label, _ in _LABELS.get(name, ())]
        counter = Counter(name.removesuffix("_total"), METRICS[name][1], labels, registry=self.registry)
        self._labelled(name, counter)
        return counter

    def _histogram(self, name: str) -> Histogram:
        return Histogram(name, METRICS[name][1], buckets=_DURATION_BUCKETS, registry=self.registry)

    def removed(self, kind: Kind, name: str, reason: str, outcome: Outcome) -> None:
        self.actions.labels(kind.value, "removed" if outcome is Outcome.REMOVED else "not_found").inc()

    def failed(self, kind: Kind, name: str, result: Result) -> None:
        if result.outcome.failure:
            self.actions.labels(kind.value, "failed").inc()

    def pass_finished(self, status: PassReport) -> None:
        self.passes.labels(status.outcome).inc()
        self.duration.observe(status.seconds)
        self.containerd_up.set(1 if status.containerd_up else 0)
        if status.outcome != "success":
            return
        self.last_success.set(status.time.timestamp())
        for kind in DRIFT_KINDS:
            self.drift.labels(kind).set(status.drift.get(kind, 0))
        for kind in ("snapshot", "container"):
            self.owned.labels(kind).set(status.owned.get(kind, 0))
        for reason in WAITING_REASONS:
            self.waiting.labels(reason).set(status.waiting.get(reason, 0))
        for kind in BACKLOG_KINDS:
            backlog = status.backlogs.get(kind.value, Backlog())
            for state in BACKLOG_STATES:
                self.backlog.labels(kind.value, state).set(backlog.count(state))
            eligible = backlog.next_eligible
            self.next_eligible.labels(kind.value).set(
                0 if eligible is None else max(0.0, (eligible - status.time).total_seconds())
            )
        if status.orphan_bytes is not None:
            self.orphan_bytes.set(status.orphan_bytes)
        if status.reclaimed_bytes:
            self.reclaimed_bytes.inc(status.reclaimed_bytes)
        clock = status.clock
        if clock is not None:
            if clock.step is not None:
                self.clock_steps.labels("forward" if clock.step > 0 else "backward").inc()
            self.clock_step.set(clock.net_step)
            self.stamped_ahead.set(clock.stamped_ahead)
        disk = status.disk
        if disk is not None and disk.folder is not None and disk.error is None:
            for why, (folders, size) in disk.by_reason().items():
                self.disk_folders.labels(why).set(folders)
                self.disk_bytes.labels(why).set(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"metrics address {address!r}: expected HOST:PORT, such as 127.0.0.1:9847")
    return host.strip("[]"), int(port)


class Endpoints:
    """A small threaded HTTP server: /metrics, /healthz (the loop is alive), /readyz (recent success)."""

    def __init__(
        self,
        address: str,
        metrics: Metrics,
        healthy: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        host, port = parse_address(address)
        handler = _handler(metrics, healthy, ready)
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on {address}: {e.strerror or e}") from e
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="endpoints", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> Endpoints:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(
    metrics: Metrics, healthy: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, why = (healthy if path == "/healthz" else ready)()
                self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes every few seconds would drown the log

    return Handler
