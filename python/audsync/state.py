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
from .errors import ConfigError, LockHeld, LockLost
from .warehouse import Relation, Session, Warehouse

LOCK_TIMEOUT_ENV = "AUDSYNC_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 120.0

RUN_COLUMNS = (
    "run_id", "sync_name", "trigger", "status", "started_at", "finished_at", "duration_ms",
    "planned_adds", "planned_removes", "planned_updates", "rows_added", "rows_removed",
    "rows_updated", "rows_failed", "error_message", "destination", "sync_mode",
    "rows_recorded", "rows_unmatched", "full_resync", "rows_unknown", "match_rate",
    # serve branch (issue 12): when S was last built, as the run saw it (freshness).
    "evaluated_at",
    "forced", "audience_size",  # governance: --force used; S's size at the run (alerts)
)
SYNC_COLUMNS = (
    "sync_name", "status", "status_error", "last_synced_at", "last_run_id", "lock_run_id",
    "lock_owner", "lock_acquired_at", "lock_heartbeat_at", "destination_state", "updated_at",
    "lock_generation",
    # serve branch (issue 12): the lifecycle of api.md and when the materialization last
    # built S (freshness).
    "sync_id", "display_name", "created_by", "created_at", "evaluated_at",
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

# Run statuses after which a run is over (its row is history).
FINAL_STATUSES = frozenset({"success", "partial_failure", "error", "aborted", "skipped", "blocked"})


def utcnow() -> dt.datetime:
    """Now, in UTC, without tzinfo: the state tables hold naive UTC timestamps.

    Used for run history (start, finish); the lock's times come from the warehouse's clock
    (:meth:`audsync.warehouse.Warehouse.now_sql`), so that hosts whose clocks differ agree.
    """
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


def clean_text(value: Any) -> Any:
    """``value`` with NUL characters removed when it is text: PostgreSQL refuses them in
    text columns, and a destination's error message may carry one."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "")
    return value


@dataclass
class RunRow:
    """One row of ``audsync_runs`` (contract section 6)."""

    run_id: str
    sync_name: str
    trigger: str | None = None
    status: str | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    duration_ms: int | None = None
    planned_adds: int | None = None
    planned_removes: int | None = None
    planned_updates: int | None = None
    rows_added: int | None = None
    rows_removed: int | None = None
    rows_updated: int | None = None
    rows_failed: int | None = None
    error_message: str | None = None
    destination: str | None = None
    sync_mode: str | None = None
    rows_recorded: int | None = None
    rows_unmatched: int | None = None
    full_resync: bool | None = None
    rows_unknown: int | None = None
    match_rate: float | None = None
    """Accepted minus unmatched over sent, where the destination reports unmatched rows."""
    evaluated_at: dt.datetime | None = None
    """When S was last built, as the run saw it (freshness)."""
    forced: bool | None = None
    """``--force`` overrode the guardrails for this run (governance)."""
    audience_size: int | None = None
    """Members of S when the run ended (for the size-change alert)."""

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> "RunRow":
        """A row selected as ``RUN_COLUMNS``."""
        return cls(**dict(zip(RUN_COLUMNS, row)))

    def as_dict(self) -> dict[str, Any]:
        """The row as ``{column: value}`` (JSON output)."""
        return {c: getattr(self, c) for c in RUN_COLUMNS}


@dataclass
class SyncRow:
    """One row of ``audsync_syncs``: a sync's status, last run and lock."""

    sync_name: str
    status: str | None = None
    status_error: str | None = None
    last_synced_at: dt.datetime | None = None
    last_run_id: str | None = None
    lock_run_id: str | None = None
    lock_owner: str | None = None
    lock_acquired_at: dt.datetime | None = None
    lock_heartbeat_at: dt.datetime | None = None
    destination_state: str | None = None
    updated_at: dt.datetime | None = None
    lock_generation: int | None = None
    sync_id: str | None = None
    display_name: str | None = None
    created_by: str | None = None
    created_at: dt.datetime | None = None
    evaluated_at: dt.datetime | None = None
    """When the materialization last built S (freshness)."""

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> "SyncRow":
        """A row selected as ``SYNC_COLUMNS``."""
        return cls(**dict(zip(SYNC_COLUMNS, row)))

    def as_dict(self) -> dict[str, Any]:
        """The row as ``{column: value}`` (JSON output)."""
        return {c: getattr(self, c) for c in SYNC_COLUMNS}


@dataclass(frozen=True)
class Lock:
    """A sync's lock as one run holds it: valid while the row's generation is still this one."""

    sync_name: str
    run_id: str
    generation: int


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

    @property
    def now(self) -> str:
        """The warehouse's clock as naive UTC, in SQL."""
        return self.warehouse.now_sql()

    # -- readiness --------------------------------------------------------------------------

    def missing_tables(self, session: Session) -> list[str]:
        """State tables that are not in the warehouse yet (``dbt run`` builds them)."""
        return [t for t in names.STATE_TABLES if session.columns(self.relations[t]) is None]

    def missing_columns(self, session: Session) -> list[str]:
        """``table.column`` of the runner's columns the state tables lack (tables built by an
        older version of the package: ``dbt run`` adds them)."""
        missing = []
        for table, columns in ((names.RUNS_TABLE, RUN_COLUMNS), (names.SYNCS_TABLE, SYNC_COLUMNS)):
            have = {c.lower() for c in session.columns(self.relations[table]) or ()}
            missing += [f"{table}.{c}" for c in columns if have and c not in have]
        return missing

    # -- sync rows and the lock -------------------------------------------------------------

    def sync_row(self, session: Session, sync_name: str) -> SyncRow | None:
        """The sync's row of ``audsync_syncs``, if any."""
        row = session.fetchone(
            f"select {', '.join(SYNC_COLUMNS)} from {self.syncs} where sync_name = ?", (sync_name,)
        )
        return SyncRow.from_row(row) if row else None

    def all_sync_rows(self, session: Session) -> dict[str, SyncRow]:
        """Every sync's row, by sync name."""
        rows = session.fetchall(f"select {', '.join(SYNC_COLUMNS)} from {self.syncs}")
        return {r[0]: SyncRow.from_row(r) for r in rows}

    def ensure_sync_row(self, session: Session, sync_name: str) -> SyncRow:
        """The sync's row, inserted first when missing.

        Safe when two sessions insert at once: ``on conflict do nothing`` against the unique
        index on ``sync_name`` (PostgreSQL; the package's post-hook makes it), and no row
        lock is waited for, so two first runs cannot deadlock here.
        """
        row = self.sync_row(session, sync_name)
        if row is None:
            # Serialise the inserters (taken before this transaction writes anything, so a
            # wait here cannot close a cycle), then look again.
            self.warehouse.lock_state_table(session, self.relations[names.SYNCS_TABLE])
            row = self.sync_row(session, sync_name)
        if row is None:
            session.execute(
                f"insert into {self.syncs} (sync_name, status, updated_at, lock_generation)"
                f" select ?, ?, {self.now}, 0"
                f" where not exists (select 1 from {self.syncs} where sync_name = ?)"
                f"{self.warehouse.on_conflict_do_nothing()}",
                (sync_name, "active", sync_name),
            )
            row = self.sync_row(session, sync_name)
        return row

    def acquire_lock(
        self, session: Session, sync_name: str, run_id: str, timeout_s: float
    ) -> tuple[Lock, Takeover | None]:
        """Take the sync's lock for ``run_id`` in this session's transaction.

        Raises :class:`LockHeld` naming the holder when another run's heartbeat is fresh;
        the takeover comes with a :class:`Takeover` when the holder's heartbeat is older than
        ``timeout_s``. The heartbeat's age is measured by the warehouse's clock, against the
        warehouse's clock. Every acquisition increments ``lock_generation``: the run that
        held the lock before can no longer heartbeat, flush or commit (fencing).
        """
        self.warehouse.lock_state_table(session, self.relations[names.SYNCS_TABLE])
        self.ensure_sync_row(session, sync_name)
        holder, owner, heartbeat, age, previous_generation = session.fetchone(
            f"select lock_run_id, lock_owner, lock_heartbeat_at,"
            f" {self.warehouse.seconds_since_sql('lock_heartbeat_at')}, coalesce(lock_generation, 0)"
            f" from {self.syncs} where sync_name = ?",
            (sync_name,),
        )
        takeover = None
        if holder and holder != run_id:
            age = None if age is None else float(age)
            if age is not None and age <= timeout_s:
                raise LockHeld(
                    f"sync {sync_name!r} is locked by run {holder} ({owner}), "
                    f"heartbeat {age:.0f} s ago; it is taken over once its heartbeat is older "
                    f"than {timeout_s:.0f} s ({LOCK_TIMEOUT_ENV})",
                    sync=sync_name, holder_run_id=holder,
                )
            takeover = Takeover(holder, heartbeat)
        # Where the engine has no row locks (Spark), the next generation is claimed by an
        # atomic create in the metastore first: of two runs that read the same row, one wins.
        self.warehouse.claim_lock_generation(session, self.relations[names.SYNCS_TABLE], sync_name, int(previous_generation) + 1)
        session.execute(
            f"update {self.syncs} set lock_run_id = ?, lock_owner = ?, lock_acquired_at = {self.now},"
            f" lock_heartbeat_at = {self.now}, updated_at = {self.now},"
            f" lock_generation = coalesce(lock_generation, 0) + 1 where sync_name = ?",
            (run_id, lock_owner(), sync_name),
        )
        generation = int(session.scalar(
            f"select lock_generation from {self.syncs} where sync_name = ?", (sync_name,)
        ))
        return Lock(sync_name, run_id, generation), takeover

    def heartbeat(self, session: Session, lock: Lock) -> bool:
        """Refresh the lock's heartbeat; False when ``lock`` is no longer held (taken over)."""
        changed = session.execute_count(
            f"update {self.syncs} set lock_heartbeat_at = {self.now}"
            f" where sync_name = ? and lock_run_id = ? and lock_generation = ?",
            (lock.sync_name, lock.run_id, lock.generation),
        )
        return changed > 0

    def fence(self, session: Session, lock: Lock) -> None:
        """Check, as the first statement of a transaction that writes a run's results, that
        ``lock`` is still held; raise :class:`LockLost` naming the run that took it over.

        On PostgreSQL the update also holds the sync's row until the transaction ends, so a
        takeover waits for this transaction, and a transaction that waited for a takeover
        sees its outcome and changes nothing.
        """
        if self.warehouse.superseded(session, self.relations[names.SYNCS_TABLE], lock.sync_name, lock.generation):
            pass  # a later generation was claimed (Spark's marker tables): fenced, whatever the row says
        elif self.warehouse.fence_writes:
            if self.heartbeat(session, lock):
                return
        else:
            held = session.scalar(
                f"select count(*) from {self.syncs}"
                f" where sync_name = ? and lock_run_id = ? and lock_generation = ?",
                (lock.sync_name, lock.run_id, lock.generation),
            )
            if int(held or 0) > 0:
                return
        row = self.sync_row(session, lock.sync_name)
        taken_by = row.lock_run_id if row else None
        by = f"run {taken_by} took the sync over" if taken_by else "the lock was released or reset"
        raise LockLost(
            f"sync {lock.sync_name!r}: run {lock.run_id} lost its lock ({by}, after this run's"
            f" heartbeat had stopped for more than {LOCK_TIMEOUT_ENV} seconds); it stopped"
            " sending and committed nothing",
            sync=lock.sync_name, taken_by=taken_by,
        )

    def release_lock(
        self,
        session: Session,
        lock: Lock,
        *,
        status: str | None = None,
        status_error: str | None = None,
        synced_at: dt.datetime | None = None,
        destination_state: str | None = None,
        record_run: bool = True,
    ) -> bool:
        """Release ``lock`` and record the sync's state after its run; False when the lock
        was no longer held (nothing is written then).

        A pause during the run stays: ``status`` never overwrites ``paused``. ``record_run``
        False leaves ``last_run_id`` alone (a lock held by ``audsync verify --repair``, which
        is no run).
        """
        sets = ["lock_run_id = null", "lock_owner = null", "lock_acquired_at = null",
                "lock_heartbeat_at = null", f"updated_at = {self.now}"]
        params: list[Any] = []
        if record_run:
            sets.append("last_run_id = ?")
            params.append(lock.run_id)
        if status is not None:
            sets += ["status = case when status = 'paused' then status else ? end", "status_error = ?"]
            params += [status, clean_text(status_error)]
        if synced_at is not None:
            sets.append("last_synced_at = ?")
            params.append(synced_at)
        if destination_state is not None:
            sets.append("destination_state = ?")
            params.append(destination_state)
        changed = session.execute_count(
            f"update {self.syncs} set {', '.join(sets)}"
            " where sync_name = ? and lock_run_id = ? and lock_generation = ?",
            (*params, lock.sync_name, lock.run_id, lock.generation),
        )
        return changed > 0

    def set_status(self, session: Session, sync_name: str, status: str, status_error: str | None = None) -> None:
        """Set a sync's status (``audsync pause`` / ``resume``); the lock is left alone."""
        self.ensure_sync_row(session, sync_name)
        session.execute(
            f"update {self.syncs} set status = ?, status_error = ?, updated_at = {self.now} where sync_name = ?",
            (status, clean_text(status_error), sync_name),
        )

    def set_destination_state(self, session: Session, sync_name: str, state: str) -> None:
        """Keep what a destination's ``open()`` returned (ids of lists it created)."""
        self.ensure_sync_row(session, sync_name)
        session.execute(
            f"update {self.syncs} set destination_state = ?, updated_at = {self.now} where sync_name = ?",
            (state, sync_name),
        )

    # -- runs -------------------------------------------------------------------------------

    def insert_run(self, session: Session, run: RunRow | dict[str, Any]) -> None:
        """Insert a run's row (the columns given; the rest stay null)."""
        values = run.as_dict() if isinstance(run, RunRow) else run
        columns = [c for c in RUN_COLUMNS if c in values and values[c] is not None]
        session.execute(
            f"insert into {self.runs} ({', '.join(columns)}) values ({', '.join('?' for _ in columns)})",
            [clean_text(values[c]) for c in columns],
        )

    def start_run(self, session: Session, run: RunRow | dict[str, Any]) -> None:
        """Insert the run's row, or fill in the ``queued`` row the service made for it
        (convention 3: runs started by someone else)."""
        if isinstance(run, RunRow):
            run = {c: v for c, v in run.as_dict().items() if v is not None}
        queued = session.scalar(
            f"select count(*) from {self.runs} where run_id = ? and status = ?", (run["run_id"], "queued")
        )
        if not queued:
            self.insert_run(session, run)
            return
        self.update_run(session, run["run_id"], **{c: v for c, v in run.items() if c != "run_id"})

    def update_run(self, session: Session, run_id: str, **values: Any) -> None:
        """Set columns of a run's row."""
        unknown = set(values) - set(RUN_COLUMNS)
        if unknown:
            raise ValueError(f"unknown run columns {sorted(unknown)}")
        sets = ", ".join(f"{c} = ?" for c in values)
        session.execute(
            f"update {self.runs} set {sets} where run_id = ?",
            (*(clean_text(v) for v in values.values()), run_id),
        )

    def run_row(self, session: Session, run_id: str) -> RunRow | None:
        """One run's row, if any."""
        row = session.fetchone(f"select {', '.join(RUN_COLUMNS)} from {self.runs} where run_id = ?", (run_id,))
        return RunRow.from_row(row) if row else None

    def runs_of(self, session: Session, sync_name: str, limit: int = 20) -> list[RunRow]:
        """The sync's latest runs, newest first."""
        rows = session.fetchall(
            f"select {', '.join(RUN_COLUMNS)} from {self.runs} where sync_name = ?"
            " order by started_at desc, run_id desc limit ?",
            (sync_name, int(limit)),
        )
        return [RunRow.from_row(r) for r in rows]

    def running_runs(self, session: Session, sync_name: str) -> list[RunRow]:
        """The sync's runs still marked ``running``."""
        rows = session.fetchall(
            f"select {', '.join(RUN_COLUMNS)} from {self.runs} where sync_name = ? and status = ?",
            (sync_name, "running"),
        )
        return [RunRow.from_row(r) for r in rows]

    def runs_with_delivery_records(self, session: Session, sync_name: str) -> set[str]:
        """Runs of the sync that left answered batches or delivered ids (not yet committed)."""
        rows = session.fetchall(
            f"select run_id from {self.batches} where sync_name = ?"
            f" union select run_id from {self.ids} where sync_name = ?",
            (sync_name, sync_name),
        )
        return {r[0] for r in rows}

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
            [(run_id, sync_name, clean_text(e.key), e.op, clean_text(e.error_code), clean_text(e.error_message),
              e.retryable, now) for e in errors],
        )
        session.executemany(
            f"insert into {self.ids} ({', '.join(ID_COLUMNS)}) values (?, ?, ?, ?)",
            [(run_id, sync_name, key, clean_text(value)) for key, value in ids],
        )

    def forget_delivery(self, session: Session, run_id: str) -> None:
        """Drop a committed run's working records (its row errors stay, as history)."""
        session.execute(f"delete from {self.batches} where run_id = ?", (run_id,))
        session.execute(f"delete from {self.ids} where run_id = ?", (run_id,))


def lock_owner() -> str:
    """Who holds a lock, for messages: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"
