"""PostgreSQL: one connection for the run, a transaction per session."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator

from .base import Relation, Session, Warehouse


# Timeouts of every runner connection, so that no statement or lock wait can hang a run
# (and let its lock go stale) for ever. Seconds; 0 turns one off. The defaults are long enough
# for the freeze and the commit of a 10M-member plan.
STATEMENT_TIMEOUT_ENV = "AUDSYNC_PG_STATEMENT_TIMEOUT_S"
DEFAULT_STATEMENT_TIMEOUT_S = 3600.0
LOCK_TIMEOUT_ENV = "AUDSYNC_PG_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 60.0


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{env} is {raw!r}; expected a number of seconds (0: no timeout)") from None
    if value < 0:
        raise ValueError(f"{env} is {raw!r}; expected a number of seconds (0: no timeout)")
    return value


class PostgresWarehouse(Warehouse):
    """A PostgreSQL database named by a dbt-postgres profile."""

    adapter_type = "postgres"
    dialect = "postgres"
    paramstyle = "format"

    def __init__(self, credentials: Any, target_name: str):
        super().__init__(credentials, target_name)
        self._local = threading.local()

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is None or connection.closed:
            import psycopg2

            c = self.credentials
            statement_ms = int(_seconds(STATEMENT_TIMEOUT_ENV, DEFAULT_STATEMENT_TIMEOUT_S) * 1000)
            lock_ms = int(_seconds(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S) * 1000)
            settings = [f"-c statement_timeout={statement_ms}", f"-c lock_timeout={lock_ms}"]
            if c.search_path:
                settings.append(f"-c search_path={c.search_path}")
            options = {"options": " ".join(settings)}
            connection = psycopg2.connect(
                host=c.host,
                port=c.port,
                user=c.user,
                password=c.password,
                dbname=c.database,
                connect_timeout=c.connect_timeout or 10,
                sslmode=c.sslmode,
                sslcert=c.sslcert,
                sslkey=c.sslkey,
                sslrootcert=c.sslrootcert,
                application_name="audsync",
                **options,
            )
            if c.role:
                with connection.cursor() as cursor:
                    cursor.execute("set role %s", (c.role,))
                connection.commit()
            self._local.connection = connection
        return connection

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        # One connection per thread: the heartbeat thread gets its own.
        connection = self._connection()
        session = Session(self, connection)
        try:
            yield session
        except BaseException:
            connection.rollback()
            raise
        connection.commit()

    def refresh_statistics(self, session: Session, relation: Relation) -> None:
        # Autovacuum analyses a table only some time after a big change. Until then the
        # planner believes a freshly filled snapshot or plan is still empty, and picks nested
        # loops over millions of rows: the next freeze ran for minutes in the benchmark.
        session.execute(f"analyze {self.relation_sql(relation)}")

    def limit_statements(self, session: Session, seconds: float) -> None:
        milliseconds = str(max(1, int(seconds * 1000)))
        session.execute("select set_config('statement_timeout', ?, true), set_config('lock_timeout', ?, true)",
                        (milliseconds, milliseconds))

    def lock_state_table(self, session: Session, relation: Relation) -> None:
        # Two runs that both find no lock row must not both insert one: take a table lock
        # that conflicts with itself until the transaction ends.
        session.execute(f"lock table {self.relation_sql(relation)} in share row exclusive mode")

    def columns(self, session: Session, relation: Relation) -> list[str] | None:
        rows = session.fetchall(
            "select column_name from information_schema.columns"
            " where table_schema = ? and table_name = ? order by ordinal_position",
            (relation.schema, relation.identifier),
        )
        return [r[0] for r in rows] or None

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None and not connection.closed:
            connection.close()

    def describe(self) -> str:
        c = self.credentials
        return f"postgres {c.user}@{c.host}:{c.port}/{c.database} (target {self.target_name!r})"
