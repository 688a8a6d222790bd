"""The daemon as a user runs it: ``reconcile`` without ``--once``, its log in a file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.containerd import PrivateContainerd

REPO = Path(__file__).resolve().parents[2]


class DaemonProcess:
    def __init__(
        self, cd: PrivateContainerd, store: Path, policy_file: Path, log: Path, *, env: dict[str, str] | None = None
    ) -> None:
        self.log = log
        self.out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "controller", "--policy", str(policy_file), "--store", str(store)]
        # A port of the system's choosing (served_at reads it): the default one may be taken by another
        # suite or a daemon on this machine.
        argv += ["--metrics-address", "127.0.0.1:0"]
        self.proc = subprocess.Popen(
            [*argv, "--address", cd.address],
            stdout=self.out,
            stderr=self.out,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            assert self.proc.poll() is None, self.text()
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the daemon's log:\n{self.text()}")

    def served_at(self, timeout: float = 30) -> str:
        """The base URL of its /metrics, /healthz and /readyz, once it says where it serves them
        (a policy with ``metrics.address`` on port 0 lets the system pick a free one)."""
        port = self.wait_for(r"serving /metrics.* on 127\.0\.0\.1:(\d+)", timeout=timeout).group(1)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.out.close()
