"""A private containerd for one test session (or one demo), and its clean-up.

Everything lives under one temp folder: root, state, socket, runc state, ctr's
fifos, the log; the daemon runs in its own mount namespace with a private
``/run``. It never talks to, or writes beside, the machine's own containerd. Stopping it
kills the tasks, the daemon and any shim it left, unmounts what is mounted
under the folder and removes the folder, even after a failed test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.image import REF, write_oci_archive

SNAPSHOTTER = "native"


class ContainerdUnavailable(RuntimeError):
    """Raised when containerd, ctr, runc or busybox is missing, or we are not root."""


def missing_tools() -> list[str]:
    missing = [t for t in ("containerd", "ctr", "runc", "unshare") if shutil.which(t) is None]
    if not Path("/bin/busybox").exists():
        missing.append("/bin/busybox (busybox-static)")
    if os.geteuid() != 0:
        missing.append("root privileges")
    return missing


def _rows(table: str) -> list[dict[str, str]]:
    """ctr's tables, read here without the product's parser (so the tests check it, not lean on
    it): each cell starts where its header's name starts. Test names hold no blanks."""
    lines = [line for line in table.splitlines() if line.strip()]
    if not lines:
        return []
    names = lines[0].split()
    starts = [lines[0].index(name) for name in names]
    out = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], len(line)], strict=True)]
        out.append(dict(zip(names, cells, strict=True)))
    return out


def _become_subreaper() -> None:
    """Shims double-fork away from containerd; as a subreaper we inherit them and
    can reap them at the end, instead of leaving zombies under PID 1."""
    import ctypes

    pr_set_child_subreaper = 36
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _reap_orphans() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class PrivateContainerd:
    def __init__(self, base: Path | None = None) -> None:
        # A short path: a unix socket path must fit in 108 bytes.
        self.base = base if base is not None else Path(tempfile.mkdtemp(prefix="obr-"))
        self.base.mkdir(parents=True, exist_ok=True)
        self.address = str(self.base / "c.sock")
        self.runc_root = self.base / "runc"
        self.fifo_dir = self.base / "fifo"
        self.log_path = self.base / "containerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.image_ref = REF

    # -- life cycle ----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PrivateContainerd:
        missing = missing_tools()
        if missing:
            raise ContainerdUnavailable("cannot start a private containerd: missing " + ", ".join(missing))
        _become_subreaper()
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base / "root"}"\n'
            f'state = "{self.base / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[debug]\n"
            '  level = "warn"\n'
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            # containerd 1.6 puts shim sockets under /run/containerd/s whatever its
            # config says; a private mount namespace with its own /run keeps even
            # those off the machine's containerd folder.
            script = 'mount -t tmpfs obr-run /run && exec containerd --config "$1"'
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerdUnavailable(f"containerd exited at start-up: {self.log_tail()}")
            if os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise ContainerdUnavailable(f"containerd did not answer within {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        """Leave nothing behind: tasks, daemon, shims, mounts, files."""
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._kill_tasks()
        finally:
            self._stop_daemon()
            self._kill_shims()
            self._unmount_all()
            shutil.rmtree(self.base, ignore_errors=True)
            _reap_orphans()

    def restart(self) -> None:
        """Stop the daemon only (state survives), then start it again."""
        self._stop_daemon()
        self.start()

    def __enter__(self) -> PrivateContainerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- driving it ----------------------------------------------------------------

    def ctr(
        self, *args: str, namespace: str = "default", check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", namespace, *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    @functools.cached_property
    def version(self) -> str:
        """The daemon's version, from ``containerd --version`` (the binary first on PATH)."""
        out = subprocess.run(["containerd", "--version"], capture_output=True, text=True, check=True).stdout
        # "containerd github.com/containerd/containerd/v2 2.1.9+unknown" or "... 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
        return out.split()[2]

    def import_image(self, namespace: str) -> str:
        """Import the busybox image into a namespace; returns its layer's snapshot key."""
        archive = self.base / "busybox.tar"
        if not archive.exists():
            write_oci_archive(archive)
        # 2.x imports through its transfer service, which unpacks only with --local
        # when no unpack platform is configured; 1.6 does not know the flag.
        local = ["--local"] if int(self.version.split(".")[0]) >= 2 else []
        self.ctr("images", "import", *local, "--snapshotter", SNAPSHOTTER, str(archive), namespace=namespace)
        keys = [k for k in self.snapshot_keys(namespace) if k.startswith("sha256:")]
        assert len(keys) == 1, keys
        return keys[0]

    def snapshot_keys(self, namespace: str) -> list[str]:
        return list(self.snapshot_parents(namespace))

    def snapshot_parents(self, namespace: str) -> dict[str, str | None]:
        out = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", namespace=namespace).stdout
        return {row["KEY"]: row["PARENT"] or None for row in _rows(out)}

    def container_ids(self, namespace: str) -> list[str]:
        return self.ctr("containers", "ls", "--quiet", namespace=namespace).stdout.split()

    def task_status(self, namespace: str) -> dict[str, str]:
        rows = _rows(self.ctr("tasks", "ls", namespace=namespace).stdout)
        return {row["TASK"]: row["STATUS"] for row in rows}

    def run_argv(self, namespace: str, extra: Sequence[str]) -> list[str]:
        """`ctr run --rm` as OBuilder's sandbox starts it, with our private runc root and fifos."""
        return [
            "ctr", "--address", self.address, "--namespace", namespace,
            "run", "--rm", "--snapshotter", SNAPSHOTTER,
            "--runc-root", str(self.runc_root), "--fifo-dir", str(self.fifo_dir),
            *extra,
        ]  # fmt: skip

    # -- clean-up ------------------------------------------------------------------

    def _kill_tasks(self) -> None:
        out = self.ctr("namespaces", "ls", "--quiet", check=False).stdout
        for ns in out.split():
            tasks = self.ctr("tasks", "ls", "--quiet", namespace=ns, check=False).stdout.split()
            if tasks:
                self.ctr("tasks", "delete", "--force", "--", *tasks, namespace=ns, check=False)

    def _stop_daemon(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._proc = None

    def _kill_shims(self) -> None:
        # Shims outlive the daemon by design; ours name our socket in their arguments.
        needle = self.address.encode()
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def _unmount_all(self) -> None:
        prefix = str(self.base)
        for _ in range(3):
            mounts = [
                line.split()[1].replace("\\040", " ")
                for line in Path("/proc/self/mounts").read_text().splitlines()
                if line.split()[1].startswith(prefix)
            ]
            if not mounts:
                return
            for target in sorted(mounts, key=len, reverse=True):
                subprocess.run(["umount", "-l", target], check=False, capture_output=True)
