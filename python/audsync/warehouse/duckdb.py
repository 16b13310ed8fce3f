"""DuckDB: the embedded default.

A DuckDB file admits one writing process at a time, so the runner never holds it for long:
every session opens the file, does its work and closes it, and a session that finds the file
busy (a ``dbt run``, another ``audsync``) waits for it. That lets a second run read the lock
table and name the run that holds the sync, and lets ``dbt run`` build while a run delivers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from typing import Any, Iterator

import threading

from .base import Relation, Session, Warehouse

logger = logging.getLogger("audsync.warehouse")

# How long a session waits for a DuckDB file that another process holds.
LOCK_WAIT_ENV = "AUDSYNC_DUCKDB_LOCK_WAIT_S"
DEFAULT_LOCK_WAIT_S = 120.0
# Serialises the lock-takers of this process (DuckDBWarehouse.lock_state_table).
_STATE_LOCK = threading.RLock()
# A wait for the file longer than this is reported (progress output, JSON events).
WAIT_REPORT_AFTER_S = 1.0
# DuckDB's buffer pool defaults to 80% of RAM, and lives in the runner's process. The
# runner starts with this limit, so that a run of a usual size stays small; a step that runs
# out of memory anyway (a join over 10M members) is retried with four times as much, up to
# DuckDB's own default.
MEMORY_LIMIT_ENV = "AUDSYNC_DUCKDB_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "100MB"
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def _bytes(limit: str) -> int | None:
    """``'100MB'`` as bytes; None for a form DuckDB takes that we do not parse."""
    text = str(limit).strip().lower().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * _UNITS[unit])
    return None


def _ceiling_bytes() -> int:
    """DuckDB's own default limit: 80% of the machine's memory."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)
    except (ValueError, OSError, AttributeError):
        return 8 * 1000**3


class DuckDBWarehouse(Warehouse):
    """A DuckDB file named by a dbt-duckdb profile."""

    adapter_type = "duckdb"
    dialect = "duckdb"
    paramstyle = "qmark"

    def __init__(self, credentials: Any, target_name: str):
        super().__init__(credentials, target_name)
        self.path = credentials.path
        if self.path in (":memory:", "") or self.path.startswith("md:"):
            raise ValueError(
                f"the dbt target {target_name!r} uses DuckDB path {self.path!r}; audsync needs "
                "a database file that outlives one process (set `path:` in profiles.yml)"
            )
        self.settings = dict(credentials.settings or {})
        self.lock_wait_s = float(os.environ.get(LOCK_WAIT_ENV, DEFAULT_LOCK_WAIT_S))
        self.memory_limit = (
            os.environ.get(MEMORY_LIMIT_ENV) or self.settings.pop("memory_limit", None) or DEFAULT_MEMORY_LIMIT
        )

    def _connect(self):
        import duckdb

        config = dict(self.settings)
        config["memory_limit"] = self.memory_limit
        started = time.monotonic()
        deadline = started + self.lock_wait_s
        delay = 0.02
        told = False
        while True:
            try:
                connection = duckdb.connect(self.path, config=config)
                # The progress bar would write to the runner's stderr on long queries.
                connection.execute("set enable_progress_bar = false")
                return connection
            except duckdb.IOException as error:
                if "lock" not in str(error).lower() or time.monotonic() > deadline:
                    raise
                if not told and time.monotonic() - started > WAIT_REPORT_AFTER_S and self.on_wait:
                    told = True
                    try:
                        self.on_wait(f"waiting for the DuckDB file {self.path}, which another process"
                                     f" holds (a dbt run?); up to {self.lock_wait_s:.0f} s ({LOCK_WAIT_ENV})")
                    except Exception:  # noqa: BLE001 - reporting must not break a session
                        logger.debug("on_wait failed", exc_info=True)
                # Another process holds the file for a moment (dbt, another audsync run).
                time.sleep(delay + random.random() * delay)
                delay = min(delay * 2, 0.5)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        connection = self._connect()
        session = None
        try:
            session = Session(self, connection)
            # The transaction is the cursor's: a DuckDB cursor is a connection of its own
            # (`DuckDBPyConnection.cursor()` duplicates it), so a transaction begun on
            # `connection` would leave every statement of the session autocommitted, and a
            # step that failed midway (out of memory in a commit) half applied.
            transaction = session._cursor
            transaction.execute("begin transaction")
            try:
                yield session
            except BaseException:
                transaction.execute("rollback")
                raise
            transaction.execute("commit")
        finally:
            connection.close()
            for callback in (session.on_end if session is not None else ()):
                callback()

    def lock_state_table(self, session: Session, relation: Relation) -> None:
        # Other processes are kept out by the file's own lock; threads of this process (two
        # runners of a service) take this lock until the transaction ends, or both would
        # insert the sync's row, or conflict on updating it.
        _STATE_LOCK.acquire()
        session.on_end.append(_STATE_LOCK.release)

    def grow_memory(self, error: BaseException) -> bool:
        import duckdb

        if not isinstance(error, duckdb.OutOfMemoryException):
            return False
        current = _bytes(self.memory_limit)
        ceiling = _ceiling_bytes()
        if current is None or current >= ceiling:
            return False
        grown = min(current * 4, ceiling)
        logger.warning("DuckDB ran out of its %s memory limit; retrying the step with %d MB",
                       self.memory_limit, grown // 1000**2)
        self.memory_limit = f"{grown // 1000**2}MB"
        return True

    @contextlib.contextmanager
    def row_numbers(self, session: Session) -> Iterator[str]:
        # DuckDB evaluates `row_number() over ()` as a window over the whole insert: every
        # row is held to be numbered, and under the runner's memory limit the rows spill to
        # disk. A sequence numbers them as they stream (freeze of 1M rows: 1.6 s, against
        # 3.1 s with the window). Temporary, so it dies with the session's connection.
        session.execute("create or replace temporary sequence audsync_row_numbers start 1")
        yield "nextval('audsync_row_numbers')"
        session.execute("drop sequence audsync_row_numbers")

    fence_writes = False

    def on_conflict_do_nothing(self) -> str:
        # No unique index on DuckDB's state tables (one writing process at a time holds the
        # file, so the insert-if-missing cannot race), and DuckDB refuses the clause without one.
        return ""

    def rows_changed(self, cursor: Any) -> int:
        # DuckDB answers a DML statement with one row holding the count.
        row = cursor.fetchone()
        return int(row[0]) if row else 0

    def columns(self, session: Session, relation: Relation) -> list[str] | None:
        rows = session.fetchall(
            "select column_name from information_schema.columns"
            " where table_catalog = ? and table_schema = ? and table_name = ?"
            " order by ordinal_position",
            (relation.database or self.credentials.database, relation.schema, relation.identifier),
        )
        return [r[0] for r in rows] or None

    def describe(self) -> str:
        return f"duckdb file {self.path} (target {self.target_name!r})"
