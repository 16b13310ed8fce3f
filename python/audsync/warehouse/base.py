"""What the runner needs from a warehouse: sessions, quoting, and a few bulk operations.

The runner's SQL is plain ANSI written once in :mod:`audsync.state` and
:mod:`audsync.plan`. A warehouse contributes only what really differs between engines: how to
connect with the dbt profile's credentials, how identifiers are quoted (through sqlglot's
dialects, so a BigQuery or Spark warehouse later quotes with backticks), the driver's
placeholder style, and the statement that serialises lock-takers on the state table.
Values always travel as bind parameters; SQL text never contains a value.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from sqlglot import exp


@dataclass(frozen=True)
class Relation:
    """A table or view, as dbt's manifest names it."""

    database: str | None
    schema: str
    identifier: str

    def with_suffix(self, suffix: str) -> "Relation":
        """The sibling relation ``identifier + suffix`` in the same schema."""
        return Relation(self.database, self.schema, self.identifier + suffix)

    def __str__(self) -> str:
        parts = [p for p in (self.database, self.schema, self.identifier) if p]
        return ".".join(parts)


class Session:
    """One connection in one transaction: committed when the block ends, rolled back on error."""

    def __init__(self, warehouse: "Warehouse", connection: Any):
        self.warehouse = warehouse
        self.connection = connection
        self._cursor = connection.cursor()
        self.on_end: list = []
        """Called once the session's transaction has ended (committed or rolled back)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run ``sql`` with ``?`` placeholders bound to ``params``; return the cursor."""
        self._cursor.execute(self.warehouse.placeholders(sql), tuple(params))
        return self._cursor

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.execute(sql, params).fetchall()

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        return self.execute(sql, params).fetchone()

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.fetchone(sql, params)
        return None if row is None else row[0]

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run ``sql`` once per row (small inserts: row errors, batches, ids)."""
        rows = [tuple(r) for r in rows]
        if rows:
            self._cursor.executemany(self.warehouse.placeholders(sql), rows)

    def columns(self, relation: Relation) -> list[str] | None:
        """Column names of ``relation``, or None when it does not exist."""
        return self.warehouse.columns(self, relation)

    def execute_count(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a DML statement; return how many rows it changed."""
        return self.warehouse.rows_changed(self.execute(sql, params))


class Warehouse:
    """Base class: one per dbt adapter type the runner supports."""

    adapter_type: str = ""
    dialect: str = ""
    """sqlglot dialect name, for quoting."""
    paramstyle: str = "qmark"

    def __init__(self, credentials: Any, target_name: str):
        self.credentials = credentials
        self.target_name = target_name
        self.on_wait: Any = None
        """Called as ``on_wait(message)`` when a session has to wait for the warehouse (a
        DuckDB file another process holds), so that the wait shows in the progress output."""

    # -- the warehouse's clock ----------------------------------------------------------

    def now_sql(self) -> str:
        """The warehouse's current time as naive UTC, as the state tables hold it.

        The lock's times are written and compared with this clock, never a host's: two hosts
        whose clocks differ still agree on a heartbeat's age.
        """
        return "(current_timestamp at time zone 'UTC')"

    def seconds_since_sql(self, column: str) -> str:
        """Seconds from the naive-UTC timestamp ``column`` to :meth:`now_sql`, in SQL."""
        return f"extract(epoch from ({self.now_sql()} - {column}))"

    fence_writes: bool = True
    """Whether the lock's fence check writes the sync's row (taking its row lock, so a
    takeover waits for the fenced transaction), or only reads it. DuckDB reads: one process at
    a time holds its file, so transactions of two runs never overlap, and within one process
    two open transactions that update one row conflict."""

    def on_conflict_do_nothing(self) -> str:
        """The clause that makes an insert skip a row its unique index already holds."""
        return " on conflict do nothing"

    # -- naming ---------------------------------------------------------------------------

    def quote(self, identifier: str) -> str:
        """``identifier`` quoted as this engine wants it."""
        return exp.to_identifier(identifier, quoted=True).sql(dialect=self.dialect)

    def relation_sql(self, relation: Relation) -> str:
        """A fully qualified, quoted relation name."""
        parts = [p for p in (relation.database, relation.schema, relation.identifier) if p]
        return ".".join(self.quote(p) for p in parts)

    def placeholders(self, sql: str) -> str:
        """Translate the runner's ``?`` placeholders into the driver's style."""
        if self.paramstyle == "qmark":
            return sql
        if self.paramstyle in ("format", "pyformat"):
            return sql.replace("%", "%%").replace("?", "%s")
        raise NotImplementedError(self.paramstyle)

    # -- sessions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commit at the end of the block, roll back on an exception."""
        raise NotImplementedError

    def rows_changed(self, cursor: Any) -> int:
        """Rows changed by the DML statement just run on ``cursor`` (DB-API rowcount)."""
        return cursor.rowcount

    def grow_memory(self, error: BaseException) -> bool:
        """After ``error``, allow the warehouse more memory; True when a retry may succeed."""
        return False

    def in_session(self, step):
        """Return ``step(session)`` run in a session of its own, again in a new session with
        more memory each time the warehouse ran out: the failed session was rolled back, so
        a retry is safe."""
        while True:
            try:
                with self.session() as session:
                    return step(session)
            except Exception as error:  # noqa: BLE001 - re-raised unless memory can grow
                if not self.grow_memory(error):
                    raise

    @contextlib.contextmanager
    def row_numbers(self, session: Session) -> Iterator[str]:
        """An SQL expression that numbers the rows of one ``insert ... select`` in the block
        1, 2, 3, ... in no set order."""
        yield "row_number() over ()"

    def refresh_statistics(self, session: Session, relation: Relation) -> None:
        """Let the planner know ``relation`` just changed a lot (a commit, a frozen plan)."""

    def limit_statements(self, session: Session, seconds: float) -> None:
        """Bound every statement (and lock wait) of this session's transaction to
        ``seconds``, where the engine can (the heartbeat must never hang)."""

    def lock_state_table(self, session: Session, relation: Relation) -> None:
        """Serialise the lock-takers of ``relation`` until the session's transaction ends."""

    def claim_lock_generation(self, session: Session, relation: Relation, sync_name: str, generation: int) -> None:
        """Claim generation ``generation`` of ``sync_name``'s lock (kept in ``relation``) before
        the row says so; raise :class:`~audsync.errors.LockHeld` when another run claimed it.
        Engines with row locks (DuckDB, PostgreSQL) need nothing: :meth:`lock_state_table` and
        the row's update serialise the takers."""

    def superseded(self, session: Session, relation: Relation, sync_name: str, generation: int) -> bool:
        """Whether a generation after ``generation`` of the lock was claimed (the holder of
        ``generation`` is fenced). Where the row is the only record, the fence reads the row."""
        return False

    def columns(self, session: Session, relation: Relation) -> list[str] | None:
        """Column names of ``relation`` in order, or None when it does not exist."""
        rows = session.fetchall(
            "select column_name from information_schema.columns"
            " where table_schema = ? and table_name = ? order by ordinal_position",
            (relation.schema, relation.identifier),
        )
        return [r[0] for r in rows] or None

    def column_types(self, session: Session, relation: Relation) -> dict[str, str]:
        """``{column: type}`` of ``relation`` as the engine names its types (upper case)."""
        rows = session.fetchall(
            "select column_name, data_type from information_schema.columns"
            " where table_schema = ? and table_name = ?",
            (relation.schema, relation.identifier),
        )
        return {r[0]: str(r[1]).upper() for r in rows}

    encodes_batches: bool = False
    """Whether :meth:`encoded_batches_sql` may answer a query (else the runner does not ask
    for the plan's column types either)."""

    def encoded_batches_sql(self, plan: str, values: Sequence[tuple[str, str]]) -> str | None:
        """The query that reads plan rows as :class:`~audsync.destinations.base.EncodedBatch`
        parts, or None when this engine does not encode them (the runner then does).

        ``values`` are ``(column_sql, data_type)`` of the mapped fields in order; the query
        takes the fields' names (one ``?`` each, in order), then the batch size, the run id,
        and the seq range ``> ?`` and ``<= ?``. It returns one row a batch of sent rows, in
        order: first seq, last seq, row count, the operations (bytes), the first and the last
        operation (text), every seq when they have a gap (else null) and every destination id
        when one is set (else null). A value must encode as :func:`audsync.delivery.http.dumps`
        encodes what the driver returns for it (the same JSON value once parsed), or the
        engine answers None for its type.
        """
        return None

    def close(self) -> None:
        """Release whatever the warehouse holds open."""

    def describe(self) -> str:
        """Where this warehouse is, without secrets (for messages)."""
        return f"{self.adapter_type} target {self.target_name!r}"
