"""Fixtures shared by the whole suite: a throwaway PostgreSQL cluster and dbt projects.

* ``postgres_server`` (session): a cluster this session starts itself, never one that happens
  to be running; stopped and removed at the end.
* ``warehouse``: ``"duckdb"`` and ``"postgres"``; a test that uses it runs once on each.
  ``--warehouses duckdb`` (or ``AUDSYNC_TEST_WAREHOUSES=duckdb``) deselects the others, and
  pytest reports how many it deselected.
* ``spark_server`` (session): a Spark Thrift server this session starts from the installed
  pyspark, stopped at the end. Spark is a choice of ``--warehouses`` that is off by default
  (``--warehouses duckdb,postgres,spark`` or ``--warehouses spark``): the tests marked
  ``spark`` (the focused Spark subset, ``tests/integration/test_spark.py`` and
  ``test_fault_matrix[spark]``, which parametrizes ``warehouse`` itself) run only then.
  Without Java or pyspark they are skipped with the reason, except under ``CI=true``, where
  ``.ci/run`` installs both, and a missing one is a failure.
* ``dbt_project``: a :class:`~tests.support.dbt_project.DbtProject` in ``tmp_path`` on that
  warehouse; ``dbt_project_factory`` makes more than one.

Nothing is skipped quietly: without PostgreSQL the postgres tests fail with the fix to apply.

Two sizes of run, both reported by pytest as deselections:

* the default (what CI and the README's test command run, within CI's time): every test except
  those marked ``slow``, and the slow ones also marked ``ci`` (the fault matrix, the kill and
  concurrency proofs, one end to end test of the service and of the dashboard);
* ``--full`` (or ``AUDSYNC_FULL_SUITE=1``): every test. A ``-m`` expression or a test named
  by its node id (``file.py::test``) runs as asked, slow or not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# The lead installs the runner editable (`pip install -e ".[test]"`); a bare checkout still
# imports it from python/.
if importlib.util.find_spec("audsync") is None:
    sys.path.insert(0, str(REPO_ROOT / "python"))

from tests.support.dbt_project import DEFAULT_WAREHOUSES, WAREHOUSES, DbtProject
from tests.support.postgres import PostgresServer, start_postgres
from tests.support.spark import SparkNotFound, SparkServer, start_spark


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--warehouses",
        default=os.environ.get("AUDSYNC_TEST_WAREHOUSES", ",".join(DEFAULT_WAREHOUSES)),
        help="comma-separated warehouses to test on, of duckdb, postgres, spark (default: "
        "duckdb,postgres; spark runs the tests marked spark; env AUDSYNC_TEST_WAREHOUSES)",
    )
    parser.addoption(
        "--full",
        action="store_true",
        default=os.environ.get("AUDSYNC_FULL_SUITE", "") not in ("", "0"),
        help="run the slow tests too, not only those marked ci (env AUDSYNC_FULL_SUITE=1)",
    )


def _selected_warehouses(config: pytest.Config) -> list[str]:
    chosen = [w.strip() for w in config.getoption("--warehouses").split(",") if w.strip()]
    unknown = sorted(set(chosen) - set(WAREHOUSES))
    if unknown or not chosen:
        raise pytest.UsageError(
            f"--warehouses: unknown {', '.join(unknown) or '(empty)'}; "
            f"expected a comma-separated subset of {', '.join(WAREHOUSES)}"
        )
    return chosen


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds")
    config.addinivalue_line("markers", "spark: runs on the Spark Thrift server (--warehouses ...,spark)")
    config.addinivalue_line("markers", "ci(warehouses=None): a slow test the default (CI) run keeps, "
                            "on the warehouses named (default: all)")
    _selected_warehouses(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (visibly, in pytest's summary) the tests of warehouses not chosen, and the slow
    tests not marked ``ci`` unless ``--full``."""
    chosen = set(_selected_warehouses(config))
    # A marker expression or a test named by its node id is an explicit choice: run it.
    full = (config.getoption("--full") or bool(config.option.markexpr)
            or any("::" in str(arg) for arg in config.args))
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        warehouse = callspec.params.get("warehouse") if callspec else None
        if item.get_closest_marker("spark") is not None:
            warehouse = "spark"
        other_warehouse = warehouse is not None and warehouse not in chosen
        slow_only_in_full = not full and item.get_closest_marker("slow") and not _kept_by_ci(item, warehouse)
        (drop if other_warehouse or slow_only_in_full else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _kept_by_ci(item: pytest.Item, warehouse: str | None) -> bool:
    """Whether a slow test is marked ``ci``: ``@pytest.mark.ci`` keeps it on every warehouse,
    ``@pytest.mark.ci(warehouses=["duckdb"])`` on those named only."""
    marker = item.get_closest_marker("ci")
    if marker is None:
        return False
    only = marker.kwargs.get("warehouses")
    return only is None or warehouse is None or warehouse in only


@pytest.fixture(autouse=True)
def _restore_audsync_logger():
    """Put the ``audsync`` logger back as a fresh process has it, before and after each test.

    ``audsync`` configures its logger once per process (handler, level, ``propagate=False``).
    Tests invoke the CLI in this one process, some from module- or session-scoped fixtures
    that run before any function-scoped fixture could save the state; without a reset to
    the pristine state a later test's ``caplog`` would see nothing.
    """
    logger = logging.getLogger("audsync")

    def pristine() -> None:
        logger.handlers[:], logger.filters[:] = [], []
        logger.setLevel(logging.NOTSET)
        logger.propagate, logger.disabled = True, False

    pristine()
    others = _logger_states()
    yield
    pristine()
    # Libraries' loggers too: a vendor SDK used as an oracle sets urllib3's level to WARNING,
    # which hid the DEBUG lines a later test's redaction check reads.
    changed = [(one, state) for one, state in others.items()
               if (one.level, one.disabled, one.propagate) != state]
    for one, state in changed:
        one.level, one.disabled, one.propagate = state
    if changed:
        logging.Logger.manager._clear_cache()  # what setLevel does: levels are cached per logger


def _logger_states() -> dict[logging.Logger, tuple[int, bool, bool]]:
    """Level, disabled and propagate of every logger that exists now."""
    existing = [logging.getLogger()] + [
        one for one in logging.Logger.manager.loggerDict.values() if isinstance(one, logging.Logger)]
    return {one: (one.level, one.disabled, one.propagate) for one in existing}


@pytest.fixture(autouse=True)
def _fresh_secret_registry():
    """Each test starts with no secrets registered for redaction, as a fresh ``audsync``
    process would: a token one test registers must not mask another test's text."""
    from audsync import redact

    redact.clear_secrets()
    yield
    redact.clear_secrets()


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """A PostgreSQL cluster started for this session on 127.0.0.1, removed at the end."""
    try:
        server = start_postgres()
    except Exception as exc:  # noqa: BLE001 - every postgres test must fail loudly with it
        pytest.fail(f"could not start a throwaway PostgreSQL cluster: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def spark_server() -> SparkServer:
    """A Spark Thrift server started for this session on 127.0.0.1, stopped at the end."""
    try:
        server = start_spark()
    except SparkNotFound as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the Spark tests, and cannot: {exc}", pytrace=False)
        pytest.skip(f"Spark tests need Java and pyspark: {exc}")
    except Exception as exc:  # noqa: BLE001 - every spark test must fail loudly with it
        pytest.fail(f"could not start a Spark Thrift server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def spark_project(spark_server: SparkServer, tmp_path: Path):
    """A fresh dbt project on the session's Spark server, in a schema of its own (dropped
    at the end)."""
    project = DbtProject(tmp_path / "proj", "spark", spark=spark_server)
    yield project
    spark_server.drop_schema(project.schema)


@pytest.fixture(params=list(DEFAULT_WAREHOUSES), ids=list(DEFAULT_WAREHOUSES))
def warehouse(request: pytest.FixtureRequest) -> str:
    """The warehouse under test: ``"duckdb"`` or ``"postgres"``."""
    return request.param


@pytest.fixture
def dbt_project_factory(warehouse: str, tmp_path: Path, request: pytest.FixtureRequest):
    """Make :class:`DbtProject` s on the test's warehouse: ``factory(name="proj", **kwargs)``.

    Each project gets its own folder under ``tmp_path`` (and, on PostgreSQL, its own database;
    on Spark, for a test that parametrizes ``warehouse`` with ``"spark"``, its own schema).
    """
    pg = request.getfixturevalue("postgres_server") if warehouse == "postgres" else None
    spark = request.getfixturevalue("spark_server") if warehouse == "spark" else None
    made: list[DbtProject] = []

    def factory(name: str = "proj", **kwargs) -> DbtProject:
        root = tmp_path / f"{name}_{len(made)}" if made else tmp_path / name
        project = DbtProject(root, warehouse, pg=pg, spark=spark, name=name, **kwargs)
        made.append(project)
        return project

    yield factory
    for project in made:
        if pg is not None:
            pg.drop_database(project.database)
        if spark is not None:
            spark.drop_schema(project.schema)


@pytest.fixture
def dbt_project(dbt_project_factory) -> DbtProject:
    """A fresh dbt project in ``tmp_path`` that installs audsync, on the test's warehouse."""
    return dbt_project_factory()
