"""Leaks of OBuilder's HCS sandbox outside the store: ``obuilder-hcs-*`` temp folders (with the
job's secrets) and the HCN namespaces their config.json names."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.adapters import platform, sandbox_leaks
from controller.adapters.sandbox_leaks import LeakedSandbox, find, namespaces_not_owned, remove
from tests.support.cli import reconcile_on
from tests.support.containerd import PrivateContainerd
from tests.support.world import create_store

NS = "1b4d7a52-9a0e-4c1f-8d3b-2f6e0c9a7e11"
NS2 = "5c2e8b61-0b1f-4d20-9e4c-3a7f1d0b8f22"
FAILING_NS = "fa11fa11-0000-4000-8000-000000000bad"

_TOOL = """\
import json, sys
with open({log!r}, "a", encoding="utf-8") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:1] == ["list"]:
    with open({listing!r}, encoding="utf-8") as f:
        sys.stdout.write(f.read())
    sys.exit(0)
if len(args) == 2 and args[0] == "delete" and args[1].startswith("fa11"):
    sys.stderr.write("boom: HcnDeleteNamespace failed\\n")
    sys.exit(3)
sys.exit(0 if len(args) == 2 and args[0] == "delete" else 2)
"""


class FakeTool:
    """An ``hcn-namespace`` stand-in: records each call's arguments, fails to delete ``fa11*``."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.log = folder / "calls.jsonl"
        self.listing = folder / "listing.txt"
        self.listing.write_text("")
        script = folder / "hcn_namespace.py"
        script.write_text(f"#!{sys.executable}\n" + _TOOL.format(log=str(self.log), listing=str(self.listing)))
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        self.path = str(script)
        if os.name == "nt":  # no shebangs: a batch file hands the arguments on
            wrapper = folder / "hcn_namespace.cmd"
            wrapper.write_text(f'@"{sys.executable}" "{script}" %*\r\n')
            self.path = str(wrapper)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def tool(tmp_path: Path) -> FakeTool:
    return FakeTool(tmp_path / "tool")


def _sandbox(temp: Path, name: str, config: str | None = None, secrets: dict[int, str] | None = None) -> Path:
    folder = temp / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(config)
    for n, value in (secrets or {}).items():
        secret = folder / "secrets" / str(n) / "secret"
        secret.parent.mkdir(parents=True)
        secret.write_text(value)
        secret.chmod(0o400)  # read-only, as a careful writer would leave it
    return folder


def _config(namespace: Any) -> str:
    """An OCI config.json shaped as OBuilder's ``Json_config.make`` writes it with host networking."""
    return json.dumps(
        {
            "ociVersion": "1.1.0",
            "process": {"args": ["cmd", "/c", "echo"], "cwd": "C:/", "user": {"username": "ContainerAdministrator"}},
            "root": {"path": "", "readonly": False},
            "hostname": "builder",
            "windows": {
                "layerFolders": [r"C:\ProgramData\containerd\snapshots\12"],
                "ignoreFlushesDuringBoot": True,
                "network": {"allowUnqualifiedDNSQuery": True, "networkNamespace": namespace},
            },
        },
        indent=2,
    )


def _link(link: Path, target: Path) -> None:
    try:
        os.symlink(target, link, target_is_directory=True)
    except OSError as e:  # Windows without the privilege
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot make a symlink here: {e}")


class World:
    """The temp folder of a crashed worker, and things beside it that must survive."""

    def __init__(self, root: Path) -> None:
        self.temp = root / "Temp"
        self.full = _sandbox(self.temp, "obuilder-hcs-1a2b3c", _config(NS), {0: "s3cr3t", 1: "token"})
        self.bare = _sandbox(self.temp, "obuilder-hcs-4d5e6f")
        (self.bare / "stray.txt").write_text("x")
        self.broken = _sandbox(self.temp, "obuilder-hcs-789abc", '{"windows": {"network": ')
        # A link named like a sandbox, pointing at a folder elsewhere that itself looks like one.
        self.outside = _sandbox(root / "elsewhere", "precious", _config(NS2), {0: "not ours"})
        self.link = self.temp / "obuilder-hcs-link00"
        _link(self.link, self.outside)
        self.unrelated = _sandbox(self.temp, "obuilder-docker-aaaaaa", _config(NS2), {0: "keep"})
        self.other = self.temp / "someone-else"
        self.other.mkdir()
        (self.other / "data").write_text("keep")
        self.plain_file = self.temp / "obuilder-hcs-notafolder"
        self.plain_file.write_text("a file, not OBuilder's")

    def assert_bystanders_intact(self) -> None:
        assert (self.outside / "secrets" / "0" / "secret").read_text() == "not ours"
        assert json.loads((self.outside / "config.json").read_text())["windows"]["network"]["networkNamespace"] == NS2
        assert (self.unrelated / "secrets" / "0" / "secret").read_text() == "keep"
        assert (self.other / "data").read_text() == "keep"
        assert self.plain_file.read_text() == "a file, not OBuilder's"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def _by_name(leaks: tuple[LeakedSandbox, ...]) -> dict[str, LeakedSandbox]:
    return {leak.name: leak for leak in leaks}


# -- find ------------------------------------------------------------------------------------


def test_find_reports_every_prefixed_folder_and_link_and_nothing_else(world: World) -> None:
    leaks = _by_name(find(world.temp))
    assert sorted(leaks) == ["obuilder-hcs-1a2b3c", "obuilder-hcs-4d5e6f", "obuilder-hcs-789abc", "obuilder-hcs-link00"]

    full = leaks["obuilder-hcs-1a2b3c"]
    assert (full.namespace, full.has_secrets, full.has_config, full.config_error, full.is_link) == (
        NS,
        True,
        True,
        None,
        False,
    )
    assert full.path == os.path.join(str(world.temp), "obuilder-hcs-1a2b3c")

    bare = leaks["obuilder-hcs-4d5e6f"]
    assert (bare.has_config, bare.namespace, bare.has_secrets, bare.config_error) == (False, None, False, None)

    broken = leaks["obuilder-hcs-789abc"]
    assert broken.has_config and broken.namespace is None
    assert broken.config_error is not None and "does not parse" in broken.config_error

    # The link is never followed: the namespace and secrets behind it are not its.
    link = leaks["obuilder-hcs-link00"]
    assert (link.is_link, link.namespace, link.has_secrets, link.has_config) == (True, None, False, False)


def test_find_in_a_missing_temp_folder_finds_nothing(tmp_path: Path) -> None:
    assert find(tmp_path / "no-such-folder") == ()


@pytest.mark.parametrize("prefix", ["", ".", "..", "a/b", "a\\b"])
def test_a_prefix_that_would_reach_beyond_the_sandboxes_is_refused(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ValueError):
        find(tmp_path, prefix)


def test_a_different_prefix_is_honoured(world: World) -> None:
    assert [leak.name for leak in find(world.temp, "obuilder-docker-")] == ["obuilder-docker-aaaaaa"]


@pytest.mark.parametrize(
    ("text", "namespace", "error"),
    [
        (_config(NS), NS, None),
        (_config(f"  {NS}\n"), NS, None),  # OBuilder trims the tool's output; we trim too
        (json.dumps({"windows": {"layerFolders": []}}), None, None),  # no host network
        (json.dumps({"process": {}}), None, None),
        (_config(42), None, "windows.network.networkNamespace is not a string"),
        (_config("   "), None, "windows.network.networkNamespace is empty"),
        (json.dumps({"windows": ["x"]}), None, "windows is not a JSON object"),
        (json.dumps([1, 2]), None, "the document is not a JSON object"),
        ("\ufeff" + _config(NS), NS, None),  # a byte-order mark
        ("[" * 100_000, None, "does not parse"),
        ("\udcff", None, "does not parse"),
    ],
)
def test_config_json_is_read_defensively(tmp_path: Path, text: str, namespace: str | None, error: str | None) -> None:
    folder = tmp_path / "obuilder-hcs-x"
    folder.mkdir()
    (folder / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    (leak,) = find(tmp_path)
    assert leak.namespace == namespace
    if error is None:
        assert leak.config_error is None
    else:
        assert leak.config_error is not None and error in leak.config_error


def test_a_config_json_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(_config(NS))
    folder = tmp_path / "temp" / "obuilder-hcs-x"
    folder.mkdir(parents=True)
    try:
        os.symlink(outside, folder / "config.json")
    except OSError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot make a symlink here: {e}")
    (leak,) = find(tmp_path / "temp")
    assert leak.namespace is None and leak.config_error is not None and "not followed" in leak.config_error


def test_an_oversized_config_json_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_leaks, "CONFIG_MAX_BYTES", 100)
    _sandbox(tmp_path, "obuilder-hcs-x", _config(NS))
    (leak,) = find(tmp_path)
    assert leak.namespace is None and leak.config_error is not None and "larger than" in leak.config_error


# -- remove ----------------------------------------------------------------------------------


def test_remove_deletes_secrets_folders_link_and_namespace(world: World, tool: FakeTool) -> None:
    results = {Path(r.path).name: r for r in remove(find(world.temp), hcn_tool=tool.path)}

    assert not (world.full / "secrets").exists()
    for gone in (world.full, world.bare, world.broken):
        assert not gone.exists()
    assert not os.path.lexists(world.link)
    assert tool.calls() == [["delete", NS]]
    world.assert_bystanders_intact()

    full = results["obuilder-hcs-1a2b3c"]
    assert full.ok and full.removed and full.secrets_removed and not full.errors
    assert full.namespace is not None
    assert (full.namespace.namespace, full.namespace.deleted, full.namespace.exit_code) == (NS, True, 0)
    link = results["obuilder-hcs-link00"]
    assert link.is_link and link.removed and not link.secrets_removed and link.namespace is None
    assert all(r.ok for r in results.values())
    assert sorted(os.listdir(world.temp)) == ["obuilder-docker-aaaaaa", "obuilder-hcs-notafolder", "someone-else"]


def test_secrets_go_before_the_folder(tmp_path: Path, tool: FakeTool, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _sandbox(tmp_path, "obuilder-hcs-x", _config(NS), {0: "s"})
    removed: list[str] = []
    real = platform.remove_tree

    def recording(path: str, **kwargs: Any) -> None:
        removed.append(path)
        real(path, **kwargs)

    monkeypatch.setattr(platform, "remove_tree", recording)
    remove(find(tmp_path), hcn_tool=tool.path)
    assert removed == [str(folder / "secrets"), str(folder)]


def test_a_tool_failure_is_reported_and_stops_nothing(tmp_path: Path, tool: FakeTool) -> None:
    failing = _sandbox(tmp_path, "obuilder-hcs-aaaaaa", _config(FAILING_NS), {0: "s"})
    good = _sandbox(tmp_path, "obuilder-hcs-bbbbbb", _config(NS), {0: "s"})
    first, second = remove(find(tmp_path), hcn_tool=tool.path)

    assert first.namespace is not None
    assert (first.namespace.deleted, first.namespace.exit_code) == (False, 3)
    assert first.namespace.stderr == "boom: HcnDeleteNamespace failed"
    assert not first.ok
    assert first.removed and first.secrets_removed  # the folder went all the same
    assert second.ok and second.namespace is not None and second.namespace.deleted
    assert not failing.exists() and not good.exists()
    assert tool.calls() == [["delete", FAILING_NS], ["delete", NS]]


@pytest.mark.parametrize("namespace", ["-rf", "--help", "-"])
def test_a_namespace_beginning_with_a_dash_is_refused(tmp_path: Path, tool: FakeTool, namespace: str) -> None:
    folder = _sandbox(tmp_path, "obuilder-hcs-x", _config(namespace), {0: "s"})
    (result,) = remove(find(tmp_path), hcn_tool=tool.path)
    assert tool.calls() == []
    assert result.namespace is not None and not result.namespace.deleted
    assert result.namespace.skipped is not None and "refused" in result.namespace.skipped
    assert result.removed and not folder.exists()


def test_a_namespace_with_blanks_inside_is_refused(tool: FakeTool) -> None:
    leak = LeakedSandbox(path="/nonexistent/obuilder-hcs-x", name="obuilder-hcs-x", namespace="a b")
    (result,) = remove([leak], hcn_tool=tool.path)
    assert result.namespace is not None and result.namespace.skipped is not None
    assert tool.calls() == []


def test_without_a_tool_the_namespace_is_only_reported(tmp_path: Path) -> None:
    folder = _sandbox(tmp_path, "obuilder-hcs-x", _config(NS), {0: "s"})
    (result,) = remove(find(tmp_path), hcn_tool=None)
    assert not folder.exists() and result.removed
    assert result.namespace is not None and result.namespace.skipped == "no hcn-namespace tool configured"


def test_a_missing_tool_is_an_error_not_a_crash(tmp_path: Path) -> None:
    _sandbox(tmp_path, "obuilder-hcs-a", _config(NS))
    _sandbox(tmp_path, "obuilder-hcs-b", _config(NS2))
    results = remove(find(tmp_path), hcn_tool=str(tmp_path / "no-such-tool"))
    assert len(results) == 2
    for r in results:
        assert r.removed and r.namespace is not None and not r.namespace.deleted
        assert r.namespace.error is not None and "cannot run" in r.namespace.error


def test_the_tool_is_called_with_an_argument_list_and_a_timeout(tmp_path: Path) -> None:
    _sandbox(tmp_path, "obuilder-hcs-a", _config(NS))
    seen: list[tuple[Any, dict[str, Any]]] = []

    def run(argv: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.append((argv, kwargs))
        raise subprocess.TimeoutExpired(argv, kwargs["timeout"])

    (result,) = remove(find(tmp_path), hcn_tool=r"C:\tools\hcn-namespace.exe", run=run, timeout=7)
    ((argv, kwargs),) = seen
    assert argv == [r"C:\tools\hcn-namespace.exe", "delete", NS]
    assert kwargs["timeout"] == 7 and not kwargs.get("shell")
    assert result.namespace is not None and result.namespace.error is not None
    assert "longer than 7s" in result.namespace.error
    assert result.removed


def test_a_folder_that_cannot_go_is_reported_and_the_others_still_go(
    tmp_path: Path, tool: FakeTool, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = _sandbox(tmp_path, "obuilder-hcs-a", _config(FAILING_NS), {0: "s"})
    other = _sandbox(tmp_path, "obuilder-hcs-b", _config(NS), {0: "s"})
    real = platform.remove_tree

    def held(path: str, **kwargs: Any) -> None:
        if path.startswith(str(stuck)):
            raise PermissionError(13, "held by another process", path)
        real(path, **kwargs)

    monkeypatch.setattr(platform, "remove_tree", held)
    first, second = remove(find(tmp_path), hcn_tool=tool.path)
    assert not first.removed and not first.secrets_removed and len(first.errors) == 2
    assert first.errors[0].startswith("secrets: held by another process")
    assert first.namespace is not None and first.namespace.exit_code == 3  # still tried
    assert second.ok and not other.exists()
    assert tool.calls() == [["delete", FAILING_NS], ["delete", NS]]


def test_a_leak_gone_meanwhile_is_fine(tmp_path: Path, tool: FakeTool) -> None:
    folder = _sandbox(tmp_path, "obuilder-hcs-x", _config(NS), {0: "s"})
    leaks = find(tmp_path)
    platform.remove_tree(str(folder))
    (result,) = remove(leaks, hcn_tool=tool.path)
    assert result.ok and tool.calls() == [["delete", NS]]


def test_results_are_immutable(tmp_path: Path) -> None:
    _sandbox(tmp_path, "obuilder-hcs-x")
    (leak,) = find(tmp_path)
    (result,) = remove([leak], hcn_tool=None)
    with pytest.raises(ValueError):
        leak.namespace = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        result.removed = False  # type: ignore[misc]


# -- namespaces_not_owned --------------------------------------------------------------------


def test_without_a_known_list_command_we_cannot_tell(tool: FakeTool) -> None:
    assert namespaces_not_owned(tool.path, set()) is None
    assert namespaces_not_owned(None, set(), list_args=("list",)) is None
    assert tool.calls() == []  # never probed: an unknown command might create a namespace


def test_listed_namespaces_no_live_run_owns(tool: FakeTool) -> None:
    tool.listing.write_text(f"{NS}\n{{{NS2.upper()}}}\n\n{FAILING_NS}\n{NS}\n")
    found = namespaces_not_owned(tool.path, {NS2}, list_args=("list",))
    assert found == tuple(sorted([NS, FAILING_NS]))
    assert tool.calls() == [["list"]]


@pytest.mark.parametrize("listing", ["Usage: hcn-namespace create|delete NS\n", f"{NS} host\n"])
def test_a_listing_we_cannot_read_is_none(tool: FakeTool, listing: str) -> None:
    tool.listing.write_text(listing)
    assert namespaces_not_owned(tool.path, set(), list_args=("list",)) is None


def test_a_listing_that_fails_is_none(tool: FakeTool, tmp_path: Path) -> None:
    assert namespaces_not_owned(tool.path, set(), list_args=("enumerate",)) is None  # exits 2
    assert namespaces_not_owned(str(tmp_path / "missing"), set(), list_args=("list",)) is None


@pytest.mark.containerd
def test_the_boot_pass_removes_a_leaked_sandbox_with_its_secret_and_deletes_its_namespace(
    tmp_path: Path, tool: FakeTool, containerd: PrivateContainerd, namespace: str
) -> None:
    """`reconcile --once` with spec.worker.tempDir and hcnNamespaceTool set: a crash's sandbox folder
    (its job's secret inside) is gone after the boot pass, its namespace deleted through the tool."""
    store = create_store(tmp_path / "store")
    temp = tmp_path / "worker-temp"
    leaked = _sandbox(temp, "obuilder-hcs-crash", _config("5eed0000-0000-4000-8000-000000000001"), {0: "token"})
    other = _sandbox(temp, "someone-else")
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "apiVersion: reconcile.obuilder.io/v1alpha1\nkind: ReconcilePolicy\nmetadata: {name: t}\nspec:\n"
        f"  worker: {{tempDir: '{temp}', hcnNamespaceTool: '{tool.path}'}}\n"
    )
    run = reconcile_on(containerd, namespace, store, "--once", "--policy", str(policy))
    assert run.code == 0, run.stderr
    assert not leaked.exists(), "the secret of a crashed run stayed on disk"
    assert other.is_dir()
    assert tool.calls() == [["delete", "5eed0000-0000-4000-8000-000000000001"]]
    assert "removed leaked sandbox" in run.stderr
