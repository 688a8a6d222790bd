"""Parsing what ctr prints and sorting its errors; the real daemon confirms the shapes."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from controller.adapters.ctr import (
    Ctr,
    CtrSettings,
    chunk_args,
    classify,
    go_quote,
    parse_container_info,
    parse_snapshots,
    parse_table,
)
from controller.model.errors import CtrError, CtrNotFoundError, CtrTimeoutError
from controller.model.outcome import Outcome
from tests.support.containerd import SNAPSHOTTER, PrivateContainerd
from tests.support.world import World

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ctr"

# Shape of `ctr snapshots ls` (tabwriter, minwidth 1, padding 1): an empty PARENT
# is only blanks, and a key may contain spaces.
SNAPSHOTS_LS = (
    "KEY                    PARENT                 KIND      \n"
    "obuilder-a b           sha256:0123            Active    \n"
    "obuilder-x-committed                          Committed \n"
    "sha256:0123                                   Committed \n"
)


def test_table_is_cut_at_header_columns_not_blanks() -> None:
    rows = parse_table(SNAPSHOTS_LS)
    assert rows == [
        {"KEY": "obuilder-a b", "PARENT": "sha256:0123", "KIND": "Active"},
        {"KEY": "obuilder-x-committed", "PARENT": "", "KIND": "Committed"},
        {"KEY": "sha256:0123", "PARENT": "", "KIND": "Committed"},
    ]
    assert parse_table("") == []


def test_windows_container_info_gives_layer_folders() -> None:
    c = parse_container_info((FIXTURES / "windows-container-info.json").read_text())
    assert c.id == "obuilder-run-173245"
    assert c.snapshot_key == "" and c.root_path == ""
    assert len(c.layer_folders) == 15
    assert c.layer_folders[-1].endswith("\\snapshots\\4711")
    assert c.created_at is not None and c.created_at.year == 2026


@pytest.mark.parametrize(
    ("stderr", "outcome"),
    [
        ('ctr: failed to remove "k": snapshot k does not exist: not found', Outcome.NOT_FOUND),
        ('ctr: failed to remove "k": cannot remove snapshot with child: failed precondition', Outcome.HAS_CHILD),
        ('ctr: container "c" in namespace "default": not found', Outcome.NOT_FOUND),
        ("ctr: failed to dial: context deadline exceeded", Outcome.FAILED),
    ],
)
def test_errors_are_classified(stderr: str, outcome: Outcome) -> None:
    assert classify(stderr).outcome is outcome


@pytest.mark.parametrize(
    ("name", "stderr", "outcome"),
    [
        # ctr's own forms, 1.6 to 2.1, about the object named: gone.
        ("k", 'ctr: failed to remove "k": snapshot k does not exist: not found', Outcome.NOT_FOUND),
        ("c", 'ctr: container "c" in namespace "default": not found', Outcome.NOT_FOUND),
        ("c", 'container "c" in namespace "default": not found', Outcome.NOT_FOUND),
        ("c", "no running task found: task c not found: not found", Outcome.NOT_FOUND),
        ("c", "ctr: no running task found: task c not found", Outcome.NOT_FOUND),  # containerd 2.1
        ("c", "ctr: no running task found: task cc not found", Outcome.FAILED),
        # Not found, but about something else: the object is still there.
        ("k", 'ctr: failed to remove "k": parent snapshot p does not exist: not found', Outcome.FAILED),
        ("k", 'ctr: failed to remove "k": snapshot kk does not exist: not found', Outcome.FAILED),
        # HCS says "does not exist" of a compute system while the container lives on: a failure.
        (
            "obuilder-run-7",
            "ctr: hcsshim::System::Terminate obuilder-run-7: A virtual machine or container with the specified "
            "identifier does not exist.",
            Outcome.FAILED,
        ),
        (
            "k",
            'ctr: failed to remove "k": The process cannot access the file because it is being used by another '
            "process.",
            Outcome.FAILED,
        ),
        ("k", 'ctr: failed to remove "k": context deadline exceeded', Outcome.FAILED),
        ("k", 'ctr: failed to remove "k": cannot remove snapshot with child: failed precondition', Outcome.HAS_CHILD),
    ],
)
def test_not_found_means_the_named_object_is_gone_never_a_loose_match(name: str, stderr: str, outcome: Outcome) -> None:
    assert classify(stderr, name).outcome is outcome


def test_chunks_respect_the_command_line_budget() -> None:
    names = [f"obuilder-{i:04d}" for i in range(1000)]
    chunks = list(chunk_args(names, budget=1000))
    assert [n for c in chunks for n in c] == names
    assert all(sum(len(n) + 3 for n in c) <= 1000 for c in chunks)
    assert len(chunks) == 17


def test_go_quote_matches_ctr_messages() -> None:
    assert go_quote("obuilder-a") == '"obuilder-a"'
    assert go_quote('we"ird\\key\n') == '"we\\"ird\\\\key\\n"'


def test_missing_ctr_and_timeouts_are_errors_a_user_can_read(tmp_path: Path) -> None:
    with pytest.raises(CtrNotFoundError, match="cannot run"):
        Ctr(CtrSettings(ctr=str(tmp_path / "no-ctr"))).snapshots()
    slow = tmp_path / "slow-ctr"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    with pytest.raises(CtrTimeoutError, match=r"timed out after 0\.2s"):
        Ctr(CtrSettings(ctr=str(slow), timeout=0.2)).snapshots()


@pytest.mark.parametrize("impostor", ["/bin/true", "prints something else", "fails"])
def test_a_ctr_that_is_not_ctr_is_refused_by_its_version_before_anything_is_believed(
    tmp_path: Path, impostor: str
) -> None:
    # /bin/true answers every call with nothing and exit 0: every store would look clean.
    exe = tmp_path / "ctr"
    if impostor == "/bin/true":
        exe = Path("/bin/true")
    else:
        exe.write_text("#!/bin/sh\necho 'Usage: tool [options]'\n" + ("exit 3\n" if impostor == "fails" else ""))
        exe.chmod(0o755)
    with pytest.raises(CtrNotFoundError, match=r"is not ctr: `--version` exited \d+ and printed"):
        Ctr(CtrSettings(ctr=str(exe))).snapshots()


def test_ctr_is_asked_its_version_once_per_executable(tmp_path: Path) -> None:
    asked = tmp_path / "asked"
    exe = tmp_path / "ctr"
    exe.write_text(
        f'#!/bin/sh\nfor a; do [ "$a" = --version ] && echo x >> {asked} '
        "&& echo 'ctr github.com/containerd/containerd/v2 2.1.1' && exit 0; done\necho 'KEY PARENT KIND'\n"
    )
    exe.chmod(0o755)
    for _ in range(2):
        ctr = Ctr(CtrSettings(ctr=str(exe)))
        assert ctr.snapshots() == () and ctr.snapshots() == ()
        assert ctr.calls == 2  # the version is not a pass's cost
    assert asked.read_text().count("x") == 1
    assert Ctr(CtrSettings(ctr=str(exe))).check_identity() == "ctr github.com/containerd/containerd/v2 2.1.1"
    exe.write_text("#!/bin/sh\necho nope\n")  # replaced: asked again
    with pytest.raises(CtrNotFoundError, match="'nope'"):
        Ctr(CtrSettings(ctr=str(exe))).snapshots()


class Printing(Ctr):
    """A ctr whose ``snapshots ls`` prints ``text``: the parse alone, no process."""

    def __init__(self, text: str) -> None:
        super().__init__(CtrSettings())
        self.text = text

    def output(self, args: Sequence[str]) -> str:
        return self.text


def test_a_snapshot_listing_reuses_the_records_of_the_rows_printed_as_last_time() -> None:
    # At 50,000 snapshots, building every record again at every pass cost 0.2 s a pass.
    ctr = Printing(SNAPSHOTS_LS)
    first = ctr.snapshots()
    assert ctr.snapshots() is first, "a listing printed as before is the same tuple"
    ctr.text = SNAPSHOTS_LS.replace("sha256:0123            Active    ", "sha256:0123            Committed ")
    second = ctr.snapshots()
    assert second == parse_snapshots(ctr.text)
    assert second[0].kind == "Committed" and second[0] is not first[0]
    assert second[1] is first[1] and second[2] is first[2]
    ctr.text = "KEY PARENT KIND\n"
    assert ctr.snapshots() == ()
    ctr.text = SNAPSHOTS_LS
    assert ctr.snapshots() == first, "the listing it reuses from is the last one read, not the first"


def test_a_row_is_read_again_under_another_header() -> None:
    # A row's cells are cut at its header's columns: the same row under another header is
    # other cells, here a kind ctr does not print, which must not pass as the old record.
    row = "obuilder-x  p1          Active\n"
    ctr = Printing("KEY         PARENT      KIND\n" + row)
    assert ctr.snapshots()[0].parent == "p1"
    ctr.text = "KEY PARENT  KIND\n" + row
    with pytest.raises(CtrError, match="does not fit the table"):
        ctr.snapshots()


def test_threads_listing_at_once_each_read_the_listing_they_were_printed() -> None:
    texts = [SNAPSHOTS_LS, SNAPSHOTS_LS.replace("obuilder-x-committed", "obuilder-y-committed")]
    expected = [parse_snapshots(t) for t in texts]
    lock, turn = threading.Lock(), [0]
    printed = threading.local()

    class Alternating(Printing):
        def output(self, args: Sequence[str]) -> str:
            with lock:
                turn[0] += 1
                which = turn[0] % 2
            printed.which = which
            return texts[which]

    ctr = Alternating("")
    wrong: list[int] = []

    def lists() -> None:
        for _ in range(300):
            if ctr.snapshots() != expected[printed.which]:
                wrong.append(printed.which)

    threads = [threading.Thread(target=lists) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


@pytest.mark.containerd
def test_real_ctr_output_parses_and_removal_is_batched_and_idempotent(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    # One process for the batch, to see how ctr itself goes on after a failed key.
    ctr = Ctr(CtrSettings(address=containerd.address, namespace=namespace, snapshotter=SNAPSHOTTER, parallelism=1))
    world.prepare("obuilder-with space", world.image_layer)
    world.prepare("-looks-like-a-flag", world.image_layer)
    snaps = {s.key: s for s in ctr.snapshots()}
    assert snaps["obuilder-with space"].parent == world.image_layer
    assert snaps["obuilder-with space"].kind == "Active"
    assert snaps[world.image_layer].parent is None

    world.prepare("obuilder-p", world.image_layer)
    parent = world.commit("obuilder-p")
    world.prepare("obuilder-child", parent)

    ctr.calls = 0
    results = ctr.remove_snapshots(["obuilder-with space", "gone-already", "-looks-like-a-flag", parent])
    assert results["obuilder-with space"].outcome is Outcome.REMOVED
    assert results["gone-already"].outcome is Outcome.NOT_FOUND
    assert results["-looks-like-a-flag"].outcome is Outcome.REMOVED
    assert results[parent].outcome is Outcome.HAS_CHILD
    # The first call stopped at the missing key, the second went on after it.
    assert ctr.calls == 2
    assert set(containerd.snapshot_keys(namespace)) == {world.image_layer, parent, "obuilder-child"}


@pytest.mark.containerd
def test_real_container_and_task_removal_report_each_id(
    world: World, containerd: PrivateContainerd, namespace: str
) -> None:
    ctr = Ctr(CtrSettings(address=containerd.address, namespace=namespace, snapshotter=SNAPSHOTTER))
    world.leak_container("obuilder-run-1", task="running")
    tasks = ctr.delete_tasks(["obuilder-run-1", "obuilder-run-missing"])
    assert tasks["obuilder-run-1"].outcome is Outcome.REMOVED
    assert tasks["obuilder-run-missing"].outcome is Outcome.NOT_FOUND
    removed = ctr.remove_containers(["obuilder-run-missing", "obuilder-run-1"])
    assert removed["obuilder-run-1"].outcome is Outcome.REMOVED
    assert removed["obuilder-run-missing"].outcome is Outcome.NOT_FOUND
    assert containerd.container_ids(namespace) == []
