"""Operating it: metrics and health of a running daemon, the status file, logs, progress, service files."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controller.adapters.metrics import METRICS
from controller.adapters.status import read_status
from controller.commands import daemon_reporters
from controller.core.ports import Reporter
from controller.model.outcome import PassReport
from controller.model.plan import Mode
from tests.support.cli import reconcile_on
from tests.support.containerd import SNAPSHOTTER, PrivateContainerd
from tests.support.daemon import DaemonProcess
from tests.support.world import World

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)$"
    m = re.search(pattern, text, re.M)
    assert m, f"{name}{{{want}}} not exposed"
    return float(m.group(1))


def until(check: object, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.containerd
def test_metrics_health_and_status_of_a_running_daemon(
    containerd: PrivateContainerd, own_containerd: PrivateContainerd, tmp_path: Path
) -> None:
    cd = own_containerd
    world = World(cd, "ops", tmp_path / "store")
    base = world.base("b:1")
    world.step("kept", base)
    orphans = world.orphan_chain(base, "o", 3)
    (world.root / "result" / "norow").mkdir()  # a result OBuilder will never prune
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: ops}\nspec:\n"
        "  containerd: {namespace: ops, snapshotter: native}\n"
        "  timing: {gracePeriod: 0s, interval: 2s}\n"
        "  metrics: {address: '127.0.0.1:0', measureBytes: true}\n"
    )
    daemon = DaemonProcess(cd, world.root, policy, tmp_path / "daemon.log")
    try:
        base_url = daemon.served_at()
        until(lambda: get(base_url + "/readyz")[0] == 200, what="/readyz")
        until(lambda: not set(orphans) & set(cd.snapshot_keys("ops")), what="the orphans to go")
        daemon.wait_for(r"pass 2 ", timeout=30)  # a pass after the removal
        code, text = get(base_url + "/metrics")
        assert code == 200
        assert sample(text, "obuilder_reconcile_drift_objects", kind="orphan_snapshots") == 0
        assert sample(text, "obuilder_reconcile_drift_objects", kind="results_without_row") == 1
        assert sample(text, "obuilder_reconcile_actions_total", kind="snapshot", outcome="removed") == 3
        assert sample(text, "obuilder_reconcile_actions_total", kind="cache-tmp", outcome="failed") == 0
        assert sample(text, "obuilder_reconcile_containerd_up") == 1
        assert sample(text, "obuilder_reconcile_owned_objects", kind="snapshot") == 2
        assert sample(text, "obuilder_reconcile_reclaimed_bytes_total") > 0
        assert sample(text, "obuilder_reconcile_passes_total", outcome="success") >= 2
        assert sample(text, "obuilder_reconcile_pass_duration_seconds_count") >= 2
        for name, (kind, _) in METRICS.items():
            assert f"# TYPE {name} {kind}" in text

        # The drift gauge falls to zero once the store agrees with itself.
        world.add_row("norow")
        until(
            lambda: (
                sample(get(base_url + "/metrics")[1], "obuilder_reconcile_drift_objects", kind="results_without_row")
                == 0
            ),
            what="results_without_row to fall to 0",
        )
        status = read_status(world.root / "state" / "obuilder-reconcile" / "status.json")
        assert status.outcome == "success" and status.drift["results_without_row"] == 0

        # containerd goes away: not ready, the loop still alive; it comes back: ready again.
        cd._stop_daemon()
        until(lambda: get(base_url + "/readyz")[0] == 503, what="/readyz to turn unready")
        until(
            lambda: sample(get(base_url + "/metrics")[1], "obuilder_reconcile_containerd_up") == 0,
            what="containerd_up to fall to 0 (ctr's dial timeout is 10 s)",
        )
        assert get(base_url + "/healthz")[0] == 200
        # The status file is written before the metrics move, so it already says so.
        assert read_status(world.root / "state" / "obuilder-reconcile" / "status.json").outcome == "error"
        cd.start()
        until(lambda: get(base_url + "/readyz")[0] == 200, timeout=60, what="/readyz to recover")
        assert get(base_url + "/nothing")[0] == 404
    finally:
        assert daemon.stop() == 0, daemon.text()[-2000:]


WRITER = """
import sys
from datetime import datetime, timezone
from pathlib import Path
from controller.adapters.status import write_status
from controller.model.outcome import PassReport
path = Path(sys.argv[1])
n = 0
while True:
    n += 1
    stuck = [{"kind": "snapshot", "name": f"obuilder-{i}" * 40, "reason": "x" * 200} for i in range(300)]
    write_status(path, PassReport(time=datetime.now(timezone.utc), mode="daemon", number=n,
                                  outcome="success", seconds=0.1, stuck=stuck[: (n % 2) * 300]))
"""


@pytest.mark.slow
def test_status_file_survives_kill_9_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "state" / "status.json"
    rng = random.Random(3)
    numbers = set()
    for _ in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO)
        # The first writer must have written once (a loaded machine takes seconds to import it).
        until(path.exists, timeout=60, what="the first status file")
        time.sleep(rng.uniform(0.3, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        status = read_status(path)  # raises on a torn or empty file
        assert len(status.stuck) in (0, 300)
        numbers.add(status.number)
    assert len(numbers) > 1, "the writer was killed at different points"
    # The next writer clears temporary siblings a killed one left.
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(path.parent.iterdir())) <= 2


def test_the_daemon_writes_its_status_file_before_the_metrics_move(tmp_path: Path) -> None:
    # An alert on a gauge sends a human to status.json: it must already tell the same pass.
    path = tmp_path / "status.json"
    seen: list[int] = []

    class MetricsSpy(Reporter):
        def pass_finished(self, status: PassReport) -> None:
            seen.append(read_status(path).number)

    reporters = daemon_reporters(path, MetricsSpy())
    for n in (1, 2):
        reporters.pass_finished(
            PassReport(time=datetime.now(UTC), mode=Mode.DAEMON, number=n, outcome="success", seconds=0.1)
        )
    assert seen == [1, 2]


@pytest.mark.containerd
def test_json_logs_name_every_removal_with_its_reason(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    orphans = world.orphan_chain(world.base("b:1"), "o", 3)
    run = reconcile_on(containerd, namespace, world.root, "--once", "--log-format", "json")
    assert run.code == 0, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines()]
    removed = {(d["kind"], d["object"]) for d in lines if d["message"].startswith("removed")}
    assert removed == {("snapshot", k) for k in orphans}
    assert all(d["reason"] and d["level"] == "info" and d["time"] for d in lines if "object" in d)
    status = read_status(world.root / "state" / "obuilder-reconcile" / "status.json")
    assert status.removed["snapshot"] == 3 and status.outcome == "success"


@pytest.mark.containerd
def test_once_shows_a_progress_bar_on_a_terminal_and_plain_lines_without(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    base = world.base("b:1")
    world.orphan_chain(base, "o", 4)
    argv = [sys.executable, "-m", "controller", "--once", "--store", str(world.root), "--address", containerd.address,
            "--namespace", namespace, "--snapshotter", SNAPSHOTTER]  # fmt: skip
    leader, follower = pty.openpty()
    # A terminal of 120 columns: a pty starts with none, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=follower, timeout=120, check=False)
        os.close(follower)
        follower = -1
        screen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0
    assert re.search(rb"pass 1: 100%\|[^|]*\| 4/4", screen), screen[-500:]
    assert b"removed snapshot" not in screen
    world.orphan_chain(base, "p", 2)
    plain = reconcile_on(containerd, namespace, world.root, "--once")
    assert "%|" not in plain.stderr
    assert plain.stderr.count("removed snapshot obuilder-p-") == 2


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {name} is missing: .ci/run installs it")
        pytest.skip(f"{name} is not installed here")
    return path


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _tool("systemd-analyze")
    reconcile = Path(sys.executable).with_name("reconcile")
    units = []
    for unit in sorted((EXAMPLES / "systemd").glob("*.service")):
        target = tmp_path / unit.name
        target.write_text(unit.read_text().replace("/usr/local/bin/reconcile", str(reconcile)))
        units.append(str(target))
    proc = subprocess.run([tool, "verify", *units], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    boot = (EXAMPLES / "systemd" / "obuilder-reconcile-boot.service").read_text()
    assert "Type=oneshot" in boot and "Before=ocluster-worker.service" in boot


def test_prometheus_rules_pass_promtool_and_name_real_metrics() -> None:
    rules = EXAMPLES / "monitoring" / "obuilder-reconcile.rules.yml"
    proc = subprocess.run(
        [_tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    used = set(re.findall(r"obuilder_reconcile_\w+", rules.read_text()))
    assert used <= set(METRICS)


def test_grafana_dashboard_is_json_over_real_metrics() -> None:
    dashboard = json.loads((EXAMPLES / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"obuilder_reconcile_\w+", e)}
    assert names <= set(METRICS) and len(names) >= 7


def test_the_operating_docs_document_every_metric() -> None:
    readme = (REPO / "docs" / "operating.md").read_text()
    for name in METRICS:
        assert f"`{name}`" in readme, name


@pytest.mark.containerd
def test_orphans_waiting_out_their_grace_period_show_as_a_gauge_then_fall_to_zero(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path
) -> None:
    base = world.base("b:1")
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: backlog}\nspec:\n"
        f"  containerd: {{namespace: {namespace}, snapshotter: native}}\n"
        "  timing: {gracePeriod: 4s, interval: 60s}\n"
        "  metrics: {address: '127.0.0.1:0'}\n"
    )
    daemon = DaemonProcess(containerd, world.root, policy, tmp_path / "daemon.log")
    try:
        url = daemon.served_at() + "/metrics"
        daemon.wait_for(r"pass 1 ")
        orphans = world.orphan_chain(base, "leak", 3)  # a leak: three snapshots nothing names
        seen: list[float] = []

        def waiting() -> float:
            value = sample(get(url)[1], "obuilder_reconcile_waiting_snapshots", reason="grace")
            seen.append(value)
            return value

        until(lambda: waiting() == 3, what="the three orphans to show as waiting")
        text = get(url)[1]
        assert set(orphans) <= set(containerd.snapshot_keys(namespace)), "gone before their grace period"
        assert sample(text, "obuilder_reconcile_drift_objects", kind="orphan_snapshots") == 0
        # The backlog by kind says the same, and when the first of them may go (within the 4 s grace).
        assert sample(text, "obuilder_reconcile_backlog_objects", kind="snapshot", state="waiting") == 3
        assert 0 < sample(text, "obuilder_reconcile_backlog_next_eligible_seconds", kind="snapshot") <= 4
        until(lambda: not set(orphans) & set(containerd.snapshot_keys(namespace)), what="the orphans to go")
        until(lambda: waiting() == 0, what="the waiting gauge to fall to 0")
        assert max(seen) == 3 and seen[-1] == 0
        text = get(url)[1]
        assert sample(text, "obuilder_reconcile_backlog_objects", kind="snapshot", state="waiting") == 0
        assert sample(text, "obuilder_reconcile_backlog_next_eligible_seconds", kind="snapshot") == 0
        assert re.search(r"3 waiting out their grace period", daemon.text())
        assert re.search(r"backlog: snapshot 3 waiting \(first eligible in [0-4] s\)", daemon.text())
        status = read_status(world.root / "state" / "obuilder-reconcile" / "status.json")
        assert status.backlogs["snapshot"].waiting == 0 and status.backlogs["snapshot"].next_eligible is None
    finally:
        daemon.stop()
