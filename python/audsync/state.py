"""The state tables (contract section 6): run history, row errors, sync state and its lock.

The tables are models of the dbt package; the runner only reads and writes rows. Every
statement is plain SQL with ``?`` placeholders, quoted through the warehouse.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass
from typing import Any, Sequence

from . import names
from .destinations.base import RowError
from .errors import ConfigError, LockHeld
from .warehouse import Relation, Session, Warehouse

LOCK_TIMEOUT_ENV = "AUDSYNC_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 120.0

RUN_COLUMNS = (
    "run_id", "sync_name", "trigger", "status", "started_at", "finished_at", "duration_ms",
    "planned_adds", "planned_removes", "planned_updates", "rows_added", "rows_removed",
    "rows_updated", "rows_failed", "error_message", "destination", "sync_mode",
    "rows_recorded", "rows_unmatched", "full_resync",
    "forced", "audience_size",  # governance: --force used; S's size at the run (alerts)
)
SYNC_COLUMNS = (
    "sync_name", "status", "status_error", "last_synced_at", "last_run_id", "lock_run_id",
    "lock_owner", "lock_acquired_at", "lock_heartbeat_at", "destination_state", "updated_at",
)
ERROR_COLUMNS = (
    "run_id", "sync_name", "member_key", "op", "error_code", "error_message", "retryable",
    "recorded_at",
)
BATCH_COLUMNS = (
    "run_id", "sync_name", "batch_no", "first_seq", "last_seq", "rows_rejected",
    "rows_unmatched", "recorded_at",
)
ID_COLUMNS = ("run_id", "sync_name", "member_key", "destination_id")


def utcnow() -> dt.datetime:
    """Now, in UTC, without tzinfo: the state tables hold naive UTC timestamps."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def lock_timeout_s() -> float:
    """Seconds after which a lock's heartbeat counts as abandoned."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, str(DEFAULT_LOCK_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{LOCK_TIMEOUT_ENV} is {raw!r}; expected a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{LOCK_TIMEOUT_ENV} is {raw!r}; expected a positive number of seconds")
    return value


@dataclass(frozen=True)
class Takeover:
    """A lock taken from a run whose heartbeat had stopped."""

    run_id: str
    heartbeat_at: dt.datetime | None


class StateStore:
    """Reads and writes the package's state tables in one warehouse."""

    def __init__(self, warehouse: Warehouse, relations: dict[str, Relation]):
        self.warehouse = warehouse
        self.relations = relations
        q = warehouse.relation_sql
        self.runs = q(relations[names.RUNS_TABLE])
        self.syncs = q(relations[names.SYNCS_TABLE])
        self.errors = q(relations[names.ROW_ERRORS_TABLE])
        self.batches = q(relations[names.BATCHES_TABLE])
        self.ids = q(relations[names.DELIVERED_IDS_TABLE])

    # -- readiness --------------------------------------------------------------------------

    def missing_tables(self, session: Session) -> list[str]:
        """State tables that are not in the warehouse yet (``dbt run`` builds them)."""
        return [t for t in names.STATE_TABLES if session.columns(self.relations[t]) is None]

    # -- sync rows and the lock -------------------------------------------------------------

    def sync_row(self, session: Session, sync_name: str) -> dict[str, Any] | None:
        row = session.fetchone(
            f"select {', '.join(SYNC_COLUMNS)} from {self.syncs} where sync_name = ?", (sync_name,)
        )
        return dict(zip(SYNC_COLUMNS, row)) if row else None

    def all_sync_rows(self, session: Session) -> dict[str, dict[str, Any]]:
        rows = session.fetchall(f"select {', '.join(SYNC_COLUMNS)} from {self.syncs}")
        return {r[0]: dict(zip(SYNC_COLUMNS, r)) for r in rows}

    def ensure_sync_row(self, session: Session, sync_name: str) -> dict[str, Any]:
        row = self.sync_row(session, sync_name)
        if row is None:
            now = utcnow()
            session.execute(
                f"insert into {self.syncs} (sync_name, status, updated_at) values (?, ?, ?)",
                (sync_name, "active", now),
            )
            row = self.sync_row(session, sync_name)
        return row

    def acquire_lock(self, session: Session, sync_name: str, run_id: str, timeout_s: float) -> Takeover | None:
        """Take the sync's lock for ``run_id`` in this session's transaction.

        Raises :class:`LockHeld` naming the holder when another run's heartbeat is fresh;
        returns a :class:`Takeover` when the holder's heartbeat is older than ``timeout_s``.
        """
        self.warehouse.lock_state_table(session, self.relations[names.SYNCS_TABLE])
        row = self.ensure_sync_row(session, sync_name)
        now = utcnow()
        takeover = None
        holder = row["lock_run_id"]
        if holder and holder != run_id:
            heartbeat = row["lock_heartbeat_at"]
            age = (now - heartbeat).total_seconds() if heartbeat else None
            if age is not None and age <= timeout_s:
                raise LockHeld(
                    f"sync {sync_name!r} is locked by run {holder} ({row['lock_owner']}), "
                    f"heartbeat {age:.0f} s ago; it is taken over once its heartbeat is older "
                    f"than {timeout_s:.0f} s ({LOCK_TIMEOUT_ENV})"
                )
            takeover = Takeover(holder, heartbeat)
        session.execute(
            f"update {self.syncs} set lock_run_id = ?, lock_owner = ?, lock_acquired_at = ?,"
            " lock_heartbeat_at = ?, updated_at = ? where sync_name = ?",
            (run_id, lock_owner(), now, now, now, sync_name),
        )
        return takeover

    def heartbeat(self, session: Session, sync_name: str, run_id: str) -> bool:
        """Refresh the lock's heartbeat; False when ``run_id`` no longer holds the lock."""
        changed = session.execute_count(
            f"update {self.syncs} set lock_heartbeat_at = ? where sync_name = ? and lock_run_id = ?",
            (utcnow(), sync_name, run_id),
        )
        return changed > 0

    def release_lock(
        self,
        session: Session,
        sync_name: str,
        run_id: str,
        *,
        status: str | None = None,
        status_error: str | None = None,
        synced_at: dt.datetime | None = None,
        destination_state: str | None = None,
    ) -> None:
        """Release the lock and record the sync's state after ``run_id``."""
        sets = ["lock_run_id = null", "lock_owner = null", "lock_acquired_at = null",
                "lock_heartbeat_at = null", "updated_at = ?", "last_run_id = ?"]
        params: list[Any] = [utcnow(), run_id]
        if status is not None:
            sets += ["status = ?", "status_error = ?"]
            params += [status, status_error]
        if synced_at is not None:
            sets.append("last_synced_at = ?")
            params.append(synced_at)
        if destination_state is not None:
            sets.append("destination_state = ?")
            params.append(destination_state)
        session.execute(
            f"update {self.syncs} set {', '.join(sets)} where sync_name = ? and lock_run_id = ?",
            (*params, sync_name, run_id),
        )

    def set_status(self, session: Session, sync_name: str, status: str, status_error: str | None = None) -> None:
        self.ensure_sync_row(session, sync_name)
        session.execute(
            f"update {self.syncs} set status = ?, status_error = ?, updated_at = ? where sync_name = ?",
            (status, status_error, utcnow(), sync_name),
        )

    def set_destination_state(self, session: Session, sync_name: str, state: str) -> None:
        self.ensure_sync_row(session, sync_name)
        session.execute(
            f"update {self.syncs} set destination_state = ?, updated_at = ? where sync_name = ?",
            (state, utcnow(), sync_name),
        )

    # -- runs -------------------------------------------------------------------------------

    def insert_run(self, session: Session, run: dict[str, Any]) -> None:
        columns = [c for c in RUN_COLUMNS if c in run]
        session.execute(
            f"insert into {self.runs} ({', '.join(columns)}) values ({', '.join('?' for _ in columns)})",
            [run[c] for c in columns],
        )

    def update_run(self, session: Session, run_id: str, **values: Any) -> None:
        unknown = set(values) - set(RUN_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run columns {sorted(unknown)}")
        sets = ", ".join(f"{c} = ?" for c in values)
        session.execute(f"update {self.runs} set {sets} where run_id = ?", (*values.values(), run_id))

    def runs_of(self, session: Session, sync_name: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = session.fetchall(
            f"select {', '.join(RUN_COLUMNS)} from {self.runs} where sync_name = ?"
            " order by started_at desc, run_id desc limit ?",
            (sync_name, int(limit)),
        )
        return [dict(zip(RUN_COLUMNS, r)) for r in rows]

    def running_runs(self, session: Session, sync_name: str) -> list[dict[str, Any]]:
        rows = session.fetchall(
            f"select {', '.join(RUN_COLUMNS)} from {self.runs} where sync_name = ? and status = ?",
            (sync_name, "running"),
        )
        return [dict(zip(RUN_COLUMNS, r)) for r in rows]

    def last_started(self, session: Session) -> dict[str, dt.datetime]:
        """The start of each sync's latest run that was not skipped (for ``--due``)."""
        rows = session.fetchall(
            f"select sync_name, max(started_at) from {self.runs} where status <> ? group by sync_name",
            ("skipped",),
        )
        return {r[0]: r[1] for r in rows}

    # -- delivery records -------------------------------------------------------------------

    def record_delivery(
        self,
        session: Session,
        run_id: str,
        sync_name: str,
        batches: Sequence[tuple[int, int, int, int, int]],
        errors: Sequence[RowError],
        ids: Sequence[tuple[str, str]],
    ) -> None:
        """Record answered batches ``(batch_no, first_seq, last_seq, rejected, unmatched)``,
        their rejected rows and the ids the destination gave."""
        now = utcnow()
        session.executemany(
            f"insert into {self.batches} ({', '.join(BATCH_COLUMNS)}) values ({', '.join('?' for _ in BATCH_COLUMNS)})",
            [(run_id, sync_name, *b, now) for b in batches],
        )
        session.executemany(
            f"insert into {self.errors} ({', '.join(ERROR_COLUMNS)}) values ({', '.join('?' for _ in ERROR_COLUMNS)})",
            [(run_id, sync_name, e.key, e.op, e.error_code, e.error_message, e.retryable, now) for e in errors],
        )
        session.executemany(
            f"insert into {self.ids} ({', '.join(ID_COLUMNS)}) values (?, ?, ?, ?)",
            [(run_id, sync_name, key, value) for key, value in ids],
        )

    def forget_delivery(self, session: Session, run_id: str) -> None:
        """Drop a committed run's working records (its row errors stay, as history)."""
        session.execute(f"delete from {self.batches} where run_id = ?", (run_id,))
        session.execute(f"delete from {self.ids} where run_id = ?", (run_id,))


def lock_owner() -> str:
    """Who holds a lock, for messages: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"
