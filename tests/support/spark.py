"""A throwaway Spark Thrift server for one test session.

:func:`start_spark` starts Spark's own ``HiveThriftServer2`` from the installed ``pyspark``
package (its wheel ships ``spark-hive-thriftserver`` and the Hive jars; ``SPARK_HOME`` is the
package's folder) with Debian's Java, on ``127.0.0.1`` and a free port, with the warehouse
folder and the embedded Derby metastore in a temporary folder. It waits, bounded, until the
server answers ``select 1`` over Thrift (PyHive, as dbt-spark's ``method: thrift`` connects),
and :meth:`SparkServer.stop` stops the server's whole process group and removes the folder.

The machine is small and shared: one local executor thread pair (``local[2]``), two shuffle
partitions, no UI, a 1 GB driver. It is what dbt-spark's own functional tests use, minus
Delta: only the package registries are reachable, and delta-spark fetches its jars from
elsewhere at run time, so the server runs Spark's built-in Parquet tables.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .postgres import free_port

TEMP_PREFIX = "audsync-spark-"

START_TIMEOUT_ENV = "AUDSYNC_SPARK_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 240.0
"""How long the server may take to answer (about 30 s on an idle machine; the shared CI
machine can be several times slower)."""

THRIFT_SERVER_CLASS = "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2"


class SparkNotFound(RuntimeError):
    """Raised when Java or pyspark (with its spark-submit) is not installed."""


def spark_home() -> Path | None:
    """The installed pyspark package's folder (a complete SPARK_HOME), or None."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        return None
    home = Path(list(spec.submodule_search_locations)[0])
    return home if (home / "bin" / "spark-submit").exists() else None


def missing_requirements() -> str | None:
    """Why a Spark server cannot be started here, or None when it can."""
    problems = []
    if shutil.which("java") is None:
        problems.append("no `java` on PATH (apt-get install openjdk-17-jre-headless)")
    if spark_home() is None:
        problems.append("pyspark is not installed (pip install -e '.[test]' installs it)")
    if importlib.util.find_spec("pyhive") is None:
        problems.append("PyHive is not installed (dbt-spark[PyHive], a test extra)")
    return "; ".join(problems) or None


def close_quietly(connection) -> None:
    """Close a PyHive connection; the Thrift server can fail to close a session (its Hive
    function registry loads a class the pyspark wheel lacks) after the work is done."""
    try:
        connection.close()
    except Exception:  # noqa: BLE001 - the server drops the session itself
        pass


@dataclass
class SparkServer:
    """A running Thrift server: where it listens, and how to stop it."""

    host: str
    port: int
    base_dir: Path
    process: subprocess.Popen | None = None
    _schemas: int = 0

    @property
    def log_file(self) -> Path:
        return self.base_dir / "thriftserver.log"

    def connect(self, schema: str = "default"):
        """A PyHive connection (auth NONE: SASL PLAIN, as dbt-spark's thrift method uses)."""
        from pyhive import hive

        return hive.connect(host=self.host, port=self.port, username="audsync", database=schema)

    def query(self, sql: str, params=None) -> list[tuple]:
        """Run ``sql`` on a fresh connection; its rows (empty for statements)."""
        connection = self.connect()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
        finally:
            close_quietly(connection)

    def new_schema_name(self, label: str = "test") -> str:
        """A schema name no other project of this session uses."""
        self._schemas += 1
        clean = "".join(c if c.isalnum() else "_" for c in label.lower())[:40]
        return f"{clean}_{os.getpid()}_{self._schemas}"

    def drop_schema(self, schema: str) -> None:
        """Drop ``schema`` and the state schema beside it, with every table in them."""
        for name in (schema, f"{schema}_audsync"):
            self.query(f"drop schema if exists `{name}` cascade")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the server (its whole process group: spark-submit and its JVM) and remove
        its folder. Safe to call twice."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=30)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def start_spark(timeout_s: float | None = None) -> SparkServer:
    """Start a Thrift server and wait until it answers; the caller must stop it.

    Raises :class:`SparkNotFound` when Java or pyspark is missing, and ``RuntimeError`` with
    the server's log when it does not answer within ``timeout_s``
    (``AUDSYNC_SPARK_START_TIMEOUT_S``, default 240).
    """
    missing = missing_requirements()
    if missing:
        raise SparkNotFound(missing)
    if timeout_s is None:
        timeout_s = float(os.environ.get(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S))
    home = spark_home()
    base = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    server = SparkServer("127.0.0.1", free_port(), base)
    atexit.register(server.stop)
    env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1",
               SPARK_LOG_DIR=str(base), SPARK_PID_DIR=str(base))
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    command = [
        str(home / "bin" / "spark-submit"),
        "--class", THRIFT_SERVER_CLASS,
        "--master", "local[2]",
        "--driver-memory", "1g",
        "--conf", f"spark.sql.warehouse.dir={base / 'warehouse'}",
        "--conf", "spark.sql.shuffle.partitions=2",
        "--conf", "spark.default.parallelism=2",
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.sql.session.timeZone=UTC",
        "--conf", f"spark.driver.extraJavaOptions=-Dderby.system.home={base} -Duser.timezone=UTC",
        "--conf", f"spark.hadoop.javax.jdo.option.ConnectionURL=jdbc:derby:;databaseName={base / 'metastore_db'};create=true",
        "--hiveconf", f"hive.server2.thrift.port={server.port}",
        "--hiveconf", f"hive.server2.thrift.bind.host={server.host}",
        "spark-internal",
    ]
    log = open(server.log_file, "wb")
    server.process = subprocess.Popen(
        command, cwd=base, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop() ends the JVM with it
    )
    log.close()
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if not server.is_running():
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"the Spark Thrift server exited at start:\n{tail}")
        try:
            with socket.create_connection((server.host, server.port), timeout=2):
                pass
            if server.query("select 1") == [(1,)]:
                return server
        except Exception as error:  # noqa: BLE001 - not listening yet
            last_error = error
        time.sleep(1.0)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(
        f"the Spark Thrift server did not answer within {timeout_s:.0f} s ({START_TIMEOUT_ENV});"
        f" last error: {last_error!r}\n--- server log ---\n{tail}"
    )


__all__ = ["close_quietly", "SparkNotFound", "SparkServer", "missing_requirements", "spark_home", "start_spark"]
