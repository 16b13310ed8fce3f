"""A throwaway dbt project that installs audsync, runs real dbt in-process, and reads back.

Usage::

    project = DbtProject(tmp_path, "duckdb")
    project.write_seed("people", [{"id": 1, "email": "a@example.com"}])
    project.write_model("members", "select * from {{ ref('people') }}")
    project.dbt("seed")
    project.dbt("run")
    assert project.query(f"select count(*) from {project.relation('members')}") == [(1,)]

dbt runs in this process with :class:`dbt.cli.main.dbtRunner`, which costs a fraction of a
``dbt`` subprocess (no interpreter start, no re-import of dbt and its adapters). The audsync
package is installed by a symlink ``dbt_packages/audsync`` to the repository root, which is what
``dbt deps`` does for a ``local:`` package, without paying for a ``dbt deps`` invocation.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .postgres import PostgresServer
    from .spark import SparkServer

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository root: the audsync dbt package (``dbt_project.yml``, ``macros/``, ``models/``)."""

PACKAGE_NAME = "audsync"
WAREHOUSES = ("duckdb", "postgres", "spark")
"""Every target a test project can have (``--warehouses`` takes these)."""
DEFAULT_WAREHOUSES = ("duckdb", "postgres")
"""The warehouses tested by default, and those the ``warehouse`` fixture runs each test on:
Spark has its own focused subset (the tests marked ``spark``)."""


def with_spark(*marks: Any) -> list[Any]:
    """Parameters for a test that parametrizes ``warehouse`` itself: the default warehouses,
    and ``"spark"`` marked ``spark`` (selected only with ``--warehouses spark``) with ``marks``."""
    import pytest

    return [*DEFAULT_WAREHOUSES, pytest.param("spark", marks=[pytest.mark.spark, *marks])]


# dbt must never try to reach its usage-stats service from a test (there is no network).
os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

_DATABASE_COUNTER = itertools.count(1)
_FAILED_STATUSES = {"error", "fail", "runtime error"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class DbtResult:
    """What one dbt invocation did."""

    args: list[str]
    success: bool
    exception: BaseException | None
    result: Any
    """The command's raw result: a ``RunExecutionResult`` for run/seed/build/test, a manifest
    for parse, ``None`` when dbt stopped early."""
    errors: list[str] = field(default_factory=list)
    """Failure messages: failed nodes (``<unique_id>: <message>``), the exception, and every
    error-level log line."""
    log: list[str] = field(default_factory=list)
    """dbt's info-and-above log lines, as ``<level>: <message>``."""

    @property
    def error_text(self) -> str:
        """All failure messages as one text, for ``in`` assertions."""
        return "\n".join(self.errors)

    @property
    def log_text(self) -> str:
        """The log lines as one text."""
        return "\n".join(self.log)

    @property
    def all_results(self) -> list[Any]:
        """Every result of run/seed/build/test, project hooks included; empty otherwise."""
        return list(getattr(self.result, "results", None) or [])

    @property
    def results(self) -> list[Any]:
        """The node results (``RunResult``) of run/seed/build/test, without the project hooks'
        (the package's ``on-run-start`` recovery runs on every ``dbt run``)."""
        return [r for r in self.all_results if str(getattr(r.node, "resource_type", "")) != "operation"]

    def status(self, name: str) -> str:
        """The status of the node whose name (or unique id) is ``name``; KeyError if none ran."""
        for res in self.results:
            node = res.node
            if name in (node.name, node.unique_id):
                return str(getattr(res.status, "value", res.status))
        ran = ", ".join(r.node.unique_id for r in self.results) or "nothing"
        raise KeyError(f"no node named {name!r} in this dbt result (ran: {ran})")

    @property
    def statuses(self) -> dict[str, str]:
        """``{node name: status}`` for every node that ran."""
        return {r.node.name: str(getattr(r.status, "value", r.status)) for r in self.results}


def _csv_text(rows: str | Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]]) -> str:
    """Seed rows as CSV: CSV text as is, dicts (header from the first), or a header row first."""
    if isinstance(rows, str):
        return rows if rows.endswith("\n") else rows + "\n"
    rows = list(rows)
    if not rows:
        raise ValueError("a seed needs at least a header: pass CSV text or a header row")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if isinstance(rows[0], Mapping):
        header = list(rows[0].keys())
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if row.get(col) is None else row.get(col) for col in header])
    else:
        for row in rows:
            writer.writerow(["" if value is None else value for value in row])
    return out.getvalue()


def quote(identifier: str, target: str = "duckdb") -> str:
    """Quote an identifier for DuckDB and PostgreSQL alike (double quotes), or for Spark
    (backticks)."""
    if target == "spark":
        return "`" + identifier.replace("`", "``") + "`"
    return '"' + identifier.replace('"', '""') + '"'


class DbtProject:
    """A dbt project in ``root`` that depends on the audsync package and targets one warehouse.

    Args:
        root: an empty (or missing) folder for the project; everything lives inside it.
        target: ``"duckdb"`` (file ``<root>/warehouse.duckdb``, schema ``main``),
            ``"postgres"`` (a fresh database on ``pg``, schema ``public``) or ``"spark"``
            (a fresh schema on ``spark``, dbt-spark's ``method: thrift``).
        pg: the running :class:`~tests.support.postgres.PostgresServer`; needed for postgres.
        spark: the running :class:`~tests.support.spark.SparkServer`; needed for spark.
        name: the project and profile name.
        package_root: the audsync package to install (default: this repository).
        vars: project-level ``vars`` for ``dbt_project.yml``.
        project_config: extra top-level keys for ``dbt_project.yml`` (``models:``, ``flags:``...).
        scaffold: write ``dbt_project.yml`` and ``packages.yml``; ``False`` keeps the project
            already in ``root`` (see :meth:`from_example`). ``profiles.yml`` is always written.
    """

    def __init__(
        self,
        root: Path,
        target: str = "duckdb",
        pg: PostgresServer | None = None,
        name: str = "proj",
        *,
        package_root: Path | None = None,
        vars: Mapping[str, Any] | None = None,
        project_config: Mapping[str, Any] | None = None,
        scaffold: bool = True,
        spark: SparkServer | None = None,
    ) -> None:
        if target not in WAREHOUSES:
            raise ValueError(f"target must be one of {WAREHOUSES}, not {target!r}")
        if target == "postgres" and pg is None:
            raise ValueError("a postgres DbtProject needs pg=<PostgresServer>")
        if target == "spark" and spark is None:
            raise ValueError("a spark DbtProject needs spark=<SparkServer>")
        self.root = Path(root).resolve()
        self.target = target
        self.pg = pg
        self.spark = spark
        self.name = name
        self.package_root = Path(package_root or REPO_ROOT).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        if target == "duckdb":
            self.schema = "main"
            self.database = "warehouse"
            self.duckdb_path = self.root / "warehouse.duckdb"
        elif target == "spark":
            # Spark has no databases above schemas: each project gets a schema of its own.
            self.duckdb_path = None
            self.database = None
            self.schema = spark.new_schema_name(name)
            spark.query(f"create schema if not exists {quote(self.schema, 'spark')}")
        else:
            self.schema = "public"
            self.duckdb_path = None
            # A process-wide counter keeps names unique even once cut to 63 bytes; the
            # folder names say which test a database belongs to.
            n = next(_DATABASE_COUNTER)
            label = f"{name}_{n}_{self.root.parent.name}_{self.root.name}"
            self.database = pg.create_database(label)
        if scaffold:
            self._write_project(dict(vars or {}), dict(project_config or {}))
        self._write_profiles()
        self._install_package()

    @classmethod
    def from_example(
        cls,
        example: str,
        dest: Path,
        target: str = "duckdb",
        pg: PostgresServer | None = None,
        *,
        package_root: Path | None = None,
    ) -> DbtProject:
        """Copy ``examples/<example>`` to ``dest`` and make it a project on ``target``.

        The copy's ``packages.yml`` points at the package and its ``profiles.yml`` is replaced
        by one for ``target`` (profile named as in the example's ``dbt_project.yml``).
        """
        copy_example(example, dest, package_root=package_root)
        config = yaml.safe_load((Path(dest) / "dbt_project.yml").read_text())
        return cls(
            dest,
            target,
            pg=pg,
            name=config.get("profile") or config["name"],
            package_root=package_root,
            scaffold=False,
        )

    # -- layout ---------------------------------------------------------------------------

    def _write_project(self, vars: dict[str, Any], extra: dict[str, Any]) -> None:
        config: dict[str, Any] = {
            "name": self.name,
            "version": "1.0.0",
            "config-version": 2,
            "profile": self.name,
            "model-paths": ["models"],
            "seed-paths": ["seeds"],
            "macro-paths": ["macros"],
            "test-paths": ["tests"],
            "clean-targets": ["target", "dbt_packages"],
            "vars": vars,
            "flags": {"send_anonymous_usage_stats": False, "partial_parse": True},
        }
        config.update(extra)
        self.write_file("dbt_project.yml", yaml.safe_dump(config, sort_keys=False))
        packages = {"packages": [{"local": str(self.package_root)}]}
        self.write_file("packages.yml", yaml.safe_dump(packages, sort_keys=False))
        for folder in ("models", "seeds", "macros"):
            (self.root / folder).mkdir(exist_ok=True)

    def _write_profiles(self) -> None:
        if self.target == "duckdb":
            output = {
                "type": "duckdb",
                "path": str(self.duckdb_path),
                "schema": self.schema,
                "threads": 1,
            }
        elif self.target == "spark":
            output = {
                "type": "spark",
                "method": "thrift",
                "host": self.spark.host,
                "port": self.spark.port,
                "user": "audsync",
                "schema": self.schema,
                "connect_retries": 3,
                "connect_timeout": 10,
                "threads": 1,
            }
        else:
            pg = self.pg
            output = {
                "type": "postgres",
                "host": pg.host,
                "port": pg.port,
                "user": pg.user,
                "password": pg.password,
                "dbname": self.database,
                "schema": self.schema,
                "threads": 1,
            }
        profiles = {self.name: {"target": self.target, "outputs": {self.target: output}}}
        self.write_file("profiles.yml", yaml.safe_dump(profiles, sort_keys=False))

    def _install_package(self) -> None:
        """Install audsync as ``dbt deps`` does for a local package: a symlink."""
        packages = self.root / "dbt_packages"
        packages.mkdir(exist_ok=True)
        link = packages / PACKAGE_NAME
        if link.is_symlink() or link.exists():
            return
        try:
            link.symlink_to(self.package_root, target_is_directory=True)
        except OSError:
            self.dbt("deps")

    def write_file(self, relpath: str | Path, text: str) -> Path:
        """Write ``text`` to ``relpath`` under the project root, making folders; return the path."""
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def write_model(self, name: str, sql: str, subdir: str = "") -> Path:
        """Write ``models/<subdir>/<name>.sql``; return its path."""
        return self.write_file(Path("models") / subdir / f"{name}.sql", sql)

    def remove_model(self, name: str) -> None:
        """Delete the model ``name`` (in any subfolder); FileNotFoundError if there is none."""
        found = list((self.root / "models").rglob(f"{name}.sql"))
        if not found:
            raise FileNotFoundError(f"no model {name!r} under {self.root / 'models'}")
        for path in found:
            path.unlink()

    def write_seed(
        self, name: str, rows: str | Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]]
    ) -> Path:
        """Write ``seeds/<name>.csv`` from CSV text, a list of dicts, or rows with a header first."""
        return self.write_file(Path("seeds") / f"{name}.csv", _csv_text(rows))

    # -- dbt ------------------------------------------------------------------------------

    def dbt(self, *args: str, expect_ok: bool | None = True) -> DbtResult:
        """Run ``dbt <args>`` in-process on this project and return what happened.

        ``expect_ok=True`` raises AssertionError with dbt's error text when the command fails;
        ``expect_ok=False`` raises AssertionError when it succeeds; ``None`` checks nothing.
        """
        from dbt.cli.main import dbtRunner
        from dbt_common.events.base_types import EventLevel

        argv = [str(a) for a in args]
        argv += ["--project-dir", str(self.root), "--profiles-dir", str(self.root)]

        log: list[str] = []
        errors: list[str] = []

        def collect(event) -> None:
            level = event.info.level
            if level in (EventLevel.DEBUG, "debug"):
                return
            msg = _ANSI.sub("", event.info.msg)
            log.append(f"{level}: {msg}")
            if level in (EventLevel.ERROR, "error") and msg.strip():
                errors.append(msg)

        _reset_dbt_globals()
        cwd = os.getcwd()
        try:
            res = dbtRunner(callbacks=[collect]).invoke(argv)
        finally:
            os.chdir(cwd)
            _release_duckdb()
        result = DbtResult(
            args=argv,
            success=bool(res.success),
            exception=res.exception,
            result=res.result,
            log=log,
        )
        node_errors = [
            f"{r.node.unique_id}: {r.message}"
            for r in result.all_results
            if str(getattr(r.status, "value", r.status)) in _FAILED_STATUSES
        ]
        result.errors = node_errors + ([repr(res.exception)] if res.exception else []) + errors
        if expect_ok is True and not result.success:
            raise AssertionError(
                f"dbt {' '.join(args)} failed in {self.root}:\n{result.error_text or result.log_text}"
            )
        if expect_ok is False and result.success:
            raise AssertionError(f"dbt {' '.join(args)} succeeded, but a failure was expected")
        return result

    # -- the warehouse --------------------------------------------------------------------

    def relation(self, name: str, suffix: str = "", schema: str | None = None) -> str:
        """The quoted ``"schema"."name<suffix>"`` of a relation in this project's warehouse.

        ``schema`` defaults to the target schema. The connection's own database is the
        project's, so no database qualifier is needed.
        """
        return f"{quote(schema or self.schema, self.target)}.{quote(name + suffix, self.target)}"

    def _connect(self):
        if self.target == "duckdb":
            import duckdb

            return duckdb.connect(str(self.duckdb_path))
        if self.target == "spark":
            return self.spark.connect(self.schema)
        return self.pg.connect(self.database)

    def _close(self, conn) -> None:
        if self.target == "spark":
            from .spark import close_quietly

            close_quietly(conn)
        else:
            conn.close()

    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[tuple]:
        """Run ``sql`` and return its rows (empty for statements without a result).

        Parameters use ``%s`` placeholders on both warehouses (turned into ``?`` for DuckDB);
        with parameters, a literal ``%`` is written ``%%`` as in psycopg2. The DuckDB file is
        opened for this call only, so that dbt and the runner can open it afterwards.
        """
        conn = self._connect()
        try:
            if self.target == "duckdb":
                if params is not None:
                    sql = re.sub(r"%(%|s)", lambda m: "%" if m.group(1) == "%" else "?", sql)
                    cur = conn.execute(sql, params)
                else:
                    cur = conn.execute(sql)
                return cur.fetchall() if cur.description else []
            if self.target == "spark":
                cur = conn.cursor()
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            self._close(conn)

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> None:
        """Run a statement (committed at once) and discard any result."""
        self.query(sql, params)

    def _as_relation(self, relation: str) -> str:
        return relation if ("." in relation or '"' in relation or "`" in relation) else self.relation(relation)

    def columns(self, relation: str) -> list[str]:
        """The column names of ``relation`` in order; a bare name is taken in the target schema."""
        sql = f"select * from {self._as_relation(relation)} limit 0"
        conn = self._connect()
        try:
            if self.target == "duckdb":
                return [d[0] for d in conn.execute(sql).description]
            if self.target == "spark":
                cur = conn.cursor()
                cur.execute(sql)
                # PyHive names columns `alias.column` for a select *.
                return [d[0].split(".")[-1] for d in cur.description]
            with conn.cursor() as cur:
                cur.execute(sql)
                return [d[0] for d in cur.description]
        finally:
            self._close(conn)

    def rows(self, relation: str, order_by: str = "1") -> list[tuple]:
        """Every row of ``relation`` (a bare name is taken in the target schema), sorted."""
        return self.query(f"select * from {self._as_relation(relation)} order by {order_by}")

    def relation_exists(self, name: str, schema: str | None = None) -> bool:
        """Whether a table or view ``name`` exists in ``schema`` (default: the target schema)."""
        if self.target == "spark":
            # Spark has no information_schema; its catalog answers SHOW TABLES.
            tables = self.query(f"show tables in {quote(schema or self.schema, 'spark')}")
            return any(row[1] == name.lower() for row in tables)
        found = self.query(
            "select count(*) from information_schema.tables "
            "where table_schema = %s and table_name = %s",
            [schema or self.schema, name],
        )
        return found[0][0] > 0

    def __repr__(self) -> str:
        return f"DbtProject({str(self.root)!r}, target={self.target!r}, name={self.name!r})"


def _reset_dbt_globals() -> None:
    """Reset the per-invocation globals dbt's own test helper resets between in-process runs."""
    try:
        from dbt_common.events.functions import reset_metadata_vars
    except ImportError:  # older dbt-common
        return
    reset_metadata_vars()


def _release_duckdb() -> None:
    """Close dbt-duckdb's process-wide DuckDB instance so the file is free for others."""
    try:
        from dbt.adapters.duckdb.connections import DuckDBConnectionManager
    except ImportError:
        return
    with DuckDBConnectionManager._LOCK:
        env = DuckDBConnectionManager._ENV
        if env is not None:
            try:
                env.close()
            finally:
                DuckDBConnectionManager._ENV = None


def copy_example(name: str, dest: Path, package_root: Path | None = None) -> Path:
    """Copy ``examples/<name>`` to ``dest`` and point its ``packages.yml`` at the package.

    The example's own ``local: ../..`` only holds inside the repository. Build outputs
    (``target/``, ``dbt_packages/``, ``logs/``, ``output/``, DuckDB files) are not copied.
    Returns ``dest``.
    """
    source = REPO_ROOT / "examples" / name
    if not (source / "dbt_project.yml").exists():
        raise FileNotFoundError(f"no example dbt project at {source}")
    ignore = shutil.ignore_patterns(
        "target", "dbt_packages", "logs", "output", "*.duckdb", "*.duckdb.wal", "__pycache__"
    )
    shutil.copytree(source, dest, ignore=ignore, dirs_exist_ok=True)
    package_root = Path(package_root or REPO_ROOT).resolve()
    packages_file = Path(dest) / "packages.yml"
    packages = yaml.safe_load(packages_file.read_text()) or {}
    for entry in packages.get("packages", []):
        if "local" in entry:
            entry["local"] = str(package_root)
    packages_file.write_text(yaml.safe_dump(packages, sort_keys=False))
    return Path(dest)


__all__ = ["REPO_ROOT", "WAREHOUSES", "DEFAULT_WAREHOUSES", "with_spark", "DbtProject", "DbtResult", "copy_example", "quote"]
