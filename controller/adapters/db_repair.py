"""Carries out a :class:`~controller.model.check.RepairPlan` on the store: the opt-in repairs.

Boot only: the caller has seen the worker down and holds the store's lock, so OBuilder does
not hold the DB. In order:

1. an online backup of the DB (sqlite3's ``Connection.backup``) into
   ``STORE/state/obuilder-reconcile/db-backup-TIMESTAMP.sqlite``, before anything changes;
2. the ``result/ID`` directories, dependents first, through the safe remover
   (``platform.remove_tree``: a link is removed as a link, never followed), as OBuilder's own
   ``Db_store.delete`` removes the directory before the row;
3. in ONE transaction, every row change: each deletion as OBuilder's ``Dao.delete`` does it
   (``DELETE FROM builds WHERE id = ?`` and ``UPDATE builds SET rc = rc + -1 WHERE id = parent``),
   then, for the ``rc`` repair, every rc recounted from the rows. Any failure rolls it all back.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from controller.adapters import platform
from controller.adapters.lock import STATE_DIR
from controller.adapters.store import DB_PATH
from controller.model.check import RepairPlan
from controller.model.errors import StoreReadError

log = logging.getLogger("reconcile")

#: The recount: every row's rc is the number of rows that name it as their parent.
RECOUNT = (
    "UPDATE builds SET rc = (SELECT COUNT(*) FROM builds AS child WHERE child.parent = builds.id) "
    "WHERE rc IS NOT (SELECT COUNT(*) FROM builds AS child WHERE child.parent = builds.id)"
)


def db_path(root: Path) -> Path:
    return root.joinpath(*DB_PATH)


def backup_path(root: Path, now: datetime) -> Path:
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return root.joinpath(*STATE_DIR, f"db-backup-{stamp}.sqlite")


def backup_db(root: Path, now: datetime, *, busy_timeout: float = 5.0) -> Path:
    """An online copy of the DB (its WAL included), consistent as of one moment."""
    target = backup_path(root, now)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        src = sqlite3.connect(db_path(root).absolute().as_uri() + "?mode=rw", uri=True, timeout=busy_timeout)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise StoreReadError(f"{db_path(root)}: backup into {target} failed ({e}); nothing was repaired") from e
    return target


def apply_repairs(
    root: Path,
    repair: RepairPlan,
    *,
    now: datetime | None = None,
    remove: Callable[[str], None] = platform.remove_tree,
) -> Path | None:
    """Carry the plan out; the backup's path (None: the DB was not touched, so not copied)."""
    backup = backup_db(root, now or datetime.now(UTC)) if repair.touches_db else None
    if backup is not None:
        log.info("repair: DB backed up into %s", backup)
    for i in repair.remove_results:
        path = root / "result" / i
        try:
            remove(str(path))
        except OSError as e:
            raise StoreReadError(f"repair: cannot remove {path} ({e}); the DB was not changed") from e
        log.info("repair: removed %s", path)
    if repair.touches_db or repair.recount:
        _change_rows(root, repair)
    return backup


def _change_rows(root: Path, repair: RepairPlan, *, busy_timeout: float = 5.0) -> None:
    path = db_path(root)
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=rw", uri=True, timeout=busy_timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for d in repair.rows:
                _dao_delete(conn, d.id)
                log.info("repair (%s): deleted row %s", d.why.value, d.id)
            if repair.recount:
                changed = conn.execute(RECOUNT).rowcount
                log.info("repair (rc): recounted rc of %d row(s)", changed)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise StoreReadError(f"{path}: repair rolled back, nothing in the DB changed ({e})") from e
    finally:
        conn.close()


def _dao_delete(conn: sqlite3.Connection, build_id: str) -> None:
    """OBuilder's ``Dao.delete``: the row, then its parent's rc lowered."""
    row = conn.execute("SELECT parent FROM builds WHERE id = ?", (build_id,)).fetchone()
    if row is None:
        return
    conn.execute("DELETE FROM builds WHERE id = ?", (build_id,))
    if row[0] is not None:
        conn.execute("UPDATE builds SET rc = rc + ? WHERE id = ?", (-1, row[0]))
