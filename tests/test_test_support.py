"""The test harness keeps its promises: a private containerd leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.containerd import PrivateContainerd
from tests.support.world import World


def _cmdlines() -> list[bytes]:
    out = []
    for pid in (p for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            out.append((pid / "cmdline").read_bytes())
        except OSError:
            continue
    return out


@pytest.mark.containerd
def test_a_stopped_private_containerd_leaves_no_process_mount_or_folder(containerd: PrivateContainerd) -> None:
    # The session daemon proves containerd works here; this one is started and stopped in the test.
    run_containerd_existed = Path("/run/containerd").exists()
    cd = PrivateContainerd().start()
    try:
        world = World(cd, "leaky", cd.base / "store")
        world.leak_container("obuilder-run-1", task="running")
        world.leak_container("obuilder-run-2", task="stopped")
        assert any(cd.address.encode() in c and b"shim" in c for c in _cmdlines())
    finally:
        cd.stop()
    assert not any(cd.address.encode() in c for c in _cmdlines()), "a daemon or shim outlived stop()"
    assert not any(str(cd.base) in line for line in Path("/proc/self/mounts").read_text().splitlines())
    assert not cd.base.exists()
    assert Path("/run/containerd").exists() == run_containerd_existed
