"""A plan an operator reviews, then applies exactly, on the real containerd: what changed since it
was planned is left alone, with why; the rest goes; a plan for another store or policy is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import Run, reconcile, reconcile_on
from tests.support.containerd import SNAPSHOTTER, PrivateContainerd
from tests.support.world import World


def apply_on(cd: PrivateContainerd, namespace: str, store: Path, *args: str) -> Run:
    """``reconcile apply`` (a subcommand: the first argument) pointed at a private containerd."""
    return reconcile(
        "apply", "--store", str(store), "--address", cd.address, "--namespace", namespace, "--snapshotter",
        SNAPSHOTTER, *args,
    )  # fmt: skip


def policy(path: Path, grace: str = "10m") -> Path:
    path.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: apply}\n"
        f"spec:\n  timing: {{gracePeriod: {grace}}}\n"
    )
    return path


@pytest.mark.containerd
def test_a_plan_applied_after_the_world_changed_skips_exactly_the_changed_objects(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path
) -> None:
    base = world.base("b:apply")
    kept = world.step("kept", base)
    stay = world.orphan_chain(base, "recreated", 1)[0]  # re-created under its key after the plan
    go = world.orphan_chain(base, "go", 2)  # unchanged: goes
    world.step("written", base, finish=False)  # an interrupted build: written to after the plan
    world.step("idle", base, finish=False)  # an interrupted build left as it was: goes
    plan_file, p = tmp_path / "plan.json", policy(tmp_path / "p.yaml")

    made = reconcile_on(containerd, namespace, world.root, "--once", "--dry-run", "--plan-out", str(plan_file),
                        "--policy", str(p))  # fmt: skip
    assert made.code == 3, made.stderr
    planned = json.loads(plan_file.read_text())
    assert {s["key"] for s in planned["snapshots"]} >= {stay, *go, "obuilder-written", "obuilder-idle"}
    assert {e["id"] for e in planned["tmp_entries"]} == {"written", "idle"}

    # The world moves on: OBuilder retries a build under the same id, and an entry is written to.
    world.ctr("snapshots", "--snapshotter", "native", "rm", "--", stay)
    world.prepare(stay, base + "-committed")
    (world.root / "result-tmp" / "written" / "log").write_text("building... and more\n")

    applied = apply_on(containerd, namespace, world.root, "--json", "--policy", str(p), str(plan_file))
    left = json.loads(applied.stdout)
    assert applied.code == 1, applied.stderr
    reasons = {s["name"]: s["reason"] for s in left["skipped"]}
    # Exactly what changed: the re-created key, the written entry and the snapshot of its build.
    assert set(reasons) == {stay, "written", "obuilder-written"}, reasons
    assert reasons[stay].startswith("re-created since planned")
    assert reasons["written"] == "changed since planned"
    assert "result-tmp/ entry changed since planned" in reasons["obuilder-written"]
    keys = set(containerd.snapshot_keys(namespace))
    assert {stay, "obuilder-written"} <= keys and kept + "-committed" in keys
    assert not set(go) & keys and "obuilder-idle" not in keys
    assert not (world.root / "result-tmp" / "idle").exists()
    assert (world.root / "result-tmp" / "written").is_dir()


@pytest.mark.containerd
def test_a_plan_for_another_store_or_policy_is_refused_and_changes_nothing(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path
) -> None:
    base = world.base("b:refuse")
    orphan = world.orphan_chain(base, "o", 1)[0]
    plan_file, p = tmp_path / "plan.json", policy(tmp_path / "p.yaml")
    made = reconcile_on(containerd, namespace, world.root, "--once", "--dry-run", "--plan-out", str(plan_file),
                        "--policy", str(p))  # fmt: skip
    assert made.code == 3, made.stderr
    other = policy(tmp_path / "other.yaml", grace="5m")
    refused = apply_on(containerd, namespace, world.root, "--policy", str(other), str(plan_file))
    assert refused.code == 2 and "another policy" in refused.stderr
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"format": "something else"}')
    refused = apply_on(containerd, namespace, world.root, "--policy", str(p), str(bogus))
    assert refused.code == 2 and "bogus.json: not a plan of this tool: format" in refused.stderr
    assert orphan in containerd.snapshot_keys(namespace), "a refused plan changed something"
    done = apply_on(containerd, namespace, world.root, "--policy", str(p), str(plan_file))
    assert done.code == 0, done.stdout + done.stderr
    assert orphan not in containerd.snapshot_keys(namespace)
