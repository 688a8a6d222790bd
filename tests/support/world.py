"""An OBuilder HCS store and its containerd objects, made with OBuilder's own ctr sequence.

``lib/hcs_store.ml`` in ocurrent/obuilder: a step prepares ``obuilder-ID`` from its
parent's ``-committed``, writes ``result-tmp/ID/layerinfo`` from the prepare's mount
JSON, runs ``ctr run --rm`` on it, and on success commits ``obuilder-ID-committed``,
moves the directory to ``result/ID`` and inserts the DB row. The incident's leaks
are made the way they happen: SIGKILL the ``ctr run`` client (the container stays),
and the buggy prune (DB row and result dir dropped, snapshot kept).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.support.containerd import SNAPSHOTTER, PrivateContainerd

_PLAIN_ATOM = re.compile(r'^[^\s()";\\]+$')


def sexp_atom(s: str) -> str:
    """How Sexplib prints an atom: bare when it can, else an OCaml string literal."""
    if s and _PLAIN_ATOM.match(s) and "#|" not in s and "|#" not in s:
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def layerinfo_text(key: str, source: str, parents: list[str]) -> str:
    inner = " ".join(sexp_atom(p) for p in parents)
    return f"((snapshot_key {sexp_atom(key)}) (source {sexp_atom(source)})\n (parent_layer_paths ({inner})))\n"


def mounts_of(text: str) -> tuple[str, list[str]]:
    """``ctr snapshots prepare --mounts`` JSON read as OBuilder's ``Hcs.parse_mount_json`` does:
    the first mount's Source and its ``parentLayerPaths=`` option."""
    mount = json.loads(text)[0]
    parents: list[str] = []
    for option in mount.get("Options") or []:
        if option.startswith("parentLayerPaths="):
            parents = json.loads(option[len("parentLayerPaths=") :])
    return mount["Source"], parents


def create_store(root: Path) -> Path:
    """The folders and DB OBuilder's HCS store creates at start-up (WAL mode, as db.ml sets)."""
    for sub in ("result", "result-tmp", "state/db", "cache", "cache-tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root / "state" / "db" / "db.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS builds (id TEXT PRIMARY KEY, created DATETIME NOT NULL, "
        "used DATETIME NOT NULL, rc INTEGER NOT NULL, parent TEXT, FOREIGN KEY (parent) REFERENCES builds (id) "
        "ON DELETE RESTRICT)"
    )
    db.commit()
    db.close()
    return root


class World:
    def __init__(self, containerd: PrivateContainerd, namespace: str, root: Path) -> None:
        self.cd = containerd
        self.ns = namespace
        self.root = create_store(root)
        self.image_layer = containerd.import_image(namespace)
        self._leaked: list[subprocess.Popen[bytes]] = []

    # -- ctr -------------------------------------------------------------------

    def ctr(self, *args: str) -> str:
        return self.cd.ctr(*args, namespace=self.ns).stdout

    def prepare(self, key: str, parent: str) -> tuple[str, list[str]]:
        out = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", "--mounts", "--", key, parent)
        return mounts_of(out)

    def commit(self, key: str) -> str:
        self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "commit", "--", key + "-committed", key)
        return key + "-committed"

    # -- store -----------------------------------------------------------------

    def add_row(self, build_id: str, parent: str | None = None) -> None:
        db = sqlite3.connect(self.root / "state" / "db" / "db.sqlite")
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        db.execute(
            "INSERT INTO builds (id, created, used, rc, parent) VALUES (?, ?, ?, 0, ?)", (build_id, now, now, parent)
        )
        db.commit()
        db.close()

    def drop_row(self, build_id: str) -> None:
        db = sqlite3.connect(self.root / "state" / "db" / "db.sqlite")
        db.execute("DELETE FROM builds WHERE id = ?", (build_id,))
        db.commit()
        db.close()

    # -- what OBuilder does ------------------------------------------------------

    def base(self, ref: str, *, finish: bool = True) -> str:
        """Import a base image as OBuilder's fetcher does: obuilder-base-SHA256(ref), rootfs/layerinfo."""
        build_id = hashlib.sha256(ref.encode()).hexdigest()
        key = "obuilder-base-" + build_id
        tmp = self.root / "result-tmp" / build_id
        (tmp / "rootfs").mkdir(parents=True)
        source, parents = self.prepare(key, self.image_layer)
        (tmp / "rootfs" / "layerinfo").write_text(layerinfo_text(key, source, parents))
        if finish:
            self.commit(key)
            os.rename(tmp, self.root / "result" / build_id)
            self.add_row(build_id)
        return key

    def step(self, build_id: str, parent_key: str, *, finish: bool = True) -> str:
        """A build step on ``parent_key``'s committed snapshot. Unfinished: an interrupted build."""
        key = "obuilder-" + build_id
        tmp = self.root / "result-tmp" / build_id
        source, parents = self.prepare(key, parent_key + "-committed")
        tmp.mkdir(parents=True)
        (tmp / "layerinfo").write_text(layerinfo_text(key, source, parents))
        (tmp / "log").write_text("building...\n")
        if finish:
            self.commit(key)
            os.rename(tmp, self.root / "result" / build_id)
            self.add_row(build_id, None)
        return key

    def buggy_prune(self, build_id: str) -> None:
        """OBuilder's delete when ``ctr snapshot rm`` failed: the row and directory go, the snapshot stays."""
        self.drop_row(build_id)
        shutil.rmtree(self.root / "result" / build_id)

    def orphan_chain(self, parent_key: str, tag: str, depth: int) -> list[str]:
        """``depth`` leaked committed snapshots in a chain under ``parent_key``: no row, no directory."""
        keys = []
        for i in range(depth):
            build_id = f"{tag}-{i}"
            key = self.step(build_id, parent_key)
            self.buggy_prune(build_id)
            keys.append(key + "-committed")
            parent_key = key
        return keys

    def source_of(self, build_id: str) -> str:
        """The layer folder a build's layerinfo names (read with a regex, not the product's reader)."""
        for area in ("result-tmp", "result"):
            for candidate in ("rootfs/layerinfo", "layerinfo"):
                path = self.root / area / build_id / candidate
                if path.exists():
                    m = re.search(r"\(source ([^\s()]+)\)", path.read_text())
                    assert m is not None, path
                    return m.group(1)
        raise FileNotFoundError(build_id)

    # -- the leak ----------------------------------------------------------------

    def leak_container(self, container_id: str, *, rootfs: str | None = None, task: str = "running") -> None:
        """``ctr run --rm`` whose client is SIGKILLed: the container stays.

        ``task``: ``running`` (client killed only), ``stopped`` (then the task is
        killed, as OBuilder's cancel does), ``absent`` (the task deleted too).
        """
        target = ["--rootfs", rootfs] if rootfs else [self.cd.image_ref]
        argv = self.cd.run_argv(self.ns, [*target, container_id, "/bin/sleep", "3600"])
        client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._leaked.append(client)
        self._wait_task(container_id, "RUNNING")
        client.send_signal(signal.SIGKILL)
        client.wait()
        if task in ("stopped", "absent"):
            self.ctr("tasks", "kill", "--signal", "SIGKILL", "--", container_id)
            self._wait_task(container_id, "STOPPED")
        if task == "absent":
            self.ctr("tasks", "delete", "--", container_id)

    def _wait_task(self, container_id: str, status: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cd.task_status(self.ns).get(container_id) == status:
                return
            time.sleep(0.05)
        raise TimeoutError(f"task {container_id} did not reach {status}")
