"""Spark: a Spark SQL Thrift server (HiveServer2 protocol) reached as dbt-spark reaches it.

The runner connects with PyHive over Thrift, the connection dbt-spark's ``method: thrift``
makes, with the dbt profile's credentials (:func:`normalise_credentials`: the rules dbt-spark
applies to a thrift target live here, beside the session they serve).

Spark's own tables (Parquet, no Delta Lake: only the package registries are reachable, and
delta-spark fetches its jars from elsewhere at run time) take ``INSERT`` but neither
``UPDATE`` nor ``DELETE``, and Spark has no transactions. So:

* **Changing rows** (:class:`SparkSession`): an ``update T set ... where P`` or ``delete from T
  where P`` of the runner's SQL is turned (with sqlglot) into a select of T's new content, and
  T is rewritten by the package's rewrite-and-swap protocol (macros/spark/rewrite.sql): the new
  content is written to ``T__audsync_next`` (CREATE TABLE AS SELECT, listed by the metastore
  only once written), T is renamed ``T__audsync_old``, the new table renamed T, the old one
  dropped. Each step is one metastore operation, and :meth:`SparkWarehouse.recover` (run
  before every rewrite and every read of a sync's relations) finishes a swap a kill
  interrupted (T missing, both others present: roll forward) or drops an abandoned write (T
  present). A kill at any point leaves T with its old content or its new one, never a mix.
* **A commit** is the runner's sequence of such statements, each atomic on its own. It is
  safe without a transaction because its order makes every prefix harmless: the snapshot is
  written first (its delete-then-insert of the accepted keys is one rewrite per statement,
  and re-applying the same accepted rows gives the same snapshot), and the run's plan and
  delivery records are dropped last, so a commit killed midway is committed again, whole, by
  the next run's recovery from the plan and delivery records still there.
* **The lock** cannot rest on a row update that compares and sets: two rewrites of
  ``audsync_syncs`` may overwrite each other. It rests on what the metastore does atomically:
  ``CREATE TABLE`` of a name that exists fails. Taking generation N of a sync's lock creates
  the empty marker table ``audsync_lock__<sync>__<N>`` in the state schema; of two runs that
  both read generation N-1, only one creates the marker, and the other gets :class:`LockHeld`.
  The holder of generation N is fenced as soon as a marker of a later generation exists
  (:meth:`superseded`, checked by every flush and the commit), whatever the row says; a
  claim drops the markers before its own, so one marker per sync remains. The heartbeat and the
  lock's other columns are still written to ``audsync_syncs`` (by rewrite), for takeovers and
  for ``audsync status``.

Values travel as bind parameters: PyHive's ``pyformat`` placeholders, escaped by the driver.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import time
from typing import Any, Iterator, Sequence

import sqlglot
from sqlglot import exp

from .. import names
from ..errors import ConfigError, LockHeld
from .base import Relation, Session, Warehouse

logger = logging.getLogger("audsync.warehouse")

# dbt-spark's thrift defaults (SparkCredentials): port 443, a 10 s connect timeout.
DEFAULT_PORT = 443
DEFAULT_CONNECT_TIMEOUT_S = 10
LOCK_MARKER_PREFIX = "audsync_lock__"
"""Marker tables of the lock: ``audsync_lock__<sync>__<generation>`` in the state schema."""
# How long a rewrite waits for another writer's ``T__audsync_next`` to go before it counts as
# left by a killed writer.
REWRITE_WAIT_S = 30.0

MISSING_TABLE_RETRIES = 12
MISSING_TABLE_WAIT_S = 0.25
_TEMPORARY_TABLE = re.compile(r"\s*create\s+temporary\s+table\s+(\S+)\s+as", re.IGNORECASE)
_MARK = "__audsync_param_{}__"
_MARK_RE = re.compile(r"'__audsync_param_(\d+)__'")


def normalise_credentials(values: dict[str, Any], where: str) -> dict[str, Any]:
    """A dbt-spark target's keys as the runner uses them; ``ConfigError`` naming the key for a
    target the runner cannot reach (another ``method``, ``use_ssl``) or a missing key.

    As dbt-spark: ``schema`` is required and ``database``, when given, must equal it (Spark has
    no level above schemas); ``port`` defaults to 443 and ``connect_timeout`` to 10 seconds;
    ``user``, ``auth``, ``kerberos_service_name`` and ``password`` (the secret) are passed to
    the Thrift connection as given.
    """
    method = values.get("method")
    if method != "thrift":
        raise ConfigError(
            f"{where}: the key 'method' is {method!r}; the audsync runner reaches Spark with "
            "method 'thrift' only (dbt-spark's session method is experimental; http and odbc "
            "are not supported yet)"
        )
    if values.get("use_ssl") in (True, "true", "True"):
        raise ConfigError(f"{where}: the key 'use_ssl' is true; the audsync runner's Spark session has no SSL yet")
    for key in ("host", "schema"):
        if not values.get(key):
            raise ConfigError(f"{where}: the key '{key}' is missing")
    if values.get("database") not in (None, "", values["schema"]):
        raise ConfigError(
            f"{where}: the key 'database' is {values['database']!r}; on Spark it must equal "
            f"'schema' ({values['schema']!r}), as dbt-spark requires"
        )
    values["database"] = None
    if values.get("password"):
        from ..redact import register_secret

        register_secret(values["password"])
    for key, default in (("port", DEFAULT_PORT), ("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)):
        raw = values.get(key)
        if raw in (None, ""):
            values[key] = default
            continue
        try:
            values[key] = int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: the key '{key}' is {raw!r}; expected a number") from None
    return values


def _is_missing_table(error: BaseException) -> bool:
    text = str(error)
    return "TABLE_OR_VIEW_NOT_FOUND" in text or "Table or view not found" in text


def _is_stale_listing(error: BaseException) -> bool:
    """Spark read a file its cached listing names and another session has since removed."""
    text = str(error)
    return "FAILED_READ_FILE.FILE_NOT_EXIST" in text or "java.io.FileNotFoundException" in text


def _is_existing_table(error: BaseException) -> bool:
    text = str(error)
    return "TABLE_OR_VIEW_ALREADY_EXISTS" in text or "already exists" in text


class SparkSession(Session):
    """A Spark connection: statements apply one by one (Spark has no transactions), and the
    runner's ``update`` and ``delete`` statements become rewrites of their table."""

    warehouse: "SparkWarehouse"

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        head = sql.lstrip().split(None, 1)[0].lower() if sql.strip() else ""
        if head == "create" and _TEMPORARY_TABLE.match(sql):
            # Spark makes no temporary table from a select (a temporary view would be read
            # lazily, after the rows it selects are gone): a table of the session's schema,
            # dropped by the runner as a temporary one would be.
            sql = _TEMPORARY_TABLE.sub(r"create table \1 using parquet as", sql, count=1)
        if head in ("update", "delete"):
            self._last_count = self.warehouse.change_rows(self, sql, params)
            return self._cursor
        self._last_count = None
        return self.raw(sql, params)

    def execute_count(self, sql: str, params: Sequence[Any] = ()) -> int:
        if sql.lstrip()[:6].lower() == "insert":
            # The Thrift protocol returns no row count: count what the insert selects first.
            marked = sqlglot.parse_one(_mark_params(sql), read="spark")
            count_sql, count_params = _unmark(
                f"select count(*) from ({marked.expression.sql(dialect='spark')}) as audsync_inserted", params)
            inserted = int(self.raw(count_sql, count_params).fetchone()[0])
            self.raw(sql, params)
            return inserted
        self.execute(sql, params)
        return int(self._last_count or 0)

    def __init__(self, warehouse: "SparkWarehouse", connection: Any):
        super().__init__(warehouse, connection)
        self._resolved: set[str] = set()
        """Tables this Spark session has read, so may hold a cached file listing of."""

    def raw(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run ``sql`` with ``?`` placeholders as it is (no rewrite).

        A Spark session caches the file listing of each table it reads, and another session
        (the heartbeat, another run, ``dbt run``) may have rewritten or appended to the table
        since: a rewrite makes the next read fail on a file that is gone, an append makes it
        miss rows without a word. So a statement naming a table this session read before
        refreshes it first (``REFRESH TABLE``), and one that still finds a file gone (a
        rewrite between the refresh and the read; Spark fails such a statement whole) is
        refreshed and tried again.

        A table another session is swapping is missing for the moment between its two
        renames: a statement that finds a table missing (which Spark reports before running
        anything) is tried again, and after a few tries the tables it names are recovered
        (a swap whose writer was killed), then it is tried once more."""
        typed = _typed_placeholders(sql, params)
        tables = _tables_named(sql) if _reads_tables(sql) else []
        self._refresh([t for t in tables if _table_key(t) in self._resolved])
        for attempt in range(MISSING_TABLE_RETRIES + 1):
            try:
                cursor = Session.execute(self, typed, params)
                self._resolved.update(_table_key(t) for t in tables)
                return cursor
            except Exception as error:  # noqa: BLE001 - a missing table or file is retried
                stale = _is_stale_listing(error)
                if not (stale or _is_missing_table(error)) or attempt == MISSING_TABLE_RETRIES:
                    raise
                if stale:
                    self._refresh(tables)
                    continue
                if attempt == MISSING_TABLE_RETRIES - 1:
                    for table in tables or _tables_named(sql):
                        self.warehouse.recover(self, table)
                time.sleep(MISSING_TABLE_WAIT_S)
        raise AssertionError("unreachable")

    def _refresh(self, tables: Sequence[Relation]) -> None:
        """Drop this session's cached listing of ``tables`` (a missing one is skipped)."""
        for table in tables:
            try:
                Session.execute(self, f"refresh table {self.warehouse.relation_sql(table)}")
            except Exception as error:  # noqa: BLE001 - a table swapped away just now
                if not _is_missing_table(error):
                    raise

    def executemany(self, sql: str, rows) -> None:
        for row in rows:
            self.raw(sql, tuple(row))


class SparkWarehouse(Warehouse):
    """A Spark SQL Thrift server named by a dbt-spark profile (``method: thrift``)."""

    adapter_type = "spark"
    dialect = "spark"
    paramstyle = "pyformat"
    fence_writes = False
    """Fencing reads: the lock's truth is its marker tables (:meth:`superseded`)."""

    def now_sql(self) -> str:
        return "to_utc_timestamp(current_timestamp(), current_timezone())"

    def seconds_since_sql(self, column: str) -> str:
        return f"((unix_micros({self.now_sql()}) - unix_micros({column})) / 1000000.0)"

    def on_conflict_do_nothing(self) -> str:
        # No unique indexes on Spark: the lock's marker tables serialise lock-takers instead.
        return ""

    def placeholders(self, sql: str) -> str:
        # PyHive interpolates pyformat parameters itself (escaping each value).
        return sql.replace("%", "%%").replace("?", "%s")

    # -- connections ------------------------------------------------------------------------

    def _connect(self):
        from pyhive import hive

        c = self.credentials
        return hive.connect(
            host=c.host, port=int(c.port), username=c.user or None, auth=c.auth or "NONE",
            kerberos_service_name=c.kerberos_service_name, password=c.password or None,
            database=c.schema,
        )

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        # A connection (a Spark session on the server) per block: a new session has no cached
        # listing of a table another session has since swapped by rename.
        connection = self._connect()
        try:
            yield SparkSession(self, connection)
        finally:
            try:
                connection.close()
            except Exception as error:  # noqa: BLE001 - every statement has applied by now
                # Spark's Thrift server can fail to close a session (its Hive function
                # registry loads classes the pyspark wheel lacks); the work is done, and the
                # server drops the session itself.
                logger.debug("closing a Spark session failed: %s", str(error)[:200])

    def rows_changed(self, cursor: Any) -> int:
        # The Thrift protocol has no row count; SparkSession.execute_count counts first.
        return -1

    @contextlib.contextmanager
    def row_numbers(self, session: Session) -> Iterator[str]:
        # Spark numbers rows only over an ordered window.
        yield f"row_number() over (order by {names.KEY}, op)"

    def columns(self, session: Session, relation: Relation) -> list[str] | None:
        self.recover(session, relation)
        try:
            cursor = session.raw(f"select * from {self.relation_sql(relation)} limit 0")
        except Exception as error:  # noqa: BLE001 - a missing table is None, the rest raises
            if _is_missing_table(error):
                return None
            raise
        cursor.fetchall()
        return [d[0].split(".")[-1] for d in cursor.description]

    # -- rewrite and swap -------------------------------------------------------------------

    def _tables(self, session: Session, schema: str) -> set[str]:
        rows = session.raw(f"show tables in {self.quote(schema)}").fetchall()
        return {r[1].lower() for r in rows if not r[2]}  # (namespace, name, is_temporary)

    def recover(self, session: Session, relation: Relation) -> None:
        """Finish or undo a rewrite of ``relation`` a kill interrupted (module docstring)."""
        suffixes = names.REWRITE_SUFFIXES
        name = relation.identifier.lower()
        tables = self._tables(session, relation.schema)
        nxt, old = name + suffixes["next"], name + suffixes["old"]
        if not ({nxt, old} & tables):
            return
        q = lambda identifier: self.relation_sql(Relation(None, relation.schema, identifier))  # noqa: E731
        if name not in tables and old in tables:
            session.raw(f"alter table {q(nxt if nxt in tables else old)} rename to {q(name)}")
            tables.discard(nxt if nxt in tables else old)
            tables.add(name)
        for leftover in (nxt, old):
            if leftover in tables:
                session.raw(f"drop table if exists {q(leftover)}")

    def rewrite(self, session: Session, relation: Relation, select_sql: str, params: Sequence[Any]) -> None:
        """Replace ``relation``'s content with ``select_sql`` (which may read it)."""
        suffixes = names.REWRITE_SUFFIXES
        target = self.relation_sql(relation)
        nxt = self.relation_sql(relation.with_suffix(suffixes["next"]))
        old = self.relation_sql(relation.with_suffix(suffixes["old"]))
        self.recover(session, relation)
        deadline = time.monotonic() + REWRITE_WAIT_S
        while True:
            try:
                session.raw(f"create table {nxt} using parquet as {select_sql}", params)
                break
            except Exception as error:  # noqa: BLE001 - another writer's next table, or a failure
                if not _is_existing_table(error):
                    raise
                if time.monotonic() > deadline:
                    # Left by a writer that was killed before its swap: T holds the old content.
                    session.raw(f"drop table if exists {nxt}")
                time.sleep(0.5)
        session.raw(f"alter table {target} rename to {old}")
        session.raw(f"alter table {nxt} rename to {target}")
        session.raw(f"drop table if exists {old}")

    def change_rows(self, session: Session, sql: str, params: Sequence[Any]) -> int:
        """Run an ``update`` or ``delete`` of the runner's SQL as a rewrite; return the rows
        it changed."""
        marked = _mark_params(sql)
        tree = sqlglot.parse_one(marked, read="spark")
        table = tree.this if isinstance(tree, exp.Update) else tree.args["this"]
        relation = Relation(None, table.db, table.name)
        where = tree.args.get("where")
        condition = where.this if where is not None else exp.true()
        source = f"{self.relation_sql(relation)}" + (f" as {self.quote(table.alias)}" if table.alias else "")
        count_sql, count_params = _unmark(
            f"select count(*) from {source} where {condition.sql(dialect='spark')}", params)
        changed = int(session.raw(count_sql, count_params).fetchone()[0])
        if changed == 0:
            return 0
        if isinstance(tree, exp.Delete) and where is None:
            session.raw(f"truncate table {self.relation_sql(relation)}")
            return changed
        hit = f"coalesce({condition.sql(dialect='spark')}, false)"
        if isinstance(tree, exp.Delete):
            select = f"select * from {source} where not {hit}"
        else:
            sets = {}
            for assignment in tree.expressions:
                sets[assignment.this.name.lower()] = assignment.expression.sql(dialect="spark")
            columns = self.columns(session, relation) or []
            parts = []
            for column in columns:
                quoted = self.quote(column)
                value = sets.get(column.lower())
                parts.append(f"case when {hit} then {value} else {quoted} end as {quoted}" if value is not None
                             else f"{quoted}")
            select = f"select {', '.join(parts)} from {source}"
        select_sql, select_params = _unmark(select, params)
        self.rewrite(session, relation, select_sql, select_params)
        return changed

    # -- the lock ---------------------------------------------------------------------------

    def lock_marker(self, relation: Relation, sync_name: str, generation: int) -> Relation:
        """The marker table of ``sync_name``'s lock generation ``generation``."""
        return Relation(None, relation.schema, f"{LOCK_MARKER_PREFIX}{sync_name.lower()}__{int(generation)}")

    def _markers(self, session: Session, relation: Relation, sync_name: str) -> dict[int, str]:
        prefix = f"{LOCK_MARKER_PREFIX}{sync_name.lower()}__"
        found = {}
        for table in self._tables(session, relation.schema):
            if table.startswith(prefix) and table[len(prefix):].isdigit():
                found[int(table[len(prefix):])] = table
        return found

    def claim_lock_generation(self, session: Session, relation: Relation, sync_name: str, generation: int) -> None:
        marker = self.relation_sql(self.lock_marker(relation, sync_name, generation))
        held = LockHeld(
            f"sync {sync_name!r}: another run took lock generation {generation} or later at the "
            f"same moment (marker table {marker}); try again once it ends",
            sync=sync_name,
        )
        try:
            session.raw(f"create table {marker} (run_id string) using parquet")
        except Exception as error:  # noqa: BLE001 - only "exists" means another run won
            if not _is_existing_table(error):
                raise
            raise held from None
        markers = self._markers(session, relation, sync_name)
        if max(markers) > generation:
            # This run read the row before a later generation was taken: it must not hold.
            raise held
        # Only the newest marker matters (a holder is fenced by any later one).
        for older, table in markers.items():
            if older < generation:
                session.raw(f"drop table if exists {self.relation_sql(Relation(None, relation.schema, table))}")

    def superseded(self, session: Session, relation: Relation, sync_name: str, generation: int) -> bool:
        return any(g > generation for g in self._markers(session, relation, sync_name))

    def describe(self) -> str:
        c = self.credentials
        return f"spark thrift {c.host}:{c.port}/{c.schema} (target {self.target_name!r})"


def _tables_named(sql: str) -> list[Relation]:
    """The schema-qualified tables ``sql`` reads or writes."""
    try:
        tree = sqlglot.parse_one(_mark_params(sql), read="spark")
    except sqlglot.errors.ParseError:
        return []
    return [Relation(None, t.db, t.name) for t in tree.find_all(exp.Table) if t.db and t.name]


_NO_READ = re.compile(r"\s*(drop|alter|show|refresh|truncate|describe|use|set)\b", re.IGNORECASE)


def _reads_tables(sql: str) -> bool:
    """Whether ``sql`` may read a table's files (not a metastore-only statement)."""
    return _NO_READ.match(sql) is None


def _table_key(table: Relation) -> str:
    return f"{table.schema}.{table.identifier}".lower()


def _typed_placeholders(sql: str, params: Sequence[Any]) -> str:
    """``sql`` with a ``timestamp`` before each ``?`` bound to a datetime: PyHive sends a
    datetime as a string literal, which Spark will not store in a timestamp column."""
    if not any(isinstance(p, (dt.datetime, dt.date)) for p in params):
        return sql
    pieces = sql.split("?")
    out = [pieces[0]]
    for value, piece in zip(params, pieces[1:]):
        out.append(("timestamp ?" if isinstance(value, dt.datetime) else "date ?" if isinstance(value, dt.date) else "?") + piece)
    return "".join(out)


def _mark_params(sql: str) -> str:
    """``sql`` with its i-th ``?`` replaced by a string literal naming i, for sqlglot."""
    counter = iter(range(10**9))
    return re.sub(r"\?", lambda _: "'" + _MARK.format(next(counter)) + "'", sql)


def _unmark(sql: str, params: Sequence[Any]) -> tuple[str, list[Any]]:
    """Marked ``sql`` back to ``?`` placeholders, with ``params`` in their new order."""
    order: list[Any] = []

    def put(match: re.Match) -> str:
        order.append(params[int(match.group(1))])
        return "?"

    return _MARK_RE.sub(put, sql), order
