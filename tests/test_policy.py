"""ReconcilePolicy: loading, errors that point at the line, precedence, the CRD and examples."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controller.config.crd import README_END, README_START, crd_document, crd_yaml, reference_markdown
from controller.config.policy import load_policy
from controller.config.settings import Overrides, resolve
from controller.model.errors import PolicyError
from controller.model.plan import Mode
from controller.model.policy import format_duration, parse_duration
from tests.support.cli import reconcile_on
from tests.support.containerd import PrivateContainerd
from tests.support.world import World

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
HEAD = "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: t}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_a_three_line_policy_gets_every_default(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, HEAD))
    t = policy.spec.timing
    assert (t.grace_period, t.stale_after, t.interval, t.max_task_age) == (
        timedelta(minutes=10),
        timedelta(hours=6),
        timedelta(minutes=5),
        None,
    )
    assert policy.spec.ownership.snapshot_prefix == "obuilder-"
    assert policy.spec.limits.max_passes == 10
    assert policy.spec.worker.process_names == ("ocluster-worker", "obuilder")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("10m", timedelta(minutes=10)),
        ("6h", timedelta(hours=6)),
        ("1h30m", timedelta(minutes=90)),
        ("2d", timedelta(days=2)),
        ("500ms", timedelta(milliseconds=500)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_durations_read_and_write_back(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert parse_duration(format_duration(expected)) == expected


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        ("spec:\n  timing:\n    gracePeriods: 10m\n", "6:5", "spec.timing.gracePeriods: unknown field (a typo?)"),
        ("spec:\n  timing: {gracePeriod: 10 minutes}\n", "5:25", "gracePeriod: invalid duration '10 minutes'"),
        ("spec:\n  limits: {maxPasses: many}\n", "5:23", "spec.limits.maxPasses: Input should be a valid integer"),
        ("spec:\n  limits: {maxPasses: 0}\n", "5:23", "maxPasses: Input should be greater than or equal to 1"),
        ("spec:\n  protect:\n    snapshotKeys: ['ok-*', 'obuilder-[ab']\n", "6:28", "snapshotKeys[1]: invalid glob"),
        ("spec:\n  protect: {baseImages: nope}\n", "5:25", "spec.protect.baseImages: Input should be a valid"),
        ("spec:\n  timing: {interval: 1m\n", "6:1", "not valid YAML"),
        ("spec:\n  store: {root: a}\n  store: {root: b}\n", "6:3", "spec.store: duplicate key"),
        ("spec: [1, 2]\n", "4:7", "spec: Input should be a valid dictionary"),
    ],
)
def test_bad_policies_name_file_line_column_and_field(tmp_path: Path, body: str, where: str, message: str) -> None:
    path = write(tmp_path, HEAD + body)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert f"{path}:{where}: " in str(err.value)
    assert message in str(err.value)


def test_wrong_kind_and_missing_metadata_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"2:7: kind: Input should be 'ReconcilePolicy', got 'Policy'"):
        load_policy(write(tmp_path, "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: Policy\nmetadata: {name: x}\n"))
    with pytest.raises(PolicyError, match=r"1:1: metadata: required field is missing"):
        load_policy(write(tmp_path, "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\n"))
    with pytest.raises(PolicyError, match=r"1:1: the file is empty"):
        load_policy(write(tmp_path, "# nothing\n"))


def test_flags_override_the_policy_which_overrides_environment_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEAD + "spec:\n  store: {root: /from-policy}\n  containerd: {namespace: policy-ns, snapshotter: native}\n",
    )
    env = {"CONTAINERD_ADDRESS": "/env.sock", "CONTAINERD_NAMESPACE": "env-ns"}
    s = resolve(Overrides(namespace="flag-ns"), str(path), env)
    assert (str(s.store), s.ctr.address, s.ctr.namespace, s.ctr.snapshotter) == (
        "/from-policy",
        "/env.sock",
        "flag-ns",
        "native",
    )
    assert str(resolve(Overrides(store="/flag"), str(path), env).store) == "/flag"
    assert resolve(Overrides(), str(path), env).ctr.namespace == "policy-ns"


def test_the_windows_example_maps_to_a_windows_connection() -> None:
    s = resolve(Overrides(), str(REPO / "examples" / "windows-hcs-worker.yaml"), {})
    assert str(s.store) == "C:\\obuilder"
    assert s.ctr.address == "\\\\.\\pipe\\containerd-containerd"
    assert (s.ctr.snapshotter, s.ctr.timeout) == ("windows", 120.0)
    assert "mcr.microsoft.com/windows/servercore:ltsc2022" in s.plan_options(Mode.DAEMON).protect_images
    # The deletion limit paces a daemon; a boot run removes everything.
    assert s.plan_options(Mode.DAEMON).max_deletions_per_pass == 500
    assert s.plan_options(Mode.BOOT).max_deletions_per_pass is None


def test_committed_crd_is_what_the_model_generates() -> None:
    committed = (REPO / "crds" / "reconcilepolicy.yaml").read_text()
    assert committed == crd_yaml(), "crds/reconcilepolicy.yaml is stale: run `make crds`"


def test_readme_policy_reference_is_what_the_model_generates() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(README_START) + len(README_START) : readme.index(README_END)]
    assert section.strip() == reference_markdown(), "README's policy reference is stale: run `make crds`"
    for name in ("gracePeriod", "staleAfter", "maxDeletionsPerPass", "baseImages", "processNames"):
        assert name in section


def _crd_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd_document()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate_against_the_crd_schema_and_the_model(path: Path) -> None:
    jsonschema.validate(yaml.safe_load(path.read_text()), _crd_schema())
    load_policy(path)


def test_the_crd_schema_rejects_what_the_model_rejects() -> None:
    bad = yaml.safe_load(HEAD + "spec:\n  timing: {gracePeriod: 10 minutes}\n  limits: {maxPasses: 0}\n")
    errors = list(jsonschema.Draft7Validator(_crd_schema()).iter_errors(bad))
    assert {tuple(e.path) for e in errors} == {("spec", "timing", "gracePeriod"), ("spec", "limits", "maxPasses")}


@pytest.mark.containerd
def test_a_bad_policy_exits_2_and_touches_nothing(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path
) -> None:
    world.orphan_chain(world.base("b:1"), "o", 2)
    before = containerd.snapshot_keys(namespace)
    path = write(tmp_path, HEAD + "spec:\n  timing:\n    gracePeriods: 10m\n")
    run = reconcile_on(containerd, namespace, world.root, "--once", "--policy", str(path))
    assert run.code == 2
    assert f"{path}:6:5: spec.timing.gracePeriods: unknown field" in run.stderr
    assert containerd.snapshot_keys(namespace) == before


@pytest.mark.containerd
def test_protected_orphans_and_their_ancestors_survive_while_unprotected_siblings_go(
    world: World, containerd: PrivateContainerd, namespace: str, tmp_path: Path
) -> None:
    protected_ref = "mcr.microsoft.com/windows/nanoserver:ltsc2022"
    sibling_ref = "mcr.microsoft.com/windows/nanoserver:1809"
    protected = world.base(protected_ref)
    sibling = world.base(sibling_ref)
    for key in (protected, sibling):
        world.buggy_prune(key.removeprefix("obuilder-base-"))
    children = world.orphan_chain(protected, "under-protected", 2)
    chain = world.orphan_chain(sibling, "keep", 3)  # keep-0, keep-1, keep-2 (committed)
    world.prepare("obuilder-keepme-leaf", chain[-1])
    policy = write(
        tmp_path,
        HEAD + f"spec:\n  protect:\n    baseImages: ['{protected_ref}', 'mcr.microsoft.com/typo:1']\n"
        "    snapshotKeys: ['obuilder-keepme-*']\n",
    )
    dry = reconcile_on(containerd, namespace, world.root, "--once", "--dry-run", "--policy", str(policy))
    assert dry.code == 3
    assert f"keep {protected}-committed: protected base image {protected_ref}" in dry.stdout
    assert "keep obuilder-keepme-leaf: protected by snapshotKeys glob 'obuilder-keepme-*'" in dry.stdout
    assert "baseImages 'mcr.microsoft.com/typo:1'" in dry.stdout and "matches no snapshot" in dry.stdout

    run = reconcile_on(containerd, namespace, world.root, "--once", "--policy", str(policy))
    assert run.code == 0, run.stdout + run.stderr
    left = set(containerd.snapshot_keys(namespace))
    assert {protected + "-committed", "obuilder-keepme-leaf", *chain, sibling + "-committed"} <= left
    assert not set(children) & left, "children of a protected base are not protected"
    # The sibling base survives only as an ancestor of the protected leaf; without that leaf it goes.
    containerd.ctr("snapshots", "--snapshotter", "native", "rm", "obuilder-keepme-leaf", namespace=namespace)
    again = reconcile_on(containerd, namespace, world.root, "--once", "--policy", str(policy))
    assert again.code == 0
    left = set(containerd.snapshot_keys(namespace))
    assert protected + "-committed" in left
    assert not {sibling + "-committed", *chain} & left


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LAUGHS, "YAML aliases (*name) are not allowed"),
        ("apiVersion: !!python/name:os.system x\n", "YAML tag 'tag:yaml.org,2002:python/name:os.system'"),
        ("spec: !custom {}\n", "YAML tag '!custom' is not allowed"),
        ("[" * 10_000 + "]" * 10_000, "nested"),
        ("? [a, b]\n: c\n", "a key must be a plain name"),
    ],
    ids=["billion laughs", "python tag", "custom tag", "deep", "complex key"],
)
def test_a_hostile_policy_is_refused_at_once_with_its_place(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert time.monotonic() - started < 1
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_a_huge_or_binary_policy_is_refused_unread(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (10 * 1024 * 1024) + "\n")
    with pytest.raises(PolicyError, match=r"huge.yaml:1:1: larger than 256 KiB"):
        load_policy(huge)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00kind")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(binary)


def test_the_daemons_store_reads_whole_as_often_as_the_policy_says_and_its_loop_keeps_its_budget(
    tmp_path: Path,
) -> None:
    from controller.adapters.store import FsStore
    from controller.core.ports import Reporter

    path = write(
        tmp_path,
        HEAD
        + "spec:\n  store: {root: /s}\n  timing: {interval: 5s, fullReadEvery: 1h}\n"
        + "  limits: {passCpuShare: 0.1}\n",
    )
    s = resolve(Overrides(), str(path), {})
    store = s.ports(Reporter()).store
    assert isinstance(store, FsStore)
    assert (store.resync, store.full_every) == (5.0, 3600.0)
    assert s.spec.limits.pass_cpu_share == 0.1
    with pytest.raises(PolicyError, match="fullReadEvery"):
        load_policy(write(tmp_path, HEAD + "spec:\n  timing: {fullReadEvery: 0s}\n"))
