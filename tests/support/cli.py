"""Run ``reconcile`` as a user does: a separate process, its exit code, its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.containerd import SNAPSHOTTER, PrivateContainerd


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


def installed_env(cache: Path) -> dict[str, str]:
    """The environment for timing the command as an installed package runs: its bytecode cached
    (under ``cache``), not compiled at each start, whatever ``PYTHONDONTWRITEBYTECODE`` says."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(cache)
    return env


def reconcile(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> Run:
    """``env``: the whole environment (default: ours)."""
    proc = subprocess.run(
        [sys.executable, "-m", "controller", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
        env=env,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def reconcile_on(
    cd: PrivateContainerd, namespace: str, store: Path, *args: str, env: dict[str, str] | None = None
) -> Run:
    """``reconcile`` pointed at a private containerd and a store."""
    return reconcile(
        "--store", str(store),
        "--address", cd.address,
        "--namespace", namespace,
        "--snapshotter", SNAPSHOTTER,
        *args,
        env=env,
    )  # fmt: skip
